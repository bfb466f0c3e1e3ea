"""
The relay in the real C{twistd mailserver} process: submission to a remote
address found through the loopback DNS server, bounces, kill -9 with a full
queue, and the C{mailserver queue} commands.
"""

from __future__ import annotations

import email
import email.policy
import smtplib
import time

import pytest

from harness import MailServer
from relay_fixtures import SMTPPeer, free_port, wait_until


def relay_toml(dns_server, port: int, scan: str = "0.5") -> str:
    return (
        "[smtp]\nauth_over_plaintext = true\n"
        f'[relay]\nresolver = "{dns_server.resolver}"\nport = {port}\n'
        'retry_schedule = ["1s"]\nmax_retry_interval = "2s"\n'
        f"scan_interval = {scan}\nconnect_timeout = 2.0\n"
    )


@pytest.fixture
def make_server(tmp_path):
    started = []

    def make(extra_toml: str) -> MailServer:
        server = MailServer(tmp_path, local_domains=("localhost", "example.org"),
                            extra_toml=extra_toml)
        server.start()
        server.add_user("s@example.org", "secret")
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


def submit(server: MailServer, to: str, subject: str = "hi", count: int = 1) -> None:
    with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30) as client:
        client.login("s@example.org", "secret")
        for i in range(count):
            client.sendmail(
                "s@example.org", [to],
                f"From: s@example.org\r\nTo: {to}\r\nSubject: {subject} {i}\r\n\r\n"
                f".\r\nbody {i}\r\n".encode(),
            )


def test_submission_to_remote_arrives_at_the_mx_peer(make_server, dns_server):
    peer = SMTPPeer().start()
    try:
        server = make_server(relay_toml(dns_server, peer.port))
        submit(server, "user@remote.test")
        [(sender, rcpts, data)] = peer.wait_for(1)
        assert sender == "s@example.org" and rcpts == ["user@remote.test"]
        assert b"Subject: hi 0\r\n" in data and b"\r\n.\r\nbody 0\r\n" in data
        assert b"Return-Path" not in data
        assert wait_until(lambda: "empty" in server.cli("queue", "list").stdout)
    finally:
        peer.stop()


def test_5xx_bounces_to_the_local_sender(make_server, dns_server):
    peer = SMTPPeer().start()
    peer.handler.rcpt_reply = "550 5.1.1 no such user"
    try:
        server = make_server(relay_toml(dns_server, peer.port))
        submit(server, "nobody@remote.test")
        new = server.maildir("s@example.org") / "new"
        files = wait_until(lambda: new.exists() and list(new.iterdir()))
        assert files, server.log()
        report = email.message_from_bytes(files[0].read_bytes(), policy=email.policy.default)
        assert report.get_content_type() == "multipart/report"
        assert report.get_param("report-type") == "delivery-status"
        block = report.get_payload()[1].get_payload()[1]
        assert block["Final-Recipient"] == "rfc822; nobody@remote.test"
        assert block["Action"] == "failed" and block["Status"] == "5.1.1"
    finally:
        peer.stop()


def test_kill_9_with_100_queued_loses_nothing(make_server, dns_server):
    port = free_port()  # the peer is down
    server = make_server(relay_toml(dns_server, port))
    submit(server, "many@remote.test", count=100)
    queue = server.queue_path / "messages"  # one file each, whole entries or not
    assert len(list(queue.iterdir())) == 100
    server.kill()
    server.start()
    peer = SMTPPeer(port).start()
    try:
        messages = peer.wait_for(100, timeout=90)
        subjects = {data.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0] for _, _, data in messages}
        assert subjects == {b"hi %d" % i for i in range(100)}
        assert wait_until(lambda: not list(queue.iterdir()), timeout=30)
    finally:
        peer.stop()


def test_queue_commands_against_a_running_server(make_server, dns_server):
    port = free_port()  # the peer is down
    server = make_server(relay_toml(dns_server, port))
    submit(server, "a@remote.test", count=2)
    listing = wait_until(lambda: "4.4.1" in (out := server.cli("queue", "list").stdout) and out)
    assert "<s@example.org>" in listing and "a@remote.test" in listing
    ids = [line.split()[0] for line in listing.splitlines()[1:-1]]
    assert len(ids) == 2
    shown = server.cli("queue", "show", ids[0])
    assert shown.returncode == 0 and "Subject: hi" in shown.stdout
    bad = server.cli("queue", "show", "NOSUCHID")
    assert bad.returncode == 1 and "no queued message NOSUCHID" in bad.stderr
    assert server.cli("queue", "delete", "NOSUCHID").returncode == 1
    assert server.cli("queue", "delete", ids[0]).returncode == 0
    assert wait_until(lambda: ids[0] not in server.cli("queue", "list").stdout)
    peer = SMTPPeer(port).start()
    try:
        assert server.cli("queue", "flush", "--domain", "remote.test").returncode == 0
        assert len(peer.wait_for(1)) == 1
        assert wait_until(lambda: "empty" in server.cli("queue", "list").stdout)
    finally:
        peer.stop()


def test_with_workers_mail_a_worker_queued_is_relayed_at_once(make_server, dns_server):
    """
    Every process sends what it queued itself, so a message a worker took
    leaves at once, not at the primary's next scan of the queue folder
    (here ten minutes away).
    """
    import re

    from mailserver.message_ids import writer_pid

    peer = SMTPPeer().start()
    try:
        server = make_server("workers = 2\n" + relay_toml(dns_server, peer.port, scan="600"))
        writers = set()
        for n in range(40):
            submit(server, "user@remote.test", subject=f"w{n}")
            [*_, (_, _, data)] = peer.wait_for(n + 1, timeout=10)
            assert len(peer.handler.messages) == n + 1, f"message {n} not relayed within 10 s"
            queue_id = re.search(rb"\bid ([0-9A-Z]{16})\b", data).group(1).decode()
            writers.add(writer_pid(queue_id))
            if len(writers) == 2:
                break
        assert len(writers) == 2, "the kernel gave every connection to one process"
    finally:
        peer.stop()


