"""
Parsing and checking the C{[relay]} configuration table: durations such as
C{"5m"}, C{"host:port"} strings and the per-domain transports.

Standard library only: L{mailserver.config} calls L{relay_problem} while it
validates a file.
"""

from __future__ import annotations

import re

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """
    C{"90"}, C{"90s"}, C{"5m"}, C{"4h"}, C{"5d"} to seconds.

    @raise ValueError: for anything else.
    """
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration like 30s, 5m, 4h or 5d")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_host_port(text: str, default_port: int) -> tuple[str, int]:
    """
    C{"host:port"}, C{"host"}, C{"[::1]:25"} to C{(host, port)}.

    @raise ValueError: when malformed.
    """
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise ValueError(f"{text!r} is not host:port")
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, ""
    if not host:
        raise ValueError(f"{text!r} has no host")
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"{text!r} has a bad port")
        return host, int(port_text)
    return host, default_port


def parse_transports(entries: tuple[str, ...], default_port: int) -> dict[str, tuple[str, int]]:
    """
    C{("example.org=mx.example.net:2525",)} to C{{"example.org": ("mx.example.net", 2525)}}.
    """
    routes = {}
    for entry in entries:
        domain, sep, target = entry.partition("=")
        if not sep or not domain.strip():
            raise ValueError(f"{entry!r} is not domain=host:port")
        routes[domain.strip().lower().rstrip(".")] = parse_host_port(target, default_port)
    return routes


TLS_LEVELS = ("none", "may", "encrypt", "verify")


def parse_tls_policies(entries: tuple[str, ...]) -> dict[str, str]:
    """
    C{("example.org=verify", ".example.net=encrypt")} to
    C{{"example.org": "verify", ".example.net": "encrypt"}}; a key with a
    leading dot stands for the subdomains.

    @raise ValueError: when malformed.
    """
    policies = {}
    for entry in entries:
        domain, sep, level = entry.partition("=")
        domain = domain.strip().lower().rstrip(".")
        level = level.strip().lower()
        if not sep or not domain.strip("."):
            raise ValueError(f"{entry!r} is not domain=level")
        if any(c.isspace() or c in "@/[]" for c in domain):
            raise ValueError(f"{entry!r}: {domain!r} is not a domain name")
        if level not in TLS_LEVELS:
            raise ValueError(f"{entry!r}: the level must be one of {', '.join(TLS_LEVELS)}")
        policies[domain] = level
    return policies


def ca_file_problem(path: str) -> str | None:
    """
    Why C{path} cannot serve as C{relay.ca_file}, or C{None}.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return f"cannot read {path}: {e.strerror}"
    from cryptography import x509  # lazily: this module is standard library only

    try:
        x509.load_pem_x509_certificates(data)
    except ValueError:
        return f"{path} holds no PEM certificate"
    return None


def relay_problem(relay) -> tuple[str, str] | None:
    """
    The first problem with a L{mailserver.config.Relay} as C{(key, problem)},
    or C{None}.
    """
    checks = [
        ("tls", relay.tls in ("opportunistic", "required", "none"),
         'must be "opportunistic", "required" or "none"'),
        ("smarthost_tls", relay.smarthost_tls in ("starttls", "implicit"),
         'must be "starttls" or "implicit"'),
        ("port", 0 < relay.port < 65536, "must be a TCP port"),
        ("max_connections", relay.max_connections >= 1, "must be at least 1"),
        ("max_connections_per_destination", relay.max_connections_per_destination >= 1,
         "must be at least 1"),
        ("scan_interval", relay.scan_interval > 0, "must be positive"),
        ("connect_timeout", relay.connect_timeout > 0, "must be positive"),
        ("dns_timeout", 0 < relay.dns_timeout <= 300, "must be more than 0 and at most 300"),
        ("command_timeout", relay.command_timeout > 0, "must be positive"),
        ("data_timeout", relay.data_timeout > 0, "must be positive"),
        ("mta_sts_port", 0 < relay.mta_sts_port < 65536, "must be a TCP port"),
        ("smarthost_username", bool(relay.smarthost_username) == bool(relay.smarthost_password),
         "set both smarthost_username and smarthost_password, or neither"),
    ]
    for key, ok, problem in checks:
        if not ok:
            return key, problem
    for key in ("max_retry_interval", "max_age"):
        try:
            if parse_duration(getattr(relay, key)) <= 0:
                return key, "must be positive"
        except ValueError as e:
            return key, str(e)
    if relay.delay_warning:
        try:
            parse_duration(relay.delay_warning)
        except ValueError as e:
            return "delay_warning", str(e)
    for item in relay.retry_schedule:
        try:
            if parse_duration(item) <= 0:
                return "retry_schedule", f"{item!r} must be positive"
        except ValueError as e:
            return "retry_schedule", str(e)
    for key, value in (("resolver", relay.resolver), ("smarthost", relay.smarthost)):
        if value:
            try:
                parse_host_port(value, 53 if key == "resolver" else 25)
            except ValueError as e:
                return key, str(e)
    try:
        parse_transports(relay.transports, relay.port)
    except ValueError as e:
        return "transports", str(e)
    try:
        parse_tls_policies(relay.tls_policies)
    except ValueError as e:
        return "tls_policies", str(e)
    if relay.ca_file:
        problem = ca_file_problem(relay.ca_file)
        if problem:
            return "ca_file", problem
    return None
