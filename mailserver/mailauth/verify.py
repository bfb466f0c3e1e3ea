"""
Inbound checks for the MX role: SPF, DKIM and DMARC into one
C{Authentication-Results} field.

A message hook that runs before every other one.  For every message it first
removes C{Authentication-Results} fields that claim to come from this server
(our authserv-id, RFC 8601 5); for unauthenticated sessions it then checks

  - SPF (RFC 7208, pyspf) for the MAIL FROM identity and the HELO identity,
  - every DKIM signature (RFC 6376, dkimpy; at most L{MAX_SIGNATURES}; the
    body hashed a piece at a time, L{mailserver.mailauth.bodyhash}),
  - DMARC (RFC 7489, L{mailserver.mailauth.dmarc}),

and adds one C{Authentication-Results} field with the verdicts.  The checks
are blocking libraries, so they run in a thread, and their DNS queries go to
the reactor thread through L{mailserver.mailauth.dns.ThreadDNS}.

Policy (C{[checks]}): a DMARC C{fail} whose disposition is C{reject}, or an
SPF C{fail} that DMARC does not rescue, is refused with 550 5.7.1 when the
configuration says C{"reject"}, unless the client network or the sender's
domain is exempt.  Errors in the checks themselves never refuse mail.
"""

from __future__ import annotations

import functools
import ipaddress
import random
import re
from collections.abc import Iterable

from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from mailserver.config import CheckAction
from mailserver.hooks import Reject
from mailserver.interfaces import IMessageHook
from mailserver.logs import emit, emit_failure
from mailserver.mailauth import dmarc
from mailserver.mailauth.bodyhash import BODY_CHUNK, HeaderVerifier, hash_key
from mailserver.mailauth.dns import DNSTempError, SyncDNS, dkim_txt, spf_resolver
from mailserver.mailauth.results import (
    FIELD,
    DKIMResult,
    Report,
    SPFResult,
    authserv_id,
    render,
)
from mailserver.names import is_domain
from mailserver.safe_text import printable

MAX_SIGNATURES = 5
# RFC 7208 4.6.4: at least 20 seconds for a whole SPF evaluation.
SPF_TOTAL_TIME = 20


@functools.lru_cache(maxsize=4096)
def client_ip(address: str) -> str | None:
    """
    The client address as pyspf wants it (IPv4-mapped IPv6 as IPv4), or
    C{None} when it is not an IP address.  Remembered: a client sends many
    messages, and parsing an address is not free.
    """
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


def check_spf(resolver: SyncDNS, ip: str | None, sender: str, helo: str,
              timeout: float = 10.0) -> tuple[SPFResult, ...]:
    """
    SPF for the MAIL FROM identity (unless the sender is null) and the HELO
    identity (C{none} when HELO is not a domain name).
    """
    import spf

    helo_name = helo.rstrip(".")

    def run(identity: str, value: str, s: str) -> SPFResult:
        if ip is None:
            return SPFResult(identity, value, "none", "no client IP address")
        if not is_domain(helo_name) and identity == "helo":
            return SPFResult(identity, value, "none", "HELO is not a domain name")
        try:
            with spf_resolver(resolver):
                query = spf.query(i=ip, s=s, h=helo_name, timeout=timeout,
                                  querytime=max(SPF_TOTAL_TIME, timeout))
                result, _, explanation = query.check()
        except Exception as e:  # pyspf reports most problems as results already
            return SPFResult(identity, value, "temperror", f"{type(e).__name__}: {e}")
        reason = explanation if result in ("temperror", "permerror") else ""
        return SPFResult(identity, value, result, reason)

    out = []
    if sender:
        domain = sender.rpartition("@")[2]
        if is_domain(domain.rstrip(".")):
            out.append(run("mailfrom", sender, sender))
        else:
            out.append(SPFResult("mailfrom", sender, "none", "no domain to check"))
    out.append(run("helo", helo_name or "unknown", ""))
    return tuple(out)


