"""
MTA-STS parsing (RFC 8461 3.1, 3.2, 4.1), the durable cache, and the choice
between cache, DNS and fetch, with a fake fetcher and a Clock.
"""

from __future__ import annotations

import json

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from mailserver.relay.mta_sts import (
    MTASTS,
    PolicyCache,
    PolicyError,
    STSPolicy,
    parse_policy,
    policy_domain,
    record_id,
    writer_tag,
)
from mailserver.relay.tls_policy import mx_matches, policy_entry
from tests.dns_zone import ZoneResolver

POLICY = b"version: STSv1\r\nmode: enforce\r\nmx: mx1.remote.test\r\nmx: *.backup.test\r\nmax_age: 86400\r\n"


def test_record_id():
    assert record_id(["v=STSv1; id=20240101T000000"]) == "20240101T000000"
    assert record_id(["v=STSv1;id=abc;"]) == "abc"
    assert record_id(["v=spf1 -all", "v=STSv1; id=a1; ext=x"]) == "a1"
    assert record_id([]) is None
    assert record_id(["v=STSv1; id=a", "v=STSv1; id=b"]) is None  # two: none
    assert record_id(["v=STSv1"]) is None  # no id
    assert record_id(["v=STSv1; id=not-alnum"]) is None
    assert record_id(["v=STSv1; id=" + "a" * 33]) is None
    assert record_id(["v=STSv10; id=a"]) is None


def test_parse_policy():
    assert parse_policy(POLICY) == ("enforce", ("mx1.remote.test", "*.backup.test"), 86400)
    assert parse_policy(b"version: STSv1\nmode: none\nmax_age: 5\n") == ("none", (), 5)
    # The first of a key counts; max_age is capped at a year.
    text = b"version: STSv1\nmode: testing\nmode: enforce\nmx: a.test\nmax_age: 99999999999\n"
    with pytest.raises(PolicyError, match="max_age"):
        parse_policy(text)
    assert parse_policy(text.replace(b"99999999999", b"9999999999"))[0::2] == (
        "testing", 31_557_600)


@pytest.mark.parametrize("text, problem", [
    (b"version: STSv2\nmode: enforce\nmx: a.test\nmax_age: 1\n", "version"),
    (b"version: STSv1\nmode: strict\nmx: a.test\nmax_age: 1\n", "mode"),
    (b"version: STSv1\nmode: enforce\nmax_age: 1\n", "no mx"),
    (b"version: STSv1\nmode: enforce\nmx: a.test\nmax_age: soon\n", "max_age"),
    (b"version: STSv1\nmode: enforce\nmx: a..test\nmax_age: 1\n", "bad mx"),
    (b"<html>not a policy</html>\n", "not key: value"),
    (b"version: STSv1\xff\n", "not UTF-8"),
])
def test_bad_policies(text, problem):
    with pytest.raises(PolicyError, match=problem):
        parse_policy(text)


def test_mx_patterns():
    assert mx_matches("mx1.remote.test", "MX1.remote.test.")
    assert mx_matches("*.remote.test", "mx1.remote.test")
    assert not mx_matches("*.remote.test", "remote.test")
    assert not mx_matches("*.remote.test", "a.mx1.remote.test")
    assert not mx_matches("mx1.remote.test", "mx2.remote.test")


def test_policy_entries_match_the_domain_then_its_parents():
    policies = {"example.org": "verify", ".example.org": "encrypt", ".org": "may"}
    assert policy_entry(policies, "example.org") == ("example.org", "verify")
    assert policy_entry(policies, "a.b.example.org") == (".example.org", "encrypt")
    assert policy_entry(policies, "other.org") == (".org", "may")
    assert policy_entry(policies, "example.net") is None


def test_policy_domains():
    assert policy_domain("Remote.Test.") == "remote.test"
    assert policy_domain("[127.0.0.1]") is None
    assert policy_domain("localhost") is None
    assert policy_domain("bücher.example") == "xn--bcher-kva.example"
    assert policy_domain("a/b.test") is None


