"""
Screening at connection in a real SMTP session (StringTransport and a fake
clock): the greeting delay, the early-talker refusal, DNS blocklist and
allowlist verdicts (from a resolver double; the real DNS path is
tests/protocol/test_dnsbl_loopback.py), who is exempt, and the
smtp.rejected event and smtp_refusals_total count every refusal gets from
the SMTP session, as any other refusal.
"""

from __future__ import annotations

import dataclasses

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock
import pytest
from twisted.logger import formatEvent, globalLogPublisher
from twisted.names import dns, error

from mailserver.config import Checks
from mailserver.config.values import ListedAction, dnsbl_site, network
from mailserver.defences import defence_hooks
from mailserver.hooks import Hooks
from mailserver.smtp import SMTPDependencies, SMTPFactory
from mailserver.testing import REMOTE, FakeAccounts, MemoryIntake, SMTPHarness, make_config, make_portal

LISTED = IPv4Address("TCP", "192.0.2.66", 40002)
TRUSTED = IPv4Address("TCP", "192.0.2.77", 40003)


class ListResolver:
    """
    Answers A queries from a dict of names; anything else is NXDOMAIN.
    """

    def __init__(self, records: dict[str, str]) -> None:
        self.records = records
        self.asked: list[str] = []

    def lookupAddress(self, name, timeout=None):
        self.asked.append(name)
        if name not in self.records:
            return defer.fail(error.DNSNameError(name))
        record = dns.RRHeader(name.encode(), dns.A, dns.IN, 60, dns.Record_A(self.records[name]))
        return defer.succeed(([record], [], []))


RESOLVER = {
    "66.2.0.192.bl.test": "127.0.0.2",
    "66.2.0.192.other.test": "127.0.0.9",  # outside other.test's filter
    "77.2.0.192.wl.test": "127.0.9.2",
}


@pytest.fixture(autouse=True)
def logged():
    """
    Every event logged during a test, for L{Screened}.
    """
    _LOGGED.clear()
    globalLogPublisher.addObserver(_LOGGED.append)
    yield
    globalLogPublisher.removeObserver(_LOGGED.append)


_LOGGED: list[dict] = []


class Screened:
    """
    A factory for one role with the defences of C{checks}, on a fake clock,
    and the refusals the session logged and counted.
    """

    def __init__(self, tmp_path, role="smtp", mx_auth=False, **checks) -> None:
        checks.setdefault("skip_networks", ())
        self.config = make_config(checks=Checks(**checks), smtp={"mx_auth": mx_auth})
        self.clock = MemoryReactorClock()
        self.resolver = ListResolver(RESOLVER)
        defences, _ = defence_hooks(
            checks=self.config.checks, limits=self.config.limits,
            store_path=tmp_path / "d.sqlite", resolver=self.resolver, reactor=self.clock,
            run=lambda operation, *args: defer.maybeDeferred(operation, *args),
        )
        self.hooks = Hooks(defences)
        self.factory = SMTPFactory(SMTPDependencies.for_listener(
            role=role, hostname=self.config.hostname, smtp=self.config.smtp,
            limits=self.config.limits, accounts=FakeAccounts(self.config, ["bob@example.org"]),
            portal=make_portal(**{"bob@example.org": "secret"}), intake=MemoryIntake(),
            tls_options=None, reactor=self.clock, hooks=self.hooks,
        ))

    @property
    def events(self) -> list[dict]:
        return [e for e in _LOGGED if e.get("event") == "smtp.rejected"]

    @property
    def refusals(self) -> list[str]:
        """
        The reasons of the logged refusals, each checked to be counted.
        """
        reasons = [e["reason"] for e in self.events]
        counter = self.factory.dependencies.metrics.smtp_refusals_total
        for reason in set(reasons):
            assert counter.value(role=self.factory.dependencies.metrics_role,
                                 reason=reason) == reasons.count(reason)
        return reasons

    def connect(self, peer=REMOTE) -> SMTPHarness:
        return SMTPHarness(factory=self.factory, peer=peer)


SITES = (dnsbl_site("bl.test=127.0.0.[2..8]*2"), dnsbl_site("other.test=127.0.0.2"),
         dnsbl_site("wl.test=127.0.[0..255].[1..3]*-3"))


def test_the_greeting_waits_the_delay(tmp_path):
    screened = Screened(tmp_path, greet_delay=2.0)
    session = screened.connect()
    assert session.greeting == b""
    screened.clock.advance(1.9)
    assert session.read() == b""
    screened.clock.advance(0.1)
    assert session.read().startswith(b"220 mx.example.org ESMTP")
    assert session.ehlo().startswith(b"250-mx.example.org")
    assert screened.refusals == []


