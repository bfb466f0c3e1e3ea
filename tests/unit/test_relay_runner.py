"""
The relay runner with a recording courier and a controlled clock: retries,
bounces, NOTIFY, expiry, restart, CLI requests and connection limits.
"""

from __future__ import annotations

import email
import email.policy

from twisted.internet import defer

from mailserver.config import Config, HostPort, Relay
from mailserver.envelope import Envelope, Recipient
from mailserver.from_config import accounts_for
from mailserver.intake import Intake
from mailserver.maildir import Mailbox
from mailserver.relay import QueueStore, RelayRunner
from mailserver.relay.client import Reply
from mailserver.relay.delivery import Outcome
from mailserver.testing import InlineCommitter, InlineReactor


class Courier:
    """
    Answers every recipient with the next scripted reply code (the last one
    repeats), or holds the attempt when told to.
    """

    def __init__(self, *codes: int) -> None:
        self.codes = list(codes)
        self.calls = []
        self.hold = False
        self.held = []

    def deliver(self, message, recipients):
        self.calls.append((message.id, tuple(r.address for r in recipients)))
        if self.hold:
            d = defer.Deferred()
            self.held.append((d, recipients))
            return d
        code = self.codes.pop(0) if len(self.codes) > 1 else self.codes[0]
        return defer.succeed(self.outcomes(recipients, code))

    @staticmethod
    def outcomes(recipients, code):
        text = {250: "2.0.0 ok", 451: "4.3.0 try later", 550: "5.1.1 no such user"}[code]
        return {r.address: Outcome(Reply.received(code, (text,)), "mx.remote.test") for r in recipients}


class World:
    def __init__(self, tmp_path, courier, **relay) -> None:
        self.config = Config(
            hostname="mx.test",
            data_dir=str(tmp_path / "data"),
            local_domains=("example.org",),
            relay=Relay(**relay),
        )
        self.reactor = InlineReactor()
        self.accounts = accounts_for(self.config)
        if "s@example.org" not in self.accounts.users():
            self.accounts.add_user("s@example.org", "pw")
        self.queue = QueueStore(self.config.queue_path, clock=self.reactor.seconds)
        self.intake = Intake(
            accounts=self.accounts, reactor=self.reactor, data_path=self.config.data_path,
            hostname=self.config.hostname, min_free_space=0, queue=self.queue,
            committer=InlineCommitter(),
        )
        self.courier = courier
        self.runner = RelayRunner(
            relay=self.config.relay, hostname=self.config.hostname,
            mta_sts_path=self.config.mta_sts_path, queue=self.queue,
            intake=self.intake, reactor=self.reactor,
            courier=courier, accounts=self.accounts, jitter=lambda d: d,
        )

    def start(self):
        self.runner.startService()
        self.reactor.advance(0)

    def send(self, sender="s@example.org", to=("r@remote.test",), notify=(), ret=None,
             data=b"Subject: hello\r\n\r\nbody\r\n"):
        receiver = self.intake.begin(Envelope(
            sender=sender,
            recipients=tuple(Recipient(address=a, destinations=(a,), notify=notify) for a in to),
            ret=ret,
        ))
        receiver.write(data)
        results = []
        receiver.finish().addBoth(results.append)
        self.reactor.advance(0)
        return results[0]

    def bounces(self):
        box = Mailbox(self.accounts.mailbox_path("s@example.org"), self.config.data_path)
        if not (box.path / "new").exists():
            return []
        out = []
        for info in box.messages():
            with box.open(info) as f:
                out.append(email.message_from_bytes(f.read(), policy=email.policy.default))
        return out


def test_success_removes_the_message(tmp_path):
    w = World(tmp_path, Courier(250))
    w.start()
    w.send()
    assert w.courier.calls and w.courier.calls[0][1] == ("r@remote.test",)
    assert w.queue.ids() == []
    assert w.bounces() == []


def test_temporary_failure_is_retried_on_the_schedule(tmp_path):
    w = World(tmp_path, Courier(451, 451, 250))
    w.start()
    queue_id = w.send()
    assert len(w.courier.calls) == 1
    message = w.queue.load(w.queue.ids()[0])
    assert message.attempts == 1 and message.last_error == "451 4.3.0 try later"
    assert message.next_attempt == w.reactor.seconds() + 300
    w.reactor.advance(299)
    assert len(w.courier.calls) == 1
    w.reactor.advance(1)
    assert len(w.courier.calls) == 2
    w.reactor.advance(599)
    assert len(w.courier.calls) == 2
    w.reactor.advance(1)
    assert len(w.courier.calls) == 3
    assert w.queue.ids() == [] and w.bounces() == []
    assert queue_id


