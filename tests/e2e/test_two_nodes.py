"""
Two servers on one data folder (issue 22): nodes C{a} and C{b} on one
machine, with the same host name, each on its own OS-chosen ports, both
taking mail at once, local and for a remote domain whose MX is a loopback
sink; POP3 and IMAP through either; C{b} killed with SIGKILL while C{a} goes on, its
queue adopted by C{a}, then C{b} started again.  Every message that got its
250 is in its mailbox once or reached the sink once, and nothing arrives
that was not sent.
"""

from __future__ import annotations

import collections
import imaplib
import poplib
import re
import smtplib
import threading

import pytest

from harness import MailServer
from relay_fixtures import SMTPPeer, wait_until

USERS = ("u1@localhost", "u2@localhost")
SENDER = ("s@localhost", "secret")
SUBJECT = re.compile(rb"^Subject: (\S+)", re.MULTILINE)


def node(tmp_path, name: str, dns_server, sink_port: int) -> MailServer:
    root = tmp_path / name
    root.mkdir()
    return MailServer(
        root, data_path=tmp_path / "data", roles=("smtp", "submission", "pop3", "imap", "admin"),
        extra_toml=(
            f'node_name = "{name}"\n'
            "[smtp]\nauth_over_plaintext = true\n"
            f'[relay]\nresolver = "{dns_server.resolver}"\nport = {sink_port}\n'
            'retry_schedule = ["1s"]\nmax_retry_interval = "2s"\n'
            "scan_interval = 0.5\nconnect_timeout = 2.0\n"
            "[limits]\nsubmission_messages_per_hour = 0\nsubmission_recipients_per_hour = 0\n"
        ),
    )


class Sender(threading.Thread):
    """
    Sends C{count} messages to one server, a connection each, and keeps the
    subjects that got their 250; stops at the first failure (its server
    was killed).
    """

    def __init__(self, server: MailServer, label: str, count: int, remote: bool) -> None:
        super().__init__(daemon=True)
        self.server, self.label, self.count, self.remote = server, label, count, remote
        self.port = server.ports["submission" if remote else "smtp"]
        self.tried: list[str] = []
        self.accepted: list[str] = []

    def run(self) -> None:
        for i in range(self.count):
            subject = f"{self.label}-{i}"
            to = f"r{i}@remote.test" if self.remote else USERS[i % 2]
            self.tried.append(subject)
            try:
                with smtplib.SMTP("127.0.0.1", self.port, timeout=30) as client:
                    if self.remote:
                        client.login(*SENDER)
                    client.sendmail(SENDER[0], [to],
                                    f"Subject: {subject}\r\nTo: {to}\r\n\r\nbody\r\n".encode())
            except (OSError, smtplib.SMTPException):
                return
            self.accepted.append(subject)


def pop3_subjects(server: MailServer, user: str) -> list[str]:
    client = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=30)
    try:
        client.user(user)
        client.pass_("pw")
        subjects = []
        for line in client.list()[1]:
            number = int(line.split()[0])
            text = b"\n".join(client.retr(number)[1])
            subjects.append(SUBJECT.search(text).group(1).decode())
        return subjects
    finally:
        client.quit()


def imap_append(server: MailServer, user: str, subject: str) -> None:
    client = imaplib.IMAP4("127.0.0.1", server.ports["imap"], timeout=30)
    try:
        client.login(user, "pw")
        typ, _ = client.append("INBOX", None, None, f"Subject: {subject}\r\n\r\nbody\r\n".encode())
        assert typ == "OK"
    finally:
        client.logout()