def test_cache_round_trip_and_damage(tmp_path):
    cache = PolicyCache(tmp_path / "mta-sts")
    policy = STSPolicy("remote.test", "id1", "enforce", ("mx1.remote.test",), 600, 1000.0)
    assert cache.load("remote.test") is None
    cache.save(policy)
    assert cache.load("remote.test") == policy
    assert oct((tmp_path / "mta-sts").stat().st_mode & 0o777) == "0o700"
    assert [p.name for p in (tmp_path / "mta-sts").iterdir()] == ["remote.test.json"]
    (tmp_path / "mta-sts" / "remote.test.json").write_text('{"version": 1, "domain": ')
    assert cache.load("remote.test") is None
    data = {"version": 1, "domain": "other.test", "id": "x", "mode": "enforce", "mx": [],
            "max_age": 5, "fetched": 0}
    (tmp_path / "mta-sts" / "remote.test.json").write_text(json.dumps(data))
    assert cache.load("remote.test") is None


def test_servers_sharing_the_cache_write_their_own_temporary_files(tmp_path):
    """
    Issue 22: another server on the same data folder saving the same
    domain at the same moment: its half-written file is not ours to
    truncate or rename.
    """
    cache = PolicyCache(tmp_path / "mta-sts")
    policy = STSPolicy("remote.test", "id1", "enforce", ("mx1.remote.test",), 600, 1000.0)
    cache.save(policy)
    theirs = tmp_path / "mta-sts" / ".remote.test.tmp"
    theirs.write_text('{"version": 1, "domain": "remote')
    cache.save(STSPolicy("remote.test", "id2", "enforce", ("mx1.remote.test",), 600, 1000.0))
    assert theirs.read_text() == '{"version": 1, "domain": "remote'
    assert cache.load("remote.test").id == "id2"


def test_the_cache_follows_no_symbolic_link(tmp_path):
    from mailserver.safe_fs import SymlinkRefused

    policy = STSPolicy("remote.test", "id1", "enforce", ("mx1.remote.test",), 600, 1000.0)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mta-sts").symlink_to(elsewhere)
    with pytest.raises(SymlinkRefused):
        PolicyCache(tmp_path / "data" / "mta-sts").save(policy)
    assert list(elsewhere.iterdir()) == []
    # A cached file replaced by a link is ignored, not read.
    cache = PolicyCache(tmp_path / "mta-sts")
    cache.save(policy)
    (elsewhere / "remote.test.json").write_text((tmp_path / "mta-sts" / "remote.test.json").read_text())
    (tmp_path / "mta-sts" / "remote.test.json").unlink()
    (tmp_path / "mta-sts" / "remote.test.json").symlink_to(elsewhere / "remote.test.json")
    assert cache.load("remote.test") is None
    # Nor is the temporary file written through a link in its place.
    (tmp_path / "mta-sts" / f".remote.test.{writer_tag()}.tmp").symlink_to(elsewhere / "planted")
    with pytest.raises(SymlinkRefused):
        cache.save(policy)
    assert not (elsewhere / "planted").exists()


WAIT = object()


class FakeFetcher:
    def __init__(self, body=POLICY):
        self.body = body
        self.asked = []
        self.pending: list[defer.Deferred] = []

    def fetch(self, domain):
        self.asked.append(domain)
        if self.body is None:
            return defer.fail(PolicyError("404"))
        if self.body is WAIT:
            d = defer.Deferred()
            self.pending.append(d)
            return d
        return defer.succeed(self.body)


def zone(policy_id="id1"):
    return {"_mta-sts.remote.test": {"TXT": [f"v=STSv1; id={policy_id}"]} if policy_id else {}}


def sts(tmp_path, fetcher, clock, policy_id="id1"):
    return MTASTS(resolver=ZoneResolver(zone(policy_id)), fetcher=fetcher,
                  cache=PolicyCache(tmp_path / "mta-sts"), clock=clock)


def result(d):
    out = []
    d.addBoth(out.append)
    [value] = out
    return value


