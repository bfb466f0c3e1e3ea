"""
The logs of a real twistd run: with C{--logger=mailserver.logs.json_stdout}
every line is one flat JSON object (time, level, event, message, fields),
with no twisted.logger internals; the text log has the same content, one
line per event.
"""

from __future__ import annotations

import datetime
import json
import poplib
import signal
import smtplib

import pytest

from harness import MailServer
from relay_fixtures import SMTPPeer, wait_until

INTERNALS = ("log_format", "log_flattened", "log_namespace", "log_level", "log_time",
             "log_source", "log_logger", "log_system", "log_io", "log_text", "log_legacy")


@pytest.fixture
def peer():
    smtp_peer = SMTPPeer().start()
    yield smtp_peer
    smtp_peer.stop()


def run_traffic(server: MailServer, peer: SMTPPeer) -> None:
    """
    A bit of everything: mail in, a relayed message and a bounced one,
    POP3 with a failed login, a bad aliases line, a reload.
    """
    server.add_user("bob@example.org", "bob-pw")
    server.add_user("s@example.org", "secret")
    (server.data_path / "aliases").write_text("team@example.org: bob@example.org\nbroken\n")
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as client:
        client.sendmail("alice@remote.test", ["team@example.org"], b"Subject: in\r\n\r\nHi.\r\n")
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            client.sendmail("alice@remote.test", ["x@elsewhere.test"], b"Subject: no\r\n\r\n")
    with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30) as client:
        client.login("s@example.org", "secret")
        client.sendmail("s@example.org", ["ok@remote.test"], b"Subject: out\r\n\r\nHi.\r\n")
    peer.wait_for(1)
    peer.handler.rcpt_reply = "550 5.1.1 no such user"
    with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30) as client:
        client.login("s@example.org", "secret")
        client.sendmail("s@example.org", ["gone@remote.test"], b"Subject: out\r\n\r\nHi.\r\n")
    pop = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=30)
    pop.user("bob@example.org")
    with pytest.raises(poplib.error_proto):
        pop.pass_("wrong")
    pop.quit()
    pop = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=30)
    pop.user("bob@example.org")
    pop.pass_("bob-pw")
    pop.retr(1)
    pop.quit()
    assert wait_until(lambda: "empty" in server.cli("queue", "list").stdout)
    server.process.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "server.reloaded" in server.log())


def make_server(tmp_path, peer, json_log: bool) -> MailServer:
    server = MailServer(
        tmp_path, local_domains=("localhost", "example.org"), json_log=json_log,
        extra_toml=("[smtp]\nauth_over_plaintext = true\n"
                    f'[relay]\ntransports = ["remote.test=127.0.0.1:{peer.port}"]\n'
                    'tls_policies = ["remote.test=none"]\n'
                    "scan_interval = 0.2\n"))
    server.start()
    return server


