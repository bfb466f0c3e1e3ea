"""
DNS for the mail-authentication checks, always through C{twisted.names}.

The checks themselves (pyspf, dkimpy, our DMARC code) are blocking libraries,
so they run in a thread and ask for records through a L{SyncDNS}:
L{ThreadDNS} hands each query to the reactor thread (C{callFromThread}) and
waits for the answer, as C{blockingCallFromThread} does but bounded in time;
there L{lookup} asks the server's resolver (C{relay.resolver}).  The reactor
itself never blocks.

L{spf_lookup} and L{dkim_txt} adapt a L{SyncDNS} to the DNS hooks of pyspf
and dkimpy.
"""

from __future__ import annotations

import queue
import socket
import threading
from typing import Protocol

from twisted.internet import defer
from twisted.names import dns
from twisted.names import error as dns_error
from twisted.python.failure import Failure

# The record types the checks ask for, and the resolver method for each.
_METHODS = {
    "A": "lookupAddress",
    "AAAA": "lookupIPV6Address",
    "MX": "lookupMailExchange",
    "TXT": "lookupText",
    "PTR": "lookupPointer",
    "SPF": "lookupSenderPolicy",
}
_TYPES = {"A": dns.A, "AAAA": dns.AAAA, "MX": dns.MX, "TXT": dns.TXT, "PTR": dns.PTR,
          "SPF": dns.SPF}


class DNSTempError(Exception):
    """
    The lookup failed for now (timeout, SERVFAIL, refused): a C{temperror}.
    """


class SyncDNS(Protocol):
    def query(self, name: str, qtype: str) -> list:
        """
        Records of type C{qtype} (C{"A"}, C{"AAAA"}, C{"MX"}, C{"TXT"},
        C{"PTR"}) at C{name}, CNAMEs followed: A/AAAA as address strings, MX
        as C{(preference, host)}, TXT as a list of C{bytes} strings per
        record, PTR as host names.  Empty when the name or the records do not
        exist.

        @raise DNSTempError: when the answer is not known for now.
        """


def _value(record, qtype: str):
    payload = record.payload
    if qtype == "A":
        return payload.dottedQuad()
    if qtype == "AAAA":
        return socket.inet_ntop(socket.AF_INET6, payload.address)
    if qtype == "MX":
        return (payload.preference, str(payload.name).rstrip("."))
    if qtype in ("TXT", "SPF"):
        return list(payload.data)
    if qtype == "PTR":
        return str(payload.name).rstrip(".")
    raise ValueError(qtype)  # pragma: no cover


async def lookup(resolver, name: str, qtype: str, timeout: float = 10.0) -> list:
    """
    L{SyncDNS.query}, asynchronously, with a C{twisted.names} resolver.
    """
    if qtype not in _METHODS:
        raise ValueError(f"unsupported record type {qtype}")
    # Two tries over UDP: a quick one, then one with the rest of the time.
    first = min(2.0, timeout / 3)
    tries = (first, max(first, timeout - first))
    try:
        answers, _, _ = await getattr(resolver, _METHODS[qtype])(name, timeout=tries)
    except dns_error.DNSNameError:
        return []
    except Exception as e:  # timeouts, SERVFAIL, refused, unreachable: all "for now"
        raise DNSTempError(f"{qtype} lookup for {name} failed: {type(e).__name__}") from None
    return [_value(a, qtype) for a in answers if a.type == _TYPES[qtype]]


