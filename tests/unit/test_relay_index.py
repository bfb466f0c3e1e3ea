"""
The relay queue's in-memory index and the dispatcher that starts what is due.
"""

from __future__ import annotations

import gc
import random

from twisted.internet.task import Clock

from mailserver.relay.dispatch import Dispatcher
from mailserver.relay.index import QueueIndex, build
from mailserver.relay.queue import FAILED, QueuedMessage, QueueStore, RecipientState


def message(n: int, *to: str, next_attempt: float = 0.0, **fields) -> QueuedMessage:
    return QueuedMessage(
        id=f"{n:011X}AAAAAA", sender="s@example.org",
        recipients=tuple(RecipientState(address=a) for a in to or (f"r{n}@remote.test",)),
        arrival=float(n), next_attempt=next_attempt, **fields)


def filled(*messages: QueuedMessage) -> QueueIndex:
    index = QueueIndex()
    for m in messages:
        index.put(index.entry_for(m))
    return index


def ids(entries) -> list[str]:
    return [e.id for e in entries]


def test_entry_holds_what_the_views_need():
    m = message(5, "a@One.Test.", "b@one.test", "c@two.test", attempts=2, size=321,
                last_error="451 4.4.1 no answer", next_attempt=99.0)
    m = m.with_recipient("b@one.test", state=FAILED)
    [entry] = filled(m).entries()
    assert entry.id == m.id and entry.sender == "s@example.org"
    assert entry.pending == ("a@One.Test.", "c@two.test")
    assert entry.domains == ("one.test", "two.test")
    assert (entry.size, entry.arrival, entry.attempts, entry.next_attempt) == (321, 5.0, 2, 99.0)
    assert entry.last_error == "451 4.4.1 no answer"


def test_entries_share_repeated_values():
    # As read from envelope files: equal strings, different objects.
    one, two = (QueuedMessage.from_json(message(n, f"{n}@down.test", last_error="451 x").to_json())
                for n in (1, 2))
    assert one.sender is not two.sender
    index = filled(one, two)
    one, two = index.page(None, 2)
    assert one.domains is two.domains and one.sender is two.sender
    assert one.last_error is two.last_error
    assert one.pending == ("1@down.test",) and two.pending == ("2@down.test",)


def test_the_garbage_collector_stops_walking_the_entries():
    index = filled(*(message(n, f"r{n}@down.test", last_error="451 x") for n in range(100)))
    index.reschedule(message(5).id, 99.0)
    gc.collect()
    gc.collect()
    assert not any(gc.is_tracked(e) for e in index._entries.values())
    assert not any(gc.is_tracked(item) for item in index._due)


def test_pages_go_in_id_order_whatever_the_order_of_arrival():
    numbers = list(range(1, 51))
    random.Random(7).shuffle(numbers)
    index = filled(*(message(n) for n in numbers))
    pages, after = [], None
    while page := index.page(after, 7):
        pages.append(ids(page))
        after = page[-1].id
    assert [len(p) for p in pages] == [7] * 7 + [1]
    assert sum(pages, []) == [message(n).id for n in range(1, 51)]
    assert index.oldest().id == message(1).id


def test_removed_messages_leave_pages_and_the_oldest_right():
    index = filled(*(message(n) for n in range(1, 3001)))
    for n in range(1, 3001):
        if n % 3:
            index.remove(message(n).id)  # enough to compact the id order
    assert len(index) == 1000
    assert ids(index.page(None, 2)) == [message(3).id, message(6).id]
    assert ids(index.page(message(4).id, 1)) == [message(6).id]
    assert index.oldest().id == message(3).id
    index.remove(message(3).id)
    assert index.oldest().id == message(6).id
    index.put(index.entry_for(message(1)))  # one older than all comes back
    assert index.oldest().id == message(1).id and len(index) == 1000
    assert ids(index.page(None, 2)) == [message(1).id, message(6).id]
    index.remove("NOT-THERE")
    assert len(index) == 1000


def due(index: QueueIndex, now: float) -> str | None:
    return index.pop_due(now, 1_000_000)[0]


def test_due_messages_come_out_earliest_first_and_only_once():
    index = filled(message(1, next_attempt=30.0), message(2, next_attempt=10.0),
                   message(3, next_attempt=20.0))
    assert index.next_due() == 10.0
    assert due(index, 5.0) is None
    assert [due(index, 25.0), due(index, 25.0), due(index, 25.0)] == [
        message(2).id, message(3).id, None]
    assert index.next_due() == 30.0


