"""
What one outbound SMTP transaction sends (L{Transaction}), how long each of
its waits may take (L{Timeouts}), and what comes back (L{TransactionResult}):
the values the relay's couriers and L{mailserver.relay.client} share.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO

from mailserver.wire.reply import Reply


def temporary(text: str, status: str = "4.4.1") -> Reply:
    return Reply(451, status, (text,), synthetic=True)


@dataclass(frozen=True)
class Timeouts:
    """
    Seconds to wait, RFC 5321 4.5.3.2: greeting and commands 5 minutes, DATA
    2, each data block 3, the reply to the final dot 10.
    """

    connect: float = 60.0
    # A host given by name (a smarthost, a transport) is looked up by the
    # system's resolver, whose own limits come from resolv.conf: the lookup
    # and the connection together get at most C{resolve} + C{connect}.
    resolve: float = 15.0
    command: float = 300.0
    data_start: float = 120.0
    data_block: float = 180.0
    data_end: float = 600.0

    @classmethod
    def from_config(cls, relay) -> Timeouts:
        return cls(
            connect=relay.connect_timeout,
            resolve=relay.dns_timeout,
            command=relay.command_timeout,
            data_start=min(120.0, relay.command_timeout),
            data_block=min(180.0, relay.command_timeout),
            data_end=relay.data_timeout,
        )


@dataclass(frozen=True)
class OutboundRecipient:
    address: str
    notify: tuple[str, ...] = ()
    orcpt: str | None = None


@dataclass(frozen=True)
class Transaction:
    """
    What to send in one SMTP transaction.

    @ivar open_body: returns the message, LF line endings, positioned at its
        first header; the client closes it.
    @ivar tls: C{"opportunistic"}, C{"required"}, C{"none"} or
        C{"implicit"} (the connection is TLS already).
    """

    sender: str
    recipients: tuple[OutboundRecipient, ...]
    open_body: Callable[[], BinaryIO]
    size: int = 0
    body: str = "7BIT"
    smtputf8: bool = False
    ret: str | None = None
    envid: str | None = None
    helo: str = "localhost"
    tls: str = "opportunistic"
    tls_options: object = None
    username: str = ""
    password: str = ""


@dataclass
class TransactionResult:
    """
    @ivar replies: per recipient address, the reply that decides its fate.
    @ivar reached: whether this host answered about the recipients (else
        the next MX host should be tried).
    @ivar dsn: whether the server offered DSN, so it took over NOTIFY.
    @ivar tls: how TLS went: C{""} (not tried), C{"not-offered"} (no
        STARTTLS in the EHLO reply), C{"refused"} (STARTTLS answered but not
        with 220), C{"started"} (the handshake began and no reply came over
        it: it failed, or the line broke) or C{"established"}.
    """

    replies: dict[str, Reply] = field(default_factory=dict)
    reached: bool = False
    dsn: bool = False
    host: str = ""
    tls: str = ""
    # Kept open after the transaction (C{keep_open}): the client (an
    # L{mailserver.relay.client.ESMTPClient}), waiting for its C{reuse} or
    # C{quit}.
    connection: object | None = field(default=None, compare=False, repr=False)
    # On a reused connection: it was lost, or RSET refused, before any
    # reply about this message, so nothing of it was sent or taken.
    stale: bool = False
