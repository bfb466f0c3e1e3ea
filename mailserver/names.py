"""
Domain names as DNS allows them (RFC 1035 2.3.1 and 2.3.4, RFC 1123 2.1):
letters, digits and hyphens, labels of at most 63 characters, names of at
most 253 (255 octets on the wire).

Shared by the configuration (host names, local domains, routes) and the
mail authentication checks (SPF and DKIM domains, DKIM selectors).
"""

from __future__ import annotations

import re

MAX_LABEL = 63
MAX_NAME = 253

_LABEL = rf"[A-Za-z0-9](?:[A-Za-z0-9-]{{0,{MAX_LABEL - 2}}}[A-Za-z0-9])?"
_HOST_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_DOMAIN = re.compile(rf"(?:{_LABEL}\.)+{_LABEL}\.?")


def host_name_problem(text: str) -> str | None:
    """
    Why C{text} is not a host name (one or more labels, no trailing dot),
    or C{None}.
    """
    if len(text) > MAX_NAME:
        return f"is {len(text)} characters long; a domain name has at most {MAX_NAME}"
    if any(len(label) > MAX_LABEL for label in text.split(".")):
        return f"has a label longer than {MAX_LABEL} characters"
    if not _HOST_NAME.fullmatch(text):
        return "is not a host name (letters, digits, hyphens and dots)"
    return None


def is_host_name(text: str) -> bool:
    return host_name_problem(text) is None


def is_domain(text: str) -> bool:
    """
    Whether C{text} is a domain of two labels or more (a trailing dot is
    allowed), as SPF and DKIM domains are.
    """
    return len(text.rstrip(".")) <= MAX_NAME and _DOMAIN.fullmatch(text) is not None


def is_selector(text: str) -> bool:
    """
    Whether C{text} is a DKIM selector: one or more dot-separated labels
    (RFC 6376 3.1).
    """
    return len(text) <= MAX_NAME and _HOST_NAME.fullmatch(text) is not None
