"""
MTA-STS (RFC 8461): a recipient domain's published wish that mail reach it
only over TLS with a verified certificate, and only through the MX hosts it
names.

For a domain, L{MTASTS.policy}:

  - looks up the TXT record C{_mta-sts.<domain>} (through the relay's
    resolver) for the policy's C{id};
  - uses the cached policy while it is within its C{max_age} and the id has
    not changed (also when the TXT record is gone or the lookup fails: the
    cache is what protects against an attacker who hides the record);
  - else fetches C{https://mta-sts.<domain>/.well-known/mta-sts.txt} with
    treq (certificate verified, no redirects, status 200, at most 64 KiB,
    bounded in time), with the host name looked up through the same
    resolver, and caches it durably in C{<data_dir>/mta-sts/<domain>.json}
    so it outlives a restart;
  - a fetch that fails leaves the cached policy in force, or none; it is not
    tried again for the same id for five minutes.

What a policy does to a delivery (C{enforce}, C{testing}) is decided in
L{mailserver.relay.tls_policy} and L{mailserver.relay.delivery}.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

from twisted.internet import defer, endpoints, error
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from mailserver.logs import emit, emit_failure
from mailserver.safe_fs import open_file, open_folder, open_path

MAX_POLICY_SIZE = 64 * 1024
MAX_AGE_LIMIT = 31_557_600  # RFC 8461 3.2: about a year
FAILED_FETCH_PAUSE = 300.0
CACHE_VERSION = 1
# How long "no policy cached for this domain" is believed before the cache
# folder is looked at again (another node sharing it may have saved one),
# and for how many domains at most.
ABSENT_RECHECK = 300.0
ABSENT_MEMORY = 10_000

_DOMAIN = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)+$")
_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")
_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
_MX = re.compile(r"^(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*$")


class PolicyError(ValueError):
    """
    A policy that cannot be used; the text says why.
    """


@dataclass(frozen=True)
class STSPolicy:
    """
    A domain's policy as fetched.

    @ivar id: the TXT record's id it was fetched for.
    @ivar fetched: when (seconds since the epoch).
    """

    domain: str
    id: str
    mode: str
    mx: tuple[str, ...]
    max_age: int
    fetched: float

    def expired(self, now: float) -> bool:
        return now >= self.fetched + self.max_age


def policy_domain(domain: str) -> str | None:
    """
    The ASCII form of a recipient domain that can have a policy, or C{None}
    (an address literal, a single label, a name that is not a host name).
    """
    domain = domain.lower().rstrip(".")
    try:
        ipaddress.ip_address(domain.strip("[]"))
        return None
    except ValueError:
        pass
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    return domain if _DOMAIN.match(domain) else None


def record_id(texts: list[str]) -> str | None:
    """
    The id of the one MTA-STS record among a name's TXT strings (RFC 8461
    3.1); C{None} when there is none, more than one or it is malformed,
    which all mean "no policy published".
    """
    records = [t for t in texts if t.startswith("v=STSv1")]
    if len(records) != 1:
        return None
    fields = [f.strip() for f in records[0].split(";")]
    if fields[0] != "v=STSv1":
        return None
    found = None
    for item in fields[1:]:
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not _KEY.match(key.strip()):
            return None
        if key.strip() == "id" and found is None:
            found = value.strip()
    return found if found and _ID.match(found) else None


def parse_policy(body: bytes) -> tuple[str, tuple[str, ...], int]:
    """
    C{(mode, mx patterns, max_age)} of a policy text (RFC 8461 3.2): lines of
    C{key: value}; the first of each key counts, every C{mx} line adds one.

    @raise PolicyError: naming what is wrong.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError("the policy is not UTF-8") from None
    fields: dict[str, str] = {}
    mx: list[str] = []
    for number, line in enumerate(text.replace("\r\n", "\n").split("\n"), 1):
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if not sep or not _KEY.match(key):
            raise PolicyError(f"line {number} is not key: value")
        if key == "mx":
            if not _MX.match(value):
                raise PolicyError(f"bad mx {value[:80]!r}")
            mx.append(value.lower())
        else:
            fields.setdefault(key, value)
    if fields.get("version") != "STSv1":
        raise PolicyError("version is not STSv1")
    mode = fields.get("mode")
    if mode not in ("enforce", "testing", "none"):
        raise PolicyError(f"bad mode {str(mode)[:20]!r}")
    max_age = fields.get("max_age", "")
    if not max_age.isdigit() or len(max_age) > 10:
        raise PolicyError("max_age is not a number of seconds")
    if mode != "none" and not mx:
        raise PolicyError("no mx")
    return mode, tuple(mx), min(int(max_age), MAX_AGE_LIMIT)


