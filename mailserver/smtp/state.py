"""
The states of an SMTP session and the connection facts it is given.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass


class State(enum.Enum):
    """
    @ivar reads_lines: input is command lines (or SASL responses).
    @ivar in_message: input is message text, timed by the data timeout.
    """

    START = ("start", True)  # greeted; no HELO/EHLO yet (again after STARTTLS)
    READY = ("ready", True)  # HELO/EHLO done, no transaction
    MAIL = ("mail", True)  # MAIL accepted: RCPT, DATA, BDAT
    CHUNKING = ("chunking", True)  # between the BDAT chunks of a message
    AUTH = ("auth", True)  # a SASL response line is due
    DATA = ("data", False)  # reading DATA's text up to <CRLF>.<CRLF>
    BDAT = ("bdat", False)  # reading a BDAT chunk's octets
    CLOSED = ("closed", False)

    def __init__(self, label: str, reads_lines: bool) -> None:
        self.label = label
        self.reads_lines = reads_lines
        self.in_message = label in ("data", "bdat")

    # Members are singletons: hashed by identity in C, not by name in
    # Python, as the command table is looked up once per command.
    __hash__ = object.__hash__


@dataclass(slots=True)
class Connection:
    """
    The facts of the connection a session is told by its glue (not frozen:
    one is made per connection, and a frozen one is slower to make).

    @ivar describe_tls: the protocol and cipher in use, for the Received
        field (C{None} without TLS).
    @ivar tls_parameters: the TLS protocol and cipher names
        (C{("TLSv1.3", "TLS_AES_256_GCM_SHA384")}), C{(None, None)} when
        unknown, for the envelope (plugins such as Rspamd are told them).
    @ivar unread: octets the client has sent that the session has not
        handled yet (what L{mailserver.hooks.Client.pending_input} asks:
        the early-talker test).
    """

    address: str
    port: int
    loopback: bool
    describe_tls: Callable[[], str | None] = lambda: None
    tls_parameters: Callable[[], tuple[str | None, str | None]] = lambda: (None, None)
    unread: Callable[[], int] = lambda: 0
