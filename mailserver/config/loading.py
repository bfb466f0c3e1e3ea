"""
Reading a configuration file: TOML, then every key parsed by its kind, then
the rules that involve several keys.  This is the one validator: the rooms
receive typed values and check nothing again.
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

from mailserver.config.endpoints import is_loopback_only
from mailserver.config.errors import ConfigError, Invalid
from mailserver.config.kinds import shown
from mailserver.config.model import Config


def default() -> Config:
    """
    The embedded default: loopback listeners on unprivileged ports, state in
    C{./mailserver-data}.
    """
    return Config()


def load(path: str | Path | None) -> Config:
    """
    Read and validate a TOML configuration file; C{None} gives the default.

    @raise ConfigError: on any problem, naming the file and key.
    """
    if path is None:
        return default()
    source = str(path)
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as e:
        raise ConfigError(source, "-", f"cannot read file: {e.strerror}") from None
    except (ValueError, RecursionError) as e:
        # TOMLDecodeError, and what tomllib lets through: invalid UTF-8,
        # int()'s 4,300-digit limit, and deep nesting.
        problem = "nested too deeply" if isinstance(e, RecursionError) else e
        raise ConfigError(source, "-", f"not valid TOML: {problem}") from None
    config = dataclasses.replace(_section(Config, raw, source, ""), source=source)
    _check_together(config)
    return config


def override(config: Config, key: str, value: object, source: str) -> Config:
    """
    C{config} with the top-level C{key} set to C{value} (a command-line
    option, named by C{source}), checked as the file's value would be.

    @raise ConfigError: the value is refused.
    """
    (f,) = [f for f in dataclasses.fields(Config) if f.name == key and "setting" in f.metadata]
    try:
        parsed = f.metadata["setting"].kind.parse(value)
    except Invalid as e:
        raise ConfigError(source, key, str(e)) from None
    return dataclasses.replace(config, **{key: parsed})


def _section(cls: type, raw: dict[str, object], source: str, prefix: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, object] = {}
    for key, value in raw.items():
        dotted = prefix + key
        f = fields.get(key)
        if f is None and isinstance(value, dict):
            by_name = [g.name for g in fields.values() if g.metadata.get("tables_by_name")]
            if by_name:
                # A table named after a plugin: free-form, checked by the plugin.
                values.setdefault(by_name[0], {})[key] = value  # type: ignore[index]
                continue
        if f is None or not ({"setting", "section"} & f.metadata.keys()):
            raise ConfigError(source, dotted, "unknown key")
        if "section" in f.metadata:
            if not isinstance(value, dict):
                raise ConfigError(source, dotted, "must be a table")
            values[key] = _section(f.metadata["section"], value, source, dotted + ".")
            continue
        try:
            values[key] = f.metadata["setting"].kind.parse(value)
        except Invalid as e:
            raise ConfigError(source, dotted, str(e)) from None
    return cls(**values)


def _check_together(config: Config) -> None:
    """
    The rules that tie keys together, and the files the configuration names
    that must be readable now.
    """
    source = config.source
    tls = config.tls
    if bool(tls.certificate) != bool(tls.key):
        raise ConfigError(source, "tls", "set both certificate and key, or neither")
    for key, path in (("tls.certificate", tls.certificate), ("tls.key", tls.key)):
        if path and b"-----BEGIN " not in _read(source, key, path):
            raise ConfigError(source, key, f"{path} is not a PEM file")
    if config.relay.ca_file:
        _check_certificates(source, "relay.ca_file", config.relay.ca_file)
    if not config.admin.token:
        for description in config.listeners.admin:
            if not is_loopback_only(description):
                raise ConfigError(
                    source,
                    "admin.token",
                    f"required when an admin listener is not on loopback ({shown(description)})",
                )
    for rule in config.smtp.catch_all:
        if not config.is_local_domain(rule.domain):
            raise ConfigError(
                source, "smtp.catch_all", f"{rule.domain!r} is not one of local_domains"
            )
    relay = config.relay
    for domain in relay.relay_domains:
        if config.is_local_domain(domain):
            raise ConfigError(
                source, "relay.relay_domains", f"{domain!r} is one of local_domains too")
    if relay.relay_recipients:
        try:
            Path(relay.relay_recipients).read_bytes()
        except OSError as e:
            raise ConfigError(source, "relay.relay_recipients",
                              f"cannot read {relay.relay_recipients}: {e.strerror}") from None
    if bool(relay.smarthost_username) != bool(relay.smarthost_password):
        raise ConfigError(
            source,
            "relay.smarthost_username",
            "set both smarthost_username and smarthost_password, or neither",
        )
    dkim = config.dkim
    if dkim.keys and "from" not in {h.lower() for h in dkim.signed_headers}:
        raise ConfigError(source, "dkim.signed_headers", "must include From (RFC 6376 5.4)")
    checks = config.checks
    if checks.greylist and checks.greylist_retry_window <= checks.greylist_delay:
        raise ConfigError(
            source, "checks.greylist_retry_window",
            "must be longer than greylist_delay, or no retry is ever accepted",
        )


def _read(source: str, key: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(source, key, f"cannot read {path}: {e.strerror}") from None


def _check_certificates(source: str, key: str, path: str) -> None:
    """
    The file at C{path} holds PEM certificates, every one of them readable
    (they are added to a trust store when the relay starts).
    """
    from cryptography import x509  # lazily: only a configuration naming CAs needs it

    try:
        x509.load_pem_x509_certificates(_read(source, key, path))
    except ValueError:
        raise ConfigError(
            source, key, f"{path} holds no PEM certificate, or a damaged one") from None
