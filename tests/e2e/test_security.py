"""
Issue 19 against the real server: what an attacker from the internet found.
"""

from __future__ import annotations

import base64
import re
import smtplib
import socket
import ssl
from pathlib import Path

import pytest

from harness import MailServer

README = Path(__file__).resolve().parents[2] / "README.md"


def tls_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def documented_mx_ehlo(hostname: str) -> list[str]:
    """
    The EHLO reply of the MX listener as the README shows it.
    """
    section = README.read_text().split("## Receiving: the MX listener", 1)[1]
    block = re.search(r"```\n(250.*?)```", section, re.S).group(1)
    lines = [line[4:] for line in block.splitlines()]
    return [hostname if line == "mx.example.org" else line for line in lines]


def ehlo_lines(client: smtplib.SMTP) -> list[str]:
    code, text = client.ehlo("client.test")
    assert code == 250
    return text.decode().split("\n")


@pytest.fixture
def mx_auth_server(tmp_path):
    server = MailServer(tmp_path, local_domains=("test.example",),
                        extra_toml="[smtp]\nmx_auth = true\n")
    server.start()
    server.add_user("bob@test.example", "bob-pw")
    yield server
    server.stop()


def test_default_mx_ehlo_is_the_documented_one(server):
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as client:
        assert ehlo_lines(client) == documented_mx_ehlo("mx.test")
        client.starttls(context=tls_context())
        after = ehlo_lines(client)
        assert after == [line for line in documented_mx_ehlo("mx.test") if line != "STARTTLS"]
        token = base64.b64encode(b"\0bob@localhost\0pw").decode()
        assert client.docmd("AUTH", "PLAIN " + token) == (
            503, b"5.5.1 Error: authentication not enabled"
        )


def test_auth_on_mx_gets_the_submission_sender_rule(mx_auth_server):
    # The session: EHLO, STARTTLS, EHLO, AUTH PLAIN as bob, then a
    # foreign MAIL FROM.
    with smtplib.SMTP("127.0.0.1", mx_auth_server.ports["smtp"], timeout=30) as client:
        client.ehlo("client.test")
        client.starttls(context=tls_context())
        assert "AUTH PLAIN LOGIN" in ehlo_lines(client)
        client.login("bob@test.example", "bob-pw")
        assert client.mail("ceo@bigbank.example") == (
            553, b"5.7.1 Sender address rejected: not owned by user bob@test.example"
        )
        assert client.mail("bob@test.example")[0] == 250
        assert client.rcpt("victim@remote.example")[0] == 250


def raw_session(port: int, lines: list[bytes]) -> list[bytes]:
    """
    Send each line and read one reply line for each (after the greeting).
    """
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        reader = sock.makefile("rb")
        reader.readline()
        replies = []
        for line in lines:
            sock.sendall(line + b"\r\n")
            reply = reader.readline()
            while reply[3:4] == b"-":
                reply = reader.readline()
            replies.append(reply)
        return replies


def test_envid_and_orcpt_that_would_inject_report_lines_get_501(server):
    replies = raw_session(server.ports["smtp"], [
        b"EHLO client.test",
        b"MAIL FROM:<bob@test.example> ENVID=abc+0D+0AX-Injected:+20envid+0D+0A+0D+0A"
        b"--fake-boundary",
        b"MAIL FROM:<bob@test.example> ENVID=abc",
        b"RCPT TO:<bob@localhost> ORCPT=rfc822;x+0D+0AX-Orcpt-Injected:+20yes",
        b"QUIT",
    ])
    assert replies[1] == b"501 5.5.4 Bad ENVID parameter syntax: not printable US-ASCII\r\n"
    assert replies[2].startswith(b"250 ")
    assert replies[3] == b"501 5.5.4 Bad ORCPT parameter syntax: not printable US-ASCII\r\n"
