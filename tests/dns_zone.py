"""
A real C{twisted.names} DNS server on 127.0.0.1 for the relay and
mail-authentication tests, serving TXT (SPF, DKIM keys, DMARC), A, AAAA, MX, PTR and CNAME
records from a dict:

    {"example.org": {"TXT": ["v=spf1 ip4:127.0.0.1 -all"], "A": ["127.0.0.1"]}}

A name with C{"SOA": N} is a zone's apex: negative answers for it and the
names under it ("no such record", "no such name") carry its SOA record in
their authority section, TTL and MINIMUM N, as a real server's do (RFC 2308);
without one they carry none.

A name can also misbehave, for the fault tests: C{{"RCODE": "SERVFAIL"}} (or
C{"REFUSED"}, C{"NXDOMAIN"}) answers every query for it with that code,
C{{"SILENT": True}} never answers, C{{"TRUNCATE": True}} answers over UDP
with only the TC bit (so the client retries over TCP) and C{{"TCP": "reset"}}
resets the TCP connection that asks for it.

L{listen} runs it in the calling process's reactor (trial tests);
L{DNSProcess} runs it as a child process (end-to-end tests), and running this
file as a script (C{python dns_zone.py '<zone json>' [address port]}) is
that child: it prints its port and serves until killed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from twisted.internet import defer
from twisted.names import common, dns, error, server


def _txt(text: str):
    data = text.encode("utf-8")
    return dns.Record_TXT(*[data[i:i + 255] for i in range(0, len(data), 255)] or [b""], ttl=60)


def _records(spec: dict) -> list:
    out = [_txt(t) for t in spec.get("TXT", [])]
    out += [dns.Record_A(a, ttl=60) for a in spec.get("A", [])]
    out += [dns.Record_AAAA(a, ttl=60) for a in spec.get("AAAA", [])]
    out += [dns.Record_MX(p, h.encode(), ttl=60) for p, h in spec.get("MX", [])]
    out += [dns.Record_PTR(h.encode(), ttl=60) for h in spec.get("PTR", [])]
    if "CNAME" in spec:
        out.append(dns.Record_CNAME(spec["CNAME"].encode(), ttl=60))
    return out


def soa_authority(zone: dict, name: str) -> list:
    """
    The SOA record of the zone C{name} is in (its nearest enclosing name
    with C{"SOA"}), for a negative answer's authority section; C{[]} if none.
    """
    labels = name.split(".")
    for i in range(len(labels)):
        apex = ".".join(labels[i:])
        seconds = zone.get(apex, {}).get("SOA")
        if seconds is not None:
            record = dns.Record_SOA(f"ns.{apex}".encode(), f"hostmaster.{apex}".encode(),
                                    minimum=seconds, ttl=seconds)
            return [dns.RRHeader(apex.encode(), dns.SOA, dns.IN, seconds, record, auth=True)]
    return []


class ZoneResolver(common.ResolverBase):
    """
    Answers from the dict, authoritatively; unknown names are NXDOMAIN.
    """

    def __init__(self, zone: dict) -> None:
        super().__init__()
        self._zone = {name.lower().rstrip("."): spec for name, spec in zone.items()}

    def _answers(self, name: str, qtype: int, depth: int = 0) -> list:
        spec = self._zone[name]
        records = _records(spec)
        found = [dns.RRHeader(name.encode(), r.TYPE, dns.IN, 60, r, auth=True)
                 for r in records if qtype in (dns.ALL_RECORDS, r.TYPE)]
        if not found and "CNAME" in spec and depth < 8:
            target = spec["CNAME"].lower().rstrip(".")
            cname = [dns.RRHeader(name.encode(), dns.CNAME, dns.IN, 60,
                                  dns.Record_CNAME(target.encode(), ttl=60), auth=True)]
            if target in self._zone:
                return cname + self._answers(target, qtype, depth + 1)
            return cname
        return found

    def _lookup(self, name, cls, type, timeout=None):
        key = name.decode("ascii").lower().rstrip(".")
        if key not in self._zone:
            return defer.fail(error.DNSNameError(name))
        answers = self._answers(key, type)
        return defer.succeed((answers, [] if answers else soa_authority(self._zone, key), []))


_RCODES = {"SERVFAIL": dns.ESERVER, "REFUSED": dns.EREFUSED, "NXDOMAIN": dns.ENAME,
           "FORMERR": dns.EFORMAT, "NOTIMP": dns.ENOTIMP}


class FaultyServerFactory(server.DNSServerFactory):
    """
    Answers from the zone, except for the names told to misbehave.
    """

    def __init__(self, zone: dict) -> None:
        super().__init__(authorities=[ZoneResolver(zone)])
        self._zone = {name.lower().rstrip("."): spec for name, spec in zone.items()}

    def handleQuery(self, message, protocol, address):
        name = message.queries[0].name.name.decode("ascii").lower().rstrip(".")
        spec = self._zone.get(name, {})
        over_tcp = address is None
        if spec.get("SILENT"):
            return None
        if over_tcp and spec.get("TCP") == "reset":
            protocol.transport.abortConnection()
            return None
        if "RCODE" in spec:
            response = self._responseFromMessage(message=message, rCode=_RCODES[spec["RCODE"]])
            self.sendReply(protocol, response, address)
            return None
        authority = soa_authority(self._zone, name)
        if name not in self._zone and authority:
            response = self._responseFromMessage(message=message, rCode=dns.ENAME,
                                                 authority=authority)
            response.auth = True
            self.sendReply(protocol, response, address)
            return None
        if spec.get("TRUNCATE") and not over_tcp:
            response = self._responseFromMessage(message=message)
            response.trunc = 1
            self.sendReply(protocol, response, address)
            return None
        return super().handleQuery(message, protocol, address)


def listen(reactor, zone: dict, tcp: bool = True, interface: str = "127.0.0.1",
           port: int = 0) -> tuple[int, list]:
    """
    Serve C{zone} over UDP and TCP on one free port of C{interface} (over
    UDP only when not C{tcp}: TCP connections are then refused), or on
    C{port} when given (the benchmarks' DNS for a system resolver, which
    only asks port 53).

    @return: C{(port, listening ports to stop)}.
    """
    factory = FaultyServerFactory(zone)
    protocol = dns.DNSDatagramProtocol(factory)
    if not tcp:
        udp = reactor.listenUDP(port, protocol, interface=interface)
        return udp.getHost().port, [udp]
    for _ in range(1 if port else 50):
        tcp = reactor.listenTCP(port, factory, interface=interface)
        chosen = tcp.getHost().port
        try:
            udp = reactor.listenUDP(chosen, protocol, interface=interface)
        except Exception:
            tcp.stopListening()
            if port:
                raise
            continue
        return chosen, [tcp, udp]
    raise RuntimeError("no free port for the DNS server")


class DNSProcess:
    """
    The DNS server as a child process; C{resolver} is its C{"host:port"}.
    """

    def __init__(self, zone: dict, interface: str = "127.0.0.1", port: int = 0) -> None:
        self.interface = interface
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), json.dumps(zone), interface,
             str(port)],
            stdout=subprocess.PIPE, text=True,
        )
        line = self.process.stdout.readline()
        if not line.strip().isdigit():
            self.stop()
            raise RuntimeError("the DNS server did not start")
        self.port = int(line)

    @property
    def resolver(self) -> str:
        return f"{self.interface}:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.process.stdout.close()


if __name__ == "__main__":
    from twisted.internet import reactor

    interface, port = (sys.argv[2], int(sys.argv[3])) if len(sys.argv) > 3 else ("127.0.0.1", 0)
    port, _ = listen(reactor, json.loads(sys.argv[1]), interface=interface, port=port)
    print(port, flush=True)
    reactor.run()
