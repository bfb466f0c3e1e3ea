"""
Parsing and checking the C{[dkim]} and C{[checks]} configuration tables.

Standard library only: L{mailserver.config} calls L{mailauth_problem} while it
validates a file.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

# RFC 6376 3.1: a selector is one or more dot-separated sub-domain labels.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_SELECTOR = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")
_DOMAIN = re.compile(rf"^(?:{_LABEL}\.)+{_LABEL}\.?$")
_HEADER_NAME = re.compile(r"^[\x21-\x39\x3b-\x7e]+$")
ACTIONS = ("tag", "reject")


@dataclass(frozen=True)
class KeyEntry:
    """
    One C{dkim.keys} entry: sign mail from C{domain} with the key in C{path}
    under C{selector}.
    """

    domain: str
    selector: str
    path: Path


def key_path(data_path: Path, domain: str, selector: str) -> Path:
    """
    Where C{mailserver dkim keygen} writes, and where an entry without a path
    looks: C{<data_dir>/dkim/<domain>.<selector>.key}.
    """
    return Path(data_path) / "dkim" / f"{domain}.{selector}.key"


def parse_key_entry(entry: str, data_path: Path) -> KeyEntry:
    """
    C{"example.org:selector"} or C{"example.org:selector:/path/to/key"}.

    @raise ValueError: when malformed.
    """
    parts = entry.split(":", 2)
    if len(parts) < 2:
        raise ValueError(f"{entry!r} is not domain:selector or domain:selector:path")
    domain = parts[0].strip().lower().rstrip(".")
    selector = parts[1].strip().lower()
    if not _DOMAIN.match(domain):
        raise ValueError(f"{entry!r}: {domain!r} is not a domain name")
    if not _SELECTOR.match(selector):
        raise ValueError(f"{entry!r}: {selector!r} is not a selector (DNS labels)")
    if len(parts) == 3 and parts[2].strip():
        path = Path(parts[2].strip())
    else:
        path = key_path(data_path, domain, selector)
    return KeyEntry(domain, selector, path)


def is_selector(text: str) -> bool:
    return bool(_SELECTOR.match(text))


def is_domain(text: str) -> bool:
    return bool(_DOMAIN.match(text))


def mailauth_problem(dkim, checks, data_path: Path) -> tuple[str, str] | None:
    """
    The first problem with the L{mailserver.config.DKIM} and
    L{mailserver.config.Checks} sections as C{(dotted key, problem)}, or
    C{None}.  Key files are read when the server starts, not here.
    """
    seen = set()
    for entry in dkim.keys:
        try:
            parsed = parse_key_entry(entry, data_path)
        except ValueError as e:
            return "dkim.keys", str(e)
        if (parsed.domain, parsed.selector) in seen:
            return "dkim.keys", f"{parsed.domain}:{parsed.selector} is listed twice"
        seen.add((parsed.domain, parsed.selector))
    for domain in dkim.shared_domains:
        if not is_domain(domain) or domain != domain.lower() or domain.endswith("."):
            return "dkim.shared_domains", f"{domain!r} must be a lower-case domain name"
    for key in ("signed_headers", "oversigned_headers"):
        for name in getattr(dkim, key):
            if not _HEADER_NAME.match(name):
                return f"dkim.{key}", f"{name!r} is not a header field name"
    if dkim.keys and "from" not in {h.lower() for h in dkim.signed_headers}:
        return "dkim.signed_headers", "must include From (RFC 6376 5.4)"
    for key in ("spf_fail", "dmarc_reject"):
        if getattr(checks, key) not in ACTIONS:
            return f"checks.{key}", 'must be "tag" or "reject"'
    for domain in checks.exempt_domains:
        if not is_domain(domain.lstrip(".")) or domain != domain.lower():
            return "checks.exempt_domains", (
                f"{domain!r} must be a lower-case domain (a leading dot also matches "
                "its subdomains)"
            )
    for key in ("exempt_networks", "skip_networks"):
        for network in getattr(checks, key):
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                return f"checks.{key}", f"{network!r} is not an address or network"
    if not 0 < checks.dns_timeout <= 60:
        return "checks.dns_timeout", "must be more than 0 and at most 60 seconds"
    return None
