"""
The benchmark runner: our server against its peers, side by side, in one run.

    .venv/bin/python bench/run.py            # full run (a few minutes)
    .venv/bin/python bench/run.py --quick    # smaller counts (about a minute)

Parts (each can be skipped; a part that fails is reported and the rest go
on):

 1. SMTP: for each message size and each peer, start the peer, warm it up,
    run the load (N clients, one connection per message), read the server's
    CPU time and peak RSS from /proc, stop it.
 2. POP3: 4 clients, each fetching its own mailbox of 1,000 x 10 KiB with
    LIST + UIDL + RETR of every message.
 3. Big mailbox: PASS, STAT, LIST, UIDL timed on a 100,000-message mailbox.
 4. Idle connections: RSS growth per idle SMTP connection with 1,000 open.

See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.idle import idle_memory
from bench.peers import (
    AiosmtpdPeer,
    MailServerPeer,
    PostfixPeer,
    cpu_seconds,
    peak_rss_kib,
    reset_peak_rss,
)
from bench.pop3_load import fill_maildir, run_pop3_load, time_listing
from bench.smtp_load import loop_kind, percentile, run_load

# What the project's speed issue reports for peers (2-core machine, loopback,
# one connection per message, 50 clients), msgs/s by message size.
PUBLISHED = {
    "aiosmtpd": {1024: 870, 102400: 320},
    "postfix": {1024: 690, 102400: 620},
}
PUBLISHED_DOVECOT_POP3 = 9200
IDLE_TARGET_KIB = 4.0
LISTING_TARGET_S = 1.0


def machine() -> dict:
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_generator_loop": loop_kind(),
    }


def size_label(size: int) -> str:
    return f"{size // 1024} KiB" if size % 1024 == 0 else f"{size} B"


# Part 1: SMTP


def peer_factories(args) -> list:
    factories = []
    for name in args.peers:
        if name == "aiosmtpd":
            factories.append(("aiosmtpd", lambda: AiosmtpdPeer(deliver=args.aiosmtpd_deliver, keep=args.keep)))
        elif name == "mailserver":
            for w in args.workers:
                label = "mailserver" if w == 1 else f"mailserver-w{w}"
                factories.append((label, lambda w=w: MailServerPeer(workers=w, keep=args.keep)))
        elif name == "postfix":
            if PostfixPeer.available():
                factories.append(("postfix", lambda: PostfixPeer(keep=args.keep)))
            else:
                print("postfix: /usr/sbin/postfix not found (or not root): skipped", flush=True)
    return factories


_BUSY_FIELDS = (0, 1, 2, 5, 6)  # user nice system irq softirq (not idle, iowait, steal)


def _system_ticks() -> tuple[int, int]:
    """
    (busy, steal) clock ticks of the whole machine so far, from /proc/stat.
    """
    with open("/proc/stat") as f:
        values = [int(x) for x in f.readline().split()[1:]]
    return sum(values[i] for i in _BUSY_FIELDS), values[7] if len(values) > 7 else 0


def _measure(peer, args, size: int, messages: int) -> dict:
    """
    One measured load run against a started, warmed-up peer.
    """
    delivered_before = peer.delivered()
    reset_peak_rss(peer.pid)
    busy0, steal0 = _system_ticks()
    cpu0 = cpu_seconds(peer.pid)
    r = run_load(
        "127.0.0.1", peer.port, clients=args.clients, messages=messages, size=size,
        timeout=args.timeout,
    )
    cpu1 = cpu_seconds(peer.pid)
    busy1, steal1 = _system_ticks()
    tck = os.sysconf("SC_CLK_TCK")
    server_cpu = cpu1 - cpu0
    busy = (busy1 - busy0) / tck
    return {
        "result": r,
        "server_cpu_s": server_cpu,
        "peak_rss_kib": peak_rss_kib(peer.pid),
        "delivered": peer.delivered() - delivered_before,
        # CPU used on the machine by neither the server nor the load
        # generator during the run (other people's work), in cores.
        "background_cores": max(0.0, busy - server_cpu - r.client_cpu_s) / r.elapsed_s if r.elapsed_s else 0.0,
        "steal_cores": (steal1 - steal0) / tck / r.elapsed_s if r.elapsed_s else 0.0,
    }


def _summarise(row: dict, runs: list[dict]) -> None:
    results = [m["result"] for m in runs]
    rates = sorted(r.msgs_per_s for r in results)
    ok = sum(r.sent_ok for r in results)
    latencies = sorted(l for r in results for l in r.latencies_ms)

    samples = [e for r in results for e in r.error_samples]
    row.update(
        runs=len(runs),
        msgs_per_s=rates[len(rates) // 2] if len(rates) % 2 else sum(rates[len(rates) // 2 - 1 : len(rates) // 2 + 1]) / 2,
        msgs_per_s_all=[round(x, 1) for x in (r.msgs_per_s for r in results)],
        p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99),
        ok=ok,
        errors=sum(r.errors for r in results),
        quit_errors=sum(r.quit_errors for r in results),
        error_samples=samples[:5],
        pipelining=results[-1].pipelining,
        server_cpu_ms_per_msg=sum(m["server_cpu_s"] for m in runs) * 1000 / max(1, ok),
        client_cpu_ms_per_msg=sum(r.client_cpu_s for r in results) * 1000 / max(1, ok),
        peak_rss_mib=max(m["peak_rss_kib"] for m in runs) / 1024,
        delivered=sum(m["delivered"] for m in runs),
        background_cores=sum(m["background_cores"] for m in runs) / len(runs),
        steal_cores=sum(m["steal_cores"] for m in runs) / len(runs),
    )
    if row["delivered"] != ok and row["peer"] != "postfix":
        row["note"] = f"{ok} accepted but {row['delivered']} new files in new/"


def smtp_part(args, results: dict) -> None:
    """
    For each size: start every peer, warm each up, then run the measured
    load in rounds, the peers taking turns within a round (the order rotates
    each round), so slow drifts of the machine (other people's work, the
    disk) hit all peers alike.  msgs/s is the median over the rounds;
    latencies are pooled; CPU is the total over the total.
    """
    rows = results.setdefault("smtp", [])
    factories = peer_factories(args)
    for size in args.sizes:
        total = args.messages_1k if size <= 4096 else args.messages_100k
        per_round = max(1, total // args.repeat)
        with contextlib.ExitStack() as stack:
            started = []
            for label, factory in factories:
                row = {"peer": label, "size": size, "messages": per_round * args.repeat, "clients": args.clients}
                rows.append(row)
                print(f"SMTP {label} {size_label(size)}: starting", flush=True)
                try:
                    peer = stack.enter_context(factory())
                    if args.warmup:
                        w = run_load(
                            "127.0.0.1", peer.port, clients=min(10, args.clients),
                            messages=args.warmup, size=size, timeout=args.timeout,
                        )
                        if w.errors:
                            print(f"  warm-up errors: {w.errors} {w.error_samples[:2]}", flush=True)
                    started.append((label, peer, row, []))
                except Exception as e:  # noqa: BLE001 - report it, go on with the other peers
                    row["failed"] = f"{type(e).__name__}: {e}"[:2000]
                    print(f"  FAILED: {row['failed']}", flush=True)
            time.sleep(0.5)
            for round_ in range(args.repeat):
                k = round_ % max(1, len(started))
                for label, peer, row, runs in started[k:] + started[:k]:
                    if "failed" in row:
                        continue
                    try:
                        m = _measure(peer, args, size, per_round)
                    except Exception as e:  # noqa: BLE001 - report it, go on
                        row["failed"] = f"{type(e).__name__}: {e}"[:2000]
                        print(f"  {label}: FAILED: {row['failed']}", flush=True)
                        continue
                    runs.append(m)
                    r = m["result"]
                    print(
                        f"  {label} {size_label(size)} round {round_ + 1}/{args.repeat}: {r}; server CPU "
                        f"{m['server_cpu_s'] * 1000 / max(1, r.sent_ok):.2f} ms/msg, background "
                        f"{m['background_cores']:.2f} cores", flush=True,
                    )
                    for sample in r.error_samples[:3]:
                        print(f"    error: {sample}", flush=True)
            for label, peer, row, runs in started:
                if runs:
                    _summarise(row, runs)


# Part 0: what durable Maildir storage alone costs on this machine


def storage_floor(results: dict, n: int = 500) -> None:
    """
    The durable-delivery sequence alone, in one thread, no network: create
    + write 1 KiB + fsync + close + rename into new/ + fsync new/.  Its
    CPU (mostly kernel) per message is a floor under every durable peer's
    CPU ms/msg on this machine.
    """
    import resource
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="bench-floor-"))
    try:
        (root / "tmp").mkdir()
        (root / "new").mkdir()
        data = b"x" * 1024
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        for i in range(n):
            path = root / "tmp" / str(i)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(path, root / "new" / str(i))
            dfd = os.open(root / "new", os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        wall = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    results["storage_floor"] = {
        "messages": n,
        "wall_ms_per_msg": wall * 1000 / n,
        "user_ms_per_msg": (r1.ru_utime - r0.ru_utime) * 1000 / n,
        "sys_ms_per_msg": (r1.ru_stime - r0.ru_stime) * 1000 / n,
    }
    print(f"storage floor: {results['storage_floor']}", flush=True)


# Part 2 and 3: POP3


def pop3_part(args, results: dict) -> None:
    out = results.setdefault("pop3", {})
    users = [f"pop{i}@localhost" for i in range(1, args.pop3_clients + 1)]
    big_user = "big@localhost"
    wanted_users = (users if not args.skip_pop3 else []) + ([big_user] if not args.skip_big else [])
    if not wanted_users:
        return
    print("POP3: starting mailserver", flush=True)
    try:
        with MailServerPeer(users=tuple(wanted_users), keep=args.keep) as peer:
            if not peer.pop3_port:
                raise RuntimeError("the server reported no pop3 listener")
            if not args.skip_pop3:
                t = time.perf_counter()
                for u in users:
                    fill_maildir(peer.maildir(u), args.pop3_messages, args.pop3_size, tag=u.split("@")[0])
                print(f"  filled {len(users)} x {args.pop3_messages} x {args.pop3_size} B in "
                      f"{time.perf_counter() - t:.1f}s", flush=True)
                reset_peak_rss(peer.pid)
                cpu0 = cpu_seconds(peer.pid)
                r = run_pop3_load(peer.pop3_port, users, peer.password, window=args.pop3_window)
                cpu1 = cpu_seconds(peer.pid)
                out["fetch"] = dict(
                    r.summary(),
                    messages_per_mailbox=args.pop3_messages,
                    size=args.pop3_size,
                    server_cpu_ms_per_msg=(cpu1 - cpu0) * 1000 / max(1, r.messages),
                    peak_rss_mib=peak_rss_kib(peer.pid) / 1024,
                )
                print(f"  fetch: {r}", flush=True)
            if not args.skip_big:
                t = time.perf_counter()
                fill_maildir(peer.maildir(big_user), args.big_mailbox, 200, tag="big")
                print(f"  filled {args.big_mailbox} x 200 B in {time.perf_counter() - t:.1f}s", flush=True)
                timings = time_listing(peer.pop3_port, big_user, peer.password)
                timings["messages"] = args.big_mailbox
                out["big_mailbox"] = timings
                print(f"  big mailbox: {timings}", flush=True)
    except Exception as e:  # noqa: BLE001 - report it, go on
        out["failed"] = f"{type(e).__name__}: {e}"[:2000]
        print(f"  FAILED: {out['failed']}", flush=True)


# Part 4: idle connections


def idle_part(args, results: dict) -> None:
    rows = results.setdefault("idle", [])
    peers = [("mailserver", lambda: MailServerPeer(keep=args.keep))]
    if "aiosmtpd" in args.peers:
        peers.append(("aiosmtpd", lambda: AiosmtpdPeer(deliver=args.aiosmtpd_deliver, keep=args.keep)))
    for label, factory in peers:
        print(f"idle {label}: {args.idle} connections", flush=True)
        row = {"peer": label, "connections": args.idle}
        rows.append(row)
        try:
            with factory() as peer:
                r = idle_memory(peer.port, peer.pid, args.idle)
                row.update(
                    opened=r.opened, failed=r.failed, rss_before_kib=r.rss_before_kib,
                    rss_with_kib=r.rss_with_kib, rss_after_close_kib=r.rss_after_close_kib,
                    kib_per_connection=r.kib_per_connection, error_samples=r.error_samples,
                )
                print(f"  {r}", flush=True)
        except Exception as e:  # noqa: BLE001 - report it, go on
            row["failed_run"] = f"{type(e).__name__}: {e}"[:2000]
            print(f"  FAILED: {row['failed_run']}", flush=True)


# Report


def _f(value, fmt: str) -> str:
    if value is None:
        return "-"
    try:
        return format(value, fmt)
    except (TypeError, ValueError):
        return str(value)


def report(results: dict, markdown: bool) -> str:
    lines: list[str] = []
    m = results["machine"]
    lines.append(
        f"Machine: {m['nproc']} CPUs, {m['cpu']}, Linux {m['kernel']}, Python {m['python']}, "
        f"load generator on {m['load_generator_loop']}; {results['started']}"
    )
    lines.append("")

    def table(header: list[str], body: list[list[str]]) -> None:
        if markdown:
            lines.append("| " + " | ".join(header) + " |")
            lines.append("|" + "|".join("---" for _ in header) + "|")
            for r in body:
                lines.append("| " + " | ".join(r) + " |")
        else:
            widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
            lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
            for r in body:
                lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)))
        lines.append("")

    floor = results.get("storage_floor")
    if floor:
        lines.append(
            f"Storage floor (one thread, no network: create, write 1 KiB, fsync, rename into new/, "
            f"fsync new/): {floor['wall_ms_per_msg']:.2f} ms wall, {floor['user_ms_per_msg'] + floor['sys_ms_per_msg']:.2f} ms CPU "
            f"({floor['sys_ms_per_msg']:.2f} ms kernel) per message"
        )
        lines.append("")
    smtp = results.get("smtp") or []
    if smtp:
        c = smtp[0]["clients"]
        lines.append(
            f"SMTP, {c} clients, one connection per message, fsync before 250; msgs/s is the median "
            f"of {smtp[0].get('runs', '?')} interleaved rounds:"
        )
        body = []
        for r in smtp:
            if "failed" in r or "msgs_per_s" not in r:
                body.append([r["peer"], size_label(r["size"]), "FAILED" if "failed" in r else "no data"] + ["-"] * 8)
                continue
            body.append([
                r["peer"], size_label(r["size"]), _f(r["msgs_per_s"], ".0f"),
                _f(r["p50_ms"], ".1f"), _f(r["p99_ms"], ".1f"),
                _f(r["server_cpu_ms_per_msg"], ".2f"), _f(r["peak_rss_mib"], ".1f"),
                f"{r['errors']}/{r['ok'] + r['errors']}", _f(r["client_cpu_ms_per_msg"], ".2f"),
                "/".join(f"{x:.0f}" for x in r["msgs_per_s_all"]), _f(r["background_cores"], ".2f"),
            ])
        table(["peer", "size", "msgs/s", "p50 ms", "p99 ms", "CPU ms/msg", "peak RSS MiB",
               "errors", "load-gen CPU ms/msg", "msgs/s per round", "background cores"], body)
        for r in smtp:
            for key in ("failed", "note"):
                if key in r:
                    lines.append(f"{r['peer']} {size_label(r['size'])}: {key}: {r[key][:300]}")
            for sample in (r.get("error_samples") or [])[:2]:
                lines.append(f"{r['peer']} {size_label(r['size'])}: error: {sample}")
        if any(r.get(k) for r in smtp for k in ("failed", "note", "error_samples")):
            lines.append("")
        # Ratios: each of ours over each other peer, same size.
        by = {(r["peer"], r["size"]): r for r in smtp if "failed" not in r and r.get("ok")}
        ours = sorted({p for p, _ in by if p.startswith("mailserver")})
        others = sorted({p for p, _ in by if not p.startswith("mailserver")})
        body = []
        for size in sorted({s for _, s in by}):
            for o in ours:
                if (o, size) not in by:
                    continue
                mine = by[(o, size)]["msgs_per_s"]
                for p in others:
                    if (p, size) in by:
                        ratio = mine / by[(p, size)]["msgs_per_s"]
                        target = 2.0 if p == "aiosmtpd" else 1.0
                        body.append([o, p, size_label(size), f"{ratio:.2f}x", f">= {target:.0f}x",
                                     "met" if ratio >= target else "NOT met"])
                # Postfix not measured here: compare with its published figure
                # (another machine), and with that figure scaled by how this
                # machine runs aiosmtpd against aiosmtpd's published figure
                # (a crude estimate: it scales Python speed, not a C MTA's).
                if ("postfix", size) not in by and size in PUBLISHED["postfix"]:
                    published = PUBLISHED["postfix"][size]
                    ratio = mine / published
                    body.append([o, f"postfix (published {published}/s)", size_label(size), f"{ratio:.2f}x",
                                 ">= 1x", "met (pub.)" if ratio >= 1 else "NOT met (pub.)"])
                    if ("aiosmtpd", size) in by:
                        scale = by[("aiosmtpd", size)]["msgs_per_s"] / PUBLISHED["aiosmtpd"][size]
                        estimate = published * scale
                        ratio = mine / estimate
                        body.append([o, f"postfix (scaled est. {estimate:.0f}/s)", size_label(size),
                                     f"{ratio:.2f}x", ">= 1x", "met (est.)" if ratio >= 1 else "NOT met (est.)"])
        if body:
            lines.append("Ratios (our msgs/s over the peer's, same run):")
            table(["ours", "peer", "size", "ratio", "target", ""], body)

    pop3 = results.get("pop3") or {}
    if "failed" in pop3:
        lines.append(f"POP3: FAILED: {pop3['failed'][:300]}")
        lines.append("")
    if "fetch" in pop3:
        f = pop3["fetch"]
        lines.append(
            f"POP3 fetch: {f['clients']} clients x {f['messages_per_mailbox']} msgs x {size_label(f['size'])} "
            f"(LIST+UIDL+RETR all, pipelining {f['pipelining']}): {f['msgs_per_s']:.0f} msgs/s, "
            f"{f['mib_per_s']:.1f} MiB/s, server CPU {f['server_cpu_ms_per_msg']:.3f} ms/msg, "
            f"client CPU {f['client_cpu_s'] * 1000 / max(1, f['messages']):.3f} ms/msg, "
            f"errors {f['errors']}, size mismatches {f['size_mismatches']} "
            f"(Dovecot, published: ~{PUBLISHED_DOVECOT_POP3} msgs/s)"
        )
        lines.append("")
    if "big_mailbox" in pop3:
        b = pop3["big_mailbox"]
        worst = max(b.get(k, 0) for k in ("pass_s", "stat_s", "list_s", "uidl_s"))
        lines.append(
            f"Big mailbox ({b['messages']} msgs): PASS {b['pass_s']:.3f}s, STAT {b['stat_s']:.3f}s, "
            f"LIST {b['list_s']:.3f}s, UIDL {b['uidl_s']:.3f}s "
            f"(target < {LISTING_TARGET_S:.0f}s each: {'met' if worst < LISTING_TARGET_S else 'NOT met'}); "
            f"STAT said {b.get('stat')!r}"
        )
        lines.append("")
    idle = results.get("idle") or []
    for r in idle:
        if "failed_run" in r:
            lines.append(f"Idle SMTP connections, {r['peer']}: FAILED: {r['failed_run'][:300]}")
        else:
            verdict = ""
            if r["peer"].startswith("mailserver"):
                verdict = f" (target <= {IDLE_TARGET_KIB:.0f}: {'met' if r['kib_per_connection'] <= IDLE_TARGET_KIB else 'NOT met'})"
            lines.append(
                f"Idle SMTP connections, {r['peer']}: {r['opened']}/{r['connections']} open, "
                f"RSS {r['rss_before_kib'] / 1024:.1f} -> {r['rss_with_kib'] / 1024:.1f} MiB = "
                f"{r['kib_per_connection']:.2f} KiB/connection{verdict}"
                + (f", {r['failed']} failed" if r["failed"] else "")
            )
    return "\n".join(lines).rstrip() + "\n"


def parse_args(argv):
    p = argparse.ArgumentParser(description="mailserver benchmarks (see bench/README.md)")
    p.add_argument("--quick", action="store_true", help="small counts, for a check in about a minute")
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--sizes", default="1024,102400", help="message sizes in octets, comma-separated")
    p.add_argument("--messages-1k", type=int, default=None, help="messages per peer for sizes <= 4 KiB, over all rounds (3000)")
    p.add_argument("--messages-100k", type=int, default=None, help="messages per peer for larger sizes, over all rounds (1000)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up messages before each run (200)")
    p.add_argument("--repeat", type=int, default=None,
                   help="rounds per peer and size, peers interleaved; messages are split over them (3)")
    p.add_argument("--timeout", type=float, default=30.0, help="per SMTP reply, seconds")
    p.add_argument("--peers", default="aiosmtpd,mailserver,postfix",
                   help="comma-separated: aiosmtpd, mailserver, postfix")
    p.add_argument("--workers", default=None,
                   help="our server's worker-process counts to run, comma-separated (1,2)")
    p.add_argument("--aiosmtpd-deliver", choices=["thread", "inline"], default="thread")
    p.add_argument("--pop3-clients", type=int, default=4)
    p.add_argument("--pop3-messages", type=int, default=None, help="messages per mailbox (1000)")
    p.add_argument("--pop3-size", type=int, default=10240)
    p.add_argument("--pop3-window", type=int, default=8, help="RETRs in flight when PIPELINING")
    p.add_argument("--big-mailbox", type=int, default=None, help="messages in the big mailbox (100000)")
    p.add_argument("--idle", type=int, default=None, help="idle SMTP connections (1000)")
    for part in ("smtp", "pop3", "big", "idle"):
        p.add_argument(f"--skip-{part}", action="store_true")
    p.add_argument("--json", metavar="FILE", help="also write all figures to FILE as JSON")
    p.add_argument("--markdown", action="store_true", help="print the tables in Markdown")
    p.add_argument("--keep", action="store_true", help="keep the peers' temporary folders")
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {
        "messages_1k": (500, 3000),
        "messages_100k": (200, 1000),
        "warmup": (50, 200),
        "pop3_messages": (200, 1000),
        "big_mailbox": (10000, 100000),
        "idle": (1000, 1000),
        "repeat": (2, 3),
        "workers": ("1", "1,2"),
    }
    for key, (q, full) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, q if quick else full)
    args.sizes = [int(s) for s in args.sizes.split(",") if s]
    args.peers = [s.strip() for s in args.peers.split(",") if s.strip()]
    args.workers = [int(w) for w in args.workers.split(",") if w]
    # Bounds, whatever is asked.
    args.clients = max(1, min(args.clients, 1000))
    args.repeat = max(1, min(args.repeat, 20))
    args.idle = max(1, min(args.idle, 5000))
    args.big_mailbox = max(1, min(args.big_mailbox, 1_000_000))
    return args


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM too unwinds the with-blocks, so every server is stopped.
    signal.signal(signal.SIGTERM, _interrupt)
    results: dict = {
        "machine": machine(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "args": {k: v for k, v in vars(args).items()},
    }
    print(f"machine: {results['machine']}", flush=True)
    t0 = time.monotonic()
    try:
        storage_floor(results)
        if not args.skip_smtp:
            smtp_part(args, results)
        if not (args.skip_pop3 and args.skip_big):
            pop3_part(args, results)
        if not args.skip_idle:
            idle_part(args, results)
    except KeyboardInterrupt:
        print("interrupted; reporting what was measured", flush=True)
    except Exception:  # noqa: BLE001 - report what was measured anyway
        traceback.print_exc()
    results["elapsed_s"] = time.monotonic() - t0
    print()
    print(report(results, args.markdown))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
