"""
RFC 3464 reports, read back with Python's email package.
"""

from __future__ import annotations

import email
import email.policy
import io

from mailserver.relay import dsn
from mailserver.relay.queue import FAILED, QueuedMessage, RecipientState

ORIGINAL = b"From: s@example.org\nTo: r@remote.test\nSubject: caf\xc3\xa9\n\nline\n.\nend\n"


def message(**kw):
    defaults = dict(
        id="Q1",
        sender="s@example.org",
        recipients=(
            RecipientState("r@remote.test", orcpt="rfc822;r+2Bx@remote.test", state=FAILED,
                           status="5.1.1", diagnostic="smtp; 550 5.1.1 no such user",
                           remote_mta="mx.remote.test", last_attempt=2000.0),
        ),
        arrival=1000.0,
        envid="ENV+2B1",
    )
    defaults.update(kw)
    return QueuedMessage(**defaults)


def parse(data: bytes):
    assert b"\n" not in data.replace(b"\r\n", b"")
    return email.message_from_bytes(data, policy=email.policy.default)


def test_failure_report_is_multipart_report_with_full_original():
    m = message()
    data = dsn.build_dsn(m, m.recipients, dsn.FAILED, hostname="mx.test",
                         original=ORIGINAL, headers_only=False, now=3000.0)
    report = parse(data)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    assert report["To"].addresses[0].addr_spec == "s@example.org"
    assert report["Auto-Submitted"] == "auto-replied"
    text, status, original = report.get_payload()
    assert "no such user" in text.get_content()
    assert status.get_content_type() == "message/delivery-status"
    per_message, per_recipient = status.get_payload()
    assert per_message["Reporting-MTA"] == "dns; mx.test"
    assert per_message["X-Mailserver-Queue-ID"] == "Q1"  # the message's ID, as in our log
    assert "The message's ID here is Q1" in text.get_content()
    assert per_message["Original-Envelope-Id"] == "ENV+1"
    assert per_recipient["Final-Recipient"] == "rfc822; r@remote.test"
    assert per_recipient["Original-Recipient"] == "rfc822; r+x@remote.test"
    assert per_recipient["Action"] == "failed"
    assert per_recipient["Status"] == "5.1.1"
    assert per_recipient["Remote-MTA"] == "dns; mx.remote.test"
    assert per_recipient["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user"
    assert original.get_content_type() == "message/rfc822"
    inner = original.get_payload()[0]
    assert inner["Subject"] == "café"
    assert inner.get_payload() == "line\r\n.\r\nend\r\n"


def test_headers_only_report():
    m = message()
    headers = dsn.read_original(io.BytesIO(ORIGINAL), headers_only=True)
    assert headers == b"From: s@example.org\nTo: r@remote.test\nSubject: caf\xc3\xa9\n"
    data = dsn.build_dsn(m, m.recipients, dsn.FAILED, hostname="mx.test",
                         original=headers, headers_only=True, now=3000.0)
    parts = parse(data).get_payload()
    assert parts[2].get_content_type() == "text/rfc822-headers"
    assert b"line" not in data


def test_notify_rules():
    def r(*notify):
        return RecipientState("a@b", notify=notify)

    assert dsn.wants(r(), dsn.FAILED)
    assert not dsn.wants(r("NEVER"), dsn.FAILED)
    assert not dsn.wants(r("SUCCESS"), dsn.FAILED)
    assert dsn.wants(r("SUCCESS", "FAILURE"), dsn.FAILED)
    assert dsn.wants(r("DELAY"), dsn.DELAYED) and not dsn.wants(r("FAILURE"), dsn.DELAYED)
    assert dsn.wants(r("SUCCESS"), dsn.RELAYED) and not dsn.wants(r(), dsn.RELAYED)