def test_rescheduled_and_removed_messages_are_not_due_at_their_old_time():
    index = filled(message(1, next_attempt=10.0), message(2, next_attempt=20.0))
    index.reschedule(message(1).id, 50.0)
    index.remove(message(2).id)
    assert due(index, 40.0) is None
    assert index.next_due() == 50.0
    index.reschedule(message(1).id, 0.0)  # flushed
    assert due(index, 0.0) == message(1).id and due(index, 100.0) is None


def test_passing_over_old_times_is_done_a_few_at_a_time():
    index = filled(*(message(n, next_attempt=10.0) for n in range(100)))
    index.due_now([message(n).id for n in range(100)], 5.0)
    for n in range(100):
        index.reschedule(message(n).id, 50.0 + n)  # tried, say: both old times stale
    assert index.pop_due(20.0, 30) == (None, 30)  # stopped looking
    assert index.pop_due(20.0, 1000) == (None, 170)  # nothing due
    assert index.next_due() == 50.0
    assert index.pop_due(60.0, 1000) == (message(0).id, 1)


def test_the_heap_does_not_grow_with_reschedules():
    index = filled(*(message(n, next_attempt=float(n)) for n in range(10)))
    for t in range(5000):
        index.reschedule(message(t % 10).id, 1000.0 + t)
    assert len(index._due) <= 2 * len(index) + 1024
    assert sorted(due(index, 10_000.0) for _ in range(10)) == sorted(message(n).id for n in range(10))


def test_flushed_messages_come_due_first_and_once():
    index = filled(*(message(n, next_attempt=1000.0 + n) for n in range(100)))
    chosen = [message(n).id for n in range(0, 100, 2)]
    index.due_now(chosen, 5.0)
    assert index.next_due() == 5.0
    index.remove(chosen[1])
    index.reschedule(chosen[2], 3000.0)  # tried meanwhile, say
    expected = [i for i in chosen if i not in (chosen[1], chosen[2])]
    assert [due(index, 10.0) for _ in expected] == expected and due(index, 10.0) is None
    assert index.next_due() == 1001.0
    for queue_id in expected:
        index.reschedule(queue_id, 2000.0)
    left = sorted(message(n).id for n in range(100) if message(n).id not in chosen[1:3])
    assert sorted(due(index, 2500.0) for _ in left) == left
    assert due(index, 2500.0) is None and index.next_due() == 3000.0


def test_pending_ids_and_take_over():
    sent = message(3, "d@one.test").with_recipient("d@one.test", state=FAILED)  # reports owed
    index = filled(message(1, "a@one.test"), message(2, "b@two.test", "c@one.test"), sent)
    assert index.pending_ids("one.test") == [message(1).id, message(2).id]
    assert index.pending_ids("three.test") == []
    assert index.pending_ids() == [message(1).id, message(2).id]
    built = filled(message(1, "a@one.test"), message(3, "d@three.test"))
    live = filled(message(4, "e@four.test"))
    live.take_over(built)
    assert ids(live.page(None, 10)) == [message(n).id for n in (1, 3, 4)]
    assert live.next_due() == 0.0


def test_build_reads_every_envelope_and_reports_the_corrupt(tmp_path):
    from mailserver.config import Config

    store = QueueStore(Config(hostname="mx.test", data_dir=str(tmp_path / "data")).queue_path)
    for n in (1, 2):
        store.save(message(n))
        (store.messages_path / message(n).id).write_bytes(b"Subject: x\n\nbody\n")
    (store.envelopes_path / "BROKEN.json").write_text("{")
    index, corrupt = build(store)
    assert ids(index.page(None, 10)) == [message(1).id, message(2).id]
    assert [(e.queue_id, e.problem.split(" (")[0]) for e in corrupt] == [("BROKEN", "not valid JSON")]


# The dispatcher.


