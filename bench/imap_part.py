"""
The IMAP part of the benchmark runner (bench/run.py): ours and Dovecot's
IMAP in the same run, on the same mailboxes.

 - fetch: C{--imap-clients} clients at once, each with its own mailbox of
   C{--imap-messages} x C{--imap-size}, LOGIN, SELECT, UID SEARCH and
   C{UID FETCH <uid> BODY[]} of every message, 8 in flight
   (L{bench.imap_load.run_imap_load}); rounds on fresh mailboxes, peers
   taking turns, as the POP3 part does.
 - big folder: LOGIN, SELECT (first and again), STATUS and
   C{UID FETCH 1:* (FLAGS)} on a C{--big-mailbox}-message INBOX.
"""

from __future__ import annotations

import contextlib
import os
import time
from statistics import median

from bench.imap_load import run_imap_load, time_select
from bench.peers import cpu_seconds, peak_rss_kib, reset_peak_rss
from bench.pop3_load import message_bytes


def imap_part(args, results: dict, peer_factories, fill) -> None:
    """
    @param peer_factories: C{(args, users)} to [(label, factory)], the
        POP3 part's (our server per worker count, and Dovecot).
    @param fill: C{(peer, user, count, size)} fills a mailbox.
    """
    out = results.setdefault("imap", {})
    rounds = [
        [f"imap{i}r{k}@localhost" for i in range(1, args.imap_clients + 1)]
        for k in range(1, args.repeat + 1)
    ] if not args.skip_imap else []
    big_user = "bigimap@localhost"
    warm_user = "warmimap@localhost"
    users = (
        tuple(u for r in rounds for u in r)
        + ((warm_user,) if rounds else ())
        + (() if args.skip_big else (big_user,))
    )
    if not users:
        return
    fetch_rows = out.setdefault("fetch", [])
    big_rows = out.setdefault("big_folder", [])
    expected = {len(message_bytes(args.imap_size, n)) + message_bytes(args.imap_size, n).count(b"\n")
                for n in range(10)}
    with contextlib.ExitStack() as stack:
        started = []
        for label, factory in peer_factories(args, users):
            row = {"peer": label, "clients": args.imap_clients,
                   "messages_per_mailbox": args.imap_messages, "size": args.imap_size}
            print(f"IMAP {label}: starting", flush=True)
            try:
                peer = stack.enter_context(factory())
                if not getattr(peer, "imap_port", 0):
                    raise RuntimeError("no imap listener")
                for u in (u for r in rounds for u in r):
                    fill(peer, u, args.imap_messages, args.imap_size)
                if rounds:
                    fill(peer, warm_user, 1, 200)
                started.append((label, peer, row, []))
            except Exception as e:  # noqa: BLE001 - report it, go on with the other peers
                row["failed"] = f"{type(e).__name__}: {e}"[:2000]
                print(f"  FAILED: {row['failed']}", flush=True)
            if rounds:
                fetch_rows.append(row)
        os.sync()
        for label, peer, row, _ in started:
            if rounds:
                try:
                    for _ in range(2):
                        time_select(peer.imap_port, warm_user, peer.password)
                except Exception as e:  # noqa: BLE001 - report it, go on
                    row["failed"] = f"warm-up: {type(e).__name__}: {e}"[:2000]
        for k, round_users in enumerate(rounds):
            turn = k % max(1, len(started))
            for label, peer, row, runs in started[turn:] + started[:turn]:
                if "failed" in row:
                    continue
                reset_peak_rss(peer.pid)
                cpu0 = cpu_seconds(peer.pid)
                try:
                    r = run_imap_load(peer.imap_port, round_users, peer.password,
                                      window=args.imap_window, expected_sizes=expected)
                except Exception as e:  # noqa: BLE001 - report it, go on
                    row["failed"] = f"{type(e).__name__}: {e}"[:2000]
                    continue
                runs.append({"result": r, "server_cpu_s": cpu_seconds(peer.pid) - cpu0,
                             "peak_rss_kib": peak_rss_kib(peer.pid)})
                print(f"  {label} IMAP round {k + 1}/{len(rounds)}: {r}", flush=True)
        for label, peer, row, runs in started:
            if runs:
                _summarise(row, runs)
        if args.skip_big:
            return
        for label, peer, _, _ in started:
            row = {"peer": label, "messages": args.big_mailbox}
            big_rows.append(row)
            try:
                t = time.perf_counter()
                fill(peer, big_user, args.big_mailbox, 200)
                print(f"  {label}: filled {args.big_mailbox} x 200 B in {time.perf_counter() - t:.1f}s", flush=True)
                os.sync()
                row.update(time_select(peer.imap_port, big_user, peer.password))
                print(f"  {label} big folder: {row}", flush=True)
            except Exception as e:  # noqa: BLE001 - report it, go on
                row["failed"] = f"{type(e).__name__}: {e}"[:2000]
                print(f"  {label} big folder: FAILED: {row['failed']}", flush=True)


