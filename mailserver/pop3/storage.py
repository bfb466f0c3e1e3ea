"""
A POP3 session's file work, none of it on the reactor thread's critical
path: opening a mailbox and reading messages run in a worker thread
(L{open_mailbox}, L{read_messages}); QUIT's renames and unlinks run on the
reactor thread a slice at a time (L{update_mailbox}).

The mailbox is reached only through L{mailserver.interfaces.IMailbox}.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import BinaryIO

from twisted.internet import defer
from twisted.internet.task import Cooperator
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from mailserver.interfaces import IMailbox, IMailboxStore
from mailserver.logs import emit

# Messages under this size are read whole and sent with their response in
# one piece; larger ones are streamed.
WHOLE_MESSAGE = 128 * 1024
# QUIT's renames and unlinks done per reactor turn, all sessions together
# (a few milliseconds).
STEPS_PER_TURN = 256

_log = Logger(namespace="mailserver.pop3")


def open_mailbox(store: IMailboxStore, address: str) -> tuple[IMailbox, list] | None:
    """
    Lock and list an account's mailbox (in a worker thread: a big one is
    slow to list); C{None} if another session holds it.
    """
    mailbox = store.mailbox(address)
    if not mailbox.lock():
        return None
    try:
        return mailbox, mailbox.messages()
    except BaseException:
        mailbox.unlock()
        raise


def read_messages(wanted: Sequence[tuple[IMailbox, object]]) -> list[bytes | BinaryIO | Failure]:
    """
    Read several messages at once, in a worker thread: the RETRs and TOPs
    a client pipelined cost one trip to the thread between them.  Each
    message is its bytes if it is smaller than L{WHOLE_MESSAGE}, else an
    open file to stream, or the L{Failure} of reading it.
    """
    results: list[bytes | BinaryIO | Failure] = []
    for mailbox, message in wanted:
        try:
            data = mailbox.read_whole(message, WHOLE_MESSAGE) if message.size < WHOLE_MESSAGE else None
            results.append(data if data is not None else mailbox.open(message))
        except OSError:
            results.append(Failure())
    return results


def update_mailbox(
    run_in_slices: Callable[[Iterator[None]], defer.Deferred],
    run_blocking: Callable[..., defer.Deferred],
    mailbox: IMailbox,
    doomed: list,
    seen: list,
) -> defer.Deferred:
    """
    The UPDATE state (RFC 1939 6): flag the retrieved messages seen, remove
    the deleted ones and sync their folders, then unlock the mailbox
    (whether or not the client is still there).  Fires with C{None} or
    fails with the first removal's error.
    """
    done = run_in_slices(_update_steps(mailbox, doomed, seen))
    if doomed:
        done.addCallback(lambda _: run_blocking(mailbox.sync_removals, doomed))

    def unlock(result):
        mailbox.unlock()
        return result

    return done.addBoth(unlock)


def _update_steps(mailbox: IMailbox, doomed: list, seen: list) -> Iterator[None]:
    """
    One file per step: retrieved messages are flagged seen, deleted ones
    go.  A message that cannot be flagged is only logged: it stays,
    unflagged.

    The steps run on the reactor thread, a slice per turn: in a worker
    thread every rename would hand the GIL back and forth with the reactor
    (each of its system calls lets the worker in), which cost the other
    sessions more than the renames themselves.
    """
    for message in seen:
        try:
            mailbox.mark_seen(message)
        except OSError as e:
            emit(_log, LogLevel.error, "pop3.seen_failed", "marking a message seen failed",
                 uid=message.uid, problem=str(e))
        yield None
    for message in doomed:
        mailbox.remove(message)
        yield None


class _StepCounter:
    """
    A L{Cooperator} termination predicate: true after C{steps} calls.
    """

    def __init__(self, steps: int) -> None:
        self._left = steps

    def __call__(self) -> bool:
        self._left -= 1
        return self._left <= 0


def sliced_on(reactor) -> Callable[[Iterator[None]], defer.Deferred]:
    """
    Runs iterators of quick steps, L{STEPS_PER_TURN} of them (of every
    iterator together) per reactor turn.
    """
    return Cooperator(
        terminationPredicateFactory=lambda: _StepCounter(STEPS_PER_TURN),
        scheduler=lambda work: reactor.callLater(0, work),
    ).coiterate