class Attempts:
    """
    Records started attempts; they end when the test says so.
    """

    def __init__(self, index: QueueIndex, clock: Clock, total=2, per_destination=1, batch=500):
        self.index = index
        self.started: list[str] = []
        self.refuse: set[str] = set()
        self.waited: list[tuple[str, float]] = []
        self.must_try: set[str] = set()
        self.dispatcher = Dispatcher(
            index=index, clock=clock, start=self.start,
            destinations=lambda e: e.domains, wait=self.wait, rest_for=lambda n: 60.0 * n,
            total=total, per_destination=per_destination, batch=batch)

    def start(self, queue_id: str) -> bool:
        if queue_id in self.refuse:
            return False
        self.started.append(queue_id)
        return True

    def wait(self, entry, until: float) -> bool:
        if entry.id in self.must_try:
            return False
        self.waited.append((entry.id, until))
        self.index.reschedule(entry.id, until)
        return True


def test_dispatcher_starts_what_is_due_when_it_is_due():
    clock = Clock()
    index = filled(message(1, "a@one.test", next_attempt=10.0),
                   message(2, "b@two.test", next_attempt=5.0))
    attempts = Attempts(index, clock, total=5)
    attempts.dispatcher.start()
    clock.advance(4)
    assert attempts.started == []
    clock.advance(1)
    assert attempts.started == [message(2).id]
    clock.advance(5)
    assert attempts.started == [message(2).id, message(1).id]
    assert clock.getDelayedCalls() == []  # nothing else is due: no timer


def test_a_busy_destination_holds_its_line_and_others_go_on():
    clock = Clock()
    index = filled(message(1, "a@down.test"), message(2, "b@down.test"),
                   message(3, "c@down.test"), message(4, "d@up.test"))
    attempts = Attempts(index, clock, total=3, per_destination=1)
    attempts.dispatcher.start()
    clock.advance(0)
    assert attempts.started == [message(1).id, message(4).id]
    assert attempts.dispatcher.waiting == 2
    attempts.dispatcher.finished(message(4).id)
    clock.advance(0)
    assert attempts.started == [message(1).id, message(4).id]  # down.test is still busy
    index.remove(message(2).id)  # deleted while waiting: skipped
    attempts.dispatcher.finished(message(1).id)
    clock.advance(0)
    assert attempts.started[2:] == [message(3).id]
    assert attempts.dispatcher.waiting == 0


def test_the_total_limit_leaves_the_rest_in_the_heap_until_an_attempt_ends():
    clock = Clock()
    index = filled(*(message(n, f"x@d{n}.test") for n in range(1, 6)))
    attempts = Attempts(index, clock, total=2, per_destination=1)
    attempts.dispatcher.start()
    clock.advance(0)
    assert attempts.started == [message(1).id, message(2).id]
    assert attempts.dispatcher.waiting == 0
    attempts.dispatcher.finished(message(1).id)
    clock.advance(0)
    assert attempts.started[2:] == [message(3).id]


def one_turn(clock: Clock) -> None:
    """
    Run the calls due now, but not those they make (as a reactor turn does).
    """
    for call in [c for c in clock.getDelayedCalls() if c.getTime() <= clock.seconds()]:
        clock.calls.remove(call)
        call.func(*call.args, **call.kw)


def test_many_due_at_once_are_taken_a_batch_per_turn():
    clock = Clock()
    index = filled(*(message(n, "x@down.test") for n in range(1, 11)))
    attempts = Attempts(index, clock, total=5, per_destination=1, batch=3)
    attempts.dispatcher.start()
    one_turn(clock)
    assert (len(attempts.started), attempts.dispatcher.waiting) == (1, 2)
    one_turn(clock)
    assert attempts.dispatcher.waiting == 5
    for _ in range(3):
        one_turn(clock)
    assert attempts.dispatcher.waiting == 9
    assert clock.getDelayedCalls() == []


def test_an_entry_the_runner_is_already_trying_is_not_held():
    clock = Clock()
    index = filled(message(1, "a@one.test"), message(2, "b@one.test"))
    attempts = Attempts(index, clock, total=2, per_destination=1)
    attempts.refuse.add(message(1).id)
    attempts.dispatcher.start()
    clock.advance(0)
    assert attempts.started == [message(2).id]
    attempts.dispatcher.finished(message(1).id)  # not held: no effect
    assert attempts.dispatcher.waiting == 0