def _submit_one(server: MailServer, n: int) -> str:
    """
    One message on its own connection (the kernel picks the process);
    returns the queue id from the 250.
    """
    import re

    with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30) as client:
        client.login("s@example.org", "secret")
        client.mail("s@example.org")
        client.rcpt("user@remote.test")
        code, text = client.data(f"Subject: m{n}\r\n\r\nbody {n}\r\n".encode())
    assert code == 250, text
    return re.search(rb"[0-9A-Z]{16}", text).group(0).decode()


def _until_both_processes_queued(server: MailServer) -> tuple[list[str], set[int]]:
    from mailserver.message_ids import writer_pid

    ids: list[str] = []
    for n in range(40):
        ids.append(_submit_one(server, n))
        writers = {writer_pid(i) for i in ids}
        if len(writers) == 2:
            return ids, writers
    raise AssertionError("the kernel gave every connection to one process")


def test_with_workers_what_a_worker_could_not_send_is_retried_by_the_primary(
        make_server, dns_server):
    """
    Every process sends what it queued itself; a worker hands over what is
    left (here: the peer says 451) and the primary retries it: each message
    arrives once.
    """
    peer = SMTPPeer().start()
    peer.handler.data_reply = "451 4.3.0 not now"
    try:
        server = make_server("workers = 2\n" + relay_toml(dns_server, peer.port, scan="600"))
        ids, _ = _until_both_processes_queued(server)
        peer.handler.data_reply = None
        peer.wait_for(len(ids), timeout=30)
        subjects = sorted(m[2].split(b"Subject: ")[1].split(b"\r\n")[0]
                          for m in peer.handler.messages)
        assert subjects == sorted(f"m{n}".encode() for n in range(len(ids))), subjects
        assert wait_until(lambda: "empty" in server.cli("queue", "list").stdout)
    finally:
        peer.stop()


def test_etrn_at_a_worker_has_the_primary_try_its_queue_now(make_server, dns_server):
    """
    With workers the queue is the primary's: ETRN at a worker is passed on
    to it (250, the count being the primary's to know), and the deferred
    mail goes out at once, not at its retry an hour later.
    """
    peer = SMTPPeer().start()
    peer.handler.data_reply = "451 4.3.0 not now"
    try:
        toml = relay_toml(dns_server, peer.port, scan="600").replace(
            'retry_schedule = ["1s"]\nmax_retry_interval = "2s"',
            'retry_schedule = ["1h"]\nmax_retry_interval = "1h"')
        server = make_server("workers = 2\n" + toml)
        ids, _ = _until_both_processes_queued(server)
        assert wait_until(lambda: peer.handler.refused_data >= len(ids), timeout=20)
        time.sleep(2)  # the workers hand what they deferred to the primary
        peer.handler.data_reply = None
        answers = []
        for _ in range(40):
            with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as client:
                client.ehlo("etrn.test")
                # Nothing is queued for it: the primary says 251, a worker 250.
                code, _ = client.docmd("ETRN", "nothing-queued.test")
                answers.append(code)
                if code == 250:
                    assert client.docmd("ETRN", "remote.test")[0] == 250
                    break
        assert answers[-1] == 250 and set(answers) <= {250, 251}, answers
        peer.wait_for(len(ids), timeout=20)
        assert sorted(m[2].split(b"Subject: ")[1].split(b"\r\n")[0]
                      for m in peer.handler.messages) == sorted(
            f"m{n}".encode() for n in range(len(ids)))
    finally:
        peer.stop()


def test_a_worker_killed_while_sending_loses_nothing(make_server, dns_server):
    """
    The peer holds every connection without a greeting; a worker is killed
    in the middle of sending what it queued; the primary takes in what that
    worker wrote, and once the peer answers, every message arrives once.
    """
    import os
    import signal
    import socket
    import threading

    from mailserver.message_ids import writer_pid

    port = free_port()
    stall = socket.socket()
    stall.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    stall.bind(("127.0.0.1", port))
    stall.listen(100)
    held = []

    def hold():
        while True:
            try:
                held.append(stall.accept()[0])
            except OSError:
                return

    threading.Thread(target=hold, daemon=True).start()
    peer = None
    try:
        server = make_server(
            "workers = 2\n" + relay_toml(dns_server, port, scan="600")
            + "command_timeout = 3.0\n")
        ids, writers = _until_both_processes_queued(server)
        worker = next(pid for pid in writers if pid != server.process.pid)
        assert wait_until(lambda: len(held) >= 2, timeout=10)  # both are sending
        os.kill(worker, signal.SIGKILL)
        time.sleep(0.5)
        stall.shutdown(socket.SHUT_RDWR)  # wakes the accept() of the thread
        stall.close()
        for conn in held:
            conn.close()
        peer = SMTPPeer(port).start()
        peer.wait_for(len(ids), timeout=60)
        time.sleep(1)  # a second copy would come now
        subjects = sorted(m[2].split(b"Subject: ")[1].split(b"\r\n")[0]
                          for m in peer.handler.messages)
        assert subjects == sorted(f"m{n}".encode() for n in range(len(ids))), subjects
        assert wait_until(lambda: "empty" in server.cli("queue", "list").stdout)
        assert any(writer_pid(i) == worker for i in ids)
    finally:
        if peer is not None:
            peer.stop()
        stall.close()
