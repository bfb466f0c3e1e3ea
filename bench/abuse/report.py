"""
The abuse bench's report of a phase: the checks after it (every accepted
message in the Maildir, the server's log), the deadline verdicts, and the
lines and JSON that describe it.
"""

from __future__ import annotations

import os
import re
from collections import Counter

from bench.abuse.brute_force import describe_brute
from bench.abuse.common import GOOD_USER, KIND_NAMES, KINDS, TARGET_MS, fmt_ms, stats_ms
from bench.abuse.huge_header import describe_huge
from bench.abuse.rcpt_flood import describe_rcpt
from bench.abuse.sampling import dirty_near, probes_near
from bench.abuse.well_behaved import GoodResult
from bench.peers import MailServerPeer
from bench.smtp_load import percentile


def maildir_names(peer: MailServerPeer, user: str) -> list[str]:
    names = []
    for sub in ("new", "cur"):
        try:
            names += os.listdir(peer.maildir(user) / sub)
        except FileNotFoundError:
            pass
    return names


def check_maildir(peer: MailServerPeer, good: GoodResult) -> dict:
    names = maildir_names(peer, GOOD_USER)
    stems = {n.split(",", 1)[0].split(":", 1)[0] for n in names}
    missing = [q for q in good.queue_ids if q.split(",", 1)[0] not in stems]
    return {
        "accepted": len(good.records),
        "with_queue_id": len(good.queue_ids),
        "files": len(names),
        "missing": len(missing),
        "missing_samples": missing[:5],
    }


LOG_LEVEL = re.compile(r"#(warn|error|critical)\]")


def scan_log(peer: MailServerPeer) -> dict:
    text = ""
    for path in (peer.log_path, peer.root / "server.log"):
        if path.exists():
            text += path.read_text(errors="replace")
    levels = Counter()
    samples: Counter = Counter()
    for line in text.splitlines():
        m = LOG_LEVEL.search(line)
        if m:
            levels[m.group(1)] += 1
            message = line.split("] ", 1)[-1]
            samples[re.sub(r"\d+", "N", message)[:160]] += 1
    return {
        "levels": dict(levels),
        "tracebacks": text.count("Traceback (most recent call last)"),
        "unhandled": text.count("Unhandled"),
        "top_messages": samples.most_common(8),
        "lines": text.count("\n"),
    }


def shedding_verdict(phase, m: dict) -> list[str]:
    """
    Did the server close each slow client when its deadline passed, and
    only then?  (A slow-loris line's deadline starts at its last complete
    command, EHLO; a DATA slow-loris's at the 354; a never-reader's when the
    server last took a command from it, about when its flood settled.)
    """
    out = []
    elapsed = m["ramp_s"] + m["burst_s"] + m["measure_s"]
    for kind, timeout in (("cmd", m["command_timeout"]), ("data", m["data_timeout"])):
        s = phase.slow[kind]
        if not s.ready:
            continue
        due = sum(1 for started in s.ports.values() if m["measure_end"] - started > timeout + 2)
        early = sum(1 for a in s.close_after_s if a < timeout - 1)
        late = sum(1 for a in s.close_after_s if a > timeout + 2)
        timeouts = sum(n for r, n in s.close_replies.items() if r.startswith("421 4.4.2"))
        if due == 0:
            ok = s.closed_by_server == 0
            text = (f"none was due (connected at most {elapsed:.0f}s < {timeout}s) and "
                    f"{'none' if ok else s.closed_by_server} was closed")
        else:
            ok = early == 0 and late == 0 and timeouts == s.closed_by_server and s.closed_by_server >= due
            text = (f"{due} were due to be closed, {s.closed_by_server} closed ({timeouts} with 421 4.4.2), "
                    f"{early} early, {late} more than 2 s late")
        out.append(f"  deadline check, {KIND_NAMES[kind]} (timeout {timeout}s): {text} -> {'OK' if ok else 'NOT OK'}")
    nr = phase.slow["noread"]
    if nr.ready:
        timeout = m["command_timeout"]
        settled = m["measure_start"]
        waited = m["measure_end"] - settled
        closed = len(nr.server_closed)
        if waited > timeout + 5:
            ok = closed == nr.ready
            out.append(
                f"  deadline check, {KIND_NAMES['noread']} (timeout {timeout}s): the server stopped reading from them "
                f"by the time the flood settled, {waited:.0f}s before the end, so all {nr.ready} were due to be closed; "
                f"it closed {closed} -> {'OK' if ok else 'NOT OK (server bug, see the README)'}"
            )
        else:
            out.append(
                f"  deadline check, {KIND_NAMES['noread']} (timeout {timeout}s): not due within the window "
                f"({waited:.0f}s); closed {closed}"
            )
    return out


