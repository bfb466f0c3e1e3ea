"""
The durable queue store: hard link, versioned JSON envelope, recovery, requests.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess

import pytest

from mailserver.config import Config, ConfigError, HostPort, Transport, load
from mailserver.envelope import Envelope, Recipient
from mailserver.relay.index import build as build_index
from mailserver.relay.queue import (
    FORMAT_VERSION,
    CorruptEntry,
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
    store = QueueStore(config.queue_path, clock=lambda: 1000.0)
    seen = []
    store.on_enqueued = seen.append
    queue_id = store.enqueue(ENVELOPE, ("x@remote.test", "z@remote.test"), spool, 29)
    assert seen == [store.load(queue_id)]
    assert os.listdir(store.incoming_path) == []  # told directly, not left for a scan
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
    store = QueueStore(config.queue_path)
    queue_id = store.enqueue(ENVELOPE, ("x@remote.test",), spool_file(tmp_path), 29)
    message = store.load(queue_id)
    assert QueuedMessage.from_json(message.to_json()) == message
    path = store.envelopes_path / f"{queue_id}.json"
    data = json.loads(path.read_text())
    data["version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(CorruptEntry, match="is corrupt: unknown envelope version 99"):
        store.load(queue_id)


def test_unknown_id_is_a_clear_error(config):
    store = QueueStore(config.queue_path)
    with pytest.raises(QueueError, match="no queued message NOPE"):
        store.load("NOPE")
    with pytest.raises(QueueError):
        store.load("../etc/passwd")


def test_the_threaded_start_up_read_keeps_this_process_s_writes_in_progress(config, tmp_path):
    # The runner reads the queue in a thread while clients are served: an
    # envelope this process is writing at that moment is not a leftover
    # (it was removed, and the intake's rename failed: "intake failed ...
    # FileNotFoundError ... queue/tmp/<id>.json.<pid>.<hex>").
    store = QueueStore(config.queue_path)
    store.remove_stale_tmp()
    writing = f"1K1YFC4XJYP002YE.json.{os.getpid()}.13e6451c"
    (store.tmp_path / writing).write_text("{")
    assert store.remove_orphans() == []
    assert os.listdir(store.tmp_path) == [writing]
    store.remove_stale_tmp()  # before clients come, our pid is an earlier process's
    assert os.listdir(store.tmp_path) == []


def test_orphans_and_temporary_files_are_removed_at_start(config, tmp_path):
    store = QueueStore(config.queue_path)
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


def test_queueing_opens_the_queue_folders_once_and_close_lets_them_go(config, tmp_path,
                                                                     monkeypatch):
    # Each message is written in messages/ and tmp/ through descriptors
    # the store keeps, not by walking from the data folder again.
    store = QueueStore(config.queue_path)
    store.enqueue(ENVELOPE, ("x@remote.test",), spool_file(tmp_path), 29)
    import mailserver.relay.queue as queue_module

    walks = []
    real_open_folder = queue_module.open_folder
    monkeypatch.setattr(queue_module, "open_folder",
                        lambda *a, **k: walks.append(a[1]) or real_open_folder(*a, **k))
    for n in range(3):
        (tmp_path / str(n)).mkdir()
        store.enqueue(ENVELOPE, ("x@remote.test",), spool_file(tmp_path / str(n)), 29)
    assert walks == []
    assert len(store.ids()) == 4
    kept = list(store._folder_fds.values())
    assert kept and all(os.fstat(fd) for fd in kept)
    store.close()
    for fd in kept:
        with pytest.raises(OSError):
            os.fstat(fd)
    # Closed, it opens them again when next needed.
    (tmp_path / "again").mkdir()
    store.enqueue(ENVELOPE, ("x@remote.test",), spool_file(tmp_path / "again"), 29)
    assert walks and len(store.ids()) == 5
    store.close()


def test_an_envelope_s_temporary_name_left_by_an_earlier_process_is_stepped_over(config,
                                                                               tmp_path):
    # The tmp/ name is the id, the pid and a number counted in the process:
    # a crash's leftover under this pid (pids are reused) is not a failure.
    import mailserver.relay.queue as queue_module

    store = QueueStore(config.queue_path)
    store.ensure()
    upcoming = next(queue_module._tmp_numbers) + 1
    queue_id = "1K1YFC4XJYP002YE"
    taken = f"{queue_id}.json.{os.getpid()}.{upcoming:x}"
    (store.tmp_path / taken).write_text("{")
    envelope = Envelope(sender="s@example.org", recipients=ENVELOPE.recipients, id=queue_id)
    spool = spool_file(tmp_path)
    prepared = store.prepare(envelope, ("x@remote.test",), spool, 29)
    assert prepared.tmp.name != taken
    assert (store.tmp_path / taken).read_text() == "{"
    store.commit(prepared, spool)
    assert store.load(queue_id).recipients[0].address == "x@remote.test"
    store.close()


def test_requests_are_taken_once(config):
    store = QueueStore(config.queue_path)
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
    for key in ("dns_timeout", "connect_timeout", "command_timeout", "data_timeout"):
        path.write_text(f"[relay]\n{key} = 0\n")
        with pytest.raises(ConfigError, match=f"relay.{key}"):
            load(path)
    path.write_text(
        '[relay]\nresolver = "127.0.0.1:5353"\nretry_schedule = ["1s", "2s"]\n'
        'transports = ["example.net=127.0.0.1:2525"]\nmax_age = "1h"\n'
    )
    relay = load(path).relay
    assert relay.resolver == HostPort("127.0.0.1", 5353) and relay.retry_schedule == (1.0, 2.0)
    assert relay.transports == (Transport("example.net", "127.0.0.1", 2525),)
    assert relay.max_age == 3600.0 and relay.dns_timeout == 15.0


# Corrupt entries.


def queued(config, tmp_path):
    store = QueueStore(config.queue_path)
    queue_id = store.enqueue(ENVELOPE, ("x@remote.test",), spool_file(tmp_path), 29)
    return store, queue_id, store.envelopes_path / f"{queue_id}.json"


def edit(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


CORRUPTIONS = {
    "truncated": (lambda p: p.write_text(p.read_text()[:40]), "not valid JSON"),
    "empty": (lambda p: p.write_bytes(b""), "not valid JSON"),
    "binary": (lambda p: p.write_bytes(b"\xff\xfe\x00garbage"), "not UTF-8 text"),
    "array": (lambda p: p.write_text("[1, 2]"), "not a JSON object"),
    "version": (lambda p: edit(p, lambda d: d.update(version=3)), "unknown envelope version 3"),
    "no version": (lambda p: edit(p, lambda d: d.pop("version")),
                   "unknown envelope version None"),
    "no sender": (lambda p: edit(p, lambda d: d.pop("sender")), "no sender field"),
    "no recipients": (lambda p: edit(p, lambda d: d.update(recipients=[])), "recipients"),
    "arrival": (lambda p: edit(p, lambda d: d.update(arrival="yesterday")),
                "arrival has the wrong type (str)"),
    "attempts": (lambda p: edit(p, lambda d: d.update(attempts=True)),
                 "attempts has the wrong type (bool)"),
    "state": (lambda p: edit(p, lambda d: d["recipients"][0].update(state="lost")),
              "recipient 0: unknown state 'lost'"),
    "notify": (lambda p: edit(p, lambda d: d["recipients"][0].update(notify=[1])),
               "recipient 0: notify is not a list of strings"),
    "address": (lambda p: edit(p, lambda d: d["recipients"][0].pop("address")),
                "recipient 0 has no address"),
    "id": (lambda p: edit(p, lambda d: d.update(id="OTHER")), "it holds the id 'OTHER'"),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_a_bad_envelope_is_a_corrupt_entry_with_its_problem(config, tmp_path, name):
    store, queue_id, path = queued(config, tmp_path)
    damage, problem = CORRUPTIONS[name]
    damage(path)
    with pytest.raises(CorruptEntry) as caught:
        store.load(queue_id)
    assert problem in caught.value.problem
    assert caught.value.queue_id == queue_id and caught.value.path == path
    index, corrupt = build_index(store)
    assert len(index) == 0 and [e.queue_id for e in corrupt] == [queue_id]


def test_missing_or_wrong_message_file_is_corrupt(config, tmp_path):
    store, queue_id, path = queued(config, tmp_path)
    os.unlink(store.messages_path / queue_id)
    with pytest.raises(CorruptEntry, match="its message file is missing"):
        store.load(queue_id)
    (store.messages_path / queue_id).write_bytes(b"short")  # shorter than body_offset
    with pytest.raises(CorruptEntry, match="not the message it holds"):
        store.load(queue_id)
    os.unlink(path)
    with pytest.raises(QueueError, match="no queued message") as caught:
        store.load(queue_id)
    assert not isinstance(caught.value, CorruptEntry)  # gone, not corrupt


def test_unreadable_envelope_is_corrupt(config, tmp_path):
    store, queue_id, path = queued(config, tmp_path)
    os.unlink(path)
    path.mkdir()
    with pytest.raises(CorruptEntry, match="cannot read it"):
        store.load(queue_id)
    assert store.set_aside(queue_id, "cannot read it").is_dir()
    assert store.ids() == []


def test_set_aside_moves_both_files_and_notes_the_problem(config, tmp_path):
    store, bad, path = queued(config, tmp_path)
    good = store.enqueue(ENVELOPE, ("z@remote.test",), spool_file(tmp_path), 29)
    path.write_text("{trunc")
    where = store.set_aside(bad, "not valid JSON")
    assert where == store.corrupt_path / f"{bad}.json"
    assert where.read_text() == "{trunc"
    assert (store.corrupt_path / bad).read_bytes().endswith(b"body\n")
    assert (store.corrupt_path / f"{bad}.problem").read_text() == "not valid JSON\n"
    assert store.ids() == [good] and store.load(good).id == good
    assert sorted(os.listdir(store.messages_path)) == [good]
    assert store.corrupt_entries() == [(bad, "not valid JSON")]
    assert store.remove_orphans(min_age=-1) == []  # nothing of it left to remove
    # The same id again (restored by hand, still bad) does not overwrite the first.
    (store.envelopes_path / f"{bad}.json").write_text("again")
    assert store.set_aside(bad, "still bad") == store.corrupt_path / f"{bad}.1.json"
    assert sorted(store.corrupt_entries()) == [(bad, "not valid JSON"), (f"{bad}.1", "still bad")]
    assert where.read_text() == "{trunc"


def test_names_that_are_not_ids_are_not_envelopes(config, tmp_path):
    store, queue_id, _ = queued(config, tmp_path)
    (store.envelopes_path / ".json").write_text("{}")
    (store.envelopes_path / f".{queue_id}.json").write_text("{}")
    (store.envelopes_path / "notes.txt").write_text("hi")
    assert store.ids() == [queue_id]


def test_queue_list_pages_through_a_queue_reading_only_its_page(tmp_path, capsys, monkeypatch):
    from mailserver import cli

    config_path = tmp_path / "mailserver.toml"
    config_path.write_text(f'data_dir = "{tmp_path / "data"}"\n')
    store = QueueStore(load(str(config_path)).queue_path, clock=itertools.count(1000.0, 0.5).__next__)
    ids = [store.enqueue(ENVELOPE, ("z@remote.test",), spool_file(tmp_path), 29) for _ in range(7)]
    assert sorted(ids) == ids  # ids sort by arrival
    (store.envelopes_path / "ZZBROKEN.json").write_text("{")

    loaded = []
    real_load = QueueStore.load
    monkeypatch.setattr(QueueStore, "load",
                        lambda self, queue_id: loaded.append(queue_id) or real_load(self, queue_id))

    def listing(*args):
        assert cli.main(["--config", str(config_path), "queue", "list", *args]) == 0
        return capsys.readouterr().out.splitlines()

    out = listing("--limit", "3")
    assert [line.split()[0] for line in out[1:4]] == ids[:3] and loaded == ids[:3]
    assert out[4:] == ["3 message(s)", f"entries 1-3 of 8 in the queue, oldest first; "
                                       f"next page: --after {ids[2]}"]
    loaded.clear()
    out = listing("--after", ids[5])
    assert [line.split()[0] for line in out[1:2]] == ids[6:] and loaded == [ids[6], "ZZBROKEN"]
    assert out[2:4] == ["1 message(s)", "entries 7-8 of 8 in the queue, oldest first"]
    assert out[4].startswith("1 corrupt envelope(s)") and "ZZBROKEN: not valid JSON" in out[5]
    out = listing("--after", "ZZBROKEN")
    assert out == ["no queued message on this page", "nothing after ZZBROKEN; 8 in the queue"]
    out = listing("--limit", "0")
    assert "7 message(s)" in out and [line.split()[0] for line in out[1:8]] == ids
    assert cli.main(["--config", str(config_path), "queue", "list", "--limit", "-1"]) == 1
    assert "--limit must be 0" in capsys.readouterr().err


def test_queue_folders_are_private_and_never_links(config, tmp_path):
    import stat

    from mailserver.safe_fs import SymlinkRefused

    store = QueueStore(config.queue_path, clock=lambda: 1000.0)
    queue_id = store.enqueue(ENVELOPE, ("x@remote.test",), spool_file(tmp_path), 29)
    for folder in (store.path, store.messages_path, store.envelopes_path, store.tmp_path,
                   store.incoming_path):
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    # A message file replaced by a link to another file is not read.
    secret = tmp_path / "secret"
    secret.write_bytes(b"Return-Path: <x>\nnot mail\n" * 4)
    os.unlink(store.messages_path / queue_id)
    os.symlink(secret, store.messages_path / queue_id)
    with pytest.raises(CorruptEntry):
        store.load(queue_id)
    with pytest.raises(SymlinkRefused):
        store.open_body(QueuedMessage(id=queue_id, sender="", recipients=(), arrival=0))
    # Nor is a queue folder that is a link.
    other = QueueStore(tmp_path / "other" / "queue")
    (tmp_path / "other" / "queue").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "other" / "queue" / "messages")
    with pytest.raises(SymlinkRefused):
        other.enqueue(ENVELOPE, ("x@remote.test",), spool_file(tmp_path), 29)
    assert os.listdir(tmp_path / "elsewhere") == []


def test_a_dangling_link_among_the_requests_does_not_stop_the_scan(config):
    store = QueueStore(config.queue_path, clock=lambda: 1000.0)
    store.request("flush", "*")
    os.symlink("/nonexistent/target", store.requests_path / "ABC.flush")
    assert sorted(store.take_requests()) == [("flush", "*"), ("flush", "ABC")]
