"""
Nodes sharing a data folder (issue 22): each node's lock, and the move of
the one-node layout into the node's folder.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mailserver.config import ConfigError, load
from mailserver.config.errors import Invalid
from mailserver.config.values import default_node_name, node_name
from mailserver.nodes import NodeInUse, adopt_single_node_layout, claim, node_names, try_lock


def test_a_node_name_is_checked():
    assert node_name("mx1.example_a-b") == "mx1.example_a-b"
    for bad in ("", ".hidden", "a/b", "a b", "x" * 25, "é"):
        with pytest.raises(Invalid):
            node_name(bad)
    assert node_name(default_node_name()) == default_node_name()
    # All of a node name goes into file names: two nodes never share a host part.
    from mailserver.maildir import file_name_host

    longest = "n_" + "x" * 21 + "1"
    assert node_name(longest) == longest and file_name_host(longest) == longest


def test_the_node_folder_holds_what_is_the_nodes_own(tmp_path):
    path = tmp_path / "mailserver.toml"
    path.write_text(f'data_dir = "{tmp_path / "data"}"\nnode_name = "mx2"\n')
    config = load(path)
    node = tmp_path / "data" / "nodes" / "mx2"
    assert config.node_path == node
    assert config.queue_path == node / "queue"
    assert config.defences_path == node / "defences.sqlite"
    assert config.pid_path == node / "mailserver.pid"
    assert config.listeners_report_path == node / "listeners.json"
    assert config.mail_path == tmp_path / "data" / "mail"  # shared


def test_a_bad_node_name_is_one_line(tmp_path):
    path = tmp_path / "mailserver.toml"
    path.write_text('node_name = "../other"\n')
    with pytest.raises(ConfigError) as refused:
        load(path)
    assert "node_name" in str(refused.value) and "\n" not in str(refused.value)


def test_a_node_is_claimed_once(tmp_path):
    data = tmp_path / "data"
    lock = claim(data, data / "nodes" / "a")
    try:
        with pytest.raises(NodeInUse) as refused:
            claim(data, data / "nodes" / "a")
        assert "another server is running as node 'a'" in str(refused.value)
        other = claim(data, data / "nodes" / "b")
        other.release()
        assert node_names(data / "nodes") == ["a", "b"]
    finally:
        lock.release()
    claim(data, data / "nodes" / "a").release()


def test_another_process_sees_the_lock_until_the_holder_dies(tmp_path):
    data = tmp_path / "data"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; from mailserver.nodes import claim; "
         f"claim(Path({str(data)!r}), Path({str(data / 'nodes' / 'a')!r})); "
         "print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=os.getcwd()),
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert try_lock(data, data / "nodes" / "a") is None
    finally:
        holder.kill()  # as kill -9: no clean-up
        holder.wait()
        holder.stdout.close()
    lock = try_lock(data, data / "nodes" / "a")
    assert lock is not None
    lock.release()


def test_the_one_node_layout_moves_into_the_node(tmp_path):
    data = tmp_path / "data"
    (data / "queue" / "envelopes").mkdir(parents=True)
    (data / "queue" / "envelopes" / "X.json").write_text("{}")
    (data / "defences.sqlite").write_text("db")
    (data / "defences.sqlite-wal").write_text("wal")
    lock = claim(data, data / "nodes" / "a")
    lock.release()
    node = data / "nodes" / "a"
    assert (node / "queue" / "envelopes" / "X.json").read_text() == "{}"
    assert (node / "defences.sqlite").read_text() == "db"
    assert (node / "defences.sqlite-wal").read_text() == "wal"
    assert not (data / "queue").exists() and not (data / "defences.sqlite").exists()
    # A second node finds nothing left to take; nothing is moved twice.
    (data / "defences.sqlite").write_text("another")
    assert adopt_single_node_layout(data, node) == []
    assert (node / "defences.sqlite").read_text() == "db"


def test_nodes_starting_together_make_one_self_signed_pair(tmp_path):
    """
    A node that finds another making the shared self-signed certificate
    waits for it and keeps its pair, rather than writing a second pair over
    the first (a certificate and a key from different pairs).
    """
    import fcntl
    import threading

    from mailserver.tls import ensure_self_signed

    tls = tmp_path / "tls"
    tls.mkdir()
    lock = os.open(tls / ".self-signed.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)  # the other node, writing its pair
    second = threading.Thread(target=ensure_self_signed,
                              args=(tls / "cert.pem", tls / "key.pem", "mx.test"))
    second.start()
    second.join(0.3)
    assert second.is_alive() and not (tls / "key.pem").exists()
    ensure_self_signed(tmp_path / "cert.pem", tmp_path / "key.pem", "mx.test")
    for name in ("cert.pem", "key.pem"):
        os.rename(tmp_path / name, tls / name)
    written = {name: (tls / name).read_bytes() for name in ("cert.pem", "key.pem")}
    os.close(lock)
    second.join(10)
    assert {name: (tls / name).read_bytes() for name in written} == written
