"""
Faults in the real C{twistd mailserver} process: corrupt queue files are set
aside at start while the good messages go out, and a peer that drops the
connection in the middle of DATA gets the message on the next attempt.
"""

from __future__ import annotations

import json
import shutil

import pytest

from harness import MailServer
from relay_fixtures import SMTPPeer, free_port, wait_until
from tests.flaky_peer import PeerProcess

from mailserver.relay.queue import QueueStore

@pytest.fixture
def mail_server(tmp_path):
    started = []

    def make(dns_server, port: int) -> MailServer:
        server = MailServer(
            tmp_path, local_domains=("localhost", "example.org"),
            extra_toml=(
                "[smtp]\nauth_over_plaintext = true\n"
                f'[relay]\nresolver = "{dns_server.resolver}"\nport = {port}\n'
                'retry_schedule = ["1s"]\nmax_retry_interval = "2s"\nscan_interval = 0.5\n'
                "connect_timeout = 2.0\ncommand_timeout = 2.0\ndata_timeout = 2.0\n"
            ),
        )
        server.start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


def submit(server: MailServer, to: str, count: int = 1) -> None:
    import smtplib

    with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30) as client:
        client.login("s@example.org", "secret")
        for i in range(count):
            client.sendmail("s@example.org", [to],
                            f"From: s@example.org\r\nTo: {to}\r\nSubject: hi {i}\r\n\r\n"
                            f"body {i}\r\n".encode())


def test_corrupt_queue_files_are_set_aside_and_the_good_ones_delivered(mail_server,
                                                                         dns_server):
    port = free_port()  # the peer is down: the mail stays queued
    server = mail_server(dns_server, port)
    server.add_user("s@example.org", "secret")
    submit(server, "user@remote.test", count=2)
    queue = server.queue_path
    assert wait_until(lambda: "4.4.1" in server.cli("queue", "list").stdout)
    server.stop()

    # Next to the two good messages: a truncated envelope, one of an unknown
    # version and one whose message file is gone.
    good = sorted(p.name for p in (queue / "messages").iterdir())
    assert len(good) == 2
    text = QueueStore(queue).load(good[0]).to_json()  # a whole entry's, or its own file's
    data = json.loads(text)
    (queue / "envelopes" / "TRUNCATED.json").write_text(text[: len(text) // 2])
    shutil.copy(queue / "messages" / good[0], queue / "messages" / "TRUNCATED")
    (queue / "envelopes" / "FUTURE.json").write_text(json.dumps(dict(data, id="FUTURE",
                                                                     version=7)))
    shutil.copy(queue / "messages" / good[0], queue / "messages" / "FUTURE")
    (queue / "envelopes" / "NOMESSAGE.json").write_text(json.dumps(dict(data, id="NOMESSAGE")))

    listing = server.cli("queue", "list")
    assert listing.returncode == 0, listing.stderr
    assert "2 message(s)" in listing.stdout
    assert "3 corrupt envelope(s)" in listing.stdout
    assert "TRUNCATED: not valid JSON" in listing.stdout
    shown = server.cli("queue", "show", "FUTURE")
    assert shown.returncode == 1 and "Traceback" not in shown.stderr
    assert "queued message FUTURE is corrupt: unknown envelope version 7" in shown.stderr

    peer = SMTPPeer(port).start()
    try:
        server.start()
        messages = peer.wait_for(2)
        assert sorted(data.split(b"Subject: ")[1][:4] for _, _, data in messages) == [
            b"hi 0", b"hi 1"]
        assert wait_until(lambda: not list((queue / "messages").iterdir()))
        assert not list((queue / "envelopes").iterdir())
    finally:
        peer.stop()
    corrupt = sorted(p.name for p in (queue / "corrupt").iterdir())
    assert corrupt == ["FUTURE", "FUTURE.json", "FUTURE.problem", "NOMESSAGE.json",
                       "NOMESSAGE.problem", "TRUNCATED", "TRUNCATED.json", "TRUNCATED.problem"]
    log = server.log()
    for name, problem in (("TRUNCATED", "not valid JSON"),
                          ("FUTURE", "unknown envelope version 7"),
                          ("NOMESSAGE", "its message file is missing")):
        lines = [line for line in log.splitlines()
                 if "is corrupt" in line and f"{name}.json," in line]
        assert len(lines) == 1, log
        assert problem in lines[0] and f"where={queue / 'corrupt' / name}.json" in lines[0]
    assert "Traceback" not in log
    assert server.process.poll() is None
    listing = server.cli("queue", "list").stdout
    assert "the queue is empty" in listing
    assert "3 corrupt entries set aside" in listing and "FUTURE: unknown envelope version 7" in listing


def test_peer_dropping_mid_data_gets_it_on_the_next_attempt(mail_server, dns_server, tmp_path):
    peer = PeerProcess(["drop-in-data", "ok"], tmp_path / "peer")
    try:
        server = mail_server(dns_server, peer.port)
        server.add_user("s@example.org", "secret")
        submit(server, "user@remote.test")
        assert wait_until(lambda: peer.messages), server.log()
        [(sender, recipients, data)] = peer.messages
        assert (sender, recipients) == ("s@example.org", ["user@remote.test"])
        assert b"Subject: hi 0\r\n" in data and data.endswith(b"body 0\r\n")
        assert peer.connections == ["drop-in-data", "ok"]
        assert wait_until(lambda: "empty" in server.cli("queue", "list").stdout)
        assert "4.4.2 connection lost" in server.log()
    finally:
        peer.stop()