def test_permanent_failure_bounces_once_to_the_local_sender(tmp_path):
    w = World(tmp_path, Courier(550))
    w.start()
    w.send(to=("r@remote.test", "q@remote.test"))
    assert len(w.courier.calls) == 1  # one transaction per domain
    assert w.queue.ids() == []
    [report] = w.bounces()
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    status = report.get_payload()[1].get_payload()
    finals = sorted(block["Final-Recipient"] for block in status[1:])
    assert finals == ["rfc822; q@remote.test", "rfc822; r@remote.test"]
    assert {block["Status"] for block in status[1:]} == {"5.1.1"}
    assert report.get_payload()[2].get_content_type() == "message/rfc822"


def test_ret_hdrs_returns_only_headers(tmp_path):
    w = World(tmp_path, Courier(550))
    w.start()
    w.send(ret="HDRS")
    [report] = w.bounces()
    assert report.get_payload()[2].get_content_type() == "text/rfc822-headers"


def test_null_sender_is_never_bounced(tmp_path):
    w = World(tmp_path, Courier(550))
    w.start()
    w.send(sender="")
    assert w.queue.ids() == []
    assert w.bounces() == []


def test_notify_never_and_success(tmp_path):
    w = World(tmp_path, Courier(550))
    w.start()
    w.send(notify=("NEVER",))
    assert w.queue.ids() == [] and w.bounces() == []
    w.courier.codes = [250]
    w.send(notify=("SUCCESS",))
    [report] = w.bounces()
    status = report.get_payload()[1].get_payload()
    assert status[1]["Action"] == "relayed"


def test_expired_message_bounces_with_the_last_error(tmp_path):
    w = World(tmp_path, Courier(451), max_age=3600.0, retry_schedule=(600.0,))
    w.start()
    w.send()
    for _ in range(10):
        w.reactor.advance(600)
    assert w.queue.ids() == []
    [report] = w.bounces()
    block = report.get_payload()[1].get_payload()[1]
    assert block["Action"] == "failed"
    assert block["Status"] == "4.4.7"
    assert "try later" in block["Diagnostic-Code"]
    assert len(w.courier.calls) == 4  # at 0, 10m, 30m and the last at 1h


def test_delay_warning_once_for_notify_delay(tmp_path):
    w = World(tmp_path, Courier(451), delay_warning=900.0, retry_schedule=(600.0,))
    w.start()
    w.send(notify=("DELAY", "FAILURE"))
    w.reactor.advance(600)
    assert w.bounces() == []
    w.reactor.advance(1200)
    w.reactor.advance(2400)
    [report] = w.bounces()
    assert report.get_payload()[1].get_payload()[1]["Action"] == "delayed"


def test_restart_picks_up_the_queue(tmp_path):
    w = World(tmp_path, Courier(451))
    w.start()
    w.send()
    w.send()
    w.runner.stopService()
    assert len(w.queue.ids()) == 2
    w2 = World(tmp_path, Courier(250))
    w2.start()
    assert len(w2.courier.calls) == 0  # not yet due: 5 minutes after the first try
    w2.reactor.advance(300)
    assert len(w2.courier.calls) == 2
    assert w2.queue.ids() == []


def test_flush_and_cli_requests(tmp_path):
    w = World(tmp_path, Courier(451), scan_interval=5)
    w.start()
    w.send(to=("a@one.test",))
    w.send(to=("b@two.test",))
    assert len(w.courier.calls) == 2
    assert w.runner.flush("two.test") == 1
    w.reactor.advance(0)
    assert w.courier.calls[-1][1] == ("b@two.test",)
    one, two = sorted(w.queue.all(), key=lambda m: m.recipients[0].address)
    w.queue.request("delete", two.id)
    w.queue.request("bounce", one.id)
    w.reactor.advance(5)
    assert w.queue.ids() == []
    [report] = w.bounces()
    assert "a@one.test" in report.get_payload()[1].get_payload()[1]["Final-Recipient"]


def test_connection_limit_per_destination(tmp_path):
    courier = Courier(250)
    courier.hold = True
    w = World(tmp_path, courier, max_connections_per_destination=1, max_connections=2)
    w.start()
    w.send(to=("a@one.test",))
    w.send(to=("b@one.test",))
    w.send(to=("c@two.test",))
    w.send(to=("d@three.test",))
    assert [c[1] for c in courier.calls] == [("a@one.test",), ("c@two.test",)]
    d, recipients = courier.held.pop(0)
    d.callback(Courier.outcomes(recipients, 250))
    assert [c[1] for c in courier.calls][2:] == [("b@one.test",)]
    d, recipients = courier.held.pop(0)
    d.callback(Courier.outcomes(recipients, 250))
    assert [c[1] for c in courier.calls][3:] == [("d@three.test",)]