def imap_subjects(server: MailServer, user: str) -> list[str]:
    client = imaplib.IMAP4("127.0.0.1", server.ports["imap"], timeout=30)
    try:
        client.login(user, "pw")
        client.select("INBOX", readonly=True)
        typ, data = client.uid("FETCH", "1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert typ == "OK"
        return [SUBJECT.search(part[1]).group(1).decode() for part in data
                if isinstance(part, tuple)]
    finally:
        client.logout()


def sink_subjects(sink: SMTPPeer) -> list[str]:
    return [SUBJECT.search(data).group(1).decode() for _, _, data in sink.messages]


@pytest.fixture
def nodes(tmp_path, dns_server):
    sink = SMTPPeer().start()
    sink.handler.rcpt_reply = "451 4.3.0 not now"  # queues fill until the sink opens
    a = node(tmp_path, "a", dns_server, sink.port)
    b = node(tmp_path, "b", dns_server, sink.port)
    try:
        a.start()
        for user in USERS:
            a.add_user(user, "pw")
        a.add_user(*SENDER)  # one users file, shared: b reads it too
        b.start()
        yield a, b, sink
    finally:
        a.stop()
        b.stop()
        sink.stop()


def test_two_nodes_one_data_folder_kill_9_adopt_restart(nodes):
    a, b, sink = nodes

    # One mailbox is served to one POP3 session at a time, whichever node.
    held = poplib.POP3("127.0.0.1", a.ports["pop3"], timeout=30)
    held.user(USERS[0])
    held.pass_("pw")
    other = poplib.POP3("127.0.0.1", b.ports["pop3"], timeout=30)
    try:
        other.user(USERS[0])
        with pytest.raises(poplib.error_proto) as in_use:
            other.pass_("pw")
        assert in_use.value.args[0].startswith(b"-ERR [IN-USE]")
    finally:
        other.close()
    # A running node's queue is its own.
    refused = a.cli("queue", "adopt", "b")
    assert refused.returncode == 1 and "node 'b' is running" in refused.stderr

    senders = [Sender(a, "a-local", 40, False), Sender(a, "a-remote", 40, True),
               Sender(b, "b-local", 40, False), Sender(b, "b-remote", 40, True)]
    for sender in senders:
        sender.start()
    # Deliveries through b while a's POP3 session holds u1's mailbox.
    assert wait_until(lambda: all(len(s.accepted) >= 10 for s in senders[2:]), timeout=60)
    held.quit()
    b.kill()  # SIGKILL, mid-traffic; a goes on
    for sender in senders:
        sender.join(120)
        assert not sender.is_alive()
    assert len(senders[0].accepted) == len(senders[1].accepted) == 40
    b_queue = list((b.queue_path / "messages").iterdir())  # one file each queued
    assert b_queue, "b's remote messages wait in its queue"
    assert sink.messages == []

    # The dead node's queue taken over by the live one, which relays it.
    adopted = a.cli("queue", "adopt", "b")
    assert adopted.returncode == 0, adopted.stderr
    assert f"adopted {len(b_queue)} message(s) from node 'b' into node 'a'" in adopted.stdout
    sink.handler.rcpt_reply = None
    assert a.cli("queue", "flush").returncode == 0
    remote = senders[1].accepted + senders[3].accepted
    assert wait_until(lambda: set(remote) <= set(sink_subjects(sink)), timeout=60), a.log()

    # b again, on the same folder: it takes mail and serves mailboxes.
    b.start()
    after = [Sender(b, "b2-local", 6, False), Sender(b, "b2-remote", 6, True)]
    for sender in after:
        sender.start()
    for sender in after:
        sender.join(60)
        assert len(sender.accepted) == 6
    remote += after[1].accepted
    # IMAP through either node writes into the same mailbox.
    for server, subject in ((a, "imap-a"), (b, "imap-b")):
        imap_append(server, USERS[1], subject)
    assert wait_until(lambda: set(remote) <= set(sink_subjects(sink)), timeout=60), b.log()
    assert wait_until(lambda: "empty" in a.cli("queue", "list").stdout
                      and "empty" in b.cli("queue", "list").stdout)

    # Both nodes wrote into the same mailboxes, each under its own name
    # (SMTP and IMAP APPEND alike).
    writers = {}
    for user in USERS:
        for path in [*(a.maildir(user) / "new").iterdir(), *(a.maildir(user) / "cur").iterdir()]:
            subject = SUBJECT.search(path.read_bytes()).group(1).decode()
            writers[subject] = path.name.split(",")[0].split(":")[0].rsplit(".", 1)[1]
    assert set(writers.values()) == {"a", "b"}
    assert [writers["imap-a"], writers["imap-b"]] == ["a", "b"]
    assert {writers[s] for s in senders[2].accepted} == {"b"}

    tried = {s for sender in senders + after for s in sender.tried}
    local = [s for sender in (senders[0], senders[2], after[0]) for s in sender.accepted]
    local += ["imap-a", "imap-b"]
    tried |= {"imap-a", "imap-b"}
    second = pop3_subjects(b, USERS[1])
    assert sorted(imap_subjects(a, USERS[1])) == sorted(second)
    fetched = pop3_subjects(a, USERS[0]) + second
    relayed = sink_subjects(sink)
    # Every accepted message exactly once; nothing that was not sent.
    for accepted, arrived in ((local, fetched), (remote, relayed)):
        counts = collections.Counter(arrived)
        assert [s for s in accepted if counts[s] != 1] == []
        assert [s for s, n in counts.items() if n > 1 or s not in tried] == []
