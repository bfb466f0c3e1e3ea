"""
The relay over real sockets, without the SMTP server: a child process runs
the queue, the runner, MX lookup against the loopback DNS server and the
SMTP client against the aiosmtpd peer, with the real reactor.
"""

from __future__ import annotations

import email
import email.policy
import subprocess
import sys
import textwrap

import pytest

from relay_fixtures import SMTPPeer

DRIVER = textwrap.dedent(
    '''
    import sys
    from twisted.internet import reactor, task
    from twisted.logger import globalLogBeginner, textFileLogObserver
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    from mailserver.config import load
    from mailserver.envelope import Envelope, Recipient
    from mailserver.from_config import accounts_for
    from mailserver.intake import Intake
    from mailserver.relay import QueueStore, RelayRunner

    config = load(sys.argv[1])
    accounts = accounts_for(config)
    if "s@example.org" not in accounts.users():
        accounts.add_user("s@example.org", "pw")
    queue = QueueStore(config.queue_path)
    intake = Intake(accounts=accounts, reactor=reactor, data_path=config.data_path,
                    hostname=config.hostname, min_free_space=config.limits.min_free_space,
                    queue=queue)
    runner = RelayRunner(relay=config.relay, hostname=config.hostname,
                         mta_sts_path=config.mta_sts_path, queue=queue,
                         intake=intake, reactor=reactor, accounts=accounts)
    count, size = int(sys.argv[2]), int(sys.argv[3])

    def send():
        for i in range(count):
            receiver = intake.begin(Envelope(sender="s@example.org", recipients=(
                Recipient(address=f"user{i}@remote.test", destinations=(f"user{i}@remote.test",)),
                Recipient(address="other@remote.test", destinations=("other@remote.test",)))))
            body = b"Subject: test %d\\r\\n\\r\\n" % i + b".\\r\\n" + (b"x" * 76 + b"\\r\\n.\\r\\n") * (size // 81) + b"end\\r\\n"
            receiver.write(body)
            d = receiver.finish()
            d.addCallback(lambda _: accepted.append(1))
            d.addErrback(lambda f: print("intake failed", f, file=sys.stderr))

    # Stop once every message was accepted (relayed mail is queued inside
    # the intake's group commit, so an empty queue before that means
    # nothing yet) and the queue has emptied.
    accepted = []

    def check():
        if len(accepted) == count and not queue.ids() and reactor.seconds() - started > 1:
            reactor.stop()

    started = reactor.seconds()
    runner.startService()
    reactor.callLater(0, send)
    task.LoopingCall(check).start(0.2)
    reactor.callLater(60, reactor.stop)
    reactor.run()
    print("left", len(queue.ids()))
    '''
)


def run_driver(tmp_path, toml: str, count: int = 1, size: int = 10):
    config = tmp_path / "c.toml"
    config.write_text(
        f'hostname = "mx.test"\ndata_dir = "{tmp_path / "data"}"\n'
        f'local_domains = ["example.org"]\n{toml}'
    )
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    from harness import environment

    return subprocess.run(
        [sys.executable, str(script), str(config), str(count), str(size)],
        capture_output=True, text=True, timeout=90, env=environment(),
    )


@pytest.fixture
def peer():
    peer = SMTPPeer().start()
    yield peer
    peer.stop()


def test_found_through_mx_and_delivered_in_one_transaction(tmp_path, dns_server, peer):
    # 200 KiB body crosses many 64 KiB chunk boundaries; "." lines survive.
    result = run_driver(
        tmp_path,
        f'[relay]\nresolver = "{dns_server.resolver}"\nport = {peer.port}\n',
        size=200_000,
    )
    assert result.stdout.strip().endswith("left 0"), result.stdout + result.stderr
    [(sender, rcpts, data)] = peer.messages
    assert sender == "s@example.org"
    assert sorted(rcpts) == ["other@remote.test", "user0@remote.test"]
    assert data == b"Subject: test 0\r\n\r\n.\r\n" + (b"x" * 76 + b"\r\n.\r\n") * (200_000 // 81) + b"end\r\n"
    assert data.endswith(b"\r\n.\r\nend\r\n")
    assert b"Return-Path" not in data


def test_5xx_from_peer_bounces_into_the_senders_maildir(tmp_path, dns_server, peer):
    peer.handler.rcpt_reply = "550 5.1.1 no such user here"
    result = run_driver(
        tmp_path, f'[relay]\nresolver = "{dns_server.resolver}"\nport = {peer.port}\n'
    )
    assert result.stdout.strip().endswith("left 0"), result.stdout + result.stderr
    folder = tmp_path / "data" / "mail" / "example.org" / "s" / "new"
    new = list(folder.iterdir()) if folder.exists() else []
    assert len(new) == 1, result.stdout + result.stderr
    report = email.message_from_bytes(new[0].read_bytes(), policy=email.policy.default)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    blocks = report.get_payload()[1].get_payload()[1:]
    assert sorted(b["Final-Recipient"] for b in blocks) == [
        "rfc822; other@remote.test", "rfc822; user0@remote.test"]
    assert {b["Status"] for b in blocks} == {"5.1.1"}
    assert {b["Remote-MTA"] for b in blocks} == {"dns; mx1.remote.test"}
