"""
The typed values of the configuration beyond numbers and plain strings (the
enumerations, a destination, a catch-all rule, a DKIM key, a network), and
the converters from the file's strings to them and to checked strings
(names, tokens); each converter raises L{Invalid}.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import socket
from dataclasses import dataclass
from pathlib import Path

from mailserver.config.errors import Invalid
from mailserver.config.kinds import Kind, shown, text
from mailserver.names import host_name_problem, is_domain, is_selector


class Disclosure(enum.StrEnum):
    """
    What VRFY and EXPN tell unauthenticated clients.
    """

    REFUSE = "refuse"
    ANSWER = "answer"


class BareNewline(enum.StrEnum):
    """
    What the SMTP server does with a bare LF or CR in message text.
    """

    NORMALIZE = "normalize"
    REJECT = "reject"


class RelayTLS(enum.StrEnum):
    """
    STARTTLS towards MX hosts.
    """

    OPPORTUNISTIC = "opportunistic"
    REQUIRED = "required"
    NONE = "none"


class TLSLevel(enum.StrEnum):
    """
    How one destination's TLS is held, as Postfix's
    C{smtp_tls_security_level}: no STARTTLS; STARTTLS when offered with any
    certificate, plaintext when the handshake fails; TLS required with any
    certificate; TLS required with the chain and host name verified.
    """

    NONE = "none"
    MAY = "may"
    ENCRYPT = "encrypt"
    VERIFY = "verify"


class SmarthostTLS(enum.StrEnum):
    """
    STARTTLS (required) or TLS from the first byte towards the smarthost.
    """

    STARTTLS = "starttls"
    IMPLICIT = "implicit"


class CheckAction(enum.StrEnum):
    """
    What a failed SPF or DMARC check does to a message.
    """

    TAG = "tag"
    REJECT = "reject"


class ListedAction(enum.StrEnum):
    """
    What a client a DNS blocklist names hears at connection: 554 5.7.1 and
    goodbye, or 450 4.7.1 (try later; mail is not lost if the listing was
    wrong and goes away).
    """

    REJECT = "reject"
    DEFER = "defer"


@dataclass(frozen=True)
class HostPort:
    """
    A host (a name or an IP address) and a TCP or UDP port.
    """

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class CatchAll:
    """
    Mail to unknown users of C{domain} goes to C{account}.
    """

    domain: str
    account: str


@dataclass(frozen=True)
class Transport:
    """
    Mail for C{domain} goes to C{host}, on C{port} (C{None}: C{relay.port}).
    """

    domain: str
    host: str
    port: int | None


@dataclass(frozen=True)
class TLSPolicyRule:
    """
    Mail for C{domain} gets TLS at C{level}; a C{domain} with a leading dot
    (C{".example.org"}) stands for the subdomains of C{example.org}.
    """

    domain: str
    level: TLSLevel


@dataclass(frozen=True)
class DKIMKey:
    """
    Sign mail from C{domain} under C{selector} with the key in C{path}
    (C{None}: C{<data_dir>/dkim/<domain>.<selector>.key}, see L{file}).
    """

    domain: str
    selector: str
    path: Path | None = None

    def __str__(self) -> str:
        """
        The entry as the file writes it.
        """
        entry = f"{self.domain}:{self.selector}"
        return f"{entry}:{self.path}" if self.path else entry

    def file(self, key_folder: Path) -> Path:
        """
        Where the key is: its own path, else the file C{mailserver dkim
        keygen} writes into C{key_folder}.
        """
        return self.path or default_key_file(key_folder, self.domain, self.selector)


def default_key_file(key_folder: Path, domain: str, selector: str) -> Path:
    return Path(key_folder) / f"{domain}.{selector}.key"


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _name(value: str) -> str:
    """
    A domain or host name in a route or an address (a trailing dot is fine).
    """
    problem = host_name_problem(value.removesuffix("."))
    if problem:
        raise Invalid(f"{shown(value)} {problem}")
    return value


def host_name(value: str) -> str:
    """
    The server's own name: a host name without a trailing dot.
    """
    problem = host_name_problem(value)
    if problem:
        raise Invalid(problem)
    return value


def own_name(value: str) -> str:
    """
    A host name of this server, compared without case or trailing dot.
    """
    return _name(value).lower().rstrip(".")


def ip_address(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise Invalid(f"{shown(value)} is not an IP address") from None


def local_domain(value: str) -> str:
    _name(value)
    if value != value.lower() or value.endswith("."):
        raise Invalid(f"{shown(value)} must be a lower-case domain name without a trailing dot")
    return value


def _port(value: str, port_text: str) -> int:
    if not port_text.isascii() or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise Invalid(f"{shown(value)} has a bad port (1 to 65535)")
    return int(port_text)


def parse_host_port(value: str, default_port: int | None, ip_only: bool = False) -> tuple[str, int | None]:
    """
    C{"host:port"}, C{"host"}, C{"[2001:db8::1]:25"} or a bare IPv6 address
    to C{(host, port)}; without a port, C{default_port}.
    """
    spec = value.strip()
    if spec.startswith("["):
        host, closed, rest = spec[1:].partition("]")
        if not closed or (rest and not rest.startswith(":")):
            raise Invalid(f"{shown(value)} must be host:port ([address]:port for IPv6)")
        port_text = rest[1:] if rest else None
        if not _is_ip(host, 6):
            raise Invalid(f"{shown(value)}: only an IPv6 address goes in brackets")
    elif spec.count(":") == 1:
        host, port_text = spec.split(":")
    elif ":" in spec and not _is_ip(spec, 6):
        raise Invalid(f"{shown(value)} must be host:port ([address]:port for IPv6)")
    else:
        host, port_text = spec, None
    if not host:
        raise Invalid(f"{shown(value)} has no host")
    port = default_port if port_text is None else _port(value, port_text)
    if not _is_ip(host):
        if ip_only:
            raise Invalid(f"{shown(value)}: the host must be an IP address")
        _name(host)
    return host, port


def _is_ip(value: str, version: int | None = None) -> bool:
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return False
    return version is None or address.version == version


def host_port(default_port: int, ip_only: bool = False) -> Kind:
    """
    C{""} (none) or C{"host:port"}, to C{None} or a L{HostPort}.
    """

    def convert(value: str) -> HostPort | None:
        if not value:
            return None
        host, port = parse_host_port(value, default_port, ip_only)
        return HostPort(host, port)

    return text(convert)


def transport(value: str) -> Transport:
    domain, sep, target = value.partition("=")
    domain = domain.strip().lower().rstrip(".")
    if not sep or not domain:
        raise Invalid(f"{shown(value)} must be domain=host:port")
    _name(domain)
    host, port = parse_host_port(target, None)
    return Transport(domain, host, port)


def tls_policy(value: str) -> TLSPolicyRule:
    """
    C{"example.org=verify"}, or C{".example.org=encrypt"} for the subdomains.
    """
    domain, sep, level = value.partition("=")
    domain = domain.strip().lower().rstrip(".")
    if not sep or not domain.removeprefix("."):
        raise Invalid(f"{shown(value)} must be domain=level")
    _name(domain.removeprefix("."))
    try:
        return TLSPolicyRule(domain, TLSLevel(level.strip().lower()))
    except ValueError:
        levels = ", ".join(member.value for member in TLSLevel)
        raise Invalid(f"{shown(value)}: the level must be one of {levels}") from None


_LOCAL_PART = re.compile(r"[^\x00-\x20\x7f-\x9f@\s]+")


def catch_all(value: str) -> CatchAll:
    domain, sep, account = value.partition("=")
    domain = domain.strip().removeprefix("@").lower().rstrip(".")
    if not sep or not domain:
        raise Invalid(f"{shown(value)} must be domain=account")
    _name(domain)
    account = account.strip().lower()
    local, at, account_domain = account.rpartition("@")
    if not at or not _LOCAL_PART.fullmatch(local) or host_name_problem(account_domain):
        raise Invalid(f"{shown(value)}: {shown(account)} is not an address (user@domain)")
    return CatchAll(domain, account)


def dkim_key(value: str) -> DKIMKey:
    """
    C{"example.org:selector"} or C{"example.org:selector:/path/to/key"}.
    """
    parts = value.split(":", 2)
    if len(parts) < 2:
        raise Invalid(f"{shown(value)} is not domain:selector or domain:selector:path")
    domain = parts[0].strip().lower().rstrip(".")
    selector = parts[1].strip().lower()
    if not is_domain(domain):
        raise Invalid(f"{shown(value)}: {shown(domain)} is not a domain name")
    if not is_selector(selector):
        raise Invalid(f"{shown(value)}: {shown(selector)} is not a selector (DNS labels)")
    path = parts[2].strip() if len(parts) == 3 else ""
    return DKIMKey(domain, selector, Path(path) if path else None)


_HEADER_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+")


def header_name(value: str) -> str:
    if not _HEADER_NAME.fullmatch(value):
        raise Invalid(f"{shown(value)} is not a header field name")
    return value


def exempt_domain(value: str) -> str:
    if not is_domain(value.removeprefix(".")) or value != value.lower():
        raise Invalid(
            f"{shown(value)} must be a lower-case domain (a leading dot also matches its "
            "subdomains)"
        )
    return value


def network(value: str) -> Network:
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise Invalid(f"{shown(value)} is not an address or network") from None


# RFC 6750 2.1: the characters a bearer token may hold.
_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
MIN_TOKEN = 16


def admin_token(value: str) -> str:
    if not value:
        return value
    if len(value) < MIN_TOKEN:
        raise Invalid(f"must be at least {MIN_TOKEN} characters long (or empty: no token)")
    if not _TOKEN.fullmatch(value):
        raise Invalid(
            "may only hold the characters A-Z a-z 0-9 - . _ ~ + / and a trailing = (RFC 6750)"
        )
    return value


def subaddress_separator(value: str) -> str:
    if len(value) > 1:
        raise Invalid("must be one character or empty")
    if value == "@":
        raise Invalid('must not be "@"')
    if value and (not value.isprintable() or value.isspace()):
        raise Invalid("must be a printable character other than a space")
    return value


_EXPIRE = re.compile(r"NEVER|[0-9]{1,9}")


def pop3_expire(value: str) -> str:
    """
    RFC 2449 6.7: C{NEVER}, or the number of days messages are kept.
    """
    if not _EXPIRE.fullmatch(value):
        raise Invalid('must be "NEVER" or a number of days (RFC 2449)')
    return value


# At most 24 characters, those file names keep whole in their host part
# (maildir.file_name_host): two nodes must never share it.
_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,23}")


def node_name(value: str) -> str:
    """
    One server's name among those sharing a data folder: a folder name
    (C{nodes/<name>/}) and the host part of its Maildir file names.
    """
    if not _NODE_NAME.fullmatch(value):
        raise Invalid(f"{shown(value)} must be 1-24 letters, digits, dots, hyphens or "
                      "underscores, starting with a letter or digit")
    return value


def default_node_name() -> str:
    """
    The machine's host name (its first label), made into a node name.
    """
    name = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname().split(".")[0])
    name = name.lstrip("._-")[:24]
    return name or "localhost"


def not_empty(value: str) -> str:
    if not value:
        raise Invalid("must not be empty")
    return value


def strcred_checker(value: str) -> str:
    """
    A C{twisted.cred} C{strcred} string that can check passwords; a C{file:}
    one's file must be readable.
    """
    from twisted.cred import strcred
    from twisted.cred.credentials import IUsernamePassword

    try:
        checker = strcred.makeChecker(value)
    except Exception as e:  # strcred's factories raise what they like
        raise Invalid(f"{shown(value)}: {e}") from None
    if IUsernamePassword not in checker.credentialInterfaces:
        raise Invalid(f"{shown(value)} cannot check passwords")
    # A file: checker opens its file only at each login, where a missing one
    # would just refuse everybody: say so now.
    filename = getattr(checker, "filename", None)
    if isinstance(filename, str | bytes):
        try:
            with open(filename, "rb"):
                pass
        except OSError as e:
            raise Invalid(f"{shown(value)}: {e.strerror}") from None
    return value


_OCTET = r"(?:\d{1,3}|\[[0-9.;]+\])"
_REPLY_FILTER = re.compile(rf"{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}")
_OCTET_ITEM = re.compile(r"(\d{1,3})(?:\.\.(\d{1,3}))?")


@dataclass(frozen=True)
class DNSBLSite:
    """
    A DNS blocklist (positive C{weight}) or allowlist (negative), as
    Postfix's C{postscreen_dnsbl_sites} writes them:
    C{"zen.spamhaus.org=127.0.0.[2..11]*3"}.

    @ivar replies: per octet of the A record, the values that count (a
        tuple of C{(low, high)} ranges); C{None}: any reply counts.
    """

    domain: str
    replies: tuple[tuple[tuple[int, int], ...], ...] | None
    weight: int
    spelled: str

    def __str__(self) -> str:
        return self.spelled

    def matches(self, reply: str) -> bool:
        """
        Does the A record C{reply} (C{"127.0.0.2"}) count as a listing?
        """
        if self.replies is None:
            return True
        octets = reply.split(".")
        if len(octets) != 4 or not all(o.isdigit() for o in octets):
            return False
        return all(
            any(low <= int(octet) <= high for low, high in ranges)
            for octet, ranges in zip(octets, self.replies)
        )


def _octet_ranges(text: str, value: str) -> tuple[tuple[int, int], ...]:
    items = text[1:-1].split(";") if text.startswith("[") else [text]
    ranges = []
    for item in items:
        match = _OCTET_ITEM.fullmatch(item)
        low, high = (int(match.group(1)), int(match.group(2) or match.group(1))) if match else (1, 0)
        if not 0 <= low <= high <= 255:
            raise Invalid(f"{shown(value)}: {shown(text)} is not an octet, [n..m] or [a;b;c]")
        ranges.append((low, high))
    return tuple(ranges)


def dnsbl_site(value: str) -> DNSBLSite:
    """
    C{"domain[=reply filter][*weight]"}: the filter is an IPv4 address
    whose octets may be C{[n..m]} ranges or C{[a;b;c]} lists, the weight an
    integer (default 1; negative for an allowlist).
    """
    rest, star, weight_text = value.partition("*")
    weight = 1
    if star:
        if not re.fullmatch(r"-?\d{1,4}", weight_text) or int(weight_text) == 0:
            raise Invalid(f"{shown(value)}: the weight after * must be a non-zero integer")
        weight = int(weight_text)
    domain, equals, reply_filter = rest.partition("=")
    domain = domain.strip().lower().rstrip(".")
    if not is_domain(domain):
        raise Invalid(f"{shown(value)}: {shown(domain)} is not a domain name")
    replies = None
    if equals:
        if not _REPLY_FILTER.fullmatch(reply_filter):
            raise Invalid(
                f"{shown(value)}: the reply filter must look like 127.0.0.2 or 127.0.0.[2..11]"
            )
        octets = re.findall(_OCTET, reply_filter)
        replies = tuple(_octet_ranges(octet, value) for octet in octets)
    return DNSBLSite(domain, replies, weight, value)