def test_an_unreachable_destination_rests_and_its_messages_wait_for_it():
    clock = Clock()
    index = filled(*(message(n, "x@down.test") for n in range(1, 7)), message(7, "y@up.test"))
    attempts = Attempts(index, clock, total=5, per_destination=2)
    dispatcher = attempts.dispatcher
    dispatcher.start()
    clock.advance(0)
    assert attempts.started == [message(1).id, message(2).id, message(7).id]
    assert dispatcher.waiting == 4
    assert dispatcher.reached("down.test", False) == 60.0
    assert dispatcher.reached("down.test", False) is None  # the other attempt: same news
    dispatcher.finished(message(1).id)
    dispatcher.finished(message(2).id)
    clock.advance(0)
    # The line was put off to the rest's end, nothing else started there.
    assert sorted(attempts.waited) == [(message(n).id, 60.0) for n in range(3, 7)]
    assert dispatcher.waiting == 0 and len(attempts.started) == 3
    assert index.get(message(3).id).next_attempt == 60.0
    assert dispatcher.reached("up.test", True) is None
    # The rest ends: two more are tried, and fail: a longer rest.
    attempts.dispatcher.finished(message(7).id)
    clock.advance(60)
    assert attempts.started[3:] == [message(3).id, message(4).id]
    assert dispatcher.reached("down.test", False) == 60.0 + 120.0
    dispatcher.finished(message(3).id)
    clock.advance(0)
    assert (message(5).id, 180.0) in attempts.waited
    # It answers: the rest is over and the rest go.
    assert dispatcher.reached("down.test", True) is None
    dispatcher.finished(message(4).id)
    clock.advance(120)
    assert len(attempts.started) == 7


def test_a_rest_is_ended_by_wake_and_a_message_that_must_go_goes():
    clock = Clock()
    index = filled(message(1, "x@down.test"), message(2, "y@down.test"),
                   message(3, "z@down.test"))
    attempts = Attempts(index, clock, total=5, per_destination=1)
    dispatcher = attempts.dispatcher
    dispatcher.start()
    clock.advance(0)
    dispatcher.reached("down.test", False)
    attempts.must_try.add(message(3).id)  # it expires, say
    dispatcher.finished(message(1).id)
    clock.advance(0)
    assert attempts.waited == [(message(2).id, 60.0)]
    assert attempts.started == [message(1).id, message(3).id]
    dispatcher.wake(["down.test"])
    index.reschedule(message(2).id, clock.seconds())  # as a flush does
    dispatcher.finished(message(3).id)
    clock.advance(0)
    assert attempts.started[2:] == [message(2).id]


def test_a_destinations_window_grows_while_it_answers_and_shrinks_when_it_does_not():
    """
    Issue 22: per-destination concurrency as Postfix's: from 5, one more
    after each window's worth of attempts that reached a server, up to the
    limit; one less for each that reached none, down to one.
    """
    from mailserver.relay.dispatch import Concurrency

    windows = Concurrency(limit=8)
    assert windows("a.test") == 5
    for expected in (6, 7, 8, 8):
        for _ in range(windows("a.test")):
            windows.reached("a.test", True)
        assert windows("a.test") == expected
    for expected in (7, 6, 5, 4, 3, 2, 1, 1):
        windows.reached("a.test", False)
        assert windows("a.test") == expected
    assert windows("b.test") == 5  # each destination its own
    windows.forget("a.test")
    assert windows("a.test") == 5
    fixed = Concurrency(limit=4, initial=4, adaptive=False)
    fixed.reached("a.test", False)
    assert fixed("a.test") == 4 and Concurrency(limit=3)("a.test") == 3


def test_the_dispatcher_starts_more_as_a_destination_window_grows():
    from mailserver.relay.dispatch import Concurrency

    clock = Clock()
    index = filled(*(message(n, "x@busy.test") for n in range(1, 9)))
    attempts = Attempts(index, clock, total=10)
    dispatcher = Dispatcher(
        index=index, clock=clock, start=attempts.start, destinations=lambda e: e.domains,
        wait=attempts.wait, rest_for=lambda n: 60.0, total=10, per_destination=4,
        concurrency=Concurrency(limit=4, initial=2))
    dispatcher.start()
    clock.advance(0)
    assert attempts.started == [message(1).id, message(2).id]
    for queue_id in attempts.started[:2]:
        dispatcher.reached("busy.test", True)  # 2 -> 2.5 -> 3
        dispatcher.finished(queue_id)
    clock.advance(0)
    assert attempts.started[2:] == [message(n).id for n in (3, 4, 5)]
    assert dispatcher.waiting == 3