def _summarise(row: dict, runs: list[dict]) -> None:
    results = [m["result"] for m in runs]
    messages = sum(r.messages for r in results)
    row.update(
        runs=len(runs),
        msgs_per_s=median([r.msgs_per_s for r in results]),
        msgs_per_s_all=[round(r.msgs_per_s, 1) for r in results],
        fetch_msgs_per_s=median([r.fetch_msgs_per_s for r in results]),
        mib_per_s=median([r.mib_per_s for r in results]),
        messages=messages,
        errors=sum(r.errors for r in results),
        size_mismatches=sum(r.size_mismatches for r in results),
        error_samples=[e for r in results for e in r.error_samples][:5],
        server_cpu_ms_per_msg=sum(m["server_cpu_s"] for m in runs) * 1000 / max(1, messages),
        client_cpu_ms_per_msg=sum(r.client_cpu_s for r in results) * 1000 / max(1, messages),
        peak_rss_mib=max(m["peak_rss_kib"] for m in runs) / 1024,
        login_ms=median([s * 1000 for r in results for s in r.login_s]) if any(r.login_s for r in results) else None,
    )


def _f(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def imap_report(out: dict, table, lines: list[str]) -> None:
    rows = out.get("fetch") or []
    if rows:
        f = next((r for r in rows if "msgs_per_s" in r), rows[0])
        lines.append(
            f"IMAP fetch: {f['clients']} clients at once, each its own mailbox of "
            f"{f['messages_per_mailbox']} msgs x {f['size']} B, UID FETCH <uid> BODY[] of every message "
            f"(8 in flight); msgs/s is the median of {f.get('runs', '?')} interleaved rounds:"
        )
        body = []
        for r in rows:
            if "msgs_per_s" not in r:
                body.append([r["peer"], "FAILED" if "failed" in r else "no data"] + ["-"] * 9)
                continue
            body.append([
                r["peer"], _f(r["msgs_per_s"], ".0f"), _f(r["fetch_msgs_per_s"], ".0f"),
                _f(r["mib_per_s"], ".1f"), _f(r["server_cpu_ms_per_msg"], ".3f"),
                _f(r["client_cpu_ms_per_msg"], ".3f"), _f(r["peak_rss_mib"], ".1f"),
                str(r["errors"]), str(r["size_mismatches"]),
                "/".join(f"{x:.0f}" for x in r["msgs_per_s_all"]), _f(r.get("login_ms"), ".1f"),
            ])
        table(["peer", "msgs/s", "msgs/s after login", "MiB/s", "server CPU ms/msg",
               "client CPU ms/msg", "peak RSS MiB", "errors", "size mismatches",
               "msgs/s per round", "login ms (median)"], body)
        for r in rows:
            if "failed" in r:
                lines.append(f"IMAP {r['peer']}: FAILED: {r['failed'][:300]}")
            for sample in (r.get("error_samples") or [])[:2]:
                lines.append(f"IMAP {r['peer']}: error: {sample}")
        by = {r["peer"]: r for r in rows if r.get("messages")}
        for ours in (p for p in by if p.startswith("mailserver")):
            if "dovecot" in by:
                ratio = by[ours]["msgs_per_s"] / by["dovecot"]["msgs_per_s"]
                after = by[ours]["fetch_msgs_per_s"] / by["dovecot"]["fetch_msgs_per_s"]
                lines.append(f"IMAP ratio: {ours} over Dovecot {ratio:.2f}x (after login {after:.2f}x), same run")
        lines.append("")
    big = out.get("big_folder") or []
    if big:
        lines.append(f"Big IMAP folder ({big[0]['messages']} msgs of 200 octets): seconds per command:")
        body = []
        for r in big:
            if "select_s" not in r:
                body.append([r["peer"], "FAILED"] + ["-"] * 7)
                continue
            body.append([r["peer"], _f(r["login_s"], ".3f"), _f(r["select_s"], ".3f"),
                         _f(r["select_again_s"], ".3f"), _f(r["status_s"], ".3f"),
                         _f(r["fetch_flags_s"], ".3f"), _f(r.get("select_later_s"), ".3f"),
                         _f(r.get("status_later_s"), ".3f"), str(r.get("exists"))])
        table(["peer", "LOGIN s", "first SELECT s", "SELECT again s", "STATUS s",
               "UID FETCH 1:* FLAGS s", "SELECT 3 s later", "STATUS 3 s later", "EXISTS"], body)
        for r in big:
            if "failed" in r:
                lines.append(f"Big IMAP folder {r['peer']}: FAILED: {r['failed'][:300]}")
