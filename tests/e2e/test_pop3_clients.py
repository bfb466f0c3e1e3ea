"""
Real POP3 clients against the real server: poplib, curl and fetchmail.
"""

from __future__ import annotations

import os
import poplib
import shutil
import socket
import smtplib
import ssl
import subprocess
import time

import pytest

from test_core import fetch_all, without_trace


def deliver(server, user: str, bodies: list[bytes]) -> list[bytes]:
    messages = [b"Subject: m%d\r\n\r\n" % n + body for n, body in enumerate(bodies)]
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as client:
        for message in messages:
            client.sendmail("sender@example.com", [user], message)
    return messages


@pytest.fixture
def bob(server):
    server.add_user("bob@localhost", "bob-pw")
    return server


def login(server, user="bob@localhost", password="bob-pw") -> poplib.POP3:
    client = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=30)
    client.user(user)
    client.pass_(password)
    return client


def test_poplib_stls_then_fetch(bob):
    (sent,) = deliver(bob, "bob@localhost", [b"over TLS\r\n"])
    client = poplib.POP3("127.0.0.1", bob.ports["pop3"], timeout=30)
    assert "STLS" in client.capa()
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    client.stls(context=context)
    assert "STLS" not in client.capa()
    client.user("bob@localhost")
    client.pass_("bob-pw")
    _, lines, _ = client.retr(1)
    client.quit()
    assert without_trace(b"\r\n".join(lines) + b"\r\n") == sent


def test_second_login_is_in_use_until_the_first_drops(bob):
    first = login(bob)
    with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
        login(bob)
    first.sock.shutdown(socket.SHUT_RDWR)  # dropped, no QUIT
    first.sock.close()
    deadline = time.monotonic() + 10
    while True:
        try:
            second = login(bob)
            break
        except poplib.error_proto:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    second.quit()


def test_uidl_is_stable_across_sessions_and_restarts(bob):
    deliver(bob, "bob@localhost", [b"one\r\n", b"two\r\n"])

    def uidls():
        client = login(bob)
        try:
            return client.uidl()[1]
        finally:
            client.quit()

    first = uidls()
    assert len(first) == 2
    client = login(bob)
    client.retr(1)  # marks it seen: moves it to cur/
    client.quit()
    assert uidls() == first
    bob.stop()
    bob.start()
    assert uidls() == first
    for line in first:
        uid = line.split()[1]
        assert 1 <= len(uid) <= 70 and all(0x21 <= c <= 0x7E for c in uid)


needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


def curl(server, *args: str, path: str = "/") -> subprocess.CompletedProcess:
    return subprocess.run(
        ["curl", "--silent", "--show-error", "--max-time", "30", "--user", "bob@localhost:bob-pw",
         *args, f"pop3://127.0.0.1:{server.ports['pop3']}{path}"],
        capture_output=True,
        timeout=60,
    )


@needs_curl
def test_curl_list_retr_uidl_dele(bob):
    sent = deliver(bob, "bob@localhost", [b".dotted\r\nline\r\n", b"second\r\n"])
    listing = curl(bob)
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.decode().split("\r\n")
    assert [line.split()[0] for line in lines if line] == ["1", "2"]
    retrieved = curl(bob, path="/1")
    assert retrieved.returncode == 0, retrieved.stderr
    assert without_trace(retrieved.stdout) == sent[0]
    uidl = curl(bob, "--request", "UIDL")
    assert uidl.returncode == 0 and len(uidl.stdout.decode().split("\r\n")) >= 2
    deleted = curl(bob, "--request", "DELE", "--head", path="/1")
    assert deleted.returncode == 0, deleted.stderr
    remaining = fetch_all(bob, "bob@localhost", "bob-pw")
    assert [without_trace(m) for m in remaining] == [sent[1]]


@pytest.mark.skipif(shutil.which("fetchmail") is None, reason="fetchmail is not installed")
def test_fetchmail_fetches_and_deletes_everything(bob, tmp_path):
    sent = deliver(bob, "bob@localhost", [b"first\r\n", b".dot\r\n..two\r\n", b"third\r\n" * 50])
    out = tmp_path / "fetched"
    out.mkdir()
    rc = tmp_path / "fetchmailrc"
    rc.write_text(
        "set no bouncemail\n"
        f"poll 127.0.0.1 with proto POP3 and port {bob.ports['pop3']}:\n"
        "  user 'bob@localhost' there with password 'bob-pw' is 'bob' here\n"
        "  options fetchall nokeep sslproto ''\n"
        f"  mda \"/bin/sh -c 'cat > $(mktemp {out}/m.XXXXXX)'\"\n"
    )
    rc.chmod(0o600)
    env = dict(os.environ, HOME=str(tmp_path))
    result = subprocess.run(
        ["fetchmail", "--nosyslog", "--fetchmailrc", str(rc), "--pidfile", str(tmp_path / "pid")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    fetched = sorted(path.read_bytes() for path in out.iterdir())
    assert len(fetched) == 3
    for message in sent:
        lf = message.replace(b"\r\n", b"\n")
        assert sum(f.endswith(lf) for f in fetched) == 1, lf
    maildir = bob.maildir("bob@localhost")
    assert list((maildir / "new").iterdir()) == [] and list((maildir / "cur").iterdir()) == []


def rss_kib(pid: int, field: str) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


def test_retr_of_a_50_mb_message_streams(bob):
    line = b"x" * 98 + b"\n"
    body = line * (50 * 1024 * 1024 // len(line))
    data = b"Subject: big\n\n" + body
    maildir = bob.maildir("bob@localhost")
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    crlf_size = len(data) + data.count(b"\n")
    name = f"1700000000.M1P1Q1.test,S={len(data)},W={crlf_size}"
    (maildir / "new" / name).write_bytes(data)
    client = login(bob)
    pid = bob.process.pid
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    before = rss_kib(pid, "VmRSS")
    client.sock.settimeout(60)
    _, lines, octets = client.retr(1)
    client.quit()
    assert octets == crlf_size
    assert len(lines) == data.count(b"\n")
    growth_kib = rss_kib(pid, "VmHWM") - before
    assert growth_kib < 20 * 1024, f"server grew by {growth_kib} KiB"
