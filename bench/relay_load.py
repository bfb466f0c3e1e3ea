"""
Relay throughput: our server and Postfix each take N messages for a remote
domain over SMTP and relay them to its MX, a sink on loopback, in the same
run (L{bench.relay_peers} has the sink, the DNS and the two relays).

A round, for one relay:

 1. C{clients} connections to the relay (10), each greeted, EHLO, and (ours)
    logged in once with AUTH PLAIN, before the clock starts.
 2. The clock starts as the first message's MAIL goes out ("the first
    enqueue"). The clients send N messages between them, one after the
    other on their connection (MAIL, RCPT, DATA in one write when PIPELINING
    is offered, the body, the dot, the 250), all to C{user@remote.test}.
 3. The relay's queue takes each one (fsynced before the 250: both are
    durable) and relays it to C{remote.test}'s MX, the sink.
 4. The clock stops at the sink's N-th 250 ("the last remote 250").
    msgs/s = N / that time. Then the relay's queue must empty (so the work
    after the last 250, such as removing the queue files, is in its CPU)
    and every connection to the sink close (Postfix keeps idle ones for
    2 s): CPU ms/msg = the relay's CPU (every process of its session) from
    step 2 to here over N; connections = the sink's sessions in the round.

The rounds of the two relays alternate (the order rotates); the figures are
the medians. Run alone::

    .venv/bin/python bench/relay_load.py                  # 1 KiB and 100 KiB
    .venv/bin/python bench/relay_load.py --quick --sizes 1024

or as part of C{bench/run.py} (its relay part).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.peers import cpu_seconds, peak_rss_kib, reset_peak_rss
from bench.settle import Leftovers, settle, settle_report
from bench.relay_peers import (
    PASSWORD,
    REMOTE_RCPT,
    SENDER,
    BenchDNS,
    MailServerRelayPeer,
    PostfixRelayPeer,
    RelaySink,
)
from bench.smtp_client import check, command, expect, greet, read_reply
from bench.smtp_load import make_body, run_async

RELAY_PEERS = ("mailserver", "postfix")


@dataclass
class Injection:
    """
    What the clients sent: C{accepted} messages got their 250, the first
    MAIL left at C{first} and the last 250 came at C{last} (monotonic).
    """

    accepted: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    first: float = 0.0
    last: float = 0.0
    client_cpu_s: float = 0.0


async def _open(host: str, port: int, auth: tuple[str, str] | None, timeout: float):
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
        lines = await greet(reader, writer, ehlo="bench.client")
        pipelining = any(l.split(b" ", 1)[0].upper() == b"PIPELINING" for l in lines[1:])
        if auth is not None:
            token = base64.b64encode(f"\0{auth[0]}\0{auth[1]}".encode()).decode("ascii")
            check(*(await command(reader, writer, f"AUTH PLAIN {token}")), 235, "AUTH")
        return reader, writer, pipelining


async def inject(host: str, port: int, *, messages: int, size: int, clients: int,
                 auth: tuple[str, str] | None, on_ready, timeout: float = 120.0,
                 first_seq: int = 0) -> Injection:
    """
    Open C{clients} connections, call C{on_ready()}, then send C{messages}
    messages of C{size} octets between them.
    """
    result = Injection()
    connections = await asyncio.gather(*(_open(host, port, auth, timeout)
                                         for _ in range(clients)))
    on_ready()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    next_seq = iter(range(first_seq, first_seq + messages))
    mail = f"MAIL FROM:<{SENDER}> SIZE={size}\r\n".encode()
    rcpt = f"RCPT TO:<{REMOTE_RCPT}>\r\n".encode()

    async def client(reader, writer, pipelining) -> None:
        for seq in next_seq:
            body = make_body(size, seq, SENDER, REMOTE_RCPT) + b".\r\n"
            try:
                async with asyncio.timeout(timeout):
                    if not result.first:
                        result.first = time.monotonic()
                    if pipelining:
                        writer.write(mail + rcpt + b"DATA\r\n")
                        replies = [await read_reply(reader) for _ in range(3)]
                        check(*replies[0], 250, "MAIL")
                        check(*replies[1], 250, "RCPT")
                        check(*replies[2], 354, "DATA")
                    else:
                        for line, code, step in ((mail, 250, "MAIL"), (rcpt, 250, "RCPT"),
                                                 (b"DATA\r\n", 354, "DATA")):
                            writer.write(line)
                            await expect(reader, code, step)
                    writer.write(body)
                    await expect(reader, 250, "end of DATA")
                result.accepted += 1
                result.last = time.monotonic()
            except Exception as e:  # noqa: BLE001 - counted, the connection is dropped
                result.errors += 1
                if len(result.error_samples) < 5:
                    result.error_samples.append(f"{type(e).__name__}: {e}"[:200])
                writer.transport.abort()
                return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(command(reader, writer, b"QUIT"), 10)
        writer.close()

    await asyncio.gather(*(client(*c) for c in connections))
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    result.client_cpu_s = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return result


def _cpu(peer) -> float:
    return cpu_seconds(peer.pid)


def measure(peer, sink: RelaySink, *, size: int, messages: int, clients: int,
            timeout: float, first_seq: int = 0) -> dict:
    """
    One round against a started relay (see the module's docstring).
    """
    before: dict = {}

    def ready() -> None:
        reset_peak_rss(peer.pid)
        before["cpu"] = _cpu(peer)
        before["sessions"], before["messages"] = sink.counts()

    auth = (SENDER, PASSWORD) if isinstance(peer, MailServerRelayPeer) else None
    injection = run_async(inject("127.0.0.1", peer.port, messages=messages, size=size,
                                 clients=clients, auth=auth, on_ready=ready, timeout=timeout,
                                 first_seq=first_seq))
    target = before["messages"] + injection.accepted
    last_250 = sink.wait_messages(target, timeout=60 + messages * 0.2)
    drained = peer.wait_queue_empty(timeout=60)
    idle = sink.wait_idle()
    cpu = _cpu(peer) - before["cpu"]
    sessions, relayed = sink.counts()
    elapsed = (last_250 - injection.first) if last_250 else float("nan")
    notes = []
    if last_250 is None:
        notes.append(f"only {relayed - before['messages']} of {injection.accepted} reached the sink")
    if not drained:
        notes.append("the queue did not empty")
    if not idle:
        notes.append("connections to the sink still open")
    return {
        "accepted": injection.accepted,
        "errors": injection.errors,
        "error_samples": injection.error_samples,
        "relayed": relayed - before["messages"],
        "elapsed_s": elapsed,
        "msgs_per_s": injection.accepted / elapsed if last_250 else 0.0,
        "accept_msgs_per_s": (injection.accepted / (injection.last - injection.first)
                              if injection.last > injection.first else 0.0),
        "server_cpu_s": cpu,
        "connections": sessions - before["sessions"],
        "peak_rss_kib": peak_rss_kib(peer.pid),
        "client_cpu_s": injection.client_cpu_s,
        "notes": notes,
    }


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    if not n:
        return float("nan")
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def _summarise(row: dict, runs: list[dict]) -> None:
    accepted = sum(r["accepted"] for r in runs)
    row.update(
        runs=len(runs),
        msgs_per_s=_median([r["msgs_per_s"] for r in runs]),
        msgs_per_s_all=[round(r["msgs_per_s"], 1) for r in runs],
        accept_msgs_per_s=_median([r["accept_msgs_per_s"] for r in runs]),
        accepted=accepted,
        relayed=sum(r["relayed"] for r in runs),
        errors=sum(r["errors"] for r in runs),
        error_samples=[e for r in runs for e in r["error_samples"]][:5],
        server_cpu_ms_per_msg=sum(r["server_cpu_s"] for r in runs) * 1000 / max(1, accepted),
        connections=sum(r["connections"] for r in runs),
        msgs_per_connection=accepted / max(1, sum(r["connections"] for r in runs)),
        peak_rss_mib=max(r["peak_rss_kib"] for r in runs) / 1024,
        notes=sorted({n for r in runs for n in r["notes"]}),
    )


def ours_label(workers: int) -> str:
    return "mailserver" if workers == 1 else f"mailserver-w{workers}"


def relay_factories(args, dns: BenchDNS, sink: RelaySink, base_code: Path | None = None) -> list:
    """
    @param base_code: a checkout of C{--base}, run as C{mailserver-base}
        beside the working tree's C{mailserver} (a same-run A/B).
    """
    factories = []
    for name in args.relay_peers:
        if name == "mailserver":
            for w in args.relay_workers:
                factories.append((ours_label(w), lambda w=w: MailServerRelayPeer(
                    dns, sink.port, relay_toml=args.relay_toml, keep=args.keep, workers=w)))
            if base_code is not None:
                w = args.relay_workers[0]
                factories.append(("mailserver-base", lambda: MailServerRelayPeer(
                    dns, sink.port, relay_toml=args.relay_toml, keep=args.keep, code=base_code,
                    workers=w)))
        elif name == "postfix":
            why = PostfixRelayPeer.why_unavailable()
            if why:
                print(f"relay postfix: skipped: {why}", flush=True)
                continue
            factories.append(("postfix", lambda: PostfixRelayPeer(dns, sink.port, keep=args.keep)))
    return factories


def relay_part(args, results: dict, leftovers=None) -> None:
    """
    For each size: start the relays, warm each up (C{--warmup} messages,
    relayed and drained), then the measured rounds, the relays taking
    turns. One DNS server and one sink serve the whole part.
    """
    rows = results.setdefault("relay", [])
    with contextlib.ExitStack() as outer:
        dns = outer.enter_context(BenchDNS())
        sink = outer.enter_context(RelaySink())
        results["relay_setup"] = {"sink": sink.kind, "dns_port_53": dns.on_port_53,
                                  "resolver": dns.resolver}
        print(f"relay: sink {sink.kind} on port {sink.port}, DNS {dns.resolver}", flush=True)
        base_code = None
        if getattr(args, "base", None):
            from bench.ab import worktree

            base_code = outer.enter_context(worktree(args.base))
            results["relay_setup"]["base"] = args.base
            print(f"relay: mailserver-base is {args.base} (in {base_code})", flush=True)
        factories = relay_factories(args, dns, sink, base_code)
        seq = 0
        for size in args.sizes:
            total = args.relay_messages_1k if size <= 4096 else args.relay_messages_100k
            per_round = max(1, total // args.repeat)
            with contextlib.ExitStack() as stack:
                started = []
                for label, factory in factories:
                    row = {"peer": label, "size": size, "clients": args.relay_clients}
                    rows.append(row)
                    print(f"relay {label} {_label(size)}: starting", flush=True)
                    try:
                        peer = factory()
                        if leftovers is not None and not peer.keep:
                            peer.keep = True
                            leftovers.add(peer.root)
                        stack.enter_context(peer)
                        if isinstance(peer, PostfixRelayPeer):
                            row["dns"] = "same zone" if peer.dns else "transport map"
                        else:
                            row["dns"] = "same zone"
                        if args.warmup:
                            w = measure(peer, sink, size=size, messages=min(args.warmup, 100),
                                        clients=args.relay_clients, timeout=args.timeout,
                                        first_seq=seq)
                            seq += w["accepted"] + w["errors"]
                            if w["errors"] or w["notes"]:
                                print(f"  warm-up: {w['errors']} errors {w['error_samples'][:2]} "
                                      f"{w['notes']}", flush=True)
                        started.append((label, peer, row, []))
                    except Exception as e:  # noqa: BLE001 - report it, go on with the other
                        row["failed"] = f"{type(e).__name__}: {e}"[:2000]
                        print(f"  FAILED: {row['failed']}", flush=True)
                for round_ in range(args.repeat):
                    k = round_ % max(1, len(started))
                    for label, peer, row, runs in started[k:] + started[:k]:
                        try:
                            m = measure(peer, sink, size=size, messages=per_round,
                                        clients=args.relay_clients, timeout=args.timeout,
                                        first_seq=seq)
                        except Exception as e:  # noqa: BLE001 - report it, go on
                            row["failed"] = f"{type(e).__name__}: {e}"[:2000]
                            print(f"  {label}: FAILED: {row['failed']}", flush=True)
                            continue
                        seq += per_round
                        runs.append(m)
                        print(
                            f"  relay {label} {_label(size)} round {round_ + 1}/{args.repeat}: "
                            f"{m['accepted']} accepted, {m['relayed']} relayed in "
                            f"{m['elapsed_s']:.2f}s = {m['msgs_per_s']:.0f} msgs/s (accepting "
                            f"{m['accept_msgs_per_s']:.0f}/s); {m['connections']} connections; "
                            f"CPU {m['server_cpu_s'] * 1000 / max(1, m['accepted']):.2f} ms/msg"
                            + (f"; {'; '.join(m['notes'])}" if m["notes"] else "")
                            + (f"; errors {m['errors']} {m['error_samples'][:2]}"
                               if m["errors"] else ""),
                            flush=True,
                        )
                for label, peer, row, runs in started:
                    if runs:
                        _summarise(row, runs)


def _label(size: int) -> str:
    return f"{size // 1024} KiB" if size % 1024 == 0 else f"{size} B"


def relay_report(rows: list[dict], setup: dict, table, lines: list[str]) -> None:
    lines.append(
        f"Relay: N messages over SMTP ({rows[0]['clients']} connections, several messages each) "
        f"to a remote domain whose MX is {setup.get('sink', '?')} on loopback; from the first "
        "MAIL to the sink's last 250. msgs/s is the median of the rounds; CPU is the relay's "
        "(all its processes), from the first MAIL until its queue is empty:"
    )
    body = []
    for r in rows:
        if "msgs_per_s" not in r:
            body.append([r["peer"], _label(r["size"]), "FAILED" if "failed" in r else "no data"]
                        + ["-"] * 8)
            continue
        body.append([
            r["peer"], _label(r["size"]), f"{r['msgs_per_s']:.0f}",
            "/".join(f"{x:.0f}" for x in r["msgs_per_s_all"]), f"{r['accept_msgs_per_s']:.0f}",
            f"{r['server_cpu_ms_per_msg']:.2f}", f"{r['connections']}",
            f"{r['msgs_per_connection']:.1f}", f"{r['relayed']}/{r['accepted']}",
            str(r["errors"]), r.get("dns", "-"),
        ])
    table(["relay", "size", "msgs/s", "msgs/s per round", "accepting msgs/s", "CPU ms/msg",
           "connections", "msgs/connection", "relayed/accepted", "errors", "DNS"], body)
    for r in rows:
        if "failed" in r:
            lines.append(f"Relay {r['peer']} {_label(r['size'])}: FAILED: {r['failed'][:300]}")
        for note in r.get("notes") or []:
            lines.append(f"Relay {r['peer']} {_label(r['size'])}: {note}")
        for sample in (r.get("error_samples") or [])[:2]:
            lines.append(f"Relay {r['peer']} {_label(r['size'])}: error: {sample}")
    by = {(r["peer"], r["size"]): r for r in rows if r.get("msgs_per_s")}
    ours_first = next((r["peer"] for r in rows if r["peer"].startswith("mailserver")
                       and r["peer"] != "mailserver-base"), "mailserver")
    for (peer, size), base in sorted(by.items()):
        new = by.get((ours_first, size))
        if peer != "mailserver-base" or new is None:
            continue
        lines.append(
            f"Relay A/B {_label(size)}: the working tree over {setup.get('base', 'the base')} "
            f"{new['msgs_per_s'] / base['msgs_per_s']:.2f}x msgs/s, CPU per message "
            f"{new['server_cpu_ms_per_msg'] / base['server_cpu_ms_per_msg']:.2f}x (same run)")
    for (peer, size), ours in sorted(by.items()):
        theirs = by.get(("postfix", size))
        if not peer.startswith("mailserver") or peer == "mailserver-base" or theirs is None:
            continue
        ratio = ours["msgs_per_s"] / theirs["msgs_per_s"]
        cpu = ours["server_cpu_ms_per_msg"] / theirs["server_cpu_ms_per_msg"]
        lines.append(
            f"Relay ratio {_label(size)}: {peer} over Postfix {ratio:.2f}x msgs/s (same run; "
            f"goal > 1x: {'met' if ratio > 1 else 'NOT met'}), CPU per message {cpu:.2f}x")
    if not setup.get("dns_port_53"):
        lines.append("Relay: the zone could not listen on port 53, so Postfix used a transport "
                     "map to the sink (no DNS) while ours asked the zone.")
    lines.append("")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--relay-messages-1k", type=int, default=None,
                   help="relayed messages per relay for sizes <= 4 KiB, over all rounds (2000)")
    p.add_argument("--relay-messages-100k", type=int, default=None,
                   help="relayed messages per relay for larger sizes, over all rounds (600)")
    p.add_argument("--relay-clients", type=int, default=10,
                   help="connections sending to each relay (several messages each)")
    p.add_argument("--relay-workers", default=None,
                   help="our server's 'workers' setting, comma-separated for one run each "
                        "(1,2: mailserver and mailserver-w2; quick: 1)")
    p.add_argument("--relay-peers", default=",".join(RELAY_PEERS),
                   help="comma-separated: mailserver, postfix")
    p.add_argument("--relay-toml", default="",
                   help="extra lines for our server's [relay] table (an A/B of a setting)")
    p.add_argument("--base", metavar="REV", default=None,
                   help="also relay with our server at git revision REV (mailserver-base, "
                        "from a temporary worktree): an A/B of the code in the same run")


def finish_arguments(p: argparse.ArgumentParser, args) -> None:
    for key, (q, full) in {"relay_messages_1k": (400, 2000),
                           "relay_messages_100k": (150, 600)}.items():
        if getattr(args, key) is None:
            setattr(args, key, q if args.quick else full)
    args.relay_peers = [s.strip() for s in args.relay_peers.split(",") if s.strip()]
    unknown = set(args.relay_peers) - set(RELAY_PEERS)
    if unknown:
        p.error(f"unknown relay peers: {', '.join(sorted(unknown))}")
    args.relay_clients = max(1, min(args.relay_clients, 200))
    if args.relay_workers is None:
        args.relay_workers = "1" if args.quick else "1,2"
    try:
        args.relay_workers = [max(1, min(int(w), 16)) for w in
                              str(args.relay_workers).split(",") if w.strip()] or [1]
    except ValueError:
        p.error(f"--relay-workers: not a list of numbers: {args.relay_workers!r}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="relay throughput, ours and Postfix (bench/README.md)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--sizes", default="1024,102400")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--keep", action="store_true")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--no-settle", action="store_true",
                   help="measure at once, even while creating a file is slow (see bench/settle.py)")
    add_arguments(p)
    args = p.parse_args(argv)
    finish_arguments(p, args)
    args.sizes = [int(s) for s in args.sizes.split(",") if s]
    args.repeat = max(1, min(args.repeat, 20))
    results: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    leftovers = Leftovers()
    try:
        results["settle"] = settle(leftovers, wait=not args.no_settle)
        relay_part(args, results, leftovers)
    except KeyboardInterrupt:
        print("interrupted; reporting what was measured", flush=True)
    finally:
        leftovers.remove()
    lines: list[str] = []

    def table(header, body):
        if args.markdown:
            lines.append("| " + " | ".join(header) + " |")
            lines.append("|" + "|".join("---" for _ in header) + "|")
            lines.extend("| " + " | ".join(r) + " |" for r in body)
        else:
            widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h)
                      for i, h in enumerate(header)]
            lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
            lines.extend("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in body)
        lines.append("")

    settled = settle_report(results.get("settle"))
    if settled:
        lines.extend([settled, ""])
    if results.get("relay"):
        relay_report(results["relay"], results.get("relay_setup", {}), table, lines)
    print()
    print(f"{results['started']}")
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
