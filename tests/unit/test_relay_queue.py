"""
The durable queue store: hard link, versioned JSON envelope, recovery, requests.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from mailserver.config import Config, ConfigError, load
from mailserver.envelope import Envelope, Recipient
from mailserver.relay.queue import (
    FORMAT_VERSION,
    PENDING,
    QueuedMessage,
    QueueError,
    QueueStore,
)


@pytest.fixture
def config(tmp_path):
    return Config(hostname="mx.test", data_dir=str(tmp_path / "data"))


def spool_file(tmp_path, data=b"Return-Path: <s@example.org>\nSubject: hi\n\nbody\n"):
    path = tmp_path / "spool"
    path.write_bytes(data)
    return path


ENVELOPE = Envelope(
    sender="s@example.org",
    recipients=(
        Recipient(address="list@example.org", destinations=("x@remote.test", "y@other.test"),
                  notify=("FAILURE", "DELAY"), orcpt="rfc822;list@example.org"),
        Recipient(address="z@remote.test", destinations=("z@remote.test",)),
    ),
    ret="HDRS",
    envid="ABC",
    body="8BITMIME",
)


def test_enqueue_links_the_spool_and_writes_a_versioned_envelope(config, tmp_path):
    spool = spool_file(tmp_path)
    store = QueueStore(config, clock=lambda: 1000.0)
    seen = []
    store.on_enqueued = seen.append
    queue_id = store.enqueue(ENVELOPE, ("x@remote.test", "z@remote.test"), spool, 29)
    assert seen == [queue_id]
    message_path = store.messages_path / queue_id
    assert os.stat(message_path).st_ino == os.stat(spool).st_ino
    raw = json.loads((store.envelopes_path / f"{queue_id}.json").read_text())
    assert raw["version"] == FORMAT_VERSION
    message = store.load(queue_id)
    assert message.sender == "s@example.org"
    assert message.arrival == 1000.0 and message.next_attempt == 1000.0
    assert message.ret == "HDRS" and message.envid == "ABC" and message.body == "8BITMIME"
    assert [(r.address, r.original, r.notify, r.orcpt, r.state) for r in message.recipients] == [
        ("x@remote.test", "list@example.org", ("FAILURE", "DELAY"), "rfc822;list@example.org",
         PENDING),
        ("z@remote.test", "z@remote.test", (), None, PENDING),
    ]
    with store.open_body(message) as body:
        assert body.read() == b"Subject: hi\n\nbody\n"
    assert message.size == len(b"Subject: hi\n\nbody\n")
    assert os.listdir(store.tmp_path) == []


def test_json_round_trip_and_unknown_version(config, tmp_path):
    store = QueueStore(config)
    queue_id = store.enqueue(ENVELOPE, ("x@remote.test",), spool_file(tmp_path), 29)
    message = store.load(queue_id)
    assert QueuedMessage.from_json(message.to_json()) == message
    path = store.envelopes_path / f"{queue_id}.json"
    data = json.loads(path.read_text())
    data["version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(QueueError, match="bad envelope"):
        store.load(queue_id)


def test_unknown_id_is_a_clear_error(config):
    store = QueueStore(config)
    with pytest.raises(QueueError, match="no queued message NOPE"):
        store.load("NOPE")
    with pytest.raises(QueueError):
        store.load("../etc/passwd")


def test_orphans_and_temporary_files_are_removed_at_start(config, tmp_path):
    store = QueueStore(config)
    kept = store.enqueue(ENVELOPE, ("x@remote.test",), spool_file(tmp_path), 29)
    os.link(store.messages_path / kept, store.messages_path / "ORPHAN")
    (store.tmp_path / "half.json.1234").write_text("{")
    gone = subprocess.Popen(["true"])
    gone.wait()
    live = os.getppid()  # a process that runs, and is not this one
    (store.tmp_path / f"crashed.json.{gone.pid}.00ff00ff").write_text("{")
    (store.tmp_path / f"live.json.{live}.00ff00ff").write_text("{")
    assert store.remove_orphans() == []  # could be an enqueue in progress
    assert sorted(os.listdir(store.tmp_path)) == ["half.json.1234", f"live.json.{live}.00ff00ff"]
    assert store.remove_orphans(min_age=-1) == ["ORPHAN"]
    assert os.listdir(store.tmp_path) == []
    assert store.ids() == [kept]
    store.remove(kept)
    assert store.ids() == [] and os.listdir(store.messages_path) == []


def test_requests_are_taken_once(config):
    store = QueueStore(config)
    store.request("flush", "domain:remote.test")
    store.request("delete", "ABC")
    assert sorted(store.take_requests()) == [("delete", "ABC"), ("flush", "domain:remote.test")]
    assert store.take_requests() == []


def test_relay_config_is_validated(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[relay]\ntls = "maybe"\n')
    with pytest.raises(ConfigError, match="relay.tls"):
        load(path)
    path.write_text('[relay]\nretry_schedule = ["5 minutes"]\n')
    with pytest.raises(ConfigError, match="relay.retry_schedule"):
        load(path)
    path.write_text('[relay]\nsmarthost = "mail.example.net:587"\nsmarthost_username = "u"\n')
    with pytest.raises(ConfigError, match="relay.smarthost_username"):
        load(path)
    path.write_text(
        '[relay]\nresolver = "127.0.0.1:5353"\nretry_schedule = ["1s", "2s"]\n'
        'transports = ["example.net=127.0.0.1:2525"]\nmax_age = "1h"\n'
    )
    relay = load(path).relay
    assert relay.resolver == "127.0.0.1:5353" and relay.retry_schedule == ("1s", "2s")
