"""
The configuration file, parsed once into frozen values.

The TOML file maps one-to-one onto the dataclasses below: a top-level key is a
field of L{Config}, a table is a field whose type is another dataclass.  The
loader walks the dataclasses, so adding a field with a default is all it takes
to add a key; the README's key reference lists every field with its default.

Every problem is reported as a L{ConfigError} naming the file, the key and what
is wrong, so C{twistd} and C{mailserver check-config} can print one line and
exit non-zero.  This module uses only the standard library, except the check
that a listener is a valid Twisted endpoint string, which imports Twisted's
endpoint parser lazily.
"""

from __future__ import annotations

import dataclasses
import socket
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

DATA_DIR_NAME = "mailserver-data"


class ConfigError(Exception):
    """
    A configuration problem, rendered as C{file: key: problem}.
    """

    def __init__(self, source: str, key: str, problem: str) -> None:
        # One line, whatever the file held: control characters are escaped.
        message = f"{source}: {key}: {problem}"
        super().__init__(
            "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in message)
        )
        self.source = source
        self.key = key
        self.problem = problem


@dataclass(frozen=True)
class Listeners:
    """
    Twisted server endpoint strings per role; an empty list disables a role.

    C{submissions}, C{pop3s} and C{imaps} are implicit-TLS roles (ports 465,
    995 and 993):
    their plain C{tcp:} endpoints are wrapped in TLS with the configured
    certificate.  An C{ssl:} endpoint in any role is also treated as TLS.
    """

    smtp: tuple[str, ...] = ("tcp:2525:interface=127.0.0.1",)
    submission: tuple[str, ...] = ("tcp:2587:interface=127.0.0.1",)
    submissions: tuple[str, ...] = ()
    pop3: tuple[str, ...] = ("tcp:2110:interface=127.0.0.1",)
    pop3s: tuple[str, ...] = ()
    imap: tuple[str, ...] = ("tcp:2143:interface=127.0.0.1",)
    imaps: tuple[str, ...] = ()
    admin: tuple[str, ...] = ("tcp:2080:interface=127.0.0.1",)


@dataclass(frozen=True)
class TLS:
    """
    Certificate and key (PEM files).  Empty means a self-signed pair generated
    into C{<data_dir>/tls/} on first start, so STARTTLS and STLS always work.
    """

    certificate: str = ""
    key: str = ""


@dataclass(frozen=True)
class Limits:
    """
    Bounds on what one client may cost us.  Sizes in octets, times in seconds.
    """

    max_message_size: int = 36_700_160
    max_recipients: int = 100
    max_command_line: int = 512
    max_text_line: int = 1000
    max_errors: int = 20
    max_junk_commands: int = 100
    max_connections: int = 1000
    max_connections_per_client: int = 50
    smtp_command_timeout: int = 300
    smtp_data_timeout: int = 600
    pop3_idle_timeout: int = 600
    imap_idle_timeout: int = 1800
    shutdown_timeout: float = 30.0
    auth_failure_delay: float = 1.0
    max_auth_failures: int = 5
    max_auth_failures_per_client: int = 20
    auth_failure_window: int = 900
    min_data_rate: int = 500
    min_free_space: int = 52_428_800


@dataclass(frozen=True)
class SMTP:
    """
    SMTP policy knobs.

    C{vrfy} and C{expn} choose what unauthenticated clients learn: C{"refuse"}
    (VRFY 252 without saying whether the user exists, EXPN 502), or
    C{"answer"} (full answers, which lets strangers enumerate users).
    Authenticated clients always get full answers.
    """

    auth_over_plaintext: bool = False
    vrfy: str = "refuse"
    expn: str = "refuse"
    subaddress_separator: str = "+"
    catch_all: tuple[str, ...] = ()
    max_received_headers: int = 50


@dataclass(frozen=True)
class POP3:
    """
    POP3 policy knobs.  APOP needs a plaintext-equivalent secret per account,
    so it stays off unless you turn it on here.
    """

    auth_over_plaintext: bool = False
    apop: bool = False
    login_delay: int = 0
    expire: str = "NEVER"


@dataclass(frozen=True)
class IMAP:
    """
    IMAP policy knobs.
    """

    auth_over_plaintext: bool = False


@dataclass(frozen=True)
class Plugins:
    """
    Plugins to run, in order, by name; C{paths} are extra folders searched
    for plugin modules besides the package C{mailserver.plugins}.  Each
    C{[plugins.NAME]} table holds that plugin's options (kept in C{options}).
    """

    paths: tuple[str, ...] = ()
    enabled: tuple[str, ...] = ()
    options: dict = field(default_factory=dict, metadata={"tables_by_name": True})