def test_the_json_log_is_one_flat_object_per_event(tmp_path, peer):
    server = make_server(tmp_path, peer, json_log=True)
    try:
        run_traffic(server, peer)
    finally:
        server.stop()
    events = [json.loads(line) for line in server.log().splitlines()]
    assert len(events) > 20
    for event in events:
        assert list(event)[:4] == ["time", "level", "event", "message"], event
        assert datetime.datetime.fromisoformat(event["time"].replace("Z", "+00:00"))
        assert event["time"].endswith("Z")
        assert event["level"] in ("debug", "info", "warn", "error", "critical")
        assert isinstance(event["message"], str) and "Unable to format" not in event["message"]
        assert not set(event) & set(INTERNALS), event
        for value in event.values():
            assert value != {"unpersistable": True}
            assert isinstance(value, (str, int, float, bool, list, type(None))), event
    named = {}
    for event in events:
        named.setdefault(event["event"], []).append(event)

    [started] = named["server.started"]
    listening = {tuple(line.split()) for line in started["listeners"]}
    assert {("smtp", f"127.0.0.1:{server.ports['smtp']}"),
            ("pop3", f"127.0.0.1:{server.ports['pop3']}")} <= listening
    assert "127.0.0.1" in started["message"]
    # Once when the server saw the file change, once more on the reload.
    for bad_line in named["accounts.bad_line"]:
        assert (bad_line["file"], bad_line["line"]) == (str(server.data_path / "aliases"), 2)
        assert bad_line["level"] == "warn" and bad_line["problem"].startswith("no colon")
    assert len(named["accounts.bad_line"]) == 2

    [sent] = named["relay.sent"]
    assert (sent["sender"], sent["recipient"], sent["code"], sent["dsn"]) == (
        "s@example.org", "ok@remote.test", 250, "2.0.0")
    assert sent["relay"] == "127.0.0.1" and sent["id"] and sent["ms"] >= 0
    assert sent["message"].startswith(f"{sent['id']}: sent to=<ok@remote.test>, "
                                      "from=<s@example.org>, relay=127.0.0.1, code=250")
    [bounced] = named["relay.bounced"]
    assert (bounced["recipient"], bounced["code"], bounced["dsn"], bounced["level"]) == (
        "gone@remote.test", 550, "5.1.1", "warn")
    [report] = named["relay.dsn_sent"]
    assert (report["id"], report["recipient"], report["action"]) == (
        bounced["id"], "s@example.org", "failed")
    assert report["report"]  # the report's own ID, to follow it further
    assert {e["id"] for e in named["relay.removed"]} >= {sent["id"], bounced["id"]}

    [failed_login] = named["pop3.auth_failed"]
    assert (failed_login["user"], failed_login["failures"]) == ("bob@example.org", 1)
    assert failed_login["client"].startswith("127.0.0.1:")
    sessions = named["pop3.session"]
    assert [(s["user"], s["retrieved"]) for s in sessions] == [("-", 0), ("bob@example.org", 1)]
    assert [e["bad_lines"] for e in named["server.reloaded"]] == [1]
    accepted = named["smtp.accepted"]
    assert len(accepted) == 3
    assert all(e["code"] == 250 and e["client"] == "127.0.0.1" for e in accepted)
    assert {sent["id"], bounced["id"]} < {e["id"] for e in accepted}
    assert [e["recipients"] for e in accepted if e["id"] == sent["id"]] == [["ok@remote.test"]]
    assert sorted(e["recipient"] for e in named["local.delivered"]) == [
        "bob@example.org", "s@example.org"]  # team's member, and the report
    [refused] = named["smtp.rejected"]
    assert (refused["command"], refused["code"], refused["enhanced"], refused["reason"],
            refused["recipient"], refused["client"], refused["helo"], refused["user"]) == (
        "RCPT", 554, "5.7.1", "relay-denied", "x@elsewhere.test", "127.0.0.1",
        refused["helo"], "")
    assert refused["level"] == "warn" and refused["helo"]


def test_the_text_log_has_the_same_content_one_line_per_event(tmp_path, peer):
    server = make_server(tmp_path, peer, json_log=False)
    try:
        run_traffic(server, peer)
    finally:
        server.stop()
    lines = server.log().splitlines()
    [sent] = [line for line in lines if "[relay.sent#info]" in line]
    assert " sent to=<ok@remote.test>, from=<s@example.org>, relay=127.0.0.1, code=250, " \
           "dsn=2.0.0, reply=250 2.0.0 OK, ms=" in sent
    bad = [line for line in lines if "[accounts.bad_line#warn]" in line][0]
    assert bad.endswith(f"line skipped file={server.data_path / 'aliases'}, line=2, "
                        "problem=no colon: 'broken' (write alias@domain: target[, target...])")
    sessions = [line for line in lines if "[pop3.session#info]" in line]
    assert len(sessions) == 2 and "user=bob@example.org, client=127.0.0.1:" in sessions[1]
    assert "retrieved=1, octets=" in sessions[1]
