"""
Issue 19 against the real server: what an attacker from the internet found.
"""

from __future__ import annotations

import base64
import os
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


# Links inside the data folder, and who may list it.

def mode(path: Path) -> int:
    import stat

    return stat.S_IMODE(path.lstat().st_mode)


def deliver_to_bob(server: MailServer) -> bytes:
    replies = raw_session(server.ports["smtp"], [
        b"EHLO client.test", b"MAIL FROM:<a@remote.test>", b"RCPT TO:<bob@localhost>", b"DATA",
        b"Subject: hi\r\n\r\nbody\r\n.", b"QUIT",
    ])
    return replies[4]


def test_delivery_does_not_write_through_a_linked_new(tmp_path):
    server = MailServer(tmp_path)
    server.start()
    try:
        server.add_user("bob@localhost", "pw")
        assert deliver_to_bob(server).startswith(b"250 ")
        outside = tmp_path / "outside"
        outside.mkdir()
        new = server.maildir("bob@localhost") / "new"
        for name in os.listdir(new):
            os.unlink(new / name)
        new.rmdir()
        new.symlink_to(outside)
        server.stop()
        server.start()  # the server learns of Maildirs once per process
        assert deliver_to_bob(server).startswith(b"451 4.3.0 ")
        assert os.listdir(outside) == []
        assert (f"storing a message failed problem=[Errno 40] is a symbolic link, which is"
                f" not followed inside the data folder: '{new}'") in server.log()
    finally:
        server.stop()


def test_start_up_clean_up_does_not_follow_a_linked_tmp(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    precious = outside / "1700000000.M000001P999999999Q1.mx"  # a writer long gone
    precious.write_bytes(b"not ours")
    os.utime(precious, (0, 0))
    bob = tmp_path / "data" / "mail" / "localhost" / "bob"
    for sub in ("new", "cur"):
        (bob / sub).mkdir(parents=True)
    (bob / "tmp").symlink_to(outside)
    server = MailServer(tmp_path)
    server.start()
    try:
        assert precious.read_bytes() == b"not ours"
        assert f"not cleaning up folder={bob / 'tmp'}, problem=" in server.log()
    finally:
        server.stop()


def test_folders_are_private_and_old_ones_are_tightened(tmp_path):
    old_mask = os.umask(0o022)
    try:
        (tmp_path / "data" / "mail").mkdir(parents=True)
        (tmp_path / "data" / "spool").mkdir()
        os.chmod(tmp_path / "data" / "spool", 0o775)
        server = MailServer(tmp_path)
        server.start()
    finally:
        os.umask(old_mask)
    try:
        server.add_user("bob@localhost", "pw")
        assert deliver_to_bob(server).startswith(b"250 ")
        data = server.data_path
        assert mode(data / "mail") == 0o750 and mode(data / "spool") == 0o770
        bob = server.maildir("bob@localhost")
        made = [data / "nodes", server.node_path, server.queue_path, server.queue_path / "messages",
                data / "tls", data / "spool" / "tmp",
                bob.parent, bob, bob / "tmp", bob / "new", bob / "cur"]
        assert {str(p): mode(p) for p in made} == {str(p): 0o700 for p in made}
        log = server.log()
        assert f"{data / 'mail'} was open to other users (mode 755): now 750" in log
        assert f"{data / 'spool'} was open to other users (mode 775): now 770" in log
    finally:
        server.stop()


def test_a_linked_folder_of_the_data_folder_stops_start_up_with_one_line(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "data" / "queue").symlink_to(tmp_path / "elsewhere")
    server = MailServer(tmp_path)
    with pytest.raises(RuntimeError) as failed:
        server.start()
    assert (f"mailserver: cannot prepare {tmp_path / 'data' / 'queue'}: is a symbolic link"
            in str(failed.value))