def check_dkim(resolver: SyncDNS, head: bytes, body: Iterable[bytes],
               timeout: float = 10.0) -> tuple[DKIMResult, ...]:
    """
    A result for each of the first L{MAX_SIGNATURES} C{DKIM-Signature}s of
    the message with the header section C{head} and the body given in
    pieces (read once, and only if there is a signature).
    """
    import dkim
    from dkim.util import InvalidTagValueList, parse_tag_value

    try:
        verifier = HeaderVerifier(head, minkey=1024, timeout=int(timeout))
    except dkim.DKIMException as e:
        return (DKIMResult("permerror", reason=f"cannot parse the message: {e}"),)
    signatures = [v for n, v in verifier.headers if n.lower() == b"dkim-signature"]
    parsed = []
    for value in signatures[:MAX_SIGNATURES]:
        try:
            tags = parse_tag_value(value)
        except InvalidTagValueList:
            tags = {}
        parsed.append(tags)
        try:
            verifier.wanted.append(hash_key(tags))
        except ValueError:
            pass  # dkimpy says what is wrong with it
    verifier.body = body
    out = []
    for index, tags in enumerate(parsed):

        def tag(name: bytes) -> str:
            return b"".join(tags.get(name, b"").split()).decode("ascii", "replace")

        info = dict(domain=tag(b"d"), selector=tag(b"s"), algorithm=tag(b"a"), b=tag(b"b")[:8])
        state = {"temp": False, "missing": False}

        def on_temperror() -> None:
            state["temp"] = True

        lookup = dkim_txt(resolver, on_temperror)

        def dnsfunc(name, timeout=5):
            found = lookup(name, timeout)
            state["missing"] = found is None
            return found

        try:
            ok = verifier.verify(idx=index, dnsfunc=dnsfunc)
        except dkim.ValidationError as e:
            reason = "body hash did not verify" if "body hash" in str(e) else str(e)
            out.append(DKIMResult("fail", reason=reason, **info))
            continue
        except dkim.DKIMException as e:
            out.append(DKIMResult("permerror", reason=str(e), **info))
            continue
        except Exception as e:  # dkimpy on inputs it does not expect
            out.append(DKIMResult("permerror", reason=f"{type(e).__name__}: {e}", **info))
            continue
        if ok:
            out.append(DKIMResult("pass", **info))
        elif state["temp"]:
            out.append(DKIMResult("temperror", reason="key lookup failed", **info))
        elif state["missing"]:
            out.append(DKIMResult("permerror", reason="no key for signature", **info))
        else:
            out.append(DKIMResult("fail", reason="signature did not verify", **info))
    return tuple(out)


def check_message(
    resolver: SyncDNS,
    *,
    ip: str | None,
    helo: str,
    sender: str,
    head: bytes,
    body: Iterable[bytes],
    from_values: list[str],
    timeout: float = 10.0,
    rng: random.Random | None = None,
) -> Report:
    """
    All checks, synchronously (run it in a thread).
    """
    spf_results = check_spf(resolver, ip, sender, helo, timeout)
    dkim_results = check_dkim(resolver, head, body, timeout)
    for_policy = spf_results[0]
    spf_domain = (for_policy.value.rpartition("@")[2] if for_policy.identity == "mailfrom"
                  else for_policy.value)
    verdict = dmarc.evaluate(
        resolver, dmarc.from_domains(from_values), for_policy.result, spf_domain,
        [r.domain for r in dkim_results if r.result == "pass"], rng,
    )
    return Report(spf=spf_results, dkim=dkim_results, dmarc=verdict)


def _safe(text: str) -> str:
    return re.sub(r"[^\x21-\x7e]", "?", text)[:255]


def _matches(domain: str, patterns: tuple[str, ...]) -> bool:
    for pattern in patterns:
        if pattern.startswith("."):
            if domain == pattern[1:] or domain.endswith(pattern):
                return True
        elif domain == pattern:
            return True
    return False


