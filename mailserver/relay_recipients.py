"""
The valid recipients of the relay domains (C{relay.relay_recipients}), so a
gateway or backup MX refuses unknown users at RCPT instead of accepting
their mail and bouncing it later (to a sender who may be forged).

The file holds one address per line, C{#} starts a comment; C{@domain}
stands for every user of that domain.  A relay domain with at least one
line accepts only what is listed; a relay domain without any accepts every
recipient, as when there is no file.  As for local users, C{user+tag} is
C{user} (C{smtp.subaddress_separator}) and case does not matter.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mailserver.address_files import LineProblem, Parsed, address_problem, content_lines
from mailserver.names import host_name_problem


@dataclass(frozen=True)
class RelayRecipients:
    """
    @ivar addresses: the listed addresses, lower case.
    @ivar whole_domains: domains listed as C{@domain}.
    @ivar listed_domains: every domain with a line.
    """

    addresses: frozenset[str] = frozenset()
    whole_domains: frozenset[str] = frozenset()
    listed_domains: frozenset[str] = frozenset()

    def accepts(self, address: str, separator: str = "") -> bool:
        local, _, domain = address.lower().rpartition("@")
        domain = domain.rstrip(".")
        if domain not in self.listed_domains or domain in self.whole_domains:
            return True
        if f"{local}@{domain}" in self.addresses:
            return True
        if separator and separator in local:
            return f"{local.split(separator, 1)[0]}@{domain}" in self.addresses
        return False


def parse_relay_recipients(
    text: str, path: Path, relay_domains: tuple[str, ...]
) -> Parsed[RelayRecipients]:
    addresses: set[str] = set()
    whole: set[str] = set()
    problems = []
    for number, line in content_lines(text):
        entry = line.lower()
        local, _, domain = entry.rpartition("@")
        domain = domain.rstrip(".")
        if entry.startswith("@"):
            problem = host_name_problem(domain)
            problem = f"{line!r}: the domain {problem}" if problem else None
        else:
            problem = address_problem(entry)
        if problem is None and domain not in relay_domains:
            problem = f"{line!r}: {domain} is not one of relay.relay_domains"
        if problem:
            problems.append(LineProblem(path, number, problem))
        elif entry.startswith("@"):
            whole.add(domain)
        else:
            addresses.add(f"{local}@{domain}")
    listed = whole | {address.rpartition("@")[2] for address in addresses}
    return RelayRecipients(frozenset(addresses), frozenset(whole), frozenset(listed)), problems