def writer_tag() -> str:
    """
    This process among those that may share the cache: host and process id.
    """
    return f"{socket.gethostname()}.{os.getpid()}"


class PolicyCache:
    """
    Policies on disk, one JSON file per domain in C{folder}, each written
    whole (temporary file, fsync, rename, fsync of the folder).
    """

    log = Logger()

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _path(self, domain: str) -> Path:
        return self.folder / f"{domain}.json"

    def load(self, domain: str) -> STSPolicy | None:
        try:
            with os.fdopen(open_path(self._path(domain)), "rb") as f:
                data = json.loads(f.read().decode("utf-8"))
            if data.pop("version") != CACHE_VERSION:
                raise ValueError("unknown version")
            data["mx"] = tuple(data["mx"])
            policy = STSPolicy(**data)
            if policy.domain != domain or not isinstance(policy.max_age, int):
                raise ValueError("not this domain's")
            return policy
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, KeyError) as e:
            emit(self.log, LogLevel.warn, "mta_sts.cache_ignored",
                 "ignoring the cached policy", domain=domain, problem=str(e))
            return None

    def save(self, policy: STSPolicy) -> None:
        """
        @raise mailserver.safe_fs.SymlinkRefused: the folder, or the
            temporary file, is a symbolic link (the cache is in the data
            folder, where none is followed).
        """
        data = {"version": CACHE_VERSION, **asdict(policy), "mx": list(policy.mx)}
        # The writer's own temporary name: servers sharing the data folder
        # (README, "Several servers, one data folder") may save the same
        # domain at once, and must not write into each other's file.
        tmp = f".{policy.domain}.{writer_tag()}.tmp"
        name = self._path(policy.domain).name
        folder = open_folder(self.folder.parent, self.folder, create=True)
        try:
            fd = open_file(folder, tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                           path=self.folder / tmp)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, name, src_dir_fd=folder, dst_dir_fd=folder)
            os.fsync(folder)
        finally:
            os.close(folder)


@implementer(IAgentEndpointFactory)
class _ResolvedTLSEndpoints:
    """
    Endpoints for one policy fetch: the host name looked up through the
    relay's resolver (so tests can serve it from a loopback zone), the port
    from the configuration, TLS verified for the host name.

    @ivar sessions: the TLS sessions begun, which know what was wrong with
        a certificate.
    """

    def __init__(self, reactor, lookup, tls, port: int, timeout: float) -> None:
        self._reactor = reactor
        self._lookup = lookup
        self._tls = tls
        self._port = port
        self._timeout = timeout
        self.sessions: list = []

    def endpointForURI(self, uri):
        return _ResolvedTLSEndpoint(self._connect, uri.host.decode("ascii"))

    async def _connect(self, host: str, protocol_factory):
        addresses, problem = await self._lookup(host)
        if not addresses:
            raise error.DNSLookupError(f"{host}: {problem or 'no address'}")
        failure: Exception | None = None
        for address in addresses:
            kind = (endpoints.TCP6ClientEndpoint if ":" in address
                    else endpoints.TCP4ClientEndpoint)
            session = self._tls.session(host, check=True, enforce=True)
            self.sessions.append(session)
            endpoint = endpoints.wrapClientTLS(
                session, kind(self._reactor, address, self._port, timeout=self._timeout))
            try:
                return await endpoint.connect(protocol_factory)
            except Exception as e:
                failure = e
        raise failure  # type: ignore[misc]


