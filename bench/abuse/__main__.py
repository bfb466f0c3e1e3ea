"""
The abuse bench's command line: C{.venv/bin/python -m bench.abuse --help}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.abuse.common import PASSWORD, USERS
from bench.abuse.phase import run_phase
from bench.abuse.report import check_maildir, describe, scan_log, to_json
from bench.abuse.system import loadavg, raise_nofile
from bench.peers import MailServerPeer
from bench.smtp_load import loop_kind, new_event_loop

RESULTS: dict = {}

# Hard bounds, whatever is asked.
MAX_SLOW = 15_000
MAX_DURATION = 3600.0


def parse_mix(text: str) -> dict[str, float]:
    mix = {}
    for part in text.split(","):
        if not part.strip():
            continue
        key, _, value = part.partition("=")
        key = key.strip()
        if key not in ("cmd", "data"):
            raise argparse.ArgumentTypeError(f"unknown kind {key!r} (kinds: cmd, data)")
        mix[key] = float(value)
    return mix


def parse_interval(text: str) -> tuple[float, float]:
    lo, _, hi = text.partition(",")
    lo_f = float(lo)
    hi_f = float(hi or lo)
    if not 0.05 <= lo_f <= hi_f:
        raise argparse.ArgumentTypeError("give MIN,MAX seconds, 0.05 <= MIN <= MAX")
    return lo_f, hi_f


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.abuse", description="abuse load test of our server (see bench/README.md)")
    p.add_argument("--quick", action="store_true",
                   help="500 slow-loris + 5 never-readers for 45 s, shedding phase with 150 + 5 (about 2 minutes)")
    p.add_argument("--slow", type=int, default=None, help="slow-loris clients in the hold phase (2000; quick 500)")
    p.add_argument("--mix", type=parse_mix, default=parse_mix("cmd=50,data=50"),
                   help="weights of the slow-loris kinds: cmd (command line), data (in DATA) (cmd=50,data=50)")
    p.add_argument("--noread", type=int, default=None,
                   help="clients that pipeline NOOPs and never read, on top of --slow (20; quick 5)")
    p.add_argument("--shed-noread", type=int, default=5, help="never-readers in the shedding phase (5)")
    p.add_argument("--burst-max", type=float, default=180.0,
                   help="longest wait for the never-readers' flood to settle before measuring (s)")
    p.add_argument("--duration", type=float, default=None,
                   help="seconds measured once every slow client is in position and the NOOP flood has settled "
                        "(120; quick 45)")
    p.add_argument("--baseline", type=float, default=5.0, help="seconds of the well-behaved client alone first")
    p.add_argument("--byte-interval", type=parse_interval, default=(2.0, 5.0),
                   help="slow-loris: seconds between octets, MIN,MAX (2,5)")
    p.add_argument("--noops", type=int, default=400_000,
                   help="NOOPs each never-reader writes (400000, 2.4 MB, whose 5.6 MB of replies are more than "
                        "the kernels' buffers take, so the server must stop reading from it)")
    p.add_argument("--ramp-parallel", type=int, default=50, help="slow connections being opened at once (50)")
    p.add_argument("--interval", type=float, default=0.1, help="well-behaved client: seconds between messages")
    p.add_argument("--size", type=int, default=1024, help="well-behaved message size, octets")
    p.add_argument("--pop3-every", type=float, default=5.0, help="POP3 login+STAT every N s (0: none)")
    p.add_argument("--bf-workers", type=int, default=None,
                   help="brute-force connections at once (4; quick 8; 0: no guesser)")
    p.add_argument("--bf-per-connection", type=int, default=1, help="AUTH tries per connection (1)")
    p.add_argument("--bf-source", default="127.0.0.2",
                   help="address the guesser connects from (127.0.0.2: the throttle blames an address, so "
                        "guessing from 127.0.0.1 would lock out the well-behaved POP3 user too)")
    p.add_argument("--bf-pause", type=float, default=0.1, help="guesser's pause after a 454 (s)")
    p.add_argument("--rcpt-clients", type=int, default=1, help="RCPT flooders (1; 0: none)")
    p.add_argument("--rcpts", type=int, default=1000, help="RCPTs per flood (1000)")
    p.add_argument("--rcpt-every", type=float, default=5.0, help="seconds between a flooder's rounds (5)")
    p.add_argument("--huge-clients", type=int, default=1, help="huge-header senders (1; 0: none)")
    p.add_argument("--huge-mb", type=float, default=8.0, help="MiB of header lines per huge message (8)")
    p.add_argument("--huge-every", type=float, default=15.0, help="seconds between a sender's messages (15)")
    p.add_argument("--command-timeout", type=int, default=None,
                   help="hold phase: limits.smtp_command_timeout (server default 300)")
    p.add_argument("--data-timeout", type=int, default=None,
                   help="hold phase: limits.smtp_data_timeout (server default 600)")
    p.add_argument("--no-shed", action="store_true", help="skip the shedding phase")
    p.add_argument("--shed-only", action="store_true", help="run only the shedding phase")
    p.add_argument("--shed-slow", type=int, default=None, help="slow-loris clients in the shedding phase (300; quick 150)")
    p.add_argument("--shed-command-timeout", type=int, default=10, help="shedding phase: smtp_command_timeout (10)")
    p.add_argument("--shed-data-timeout", type=int, default=15, help="shedding phase: smtp_data_timeout (15)")
    p.add_argument("--final-read", type=float, default=5.0,
                   help="seconds the never-readers finally read at the end of a phase")
    p.add_argument("--progress-every", type=float, default=10.0)
    p.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    p.add_argument("--keep", action="store_true",
                   help="keep the servers' temporary folders (in /tmp/bench-abuse-*: logs, Maildirs)")
    args = p.parse_args(argv)
    quick = args.quick
    for key, q, full in (("slow", 500, 2000), ("duration", 45.0, 120.0), ("bf_workers", 8, 4),
                         ("shed_slow", 150, 300), ("noread", 5, 20)):
        if getattr(args, key) is None:
            setattr(args, key, q if quick else full)
    args.slow = max(0, min(args.slow, MAX_SLOW))
    args.shed_slow = max(0, min(args.shed_slow, MAX_SLOW))
    args.noread = max(0, min(args.noread, 1000))
    args.shed_noread = max(0, min(args.shed_noread, 1000))
    args.duration = max(1.0, min(args.duration, MAX_DURATION))
    args.ramp_parallel = max(1, min(args.ramp_parallel, 500))
    args.interval = max(0.01, args.interval)
    return args


def server_for(args, slow: int, command_timeout: int | None, data_timeout: int | None) -> tuple[MailServerPeer, str]:
    max_connections = max(5000, slow + 1000)
    peer = MailServerPeer(users=USERS, password=PASSWORD, max_connections=max_connections, keep=args.keep)
    extra = []
    if command_timeout is not None:
        extra.append(f"smtp_command_timeout = {command_timeout}")
    if data_timeout is not None:
        extra.append(f"smtp_data_timeout = {data_timeout}")
    if extra:
        # [limits] is the last table of the file the peer wrote.
        with open(peer.config_path, "a") as f:
            f.write("\n".join(extra) + "\n")
    note = (
        f"limits.max_connections = max_connections_per_client = {max_connections} (raised so every connection "
        f"from 127.0.0.1 is admitted); smtp_command_timeout = "
        f"{command_timeout if command_timeout is not None else '300 (default)'}, smtp_data_timeout = "
        f"{data_timeout if data_timeout is not None else '600 (default)'}, everything else default "
        f"(max_recipients 100, min_data_rate 500, auth_failure_delay 1.0, max_auth_failures_per_client 20)"
    )
    return peer, note


def run_one(args, name: str, slow: int, noread: int, hold: float, command_timeout, data_timeout,
            abusers: bool) -> list[str]:
    peer, note = server_for(args, slow + noread, command_timeout, data_timeout)
    with peer:
        print(f"[{name}] server pid {peer.pid}, SMTP {peer.port}, POP3 {peer.pop3_port}, folder {peer.root}"
              f"{' (kept)' if args.keep else ''}", flush=True)
        print(f"[{name}] {note}", flush=True)
        loop = new_event_loop()
        try:
            result = loop.run_until_complete(run_phase(name, args, peer, slow, noread, hold, abusers,
                                                      (command_timeout or 300, data_timeout or 600)))
        finally:
            loop.close()
        peer.stop()
        result["maildir"] = check_maildir(peer, result["phase"].good)
        result["log"] = scan_log(peer)
        lines = describe(result, note)
        if args.json:
            RESULTS[name] = to_json(result)
    return lines


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, _interrupt)
    soft, hard = raise_nofile()
    print(
        f"abuse load test: {os.cpu_count()} cores, load generator on {loop_kind()}, RLIMIT_NOFILE {soft}/{hard}, "
        f"loadavg {loadavg()}, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        flush=True,
    )
    needed = args.slow + args.noread + 200
    if soft < needed:
        print(f"warning: open-file limit {soft} < {needed} needed", flush=True)
    # The servers' folders go into a folder of our own, so that nobody
    # clearing away /tmp/bench-mailserver-* (other benchmarks keep theirs
    # there) pulls the data folder from under a running server.
    parent = Path(tempfile.mkdtemp(prefix="bench-abuse-"))
    tempfile.tempdir = str(parent)
    reports: list[str] = []
    t0 = time.monotonic()
    try:
        if not args.shed_only:
            reports += run_one(args, "hold", args.slow, args.noread, args.duration, args.command_timeout,
                               args.data_timeout, True)
        if not args.no_shed:
            hold = max(args.shed_command_timeout, args.shed_data_timeout) + 10
            reports += run_one(args, "shed", args.shed_slow, args.shed_noread, hold, args.shed_command_timeout,
                               args.shed_data_timeout, False)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    finally:
        tempfile.tempdir = None
        if not args.keep:
            shutil.rmtree(parent, ignore_errors=True)
    print()
    print(f"=== abuse load test results ({time.monotonic() - t0:.0f}s; {os.cpu_count()} cores, "
          f"loadavg now {loadavg()})")
    for line in reports:
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(RESULTS, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
