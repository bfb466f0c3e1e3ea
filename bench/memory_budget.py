"""
Memory check: the server's RSS against its memory budget when many clients
hold large messages half-sent, and when large messages go through the
SPF/DKIM/DMARC checks.  Hand-run, never part of the test suite::

    .venv/bin/python bench/memory_budget.py                   # 200 held, then 10 x 34 MiB
    .venv/bin/python bench/memory_budget.py --held 50 --large 3
    .venv/bin/python bench/memory_budget.py --code /tmp/old   # another checkout's server

What it does:

 1. Starts a DNS server (C{tests/dns_zone.py}) with an SPF record and a
    DKIM key for C{bench.test}, and our server (L{bench.peers.MailServerPeer})
    with C{[checks] skip_networks = []}, so mail from 127.0.0.1 is checked
    as a stranger's would be, its DNS going to that server.
 2. "held": C{--held} connections each send MAIL, RCPT, DATA, then
    C{--header-mib} MiB of header fields, the empty line and C{--body-mib}
    MiB of body, and stop there, mid-DATA.  The server's RSS before and
    once all are holding: growth = after - before.  Then each ends its
    message; every one must get 250.
 3. "large", on a fresh server (what the first kept would hide growth):
    C{--large} messages of C{--large-mib} MiB, DKIM-signed for
    C{bench.test}, sent at once (a thread each).  The server's peak RSS is
    reset before (C{clear_refs} 5) and read after the last 250 (C{VmHWM}),
    and its RSS read again C{--settle} seconds later ("held afterwards").
    One stored copy must carry C{dkim=pass}.

The verdict compares the "held" growth and the "large" peak growth with the
budget (C{limits.memory_budget}, C{--budget-mib}) plus C{--allowance-mib}
for everything that is not a message buffer (the sessions, the checks'
pieces and threads, the allocator's slack).
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.peers import REPO, MailServerPeer, peak_rss_kib, reset_peak_rss, rss_kib

MiB = 1024 * 1024
TIMEOUT = 600.0


def _zone(public: str) -> dict:
    return {
        "bench.test": {"TXT": ["v=spf1 ip4:127.0.0.1 -all"]},
        "sel._domainkey.bench.test": {"TXT": [public]},
        "_dmarc.bench.test": {"TXT": ["v=DMARC1; p=none"]},
    }


class Client:
    """
    One SMTP connection on a raw socket.
    """

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self._file = self.sock.makefile("rb")
        self.reply()

    def reply(self) -> bytes:
        while True:
            line = self._file.readline()
            if len(line) < 4 or line[3:4] != b"-":
                return line

    def command(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def begin(self, rcpt: str) -> None:
        for line, code in ((b"EHLO client.bench.test", b"250"),
                           (b"MAIL FROM:<sender@bench.test>", b"250"),
                           (f"RCPT TO:<{rcpt}>".encode(), b"250"), (b"DATA", b"354")):
            answer = self.command(line)
            if not answer.startswith(code):
                raise RuntimeError(f"{line!r}: {answer!r}")

    def close(self) -> None:
        self._file.close()
        self.sock.close()


def _lines(total: int, make) -> bytes:
    """
    Lines C{make(0)}, C{make(1)}, ... up to C{total} octets (not over: a
    body of exactly 1 MiB is the most the server keeps in memory).
    """
    out, size, n = [], 0, 0
    while size + len(make(n)) <= total:
        out.append(make(n))
        size += len(out[-1])
        n += 1
    return b"".join(out)


def held(peer: MailServerPeer, count: int, header_mib: float, body_mib: float) -> dict:
    header = _lines(int(header_mib * MiB), lambda n: b"X-Filler-%06d: " % n + b"h" * 80 + b"\r\n")
    body = _lines(int(body_mib * MiB), lambda n: b"line %06d " % n + b"b" * 86 + b"\r\n")
    before = rss_kib(peer.pid)
    clients = []
    try:
        for _ in range(count):
            client = Client(peer.port)
            client.begin(peer.rcpt)
            client.sock.sendall(b"From: <sender@bench.test>\r\n" + header + b"\r\n" + body)
            clients.append(client)
        time.sleep(2)  # the server reads what is in flight
        holding = rss_kib(peer.pid)
        answers = [client.command(b".") for client in clients]
    finally:
        for client in clients:
            client.close()
    return {
        "before_mib": before / 1024,
        "holding_mib": holding / 1024,
        "growth_mib": (holding - before) / 1024,
        "accepted": sum(a.startswith(b"250") for a in answers),
    }


def large(peer: MailServerPeer, count: int, size_mib: float, private: bytes, settle: float) -> dict:
    import dkim

    head = (b"From: <sender@bench.test>\r\nTo: <bob@localhost>\r\nSubject: large\r\n"
            b"Date: Thu, 01 Jan 2026 00:00:00 +0000\r\nMessage-ID: <large@bench.test>\r\n")
    body = _lines(int(size_mib * MiB), lambda n: b"%08d Lorem ipsum dolor sit amet, consectetur"
                  b" adipiscing elit, sed do eiusmod tempor incididunt.\r\n" % n)
    message = head + b"\r\n" + body
    signature = dkim.DKIM(message, signature_algorithm=b"rsa-sha256").sign(
        b"sel", b"bench.test", private, canonicalize=(b"relaxed", b"relaxed"),
        include_headers=[b"from", b"to", b"subject"])
    wire = (signature + message).replace(b"\r\n.", b"\r\n..")
    before = rss_kib(peer.pid)
    reset_peak_rss(peer.pid)
    answers: list[bytes] = []

    def send() -> None:
        client = Client(peer.port)
        try:
            client.begin(peer.rcpt)
            client.sock.sendall(wire)
            answers.append(client.command(b"."))
        finally:
            client.close()

    started = time.monotonic()
    threads = [threading.Thread(target=send) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    took = time.monotonic() - started
    peak = peak_rss_kib(peer.pid)
    right_after = rss_kib(peer.pid)
    time.sleep(settle)
    afterwards = rss_kib(peer.pid)
    stored = sorted((peer.maildir(peer.rcpt) / "new").iterdir())[-1].read_bytes()[:4096]
    return {
        "before_mib": before / 1024,
        "peak_growth_mib": (peak - before) / 1024,
        "right_after_mib": right_after / 1024,
        "afterwards_mib": afterwards / 1024,
        "held_after_mib": (afterwards - before) / 1024,
        "seconds": took,
        "accepted": sum(a.startswith(b"250") for a in answers),
        "dkim_pass": b"dkim=pass" in stored,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--held", type=int, default=200, help="connections held mid-DATA")
    parser.add_argument("--header-mib", type=float, default=1.0)
    parser.add_argument("--body-mib", type=float, default=1.0)
    parser.add_argument("--large", type=int, default=10, help="large messages sent at once")
    parser.add_argument("--large-mib", type=float, default=34.0)
    parser.add_argument("--budget-mib", type=int, default=64, help="limits.memory_budget")
    parser.add_argument("--allowance-mib", type=float, default=16.0,
                        help="what may come on top of the budget")
    parser.add_argument("--settle", type=float, default=5.0)
    parser.add_argument("--code", type=lambda p: Path(p).resolve(), default=REPO,
                        help="the checkout to run")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO))
    from mailserver.mailauth.keys import generate, parse_key, txt_record
    from tests.dns_zone import DNSProcess

    pem = generate("rsa")
    dns = DNSProcess(_zone(txt_record(parse_key(pem))))
    limit = args.budget_mib + args.allowance_mib

    def server() -> MailServerPeer:
        peer = MailServerPeer(
            extra_toml=f'[checks]\nskip_networks = []\ndns_timeout = 3.0\n'
                       f'[relay]\nresolver = "{dns.resolver}"\n',
            max_connections=max(args.held + 10, 100), keep=args.keep, code=args.code,
        )
        if args.budget_mib != 64:
            peer.config_path.write_text(peer.config_path.read_text()
                                        + f"memory_budget = {args.budget_mib * MiB}\n")
        return peer

    try:
        with server() as peer:
            first = held(peer, args.held, args.header_mib, args.body_mib)
        print(f"held: {args.held} connections x ({args.header_mib} MiB header + "
              f"{args.body_mib} MiB body) mid-DATA: RSS {first['before_mib']:.1f} -> "
              f"{first['holding_mib']:.1f} MiB (+{first['growth_mib']:.1f}, limit "
              f"{limit:.0f}); {first['accepted']}/{args.held} accepted at the end")
        with server() as peer:  # a fresh one: memory the first kept would hide growth
            second = large(peer, args.large, args.large_mib, pem, args.settle)
        print(f"large: {args.large} x {args.large_mib} MiB, DKIM-signed, checked: "
              f"{second['seconds']:.1f} s, peak +{second['peak_growth_mib']:.1f} MiB "
              f"(limit {limit:.0f}), RSS {second['before_mib']:.1f} before, "
              f"{second['right_after_mib']:.1f} right after, "
              f"{second['afterwards_mib']:.1f} {args.settle:.0f} s later "
              f"(+{second['held_after_mib']:.1f}); {second['accepted']}/{args.large} "
              f"accepted, dkim=pass: {second['dkim_pass']}")
    finally:
        dns.stop()
    ok = (first["growth_mib"] <= limit and first["accepted"] == args.held
          and second["peak_growth_mib"] <= limit and second["accepted"] == args.large
          and second["dkim_pass"])
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