@implementer(IStreamClientEndpoint)
class _ResolvedTLSEndpoint:
    def __init__(self, connect, host: str) -> None:
        self._connect = connect
        self._host = host

    def connect(self, protocol_factory):
        return defer.Deferred.fromCoroutine(self._connect(self._host, protocol_factory))


class PolicyFetcher:
    """
    Fetches a domain's policy text over HTTPS with treq.

    @param lookup: C{name -> Deferred((addresses, problem))}, e.g.
        L{mailserver.relay.mx.MXRouter.addresses}.
    @param tls: a L{mailserver.relay.tls_policy.ClientTLS} (the trust roots).
    """

    def __init__(self, reactor, lookup, tls, *, port: int = 443, timeout: float = 60.0) -> None:
        self._reactor = reactor
        self._lookup = lookup
        self._tls = tls
        self._port = port
        self._timeout = timeout

    def fetch(self, domain: str) -> defer.Deferred:
        """
        @return: a Deferred firing with the policy text, or failing with
            L{PolicyError} for anything but a 200 with a body of at most 64
            KiB within the time limit.
        """
        url = f"https://mta-sts.{domain}/.well-known/mta-sts.txt"
        d = defer.Deferred.fromCoroutine(self._fetch(url))

        def timed_out(_, seconds):
            return Failure(PolicyError(f"cannot fetch {url}: no answer within {seconds:g}s"))

        return d.addTimeout(self._timeout, self._reactor, onTimeoutCancel=timed_out)

    async def _fetch(self, url: str) -> bytes:
        import treq
        from treq.client import HTTPClient
        from twisted.web.client import Agent

        connections = _ResolvedTLSEndpoints(self._reactor, self._lookup, self._tls, self._port,
                                            self._timeout)
        client = HTTPClient(Agent.usingEndpointFactory(self._reactor, connections))
        try:
            response = await client.get(url, allow_redirects=False)
        except Exception as e:
            problem = next((s.problem for s in connections.sessions if s.problem), "")
            raise PolicyError(f"cannot fetch {url}: {problem or _describe(e)}") from None
        chunks: list[bytes] = []
        size = 0

        def collect(data: bytes) -> None:
            nonlocal size
            size += len(data)
            if size > MAX_POLICY_SIZE:
                raise PolicyError(f"{url} is larger than {MAX_POLICY_SIZE} bytes")
            chunks.append(data)

        try:
            await treq.collect(response, collect)
        except PolicyError:
            raise
        except Exception as e:
            raise PolicyError(f"cannot read {url}: {_describe(e)}") from None
        if response.code != 200:
            # No redirects (RFC 8461 3.3): a 3xx fails like any other code.
            raise PolicyError(f"{url} answered HTTP {response.code}")
        return b"".join(chunks)


def _describe(e: BaseException) -> str:
    from twisted.web.client import ResponseNeverReceived

    if isinstance(e, ResponseNeverReceived) and e.reasons:
        return "; ".join(r.getErrorMessage() for r in e.reasons)
    if isinstance(e, defer.CancelledError):
        return "timed out"
    return str(e) or type(e).__name__


