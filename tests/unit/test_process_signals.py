"""
The reactor's stop signals are handled in its loop, never inside the
signal handler, where Twisted's logging can deadlock on its own lock.
"""

from __future__ import annotations

import signal

import pytest

from mailserver.process import stop_signals_in_the_loop


class _Reactor:
    def __init__(self) -> None:
        self.handled: list[tuple[str, int]] = []
        self.later: list[tuple] = []

    def sigTerm(self, number, frame=None) -> None:
        self.handled.append(("term", number))

    def sigInt(self, number, frame=None) -> None:
        self.handled.append(("int", number))

    def callFromThread(self, f, *args) -> None:
        self.later.append((f, args))


@pytest.fixture
def saved_handlers():
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def test_sigterm_and_sigint_only_schedule_the_reactor_handler(saved_handlers):
    reactor = _Reactor()
    signal.signal(signal.SIGTERM, reactor.sigTerm)
    signal.signal(signal.SIGINT, reactor.sigInt)
    stop_signals_in_the_loop(reactor)

    signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
    signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
    assert reactor.handled == []  # nothing ran (or logged) in the handler
    for f, args in reactor.later:  # the loop runs them
        f(*args)
    assert reactor.handled == [("term", signal.SIGTERM), ("int", signal.SIGINT)]


def test_handlers_that_are_not_the_reactor_s_are_left_alone(saved_handlers):
    def own(number, frame):
        pass

    signal.signal(signal.SIGTERM, own)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    stop_signals_in_the_loop(_Reactor())
    assert signal.getsignal(signal.SIGTERM) is own
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
