"""
Verified outbound TLS in the real C{twistd mailserver} process (issue 20):
a smarthost with AUTH whose certificate the server cannot verify gets no
AUTH line and the message waits, named by C{mailserver queue show}; MTA-STS
policies from a loopback HTTPS server, resolved through the loopback zone,
enforced, tested and remembered across a restart.

The peers are child processes (L{tests.tls_peer}) with certificates from a CA
made in the test (L{tests.tls_ca}); each records every line it receives.
"""

from __future__ import annotations

import json
import smtplib
import urllib.request

import pytest

from harness import MailServer
from relay_fixtures import DNSServer, wait_until
from tests.tls_ca import CA
from tests.tls_peer import PolicyServerProcess, SMTPSinkProcess

RELAY = (
    'retry_schedule = ["1s"]\nmax_retry_interval = "1s"\nscan_interval = 0.5\n'
    "connect_timeout = 5.0\ncommand_timeout = 10.0\n"
)


@pytest.fixture
def stop_later():
    started = []
    yield started.append
    for thing in reversed(started):
        thing.stop()


def start_server(tmp_path, relay_toml: str, stop_later) -> MailServer:
    server = MailServer(tmp_path, local_domains=("localhost", "example.org"),
                        extra_toml="[smtp]\nauth_over_plaintext = true\n[relay]\n" + RELAY
                        + relay_toml)
    server.start()
    stop_later(server)
    return server


def submit(server: MailServer, *recipients: str) -> None:
    with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30) as client:
        client.login("s@example.org", "secret")
        for to in recipients:
            client.sendmail("s@example.org", [to],
                            f"From: s@example.org\r\nTo: {to}\r\nSubject: to {to}\r\n\r\nhi\r\n")


def envelopes(server: MailServer) -> dict[str, dict]:
    """
    The queue's envelopes by first recipient, read from the data folder
    (cheaper to poll than the CLI).
    """
    found = {}
    for path in (server.queue_path / "envelopes").glob("*.json"):
        try:
            envelope = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # being replaced
        found[envelope["recipients"][0]["address"]] = envelope
    return found


def last_error(server: MailServer, recipient: str, words: str, after: int = 0) -> str:
    """
    C{mailserver queue show} of the message to C{recipient} once its last
    error holds C{words} (after more than C{after} attempts).
    """
    def check():
        envelope = envelopes(server).get(recipient)
        return (envelope is not None and envelope["attempts"] > after
                and words in envelope["last_error"] and envelope)

    envelope = wait_until(check, timeout=30)
    assert envelope, f"{recipient}: {words!r} not in {envelopes(server)}\n{server.log()[-3000:]}"
    shown = server.cli("queue", "show", envelope["id"]).stdout
    [line] = [line for line in shown.splitlines() if line.startswith("last error: ")]
    assert words in line, shown
    return shown


