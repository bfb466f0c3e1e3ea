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


# The worst ENVID and ORCPT the grammar lets through: printable ASCII that
# looks like header fields and MIME boundaries, but on one line.
WORST_ENVID = "abc+20X-Injected:+20envid+20--+3D_report_0+20Content-Type:+20text/html"
WORST_ORCPT = "rfc822;x+20X-Orcpt-Injected:+20yes+20--+3D_report_0--"
# (X-Mailserver-Queue-ID: our own extension field, RFC 3464 2.1, the message's ID.)
STATUS_FIELDS = {
    "Reporting-MTA", "X-Mailserver-Queue-ID", "Original-Envelope-Id", "Arrival-Date",
    "Original-Recipient", "Final-Recipient", "Action", "Status", "Remote-MTA",
    "Diagnostic-Code", "Last-Attempt-Date",
}


def status_lines(data: bytes) -> list[str]:
    """
    The lines of the message/delivery-status part, as sent.
    """
    report = parse(data)
    boundary = report.get_boundary().encode()
    parts = data.split(b"\r\n--" + boundary)
    assert len(parts) == 5 and parts[4] == b"--\r\n"  # preamble, three parts, the end
    status = parts[2].split(b"\r\n\r\n", 1)[1]
    return status.decode().split("\r\n")


def assert_only_report_fields(data: bytes) -> None:
    for line in status_lines(data):
        assert line == "" or line.split(":", 1)[0] in STATUS_FIELDS, line
    _, status, _ = parse(data).get_payload()
    names = {name for block in status.get_payload() for name in block.keys()}
    assert names <= STATUS_FIELDS


def test_worst_envid_and_orcpt_that_pass_the_grammar_stay_in_their_fields():
    from mailserver.smtp.grammar import mail_options, parse_mail, parse_rcpt, recipient_options

    envid = mail_options(parse_mail(f"FROM:<s@example.org> ENVID={WORST_ENVID}").parameters).envid
    orcpt = recipient_options(parse_rcpt(f"TO:<r@remote.test> ORCPT={WORST_ORCPT}").parameters).orcpt
    m = message(envid=envid, recipients=(
        RecipientState("r@remote.test", orcpt=orcpt, state=FAILED, status="5.1.1",
                       diagnostic="smtp; 550 5.1.1 no\r\nX-Diag-Injected: 1", last_attempt=2000.0),
    ))
    data = dsn.build_dsn(m, m.recipients, dsn.FAILED, hostname="mx.test",
                         original=ORIGINAL, headers_only=False, now=3000.0)
    assert_only_report_fields(data)
    per_message, per_recipient = parse(data).get_payload()[1].get_payload()
    assert per_message["Original-Envelope-Id"] == (
        "abc X-Injected: envid --=_report_0 Content-Type: text/html"
    )
    assert per_recipient["Original-Recipient"] == "rfc822; x X-Orcpt-Injected: yes --=_report_0--"


def test_an_entry_queued_with_line_breaks_cannot_add_lines():
    # Queued before the grammar refused them, or a hand-edited entry.
    m = message(
        envid="abc+0D+0AX-Injected:+20envid+0D+0A+0D+0A--fake-boundary",
        sender="s@example.org>\r\nBcc: <victim@remote.test",
        recipients=(RecipientState("r@remote.test\u2028X-Addr: 1",
                                   orcpt="rfc822;x+0D+0AX-Orcpt-Injected:+20yes", state=FAILED,
                                   status="5.1.1", remote_mta="mx\nX-Mta: 1", last_attempt=2000.0),),
    )
    data = dsn.build_dsn(m, m.recipients, dsn.FAILED, hostname="mx.test",
                         original=ORIGINAL, headers_only=False, now=3000.0)
    assert_only_report_fields(data)
    lines = data.decode().split("\r\n")
    assert not [line for line in lines if line.startswith(("X-", "Bcc", "--fake"))
                and not line.startswith("X-Mailserver-Queue-ID: ")]
    assert "\u2028" not in data.decode()