# Corrupt queue entries and failed attempts.

import pytest  # noqa: E402
from twisted.logger import formatEvent, globalLogPublisher  # noqa: E402

from mailserver.metrics import unregistered_metrics  # noqa: E402


@pytest.fixture
def logged():
    lines = []

    def observe(event):
        if event.get("log_namespace", "").startswith("mailserver.relay"):
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


def corrupt_lines(lines):
    return [line for line in lines if "is corrupt" in line]


def test_corrupt_entry_at_start_is_set_aside_once_and_the_rest_delivered(tmp_path, logged):
    w = World(tmp_path, Courier(451), scan_interval=5)
    w.start()
    w.send()
    w.send()
    w.runner.stopService()
    good, bad = sorted(w.queue.ids())
    (w.queue.envelopes_path / f"{bad}.json").write_text('{"version": 1, "id": ')
    w2 = World(tmp_path, Courier(250), scan_interval=5)
    w2.runner._metrics = metrics = unregistered_metrics()
    w2.start()
    [line] = corrupt_lines(logged)
    assert f"file={w2.queue.envelopes_path / bad}.json, problem=not valid JSON" in line
    assert f"where={w2.queue.corrupt_path / bad}.json" in line
    assert metrics.relay_queue_corrupt_total.value() == 1
    assert w2.queue.ids() == [good]
    assert (w2.queue.corrupt_path / bad).exists()  # the message kept beside it
    w2.reactor.advance(300)
    assert [c[0] for c in w2.courier.calls] == [good]
    for _ in range(5):
        w2.reactor.advance(5)
    assert len(corrupt_lines(logged)) == 1 and w2.queue.ids() == []
    assert w2.bounces() == []


def test_entry_that_goes_bad_while_queued_is_set_aside_at_its_attempt(tmp_path, logged):
    w = World(tmp_path, Courier(451), scan_interval=1000)
    w.start()
    w.send()
    [queue_id] = w.queue.ids()
    (w.queue.messages_path / queue_id).unlink()
    w.reactor.advance(300)
    [line] = corrupt_lines(logged)
    assert "its message file is missing" in line
    assert len(w.courier.calls) == 1 and w.queue.ids() == []
    assert w.queue.corrupt_entries() == [(queue_id, "its message file is missing")]
    w.reactor.advance(3000)
    assert len(corrupt_lines(logged)) == 1 and len(w.courier.calls) == 1


def test_entry_that_cannot_be_moved_is_reported_once_and_ignored(tmp_path, logged):
    w = World(tmp_path, Courier(250), scan_interval=5)
    w.queue._ensure()
    (w.queue.envelopes_path / "BAD.json").write_text("nonsense")

    def cannot(queue_id, problem):
        raise PermissionError(13, "Permission denied")

    w.queue.set_aside = cannot
    w.start()
    for _ in range(5):
        w.reactor.advance(5)
    [line] = corrupt_lines(logged)
    assert "cannot be moved aside; ignoring it" in line and "error=Permission denied" in line
    assert w.courier.calls == []
    w.send()
    assert len(w.courier.calls) == 1  # the good ones still go


def test_an_attempt_that_crashes_backs_off_instead_of_looping(tmp_path, logged):
    class Crashing(Courier):
        def deliver(self, message, recipients):
            if not self.calls:
                self.calls.append(message.id)
                return defer.fail(RuntimeError("a bug"))
            return super().deliver(message, recipients)

    w = World(tmp_path, Crashing(250), scan_interval=5)
    w.start()
    w.send()
    assert len(w.courier.calls) == 1 and any("attempt failed" in line for line in logged)
    for _ in range(59):
        w.reactor.advance(5)
    assert len(w.courier.calls) == 1  # not at every scan
    w.reactor.advance(5)
    assert len(w.courier.calls) == 2 and w.queue.ids() == []


def test_turning_off_next_hop_verification_is_warned_at_start(tmp_path):
    from twisted.logger import formatEvent, globalLogPublisher

    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        for verify in (True, False):
            world = World(tmp_path / str(verify), None, resolver=HostPort("127.0.0.1", 53),
                          smarthost=HostPort("127.0.0.1", 587), smarthost_tls_verify=verify)
            world.start()
            world.runner.stopService()
    finally:
        globalLogPublisher.removeObserver(seen.append)
    warnings = [formatEvent(e) for e in seen if e.get("event") == "relay.tls_unverified"]
    assert len(warnings) == 1 and "are not checked" in warnings[0]