class ThreadDNS:
    """
    A L{SyncDNS} for code running in a thread: each query runs L{lookup} in
    the reactor thread and waits for it.

    Unlike C{blockingCallFromThread}, a wait never outlives the reactor:
    when it shuts down, waiting queries fail at once (so the reactor's
    thread pool can be joined), and each wait is bounded anyway.
    """

    def __init__(self, reactor, resolver, timeout: float = 10.0) -> None:
        self._reactor = reactor
        self._resolver = resolver
        self._timeout = timeout
        self._lock = threading.Lock()
        self._pending: set[queue.Queue] = set()
        self._closed = False
        reactor.addSystemEventTrigger("before", "shutdown", self.close)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pending = list(self._pending)
        for waiting in pending:
            try:
                waiting.put_nowait(DNSTempError("the server is shutting down"))
            except queue.Full:
                pass

    def query(self, name: str, qtype: str) -> list:
        answer: queue.Queue = queue.Queue(maxsize=1)
        with self._lock:
            if self._closed:
                raise DNSTempError("the server is shutting down")
            self._pending.add(answer)

        def start() -> None:
            d = defer.ensureDeferred(lookup(self._resolver, name, qtype, self._timeout))
            d.addBoth(lambda result: _offer(answer, result))

        try:
            self._reactor.callFromThread(start)
            try:
                result = answer.get(timeout=self._timeout + 5)
            except queue.Empty:
                raise DNSTempError(f"{qtype} lookup for {name}: no answer in time") from None
        finally:
            with self._lock:
                self._pending.discard(answer)
        if isinstance(result, Failure):
            result.raiseException()
        if isinstance(result, BaseException):
            raise result
        return result


def _offer(answer: queue.Queue, result) -> None:
    try:
        answer.put_nowait(result)
    except queue.Full:  # the waiter already gave up
        pass


class DictDNS:
    """
    A L{SyncDNS} from a dict, for tests: C{{("example.org", "TXT"): [...]}};
    a value that is an exception instance is raised.
    """

    def __init__(self, records: dict) -> None:
        self._records = {(n.lower().rstrip("."), t): v for (n, t), v in records.items()}
        self.queries: list[tuple[str, str]] = []

    def query(self, name: str, qtype: str) -> list:
        key = (name.lower().rstrip("."), qtype)
        self.queries.append(key)
        value = self._records.get(key, [])
        if isinstance(value, BaseException):
            raise value
        return list(value)


def dkim_txt(resolver: SyncDNS, on_temperror=None):
    """
    A dkimpy C{dnsfunc}: the first TXT record at a name, joined, as C{bytes},
    or C{None}.  A temporary failure calls C{on_temperror()} and raises
    dkimpy's C{DnsTimeoutError}.
    """

    def dnsfunc(name, timeout=5):
        import dkim

        text = name.decode("ascii", "replace") if isinstance(name, bytes) else name
        try:
            records = resolver.query(text.rstrip("."), "TXT")
        except DNSTempError as e:
            if on_temperror is not None:
                on_temperror()
            raise dkim.DnsTimeoutError(str(e)) from None
        return b"".join(records[0]) if records else None

    return dnsfunc


# pyspf looks records up through the module-level function spf.DNSLookup.
# install_spf_dns() replaces it, once, by a dispatcher that uses the
# resolver the calling thread set with spf_resolver(), and otherwise the
# original; so each check uses our resolver and nothing else changes.
_spf_local = threading.local()
_install_lock = threading.Lock()


def install_spf_dns() -> None:
    import spf

    with _install_lock:
        if getattr(spf.DNSLookup, "_mailserver", False):
            return
        original = spf.DNSLookup

        def dispatch(name, qtype, strict=True, timeout=20):
            resolver = getattr(_spf_local, "resolver", None)
            if resolver is None:
                return original(name, qtype, strict, timeout)
            return spf_lookup(resolver, name, qtype)

        dispatch._mailserver = True  # type: ignore[attr-defined]
        spf.DNSLookup = dispatch


class spf_resolver:
    """
    C{with spf_resolver(dns): ...}: pyspf queries in this thread use C{dns}.
    """

    def __init__(self, resolver: SyncDNS) -> None:
        self._resolver = resolver

    def __enter__(self) -> None:
        install_spf_dns()
        self._previous = getattr(_spf_local, "resolver", None)
        _spf_local.resolver = self._resolver

    def __exit__(self, *exc) -> None:
        _spf_local.resolver = self._previous


def spf_lookup(resolver: SyncDNS, name: str, qtype: str) -> list:
    """
    A query in pyspf's C{DNSLookup} shape: C{[((name, qtype), value)]}.
    """
    import spf

    if qtype not in _METHODS:
        return []
    try:
        values = resolver.query(name, qtype)
    except DNSTempError as e:
        raise spf.TempError(f"DNS {e}") from None
    return [((name, qtype), value) for value in values]
