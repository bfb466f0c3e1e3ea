"""
Real IMAP clients against the real server: imaplib (STARTTLS, LIST with
SPECIAL-USE, SELECT, UID FETCH of an SMTP-delivered message, flags seen by
a second session, MOVE, EXPUNGE, APPEND durable across kill -9, IDLE),
curl imap:// and imaps://, fetchmail, mbsync both ways; failed logins
counted with SMTP's and POP3's.
"""

from __future__ import annotations

import imaplib
import os
import re
import select
import shutil
import smtplib
import socket
import ssl
import subprocess
import time

import pytest

from harness import MailServer
from test_core import without_trace

ROLES = ("smtp", "submission", "pop3", "imap", "imaps", "admin")


def insecure() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


@pytest.fixture
def server(tmp_path):
    mail_server = MailServer(tmp_path, roles=ROLES)
    mail_server.start()
    mail_server.add_user("bob@localhost", "bob-pw")
    yield mail_server
    mail_server.stop()


def deliver(server, bodies: list[bytes], user: str = "bob@localhost") -> list[bytes]:
    messages = [b"Subject: m%d\r\n\r\n" % n + body for n, body in enumerate(bodies)]
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as client:
        for message in messages:
            client.sendmail("sender@example.com", [user], message)
    return messages


def connect(server, password: str = "bob-pw") -> imaplib.IMAP4:
    client = imaplib.IMAP4("127.0.0.1", server.ports["imap"], timeout=30)
    try:
        client.login("bob@localhost", password)
    except imaplib.IMAP4.error:
        client.shutdown()
        raise
    return client


def refused(server, password: str) -> bytes:
    """
    The text of the NO a login gets.
    """
    with pytest.raises(imaplib.IMAP4.error) as caught:
        connect(server, password)
    return caught.value.args[0]


def uids_and_flags(client, folder: str = "INBOX") -> dict[int, set[str]]:
    client.select(folder, readonly=True)
    typ, data = client.uid("FETCH", "1:*", "(FLAGS)")
    out = {}
    for item in data:
        if not item:
            continue
        text = item.decode() if isinstance(item, bytes) else item[0].decode()
        match = re.search(r"UID (\d+) FLAGS \(([^)]*)\)", text) or re.search(
            r"FLAGS \(([^)]*)\) UID (\d+)", text
        )
        if match is None:
            continue
        if match.re.pattern.startswith("UID"):
            out[int(match.group(1))] = set(match.group(2).split()) - {"\\Recent"}
        else:
            out[int(match.group(2))] = set(match.group(1).split()) - {"\\Recent"}
    return out


def test_imaplib_after_starttls_list_select_fetch_store_move_expunge(server):
    (sent,) = deliver(server, [b"hello over IMAP\r\n"])
    client = imaplib.IMAP4("127.0.0.1", server.ports["imap"], timeout=30)
    assert "STARTTLS" in client.capabilities
    client.starttls(ssl_context=insecure())
    assert "STARTTLS" not in client.capabilities
    client.login("bob@localhost", "bob-pw")
    typ, listing = client.list()
    assert typ == "OK"
    lines = {line.decode() for line in listing}
    for name, use in (("Sent", "\\Sent"), ("Drafts", "\\Drafts"), ("Trash", "\\Trash"), ("Junk", "\\Junk")):
        assert any(line.endswith(f'"{name}"') and use in line for line in lines), lines
    typ, count = client.select("INBOX")
    assert count == [b"1"]
    typ, data = client.uid("FETCH", "1", "(BODY.PEEK[])")
    fetched = data[0][1]
    # Byte-exact: the stored file in CRLF form, which is the sent message
    # under the two trace fields the server added.
    maildir = server.maildir("bob@localhost")
    (stored,) = [p for sub in ("new", "cur") for p in (maildir / sub).iterdir()]
    assert fetched == stored.read_bytes().replace(b"\n", b"\r\n")
    assert without_trace(fetched) == sent
    # A flag set here is seen by a second session.
    other = connect(server)
    other.select("INBOX")
    client.uid("STORE", "1", "+FLAGS", "(\\Seen)")
    other.noop()
    typ, data = other.uid("FETCH", "1", "(FLAGS)")
    assert b"\\Seen" in data[0]
    # MOVE to Trash (RFC 6851), then EXPUNGE of what is left flagged \Deleted.
    deliver(server, [b"second\r\n", b"third\r\n"])
    client.noop()
    typ, data = client.uid("MOVE", "1", "Trash")
    assert typ == "OK"
    assert client.response("EXPUNGE") == ("EXPUNGE", [b"1"])  # the moved one
    client.uid("STORE", "2", "+FLAGS", "(\\Deleted)")
    typ, data = client.expunge()
    assert typ == "OK" and data == [b"1"]
    typ, data = client.uid("SEARCH", "ALL")
    assert data == [b"3"]
    assert uids_and_flags(other, "Trash") == {1: {"\\Seen"}}
    client.logout()
    other.logout()


