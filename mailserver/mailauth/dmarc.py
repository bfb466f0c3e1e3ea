"""
DMARC (RFC 7489): policy discovery, identifier alignment and the verdict.

Pure logic over a L{mailserver.mailauth.dns.SyncDNS}; the caller runs it in a
thread.  The organizational domain comes from the Public Suffix List
(the C{publicsuffixlist} package, which ships it).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Iterable
from dataclasses import dataclass
from email.utils import getaddresses

from mailserver.mailauth.dns import DNSTempError, SyncDNS

POLICIES = ("none", "quarantine", "reject")


@dataclass(frozen=True)
class Record:
    """
    A parsed C{v=DMARC1} record (RFC 7489 6.3).
    """

    p: str
    sp: str
    adkim: str = "r"
    aspf: str = "r"
    pct: int = 100


@dataclass(frozen=True)
class Verdict:
    """
    @ivar result: C{pass}, C{fail}, C{none}, C{temperror} or C{permerror}.
    @ivar policy: the published policy that applies (C{none},
        C{quarantine}, C{reject}), C{""} without a record.
    @ivar disposition: what the policy asks for this message after C{pct}
        sampling: C{none}, C{quarantine} or C{reject}.
    @ivar domain: the RFC5322.From domain.
    @ivar reason: a short explanation for errors.
    """

    result: str
    domain: str = ""
    policy: str = ""
    disposition: str = "none"
    record: Record | None = None
    reason: str = ""


def parse_record(text: str) -> Record | None:
    """
    The record in C{text}, or C{None} when it is not a usable DMARC record.
    """
    tags: dict[str, str] = {}
    for i, part in enumerate(text.split(";")):
        part = part.strip()
        if not part:
            continue
        name, sep, value = part.partition("=")
        name, value = name.strip().lower(), value.strip()
        if i == 0 and (name != "v" or value != "DMARC1"):
            return None
        if sep and name not in tags:
            tags[name] = value
    if "v" not in tags:
        return None
    p = tags.get("p", "").lower()
    if p not in POLICIES:
        # RFC 7489 6.6.3: a bad or missing p= with a valid rua= means none.
        if "rua" not in tags:
            return None
        p = "none"
    sp = tags.get("sp", "").lower()
    if sp not in POLICIES:
        sp = p
    adkim = tags.get("adkim", "r").lower()
    aspf = tags.get("aspf", "r").lower()
    try:
        pct = min(100, max(0, int(tags.get("pct", "100"))))
    except ValueError:
        pct = 100
    return Record(p=p, sp=sp, adkim=adkim if adkim in "rs" else "r",
                  aspf=aspf if aspf in "rs" else "r", pct=pct)


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower().rstrip(".") if "@" in address else ""


def from_addresses(from_values: Iterable[str]) -> list[str]:
    """
    The addresses in the From fields, in order.
    """
    return [address for _, address in getaddresses(list(from_values)) if address]


def from_domains(from_values: Iterable[str]) -> list[str]:
    """
    The domains of the addresses in the From fields, in order.
    """
    return [domain_of(address) for address in from_addresses(from_values)]


@functools.lru_cache(maxsize=1)
def _suffix_list():
    from publicsuffixlist import PublicSuffixList

    return PublicSuffixList()


def organizational_domain(domain: str) -> str:
    """
    The registrable domain (public suffix plus one label) of C{domain},
    or C{domain} itself when it has none.
    """
    domain = domain.lower().rstrip(".")
    return _suffix_list().privatesuffix(domain) or domain


def aligned(identifier: str, from_domain: str, mode: str) -> bool:
    """
    RFC 7489 3.1: strict mode needs the same domain, relaxed the same
    organizational domain.
    """
    identifier = identifier.lower().rstrip(".")
    from_domain = from_domain.lower().rstrip(".")
    if not identifier or not from_domain:
        return False
    if identifier == from_domain:
        return True
    return mode == "r" and organizational_domain(identifier) == organizational_domain(from_domain)


def _records_at(resolver: SyncDNS, domain: str) -> list[Record]:
    found = []
    for strings in resolver.query(f"_dmarc.{domain}", "TXT"):
        text = b"".join(strings).decode("utf-8", "replace")
        record = parse_record(text) if text.startswith("v=DMARC1") else None
        if record is not None:
            found.append(record)
    return found


def discover(resolver: SyncDNS, from_domain: str) -> tuple[Record | None, bool]:
    """
    RFC 7489 6.6.3: the record at C{_dmarc.<From domain>}, else at the
    organizational domain's.  More than one record counts as none.

    @return: C{(record, at_organizational_domain)}.
    @raise DNSTempError: when a lookup failed for now.
    """
    records = _records_at(resolver, from_domain)
    if not records:
        org = organizational_domain(from_domain)
        if org != from_domain:
            records = _records_at(resolver, org)
            if len(records) == 1:
                return records[0], True
            return None, True
    if len(records) == 1:
        return records[0], False
    return None, False


def evaluate(
    resolver: SyncDNS,
    from_domains: list[str],
    spf_result: str,
    spf_domain: str,
    dkim_domains: list[str],
    rng: random.Random | None = None,
) -> Verdict:
    """
    The DMARC verdict for a message.

    @param from_domains: the domains of the From field's addresses.
    @param spf_result: the SPF result for the MAIL FROM identity (or for
        HELO when MAIL FROM was empty), and C{spf_domain} that identity's domain.
    @param dkim_domains: the C{d=} of every signature that verified.
    @param rng: samples C{pct}; pass a seeded one in tests.
    """
    domains = sorted(set(filter(None, from_domains)))
    if not from_domains:
        return Verdict("none", reason="no From address")
    if len(domains) != 1:
        # RFC 7489 6.6.1: several From domains cannot be evaluated as one.
        return Verdict("permerror", reason="From has no single domain")
    from_domain = domains[0]
    try:
        record, at_org = discover(resolver, from_domain)
    except DNSTempError as e:
        return Verdict("temperror", domain=from_domain, reason=str(e))
    if record is None:
        return Verdict("none", domain=from_domain)
    policy = record.sp if at_org else record.p
    spf_ok = spf_result == "pass" and aligned(spf_domain, from_domain, record.aspf)
    dkim_ok = any(aligned(d, from_domain, record.adkim) for d in dkim_domains)
    if spf_ok or dkim_ok:
        return Verdict("pass", domain=from_domain, policy=policy, record=record)
    disposition = policy
    if record.pct < 100 and (rng or random).randrange(100) >= record.pct:
        # RFC 7489 6.6.4: outside the sample, apply the next weaker policy.
        disposition = {"reject": "quarantine", "quarantine": "none"}.get(policy, "none")
    return Verdict("fail", domain=from_domain, policy=policy, disposition=disposition,
                   record=record)
