"""
A relay queue of 100,000 messages for a domain that is down, in the real
server (issue 22): what the queue costs in memory and start-up, what
looking at it costs, and whether SMTP clients notice.

In one run:

 1. settle (L{bench.settle}), then a server with an empty queue: SMTP
    load (L{bench.smtp_load}, local delivery) for the accept latency
    without the queue, C{/metrics}, C{mailserver queue list}, RSS;
 2. a second server's queue filled with N messages for C{down.test},
    routed (C{relay.transports}) to a loopback port nobody listens on, by
    the queue's own writer (L{QueueStore.enqueue}) with its syncs left out
    and one C{sync} at the end: the same files, minutes sooner; the index's
    memory per entry measured here with C{tracemalloc};
 3. that server started: the time to read the queue (its log line), RSS;
    every message is due, so it starts retrying them all, C{max_connections_per_destination}
    at a time;
 4. while it retries: C{/metrics}, C{/api/queue}, C{mailserver queue list}
    (first page and one from the middle), the last scan's time (the
    C{relay_queue_scan_seconds} gauge), the same SMTP load, ETRN for
    C{down.test};
 5. once every message was tried (or C{--retry-wait} passed): the SMTP
    load again, with the queue full and nothing due.

Usage (from the repository root; 100,000 messages take about 15 minutes on
2 cores, most of it filling the queue and waiting out the retries)::

    .venv/bin/python bench/queue_scale.py
    .venv/bin/python bench/queue_scale.py --messages 20000 --load 1500 --json /tmp/q.json

The folders are removed when the run ends (and noted for the next run's
settle: removing 200,000 files slows file creation for minutes).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import re
import smtplib
import statistics
import sys
import time
import tracemalloc
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.peers import MailServerPeer, free_port, rss_kib  # noqa: E402
from bench.settle import Leftovers, settle  # noqa: E402
from bench.smtp_load import LoadResult, percentile, run_load  # noqa: E402
from mailserver.config import load as load_config  # noqa: E402
from mailserver.envelope import Envelope, Recipient  # noqa: E402
from mailserver.relay import queue as queue_module  # noqa: E402
from mailserver.relay.index import build as build_index  # noqa: E402
from mailserver.relay.queue import QueueStore  # noqa: E402

DOWN = "down.test"


@contextlib.contextmanager
def _no_syncs():
    """
    The queue's writer without its fsyncs (this process only).
    """
    saved = queue_module.fsync_directory, os.fsync
    queue_module.fsync_directory = lambda path: None
    os.fsync = lambda fd: None
    try:
        yield
    finally:
        queue_module.fsync_directory, os.fsync = saved


def fill(config_path: Path, count: int, size: int) -> float:
    """
    Queue C{count} messages of about C{size} octets for C{DOWN}; returns
    the seconds it took.
    """
    store = QueueStore(load_config(str(config_path)))
    store.on_enqueued = lambda message: None  # no incoming/ markers: the server reads it all
    spool = store.path / "bench-spool"
    spool.mkdir(parents=True, exist_ok=True)
    filler = b"x" * 76 + b"\n"
    started = time.monotonic()
    with _no_syncs():
        for i in range(count):
            sender = f"user{i % 100}@localhost"
            rcpt = f"rcpt{i}@{DOWN}"
            head = f"Return-Path: <{sender}>\n".encode()
            text = (f"From: <{sender}>\nTo: <{rcpt}>\nSubject: queued {i}\n\n".encode()
                    + filler * max(1, size // len(filler)))
            path = spool / str(i)
            path.write_bytes(head + text)
            store.enqueue(
                Envelope(sender=sender, recipients=(Recipient(address=rcpt, destinations=(rcpt,)),),
                         client_address="127.0.0.1", helo="bench"),
                (rcpt,), path, len(head))
            path.unlink()  # the queue's hard link keeps the file
            if i and i % 20000 == 0:
                print(f"  queued {i:,} in {time.monotonic() - started:.0f} s", flush=True)
    os.sync()
    spool.rmdir()
    return time.monotonic() - started


def index_memory(config_path: Path) -> dict:
    """
    Build the index here, as the server does at start: its memory per
    entry (Python allocations still held) and the time.
    """
    store = QueueStore(load_config(str(config_path)))
    started = time.monotonic()
    index, corrupt = build_index(store)
    seconds = time.monotonic() - started
    del index
    gc.collect()
    tracemalloc.start()
    index, corrupt = build_index(store)
    gc.collect()
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"entries": len(index), "corrupt": len(corrupt), "bytes_per_entry": held / max(1, len(index)),
            "build_s_in_bench_process": seconds}


def timed_get(port: int, path: str, times: int) -> tuple[list[float], bytes]:
    seconds, body = [], b""
    for _ in range(times):
        started = time.perf_counter()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=60) as response:
            body = response.read()
        seconds.append(time.perf_counter() - started)
    return seconds, body


def sample(metrics_text: bytes, name: str) -> float:
    match = re.search(rb"^" + re.escape(name.encode()) + rb" (\S+)$", metrics_text, re.M)
    return float(match.group(1)) if match else 0.0


def timed_cli(peer: MailServerPeer, *args: str, times: int = 3) -> tuple[list[float], str]:
    seconds, out = [], ""
    for _ in range(times):
        started = time.perf_counter()
        result = peer.cli(*args)
        seconds.append(time.perf_counter() - started)
        if result.returncode != 0:
            raise RuntimeError(f"mailserver {' '.join(args)}: {result.stderr}")
        out = result.stdout
    return seconds, out


def etrn(port: int) -> tuple[float, str]:
    with smtplib.SMTP("127.0.0.1", port, timeout=120) as client:
        client.ehlo("bench.client")
        started = time.perf_counter()
        code, text = client.docmd("ETRN", DOWN)
        return time.perf_counter() - started, f"{code} {text.decode()}"


def load(peer: MailServerPeer, args) -> dict:
    """
    The SMTP load in C{args.rounds} rounds; latencies pooled.
    """
    run_load("127.0.0.1", peer.port, clients=10, messages=args.warmup, size=args.size)
    runs: list[LoadResult] = []
    for _ in range(args.rounds):
        runs.append(run_load("127.0.0.1", peer.port, clients=args.clients,
                             messages=args.load // args.rounds, size=args.size))
        print(f"    {runs[-1]}", flush=True)
    latencies = sorted(x for r in runs for x in r.latencies_ms)
    return {
        "msgs_per_s": statistics.median(r.msgs_per_s for r in runs),
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "errors": sum(r.errors for r in runs),
        "messages": len(latencies),
    }


def deferred(port: int) -> float:
    _, body = timed_get(port, "/metrics", 1)
    return sample(body, 'relay_deliveries_total{result="deferred"}')


def looks(peer: MailServerPeer, results: dict, middle: str | None) -> None:
    """
    What looking at the queue costs: /metrics, /api/queue, queue list.
    """
    seconds, body = timed_get(peer.admin_port, "/metrics", 20)
    results["metrics_s"] = {"median": statistics.median(seconds), "max": max(seconds)}
    results["queue_messages_gauge"] = sample(body, "relay_queue_messages")
    results["scan_s"] = sample(body, "relay_queue_scan_seconds")
    seconds, _ = timed_get(peer.admin_port, "/api/queue", 20)
    results["api_queue_s"] = {"median": statistics.median(seconds), "max": max(seconds)}
    seconds, out = timed_cli(peer, "queue", "list")
    results["queue_list_s"] = {"median": statistics.median(seconds), "max": max(seconds)}
    results["queue_list_footer"] = out.strip().splitlines()[-1] if out.strip() else ""
    if middle:
        seconds, _ = timed_cli(peer, "queue", "list", "--after", middle)
        results["queue_list_middle_s"] = {"median": statistics.median(seconds), "max": max(seconds)}
    print(f"    {json.dumps(results)}", flush=True)


def read_time(peer: MailServerPeer, timeout: float) -> float:
    """
    The server's own figure for reading the queue at start.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(r"relay: (\d+) queued messages read in ([\d.]+) s",
                          peer.log_path.read_text(errors="replace"))
        if match:
            return float(match.group(2))
        time.sleep(0.2)
    raise RuntimeError("the server never said it had read its queue")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=100_000, help="queued messages")
    p.add_argument("--queued-size", type=int, default=1024, help="octets per queued message")
    p.add_argument("--load", type=int, default=3000, help="SMTP messages per load")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--size", type=int, default=1024, help="octets per SMTP message")
    p.add_argument("--retry-wait", type=float, default=900.0,
                   help="seconds to wait for every queued message to be tried once")
    p.add_argument("--no-settle", action="store_true")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)

    leftovers = Leftovers()
    results: dict = {"messages": args.messages}
    relay = f'[relay]\ntransports = ["{DOWN}=127.0.0.1:{free_port()}"]\n'
    try:
        results["settle"] = settle(leftovers, wait=not args.no_settle)

        print("empty queue:", flush=True)
        with contextlib.ExitStack() as stack:
            peer = MailServerPeer(extra_toml=relay, admin=True, keep=True)
            leftovers.add(peer.root)
            stack.enter_context(peer)
            empty = results["empty"] = {"rss_start_kib": rss_kib(peer.pid)}
            looks(peer, empty, None)
            empty["load"] = load(peer, args)
            empty["rss_end_kib"] = rss_kib(peer.pid)

        print(f"filling a queue with {args.messages:,} messages:", flush=True)
        peer = MailServerPeer(extra_toml=relay, admin=True, keep=True)
        leftovers.add(peer.root)
        full = results["full"] = {}
        full["fill_s"] = fill(peer.config_path, args.messages, args.queued_size)
        full["index"] = index_memory(peer.config_path)
        print(f"  {full['fill_s']:.0f} s; {json.dumps(full['index'])}", flush=True)
        ids = sorted(n[:-5] for n in os.listdir(peer.data_path / "queue" / "envelopes"))
        middle = ids[len(ids) // 2]
        del ids

        print("full queue, being retried:", flush=True)
        with peer:
            full["read_s"] = read_time(peer, timeout=600)
            full["rss_after_read_kib"] = rss_kib(peer.pid)
            print(f"  read in {full['read_s']:.2f} s; RSS {full['rss_after_read_kib'] / 1024:.0f} MiB",
                  flush=True)
            retrying = full["retrying"] = {"deferred_before": deferred(peer.admin_port)}
            started = time.monotonic()
            looks(peer, retrying, middle)
            retrying["load"] = load(peer, args)
            retrying["deferred_after"] = deferred(peer.admin_port)
            retrying["retries_per_s"] = ((retrying["deferred_after"] - retrying["deferred_before"])
                                         / (time.monotonic() - started))

            deadline = time.monotonic() + args.retry_wait
            while deferred(peer.admin_port) < args.messages and time.monotonic() < deadline:
                time.sleep(5)
            tried = deferred(peer.admin_port)
            full["all_tried_once"] = tried >= args.messages
            full["tried_s_after_start"] = time.monotonic() - started
            print(f"  {tried:,.0f} retries {full['tried_s_after_start']:.0f} s after the first look",
                  flush=True)

            print("full queue, nothing due:", flush=True)
            quiet = full["quiet"] = {}
            looks(peer, quiet, middle)
            quiet["load"] = load(peer, args)
            full["etrn_s"], full["etrn_reply"] = etrn(peer.port)
            print(f"  ETRN {DOWN}: {full['etrn_s'] * 1000:.0f} ms, {full['etrn_reply']}", flush=True)
            full["rss_end_kib"] = rss_kib(peer.pid)
    finally:
        leftovers.remove()
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def report(results: dict) -> None:
    empty, full = results["empty"], results["full"]
    ms = lambda s: f"{s * 1000:.1f} ms"  # noqa: E731
    print()
    print(f"| | empty queue | {results['messages']:,} queued, retrying | same, nothing due |")
    print("| --- | --- | --- | --- |")
    rows = [
        ("RSS", f"{empty['rss_end_kib'] / 1024:.0f} MiB",
         f"{full['rss_after_read_kib'] / 1024:.0f} MiB after the read", f"{full['rss_end_kib'] / 1024:.0f} MiB"),
        ("`/metrics` (median / max of 20)", *(f"{ms(r['metrics_s']['median'])} / {ms(r['metrics_s']['max'])}"
                                              for r in (empty, full["retrying"], full["quiet"]))),
        ("`/api/queue` first page", *(f"{ms(r['api_queue_s']['median'])} / {ms(r['api_queue_s']['max'])}"
                                      for r in (empty, full["retrying"], full["quiet"]))),
        ("`mailserver queue list` (median of 3)", *(ms(r["queue_list_s"]["median"])
                                                    for r in (empty, full["retrying"], full["quiet"]))),
        ("last scan", *(ms(r["scan_s"]) for r in (empty, full["retrying"], full["quiet"]))),
        ("SMTP msgs/s", *(f"{r['load']['msgs_per_s']:.0f}" for r in (empty, full["retrying"], full["quiet"]))),
        ("SMTP accept p50 / p99", *(f"{r['load']['p50_ms']:.1f} / {r['load']['p99_ms']:.1f} ms"
                                    for r in (empty, full["retrying"], full["quiet"]))),
    ]
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()
    index = full["index"]
    print(f"queue filled in {full['fill_s']:.0f} s; read at start in {full['read_s']:.2f} s; index "
          f"{index['bytes_per_entry']:.0f} bytes per entry (tracemalloc); "
          f"{full['retrying']['retries_per_s']:.0f} retries/s while measured; every message tried "
          f"once {full['tried_s_after_start']:.0f} s after the first look"
          f"{'' if full['all_tried_once'] else ' (NOT all tried by then)'}; "
          f"queue list --after <middle>: {ms(full['quiet']['queue_list_middle_s']['median'])}; "
          f"ETRN {ms(full['etrn_s'])} ({full['etrn_reply']})")


if __name__ == "__main__":
    sys.exit(main())