def test_move_answers_copyuid_and_expunge(server):
    deliver(server, [b"one\r\n"])
    sock = socket.create_connection(("127.0.0.1", server.ports["imap"]), timeout=30)
    sock.recv(4096)
    sock.sendall(b"a LOGIN bob@localhost bob-pw\r\nb SELECT INBOX\r\nc UID MOVE 1 Trash\r\n")
    data = b""
    while b"c OK" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    tail = data[data.index(b"b OK") :]
    assert re.search(rb"\* OK \[COPYUID \d+ 1 1\] Moved UIDs.\r\n\* 1 EXPUNGE\r\nc OK Move completed.", tail)
    sock.close()


def test_append_to_sent_survives_kill_9(server):
    client = connect(server)
    message = b"Subject: draft\r\nFrom: bob@localhost\r\n\r\nkept\r\n"
    typ, data = client.append("Sent", "(\\Seen)", None, message)
    assert typ == "OK"
    match = re.search(rb"APPENDUID (\d+) (\d+)", data[0])
    assert match
    validity, uid = int(match.group(1)), int(match.group(2))
    server.kill()  # no clean shutdown after the OK
    client.shutdown()
    server.start()
    client = connect(server)
    typ, count = client.select("Sent")
    assert count == [b"1"]
    assert client.response("UIDVALIDITY")[1] == [str(validity).encode()]
    typ, data = client.uid("FETCH", str(uid), "(FLAGS BODY.PEEK[])")
    assert data[0][1] == message
    assert b"\\Seen" in data[0][0]
    client.logout()


def test_idle_hears_a_delivery_within_a_second(server):
    client = connect(server)
    client.select("INBOX")
    sock = client.socket()
    sock.sendall(b"i IDLE\r\n")
    assert client.readline().startswith(b"+ ")
    started = time.monotonic()
    deliver(server, [b"pushed\r\n"])
    delivered = time.monotonic()
    sock.settimeout(5)
    line = client.readline()
    heard = time.monotonic()
    assert line == b"* 1 EXISTS\r\n"
    assert heard - delivered < 1.0, (delivered - started, heard - delivered)
    sock.sendall(b"DONE\r\n")
    while not (line := client.readline()).startswith(b"i "):
        pass
    assert line.startswith(b"i OK")
    client.logout()