def describe(result: dict, peer_note: str) -> list[str]:
    phase = result["phase"]
    m = result["marks"]
    args = phase.args
    out = [f"== phase {phase.name}: {peer_note}"]
    c = result["counts"]
    out.append(
        f"slow clients: {c['cmd'] + c['data']} slow-loris (in position after {m['ramp_s']:.1f}s) + {c['noread']} "
        f"never-readers (their flood settled after {m['burst_s']:.1f}s); open when measuring began "
        f"{m['open_at_start']}, at its end {m['open_at_end']} (measured {m['measure_s']:.1f}s)"
    )
    for kind in KINDS:
        s = phase.slow[kind]
        if not s.wanted:
            continue
        line = (
            f"  {KIND_NAMES[kind]}: {s.wanted} wanted, {s.connected} connected, {s.ready} in position, "
            f"open at the end {m['open_at_end_by_kind'][kind]}, closed by the server "
            f"{len(s.server_closed) if kind == 'noread' else s.closed_by_server}"
        )
        if s.close_replies:
            line += " (" + ", ".join(f"{n}x {r!r}" for r, n in s.close_replies.most_common(3)) + ")"
        if s.close_after_s:
            cs = sorted(s.close_after_s)
            line += (f", closed {cs[0]:.1f}/{percentile(cs, 50):.1f}/{cs[-1]:.1f}s "
                     f"(min/median/max) after their deadline started")
        if s.refused:
            line += f", refused {dict(s.refused)}"
        if s.failed:
            line += f", failed {s.failed} (e.g. {s.error_samples[0]})"
        if s.other_replies:
            line += f", other replies {dict(s.other_replies)}"
        if kind != "noread":
            line += f"; {s.bytes_sent} octets trickled; server side at the end: {m[kind + '_server_sockets']}"
        out.append(line)
        if kind == "noread" and s.wanted:
            b = m["noread_after_burst"]
            out.append(
                f"    after the flood: the server had stopped reading from {b['server_stopped_reading']}/{b['clients']} "
                f"(octets unread in its kernel), having taken {b['noops_taken_min']}-{b['noops_taken_max']} NOOPs "
                f"from each; up to {b['replies_queued_kib_max']:.0f} KiB of replies queued in the kernels per "
                f"connection; closed by the server so far {b['closed_by_server']}"
            )
            out.append(
                f"    NOOPs written {s.noops_given} ({s.noops_given // max(1, s.ready)} per client), of which "
                f"{s.noops_unsent} never left our own buffer (writes of {s.blocked} clients stuck there for 5 s); "
                f"server side at the end: {m['noread_server_sockets']}, unread by the server "
                f"{m['noread_server_rx_kib_min']:.0f}-{m['noread_server_rx_kib_max']:.0f} KiB, unsent in its kernel "
                f"<= {m['noread_server_tx_kib_max']:.0f} KiB per connection"
            )
            closed = sorted(s.server_closed.values())
            out.append(
                f"    server closed its side (socket gone or out of ESTABLISHED, polled from /proc/net/tcp) of "
                f"{len(closed)}/{s.ready} while they did not read"
                + (f", {closed[0]:.1f}/{percentile(closed, 50):.1f}/{closed[-1]:.1f}s (min/median/max) "
                   f"after connecting" if closed else "")
            )
            out.append(
                f"    when they finally read ({args.final_read:.0f}s; before that they had read at most "
                f"{m['noread_final']['read_before_kib_max']:.1f} KiB, the greeting): {m['noread_final']['replies']}, "
                f"connection closed by the server: {m['noread_final']['closed_by_server_after_reading']}"
                f"/{m['noread_final']['clients']}"
            )
    out += shedding_verdict(phase, m)
    # Well-behaved.
    g = phase.good
    by_stage = {}
    for stage in ("baseline", "ramp", "noread flood", "measure"):
        by_stage[stage] = stats_ms([r["ms"] for r in g.records if r["stage"] == stage])
    out.append(
        f"well-behaved SMTP client (1 message / {args.interval * 1000:.0f} ms, new connection each, {args.size} octets):"
        f" {len(g.records)} accepted, {g.errors} errors, {g.quit_errors} bad QUIT replies"
    )
    for stage, s in by_stage.items():
        label = {"baseline": "alone (baseline)", "ramp": "while the slow-loris clients connect",
                 "noread flood": "during the never-readers' NOOP flood",
                 "measure": f"measure window, {m['open_at_start']} slow clients open"}[stage]
        if not s["n"] and stage == "noread flood":
            continue
        out.append(f"  {label}: {fmt_ms(s)}")
    for e in g.error_samples[:5]:
        out.append(f"  error: {e}")
    slow_ones = sorted((r for r in g.records if r["ms"] > TARGET_MS), key=lambda r: -r["ms"])
    for r in slow_ones[:8]:
        out.append(
            f"  over {TARGET_MS:.0f} ms: t={r['t']:.1f}s {r['stage']} {r['ms']:.1f} ms, steps {r['steps']}, "
            f"abuse going on meanwhile {phase.abuse_during(r['t0'], r['t0'] + r['ms'] / 1000) or 'none'}, "
            f"slowest fsync probe meanwhile {probes_near(phase, r['t'], r['t'] + r['ms'] / 1000):.1f} ms, "
            f"dirty page cache up to {dirty_near(phase, r['t'], r['t'] + r['ms'] / 1000):.1f} MiB"
        )
    if len(slow_ones) > 8:
        out.append(f"  ... and {len(slow_ones) - 8} more over {TARGET_MS:.0f} ms")
    probes = sorted(ms for _, ms, stage in phase.fsync_probes if stage == "measure")
    dirty = sorted(x["dirty_kib"] / 1024 for x in phase.samples if x["stage"] == "measure")
    if probes:
        out.append(
            f"  disk (1 KiB write + fsync in a thread, once a second, measure window): p50 {percentile(probes, 50):.1f} "
            f"ms, max {probes[-1]:.1f} ms, {sum(1 for p in probes if p > 20)} of {len(probes)} over 20 ms; "
            f"machine's dirty page cache p50 {percentile(dirty, 50):.1f} MiB, max {dirty[-1] if dirty else 0:.1f} MiB "
            f"(the server's group commit syncfs()es the whole file system before each 250)"
        )
    meas = by_stage["measure"]
    if meas["n"] == 0:
        verdict = "NO DATA"
    elif meas["max"] <= TARGET_MS:
        verdict = f"met: every one of {meas['n']} messages within {TARGET_MS:.0f} ms (max {meas['max']:.1f} ms)"
    elif meas["p99"] <= TARGET_MS:
        verdict = (f"met at p99 ({meas['p99']:.1f} ms), but {meas['over_target']} of {meas['n']} messages "
                   f"took longer (max {meas['max']:.1f} ms)")
    else:
        verdict = f"NOT met: p99 {meas['p99']:.1f} ms, {meas['over_target']} of {meas['n']} over"
    out.append(f"  verdict vs '{TARGET_MS:.0f} ms with {m['open_at_start']} slow clients connected': {verdict}")
    after = stats_ms([r["ms"] for r in g.records if r["stage"] != "baseline"])
    worst_stage = max(by_stage, key=lambda k: by_stage[k]["max"] if by_stage[k]["n"] else -1)
    out.append(
        f"  throughout the abuse (every stage after the baseline): {after['n']} msgs, {g.errors} errors, max "
        f"{after['max']:.1f} ms, {after['over_target']} over {TARGET_MS:.0f} ms (worst stage: {worst_stage})"
    )
    p = phase.pop3
    if p.sessions:
        ps = stats_ms(p.latencies_ms)
        out.append(
            f"POP3 client (USER/PASS/STAT every {args.pop3_every:.0f}s): {p.ok}/{p.sessions} ok, errors {p.errors}, "
            f"login+STAT p50 {ps['p50']:.1f} ms max {ps['max']:.1f} ms; last {p.last_stat!r}"
        )
        for e in p.error_samples[:3]:
            out.append(f"  error: {e}")
    # Memory and CPU.
    rss = [s["rss_kib"] for s in phase.samples]
    meas_rss = [s["rss_kib"] for s in phase.samples if s["stage"] == "measure"]
    out.append(
        f"server RSS (MiB): before abuse {m['rss_before_abuse_kib'] / 1024:.1f}, slow-loris connected "
        f"{m['rss_loris_connected_kib'] / 1024:.1f}, all connected "
        f"{m['rss_all_connected_kib'] / 1024:.1f}, peak {max(rss, default=0) / 1024:.1f} "
        f"(measure window {min(meas_rss, default=0) / 1024:.1f}-{max(meas_rss, default=0) / 1024:.1f}), "
        f"end {m['rss_end_kib'] / 1024:.1f}, after the clients closed {m['rss_after_close_kib'] / 1024:.1f}; "
        f"VmHWM {m['hwm_end_kib'] / 1024:.1f}"
    )
    loris = c["cmd"] + c["data"]
    if loris:
        out.append(
            f"  per slow-loris connection: {(m['rss_loris_connected_kib'] - m['rss_before_abuse_kib']) / loris:.2f} KiB"
            + (f"; growth during the never-readers' flood: "
               f"{(m['rss_all_connected_kib'] - m['rss_loris_connected_kib']) / 1024:.1f} MiB" if c["noread"] else "")
            + f"; server threads: {m['threads_before_abuse']} before abuse, {m['threads_all_connected']} all "
            f"connected, {m['threads_end']} at the end (each thread-pool thread that has run an scrypt password "
            f"check keeps its ~16 MiB buffer resident)"
        )
    if meas_rss:
        third = max(1, len(meas_rss) // 3)
        out.append(
            f"  RSS trend in the measure window: first third avg {sum(meas_rss[:third]) / third / 1024:.1f}, "
            f"last third avg {sum(meas_rss[-third:]) / third / 1024:.1f} MiB"
        )
    ms = m["measure_s"] or 1
    out.append(
        f"CPU in the measure window: server {m['server_cpu_s']:.1f}s = {m['server_cpu_s'] / ms:.2f} cores, "
        f"load generator {m['loadgen_cpu_s']:.1f}s = {m['loadgen_cpu_s'] / ms:.2f} cores, whole machine "
        f"{m['machine_busy_s'] / ms:.2f} of {os.cpu_count()} cores (so others: "
        f"{max(0.0, (m['machine_busy_s'] - m['server_cpu_s'] - m['loadgen_cpu_s']) / ms):.2f}); "
        f"loadavg {m['loadavg_start']} -> {m['loadavg_end']}"
    )
    out.append(
        f"server fds: before abuse {m['fds_before_abuse']}, end {m['fds_end']}, after the clients closed "
        f"{m['fds_after_close']} ({m['close_s']:.1f}s after they closed)"
    )
    # Abusers.
    if phase.brute.attempts or phase.brute.errors:
        out += describe_brute(phase.brute, args)
    if phase.rcpt.rounds or phase.rcpt.errors:
        out += describe_rcpt(phase.rcpt, args)
    if phase.huge.sent_octets or phase.huge.errors:
        out += describe_huge(phase.huge, args)
    md = result["maildir"]
    out.append(
        f"Maildir of {GOOD_USER}: {md['files']} files; {md['accepted']} messages accepted, "
        f"{md['accepted'] - md['missing']} of them found by queue id, missing {md['missing']}"
        + (f" (e.g. {md['missing_samples']})" if md["missing"] else "")
        + (" -> all there" if md["missing"] == 0 and md["files"] == md["accepted"] else " -> MISMATCH")
    )
    log = result["log"]
    out.append(
        f"server log: {log['lines']} lines, warn/error/critical {log['levels'] or 0}, tracebacks "
        f"{log['tracebacks']}, 'Unhandled' {log['unhandled']}"
    )
    for message, n in log["top_messages"]:
        out.append(f"  {n}x {message}")
    return out


def to_json(result: dict) -> dict:
    phase = result["phase"]
    return {
        "marks": result["marks"],
        "counts": result["counts"],
        "slow": {k: {kk: (dict(vv) if isinstance(vv, Counter) else vv) for kk, vv in vars(s).items()
                     if kk not in ("ports", "close_after_s")} | {"close_after_s": sorted(s.close_after_s)}
                 for k, s in phase.slow.items()},
        "good_ms": [(r["t"], r["stage"], r["ms"]) for r in phase.good.records],
        "good_errors": phase.good.error_samples,
        "pop3": vars(phase.pop3),
        "brute": {"attempts": phase.brute.attempts, "connections": phase.brute.connections},
        "rcpt": {k: (dict(v) if isinstance(v, Counter) else v) for k, v in vars(phase.rcpt).items()},
        "huge": {k: (dict(v) if isinstance(v, Counter) else v) for k, v in vars(phase.huge).items()},
        "samples": phase.samples,
        "maildir": result["maildir"],
        "log": result["log"],
    }