def test_a_client_that_talks_before_the_greeting_is_refused_and_logged(tmp_path):
    screened = Screened(tmp_path, greet_delay=2.0)
    session = screened.connect()
    session.send(b"EHLO early.example\r\nMAIL FROM:<a@example.net>\r\n")
    screened.clock.advance(2.0)
    replies = session.read()
    assert replies == (b"554 5.5.0 Error: SMTP protocol synchronization"
                       b" (talked before the greeting)\r\n")
    assert session.closed
    assert screened.refusals == ["pregreet"]
    [event] = screened.events
    assert formatEvent(event) == (
        "refused command=CONNECT, code=554, enhanced=5.5.0, reason=pregreet,"
        " reply=Error: SMTP protocol synchronization (talked before the greeting),"
        " client=203.0.113.9, helo=, user="
    )


def test_a_listed_client_is_refused_naming_the_list(tmp_path):
    screened = Screened(tmp_path, dnsbl=SITES)
    session = screened.connect(LISTED)
    assert session.greeting == (
        b"554 5.7.1 Service unavailable; client [192.0.2.66] blocked using bl.test\r\n")
    assert session.closed
    assert screened.refusals == ["dnsbl"]
    assert sorted(screened.resolver.asked) == [
        "66.2.0.192.bl.test", "66.2.0.192.other.test", "66.2.0.192.wl.test"]


def test_the_listing_can_be_a_temporary_refusal(tmp_path):
    screened = Screened(tmp_path, dnsbl=SITES, dnsbl_action=ListedAction.DEFER)
    session = screened.connect(LISTED)
    assert session.greeting.startswith(b"450 4.7.1 Service unavailable; client [192.0.2.66]")


def test_weights_below_the_threshold_are_not_a_listing(tmp_path):
    screened = Screened(tmp_path, dnsbl=SITES, dnsbl_threshold=3)
    session = screened.connect(LISTED)
    assert session.greeting.startswith(b"220 ")


def test_an_allowlisted_client_is_greeted_at_once(tmp_path):
    screened = Screened(tmp_path, dnsbl=SITES, greet_delay=5.0)
    session = screened.connect(TRUSTED)
    assert session.greeting.startswith(b"220 ")
    stranger = screened.connect()
    assert stranger.greeting == b""  # not listed, not trusted: waits


def test_submission_and_skipped_networks_are_not_screened(tmp_path):
    screened = Screened(tmp_path, role="submission", dnsbl=SITES, greet_delay=5.0)
    assert screened.connect(LISTED).greeting.startswith(b"220 ")
    screened = Screened(tmp_path, dnsbl=SITES, greet_delay=5.0,
                        skip_networks=(network("192.0.2.0/24"),))
    assert screened.connect(LISTED).greeting.startswith(b"220 ")
    assert screened.resolver.asked == []


def test_a_verdict_is_remembered_for_the_next_connection(tmp_path):
    screened = Screened(tmp_path, dnsbl=SITES)
    screened.connect(LISTED)
    asked = len(screened.resolver.asked)
    assert screened.connect(LISTED).greeting.startswith(b"554 5.7.1")
    assert len(screened.resolver.asked) == asked


def test_greylisting_in_the_session(tmp_path):
    screened = Screened(tmp_path, greylist=True, greylist_delay=60.0)
    session = screened.connect()
    session.ehlo()
    assert session.command("MAIL FROM:<a@example.net>").startswith(b"250 ")
    assert session.command("RCPT TO:<bob@example.org>") == (
        b"451 4.7.1 Greylisted, please try again in 60 seconds\r\n")
    assert screened.refusals == ["greylist"]
    [event] = screened.events
    assert "helo=client.example.net" in formatEvent(event)


def test_an_authenticated_client_on_the_mx_port_is_not_greylisted(tmp_path):
    screened = Screened(tmp_path, mx_auth=True, greylist=True, greylist_delay=60.0)
    session = screened.connect(IPv4Address("TCP", "127.0.0.1", 40009))  # AUTH over loopback
    session.ehlo()
    assert session.login().startswith(b"235 ")
    session.command("MAIL FROM:<bob@example.org>")
    assert session.command("RCPT TO:<bob@example.org>").startswith(b"250 ")


def test_the_checks_default_to_off(tmp_path):
    checks = dataclasses.asdict(Checks())
    assert (checks["dnsbl"], checks["greet_delay"], checks["greylist"]) == ((), 0.0, False)
    screened = Screened(tmp_path)
    assert screened.connect().greeting.startswith(b"220 ")


def test_a_list_named_twice_is_asked_once_and_both_weights_count(tmp_path):
    sites = (dnsbl_site("bl.test=127.0.0.2*2"), dnsbl_site("bl.test=127.0.0.[2..9]*1"))
    screened = Screened(tmp_path, dnsbl=sites, dnsbl_threshold=3)
    assert screened.connect(LISTED).greeting.startswith(b"554 5.7.1")
    assert screened.resolver.asked == ["66.2.0.192.bl.test"]
    screened = Screened(tmp_path, dnsbl=sites, dnsbl_threshold=4)
    assert screened.connect(LISTED).greeting.startswith(b"220 ")