def test_failed_imap_logins_count_with_smtp_and_pop3(tmp_path):
    server = MailServer(
        tmp_path,
        roles=ROLES,
        extra_toml="[limits]\nmax_auth_failures_per_client = 3\nauth_failure_delay = 0.0\n",
    )
    server.start()
    try:
        server.add_user("bob@localhost", "bob-pw")
        import poplib

        pop = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=30)
        pop.user("bob@localhost")
        with pytest.raises(poplib.error_proto):
            pop.pass_("wrong")
        pop.close()
        with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30) as smtp:
            smtp.ehlo()
            smtp.user, smtp.password = "bob@localhost", "wrong"
            with pytest.raises(smtplib.SMTPAuthenticationError):
                smtp.auth("PLAIN", smtp.auth_plain)  # one try (login() tries each mechanism)
        assert refused(server, "wrong").startswith(b"[AUTHENTICATIONFAILED]")
        # Three failures from this address, over three protocols: even the
        # right password is not checked now.
        assert refused(server, "bob-pw").startswith(b"[UNAVAILABLE] Too many failed logins")
    finally:
        server.stop()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_lists_and_fetches_over_imap_and_imaps(server):
    (sent,) = deliver(server, [b"for curl\r\n"])
    listing = subprocess.run(
        ["curl", "-s", "-u", "bob@localhost:bob-pw", f"imap://127.0.0.1:{server.ports['imap']}/"],
        capture_output=True, timeout=60,
    )
    assert listing.returncode == 0, listing.stderr
    assert b'"Sent"' in listing.stdout and b"\\Sent" in listing.stdout
    for scheme, port in (("imap", server.ports["imap"]), ("imaps", server.ports["imaps"])):
        fetched = subprocess.run(
            ["curl", "-s", "-k", "-u", "bob@localhost:bob-pw", f"{scheme}://127.0.0.1:{port}/INBOX;UID=1"],
            capture_output=True, timeout=60,
        )
        assert fetched.returncode == 0, fetched.stderr
        assert without_trace(fetched.stdout) == sent