def test_fetched_once_then_cached_until_the_id_changes_or_it_expires(tmp_path):
    clock = Clock()
    clock.advance(1_000_000)
    fetcher = FakeFetcher()
    resolver = sts(tmp_path, fetcher, clock)
    policy = result(resolver.policy("remote.test"))
    assert (policy.mode, policy.mx, policy.id) == ("enforce", ("mx1.remote.test", "*.backup.test"),
                                                   "id1")
    assert result(resolver.policy("remote.test")) == policy
    assert fetcher.asked == ["remote.test"]
    # A new id: fetched again.
    changed = sts(tmp_path, fetcher, clock, policy_id="id2")
    assert result(changed.policy("remote.test")).id == "id2"
    assert fetcher.asked == ["remote.test"] * 2
    # Expired: fetched again.
    clock.advance(86400)
    assert result(changed.policy("remote.test")).fetched == clock.seconds()
    assert len(fetcher.asked) == 3


def test_the_cache_holds_when_dns_or_https_fail(tmp_path):
    clock = Clock()
    clock.advance(1_000_000)
    first = result(sts(tmp_path, FakeFetcher(), clock).policy("remote.test"))
    # A restart: the record is gone (or hidden) and the web server is down.
    gone = FakeFetcher(body=None)
    assert result(sts(tmp_path, gone, clock, policy_id=None).policy("remote.test")) == first
    assert gone.asked == []
    # A new id whose policy cannot be fetched: the cached one stays in force.
    assert result(sts(tmp_path, gone, clock, policy_id="id2").policy("remote.test")) == first
    # ... until it expires; then there is none.
    clock.advance(86400)
    assert result(sts(tmp_path, gone, clock, policy_id="id2").policy("remote.test")) is None


def test_a_failed_fetch_is_not_repeated_for_five_minutes(tmp_path):
    clock = Clock()
    fetcher = FakeFetcher(body=None)
    resolver = sts(tmp_path, fetcher, clock)
    assert result(resolver.policy("remote.test")) is None
    assert result(resolver.policy("remote.test")) is None
    assert fetcher.asked == ["remote.test"]
    clock.advance(301)
    fetcher.body = POLICY
    assert result(resolver.policy("remote.test")).mode == "enforce"


def test_concurrent_deliveries_share_one_fetch(tmp_path):
    clock = Clock()
    fetcher = FakeFetcher(body=WAIT)
    resolver = sts(tmp_path, fetcher, clock)
    waiting = [resolver.policy("remote.test") for _ in range(3)]
    assert fetcher.asked == ["remote.test"]
    fetcher.pending[0].callback(POLICY)
    assert {result(d).id for d in waiting} == {"id1"}


def test_no_record_no_policy(tmp_path):
    fetcher = FakeFetcher()
    assert result(sts(tmp_path, fetcher, Clock(), policy_id=None).policy("remote.test")) is None
    assert result(sts(tmp_path, fetcher, Clock()).policy("[127.0.0.1]")) is None
    assert fetcher.asked == []


def test_a_domain_without_a_cached_policy_is_looked_for_on_disk_every_five_minutes(tmp_path):
    """
    Issue 22: not a failed open() on the reactor thread for every message to
    a domain with no MTA-STS; a policy another node saves in the shared
    cache is seen within ABSENT_RECHECK.
    """
    from mailserver.relay.mta_sts import ABSENT_RECHECK

    class CountingCache(PolicyCache):
        loads = 0

        def load(self, domain):
            CountingCache.loads += 1
            return super().load(domain)

    clock = Clock()
    clock.advance(1_000_000)
    ours = MTASTS(resolver=ZoneResolver(zone(None)), fetcher=FakeFetcher(),
                  cache=CountingCache(tmp_path / "mta-sts"), clock=clock)
    for _ in range(5):
        assert result(ours.policy("remote.test")) is None
    assert CountingCache.loads == 1
    # Another node, whose TXT lookup worked, fetches and saves a policy.
    other = result(sts(tmp_path, FakeFetcher(), clock).policy("remote.test"))
    clock.advance(ABSENT_RECHECK - 1)
    assert result(ours.policy("remote.test")) is None
    clock.advance(2)
    assert result(ours.policy("remote.test")) == other
    assert result(ours.policy("remote.test")) == other
    assert CountingCache.loads == 2
