"""
Delivery status notifications (RFC 3464, RFC 3461): the bounce, delay and
success reports sent back to the envelope sender.

Pure functions from a L{QueuedMessage} and the stored original to the bytes
of a C{multipart/report; report-type=delivery-status} message with CRLF line
endings, ready for the intake.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from email.utils import format_datetime
from datetime import datetime, timezone
from typing import BinaryIO

from mailserver.relay.queue import QueuedMessage, RecipientState
from mailserver.safe_text import printable
from mailserver.smtp.grammar import decode_xtext

FAILED = "failed"
DELAYED = "delayed"
RELAYED = "relayed"
DELIVERED = "delivered"

_SUBJECTS = {
    FAILED: "Undelivered Mail Returned to Sender",
    DELAYED: "Delayed Mail (still being retried)",
    RELAYED: "Successful Mail Delivery Report",
    DELIVERED: "Successful Mail Delivery Report",
}

_EXPLANATIONS = {
    FAILED: "Your message could not be delivered to the following recipients;\n"
    "this is a permanent error, no further attempt will be made.",
    DELAYED: "Your message has not been delivered yet to the following recipients.\n"
    "It is still being retried; you need not send it again.",
    RELAYED: "Your message was handed over to the following recipients' mail servers,\n"
    "which may not report on its further delivery.",
    DELIVERED: "Your message was delivered to the following recipients.",
}


def wants(recipient: RecipientState, action: str, default_delay: bool = True) -> bool:
    """
    Whether the RFC 3461 NOTIFY of C{recipient} asks for a report of
    C{action}.  Absent NOTIFY means failures (and delays, when
    C{default_delay}) only.
    """
    notify = {n.upper() for n in recipient.notify}
    if "NEVER" in notify:
        return False
    if action == FAILED:
        return not notify or "FAILURE" in notify
    if action == DELAYED:
        return "DELAY" in notify or (not notify and default_delay)
    return "SUCCESS" in notify


def _decoded(xtext: str) -> str:
    """
    An ENVID or ORCPT value as the report shows it: decoded (RFC 3461 4),
    and one line whatever the queue entry holds (the grammar refuses
    unprintable values; an entry queued before it did may have them).
    """
    return printable(decode_xtext(xtext), None)


def _date(timestamp: float) -> str:
    return format_datetime(datetime.fromtimestamp(timestamp, timezone.utc))


def _clean(text: str) -> str:
    return printable(" ".join(text.split()), None)


def read_original(body: BinaryIO, headers_only: bool) -> bytes:
    """
    The original message (LF form, as stored), or only its header section.
    """
    if not headers_only:
        return body.read()
    lines = []
    for line in body:
        if line in (b"\n", b"\r\n"):
            break
        lines.append(line)
    return b"".join(lines)


def build_dsn(
    message: QueuedMessage,
    recipients: Iterable[RecipientState],
    action: str,
    *,
    hostname: str,
    original: bytes,
    headers_only: bool,
    now: float,
    retry_until: float | None = None,
) -> bytes:
    """
    The report, CRLF line endings.

    @param original: the stored original (LF form) or its headers, per
        L{read_original}.
    @param headers_only: include C{original} as C{text/rfc822-headers}
        rather than C{message/rfc822} (RET=HDRS).
    """
    recipients = list(recipients)
    boundary = f"=_report_{secrets.token_hex(12)}"
    human = [
        f"This is the mail system at host {hostname}.",
        "",
        _EXPLANATIONS[action],
        "",
        f"The message's ID here is {message.id}: quote it to the postmaster.",
        "",
    ]
    for r in recipients:
        human.append(printable(f"<{r.address}>: {_clean(r.diagnostic) or r.status}", None))
    human.append("")
    # The ID as Postfix gives its queue ID (X-Postfix-Queue-ID), an
    # extension field of RFC 3464 2.1.
    per_message = [f"Reporting-MTA: dns; {hostname}", f"X-Mailserver-Queue-ID: {message.id}"]
    if message.envid:
        per_message.append(f"Original-Envelope-Id: {_decoded(message.envid)}")
    per_message.append(f"Arrival-Date: {_date(message.arrival)}")
    # Every field one line, whatever the queue entry holds.
    blocks = ["\n".join(printable(f, None) for f in per_message)]
    for r in recipients:
        fields = []
        if r.orcpt:
            kind, _, value = r.orcpt.partition(";")
            fields.append(f"Original-Recipient: {kind.strip()}; {_decoded(value)}")
        fields.append(f"Final-Recipient: rfc822; {r.address}")
        fields.append(f"Action: {action}")
        status = r.status or {FAILED: "5.0.0", DELAYED: "4.0.0"}.get(action, "2.0.0")
        fields.append(f"Status: {status}")
        if r.remote_mta:
            fields.append(f"Remote-MTA: dns; {r.remote_mta}")
        if r.diagnostic:
            fields.append(f"Diagnostic-Code: {_clean(r.diagnostic)}")
        if r.last_attempt is not None:
            fields.append(f"Last-Attempt-Date: {_date(r.last_attempt)}")
        if action == DELAYED and retry_until is not None:
            fields.append(f"Will-Retry-Until: {_date(retry_until)}")
        blocks.append("\n".join(printable(f, None) for f in fields))
    status_part = "\n\n".join(blocks) + "\n"
    to = printable(message.sender, None)
    header = "\n".join(
        [
            f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>",
            f"To: <{to}>",
            f"Subject: {_SUBJECTS[action]}",
            f"Date: {_date(now)}",
            f"Message-ID: <{message.id}.{action}.{secrets.token_hex(4)}@{hostname}>",
            "Auto-Submitted: auto-replied",
            "MIME-Version: 1.0",
            "Content-Type: multipart/report; report-type=delivery-status;",
            f'\tboundary="{boundary}"',
            "Content-Transfer-Encoding: 8bit",
        ]
    )
    original_type = "text/rfc822-headers" if headers_only else "message/rfc822"
    if not original.endswith(b"\n"):
        original += b"\n"
    text = (
        f"{header}\n\nThis is a MIME-encapsulated message.\n\n"
        f"--{boundary}\n"
        "Content-Description: Notification\n"
        "Content-Type: text/plain; charset=utf-8\n"
        "Content-Transfer-Encoding: 8bit\n\n"
        + "\n".join(human)
        + f"\n--{boundary}\n"
        "Content-Description: Delivery report\n"
        "Content-Type: message/delivery-status\n\n"
        + status_part
        + f"\n--{boundary}\n"
        f"Content-Description: {'Headers of the undelivered' if headers_only else 'Undelivered'}"
        " message\n"
        f"Content-Type: {original_type}\n"
        "Content-Transfer-Encoding: 8bit\n\n"
    ).encode("utf-8")
    closing = f"\n--{boundary}--\n".encode()
    data = text + original + closing
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