class MTASTS:
    """
    The policy in force for a domain, from DNS, the cache and HTTPS.

    @param resolver: an C{IResolver} for the TXT lookup.
    @param fetcher: has C{fetch(domain) -> bytes} (L{PolicyFetcher}).
    @param io: runs a blocking call (the cache write) and returns a
        Deferred.
    """

    log = Logger()

    def __init__(self, *, resolver, fetcher, cache: PolicyCache, clock, io=None) -> None:
        self._resolver = resolver
        self._fetcher = fetcher
        self._cache = cache
        self._clock = clock
        self._io = io or (lambda f, *args: defer.maybeDeferred(f, *args))
        self._known: dict[str, STSPolicy] = {}
        self._absent: dict[str, float] = {}
        self._failed: dict[tuple[str, str], float] = {}
        self._fetching: dict[tuple[str, str], list[defer.Deferred]] = {}

    def policy(self, domain: str) -> defer.Deferred:
        """
        @return: a Deferred firing with the L{STSPolicy} in force for
            C{domain} (C{mode} may be C{"none"}), or C{None}; never fails.
        """
        return defer.Deferred.fromCoroutine(self._policy(domain))

    def _cached(self, domain: str) -> STSPolicy | None:
        # A domain without a cached policy is looked for on disk again only
        # after ABSENT_RECHECK: not a failed open() on the reactor thread for
        # every message, nor memory for good (at most ABSENT_MEMORY).
        policy = self._known.get(domain)
        if policy is not None:
            return policy
        now = self._clock.seconds()
        if self._absent.get(domain, -1e300) + ABSENT_RECHECK > now:
            return None
        policy = self._cache.load(domain)
        if policy is not None:
            self._known[domain] = policy
            self._absent.pop(domain, None)
            return policy
        if len(self._absent) >= ABSENT_MEMORY:
            self._absent.clear()
        self._absent[domain] = now
        return None

    async def _policy(self, domain: str) -> STSPolicy | None:
        name = policy_domain(domain)
        if name is None:
            return None
        now = self._clock.seconds()
        cached = self._cached(name)
        if cached is not None and cached.expired(now):
            cached = None
        current = await self._record_id(name)
        if current is None or (cached is not None and cached.id == current):
            return cached
        if self._failed.get((name, current), -1e300) + FAILED_FETCH_PAUSE > now:
            return cached
        if len(self._failed) > 1000:
            self._failed = {k: t for k, t in self._failed.items()
                            if t + FAILED_FETCH_PAUSE > now}
        fetched = await self._fetch_once(name, current)
        return fetched or cached

    async def _record_id(self, domain: str) -> str | None:
        try:
            answers, _, _ = await self._resolver.lookupText("_mta-sts." + domain)
        except Exception:
            return None  # no record, or no answer: the cache decides
        from twisted.names import dns

        texts = [b"".join(a.payload.data).decode("utf-8", "replace")
                 for a in answers if a.type == dns.TXT]
        return record_id(texts)

    async def _fetch_once(self, domain: str, policy_id: str) -> STSPolicy | None:
        """
        One fetch per domain and id at a time; the others wait for it.
        """
        key = (domain, policy_id)
        if key in self._fetching:
            waiter: defer.Deferred = defer.Deferred()
            self._fetching[key].append(waiter)
            return await waiter
        self._fetching[key] = []
        try:
            result = await self._fetch(domain, policy_id)
        except Exception:
            emit_failure(self.log, "mta_sts.fetch_failed", "fetching the policy failed",
                         domain=domain)
            result = None
        for waiter in self._fetching.pop(key):
            waiter.callback(result)
        return result

    async def _fetch(self, domain: str, policy_id: str) -> STSPolicy | None:
        try:
            mode, mx, max_age = parse_policy(await self._fetcher.fetch(domain))
        except PolicyError as e:
            self._failed[(domain, policy_id)] = self._clock.seconds()
            emit(self.log, LogLevel.warn, "mta_sts.no_policy", "no policy", domain=domain,
                 problem=str(e))
            return None
        policy = STSPolicy(domain, policy_id, mode, mx, max_age, self._clock.seconds())
        self._known[domain] = policy
        try:
            await self._io(self._cache.save, policy)
        except OSError as e:
            emit(self.log, LogLevel.error, "mta_sts.cache_failed", "cannot cache the policy",
                 domain=domain, problem=str(e))
        emit(self.log, LogLevel.info, "mta_sts.policy", "policy fetched", domain=domain,
             policy_id=policy_id, mode=mode, mx=",".join(mx) or "-", max_age=max_age)
        return policy


def make_mta_sts(relay, cache_path: Path, reactor, resolver, router, tls,
                 io=None) -> MTASTS | None:
    """
    The MTA-STS resolver the relay uses, caching policies in C{cache_path},
    or C{None} when C{relay.mta_sts} is off or all mail goes to a smarthost.
    """
    if not relay.mta_sts or relay.smarthost:
        return None
    fetcher = PolicyFetcher(reactor, router.addresses, tls, port=relay.mta_sts_port,
                            timeout=min(60.0, relay.connect_timeout + relay.command_timeout))
    return MTASTS(resolver=resolver, fetcher=fetcher,
                  cache=PolicyCache(cache_path), clock=reactor, io=io)
