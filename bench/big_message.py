"""
Memory check: one 100 MB message in over SMTP and out over POP3.

From the speed issue: "a 100 MB message in or out grows the server by
< 20 MB".  Hand-run, never part of the test suite::

    .venv/bin/python bench/big_message.py                 # 100 MiB, then 2 at once
    .venv/bin/python bench/big_message.py --size-mib 50 --no-pair --keep

What it does:

 1. Starts our server (L{bench.peers.MailServerPeer}: OS-chosen loopback
    ports, a temporary data folder, users C{bob@localhost} and
    C{alice@localhost}) with C{[limits] max_message_size} raised from its
    default 35 MiB to 200 MiB (C{--max-message-mib}); everything else is the
    benchmark's configuration.
 2. Sends a small message and fetches it, so one-time costs (lazy imports,
    the first Maildir, the first scrypt check) are not charged to the big one.
 3. SMTP in: resets the server's peak RSS (C{/proc/<pid>/clear_refs} "5",
    so C{VmHWM} restarts from the current RSS), reads its RSS, sends the
    message on a raw socket (EHLO, C{MAIL FROM ... SIZE=}, RCPT, DATA, the
    body streamed in blocks of about 1 MiB, generated as it goes, so this
    client holds one block, not the message), waits for the 250, and reads
    C{VmHWM}: growth = peak - RSS before.
 4. POP3 out: the same measurement around USER/PASS, LIST, RETR, QUIT; the
    client reads the reply line by line, undoes the dot-stuffing, and
    hashes it without keeping it.  The server prepends its own header lines
    (Return-Path, Received), so the fetched message is those lines followed
    by exactly what was sent: the client checks that the octets after the
    first (LIST size - sent size) hash to the sent message's SHA-256, and
    that the skipped prefix is whole header lines.
 5. With C{--pair} (the default), the same for two messages at once (one
    to each user, two client threads), against 2 x 20 MB.

The message is in CRLF form with lines of 0 to 998 octets, some starting
with a dot (one is a lone ".", which must be stuffed), and each ~1 MiB block
numbered, so a dropped, repeated or reordered block changes the hash.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.peers import MailServerPeer, peak_rss_kib, reset_peak_rss, rss_kib

MiB = 1024 * 1024
CRLF = b"\r\n"
LIMIT_MB = 20  # the "< 20 MB", read as 20 MiB (the stricter reading would be 19.07 MiB)
PASSWORD = "bench-password"
USERS = ("bob@localhost", "alice@localhost")
TIMEOUT = 600.0


# The message


def _pattern(seed: int = 1, approx: int = MiB) -> bytes:
    """
    About C{approx} octets of CRLF lines (0-998 octets each, some dotted),
    the first line a 22-octet block number placeholder.
    """
    rng = random.Random(seed)
    alphabet = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:-_=+/"
    lines = [b"Block 00000000 -------\r\n"]
    size = len(lines[0])
    while size < approx:
        kind = rng.random()
        if kind < 0.02:
            line = b"."  # a lone dot: stuffed to ".." on the wire
        elif kind < 0.08:
            line = b"." + bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        elif kind < 0.10:
            line = b""
        elif kind < 0.12:
            line = bytes(rng.choice(alphabet) for _ in range(998))
        else:
            line = bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 140)))
        lines.append(line + b"\r\n")
        size += len(line) + 2
    return b"".join(lines)


_PATTERN = None


def _pattern_cached() -> tuple[bytes, bytes]:
    global _PATTERN
    if _PATTERN is None:
        raw = _pattern()
        wire = raw.replace(b"\r\n.", b"\r\n..")  # the first line starts with "B"
        _PATTERN = (raw, wire)
    return _PATTERN


def _pad_lines(n: int) -> bytes:
    """
    Exactly C{n} (>= 2) octets of CRLF lines of "z".
    """
    out = []
    while n > 902:
        out.append(b"z" * 898 + b"\r\n")
        n -= 900
    out.append(b"z" * (n - 2) + b"\r\n")
    return b"".join(out)


class BigMessage:
    """
    A message of exactly C{size} octets in CRLF form, produced block by
    block in its wire form (dot-stuffed, without the final ".CRLF"); its
    SHA-256 (of the unstuffed CRLF form) is known once it has been produced.
    """

    def __init__(self, size: int, rcpt: str, tag: str) -> None:
        self.size = size
        self.header = (
            f"From: <sender@bench.test>\r\n"
            f"To: <{rcpt}>\r\n"
            f"Subject: big message {tag}\r\n"
            f"Message-ID: <big.{tag}.{os.getpid()}@bench.test>\r\n"
            f"Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n"
            f"MIME-Version: 1.0\r\n"
            f"Content-Type: text/plain; charset=us-ascii\r\n"
            f"\r\n"
        ).encode("ascii")
        raw, _ = _pattern_cached()
        if size < len(self.header) + 2:
            raise ValueError("size too small")
        self.blocks = (size - len(self.header) - 2) // len(raw)
        self.pad = size - len(self.header) - self.blocks * len(raw)
        self.sha256: str | None = None

    def wire_blocks(self):
        raw, wire = _pattern_cached()
        h = hashlib.sha256()
        h.update(self.header)
        yield self.header
        for k in range(self.blocks):
            number = b"Block %08d" % k
            h.update(number)
            h.update(raw[len(number):])
            yield number + wire[len(number):]
        tail = _pad_lines(self.pad)
        h.update(tail)
        yield tail
        self.sha256 = h.hexdigest()


# SMTP


class Conversation:
    """
    A blocking line-oriented client on a raw socket.
    """

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.file = self.sock.makefile("rb", buffering=1 << 20)

    def line(self) -> bytes:
        line = self.file.readline(65536)
        if not line.endswith(b"\n"):
            raise RuntimeError(f"connection closed (got {line[:100]!r})")
        return line

    def smtp_reply(self) -> tuple[int, str]:
        lines = []
        while True:
            line = self.line()
            lines.append(line[4:].decode("ascii", "replace").strip())
            if line[3:4] != b"-":
                return int(line[:3]), " / ".join(lines)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        try:
            self.file.close()
        finally:
            self.sock.close()


def smtp_expect(conv: Conversation, wanted: int, step: str) -> str:
    code, text = conv.smtp_reply()
    if code != wanted:
        raise RuntimeError(f"SMTP {step}: {code} {text}")
    return f"{code} {text}"


@dataclass
class SendResult:
    size: int
    sha256: str = ""
    seconds: float = 0.0  # from the first body octet to the 250
    reply: str = ""
    error: str = ""


def smtp_send(port: int, message: BigMessage, rcpt: str, result: SendResult) -> None:
    try:
        conv = Conversation(port)
        try:
            smtp_expect(conv, 220, "greeting")
            conv.send(b"EHLO big.client\r\n")
            smtp_expect(conv, 250, "EHLO")
            conv.send(f"MAIL FROM:<sender@bench.test> SIZE={message.size}\r\n".encode())
            smtp_expect(conv, 250, "MAIL")
            conv.send(f"RCPT TO:<{rcpt}>\r\n".encode())
            smtp_expect(conv, 250, "RCPT")
            conv.send(b"DATA\r\n")
            smtp_expect(conv, 354, "DATA")
            t0 = time.perf_counter()
            for block in message.wire_blocks():
                conv.send(block)
            conv.send(b".\r\n")
            result.reply = smtp_expect(conv, 250, "end of DATA")
            result.seconds = time.perf_counter() - t0
            result.sha256 = message.sha256 or ""
            conv.send(b"QUIT\r\n")
            conv.smtp_reply()
        finally:
            conv.close()
    except Exception as e:  # noqa: BLE001 - reported
        result.error = f"{type(e).__name__}: {e}"


# POP3


@dataclass
class FetchResult:
    user: str
    listed: int = 0  # LIST size (CRLF octets)
    fetched: int = 0  # octets after undoing the stuffing, terminator excluded
    sha256: str = ""  # of the octets after the server's prefix
    prefix: bytes = b""
    seconds: float = 0.0
    error: str = ""
    problems: list[str] = field(default_factory=list)


def pop3_expect(conv: Conversation, step: str) -> bytes:
    line = conv.line()
    if not line.startswith(b"+OK"):
        raise RuntimeError(f"POP3 {step}: {line[:120]!r}")
    return line


def pop3_fetch(
    port: int,
    user: str,
    sent_size: int,
    result: FetchResult,
    logged_in: threading.Barrier | None = None,
    go: threading.Barrier | None = None,
) -> None:
    """
    Log in, then (after C{logged_in} and C{go}, if given: the caller
    measures the login and the RETR apart) RETR the last message.
    """
    try:
        conv = Conversation(port)
        try:
            pop3_expect(conv, "greeting")
            conv.send(f"USER {user}\r\n".encode())
            pop3_expect(conv, "USER")
            conv.send(f"PASS {PASSWORD}\r\n".encode())
            pop3_expect(conv, "PASS")
            conv.send(b"STAT\r\n")
            stat = pop3_expect(conv, "STAT").split()
            count = int(stat[1])
            if count < 1:
                raise RuntimeError(f"mailbox empty: {stat!r}")
            # The big one is the last delivered (the warm-up came first).
            conv.send(f"LIST {count}\r\n".encode())
            result.listed = int(pop3_expect(conv, "LIST").split()[2])
            skip = result.listed - sent_size
            if skip < 0:
                raise RuntimeError(f"LIST says {result.listed} octets, fewer than the {sent_size} sent")
            for barrier in (logged_in, go):
                if barrier is not None:
                    barrier.wait(TIMEOUT)
            t0 = time.perf_counter()
            conv.send(f"RETR {count}\r\n".encode())
            pop3_expect(conv, "RETR")
            h = hashlib.sha256()
            prefix = bytearray()
            seen = 0
            readline = conv.file.readline
            while True:
                line = readline(4096)
                if not line.endswith(b"\n"):
                    raise RuntimeError(f"connection closed mid-RETR after {seen} octets")
                if line == b".\r\n":
                    break
                if line.startswith(b"."):
                    line = line[1:]
                if seen >= skip:
                    h.update(line)
                elif seen + len(line) <= skip:
                    prefix += line
                else:
                    cut = skip - seen
                    prefix += line[:cut]
                    h.update(line[cut:])
                    result.problems.append("the server's prefix does not end on a line boundary")
                seen += len(line)
            result.seconds = time.perf_counter() - t0
            result.fetched = seen
            result.sha256 = h.hexdigest()
            result.prefix = bytes(prefix)
            if seen != result.listed:
                result.problems.append(f"RETR gave {seen} octets, LIST said {result.listed}")
            for line in result.prefix.split(CRLF)[:-1]:
                if not line or (b":" not in line and line[:1] not in (b" ", b"\t")):
                    result.problems.append(f"prefix line is not a header: {line[:80]!r}")
                    break
            conv.send(b"QUIT\r\n")
            pop3_expect(conv, "QUIT")
        finally:
            conv.close()
    except Exception as e:  # noqa: BLE001 - reported
        result.error = f"{type(e).__name__}: {e}"
        for barrier in (logged_in, go):
            if barrier is not None:
                barrier.abort()


# Measuring


class RSSSampler:
    """
    VmRSS of the server every 20 ms in a thread: a second view of the peak
    (VmHWM is the authoritative one) and of where RSS settles.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, rss_kib(self.pid))
            except OSError:
                pass
            self._stop.wait(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


@dataclass
class Phase:
    name: str
    before_kib: int = 0
    peak_kib: int = 0  # VmHWM after the phase
    sampled_peak_kib: int = 0
    after_kib: int = 0  # VmRSS 1 s after the phase
    hwm_reset: bool = True

    @property
    def growth_mib(self) -> float:
        return (self.peak_kib - self.before_kib) / 1024


class Measure:
    """
    One phase: C{start()} resets the peak and reads RSS, C{stop()} reads
    the peak; C{settle()} reads RSS once the phase's leftovers are freed.
    """

    def __init__(self, pid: int, name: str) -> None:
        self.pid = pid
        self.phase = Phase(name)
        self._sampler = RSSSampler(pid)

    def start(self) -> None:
        self.phase.hwm_reset = reset_peak_rss(self.pid)
        self.phase.before_kib = rss_kib(self.pid)
        self._sampler.__enter__()

    def stop(self) -> None:
        self.phase.peak_kib = peak_rss_kib(self.pid)
        self._sampler.__exit__()
        self.phase.sampled_peak_kib = self._sampler.peak

    def settle(self) -> Phase:
        time.sleep(1.0)
        self.phase.after_kib = rss_kib(self.pid)
        return self.phase


def measured(pid: int, name: str, work) -> Phase:
    m = Measure(pid, name)
    m.start()
    try:
        work()
    finally:
        m.stop()
    return m.settle()


def run_parallel(jobs) -> None:
    threads = [threading.Thread(target=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def one_round(peer: MailServerPeer, size: int, users: tuple[str, ...], limit_mib: float) -> bool:
    """
    C{len(users)} messages of C{size} at once, one per user: in, then out.
    """
    n = len(users)
    messages = [BigMessage(size, u, f"{n}x{i}") for i, u in enumerate(users)]
    sends = [SendResult(size) for _ in users]
    phase_in = measured(
        peer.pid,
        "SMTP in",
        lambda: run_parallel(
            [lambda m=m, u=u, r=r: smtp_send(peer.port, m, u, r) for m, u, r in zip(messages, users, sends)]
        ),
    )
    # POP3: the logins (scrypt, in the server's thread pool) and the RETRs
    # are measured apart; the RETRs are the "message out".
    fetches = [FetchResult(u) for u in users]
    logged_in = threading.Barrier(n + 1)
    go = threading.Barrier(n + 1)
    login = Measure(peer.pid, "POP3 login")
    out = Measure(peer.pid, "POP3 out (RETR)")
    threads = [
        threading.Thread(target=pop3_fetch, args=(peer.pop3_port, u, size, r, logged_in, go))
        for u, r in zip(users, fetches)
    ]
    login.start()
    for t in threads:
        t.start()
    try:
        logged_in.wait(TIMEOUT)
        login.stop()
        phase_login = login.settle()
        out.start()
        go.wait(TIMEOUT)
    except threading.BrokenBarrierError:
        pass
    for t in threads:
        t.join()
    if login.phase.peak_kib == 0:
        login.stop()
        phase_login = login.settle()
    if out.phase.before_kib == 0:
        out.start()
    out.stop()
    phase_out = out.settle()
    ok = True
    label = "1 message" if n == 1 else f"{n} messages at once"
    print(f"\n== {label} of {size} octets ({size / MiB:.1f} MiB) ==")
    for u, s in zip(users, sends):
        if s.error:
            ok = False
            print(f"  SMTP {u}: FAILED: {s.error}")
        else:
            rate = size / MiB / s.seconds if s.seconds else 0
            print(f"  SMTP {u}: {s.seconds:.2f} s from first body octet to 250 ({rate:.1f} MiB/s); reply: {s.reply}")
    for s, f in zip(sends, fetches):
        if f.error:
            ok = False
            print(f"  POP3 {f.user}: FAILED: {f.error}")
            continue
        match = bool(s.sha256) and f.sha256 == s.sha256
        ok = ok and match and not f.problems
        rate = f.fetched / MiB / f.seconds if f.seconds else 0
        print(
            f"  POP3 {f.user}: RETR {f.fetched} octets in {f.seconds:.2f} s ({rate:.1f} MiB/s), "
            f"LIST {f.listed}, server prefix {len(f.prefix)} octets "
            f"({f.prefix.count(CRLF)} header lines); "
            f"SHA-256 {'matches' if match else 'DIFFERS'} ({f.sha256[:16]}... vs sent {s.sha256[:16]}...)"
        )
        for p in f.problems:
            print(f"    problem: {p}")
    budget = limit_mib * n
    for phase in (phase_in, phase_login, phase_out):
        if phase is phase_login:
            print(
                f"  {phase.name} (not the message; scrypt, n=2**14 r=8: 16 MiB per check): server RSS "
                f"{phase.before_kib / 1024:.1f} MiB before, peak {phase.peak_kib / 1024:.1f} MiB, "
                f"{phase.after_kib / 1024:.1f} MiB 1 s after: growth {phase.growth_mib:.1f} MiB"
            )
            continue
        passed = phase.growth_mib < budget
        ok = ok and passed
        print(
            f"  {phase.name}: server RSS {phase.before_kib / 1024:.1f} MiB before, peak {phase.peak_kib / 1024:.1f} MiB "
            f"(VmHWM{'' if phase.hwm_reset else ', NOT reset'}; sampled VmRSS peak {phase.sampled_peak_kib / 1024:.1f}), "
            f"{phase.after_kib / 1024:.1f} MiB 1 s after: growth {phase.growth_mib:.1f} MiB "
            f"-> {'pass' if passed else 'FAIL'} (< {budget:g} MiB{'' if n == 1 else f' = {n} x {limit_mib:g}'})"
        )
    print(f"  loadavg after: {loadavg()}")
    return ok


def server_log_problems(peer: MailServerPeer) -> list[str]:
    """
    Lines of the server's logs (twistd's, rotated ones included, and its
    stdout/stderr) that tell of a traceback or an unhandled error.
    """
    bad = []
    for path in sorted(peer.root.glob("twistd.log*")) + [peer.root / "server.log"]:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            if "Traceback" in line or "Unhandled" in line or "CRITICAL" in line:
                bad.append(f"{path.name}: {line.strip()[:300]}")
    return bad


def warm_up(peer: MailServerPeer) -> None:
    for user in USERS:
        message = BigMessage(20_000, user, "warm")
        s = SendResult(message.size)
        smtp_send(peer.port, message, user, s)
        f = FetchResult(user)
        pop3_fetch(peer.pop3_port, user, message.size, f)
        if s.error or f.error or f.sha256 != s.sha256:
            raise RuntimeError(f"warm-up failed: {s.error or f.error or 'hash mismatch'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Server memory growth for one (and two) 100 MB messages in and out.")
    p.add_argument("--size-mib", type=float, default=100.0, help="message size, MiB (CRLF form)")
    p.add_argument("--max-message-mib", type=int, default=200, help="the server's limits.max_message_size, MiB")
    p.add_argument("--limit-mib", type=float, default=LIMIT_MB, help="allowed growth per message, MiB")
    p.add_argument("--pair", action=argparse.BooleanOptionalAction, default=True, help="also 2 messages at once")
    p.add_argument("--keep", action="store_true", help="keep the server's folder (log, Maildirs)")
    args = p.parse_args(argv)
    size = int(args.size_mib * MiB)
    if size > args.max_message_mib * MiB:
        p.error("--size-mib is above --max-message-mib")

    print(f"loadavg at start: {loadavg()}, {os.cpu_count()} CPUs")
    t = time.perf_counter()
    _pattern_cached()
    print(f"message pattern built in {time.perf_counter() - t:.1f} s")
    peer = MailServerPeer(users=USERS, password=PASSWORD, keep=args.keep)
    # The benchmark config has its own [limits] table; the size limit goes in it.
    text = peer.config_path.read_text()
    peer.config_path.write_text(
        text.replace("[limits]\n", f"[limits]\nmax_message_size = {args.max_message_mib * MiB}\n", 1)
    )
    ok = True
    with peer:
        print(
            f"server pid {peer.pid}, SMTP {peer.port}, POP3 {peer.pop3_port}, "
            f"limits.max_message_size = {args.max_message_mib} MiB; folder {peer.root}"
        )
        warm_up(peer)
        print(f"after warm-up: server RSS {rss_kib(peer.pid) / 1024:.1f} MiB")
        ok = one_round(peer, size, USERS[:1], args.limit_mib) and ok
        if args.pair:
            ok = one_round(peer, size, USERS, args.limit_mib) and ok
        bad = server_log_problems(peer)
        print(f"\nserver log: {len(bad)} traceback/unhandled lines{': ' + bad[0] if bad else ''}")
        ok = ok and not bad
    print(f"\nverdict: {'PASS' if ok else 'FAIL'} (growth < {args.limit_mib:g} MiB per message, in and out; hashes match)")
    if args.keep:
        print(f"kept: {peer.root}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
