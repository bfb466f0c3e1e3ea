"""
The SMTP envelope of one message, as a frozen value shared by the SMTP server,
the intake and (later) the relay queue.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Recipient:
    """
    One accepted RCPT.

    @ivar address: the address as the client gave it (source route dropped).
    @ivar destinations: where it delivers, after aliases, lists, subaddress
        and catch-all: canonical local account addresses and, for forwarding
        aliases or authenticated relaying, remote addresses.
    @ivar notify: RFC 3461 NOTIFY values, e.g. C{("FAILURE", "DELAY")}, or
        empty when the client gave none.
    @ivar orcpt: RFC 3461 ORCPT parameter as given (C{"rfc822;a@b"}), or None.
    """

    address: str
    destinations: tuple[str, ...]
    notify: tuple[str, ...] = ()
    orcpt: str | None = None


@dataclass(frozen=True)
class Envelope:
    """
    @ivar sender: the reverse-path address, C{""} for the null sender C{<>}.
    @ivar recipients: the accepted recipients in RCPT order.
    @ivar client_address: the peer's IP address.
    @ivar helo: the name the client gave in HELO/EHLO.
    @ivar authenticated: the authenticated account's address, if any.
    @ivar ret: RFC 3461 RET (C{"FULL"} or C{"HDRS"}) or None.
    @ivar envid: RFC 3461 ENVID or None.
    @ivar body: C{"7BIT"}, C{"8BITMIME"} or C{"BINARYMIME"} as declared.
    @ivar smtputf8: whether MAIL carried the SMTPUTF8 parameter.
    @ivar size: the SIZE the client declared, if any.
    @ivar id: the message's ID (L{mailserver.message_ids}), the one in our
        C{Received} field; empty until the SMTP server or the intake gives
        it one.
    @ivar tls_version: the TLS protocol of the session (C{"TLSv1.3"}), or
        C{None} in plaintext; C{tls_cipher} its cipher.
    """

    sender: str
    recipients: tuple[Recipient, ...]
    client_address: str = ""
    helo: str = ""
    authenticated: str | None = None
    ret: str | None = None
    envid: str | None = None
    body: str = "7BIT"
    smtputf8: bool = False
    size: int | None = field(default=None)
    id: str = ""
    tls_version: str | None = None
    tls_cipher: str | None = None
