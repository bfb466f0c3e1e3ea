"""
A relay queue of 100,000 messages for a domain that is down, in the real
server (issue 22): what the queue costs in memory and start-up, what
looking at it costs, and whether SMTP clients notice.

In one run:

 1. settle (L{bench.settle}), then a server with an empty queue, alone:
    C{/metrics}, C{/api/queue}, C{mailserver queue list}, RSS, and the SMTP
    load (L{bench.smtp_load}, local delivery);
 2. a second server's queue filled with N messages for C{down.test},
    routed (C{relay.transports}) to a loopback port nobody listens on, by
    the queue's own writer (L{QueueStore.enqueue}) with its syncs left out
    and one C{sync} at the end: the same files, minutes sooner; the index's
    memory per entry measured here with C{tracemalloc};
 3. that server started beside the first: the time it takes to read its
    queue (its log line), RSS; every message is due, so it tries them, a
    few fail to connect, and C{down.test} rests (a minute, then two:
    C{retry_schedule = ["1m"]}, C{max_retry_interval = "2m"}) while the
    others wait in memory; each time a rest ends the whole queue is due
    again;
 4. at once, and again C{--later} seconds after the start: C{/metrics},
    C{/api/queue}, C{mailserver queue list} (the first page and one from
    the middle), the last scan's time (the C{relay_queue_scan_seconds}
    gauge), and the SMTP load against both servers, taking turns round by
    round, so that the machine's drifts (other people's work) hit both
    alike; how many queued messages were tried meanwhile and how many
    rests began;
 5. ETRN for C{down.test} (which ends the rest: every message is due).

Usage (from the repository root; 100,000 messages take about 12 minutes on
2 cores, most of it filling the queue)::

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
from mailserver.relay import admin as queue_admin  # noqa: E402
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
    store = QueueStore(load_config(str(config_path)).queue_path)
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
    store = QueueStore(load_config(str(config_path)).queue_path)
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


def list_work(peer: MailServerPeer, times: int = 5) -> float:
    """
    What C{queue list} does after the console script's start-up (Python,
    imports, reading and checking the configuration): list the folder and
    read one page, here in this process; the median.
    """
    config = load_config(str(peer.config_path))
    args = argparse.Namespace(limit=queue_admin.PAGE, after=None)
    seconds = []
    for _ in range(times):
        started = time.perf_counter()
        queue_admin._list(config, args)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def etrn(port: int) -> tuple[float, str]:
    with smtplib.SMTP("127.0.0.1", port, timeout=120) as client:
        client.ehlo("bench.client")
        started = time.perf_counter()
        code, text = client.docmd("ETRN", DOWN)
        return time.perf_counter() - started, f"{code} {text.decode()}"


def warm(peer: MailServerPeer, args) -> None:
    run_load("127.0.0.1", peer.port, clients=10, messages=args.warmup, size=args.size)


def user_system_s(pid: int) -> tuple[float, float]:
    """
    The server's user and system CPU seconds so far (C{/proc/<pid>/stat}).
    """
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def summary(runs: list[LoadResult], cpu: list[tuple[float, float]]) -> dict:
    latencies = sorted(x for r in runs for x in r.latencies_ms)
    sent = max(1, sum(r.sent_ok for r in runs))
    return {
        "msgs_per_s": statistics.median(r.msgs_per_s for r in runs),
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "errors": sum(r.errors for r in runs),
        "messages": len(latencies),
        "user_ms_per_msg": 1000 * sum(u for u, _ in cpu) / sent,
        "system_ms_per_msg": 1000 * sum(s for _, s in cpu) / sent,
    }


def loads(peers: dict[str, MailServerPeer], args) -> dict[str, dict]:
    """
    The SMTP load, C{args.rounds} rounds per server, the servers taking
    turns (so the machine's drifts hit them alike); latencies pooled.
    """
    runs: dict[str, list[LoadResult]] = {name: [] for name in peers}
    cpu: dict[str, list[tuple[float, float]]] = {name: [] for name in peers}
    for round_ in range(args.rounds):
        names = list(peers)
        names = names[round_ % len(names):] + names[:round_ % len(names)]
        for name in names:
            user, system = user_system_s(peers[name].pid)
            runs[name].append(run_load("127.0.0.1", peers[name].port, clients=args.clients,
                                       messages=args.load // args.rounds, size=args.size))
            after = user_system_s(peers[name].pid)
            cpu[name].append((after[0] - user, after[1] - system))
            print(f"    {name}: {runs[name][-1]}; server CPU user {cpu[name][-1][0]:.2f} s, "
                  f"system {cpu[name][-1][1]:.2f} s", flush=True)
    return {name: summary(r, cpu[name]) for name, r in runs.items()}


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
    results["queue_list_work_s"] = list_work(peer)
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
        match = re.search(r"queued messages read count=(\d+), seconds=([\d.]+)",
                          peer.log_path.read_text(errors="replace"))
        if match:
            return float(match.group(2))
        time.sleep(0.2)
    raise RuntimeError("the server never said it had read its queue")


def rests(peer: MailServerPeer) -> int:
    """
    How many times the server has said C{DOWN} is not reachable.
    """
    return sum(path.read_text(errors="replace").count(f"relay: {DOWN} is not reachable")
               for path in peer.root.glob("twistd.log*"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=100_000, help="queued messages")
    p.add_argument("--queued-size", type=int, default=1024, help="octets per queued message")
    p.add_argument("--load", type=int, default=5000, help="SMTP messages per load and server")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--size", type=int, default=1024, help="octets per SMTP message")
    p.add_argument("--later", type=float, default=150.0,
                   help="seconds after the start for the second measurement")
    p.add_argument("--no-settle", action="store_true")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)

    leftovers = Leftovers()
    results: dict = {"messages": args.messages}
    # Rests of a minute, then two: a rest ends (and all the queue comes due
    # again) every minute or two while the bench measures.
    relay = (f'[relay]\ntransports = ["{DOWN}=127.0.0.1:{free_port()}"]\n'
             'retry_schedule = ["1m"]\nmax_retry_interval = "2m"\n')
    try:
        results["settle"] = settle(leftovers, wait=not args.no_settle)
        with contextlib.ExitStack() as stack:
            empty_peer = MailServerPeer(extra_toml=relay, admin=True, keep=True)
            leftovers.add(empty_peer.root)
            stack.enter_context(empty_peer)
            print("empty queue, alone:", flush=True)
            empty = results["empty"] = {"rss_start_kib": rss_kib(empty_peer.pid)}
            looks(empty_peer, empty, None)
            warm(empty_peer, args)
            empty["load"] = loads({"empty": empty_peer}, args)["empty"]

            print(f"filling a queue with {args.messages:,} messages:", flush=True)
            peer = MailServerPeer(extra_toml=relay, admin=True, keep=True)
            leftovers.add(peer.root)
            full = results["full"] = {}
            full["fill_s"] = fill(peer.config_path, args.messages, args.queued_size)
            full["index"] = index_memory(peer.config_path)
            print(f"  {full['fill_s']:.0f} s; {json.dumps(full['index'])}", flush=True)
            ids = sorted(n[:-5] for n in os.listdir(load_config(str(peer.config_path)).queue_path / "envelopes"))
            middle = ids[len(ids) // 2]
            del ids

            stack.enter_context(peer)
            started = time.monotonic()
            both = {"empty": empty_peer, "full": peer}
            full["read_s"] = read_time(peer, timeout=600)
            full["rss_after_read_kib"] = rss_kib(peer.pid)
            print(f"full queue, just read ({full['read_s']:.2f} s; RSS "
                  f"{full['rss_after_read_kib'] / 1024:.0f} MiB), the empty one beside it:", flush=True)
            for phase, wait_until in (("first", 0.0), ("later", args.later)):
                time.sleep(max(0.0, wait_until - (time.monotonic() - started)))
                if phase == "later":
                    print(f"{time.monotonic() - started:.0f} s after the start:", flush=True)
                measured = full[phase] = {}
                began = time.monotonic()
                looks(peer, measured, middle)
                warm(peer, args)
                measured["load"] = loads(both, args)
                measured["seconds"] = time.monotonic() - began
                measured["since_start_s"] = time.monotonic() - started
                measured["tries"] = deferred(peer.admin_port)
                measured["rests"] = rests(peer)
                print(f"  {measured['tries']:.0f} tries and {measured['rests']} rests of {DOWN} "
                      f"since the start, {measured['since_start_s']:.0f} s ago", flush=True)
            full["etrn_s"], full["etrn_reply"] = etrn(peer.port)
            print(f"  ETRN {DOWN}: {full['etrn_s'] * 1000:.0f} ms, {full['etrn_reply']}", flush=True)
            full["rss_end_kib"] = rss_kib(peer.pid)
            full["tries_total"] = deferred(peer.admin_port)
            empty["rss_end_kib"] = rss_kib(empty_peer.pid)
    finally:
        leftovers.remove()
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def report(results: dict) -> None:
    empty, full = results["empty"], results["full"]
    first, later = full["first"], full["later"]
    ms = lambda s: f"{s * 1000:.1f} ms"  # noqa: E731
    looked = (empty, first, later)
    print()
    print(f"| | empty queue | {results['messages']:,} queued, just read | the same, later |")
    print("| --- | --- | --- | --- |")
    rows = [
        ("RSS", f"{empty['rss_end_kib'] / 1024:.0f} MiB",
         f"{full['rss_after_read_kib'] / 1024:.0f} MiB", f"{full['rss_end_kib'] / 1024:.0f} MiB"),
        ("`/metrics`, median / max of 20", *(f"{ms(r['metrics_s']['median'])} / {ms(r['metrics_s']['max'])}"
                                             for r in looked)),
        ("`/api/queue` first page, median / max of 20",
         *(f"{ms(r['api_queue_s']['median'])} / {ms(r['api_queue_s']['max'])}" for r in looked)),
        ("`mailserver queue list`, median of 3", *(ms(r["queue_list_s"]["median"]) for r in looked)),
        ("of which the listing and the page", *(ms(r["queue_list_work_s"]) for r in looked)),
        ("last scan (`relay_queue_scan_seconds`)", *(ms(r["scan_s"]) for r in looked)),
        ("tries of queued messages since the start (rests begun)", "",
         *(f"{r['tries']:.0f} in {r['since_start_s']:.0f} s ({r['rests']})" for r in (first, later))),
    ]
    for name in ("empty", "full"):
        loads_ = (empty["load"] if name == "empty" else None, first["load"][name], later["load"][name])
        label = "the empty server" if name == "empty" else "the full server"
        rows.append((f"SMTP msgs/s, {label}", *(f"{x['msgs_per_s']:.0f}" if x else "" for x in loads_)))
        rows.append((f"SMTP accept p50 / p99, {label}",
                     *(f"{x['p50_ms']:.1f} / {x['p99_ms']:.1f} ms" if x else "" for x in loads_)))
        rows.append((f"server CPU per message, user + system, {label}",
                     *(f"{x['user_ms_per_msg']:.2f} + {x['system_ms_per_msg']:.2f} ms" if x else ""
                       for x in loads_)))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()
    index = full["index"]
    print(f"queue filled in {full['fill_s']:.0f} s; read at start in {full['read_s']:.2f} s; index "
          f"{index['bytes_per_entry']:.0f} bytes per entry (tracemalloc); "
          f"queue list --after <middle>: {ms(later['queue_list_middle_s']['median'])}; "
          f"ETRN {ms(full['etrn_s'])} ({full['etrn_reply']}); "
          f"{full['tries_total']:.0f} tries of queued messages in all")


if __name__ == "__main__":
    sys.exit(main())