@dataclass(frozen=True)
class Admin:
    """
    The admin HTTP API (health, metrics, queue).  C{token} is the bearer
    token every request must carry; it is required when an admin listener
    is not on loopback.
    """

    token: str = ""


@dataclass(frozen=True)
class Auth:
    """
    Extra account sources as C{twisted.cred} C{strcred} checker strings
    (e.g. C{"file:/etc/mail/passwd"}, C{"unix"}), tried after the users file.
    """

    checkers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Relay:
    """
    Outbound delivery of mail for remote recipients (the relay queue).

    C{resolver}: DNS server for MX lookups as C{"host:port"} (C{""}: the
    system's, from C{/etc/resolv.conf}).
    C{port}: TCP port of remote SMTP servers (25).
    C{smarthost}: C{"host:port"} to send all outbound mail through, or C{""}
    to deliver to each domain's MX hosts.
    C{smarthost_tls}: C{"starttls"} (STARTTLS required) or C{"implicit"} (TLS
    from the first byte, as on port 465).
    C{smarthost_username}, C{smarthost_password}: AUTH PLAIN credentials for
    the smarthost (empty: no AUTH).
    C{transports}: per-domain routes, C{"domain=host:port"} each, overriding
    MX lookup for that domain.
    C{tls}: STARTTLS towards MX hosts: C{"opportunistic"} (when offered,
    certificate not checked), C{"required"} (temporary failure when not
    offered) or C{"none"}.
    C{retry_schedule}: delays between attempts, e.g. C{["5m", "10m"]}
    (units s, m, h, d); after the last one each delay doubles, up to
    C{max_retry_interval}.  Empty: 5m doubling.
    C{max_retry_interval}: the cap on a delay between attempts (C{"4h"}).
    C{max_age}: how long a message is retried before it bounces (C{"5d"}).
    C{delay_warning}: after how long a delay notice is sent to senders who
    asked for NOTIFY=DELAY (C{""}: never).
    C{max_connections}: outbound connections at once, in total.
    C{max_connections_per_destination}: outbound connections at once to one
    domain (or to the smarthost).
    C{scan_interval}: seconds between re-scans of the queue folder, which is
    how the running server picks up C{mailserver queue} commands.
    C{connect_timeout}: seconds to wait for a TCP connection.
    C{dns_timeout}: seconds one DNS query may take, retransmissions
    included; a domain's whole MX and address lookup gets three times this,
    and a host named in C{smarthost} or C{transports} (looked up by the
    system's resolver) this plus C{connect_timeout} to be reached.
    C{command_timeout}: seconds to wait for the greeting or a reply to a
    command (RFC 5321 4.5.3.2 asks for at least 300).
    C{data_timeout}: seconds to wait for the reply to the end of the message
    (RFC 5321 4.5.3.2.6 asks for at least 600).
    C{bounce_full_limit}: when the sender did not choose RET, bounces carry
    the whole message up to this many octets, else only its headers.
    """

    resolver: str = ""
    port: int = 25
    smarthost: str = ""
    smarthost_tls: str = "starttls"
    smarthost_username: str = ""
    smarthost_password: str = ""
    transports: tuple[str, ...] = ()
    tls: str = "opportunistic"
    retry_schedule: tuple[str, ...] = ("5m",)
    max_retry_interval: str = "4h"
    max_age: str = "5d"
    delay_warning: str = ""
    max_connections: int = 20
    max_connections_per_destination: int = 4
    scan_interval: float = 10.0
    connect_timeout: float = 60.0
    dns_timeout: float = 15.0
    command_timeout: float = 300.0
    data_timeout: float = 600.0
    bounce_full_limit: int = 131072


# --- mail authentication (mailserver.mailauth): DKIM signing, inbound checks ---
@dataclass(frozen=True)
class DKIM:
    """
    DKIM signing (RFC 6376) of mail that authenticated users send.

    C{keys}: C{"domain:selector"} (key in C{<data_dir>/dkim/<domain>.<selector>.key},
    as C{mailserver dkim keygen} writes it) or C{"domain:selector:/path/to/key"};
    RSA or Ed25519 PEM keys.  Mail whose From domain (else envelope sender
    domain) has keys is signed with each of them.
    C{signed_headers}: header fields signed when present.
    C{oversigned_headers}: fields signed once more than present, so none can
    be added later without breaking the signature.
    """

    keys: tuple[str, ...] = ()
    signed_headers: tuple[str, ...] = (
        "from", "sender", "reply-to", "subject", "date", "message-id", "to", "cc",
        "mime-version", "content-type", "content-transfer-encoding", "content-disposition",
        "in-reply-to", "references", "list-id", "list-help", "list-unsubscribe",
        "list-unsubscribe-post", "list-subscribe", "list-post", "list-owner", "list-archive",
    )
    oversigned_headers: tuple[str, ...] = (
        "from", "reply-to", "subject", "date", "message-id", "to", "cc",
    )


