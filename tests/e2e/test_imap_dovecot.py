"""
A mailbox we wrote is a mailbox Dovecot reads the same way, and one
Dovecot wrote is one we read the same way: Dovecot's IMAP server, started
here on a loopback port with a minimal configuration on a copy of a
mailbox our server filled (SMTP deliveries, flags, keywords, folders,
COPY, MOVE, EXPUNGE over our IMAP), must list the same folders, the same
UIDVALIDITY and the same UIDs with the same flags; then Dovecot changes
the copy and our server, started on it, must list what Dovecot does.
"""

from __future__ import annotations

import imaplib
import os
import pwd
import re
import shutil
import smtplib
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from harness import MailServer

DOVECOT = Path("/usr/sbin/dovecot")
ROLES = ("smtp", "imap", "admin")


def _why_not() -> str | None:
    if not DOVECOT.exists():
        return "Dovecot is not installed (apt-get install dovecot-imapd)"
    if os.geteuid() != 0:
        return "Dovecot's test server needs root (it runs mail processes as the mail user)"
    for user in ("dovecot", "dovenull", "mail"):
        try:
            pwd.getpwnam(user)
        except KeyError:
            return f"no user {user!r}"
    return None


pytestmark = pytest.mark.skipif(_why_not() is not None, reason=str(_why_not()))


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Dovecot:
    """
    Dovecot's IMAP on one Maildir, as user bob with password bob-pw.
    """

    def __init__(self, root: Path, maildir: Path) -> None:
        self.root = root
        self.maildir = maildir
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        mail = pwd.getpwnam("mail")
        for folder, dirs, files in os.walk(self.maildir):
            os.chown(folder, mail.pw_uid, mail.pw_gid)
            for name in files:
                os.chown(os.path.join(folder, name), mail.pw_uid, mail.pw_gid)
        (self.root / "users").write_text(
            f"bob:{{PLAIN}}bob-pw:{mail.pw_uid}:{mail.pw_gid}::{self.maildir}::\n"
        )
        (self.root / "dovecot.conf").write_text(f"""\
instance_name = test-dovecot-{self.port}
base_dir = {self.root}/run
state_dir = {self.root}/state
log_path = {self.root}/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
mail_location = maildir:{self.maildir}
first_valid_uid = {mail.pw_uid}
last_valid_uid = {mail.pw_uid}
first_valid_gid = {mail.pw_gid}
last_valid_gid = {mail.pw_gid}
namespace inbox {{
  inbox = yes
  separator = /
}}
passdb {{
  driver = passwd-file
  args = {self.root}/users
}}
userdb {{
  driver = passwd-file
  args = {self.root}/users
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.port}
  }}
}}
""")
        self.process = subprocess.Popen(
            [str(DOVECOT), "-F", "-c", str(self.root / "dovecot.conf")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                imaplib.IMAP4("127.0.0.1", self.port, timeout=5).logout()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(self.log()) from None
                time.sleep(0.1)

    def log(self) -> str:
        path = self.root / "dovecot.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(30)
            self.process.stdout.close()
            self.process = None


def snapshot(port: int, user: str) -> dict:
    """
    Every folder's name, UIDVALIDITY, and UIDs with their flags, as an
    IMAP server lists them (sorted, \\Recent left out), and subscriptions.
    """
    client = imaplib.IMAP4("127.0.0.1", port, timeout=30)
    client.login(user, "bob-pw")
    typ, listing = client.list('""', "*")
    names = []
    for line in listing:
        match = re.match(rb'\(([^)]*)\) "/" (.+)$', line)
        name = match.group(2).strip(b'"').decode()
        if b"\\Noselect" not in match.group(1) and b"\\NonExistent" not in match.group(1):
            names.append(name)
    typ, lsub = client.lsub('""', "*")
    subscribed = sorted(re.match(rb'\([^)]*\) "/" (.+)$', line).group(1).strip(b'"').decode() for line in lsub)
    folders = {}
    for name in sorted(names):
        client.select(f'"{name}"', readonly=True)
        validity = int(client.response("UIDVALIDITY")[1][0])
        typ, data = client.uid("FETCH", "1:*", "(FLAGS)")
        messages = {}
        for item in data:
            if not item:
                continue
            text = item.decode()
            uid = int(re.search(r"UID (\d+)", text).group(1))
            flags = re.search(r"FLAGS \(([^)]*)\)", text).group(1).split()
            messages[uid] = sorted(f for f in flags if f != "\\Recent")
        folders[name] = (validity, messages)
    client.logout()
    return {"folders": folders, "subscribed": subscribed}


def fill(server: MailServer) -> None:
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as smtp:
        for n in range(4):
            smtp.sendmail("a@example.com", ["bob@localhost"], b"Subject: %d\r\n\r\nbody %d\r\n" % (n, n))
    client = imaplib.IMAP4("127.0.0.1", server.ports["imap"], timeout=30)
    client.login("bob@localhost", "bob-pw")
    client.create("Archive/2024")
    client.create("Entw&APw-rfe")
    client.subscribe("Archive/2024")
    client.select("INBOX")
    client.uid("STORE", "1", "+FLAGS", "(\\Seen)")
    client.uid("STORE", "2", "+FLAGS", "(\\Flagged $Forwarded Work)")
    client.uid("COPY", "1:2", "Archive/2024")
    client.uid("MOVE", "3", "Entw&APw-rfe")
    client.uid("STORE", "4", "+FLAGS", "(\\Deleted \\Answered)")
    client.expunge()
    client.append("Sent", "(\\Seen \\Draft)", None, b"Subject: sent\r\n\r\nsaved\r\n")
    client.logout()


def test_dovecot_lists_what_we_wrote_and_we_list_what_dovecot_wrote(tmp_path):
    (tmp_path / "ours").mkdir()
    (tmp_path / "again").mkdir()
    ours = MailServer(tmp_path / "ours", roles=ROLES)
    ours.start()
    work = Path(tempfile.mkdtemp(prefix="imap-dovecot-"))
    try:
        ours.add_user("bob@localhost", "bob-pw")
        fill(ours)
        ours_before = snapshot(ours.ports["imap"], "bob@localhost")
        ours.stop()
        assert set(ours_before["folders"]) == {
            "INBOX", "Sent", "Drafts", "Trash", "Junk", "Archive", "Archive/2024", "Entw&APw-rfe",
        }
        assert ours_before["folders"]["INBOX"][1] == {1: ["\\Seen"], 2: ["$Forwarded", "Work", "\\Flagged"]}
        assert ours_before["folders"]["Entw&APw-rfe"][1] == {1: []}
        work.chmod(0o755)  # Dovecot's mail processes run as "mail"
        copy = work / "Maildir"
        shutil.copytree(ours.maildir("bob@localhost"), copy)
        dovecot = Dovecot(work, copy)
        dovecot.start()
        try:
            theirs = snapshot(dovecot.port, "bob")
            assert normalized(theirs) == normalized(ours_before), dovecot.log()
            # Dovecot writes: a new message, a flag, a folder.
            client = imaplib.IMAP4("127.0.0.1", dovecot.port, timeout=30)
            client.login("bob", "bob-pw")
            client.append("INBOX", "(\\Flagged)", None, b"Subject: from dovecot\r\n\r\nhi\r\n")
            client.select("INBOX")
            client.uid("STORE", "1", "+FLAGS", "(\\Answered)")
            client.create("Dovecot/Made")
            client.logout()
            theirs_after = snapshot(dovecot.port, "bob")
            assert theirs_after["folders"]["INBOX"][1][5] == ["\\Flagged"]
        finally:
            dovecot.stop()
        # Our server on the copy Dovecot changed.
        again = MailServer(tmp_path / "again", roles=ROLES)
        target = again.maildir("bob@localhost")
        target.parent.mkdir(parents=True)
        shutil.copytree(copy, target)
        again.start()
        try:
            again.add_user("bob@localhost", "bob-pw")
            ours_after = snapshot(again.ports["imap"], "bob@localhost")
        finally:
            again.stop()
        assert normalized(ours_after) == normalized(theirs_after)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def normalized(snap: dict) -> dict:
    return {
        "folders": {name: (validity, {uid: sorted(flags) for uid, flags in messages.items()})
                    for name, (validity, messages) in snap["folders"].items()},
        "subscribed": sorted(snap["subscribed"]),
    }