def test_smarthost_certificate_is_verified_before_auth(tmp_path, stop_later):
    ca = CA()
    ca_file = ca.write(tmp_path / "certs" / "ca.pem")
    good = ca.issue("127.0.0.1").write(tmp_path / "certs", "good")
    other_name = ca.issue("smtp.elsewhere.test").write(tmp_path / "certs", "other-name")

    def smarthost(name: str, cert) -> SMTPSinkProcess:
        sink = SMTPSinkProcess(tmp_path / name, *cert)
        stop_later(sink)
        return sink

    def relay_toml(sink, trusted: bool) -> str:
        return (f'smarthost = "127.0.0.1:{sink.port}"\nsmarthost_username = "relay@example.org"\n'
                'smarthost_password = "relay-password"\n'
                + (f'ca_file = "{ca_file}"\n' if trusted else ""))

    def assert_no_auth(sink) -> None:
        lines = [line for _, line in sink.lines]
        assert lines and lines == ["EHLO mx.test", "STARTTLS"] * (len(lines) // 2), lines
        assert sink.messages == []

    # The test CA is not in the system's trust store: an unknown CA.
    unknown = smarthost("unknown-ca", good)
    server = start_server(tmp_path, relay_toml(unknown, trusted=False), stop_later)
    server.add_user("s@example.org", "secret")
    submit(server, "user@remote.test")
    text = last_error(server, "user@remote.test",
                      "certificate verify failed: unable to get local issuer certificate")
    assert "4.7.5 TLS with 127.0.0.1 [127.0.0.1]" in text
    assert wait_until(lambda: len(unknown.lines) >= 4)  # a second attempt, the same
    assert_no_auth(unknown)
    server.stop()

    # Trusted CA, but the certificate names another host.
    mismatch = smarthost("other-name", other_name)
    server = start_server(tmp_path, relay_toml(mismatch, trusted=True), stop_later)
    text = last_error(server, "user@remote.test",
                      "hostname mismatch: the certificate does not name 127.0.0.1")
    assert_no_auth(mismatch)
    server.stop()

    # Trusted CA and the right name: delivered, AUTH over TLS only.
    right = smarthost("right", good)
    server = start_server(tmp_path, relay_toml(right, trusted=True), stop_later)
    assert wait_until(lambda: right.messages), server.log()[-3000:]
    [(sender, recipients, _)] = right.messages
    assert (sender, recipients) == ("s@example.org", ["user@remote.test"])
    assert [state for state, line in right.lines if line.startswith("AUTH")] == ["tls"]
    assert [line for state, line in right.lines if state == "plain"] == [
        "EHLO mx.test", "STARTTLS"]
    assert wait_until(lambda: "empty" in server.cli("queue", "list").stdout)
    assert_no_auth(unknown)
    assert_no_auth(mismatch)


def policy(mode: str, mx: str) -> str:
    return f"version: STSv1\nmode: {mode}\nmx: {mx}\nmax_age: 86400\n"


def test_mta_sts_enforce_testing_and_the_cache_across_a_restart(tmp_path, stop_later):
    """
    One SMTP sink with a certificate for mx.good.test serves every MX host:
    a.test (enforce, policy names another MX), b.test (enforce, MX host
    mx.bad.test: the certificate does not name it), c.test (testing, same
    MX) and d.test (enforce, all good).
    """
    ca = CA()
    ca_file = ca.write(tmp_path / "certs" / "ca.pem")
    domains = ("a.test", "b.test", "c.test", "d.test")
    zone = {"mx.good.test": {"A": ["127.0.0.1"]}, "mx.bad.test": {"A": ["127.0.0.1"]}}
    for domain in domains:
        mx = "mx.bad.test" if domain in ("b.test", "c.test") else "mx.good.test"
        zone[domain] = {"MX": [[10, mx]]}
        zone[f"_mta-sts.{domain}"] = {"TXT": ["v=STSv1; id=20261206"]}
        zone[f"mta-sts.{domain}"] = {"A": ["127.0.0.1"]}
    dns = DNSServer(zone)
    stop_later(dns)
    sink = SMTPSinkProcess(tmp_path / "sink", *ca.issue("mx.good.test").write(tmp_path / "certs",
                                                                               "mx"))
    stop_later(sink)
    web = PolicyServerProcess(
        tmp_path / "web", *ca.issue(*(f"mta-sts.{d}" for d in domains)).write(
            tmp_path / "certs", "web"),
        {"mta-sts.a.test": policy("enforce", "mx.other.test"),
         "mta-sts.b.test": policy("enforce", "*.bad.test"),
         "mta-sts.c.test": policy("testing", "mx.bad.test"),
         "mta-sts.d.test": policy("enforce", "mx.good.test")},
    )
    relay_toml = (f'resolver = "{dns.resolver}"\nport = {sink.port}\nca_file = "{ca_file}"\n'
                  f"mta_sts_port = {web.port}\n")
    server = start_server(tmp_path, relay_toml, stop_later)
    server.add_user("s@example.org", "secret")
    submit(server, *(f"user@{d}" for d in domains))

    last_error(server, "user@a.test", "MTA-STS: mx not in policy: mx.good.test")
    shown = last_error(server, "user@b.test", "MTA-STS: TLS with mx.bad.test [127.0.0.1]")
    assert "hostname mismatch: the certificate does not name mx.bad.test" in shown
    delivered = wait_until(lambda: len(sink.messages) == 2 and sink.messages)
    assert delivered, server.log()[-3000:]
    assert sorted(rcpts[0] for _, rcpts, _ in delivered) == ["user@c.test", "user@d.test"]
    log = server.log()
    assert "MTA-STS testing: would have failed domain=c.test, host=mx.bad.test, " \
           "address=127.0.0.1, reason=hostname mismatch" in log
    # Never in clear text: every transaction went over TLS, none for a or b.
    commands = [(state, line) for state, line in sink.lines
                if line.split(":")[0] in ("MAIL FROM", "RCPT TO", "DATA")]
    assert commands and {state for state, _ in commands} == {"tls"}
    assert not [line for _, line in sink.lines if "@a.test" in line or "@b.test" in line]
    assert sorted(web.requests) == [f"mta-sts.{d}" for d in domains]
    cached = sorted(p.name for p in (server.data_path / "mta-sts").iterdir())
    assert cached == [f"{d}.json" for d in domains]
    metrics = urllib.request.urlopen(
        f"http://127.0.0.1:{server.ports['admin']}/metrics", timeout=10).read().decode()
    for sample in ('{domain="a.test",mode="enforce",result="mx-not-in-policy"}',
                   '{domain="b.test",mode="enforce",result="certificate-host-mismatch"}',
                   '{domain="c.test",mode="testing",result="certificate-host-mismatch"}',
                   '{domain="d.test",mode="enforce",result="success"}'):
        assert "relay_tls_policy_total" + sample in metrics, metrics

    # A restart with the policy server gone: the cached policies still hold.
    before = {r: e["attempts"] for r, e in envelopes(server).items()}
    assert set(before) == {"user@a.test", "user@b.test"}
    server.stop()
    web.stop()
    seen = len(sink.lines)
    log_before = len(server.log())
    server.start()
    last_error(server, "user@a.test", "MTA-STS: mx not in policy: mx.good.test",
               after=before["user@a.test"])
    last_error(server, "user@b.test", "MTA-STS: TLS with mx.bad.test [127.0.0.1]",
               after=before["user@b.test"])
    assert "no policy for" not in server.log()[log_before:]
    assert sorted(web.requests) == [f"mta-sts.{d}" for d in domains]  # no new fetch
    later = sink.lines[seen:]
    assert later, "b.test's MX host was not tried again"
    assert [line for _, line in later] == ["EHLO mx.test", "STARTTLS"] * (len(later) // 2)
    assert len(sink.messages) == 2
