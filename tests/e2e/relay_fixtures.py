"""
Peers for relay tests, all on 127.0.0.1 with OS-chosen ports:

  - L{DNSServer}: a real C{twisted.names} authoritative server (UDP and TCP
    on one port) in a child process, serving MX/A/AAAA/CNAME records for test
    domains from an in-memory zone (L{MemoryAuthority}, also usable directly
    as an C{IResolver} in unit tests);
  - L{SMTPPeer}: an aiosmtpd server that records what it receives and can be
    told to answer RCPT or DATA with a 4xx or 5xx.

Run as a script (C{python relay_fixtures.py dns '<zone json>'}) it is the DNS
server: it prints its port and serves until killed.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

from twisted.names import authority, common, dns

# A zone: {name: {"MX": [[pref, host]], "A": [...], "AAAA": [...], "CNAME": host}}
Zone = dict


def _records(spec: dict) -> list:
    out = []
    for preference, host in spec.get("MX", []):
        out.append(dns.Record_MX(preference, host.encode(), ttl=60))
    out += [dns.Record_A(a, ttl=60) for a in spec.get("A", [])]
    out += [dns.Record_AAAA(a, ttl=60) for a in spec.get("AAAA", [])]
    if "CNAME" in spec:
        out.append(dns.Record_CNAME(spec["CNAME"].encode(), ttl=60))
    return out


class MemoryAuthority(authority.FileAuthority):
    """
    An authority for one zone from a dict, no file needed.
    """

    def __init__(self, origin: str, names: dict[str, dict]) -> None:
        common.ResolverBase.__init__(self)
        self._cache = {}
        self.soa = (
            origin.encode(),
            dns.Record_SOA(mname=b"ns." + origin.encode(), rname=b"root." + origin.encode(),
                           serial=1, refresh=60, retry=60, expire=60, minimum=60, ttl=60),
        )
        self.records = {name.lower().encode(): _records(spec) for name, spec in names.items()}
        self.records.setdefault(origin.encode(), []).append(self.soa[1])


def authorities(zone: Zone) -> list[MemoryAuthority]:
    """
    One authority per zone (the last two labels of each name).
    """
    zones: dict[str, dict] = {}
    for name, spec in zone.items():
        origin = ".".join(name.lower().rstrip(".").split(".")[-2:])
        zones.setdefault(origin, {})[name.lower().rstrip(".")] = spec
    return [MemoryAuthority(origin, names) for origin, names in zones.items()]


class ZoneResolver(common.ResolverBase):
    """
    Asks the authority whose zone holds the name (for in-process tests).
    """

    def __init__(self, zone: Zone) -> None:
        super().__init__()
        self._authorities = authorities(zone)

    def _lookup(self, name, cls, type, timeout=None):
        for auth in self._authorities:
            origin = auth.soa[0].lower()
            lowered = name.lower()
            if lowered == origin or lowered.endswith(b"." + origin):
                return auth._lookup(name, cls, type, timeout)
        from twisted.internet import defer
        from twisted.names import error

        return defer.fail(error.DNSNameError(name))


def _serve(zone: Zone) -> None:
    from twisted.internet import reactor
    from twisted.names import server

    factory = server.DNSServerFactory(authorities=authorities(zone))
    protocol = dns.DNSDatagramProtocol(factory)
    for _ in range(50):
        tcp = reactor.listenTCP(0, factory, interface="127.0.0.1")
        port = tcp.getHost().port
        try:
            reactor.listenUDP(port, protocol, interface="127.0.0.1")
        except Exception:
            tcp.stopListening()
            continue
        break
    print(port, flush=True)
    reactor.run()


class DNSServer:
    """
    The DNS server child process.  C{zone} as for L{authorities}.
    """

    def __init__(self, zone: Zone) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "dns", json.dumps(zone)],
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.process.stdout.readline()
        if not line.strip().isdigit():
            self.stop()
            raise RuntimeError("the DNS server did not start")
        self.port = int(line)

    @property
    def resolver(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.process.stdout.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Recorder:
    """
    The aiosmtpd handler: keeps every message; C{rcpt_reply} and
    C{data_reply} (e.g. C{"550 5.1.1 no such user"}) refuse.
    """

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.rcpt_reply: str | None = None
        self.data_reply: str | None = None
        self.ehlo_seen: list[str] = []

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.rcpt_reply:
            return self.rcpt_reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.data_reply:
            return self.data_reply
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
        return "250 2.0.0 OK"


class SMTPPeer:
    """
    An aiosmtpd server on 127.0.0.1:C{port} (a free one by default).
    """

    def __init__(self, port: int | None = None) -> None:
        from aiosmtpd.controller import Controller

        self.port = port or free_port()
        self.handler = Recorder()
        self.controller = Controller(self.handler, hostname="127.0.0.1", port=self.port,
                                     data_size_limit=50_000_000)

    def start(self) -> SMTPPeer:
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()

    @property
    def messages(self):
        return self.handler.messages

    def wait_for(self, count: int, timeout: float = 30.0) -> list:
        deadline = time.monotonic() + timeout
        while len(self.messages) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.messages


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


if __name__ == "__main__":
    if sys.argv[1] == "dns":
        _serve(json.loads(sys.argv[2]))