@dataclass(frozen=True)
class Checks:
    """
    Inbound checks on the MX role (unauthenticated sessions): SPF (RFC 7208),
    DKIM and DMARC (RFC 7489), reported in one C{Authentication-Results}
    header (RFC 8601).  DNS goes through C{relay.resolver}.

    C{spf_fail}, C{dmarc_reject}: C{"tag"} (add the header, deliver) or
    C{"reject"} (550 5.7.1 at end of DATA; SPF fail only when DMARC does not
    pass).  C{exempt_domains}: envelope sender or From domains never rejected
    (C{".example.com"} also matches subdomains).  C{exempt_networks}: client
    networks never rejected.  C{skip_networks}: client networks not checked
    at all.  C{dns_timeout}: seconds per DNS query.
    """

    enabled: bool = True
    spf_fail: str = "tag"
    dmarc_reject: str = "tag"
    exempt_domains: tuple[str, ...] = ()
    exempt_networks: tuple[str, ...] = ()
    skip_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    dns_timeout: float = 10.0
# --- end mail authentication ---


@dataclass(frozen=True)
class Config:
    """
    The whole configuration.  Relative paths in the file are relative to the
    directory the server runs in; C{users_file} and C{aliases_file} default to
    files inside C{data_dir}.
    """

    hostname: str = field(default_factory=socket.getfqdn)
    data_dir: str = DATA_DIR_NAME
    workers: int = 1
    local_domains: tuple[str, ...] = ("localhost",)
    users_file: str = ""
    aliases_file: str = ""
    listeners: Listeners = field(default_factory=Listeners)
    tls: TLS = field(default_factory=TLS)
    limits: Limits = field(default_factory=Limits)
    smtp: SMTP = field(default_factory=SMTP)
    pop3: POP3 = field(default_factory=POP3)
    imap: IMAP = field(default_factory=IMAP)
    plugins: Plugins = field(default_factory=Plugins)
    auth: Auth = field(default_factory=Auth)
    admin: Admin = field(default_factory=Admin)
    relay: Relay = field(default_factory=Relay)
    dkim: DKIM = field(default_factory=DKIM)  # mailauth
    checks: Checks = field(default_factory=Checks)  # mailauth
    source: str = "<embedded default>"

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    @property
    def mail_path(self) -> Path:
        return self.data_path / "mail"

    @property
    def users_path(self) -> Path:
        return Path(self.users_file) if self.users_file else self.data_path / "users"

    @property
    def aliases_path(self) -> Path:
        return (
            Path(self.aliases_file) if self.aliases_file else self.data_path / "aliases"
        )

    @property
    def certificate_path(self) -> Path:
        if self.tls.certificate:
            return Path(self.tls.certificate)
        return self.data_path / "tls" / "cert.pem"

    @property
    def key_path(self) -> Path:
        if self.tls.key:
            return Path(self.tls.key)
        return self.data_path / "tls" / "key.pem"

    def is_local_domain(self, domain: str) -> bool:
        return domain.lower().rstrip(".") in self.local_domains


# Keys that are not part of the file format.
_INTERNAL = {"source"}


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
    values = _build(Config, raw, source, "")
    config = Config(**values, source=source)
    _validate(config)
    return config


def _build(cls: type, raw: dict[str, object], source: str, prefix: str) -> dict:
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)} - _INTERNAL
    by_name = [f.name for f in dataclasses.fields(cls) if f.metadata.get("tables_by_name")]
    values: dict[str, object] = {}
    for key, value in raw.items():
        dotted = prefix + key
        if by_name and key not in fields and isinstance(value, dict):
            # A table named after a plugin: free-form, checked by the plugin.
            values.setdefault(by_name[0], {})[key] = value  # type: ignore[index]
            continue
        if key not in fields or key in by_name:
            raise ConfigError(source, dotted, "unknown key")
        values[key] = _convert(hints[key], value, source, dotted)
    return values


