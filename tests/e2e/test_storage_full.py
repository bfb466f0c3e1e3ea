"""
The real server on a real, small file system (a tmpfs mounted for the
test): when it fills up, MAIL and DATA are answered 452 4.3.1; when it is
read-only, 451 4.3.0; what was accepted before stays readable over POP3; and
once space is back, mail flows again, all without a restart.

Mounting needs root (CAP_SYS_ADMIN); elsewhere these tests skip, and the
same faults are injected under the Maildir code by
C{tests/protocol/test_storage_faults.py}.
"""

from __future__ import annotations

import os
import poplib
import smtplib
import socket
import subprocess
import time
from pathlib import Path

import pytest

from harness import MailServer

MESSAGE = b"Subject: kept\r\n\r\n" + b"this was accepted before the disk filled\r\n" * 20


def mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
        capture_output=True,
    )
    return done.returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    data = tmp_path / "data"
    if not mount_tmpfs(data, "4m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield data
    subprocess.run(["umount", "-l", str(data)], check=False)


@pytest.fixture
def server(tmp_path, small_disk):
    mail_server = MailServer(
        tmp_path,
        extra_toml="[limits]\nmin_free_space = 65536\nmax_message_size = 1048576\n",
    )
    mail_server.start()
    mail_server.add_user("bob@localhost", "pw")
    yield mail_server
    mail_server.stop()


def fill(path: Path) -> Path:
    """
    Write a file until the file system is full, then wait out the server's
    free-space reading (trusted for half a second).
    """
    filler = path / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    time.sleep(0.6)
    return filler


def raw_session(port: int, script: list[bytes]) -> list[bytes]:
    """
    Send each line (or message text) and read one reply for it; returns the
    reply lines' first 9 octets (code and enhanced code).
    """
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        stream = sock.makefile("rb")
        replies = [stream.readline()[:9]]
        for chunk in script:
            sock.sendall(chunk)
            line = stream.readline()
            while line[3:4] == b"-":
                line = stream.readline()
            replies.append(line[:9])
        return replies


def fetch(server: MailServer) -> list[bytes]:
    client = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=10)
    client.user("bob@localhost")
    client.pass_("pw")
    count, _ = client.stat()
    messages = [b"\r\n".join(client.retr(n)[1]) for n in range(1, count + 1)]
    client.quit()
    return messages


def send(server: MailServer, message: bytes = MESSAGE) -> None:
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=10) as client:
        client.sendmail("alice@localhost", ["bob@localhost"], message)


def test_a_full_disk_is_452_and_loses_nothing(server, small_disk):
    send(server)
    send(server)
    filler = fill(small_disk)
    port = server.ports["smtp"]
    # MAIL is refused once less than the reserve is free, and the session
    # goes on.
    replies = raw_session(port, [b"EHLO c.test\r\n", b"MAIL FROM:<alice@localhost>\r\n", b"NOOP\r\n"])
    assert replies[2:] == [b"452 4.3.1", b"250 2.0.0"], replies
    # Make a little room: more than the reserve, less than a declared SIZE
    # or than the message that follows without one.
    body = b"Subject: too much\r\n\r\n" + b"y" * 900 + b"\r\n"
    filler.unlink()
    filler = fill(small_disk)
    os.truncate(filler, os.path.getsize(filler) - 200 * 1024)
    time.sleep(0.6)
    replies = raw_session(port, [
        b"EHLO c.test\r\n", b"MAIL FROM:<alice@localhost> SIZE=900000\r\n",
        b"MAIL FROM:<alice@localhost>\r\n", b"RCPT TO:<bob@localhost>\r\n",
        b"DATA\r\n", body * 400 + b".\r\n", b"NOOP\r\n",
    ])
    assert replies[2:] == [b"452 4.3.1", b"250 2.1.0", b"250 2.1.5", b"354 End d",
                           b"452 4.3.1", b"250 2.0.0"], replies
    # Nothing accepted before is lost or damaged, nothing half-written stays.
    kept = fetch(server)
    assert len(kept) == 2 and all(m.endswith(MESSAGE.rstrip(b"\r\n")) for m in kept)
    maildir = server.maildir("bob@localhost")
    assert list((maildir / "tmp").iterdir()) == []
    assert list((server.data_path / "spool" / "tmp").iterdir()) == []
    # Space again: mail flows without a restart.
    filler.unlink()
    send(server, b"Subject: after\r\n\r\nback\r\n")
    assert len(fetch(server)) == 3


def test_a_read_only_data_folder_is_451_and_recovers(server, small_disk):
    send(server)
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    try:
        replies = raw_session(server.ports["smtp"], [
            b"EHLO c.test\r\n", b"MAIL FROM:<alice@localhost>\r\n", b"RCPT TO:<bob@localhost>\r\n",
            b"DATA\r\n", b"Subject: x\r\n\r\nbody\r\n.\r\n", b"NOOP\r\n",
        ])
        assert replies[2:] == [b"250 2.1.0", b"250 2.1.5", b"354 End d", b"451 4.3.0",
                               b"250 2.0.0"], replies
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    log = server.log()
    assert "storing a message failed" in log and "Traceback" not in log
    send(server, b"Subject: after\r\n\r\nback\r\n")
    assert len(fetch(server)) == 2
