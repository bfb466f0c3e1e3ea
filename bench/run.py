"""
The benchmark runner: our server against its peers, side by side, in one run.

    .venv/bin/python bench/run.py            # full run (a few minutes)
    .venv/bin/python bench/run.py --quick    # smaller counts (about a minute)

Parts (each can be skipped; a part that fails is reported and the rest go
on):

 1. SMTP: for each message size, start every peer (ours, aiosmtpd, and
    Postfix and smtp-sink where the postfix package is installed; ours and
    Postfix again with every message scanned by one Rspamd, where the
    rspamd package is installed), warm each up, then run the load (N
    clients, one connection per message) in rounds, the peers taking
    turns; read each server's CPU time and peak RSS from /proc.
 2. POP3: ours and Dovecot (where installed), 4 clients, each fetching its
    own mailbox of 1,000 x 10 KiB with LIST + UIDL + RETR of every message.
 3. Big mailbox: PASS, STAT, LIST, UIDL timed on a 100,000-message mailbox,
    on each POP3 server.
 4. IMAP: ours and Dovecot's IMAP, 4 clients each fetching (UID FETCH
    BODY[]) its own mailbox of 1,000 x 10 KiB; then LOGIN, SELECT, STATUS
    and a FLAGS fetch on a 100,000-message folder (bench/imap_part.py).
 5. Idle connections: RSS growth per idle SMTP connection with 1,000 open.
 6. Relay: ours and Postfix each relaying N messages (1 KiB, 100 KiB) to a
    remote domain whose MX, found through a loopback DNS zone, is a sink
    (L{bench.relay_load}): msgs/s from the first MAIL to the last remote
    250, CPU per message, connections opened, and the ratio.

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
from bench.imap_part import imap_part, imap_report
from bench.peers import (
    AiosmtpdPeer,
    MailServerPeer,
    cpu_seconds,
    peak_rss_kib,
    pss_kib,
    reset_peak_rss,
)
from bench.pop3_load import fill_maildir, run_pop3_load, time_listing
from bench.relay_load import add_arguments as add_relay_arguments
from bench.relay_load import finish_arguments as finish_relay_arguments
from bench.relay_load import relay_part, relay_report
from bench.rspamd_peers import MailServerRspamdPeer, PostfixRspamdPeer, RspamdService
from bench.settle import Leftovers, settle, settle_report
from bench.smtp_load import loop_kind, percentile, run_load
from bench.system_peers import DovecotPeer, PostfixPeer, SmtpSinkPeer

# What the project's speed issue reports for peers (2-core machine, loopback,
# one connection per message, 50 clients), msgs/s by message size: printed
# for reference, and standing in for Postfix only where it is not installed.
PUBLISHED = {
    "aiosmtpd": {1024: 870, 102400: 320},
    "postfix": {1024: 690, 102400: 620},
}
PUBLISHED_DOVECOT_POP3 = 9200
# Our msgs/s over a peer's, at least; smtp-sink stores nothing, so it has
# no target (it is the ceiling).
TARGETS = {"aiosmtpd": 2.0, "postfix": 1.0}
SMTP_PEERS = ("aiosmtpd", "mailserver", "postfix", "smtp-sink", "mailserver-rspamd", "postfix-rspamd")
RSPAMD_PEERS = {"mailserver-rspamd": "mailserver", "postfix-rspamd": "postfix"}  # and without it
POP3_PEERS = ("mailserver", "dovecot")
DISPLAY = {"smtp-sink": "smtp-sink (ceiling, not durable)"}
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


def display(peer: str) -> str:
    return DISPLAY.get(peer, peer)


def _packaged(cls, label: str, factory) -> list:
    """
    [(label, factory)] if the Debian-packaged peer C{cls} can run here;
    else say why it is skipped and return [].
    """
    why = cls.why_unavailable()
    if why:
        print(f"{label}: skipped: {why}", flush=True)
        return []
    return [(label, factory)]


def peer_factories(args, rspamd: RspamdService | None = None) -> list:
    """
    @param rspamd: the running Rspamd the C{*-rspamd} peers ask, if any.
    """
    factories = []
    for name in args.peers:
        if name == "aiosmtpd":
            factories.append(("aiosmtpd", lambda: AiosmtpdPeer(deliver=args.aiosmtpd_deliver, keep=args.keep)))
        elif name == "mailserver":
            for w in args.workers:
                label = "mailserver" if w == 1 else f"mailserver-w{w}"
                factories.append((label, lambda w=w: MailServerPeer(workers=w, keep=args.keep)))
        elif name == "postfix":
            factories += _packaged(PostfixPeer, "postfix", lambda: PostfixPeer(keep=args.keep))
        elif name == "smtp-sink":
            factories += _packaged(SmtpSinkPeer, "smtp-sink", lambda: SmtpSinkPeer(keep=args.keep))
        elif name in RSPAMD_PEERS and rspamd is None:
            print(f"{name}: skipped: no Rspamd running", flush=True)
        elif name == "mailserver-rspamd":
            factories.append((name, lambda: MailServerRspamdPeer(rspamd, keep=args.keep)))
        elif name == "postfix-rspamd":
            factories += _packaged(PostfixRspamdPeer, name, lambda: PostfixRspamdPeer(rspamd, keep=args.keep))
    return factories


def start_rspamd(args, stack: contextlib.ExitStack, leftovers: Leftovers) -> RspamdService | None:
    """
    One Rspamd for every size, if a C{*-rspamd} peer is asked for and it is
    installed.
    """
    if not set(RSPAMD_PEERS) & set(args.peers):
        return None
    why = RspamdService.why_unavailable()
    if why:
        print(f"rspamd: skipped: {why}", flush=True)
        return None
    print("rspamd: starting", flush=True)
    try:
        service = RspamdService(keep=True)
        leftovers.add(service.root)
        return stack.enter_context(service)
    except Exception as e:  # noqa: BLE001 - report it, go on without it
        print(f"  rspamd: FAILED: {type(e).__name__}: {e}"[:2000], flush=True)
        return None


_BUSY_FIELDS = (0, 1, 2, 5, 6)  # user nice system irq softirq (not idle, iowait, steal)


def _system_ticks() -> tuple[int, int]:
    """
    (busy, steal) clock ticks of the whole machine so far, from /proc/stat.
    """
    with open("/proc/stat") as f:
        values = [int(x) for x in f.readline().split()[1:]]
    return sum(values[i] for i in _BUSY_FIELDS), values[7] if len(values) > 7 else 0


def _cpu(peer) -> float:
    """
    The peer's CPU seconds so far, with those of the helpers it asks about
    every message (Rspamd).
    """
    return cpu_seconds(peer.pid) + sum(cpu_seconds(pid) for pid in getattr(peer, "helper_pids", ()))


def _measure(peer, args, size: int, messages: int) -> dict:
    """
    One measured load run against a started, warmed-up peer.
    """
    delivered_before = peer.delivered()
    reset_peak_rss(peer.pid)
    busy0, steal0 = _system_ticks()
    cpu0 = _cpu(peer)
    r = run_load(
        "127.0.0.1", peer.port, clients=args.clients, messages=messages, size=size,
        timeout=args.timeout,
    )
    cpu_accepting = _cpu(peer)
    busy1, steal1 = _system_ticks()
    pss = pss_kib(peer.pid)
    # A peer that queues (Postfix) delivers to the Maildir after its 250:
    # wait for that before counting, so the next round starts with an empty
    # queue and the delivery work is in this round's CPU.
    drain_s = 0.0
    if peer.delivery == "queued":
        drain_s = peer.wait_delivered(delivered_before + r.sent_ok, timeout=60 + messages * 0.1)
    cpu1 = _cpu(peer)
    tck = os.sysconf("SC_CLK_TCK")
    busy = (busy1 - busy0) / tck
    delivered = peer.delivered() - delivered_before
    return {
        "result": r,
        "server_cpu_s": cpu1 - cpu0,
        "peak_rss_kib": peak_rss_kib(peer.pid),
        "pss_kib": pss,
        "delivered": delivered,
        "drain_s": drain_s,
        "delivered_per_s": delivered / (r.elapsed_s + drain_s) if r.elapsed_s else 0.0,
        # CPU used on the machine by neither the server nor the load
        # generator during the run (other people's work), in cores.
        "background_cores": max(0.0, busy - (cpu_accepting - cpu0) - r.client_cpu_s) / r.elapsed_s if r.elapsed_s else 0.0,
        "steal_cores": (steal1 - steal0) / tck / r.elapsed_s if r.elapsed_s else 0.0,
    }


def median(values: list[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def _summarise(row: dict, runs: list[dict]) -> None:
    results = [m["result"] for m in runs]
    ok = sum(r.sent_ok for r in results)
    latencies = sorted(l for r in results for l in r.latencies_ms)

    samples = [e for r in results for e in r.error_samples]
    row.update(
        runs=len(runs),
        msgs_per_s=median([r.msgs_per_s for r in results]),
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
        pss_mib=max(m["pss_kib"] for m in runs) / 1024,
        delivered=sum(m["delivered"] for m in runs),
        delivered_per_s=median([m["delivered_per_s"] for m in runs]),
        drain_s=max(m["drain_s"] for m in runs),
        background_cores=sum(m["background_cores"] for m in runs) / len(runs),
        steal_cores=sum(m["steal_cores"] for m in runs) / len(runs),
    )
    if row["delivered"] != ok and row["delivery"] != "discarded":
        row["note"] = f"{ok} accepted but {row['delivered']} new files in new/"


def smtp_part(args, results: dict, leftovers: Leftovers) -> None:
    """
    For each size: start every peer, warm each up, then run the measured
    load in rounds, the peers taking turns within a round (the order rotates
    each round), so slow drifts of the machine (other people's work, the
    disk) hit all peers alike.  msgs/s is the median over the rounds;
    latencies are pooled; CPU is the total over the total.  The peers'
    folders are removed when the run ends, not between the sizes, where
    removing thousands of files would slow the next size's file creation
    (L{bench.settle}).
    """
    rows = results.setdefault("smtp", [])
    with contextlib.ExitStack() as helpers:
        factories = peer_factories(args, start_rspamd(args, helpers, leftovers))
        _smtp_sizes(args, rows, factories, leftovers)


def _smtp_sizes(args, rows: list[dict], factories: list, leftovers: Leftovers) -> None:
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
                    peer = factory()
                    if not peer.keep:
                        peer.keep = True
                        leftovers.add(peer.root)
                    stack.enter_context(peer)
                    row["delivery"] = peer.delivery
                    if args.warmup:
                        w = run_load(
                            "127.0.0.1", peer.port, clients=min(10, args.clients),
                            messages=args.warmup, size=size, timeout=args.timeout,
                        )
                        if w.errors:
                            print(f"  warm-up errors: {w.errors} {w.error_samples[:2]}", flush=True)
                        if peer.delivery == "queued":
                            peer.wait_delivered(w.sent_ok, timeout=120)
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
                    stored = "" if peer.delivery == "discarded" else f", {m['delivered']} in the Maildir"
                    if m["drain_s"]:
                        stored += f" {m['drain_s']:.2f}s after the last 250"
                    print(
                        f"  {label} {size_label(size)} round {round_ + 1}/{args.repeat}: {r}{stored}; server CPU "
                        f"{m['server_cpu_s'] * 1000 / max(1, r.sent_ok):.2f} ms/msg, background "
                        f"{m['background_cores']:.2f} cores", flush=True,
                    )
                    for sample in r.error_samples[:3]:
                        print(f"    error: {sample}", flush=True)
            for label, peer, row, runs in started:
                if runs:
                    _summarise(row, runs)
                if runs and hasattr(peer, "scanned") and not peer.scanned():
                    note = "the last message stored has no X-Spamd-Result: not scanned?"
                    row["note"] = f"{row['note']}; {note}" if "note" in row else note


# Part 0: what durable Maildir storage alone costs on this machine


def storage_floor(results: dict, leftovers: Leftovers, n: int = 500, key: str = "storage_floor") -> None:
    """
    The durable-delivery sequence alone, in one thread, no network: create
    + write 1 KiB + fsync + close + rename into new/ + fsync new/.  Its
    CPU (mostly kernel) per message is a floor under every durable peer's
    CPU ms/msg on this machine.  Measured before the SMTP part and again
    after it: on a virtual machine whose storage slows down and recovers,
    the two differ, and the SMTP ratios of that run are less sure.  Its
    files go with C{leftovers} (see L{bench.settle}).
    """
    import resource

    root = leftovers.folder("bench-floor-")
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
    results[key] = {
        "messages": n,
        "wall_ms_per_msg": wall * 1000 / n,
        "user_ms_per_msg": (r1.ru_utime - r0.ru_utime) * 1000 / n,
        "sys_ms_per_msg": (r1.ru_stime - r0.ru_stime) * 1000 / n,
    }
    print(f"{key.replace('_', ' ')}: {results[key]}", flush=True)


# Part 2 and 3: POP3


def pop3_peer_factories(args, users: tuple[str, ...]) -> list:
    """
    Our server always (POP3 is its part), once per C{--workers} count (as
    Dovecot runs a process per connection, ours may run one per core),
    Dovecot if asked for and installed.
    """
    factories = [
        ("mailserver" if w == 1 else f"mailserver-w{w}",
         lambda w=w: MailServerPeer(users=users, workers=w, keep=args.keep))
        for w in args.workers
    ]
    if "dovecot" in args.peers:
        factories += _packaged(DovecotPeer, "dovecot", lambda: DovecotPeer(users=users, keep=args.keep))
    return factories


def _fill(peer, user: str, count: int, size: int) -> None:
    path = peer.maildir(user)
    fill_maildir(path, count, size, tag=user.split("@")[0])
    peer.own_mailbox(path)


def _fetch(peer, users: list[str], args) -> dict:
    reset_peak_rss(peer.pid)
    cpu0 = cpu_seconds(peer.pid)
    r = run_pop3_load(peer.pop3_port, users, peer.password, window=args.pop3_window)
    cpu1 = cpu_seconds(peer.pid)
    return {"result": r, "server_cpu_s": cpu1 - cpu0, "peak_rss_kib": peak_rss_kib(peer.pid)}


def _summarise_fetch(row: dict, runs: list[dict]) -> None:
    results = [m["result"] for m in runs]
    messages = sum(r.messages for r in results)
    row.update(
        runs=len(runs),
        msgs_per_s=median([r.msgs_per_s for r in results]),
        msgs_per_s_all=[round(r.msgs_per_s, 1) for r in results],
        mib_per_s=median([r.mib_per_s for r in results]),
        messages=messages,
        errors=sum(r.errors for r in results),
        size_mismatches=sum(r.size_mismatches for r in results),
        error_samples=[e for r in results for e in r.error_samples][:5],
        pipelining=results[-1].pipelining,
        server_cpu_ms_per_msg=sum(m["server_cpu_s"] for m in runs) * 1000 / max(1, messages),
        client_cpu_ms_per_msg=sum(r.client_cpu_s for r in results) * 1000 / max(1, messages),
        peak_rss_mib=max(m["peak_rss_kib"] for m in runs) / 1024,
        login_ms=median([s * 1000 for r in results for s in r.login_s]) if any(r.login_s for r in results) else None,
        fetch_msgs_per_s=median([r.fetch_msgs_per_s for r in results]),
    )


def pop3_part(args, results: dict) -> None:
    """
    Every POP3 peer gets the same mailboxes (L{fill_maildir}, same sizes
    and names) and the same warm-up (two logins to a one-message mailbox).
    A fetch marks what it RETRs as seen (both servers move the files to
    cur/), so each round has mailboxes of its own and every fetch is a
    first one; the peers take turns within a round, as in the SMTP
    part.  Then each lists the big mailbox once.
    """
    out = results.setdefault("pop3", {})
    rounds = [
        [f"pop{i}r{k}@localhost" for i in range(1, args.pop3_clients + 1)]
        for k in range(1, args.repeat + 1)
    ] if not args.skip_pop3 else []
    big_user = "big@localhost"
    warm_user = "warm@localhost"
    users = (
        tuple(u for r in rounds for u in r)
        + ((warm_user,) if rounds else ())
        + (() if args.skip_big else (big_user,))
    )
    if not users:
        return
    fetch_rows = out.setdefault("fetch", [])
    big_rows = out.setdefault("big_mailbox", [])
    with contextlib.ExitStack() as stack:
        started = []
        for label, factory in pop3_peer_factories(args, users):
            row = {"peer": label, "clients": args.pop3_clients, "messages_per_mailbox": args.pop3_messages,
                   "size": args.pop3_size}
            print(f"POP3 {label}: starting", flush=True)
            try:
                peer = stack.enter_context(factory())
                if not peer.pop3_port:
                    raise RuntimeError("no pop3 listener")
                t = time.perf_counter()
                for u in (u for r in rounds for u in r):
                    _fill(peer, u, args.pop3_messages, args.pop3_size)
                if rounds:
                    _fill(peer, warm_user, 1, 200)
                    print(f"  filled {len(rounds) * args.pop3_clients} x {args.pop3_messages} x "
                          f"{args.pop3_size} B in {time.perf_counter() - t:.1f}s", flush=True)
                started.append((label, peer, row, []))
            except Exception as e:  # noqa: BLE001 - report it, go on with the other peers
                row["failed"] = f"{type(e).__name__}: {e}"[:2000]
                print(f"  FAILED: {row['failed']}", flush=True)
            if rounds:
                fetch_rows.append(row)
            elif "failed" in row:
                big_rows.append({"peer": label, "messages": args.big_mailbox, "failed": row["failed"]})
        # The fills leave tens of MiB of dirty pages; written back during
        # the first rounds, they would slow whichever peer fetches then.
        os.sync()
        # Warm-up, as the SMTP part's: two logins to a one-message mailbox,
        # so one-time costs (a first login's processes and threads, our
        # server timing its scrypt implementations) are not in round 1.
        if rounds:
            for label, peer, row, _ in started:
                try:
                    for _ in range(2):
                        time_listing(peer.pop3_port, warm_user, peer.password)
                except Exception as e:  # noqa: BLE001 - report it, go on
                    row["failed"] = f"warm-up: {type(e).__name__}: {e}"[:2000]
                    print(f"  {label}: FAILED: {row['failed']}", flush=True)
        for k, round_users in enumerate(rounds):
            turn = k % max(1, len(started))
            for label, peer, row, runs in started[turn:] + started[:turn]:
                if "failed" in row:
                    continue
                try:
                    m = _fetch(peer, round_users, args)
                except Exception as e:  # noqa: BLE001 - report it, go on
                    row["failed"] = f"{type(e).__name__}: {e}"[:2000]
                    print(f"  {label}: FAILED: {row['failed']}", flush=True)
                    continue
                runs.append(m)
                print(f"  {label} fetch round {k + 1}/{len(rounds)}: {m['result']}", flush=True)
        for label, peer, row, runs in started:
            if runs:
                _summarise_fetch(row, runs)
        if args.skip_big:
            return
        for label, peer, _, _ in started:
            row = {"peer": label, "messages": args.big_mailbox}
            big_rows.append(row)
            try:
                t = time.perf_counter()
                _fill(peer, big_user, args.big_mailbox, 200)
                print(f"  {label}: filled {args.big_mailbox} x 200 B in {time.perf_counter() - t:.1f}s", flush=True)
                os.sync()
                row.update(time_listing(peer.pop3_port, big_user, peer.password))
                print(f"  {label} big mailbox: {row}", flush=True)
            except Exception as e:  # noqa: BLE001 - report it, go on
                row["failed"] = f"{type(e).__name__}: {e}"[:2000]
                print(f"  {label} big mailbox: FAILED: {row['failed']}", flush=True)


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


def _stored(r: dict) -> str:
    """
    Where the accepted messages ended up: "discarded", or Maildir files over
    messages accepted, with how long the last ones took after the load.
    """
    if r.get("delivery") == "discarded":
        return "discarded"
    text = f"{r['delivered']}/{r['ok']}"
    if r.get("delivery") == "queued":
        text += f" (+{r['drain_s']:.1f}s)"
    return text


def smtp_report(smtp: list[dict], table, lines: list[str]) -> None:
    c = smtp[0]["clients"]
    runs = next((r["runs"] for r in smtp if "runs" in r), "?")
    lines.append(
        f"SMTP, {c} clients, one connection per message; msgs/s (accepted: 250 after DATA) is the "
        f"median of {runs} interleaved rounds. Durable peers fsync before 250 (Postfix: its queue "
        f"file; Maildir delivery follows, in 'delivered msgs/s'):"
    )
    body = []
    for r in smtp:
        name = display(r["peer"])
        if "failed" in r or "msgs_per_s" not in r:
            body.append([name, size_label(r["size"]), "FAILED" if "failed" in r else "no data"] + ["-"] * 11)
            continue
        delivered = "-" if r.get("delivery") == "discarded" else _f(r["delivered_per_s"], ".0f")
        body.append([
            name, size_label(r["size"]), _f(r["msgs_per_s"], ".0f"), delivered,
            _f(r["p50_ms"], ".1f"), _f(r["p99_ms"], ".1f"),
            _f(r["server_cpu_ms_per_msg"], ".2f"), _f(r["peak_rss_mib"], ".1f"), _f(r["pss_mib"], ".1f"),
            f"{r['errors']}/{r['ok'] + r['errors']}", _stored(r), _f(r["client_cpu_ms_per_msg"], ".2f"),
            "/".join(f"{x:.0f}" for x in r["msgs_per_s_all"]), _f(r["background_cores"], ".2f"),
        ])
    table(["peer", "size", "msgs/s", "delivered msgs/s", "p50 ms", "p99 ms", "CPU ms/msg", "peak RSS MiB",
           "PSS MiB", "errors", "in Maildir", "load-gen CPU ms/msg", "msgs/s per round", "background cores"], body)
    for r in smtp:
        for key in ("failed", "note"):
            if key in r:
                lines.append(f"{display(r['peer'])} {size_label(r['size'])}: {key}: {r[key][:300]}")
        for sample in (r.get("error_samples") or [])[:2]:
            lines.append(f"{display(r['peer'])} {size_label(r['size'])}: error: {sample}")
    if any(r.get(k) for r in smtp for k in ("failed", "note", "error_samples")):
        lines.append("")
    body = _ratios(smtp)
    if body:
        lines.append("Ratios (our msgs/s over the peer's, same run):")
        table(["ours", "peer", "size", "ratio", "target", ""], body)
    body = _rspamd_overhead(smtp)
    if body:
        lines.append(
            "Rspamd (every message scanned by one Rspamd with no network rules; its CPU counted with "
            "the server's): msgs/s with and without, same run; reported, not a target:"
        )
        table(["with Rspamd", "size", "msgs/s", "without", "msgs/s", "overhead", "CPU ms/msg (with / without)"],
              body)
    measured = {r["peer"] for r in smtp if r.get("ok")}
    if measured & set(PUBLISHED):
        lines.append(
            "For reference, the speed issue's published figures (another, faster machine; not compared): "
            + "; ".join(
                f"{p} " + " / ".join(f"{v} msgs/s at {size_label(k)}" for k, v in sorted(PUBLISHED[p].items()))
                for p in sorted(PUBLISHED)
            )
        )
        lines.append("")


def _ratios(smtp: list[dict]) -> list[list[str]]:
    """
    Each of our rows over each other peer's, same size.  Where Postfix is
    not measured (not installed), its published figure and that figure
    scaled by measured/published aiosmtpd stand in, marked as such.
    """
    by = {(r["peer"], r["size"]): r for r in smtp
          if "failed" not in r and r.get("ok") and r["peer"] not in RSPAMD_PEERS}
    ours = sorted({p for p, _ in by if p.startswith("mailserver")})
    others = sorted({p for p, _ in by if not p.startswith("mailserver")})
    body = []
    for size in sorted({s for _, s in by}):
        for o in ours:
            if (o, size) not in by:
                continue
            mine = by[(o, size)]["msgs_per_s"]
            for p in others:
                if (p, size) not in by:
                    continue
                ratio = mine / by[(p, size)]["msgs_per_s"]
                target = TARGETS.get(p)
                if target is None:
                    body.append([o, display(p), size_label(size), f"{ratio:.2f}x", "-", "ceiling"])
                else:
                    body.append([o, p, size_label(size), f"{ratio:.2f}x", f">= {target:g}x",
                                 "met" if ratio >= target else "NOT met"])
            if ("postfix", size) not in by and size in PUBLISHED["postfix"]:
                published = PUBLISHED["postfix"][size]
                ratio = mine / published
                body.append([o, f"postfix (not measured: published {published}/s)", size_label(size),
                             f"{ratio:.2f}x", ">= 1x", "met (pub.)" if ratio >= 1 else "NOT met (pub.)"])
                if ("aiosmtpd", size) in by:
                    scale = by[("aiosmtpd", size)]["msgs_per_s"] / PUBLISHED["aiosmtpd"][size]
                    estimate = published * scale
                    ratio = mine / estimate
                    body.append([o, f"postfix (not measured: scaled est. {estimate:.0f}/s)", size_label(size),
                                 f"{ratio:.2f}x", ">= 1x", "met (est.)" if ratio >= 1 else "NOT met (est.)"])
    return body


def _rspamd_overhead(smtp: list[dict]) -> list[list[str]]:
    """
    Each C{*-rspamd} row beside the same server's row without Rspamd.
    """
    by = {(r["peer"], r["size"]): r for r in smtp if "failed" not in r and r.get("ok")}
    body = []
    for (peer, size), scanned in sorted(by.items()):
        plain = by.get((RSPAMD_PEERS.get(peer, ""), size))
        if peer not in RSPAMD_PEERS or plain is None:
            continue
        overhead = 1 - scanned["msgs_per_s"] / plain["msgs_per_s"]
        body.append([
            peer, size_label(size), _f(scanned["msgs_per_s"], ".0f"), RSPAMD_PEERS[peer],
            _f(plain["msgs_per_s"], ".0f"), f"{overhead:.0%} fewer msgs/s",
            f"{scanned['server_cpu_ms_per_msg']:.2f} / {plain['server_cpu_ms_per_msg']:.2f}",
        ])
    return body


def pop3_report(rows: list[dict], table, lines: list[str]) -> None:
    f = next((r for r in rows if "msgs_per_s" in r), rows[0])
    lines.append(
        f"POP3 fetch: {f['clients']} clients at once, each its own mailbox of {f['messages_per_mailbox']} "
        f"msgs x {size_label(f['size'])}, LIST+UIDL+RETR of all; msgs/s is the median of "
        f"{f.get('runs', '?')} interleaved rounds, each on fresh mailboxes:"
    )
    body = []
    for r in rows:
        if "msgs_per_s" not in r:
            body.append([r["peer"], "FAILED" if "failed" in r else "no data"] + ["-"] * 8)
            continue
        body.append([
            r["peer"], _f(r["msgs_per_s"], ".0f"), _f(r["mib_per_s"], ".1f"),
            _f(r["server_cpu_ms_per_msg"], ".3f"), _f(r["client_cpu_ms_per_msg"], ".3f"),
            _f(r["peak_rss_mib"], ".1f"), str(r["errors"]), str(r["size_mismatches"]), str(r["pipelining"]),
            "/".join(f"{x:.0f}" for x in r["msgs_per_s_all"]), _f(r.get("login_ms"), ".1f"),
            _f(r.get("fetch_msgs_per_s"), ".0f"),
        ])
    table(["peer", "msgs/s", "MiB/s", "server CPU ms/msg", "client CPU ms/msg", "peak RSS MiB",
           "errors", "size mismatches", "pipelining", "msgs/s per round", "login ms (median)",
           "msgs/s after login"], body)
    for r in rows:
        if "failed" in r:
            lines.append(f"POP3 {r['peer']}: FAILED: {r['failed'][:300]}")
        for sample in (r.get("error_samples") or [])[:2]:
            lines.append(f"POP3 {r['peer']}: error: {sample}")
    by = {r["peer"]: r for r in rows if r.get("messages")}
    for ours in (p for p in by if p.startswith("mailserver")):
        if "dovecot" in by:
            ratio = by[ours]["msgs_per_s"] / by["dovecot"]["msgs_per_s"]
            verdict = "met" if ratio >= 1 else "NOT met"
            lines.append(f"Ratio: {ours} over Dovecot {ratio:.2f}x (same run; target >= 1x: {verdict})")
            if by[ours].get("fetch_msgs_per_s") and by["dovecot"].get("fetch_msgs_per_s"):
                after = by[ours]["fetch_msgs_per_s"] / by["dovecot"]["fetch_msgs_per_s"]
                lines.append(f"  after login (password checks left out): {after:.2f}x")
    lines.append(
        f"Dovecot's published figure (the speed issue, another machine): ~{PUBLISHED_DOVECOT_POP3} msgs/s"
        + ("" if "dovecot" in by else "; Dovecot not measured here")
    )
    lines.append("")


def big_mailbox_report(rows: list[dict], table, lines: list[str]) -> None:
    n = rows[0]["messages"]
    lines.append(f"Big mailbox ({n} msgs of 200 octets, first session): seconds from command to end of reply:")
    body = []
    for r in rows:
        if "failed" in r or "pass_s" not in r:
            body.append([r["peer"], "FAILED"] + ["-"] * 5)
            continue
        verdict = "-"
        if r["peer"].startswith("mailserver"):
            worst = max(r.get(k, 0) for k in ("pass_s", "stat_s", "list_s", "uidl_s"))
            verdict = f"< {LISTING_TARGET_S:g}s each: {'met' if worst < LISTING_TARGET_S else 'NOT met'}"
        body.append([r["peer"], _f(r["pass_s"], ".3f"), _f(r["stat_s"], ".3f"), _f(r["list_s"], ".3f"),
                     _f(r["uidl_s"], ".3f"), repr(r.get("stat")), verdict])
    table(["peer", "PASS s", "STAT s", "LIST s", "UIDL s", "STAT reply", "target"], body)
    for r in rows:
        if "failed" in r:
            lines.append(f"Big mailbox {r['peer']}: FAILED: {r['failed'][:300]}")


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

    settled = settle_report(results.get("settle"))
    if settled:
        lines.extend([settled, ""])
    for key, when in (("storage_floor", "before SMTP"), ("storage_floor_after", "after SMTP")):
        floor = results.get(key)
        if floor:
            lines.append(
                f"Storage floor {when} (one thread, no network: create, write 1 KiB, fsync, rename into new/, "
                f"fsync new/): {floor['wall_ms_per_msg']:.2f} ms wall, "
                f"{floor['user_ms_per_msg'] + floor['sys_ms_per_msg']:.2f} ms CPU "
                f"({floor['sys_ms_per_msg']:.2f} ms kernel) per message"
            )
            lines.append("")
    smtp = results.get("smtp") or []
    if smtp:
        smtp_report(smtp, table, lines)
    if results.get("relay"):
        relay_report(results["relay"], results.get("relay_setup", {}), table, lines)
    pop3 = results.get("pop3") or {}
    if pop3.get("fetch"):
        pop3_report(pop3["fetch"], table, lines)
    if pop3.get("big_mailbox"):
        big_mailbox_report(pop3["big_mailbox"], table, lines)
    if results.get("imap"):
        imap_report(results["imap"], table, lines)
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
    p.add_argument("--peers", default=",".join(dict.fromkeys(SMTP_PEERS + POP3_PEERS)),
                   help="comma-separated: aiosmtpd, mailserver, postfix, smtp-sink, mailserver-rspamd, "
                        "postfix-rspamd (SMTP), dovecot (POP3; our server always runs there)")
    p.add_argument("--workers", default=None,
                   help="our server's worker-process counts to run, comma-separated (1,2)")
    p.add_argument("--aiosmtpd-deliver", choices=["thread", "inline"], default="thread")
    p.add_argument("--pop3-clients", type=int, default=4)
    p.add_argument("--pop3-messages", type=int, default=None, help="messages per mailbox (1000)")
    p.add_argument("--pop3-size", type=int, default=10240)
    p.add_argument("--pop3-window", type=int, default=8, help="RETRs in flight when PIPELINING")
    p.add_argument("--imap-clients", type=int, default=4)
    p.add_argument("--imap-messages", type=int, default=None, help="messages per IMAP mailbox (1000)")
    p.add_argument("--imap-size", type=int, default=10240)
    p.add_argument("--imap-window", type=int, default=8, help="UID FETCH commands in flight")
    p.add_argument("--big-mailbox", type=int, default=None, help="messages in the big mailbox (100000)")
    p.add_argument("--idle", type=int, default=None, help="idle SMTP connections (1000)")
    add_relay_arguments(p)
    for part in ("smtp", "relay", "pop3", "imap", "big", "idle"):
        p.add_argument(f"--skip-{part}", action="store_true")
    p.add_argument("--json", metavar="FILE", help="also write all figures to FILE as JSON")
    p.add_argument("--markdown", action="store_true", help="print the tables in Markdown")
    p.add_argument("--keep", action="store_true", help="keep the peers' temporary folders")
    p.add_argument("--no-settle", action="store_true",
                   help="measure at once, even while creating a file is slow (see bench/settle.py)")
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {
        "messages_1k": (500, 3000),
        "messages_100k": (200, 1000),
        "warmup": (50, 200),
        "pop3_messages": (200, 1000),
        "imap_messages": (200, 1000),
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
    unknown = set(args.peers) - set(SMTP_PEERS) - set(POP3_PEERS)
    if unknown:
        p.error(f"unknown peers: {', '.join(sorted(unknown))}")
    args.workers = [int(w) for w in args.workers.split(",") if w]
    finish_relay_arguments(p, args)
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
    leftovers = Leftovers()
    try:
        results["settle"] = settle(leftovers, wait=not args.no_settle)
        storage_floor(results, leftovers)
        if not args.skip_smtp:
            smtp_part(args, results, leftovers)
            storage_floor(results, leftovers, key="storage_floor_after")
        if not args.skip_relay:
            try:
                relay_part(args, results, leftovers)
            except Exception as e:  # noqa: BLE001 - the sink or the DNS did not start: go on
                print(f"relay: FAILED: {type(e).__name__}: {e}"[:2000], flush=True)
        if not (args.skip_pop3 and args.skip_big):
            pop3_part(args, results)
        if not (args.skip_imap and args.skip_big):
            imap_part(args, results, pop3_peer_factories, _fill)
        if not args.skip_idle:
            idle_part(args, results)
    except KeyboardInterrupt:
        print("interrupted; reporting what was measured", flush=True)
    except Exception:  # noqa: BLE001 - report what was measured anyway
        traceback.print_exc()
    finally:
        leftovers.remove()
    results["elapsed_s"] = time.monotonic() - t0
    print()
    print(report(results, args.markdown))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