@implementer(IMessageHook)
class InboundChecks:
    """
    @param checks: the L{mailserver.config.Checks} section.
    @param hostname: our authserv-id.
    @param resolver: a L{SyncDNS} for the checks' thread (a
        L{mailserver.mailauth.dns.ThreadDNS} in the server).
    @param threadpool: where the checks run (default: the reactor's).
    @param rng: samples DMARC C{pct}.
    """

    log = Logger()

    def __init__(self, checks, hostname: str, resolver: SyncDNS, reactor,
                 threadpool=None, rng: random.Random | None = None) -> None:
        self._checks = checks
        self._authserv = hostname.lower().rstrip(".")
        self._resolver = resolver
        self._reactor = reactor
        self._threadpool = threadpool
        self._rng = rng
        self._skip = checks.skip_networks
        self._exempt = checks.exempt_networks

    def _in(self, ip: str | None, networks) -> bool:
        if ip is None:
            return False
        return _in_networks(ip, networks)

    async def message(self, envelope, headers, body) -> Reject | None:
        ip = client_ip(envelope.client_address)
        checked = not (envelope.authenticated is not None or not self._checks.enabled
                       or self._in(ip, self._skip))
        # DKIM verifies the header as it came, forged fields included.
        received = headers.to_bytes() if checked else b""
        removed = headers.remove(FIELD, where=lambda v: authserv_id(v) == self._authserv)
        if removed:
            emit(self.log, LogLevel.info, "checks.forged_removed",
                 "removed forged Authentication-Results fields", count=removed,
                 sender=printable(envelope.sender), client=envelope.client_address)
        if not checked:
            return None
        threadpool = self._threadpool or self._reactor.getThreadPool()
        from_values = headers.get_all("From")

        def run() -> Report:
            return check_message(
                self._resolver, ip=ip, helo=envelope.helo, sender=envelope.sender,
                head=received, body=body.chunks(BODY_CHUNK), from_values=from_values,
                timeout=self._checks.dns_timeout, rng=self._rng,
            )

        try:
            report = await deferToThreadPool(self._reactor, threadpool, run)
        except Exception as e:
            # A bug in the checks must not hold mail back: deliver unmarked.
            emit_failure(self.log, "checks.failed", "the checks failed", Failure(e),
                         sender=printable(envelope.sender), client=envelope.client_address)
            return None
        headers.add_raw(render(self._authserv, report))
        emit(self.log, LogLevel.info, "checks.result", "checked",
             sender=printable(envelope.sender), client=ip, spf=report.spf[0].result,
             dkim=",".join(r.result for r in report.dkim) or "none", dmarc=report.dmarc.result)
        return self._decide(envelope, ip, from_values, report)

    def _decide(self, envelope, ip, from_values, report: Report) -> Reject | None:
        domains = [d for d in [dmarc.domain_of(envelope.sender),
                               *dmarc.from_domains(from_values)] if d]
        if self._in(ip, self._exempt) or any(
            _matches(d, self._checks.exempt_domains) for d in domains
        ):
            return None
        verdict = report.dmarc
        if (self._checks.dmarc_reject == CheckAction.REJECT and verdict.result == "fail"
                and verdict.disposition == "reject"):
            emit(self.log, LogLevel.info, "checks.refused",
                 "refused: the DMARC policy of the domain is reject",
                 sender=printable(envelope.sender), client=ip,
                 domain=printable(verdict.domain), reason="dmarc")
            return Reject(550, "5.7.1", f"Message refused: it fails the DMARC policy of "
                          f"{_safe(verdict.domain)}", reason="dmarc")
        spf = report.spf_for_policy()
        if (self._checks.spf_fail == CheckAction.REJECT and spf is not None and spf.result == "fail"
                and verdict.result != "pass"):
            domain = _safe(spf.value.rpartition("@")[2])
            emit(self.log, LogLevel.info, "checks.refused", "refused: SPF fail",
                 sender=printable(envelope.sender), client=ip, domain=domain, reason="spf")
            return Reject(550, "5.7.1", f"Message refused: {domain} does not allow {ip} "
                          "to send its mail (SPF fail)", reason="spf")
        return None


@functools.lru_cache(maxsize=4096)
def _in_networks(ip: str, networks: tuple) -> bool:
    address = ipaddress.ip_address(ip)
    return any(address.version == n.version and address in n for n in networks)


__all__ = ["InboundChecks", "check_message", "check_spf", "check_dkim", "client_ip",
           "DNSTempError"]
