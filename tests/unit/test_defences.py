"""
The defences' pieces without a network: the DNSBL site syntax and query
names, who is screened, the greylisting and rate-limit state in a real
SQLite file (two stores on one file stand for two worker processes), and
the hooks' replies, on a fake clock.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import stat

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from mailserver.config import Checks, ConfigError, Limits, load
from mailserver.config.values import ListedAction, dnsbl_site, network
from mailserver.defences import defence_hooks
from mailserver.defences.dnsbl import query_name
from mailserver.defences.greylist import Greylist, sender_key
from mailserver.defences.rates import ConnectionRate, SubmissionRates
from mailserver.defences.scope import Scope, client_network
from mailserver.defences.store import DefenceStore, GreylistPolicy, greylist_wait, prune
from mailserver.hooks import Client, Reject
from mailserver.safe_fs import SymlinkRefused

STRANGER = Client(address="203.0.113.7", port=4000, role="smtp", helo="bot.example")
POLICY = GreylistPolicy(delay=300, retry_window=3600, expiry=86400, auto_whitelist=2,
                        max_entries=100)


def result_of(coroutine):
    results = []
    defer.ensureDeferred(coroutine).addBoth(results.append)
    assert results, "did not finish synchronously"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def inline(operation, *args):
    return defer.maybeDeferred(operation, *args)


def store_at(path, clock, policy=POLICY) -> DefenceStore:
    return DefenceStore(path, clock, greylist=policy, run=inline)


# The site syntax (Postfix's postscreen_dnsbl_sites).


def test_a_site_with_a_reply_filter_and_a_weight():
    site = dnsbl_site("zen.spamhaus.org=127.0.0.[2..11]*3")
    assert (site.domain, site.weight) == ("zen.spamhaus.org", 3)
    assert site.matches("127.0.0.2") and site.matches("127.0.0.11")
    assert not site.matches("127.0.0.1") and not site.matches("127.0.0.12")
    assert not site.matches("127.0.1.2") and not site.matches("nonsense")


def test_an_allowlist_with_ranges_lists_and_a_negative_weight():
    site = dnsbl_site("list.dnswl.org=127.0.[0..255].[1;3]*-2")
    assert site.weight == -2
    assert site.matches("127.0.10.1") and site.matches("127.0.10.3")
    assert not site.matches("127.0.10.2")


def test_a_site_without_a_filter_counts_any_reply_once():
    site = dnsbl_site("bl.example.net")
    assert site.weight == 1 and site.matches("127.0.0.99")


@pytest.mark.parametrize("value, problem", [
    ("nodots", "is not a domain name"),
    ("bl.example=127.0.0", "the reply filter must look like"),
    ("bl.example=127.0.0.[3..2]", "is not an octet"),
    ("bl.example=127.0.0.256", "is not an octet"),
    ("bl.example*0", "non-zero integer"),
    ("bl.example*three", "non-zero integer"),
])
def test_bad_sites_are_refused_naming_the_key(tmp_path, value, problem):
    path = tmp_path / "mailserver.toml"
    path.write_text(f'[checks]\ndnsbl = ["{value}"]\n')
    with pytest.raises(ConfigError) as refused:
        load(path)
    assert "checks.dnsbl" in str(refused.value) and problem in str(refused.value)


def test_a_retry_window_shorter_than_the_delay_is_refused(tmp_path):
    path = tmp_path / "mailserver.toml"
    path.write_text('[checks]\ngreylist = true\ngreylist_delay = "1h"\n'
                    'greylist_retry_window = "30m"\n')
    with pytest.raises(ConfigError) as refused:
        load(path)
    assert "checks.greylist_retry_window" in str(refused.value)


def test_query_names_reverse_octets_and_nibbles():
    assert query_name("192.0.2.99", "bl.example") == "99.2.0.192.bl.example"
    assert query_name("::ffff:192.0.2.99", "bl.example") == "99.2.0.192.bl.example"
    assert query_name("2001:db8::1", "bl.example") == (
        "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.bl.example"
    )
    assert query_name("unix-socket", "bl.example") is None


# Who is screened.


def test_only_strangers_on_the_mx_role_outside_the_skipped_networks():
    scope = Scope((network("192.0.2.0/24"), network("2001:db8::/32")))
    assert scope.covers(STRANGER)
    assert not scope.covers(dataclasses.replace(STRANGER, role="submission"))
    assert not scope.covers(dataclasses.replace(STRANGER, authenticated="a@example.org"))
    assert not scope.covers(dataclasses.replace(STRANGER, address="192.0.2.5"))
    assert not scope.covers(dataclasses.replace(STRANGER, address="::ffff:192.0.2.5"))
    assert not scope.covers(dataclasses.replace(STRANGER, address="2001:db8::5"))
    assert not scope.covers(dataclasses.replace(STRANGER, address=""))


def test_client_networks_are_the_ipv4_24_and_the_ipv6_64():
    assert client_network("203.0.113.7") == "203.0.113.0/24"
    assert client_network("::ffff:203.0.113.7") == "203.0.113.0/24"
    assert client_network("2001:db8:1:2:3::4") == "2001:db8:1:2::/64"


@pytest.mark.parametrize("sender, key", [
    ("Alice@Example.ORG", "alice@example.org"),
    ("prvs=1234abcd=alice@example.org", "alice@example.org"),
    ("bounces+alice=example.net@lists.example.org", "bounces@lists.example.org"),
    ("bounce-12345-67@lists.example.org", "bounce-#-#@lists.example.org"),
    ("", ""),
])
def test_sender_keys_match_a_retry_with_a_new_tag(sender, key):
    assert sender_key(sender) == key


# The greylisting state.


def test_a_triplet_waits_out_the_delay_once(tmp_path):
    db = sqlite3.connect(tmp_path / "g.sqlite")
    from mailserver.defences.store import SCHEMA

    db.executescript(SCHEMA)
    key = ("203.0.113.0/24", "a@example.net", "b@example.org")
    assert greylist_wait(db, 1000.0, POLICY, *key) == (300.0, True)
    assert greylist_wait(db, 1100.0, POLICY, *key) == (200.0, False)  # too early: not reset
    assert greylist_wait(db, 1300.0, POLICY, *key) == (0.0, False)  # passed
    assert greylist_wait(db, 1301.0, POLICY, *key) == (0.0, False)
    other = ("203.0.113.0/24", "a@example.net", "c@example.org")
    assert greylist_wait(db, 1302.0, POLICY, *other)[0] == 300.0


def test_a_retry_after_the_window_starts_over(tmp_path):
    clock = Clock()
    store = store_at(tmp_path / "d.sqlite", clock)
    key = ("203.0.113.0/24", "a@example.net", "b@example.org")
    assert result_of(store.greylist_wait(*key)) == 300.0
    clock.advance(3601)
    assert result_of(store.greylist_wait(*key)) == 300.0


def test_a_network_that_retried_often_enough_is_whitelisted(tmp_path):
    clock = Clock()
    store = store_at(tmp_path / "d.sqlite", clock)
    net = "203.0.113.0/24"
    for recipient in ("b@example.org", "c@example.org"):
        assert result_of(store.greylist_wait(net, "a@example.net", recipient)) == 300.0
    clock.advance(301)
    for recipient in ("b@example.org", "c@example.org"):
        assert result_of(store.greylist_wait(net, "a@example.net", recipient)) == 0.0
    # Two passes: anything from that network now goes through at once.
    assert result_of(store.greylist_wait(net, "new@example.com", "d@example.org")) == 0.0
    assert result_of(store.greylist_wait("198.51.100.0/24", "a@example.net", "d@example.org")) == 300.0


def test_the_state_is_shared_by_stores_on_one_file(tmp_path):
    """
    Two stores on one file, as two worker processes have: a retry answered
    by the other one passes, and the rate counts add up.
    """
    clock = Clock()
    first, second = store_at(tmp_path / "d.sqlite", clock), store_at(tmp_path / "d.sqlite", clock)
    key = ("203.0.113.0/24", "a@example.net", "b@example.org")
    assert result_of(first.greylist_wait(*key)) == 300.0
    clock.advance(300)
    assert result_of(second.greylist_wait(*key)) == 0.0
    assert result_of(first.take("messages", "u@example.org", 2, 3600))[0]
    assert result_of(second.take("messages", "u@example.org", 2, 3600))[0]
    counted, resets_at = result_of(first.take("messages", "u@example.org", 2, 3600))
    assert not counted and resets_at == 300 + 3600


def test_a_counter_starts_again_when_its_window_ends(tmp_path):
    clock = Clock()
    store = store_at(tmp_path / "d.sqlite", clock)
    assert result_of(store.take("connections", "198.51.100.1", 1, 60)) == (True, 60.0)
    assert result_of(store.take("connections", "198.51.100.1", 1, 60)) == (False, 60.0)
    clock.advance(60)
    assert result_of(store.take("connections", "198.51.100.1", 1, 60)) == (True, 120.0)


def test_pruning_forgets_what_expired_and_keeps_the_newest_triplets(tmp_path):
    clock = Clock()
    store = store_at(tmp_path / "d.sqlite", clock)
    for i in range(150):
        clock.advance(1)
        result_of(store.greylist_wait("203.0.113.0/24", f"s{i}@example.net", "b@example.org"))
    result_of(store.take("connections", "198.51.100.1", 5, 60))
    db = sqlite3.connect(tmp_path / "d.sqlite")
    prune(db, clock.seconds(), POLICY)
    db.commit()
    senders = {row[0] for row in db.execute("SELECT sender FROM greylist")}
    assert len(senders) == 100 and "s149@example.net" in senders and "s0@example.net" not in senders
    assert db.execute("SELECT COUNT(*) FROM counters").fetchone() == (1,)
    prune(db, clock.seconds() + 3601, POLICY)  # past the retry window and the counter's minute
    db.commit()
    assert db.execute("SELECT COUNT(*) FROM greylist").fetchone() == (0,)
    assert db.execute("SELECT COUNT(*) FROM counters").fetchone() == (0,)


def test_the_store_survives_a_restart(tmp_path):
    clock = Clock()
    key = ("203.0.113.0/24", "a@example.net", "b@example.org")
    before = store_at(tmp_path / "d.sqlite", clock)
    before.startService()
    assert result_of(before.greylist_wait(*key)) == 300.0
    before.stopService()
    clock.advance(300)
    after = store_at(tmp_path / "d.sqlite", clock)
    assert result_of(after.greylist_wait(*key)) == 0.0


def test_the_database_is_private_and_its_folder_made_0700(tmp_path):
    data = tmp_path / "data"
    store = store_at(data / "defences.sqlite", Clock())
    result_of(store.greylist_wait("203.0.113.0/24", "a@example.net", "b@example.org"))
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    for name in ("defences.sqlite", "defences.sqlite-wal", "defences.sqlite-shm"):
        assert stat.S_IMODE((data / name).stat().st_mode) == 0o600, name


@pytest.mark.parametrize("name", ["defences.sqlite", "defences.sqlite-wal", "defences.sqlite-shm"])
def test_a_symbolic_link_in_the_databases_place_is_not_followed(tmp_path, name):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"not ours")
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    (data / name).symlink_to(elsewhere)
    store = store_at(data / "defences.sqlite", Clock())
    with pytest.raises(SymlinkRefused):
        result_of(store.take("messages", "u@example.org", 2, 3600))
    assert elsewhere.read_bytes() == b"not ours"
    assert [p.name for p in data.iterdir()] == [name]  # nothing made beside it


# The hooks' answers.


def test_greylisting_answers_451_with_the_wait_and_skips_the_trusted(tmp_path):
    clock = Clock()
    store = store_at(tmp_path / "d.sqlite", clock)
    trusted = {"198.51.100.9"}
    hook = Greylist(store, Scope(), trusted=trusted.__contains__)
    refused = result_of(hook.recipient(STRANGER, "a@example.net", "B@example.org"))
    assert refused == Reject(451, "4.7.1", "Greylisted, please try again in 300 seconds",
                             reason="greylist")
    clock.advance(120.5)
    refused = result_of(hook.recipient(STRANGER, "a@example.net", "b@example.org"))
    assert refused.text == "Greylisted, please try again in 180 seconds"
    clock.advance(180)
    assert result_of(hook.recipient(STRANGER, "a@example.net", "b@example.org")) is None
    friend = dataclasses.replace(STRANGER, address="198.51.100.9")
    assert result_of(hook.recipient(friend, "x@example.net", "b@example.org")) is None
    user = dataclasses.replace(STRANGER, role="submission", authenticated="u@example.org")
    assert result_of(hook.recipient(user, "u@example.org", "z@example.com")) is None


def test_a_user_over_the_hourly_limit_hears_450_with_the_reset_time(tmp_path):
    clock = Clock()
    clock.advance(1_700_000_000)
    store = store_at(tmp_path / "d.sqlite", clock)
    hook = SubmissionRates(store, messages=2, recipients=3)
    user = Client(address="192.0.2.1", port=1, role="submission", authenticated="U@example.org")
    assert result_of(hook.sender(user, "u@example.org")) is None
    assert result_of(hook.sender(user, "u@example.org")) is None
    refused = result_of(hook.sender(user, "u@example.org"))
    assert (refused.code, refused.enhanced, refused.reason) == (450, "4.7.1", "rate")
    assert refused.text == (
        "Sending limit of 2 messages per hour reached for U@example.org;"
        " try again after 2023-11-14 23:13:20 UTC"
    )
    for _ in range(3):
        assert result_of(hook.recipient(user, "u@example.org", "r@example.com")) is None
    assert "3 recipients per hour" in result_of(hook.recipient(user, "u@example.org", "r@x.com")).text
    assert hook.sender(STRANGER, "a@example.net") is None  # only users count, at once
    clock.advance(3600)
    assert result_of(hook.sender(user, "u@example.org")) is None


def test_connection_rate_counts_an_address_per_minute(tmp_path):
    clock = Clock()
    store = store_at(tmp_path / "d.sqlite", clock)
    hook = ConnectionRate(store, Scope(), per_minute=2)
    assert result_of(hook.connection(STRANGER)) is None
    assert result_of(hook.connection(STRANGER)) is None
    refused = result_of(hook.connection(STRANGER))
    assert (refused.code, refused.enhanced, refused.reason) == (421, "4.7.0", "rate")
    assert result_of(hook.connection(dataclasses.replace(STRANGER, role="submission"))) is None
    clock.advance(60)
    assert result_of(hook.connection(STRANGER)) is None


def test_only_what_is_configured_is_built(tmp_path):
    quiet = Limits(submission_messages_per_hour=0, submission_recipients_per_hour=0)
    hooks, _ = defence_hooks(checks=Checks(), limits=quiet, store_path=tmp_path / "d",
                             resolver=None, reactor=Clock())
    assert hooks == []
    checks = Checks(dnsbl=(dnsbl_site("bl.example"),), greylist=True,
                    dnsbl_action=ListedAction.DEFER)
    limits = Limits(connection_rate_per_client=10)
    hooks, _ = defence_hooks(checks=checks, limits=limits, store_path=tmp_path / "d",
                             resolver=None, reactor=Clock())
    assert [name for name, _ in hooks] == ["connection-rate", "screen", "submission-rate",
                                          "greylist"]
