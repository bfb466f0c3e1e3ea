"""
Real SMTP clients against the real server: swaks and smtplib.
"""

from __future__ import annotations

import shutil
import smtplib
import ssl
import subprocess

import pytest

from test_core import fetch_all, without_trace

needs_swaks = pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed")


def swaks(server, *args: str, port_role: str = "smtp") -> subprocess.CompletedProcess:
    return subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{server.ports[port_role]}", "--timeout", "30", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def bob(server):
    server.add_user("bob@localhost", "bob-pw")
    return server


@needs_swaks
def test_swaks_plain_send(bob):
    result = swaks(bob, "--from", "alice@example.com", "--to", "bob@localhost", "--body", "plain body")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "250 2.0.0" in result.stdout
    (message,) = fetch_all(bob, "bob@localhost", "bob-pw")
    assert b"plain body" in message


@needs_swaks
def test_swaks_starttls_and_auth_on_submission(bob):
    result = swaks(
        bob,
        "--tls",
        "--auth", "PLAIN",
        "--auth-user", "bob@localhost",
        "--auth-password", "bob-pw",
        "--from", "bob@localhost",
        "--to", "bob@localhost",
        "--body", "submitted over TLS",
        port_role="submission",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "220 2.0.0" in result.stdout and "235 2.7.0" in result.stdout
    (message,) = fetch_all(bob, "bob@localhost", "bob-pw")
    assert b"submitted over TLS" in message
    assert b"ESMTPSA" in message


@needs_swaks
def test_swaks_submission_without_auth_is_refused(bob):
    result = swaks(bob, "--from", "bob@localhost", "--to", "bob@localhost", port_role="submission")
    assert result.returncode != 0
    assert "530 5.7.0" in result.stdout


@needs_swaks
def test_swaks_pipelining(bob):
    result = swaks(bob, "--pipeline", "--from", "a@example.com", "--to", "bob@localhost", "--body", "piped")
    assert result.returncode == 0, result.stdout + result.stderr
    (message,) = fetch_all(bob, "bob@localhost", "bob-pw")
    assert b"piped" in message


@needs_swaks
def test_swaks_ten_megabyte_message(bob, tmp_path):
    line = b"0123456789" * 7 + b"\r\n"
    body = line * (10 * 1024 * 1024 // len(line))
    data = b"From: a@example.com\r\nTo: bob@localhost\r\nSubject: big\r\n\r\n" + body
    path = tmp_path / "big.eml"
    path.write_bytes(data[:-2])  # swaks ends the data with CRLF . CRLF itself
    result = swaks(bob, "--from", "a@example.com", "--to", "bob@localhost", "--data", f"@{path}")
    assert result.returncode == 0, result.stderr[-2000:]
    (message,) = fetch_all(bob, "bob@localhost", "bob-pw")
    assert without_trace(message) == data


@needs_swaks
def test_swaks_eight_bit_body(bob, tmp_path):
    data = "From: a@example.com\r\nSubject: grüße\r\n\r\nKäse, Öl und Straße.\r\n".encode("utf-8")
    path = tmp_path / "8bit.eml"
    path.write_bytes(data[:-2])  # swaks ends the data with CRLF . CRLF itself
    result = swaks(bob, "--from", "a@example.com", "--to", "bob@localhost", "--data", f"@{path}")
    assert result.returncode == 0, result.stdout + result.stderr
    (message,) = fetch_all(bob, "bob@localhost", "bob-pw")
    assert without_trace(message) == data


@needs_swaks
def test_swaks_utf8_address_needs_smtputf8(bob):
    # swaks cannot send the SMTPUTF8 parameter, so a UTF-8 address must be
    # refused (RFC 6531 3.4); smtplib below sends it properly.
    result = swaks(bob, "--from", "a@example.com", "--to", "bøb@localhost", "--quit-after", "RCPT")
    assert result.returncode != 0
    assert "553 5.6.7" in result.stdout or "550" in result.stdout


def test_smtplib_8bitmime_and_smtputf8(server):
    server.add_user("jürgen@localhost", "pw")
    data = "From: zoë@example.com\r\nTo: jürgen@localhost\r\nSubject: ü\r\n\r\nHallo Jürgen\r\n".encode()
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as client:
        client.ehlo("client.test")
        assert client.has_extn("smtputf8") and client.has_extn("8bitmime")
        refused = client.sendmail(
            "zoë@example.com", ["Jürgen@localhost"], data, mail_options=["SMTPUTF8", "BODY=8BITMIME"]
        )
        assert refused == {}
    (message,) = fetch_all(server, "jürgen@localhost", "pw")
    assert without_trace(message) == data


def test_smtplib_starttls_auth_and_size(server):
    server.add_user("carol@localhost", "carol-pw")
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30) as client:
        client.ehlo("client.test")
        assert client.has_extn("starttls")
        client.starttls(context=context)
        client.ehlo("client.test")
        assert "PLAIN" in client.esmtp_features["auth"].upper()
        limit = int(client.esmtp_features["size"])
        client.login("carol@localhost", "carol-pw")
        code, _ = client.mail("carol@localhost", [f"SIZE={limit + 1}"])
        assert code == 552
        client.rset()
        client.sendmail("carol@localhost", ["carol@localhost"], b"Subject: t\r\n\r\nTLS body\r\n")
    (message,) = fetch_all(server, "carol@localhost", "carol-pw")
    assert b"TLS body" in message
