"""
The relay's 998-octet lines (mailserver/relay/line_length.py): what a
receiver decodes from the fitted message is what the original said, and a
DKIM signature made over the fitted form verifies on what the relay sends.
"""

from __future__ import annotations

import base64
import email
import email.policy
import io

import dkim
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailserver.mailauth.keys import generate, parse_key, txt_record
from mailserver.mailauth.signing import DKIMSigner
from mailserver.relay import line_length
from mailserver.relay.line_length import LIMIT, fit, fitted, has_long_lines

LONG_HTML = ("<p>" + "Grüße, " * 700 + "</p>").encode()  # one line of ~5,600 octets
ATTACHMENT = bytes(range(256)) * 15
LONG_SUBJECT = "word " * 400  # 2,000 octets with spaces to fold at
NO_SPACE = "x" * 2500


def longest(message: bytes) -> int:
    return max(len(line) for line in message.split(b"\n"))


def parsed(message: bytes):
    return email.message_from_bytes(message, policy=email.policy.default)


MULTIPART = (
    b"From: s@example.org\nTo: r@remote.test\n"
    b"Subject: " + LONG_SUBJECT.encode() + b"\n"
    b"X-Token: " + NO_SPACE.encode() + b"\n"
    b"MIME-Version: 1.0\n"
    b'Content-Type: multipart/mixed; boundary="outer"\n\n'
    b"preamble " + b"p" * 1500 + b"\n"
    b"--outer\n"
    b'Content-Type: multipart/alternative; boundary="inner"\n\n'
    b"--inner\nContent-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n"
    b"Short text.\n"
    b"--inner\nContent-Type: text/html; charset=utf-8\n\n" + LONG_HTML + b"\n"
    b"--inner--\n"
    b"--outer\nContent-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n\n"
    + base64.b64encode(ATTACHMENT) + b"\n"
    b"--outer\nContent-Type: text/plain\nContent-Transfer-Encoding: quoted-printable\n\n"
    + b"a=3Db " * 300 + b"\n"
    b"--outer\nContent-Type: message/rfc822\n\n"
    b"Subject: inner\n\n" + b"q" * 1200 + b"\n"
    b"--outer--\n"
    b"epilogue " + b"e" * 1200 + b"\n"
)


def test_a_message_whose_lines_fit_is_left_alone():
    message = b"Subject: hi\n\n" + b"x" * LIMIT + b"\n" + b"y" * LIMIT
    assert not has_long_lines(message)
    assert fit(message) is message
    assert has_long_lines(message + b"z")


def test_a_plain_message_with_a_long_line_becomes_quoted_printable():
    text = "Grüße " * 1000
    message = b"From: s@example.org\nSubject: hi\n\nfirst\n" + text.encode() + b"\nlast  \n"
    out = fit(message)
    assert all(len(line) <= 76 for line in out.split(b"\n\n", 1)[1].split(b"\n"))
    assert out.startswith(b"From: s@example.org\nSubject: hi\nMIME-Version: 1.0\n"
                          b"Content-Type: text/plain; charset=utf-8\n"
                          b"Content-Transfer-Encoding: quoted-printable\n\n")
    assert parsed(out).get_content() == f"first\n{text}\nlast  \n"


def test_an_ascii_message_gets_no_charset_and_keeps_its_own_content_type():
    out = fit(b"Subject: a\nContent-Type: text/plain; format=flowed\n"
              b"Content-Transfer-Encoding: 7bit\n\n" + b"a" * 2000 + b"\n")
    head = out.split(b"\n\n")[0].split(b"\n")
    assert head == [b"Subject: a", b"Content-Type: text/plain; format=flowed",
                    b"MIME-Version: 1.0", b"Content-Transfer-Encoding: quoted-printable"]
    assert parsed(out).get_content() == "a" * 2000 + "\n"


def test_every_part_decodes_to_what_it_was_and_headers_unfold_to_what_they_were():
    out = fit(MULTIPART)
    assert longest(MULTIPART) > 5000 and longest(out) <= LIMIT
    before, after = parsed(MULTIPART), parsed(out)
    assert after["Subject"] == before["Subject"]  # folded before a space: unfolds the same
    assert after["X-Token"].replace(" ", "") == NO_SPACE  # no space: broken as Postfix does
    parts = list(after.walk())
    assert [p.get_content_type() for p in parts] == [
        "multipart/mixed", "multipart/alternative", "text/plain", "text/html",
        "application/octet-stream", "text/plain", "message/rfc822", "text/plain"]
    originals = list(before.walk())
    for index in (2, 3, 4, 5, 7):
        assert parts[index].get_content() == originals[index].get_content(), index
    assert parts[2].get_content() == "Short text."
    assert parts[3]["Content-Transfer-Encoding"] == "quoted-printable"
    assert parts[3].get_content() == LONG_HTML.decode()
    assert parts[4].get_content() == ATTACHMENT
    assert parts[7]["Subject"] == "inner" and parts[7].get_content() == "q" * 1200
    # Text no decoder reads is simply broken into lines that fit.
    assert b"preamble " + b"p" * (LIMIT - 9) + b"\n" + b"p" * 511 + b"\n--outer" in out
    assert out.endswith(b"epilogue " + b"e" * (LIMIT - 9) + b"\n" + b"e" * 211 + b"\n")