@pytest.mark.skipif(shutil.which("fetchmail") is None, reason="fetchmail is not installed")
def test_fetchmail_over_imap(server, tmp_path):
    sent = deliver(server, [b"first\r\n", b"second\r\n"])
    out = tmp_path / "fetched"
    out.mkdir()
    rc = tmp_path / "fetchmailrc"
    rc.write_text(
        "set no bouncemail\n"
        f"poll 127.0.0.1 with proto IMAP and port {server.ports['imap']}:\n"
        "  user 'bob@localhost' there with password 'bob-pw' is 'bob' here\n"
        "  options fetchall keep sslproto ''\n"
        f"  mda \"/bin/sh -c 'cat > $(mktemp {out}/m.XXXXXX)'\"\n"
    )
    rc.chmod(0o600)
    env = dict(os.environ, HOME=str(tmp_path))
    result = subprocess.run(
        ["fetchmail", "--nosyslog", "--fetchmailrc", str(rc), "--pidfile", str(tmp_path / "pid")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    fetched = [path.read_bytes() for path in out.iterdir()]
    assert len(fetched) == 2
    for message in sent:
        assert sum(f.endswith(message.replace(b"\r\n", b"\n")) for f in fetched) == 1


def mbsync_config(server, home, local) -> str:
    return f"""\
IMAPAccount server
Host 127.0.0.1
Port {server.ports['imap']}
User bob@localhost
Pass bob-pw
SSLType None
AuthMechs LOGIN

IMAPStore remote
Account server

MaildirStore local
Inbox {local}
SubFolders Maildir++

Channel sync
Far :remote:
Near :local:
Patterns *
Create Both
Expunge Both
SyncState *
"""


def mbsync(config, home) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["mbsync", "-c", str(config), "-a"],
        capture_output=True, text=True, timeout=120, env=dict(os.environ, HOME=str(home)),
    )


@pytest.mark.skipif(shutil.which("mbsync") is None, reason="mbsync (isync) is not installed")
def test_mbsync_both_ways(server, tmp_path):
    sent = deliver(server, [b"one\r\n", b"two\r\n"])
    home = tmp_path / "home"
    home.mkdir()
    local = home / "Mail"
    local.mkdir()
    config = home / "mbsyncrc"
    config.write_text(mbsync_config(server, home, local))
    result = mbsync(config, home)
    assert result.returncode == 0, result.stdout + result.stderr
    inbox = local
    files = sorted(p for sub in ("new", "cur") for p in (inbox / sub).iterdir())
    assert len(files) == 2
    # mbsync marks what it stores with an X-TUID field of its own.
    bodies = sorted(
        without_trace(re.sub(rb"X-TUID: \S+\n", b"", p.read_bytes()).replace(b"\n", b"\r\n"))
        for p in files
    )
    assert bodies == sorted(sent)
    assert (local / ".Sent" / "cur").is_dir()
    # A flag set here reaches the server, and so does a message saved here.
    first = next(p for p in files if b"m0" in p.read_bytes())
    name = first.name
    flagged = name + ":2,F" if ":2," not in name else name.replace(":2,", ":2,F")
    first.rename(inbox / "cur" / flagged)
    drafts = local / ".Drafts"
    (drafts / "cur" / "1700000000.local.host:2,D").write_bytes(b"Subject: written offline\n\nbody\n")
    result = mbsync(config, home)
    assert result.returncode == 0, result.stdout + result.stderr
    client = connect(server)
    flags = uids_and_flags(client, "INBOX")
    assert any("\\Flagged" in f for f in flags.values()), flags
    assert list(uids_and_flags(client, "Drafts").values()) == [{"\\Draft"}]
    client.logout()


def rss_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(field)


def test_fetch_of_a_50_mb_message_streams(server):
    line = b"x" * 98 + b"\n"
    data = b"Subject: big\n\n" + line * (50 * 1024 * 1024 // len(line))
    maildir = server.maildir("bob@localhost")
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    crlf_size = len(data) + data.count(b"\n")
    (maildir / "new" / f"1700000000.M1P1Q1.test,S={len(data)},W={crlf_size}").write_bytes(data)
    client = connect(server)
    client.select("INBOX")
    pid = server.process.pid
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    before = rss_kib(pid, "VmRSS")
    client.socket().settimeout(120)
    typ, fetched = client.uid("FETCH", "1", "(BODYSTRUCTURE BODY.PEEK[])")
    growth_kib = rss_kib(pid, "VmHWM") - before
    assert typ == "OK"
    assert fetched[0][1] == data.replace(b"\n", b"\r\n")
    assert b'BODYSTRUCTURE ("text" "plain"' in fetched[0][0]
    client.logout()
    assert growth_kib < 20 * 1024, f"server grew by {growth_kib} KiB"


def test_pop3_and_imap_share_the_inbox(server):
    """
    POP3's lock keeps out POP3 only: an IMAP session selects (taking the
    messages as \\Recent, which moves them to cur/) and flags them while a
    POP3 session holds the lock; POP3 still retrieves and deletes them, and
    IMAP hears of the deletion.
    """
    import poplib

    sent = deliver(server, [b"shared one\r\n", b"shared two\r\n"])
    pop = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=30)
    pop.user("bob@localhost")
    pop.pass_("bob-pw")
    client = connect(server)
    client.select("INBOX")
    client.uid("STORE", "1:2", "+FLAGS", "(\\Flagged)")
    maildir = server.maildir("bob@localhost")
    assert list((maildir / "new").iterdir()) == []
    _, lines, _ = pop.retr(1)
    assert without_trace(b"\r\n".join(lines) + b"\r\n") == sent[0]
    pop.dele(2)
    pop.quit()
    deadline = time.monotonic() + 5
    while True:
        typ, data = client.noop()
        expunged = client.response("EXPUNGE")[1]
        if expunged != [None] or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert expunged == [b"2"]
    flags = uids_and_flags(client)
    assert flags == {1: {"\\Flagged", "\\Seen"}}
    client.logout()


def test_two_workers_give_the_same_uids(tmp_path):
    """
    With workers = 2 the processes assign UIDs under Dovecot's uidlist lock:
    sessions in either process see the same UID for the same message.
    """
    server = MailServer(tmp_path, roles=ROLES, extra_toml="workers = 2\n")
    server.start()
    try:
        server.add_user("bob@localhost", "bob-pw")
        clients = [connect(server) for _ in range(6)]
        for client in clients:
            client.select("INBOX")
        deliver(server, [b"message %d\r\n" % n for n in range(20)])
        seen = []
        for client in clients:
            client.noop()
            typ, data = client.uid("FETCH", "1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
            mapping = {}
            for item in data:
                if isinstance(item, tuple):
                    uid = int(re.search(rb"UID (\d+)", item[0]).group(1))
                    mapping[uid] = item[1].strip()
            seen.append(mapping)
            client.logout()
        assert len(seen[0]) == 20
        assert all(mapping == seen[0] for mapping in seen)
    finally:
        server.stop()