def _convert(hint: object, value: object, source: str, key: str) -> object:
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(source, key, "must be a table")
        return hint(**_build(hint, value, source, key + "."))  # type: ignore[operator]
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(source, key, "must be a list of strings")
        if any("\0" in v for v in value):
            raise ConfigError(source, key, "must not contain NUL characters")
        return tuple(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(source, key, "must be true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(source, key, "must be an integer")
        if value < 0:
            raise ConfigError(source, key, "must not be negative")
        if not value < 2**63:
            raise ConfigError(source, key, "must be less than 2**63")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(source, key, "must be a number")
        if value < 0:
            raise ConfigError(source, key, "must not be negative")
        if not value < 2**63:  # also nan and inf
            raise ConfigError(source, key, "must be a finite number less than 2**63")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(source, key, "must be a string")
        if "\0" in value:
            raise ConfigError(source, key, "must not contain NUL characters")
        return value
    raise AssertionError(f"unsupported config type {hint!r}")  # pragma: no cover


def _validate(config: Config) -> None:
    source = config.source
    if not config.hostname or any(c.isspace() for c in config.hostname):
        raise ConfigError(source, "hostname", "must be a non-empty name without spaces")
    if not 1 <= config.workers <= 256:
        raise ConfigError(source, "workers", "must be from 1 to 256")
    if not config.data_dir:
        raise ConfigError(source, "data_dir", "must not be empty")
    if not config.local_domains:
        raise ConfigError(source, "local_domains", "must name at least one domain")
    for domain in config.local_domains:
        if domain != domain.lower() or not domain or "@" in domain:
            raise ConfigError(
                source, "local_domains", f"{domain!r} must be a lower-case domain name"
            )
    for role in dataclasses.fields(Listeners):
        for description in getattr(config.listeners, role.name):
            problem = _endpoint_problem(description)
            if problem:
                raise ConfigError(source, f"listeners.{role.name}", problem)
    if not config.admin.token:
        from mailserver.web.admin import admin_listener_needs_token

        for description in config.listeners.admin:
            if admin_listener_needs_token(description):
                raise ConfigError(
                    source,
                    "admin.token",
                    f"required when an admin listener is not on loopback ({description!r})",
                )
    if bool(config.tls.certificate) != bool(config.tls.key):
        raise ConfigError(source, "tls", "set both certificate and key, or neither")
    for key, path in (("tls.certificate", config.tls.certificate), ("tls.key", config.tls.key)):
        if path:
            try:
                text = Path(path).read_bytes()
            except OSError as e:
                raise ConfigError(source, key, f"cannot read {path}: {e.strerror}") from None
            if b"-----BEGIN " not in text:
                raise ConfigError(source, key, f"{path} is not a PEM file")
    for key in ("vrfy", "expn"):
        if getattr(config.smtp, key) not in ("refuse", "answer"):
            raise ConfigError(source, f"smtp.{key}", 'must be "refuse" or "answer"')
    if len(config.smtp.subaddress_separator) > 1:
        raise ConfigError(
            source, "smtp.subaddress_separator", "must be one character or empty"
        )
    if config.limits.max_auth_failures_per_client < 1:
        raise ConfigError(source, "limits.max_auth_failures_per_client", "must be at least 1")
    if config.limits.max_command_line < 512:
        raise ConfigError(
            source, "limits.max_command_line", "must be at least 512 (RFC 5321 4.5.3.1.4)"
        )
    _validate_relay(config)
    _validate_mailauth(config)
    if config.limits.max_text_line < 1000:
        raise ConfigError(
            source, "limits.max_text_line", "must be at least 1000 (RFC 5321 4.5.3.1.6)"
        )


def _validate_relay(config: Config) -> None:
    # The relay's own checks live with the relay (mailserver.relay._settings),
    # imported lazily so this module stays standard-library only at import.
    from mailserver.relay._settings import relay_problem

    problem = relay_problem(config.relay)
    if problem:
        raise ConfigError(config.source, f"relay.{problem[0]}", problem[1])


def _validate_mailauth(config: Config) -> None:
    # Checked with the DKIM and inbound-check code (mailserver.mailauth._settings),
    # imported lazily so this module stays standard-library only at import.
    from mailserver.mailauth._settings import mailauth_problem

    problem = mailauth_problem(config.dkim, config.checks, config.data_path)
    if problem:
        raise ConfigError(config.source, problem[0], problem[1])


def _endpoint_problem(description: str) -> str | None:
    """
    Check that C{description} parses as a Twisted server endpoint string,
    without listening; return the problem or C{None}.
    """
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.testing import MemoryReactor

    try:
        serverFromString(MemoryReactor(), description)
    except Exception as e:  # the parser raises many types; all mean "bad"
        return f"bad endpoint {description!r}: {e}"
    return None