def test_fit_is_idempotent_and_a_field_added_on_top_changes_nothing_below():
    out = fit(MULTIPART)
    assert fit(out) == out
    signature = b"DKIM-Signature: v=1; a=rsa-sha256; d=example.org; s=x;\n\tb=abc\n"
    assert fit(signature + MULTIPART) == signature + out
    plain = b"Subject: p\n\n" + b"z" * 3000 + b"\n"
    assert fit(signature + plain) == signature + fit(plain)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=3000).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b"")),
                min_size=1, max_size=5))
def test_any_text_body_survives(lines):
    body = b"\n".join(lines) + b"\n"
    message = b"Subject: x\nContent-Type: application/x-any\n\n" + body
    out = fit(message)
    assert longest(out) <= LIMIT
    assert parsed(out).get_payload(decode=True) == body


def _counting_opener(opened: list, data: bytes):
    """
    An opener of C{data} that notes each opening in C{opened}.
    """
    def open_body():
        opened.append(1)
        return io.BytesIO(data)
    return open_body


def test_fitted_opens_the_file_again_when_nothing_is_long(monkeypatch):
    monkeypatch.setattr(line_length, "_CHUNK", 1000)
    monkeypatch.setattr(line_length, "IN_MEMORY", 100)
    opened = []

    def opener(data):
        return _counting_opener(opened, data)

    fine = (b"y" * LIMIT + b"\n") * 10
    open_fine = opener(fine)
    assert fitted(open_fine) is open_fine
    assert opened == [1]  # read once to look; the send opens it again
    # A long line across chunk boundaries is found, and sent fitted.
    long = b"Subject: s\n\n" + b"a" * 1500 + b"\n"
    open_long = fitted(opener(long))
    assert open_long is not None and open_long().read() == fit(long) != long
    tail = b"Subject: s\n\n" + b"b" * 1999  # no line end at all
    assert fitted(opener(tail))().read() == fit(tail)


def test_fitted_keeps_a_small_message_as_read(monkeypatch):
    """
    Issue 22: a message of at most IN_MEMORY octets is read once, in the
    thread, and sending it opens no file (on the reactor thread).
    """
    monkeypatch.setattr(line_length, "IN_MEMORY", 2000)
    opened = []

    def opener(data):
        return _counting_opener(opened, data)

    small = b"Subject: s\n\nhi\n"
    open_small = fitted(opener(small))
    assert open_small().read() == small and open_small().read() == small
    assert opened == [1]
    long = b"Subject: s\n\n" + b"a" * 1500 + b"\n"
    assert fitted(opener(long))().read() == fit(long) != long
    assert opened == [1, 1]
    exactly = b"x\n" * 1000
    assert fitted(opener(exactly))().read() == exactly
    assert opened == [1, 1, 1]


@pytest.mark.filterwarnings("ignore::BytesWarning")  # dkimpy's own debug lines
def test_a_signature_over_the_fitted_form_verifies_on_what_the_relay_sends():
    """
    The signer signs fit(message); the message is stored as it came, with
    the signature on top; the relay sends fit(stored): the peer verifies.
    """
    from mailserver.hooks import MessageBody, MessageHeaders

    pem = generate("rsa")
    key = parse_key(pem)
    head, body = MULTIPART.split(b"\n\n", 1)

    signer = DKIMSigner({"example.org": [("sel", key)]}, ("from", "subject", "x-token"),
                        ("from",), reactor=None, threadpool=None, owns=lambda account, address: True)
    headers = MessageHeaders(head.replace(b"\n", b"\r\n") + b"\r\n")

    fields = signer._sign("example.org", headers.to_bytes(), headers.names(),
                          MessageBody(io.BytesIO(body.replace(b"\n", b"\r\n"))))
    stored = b"".join(f.replace(b"\r\n", b"\n") for f in fields) + MULTIPART
    sent = fit(stored).replace(b"\n", b"\r\n")

    def dnsfunc(name, timeout=5):
        assert name == b"sel._domainkey.example.org."
        return txt_record(key).encode()

    assert longest(sent.replace(b"\r\n", b"\n")) <= LIMIT
    assert dkim.verify(sent, dnsfunc=dnsfunc)
    # Sent as it was stored (what Postfix's line breaking comes closest to
    # keeping), the signature would not verify.
    unfitted = stored.replace(b"\n", b"\r\n")
    assert not dkim.verify(unfitted, dnsfunc=dnsfunc)


def test_has_long_lines_counts_every_octet_before_the_lf():
    from mailserver.relay.line_length import has_long_lines

    assert not has_long_lines(b"")
    assert not has_long_lines(b"a" * LIMIT + b"\n" + b"b" * LIMIT)
    assert has_long_lines(b"a\n" + b"b" * (LIMIT + 1))
    assert has_long_lines(b"b" * (LIMIT + 1) + b"\nshort\n")
    assert has_long_lines(b"x\n" + b"c" * LIMIT + b"\r\n")  # the CR is an octet of the line
    assert not has_long_lines(b"c" * (LIMIT - 1) + b"\r\n" * 3)
