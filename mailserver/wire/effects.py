"""
What a pure session handler asks of its glue besides replies: the
handler returns these and never touches a transport; the protocol's glue
does the I/O.

A handler's result is a reply, C{None}, one of these, a Deferred whose
result is again a result, or a tuple of results done in order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet.defer import Deferred


class Effect:
    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


# Send what is queued, then close the connection.
CLOSE = Effect("CLOSE")
# Send what is queued, throw away the unread input, start TLS.
START_TLS = Effect("START_TLS")


@dataclass(frozen=True)
class Login:
    """
    Check these credentials (throttled; see L{mailserver.wire.login}).
    """

    username: bytes
    password: bytes


@dataclass(frozen=True, slots=True)
class Await:
    """
    Handle no more input until C{deferred} fires; then give its result (or
    failure) to C{then}, whose return value is the result to carry out.
    Nothing is called if the connection is closed meanwhile.
    """

    deferred: Deferred
    then: Callable[[object], object]
