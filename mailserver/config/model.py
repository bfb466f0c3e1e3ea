"""
The configuration as frozen dataclasses: one per TOML table, one field per
key.  Each field is declared by L{setting} with its default as the file
would spell it and its L{Kind}, which parses the file's value into the
field's type; the README's key reference lists every field with that
default (a test checks both ways).
"""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mailserver.config import values as v
from mailserver.config.endpoints import endpoint_kind
from mailserver.config.kinds import (
    Kind,
    choice,
    duration,
    flag,
    integer,
    listing,
    number,
    seconds,
    text,
)
from mailserver.config.values import (
    BareNewline,
    CatchAll,
    CheckAction,
    DKIMKey,
    Disclosure,
    DNSBLSite,
    HostPort,
    ListedAction,
    Network,
    RelayTLS,
    SmarthostTLS,
    TLSPolicyRule,
    Transport,
)

DATA_DIR_NAME = "mailserver-data"


@dataclass(frozen=True)
class Setting:
    """
    A key's description: its kind, and its default as the file spells it
    (or, for a computed default, the words the README uses).
    """

    kind: Kind
    default: object
    shown: str = ""


_UNSET = object()


def setting(default: object = None, kind: Kind | None = None, *, parsed: object = _UNSET,
            factory: Callable[[], Any] | None = None, shown: str = "") -> Any:
    """
    A key: the field's default is C{default} parsed by C{kind}, or what
    C{factory} returns (described by C{shown}).

    @param parsed: the parsed default, given where parsing it when this
        module is imported would cost (Twisted's endpoint parser); a test
        checks that it is what C{kind} makes of C{default}.
    """
    assert kind is not None
    metadata = {"setting": Setting(kind, default, shown)}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=kind.parse(default) if parsed is _UNSET else parsed, metadata=metadata)


def section(cls: type) -> Any:
    """
    A table of keys, given by its dataclass.
    """
    return field(default_factory=cls, metadata={"section": cls})


_NAMES = listing(text())
_ENDPOINTS = listing(endpoint_kind())


def _listeners(*descriptions: str) -> Any:
    return setting(list(descriptions), _ENDPOINTS, parsed=descriptions)


@dataclass(frozen=True)
class Listeners:
    """
    Twisted server endpoint strings per role; an empty list disables a role.

    C{submissions}, C{pop3s} and C{imaps} are implicit-TLS roles (ports 465,
    995 and 993): their plain C{tcp:} endpoints are wrapped in TLS with the configured
    certificate.  An C{ssl:} endpoint in any role is also treated as TLS.
    """

    smtp: tuple[str, ...] = _listeners("tcp:2525:interface=127.0.0.1")
    submission: tuple[str, ...] = _listeners("tcp:2587:interface=127.0.0.1")
    submissions: tuple[str, ...] = _listeners()
    pop3: tuple[str, ...] = _listeners("tcp:2110:interface=127.0.0.1")
    pop3s: tuple[str, ...] = _listeners()
    imap: tuple[str, ...] = _listeners("tcp:2143:interface=127.0.0.1")
    imaps: tuple[str, ...] = _listeners()
    admin: tuple[str, ...] = _listeners("tcp:2080:interface=127.0.0.1")


@dataclass(frozen=True)
class TLS:
    """
    Certificate and key (PEM files).  Empty means a self-signed pair generated
    into C{<data_dir>/tls/} on first start, so STARTTLS and STLS always work.
    """

    certificate: str = setting("", text())
    key: str = setting("", text())


_SECONDS = integer(1)


@dataclass(frozen=True)
class Limits:
    """
    Bounds on what one client may cost us.  Sizes in octets, times in seconds.

    C{submission_messages_per_hour}, C{submission_recipients_per_hour}:
    what one authenticated user may send (MAIL and RCPT commands counted)
    in an hour, over every worker (0: no limit).
    C{connection_rate_per_client}: connections one client address (IPv6: its
    /64) may open to the MX role in a minute (0: no limit).
    """

    max_message_size: int = setting(36_700_160, integer(1))
    max_recipients: int = setting(100, integer(1))
    max_command_line: int = setting(
        512, integer(512, 1024 * 1024, why="RFC 5321 4.5.3.1.4"))
    max_text_line: int = setting(1024 * 1024, integer(1000, why="RFC 5321 4.5.3.1.6"))
    max_errors: int = setting(20, integer(1))
    max_junk_commands: int = setting(100, integer())
    max_connections: int = setting(1000, integer(1))
    max_connections_per_client: int = setting(50, integer(1))
    smtp_command_timeout: int = setting(300, _SECONDS)
    smtp_data_timeout: int = setting(600, _SECONDS)
    pop3_idle_timeout: int = setting(600, _SECONDS)
    imap_idle_timeout: int = setting(1800, _SECONDS)
    shutdown_timeout: float = setting(30.0, number())
    auth_failure_delay: float = setting(1.0, number())
    max_auth_failures: int = setting(5, integer(1))
    max_auth_failures_per_client: int = setting(20, integer(1))
    auth_failure_window: int = setting(900, _SECONDS)
    min_data_rate: int = setting(500, integer())
    min_free_space: int = setting(52_428_800, integer())
    submission_messages_per_hour: int = setting(500, integer())
    submission_recipients_per_hour: int = setting(2000, integer())
    connection_rate_per_client: int = setting(0, integer())
    memory_budget: int = setting(67_108_864, integer(1_048_576, why="1 MiB"))


@dataclass(frozen=True)
class SMTP:
    """
    SMTP policy knobs.

    C{vrfy} and C{expn} choose what unauthenticated clients learn:
    L{Disclosure.REFUSE} (VRFY 252 without saying whether the user exists,
    EXPN 502), or L{Disclosure.ANSWER} (full answers, which lets strangers
    enumerate users).  Authenticated clients always get full answers.
    C{catch_all}: where mail to unknown users of a local domain goes.
    C{bare_newline}: L{BareNewline.NORMALIZE} takes a bare LF in message
    text as a line end and a bare CR as a space (Postfix 3.9's defaults),
    L{BareNewline.REJECT} refuses the message.
    C{mx_auth}: offer AUTH on the MX role (C{listeners.smtp}) too.  Off, as
    in Postfix: port 25 is for other servers, users log in on submission,
    and a password guessed there could not be used to relay through port 25.
    """

    auth_over_plaintext: bool = setting(False, flag())
    mx_auth: bool = setting(False, flag())
    vrfy: Disclosure = setting("refuse", choice(Disclosure))
    expn: Disclosure = setting("refuse", choice(Disclosure))
    subaddress_separator: str = setting("+", text(v.subaddress_separator))
    catch_all: tuple[CatchAll, ...] = setting([], listing(text(v.catch_all)))
    max_received_headers: int = setting(50, integer(1))
    bare_newline: BareNewline = setting("normalize", choice(BareNewline))


@dataclass(frozen=True)
class POP3:
    """
    POP3 policy knobs.  APOP needs a plaintext-equivalent secret per account,
    so it stays off unless you turn it on here.  C{expire} is announced in
    CAPA as it is (RFC 2449: C{NEVER} or a number of days).
    """

    auth_over_plaintext: bool = setting(False, flag())
    apop: bool = setting(False, flag())
    login_delay: int = setting(0, integer())
    expire: str = setting("NEVER", text(v.pop3_expire))


@dataclass(frozen=True)
class IMAP:
    """
    IMAP policy knobs.
    """

    auth_over_plaintext: bool = setting(False, flag())


@dataclass(frozen=True)
class Plugins:
    """
    Plugins to run, in order, by name; C{paths} are extra folders searched
    for plugin modules besides the package C{mailserver.plugins}.  Each
    C{[plugins.NAME]} table holds that plugin's options (kept in C{options}),
    checked by the plugin when it is built.
    """

    paths: tuple[str, ...] = setting([], _NAMES)
    enabled: tuple[str, ...] = setting([], listing(text(v.not_empty), unique=str))
    options: dict = field(default_factory=dict, metadata={"tables_by_name": True})


@dataclass(frozen=True)
class Admin:
    """
    The admin HTTP API (health, metrics, queue).  C{token} is the bearer
    token every request must carry (16 characters or more); it is required
    when an admin listener is not on loopback.
    """

    token: str = setting("", text(v.admin_token))


@dataclass(frozen=True)
class Auth:
    """
    Extra account sources as C{twisted.cred} C{strcred} checker strings
    (e.g. C{"file:/etc/mail/passwd"}, C{"unix"}), tried after the users file.
    """

    checkers: tuple[str, ...] = setting([], listing(text(v.strcred_checker)))


_NETWORK_SECONDS = number(1.0)


@dataclass(frozen=True)
class Relay:
    """
    Outbound delivery of mail for remote recipients (the relay queue).
    Durations are in seconds here (the file writes them C{"5m"}, C{"4h"}).

    C{resolver}: the DNS server for MX lookups (C{None}: the system's).
    C{port}: TCP port of remote SMTP servers.
    C{smarthost}: where all outbound mail goes (C{None}: each domain's MX
    hosts), with C{smarthost_tls}, and AUTH PLAIN with
    C{smarthost_username} and C{smarthost_password} when set.
    C{transports}: per-domain routes overriding MX lookup.
    C{tls}: STARTTLS towards the MX hosts of domains without a policy of
    their own (in C{tls_policies} or by MTA-STS).
    C{tls_policies}: per-domain TLS levels (L{TLSLevel}); for a transport's
    domain the entry replaces the transport's verified TLS.
    C{ca_file}: a PEM file of CA certificates trusted for outbound TLS
    besides the system's trust store (a private CA for a smarthost).
    C{smarthost_tls_verify}: verify the smarthost's and transport hosts'
    certificate chain and host name; C{False} still requires TLS but
    accepts any certificate, with a warning at start.
    C{mta_sts}: apply the MTA-STS policies (RFC 8461) recipient domains
    publish, cached in C{<data_dir>/mta-sts/}.
    C{mta_sts_port}: the HTTPS port policies are fetched from (443; another
    value only serves tests).
    C{retry_schedule}: the first delays between attempts; after the last
    each delay doubles, up to C{max_retry_interval} (empty: 5m doubling).
    C{max_age}: how long a message is retried before it bounces.
    C{delay_warning}: the age after which senders who asked for
    NOTIFY=DELAY get a delay notice (C{None}: never).
    C{max_connections}, C{max_connections_per_destination}: outbound
    connections at once, in total and to one domain (or the smarthost); a
    destination starts at 5 and reaches its limit while it keeps answering.
    C{connection_reuse_count}, C{connection_idle_time},
    C{connection_reuse_time}: a connection carries at most so many messages,
    waits so long for the next, and is not used again after so long (as
    Postfix's connection cache; 1 message: no reuse).
    C{scan_interval}: between re-scans of the queue folder, which is how the
    running server picks up C{mailserver queue} commands.
    C{connect_timeout}, C{command_timeout}, C{data_timeout}: for a TCP
    connection, a greeting or reply, the reply to the end of the message.
    C{dns_timeout}: one DNS query, retransmissions included.
    C{bounce_full_limit}: when the sender did not choose RET, bounces carry
    the whole message up to this many octets, else only its headers.
    C{relay_domains}: domains whose mail is accepted from anyone and relayed
    to their MX hosts (a backup MX, a gateway); C{relay_recipients}: a file
    of their valid recipients (L{mailserver.relay_recipients}; empty: all).
    C{own_names}, C{own_addresses}: host names (besides C{hostname}) and IP
    addresses that are this server, so an MX list naming it is cut there
    (RFC 5321 5.1) and mail never loops back to it.

    A new key is one field here (its default as the file writes it, and
    its kind), one line above and one row in the README's key reference.
    """

    resolver: HostPort | None = setting("", v.host_port(53, ip_only=True))
    port: int = setting(25, integer(1, 65535))
    smarthost: HostPort | None = setting("", v.host_port(587))
    smarthost_tls: SmarthostTLS = setting("starttls", choice(SmarthostTLS))
    smarthost_username: str = setting("", text())
    smarthost_password: str = setting("", text())
    transports: tuple[Transport, ...] = setting(
        [], listing(text(v.transport), unique=lambda route: route.domain))
    tls: RelayTLS = setting("opportunistic", choice(RelayTLS))
    tls_policies: tuple[TLSPolicyRule, ...] = setting(
        [], listing(text(v.tls_policy), unique=lambda rule: rule.domain))
    ca_file: str = setting("", text())
    smarthost_tls_verify: bool = setting(True, flag())
    mta_sts: bool = setting(True, flag())
    mta_sts_port: int = setting(443, integer(1, 65535))
    retry_schedule: tuple[float, ...] = setting(["5m"], listing(text(seconds)))
    max_retry_interval: float = setting("4h", duration())
    max_age: float = setting("5d", duration())
    delay_warning: float | None = setting("", duration(optional=True))
    max_connections: int = setting(20, integer(1))
    max_connections_per_destination: int = setting(10, integer(1))
    connection_reuse_count: int = setting(100, integer(1, 10000))
    connection_idle_time: float = setting(2.0, number(0.0, 60.0))
    connection_reuse_time: float = setting(300.0, number(1.0, 3600.0))
    scan_interval: float = setting(
        10.0, number(0.1, why="a shorter interval re-reads the queue folder without pause"))
    connect_timeout: float = setting(60.0, _NETWORK_SECONDS)
    dns_timeout: float = setting(15.0, number(1.0, 300.0))
    command_timeout: float = setting(300.0, _NETWORK_SECONDS)
    data_timeout: float = setting(600.0, _NETWORK_SECONDS)
    bounce_full_limit: int = setting(131072, integer())
    relay_domains: tuple[str, ...] = setting([], listing(text(v.local_domain), unique=str))
    relay_recipients: str = setting("", text())
    own_names: tuple[str, ...] = setting([], listing(text(v.own_name), unique=str))
    own_addresses: tuple[str, ...] = setting([], listing(text(v.ip_address), unique=str))


@dataclass(frozen=True)
class DKIM:
    """
    DKIM signing (RFC 6376) of mail that authenticated users send.

    C{keys}: a key per domain and selector; RSA or Ed25519 PEM files.  Mail
    whose From domain (else envelope sender domain) has keys is signed with
    each of them, when every From address is one the authenticated account
    may send as.
    C{shared_domains}: domains whose From addresses any authenticated
    account may have signed (lower case, like C{local_domains}).
    C{signed_headers}: header fields signed when present.
    C{oversigned_headers}: fields signed once more than present, so none can
    be added later without breaking the signature.
    """

    keys: tuple[DKIMKey, ...] = setting(
        [], listing(text(v.dkim_key), unique=lambda key: (key.domain, key.selector)))
    shared_domains: tuple[str, ...] = setting([], listing(text(v.local_domain)))
    signed_headers: tuple[str, ...] = setting([
        "from", "sender", "reply-to", "subject", "date", "message-id", "to", "cc",
        "mime-version", "content-type", "content-transfer-encoding", "content-disposition",
        "in-reply-to", "references", "list-id", "list-help", "list-unsubscribe",
        "list-unsubscribe-post", "list-subscribe", "list-post", "list-owner", "list-archive",
    ], listing(text(v.header_name)))
    oversigned_headers: tuple[str, ...] = setting(
        ["from", "reply-to", "subject", "date", "message-id", "to", "cc"],
        listing(text(v.header_name)))


@dataclass(frozen=True)
class Checks:
    """
    Inbound checks on the MX role (unauthenticated sessions): SPF (RFC 7208),
    DKIM and DMARC (RFC 7489), reported in one C{Authentication-Results}
    header (RFC 8601).  DNS goes through C{relay.resolver}.

    C{spf_fail}, C{dmarc_reject}: L{CheckAction.TAG} (add the header,
    deliver) or L{CheckAction.REJECT} (550 5.7.1 at end of DATA; SPF fail
    only when DMARC does not pass).  C{exempt_domains}: envelope sender or
    From domains never rejected (C{".example.com"} also matches
    subdomains).  C{exempt_networks}: client networks never rejected.
    C{skip_networks}: client networks not checked at all (nor screened,
    greylisted or rate-limited).  C{dns_timeout}: seconds per DNS query.

    Screening at connection (MX role only), as Postfix's postscreen:
    C{dnsbl}: DNS block- and allowlists (L{DNSBLSite}), looked up in
    parallel within C{dnsbl_timeout}; a client whose weights add up to
    C{dnsbl_threshold} or more is refused (C{dnsbl_action}), one whose sum
    is negative skips the greeting delay and greylisting.
    C{greet_delay}: seconds the greeting waits; a client that talks before
    it is refused (554).  Greylisting (C{greylist}): a new (client
    network, sender, recipient) is told 451 until it retries after
    C{greylist_delay} and within C{greylist_retry_window}; passed triplets
    and networks are remembered for C{greylist_expiry} since last seen, a
    network with C{greylist_auto_whitelist} passed triplets skips
    greylisting, and at most C{greylist_max_entries} triplets are kept.
    """

    enabled: bool = setting(True, flag())
    spf_fail: CheckAction = setting("tag", choice(CheckAction))
    dmarc_reject: CheckAction = setting("tag", choice(CheckAction))
    exempt_domains: tuple[str, ...] = setting([], listing(text(v.exempt_domain)))
    exempt_networks: tuple[Network, ...] = setting([], listing(text(v.network)))
    skip_networks: tuple[Network, ...] = setting(
        ["127.0.0.0/8", "::1/128"], listing(text(v.network)))
    dns_timeout: float = setting(10.0, number(1.0, 60.0))
    dnsbl: tuple[DNSBLSite, ...] = setting(
        [], listing(text(v.dnsbl_site), unique=lambda site: (site.domain, site.replies)))
    dnsbl_threshold: int = setting(1, integer(1))
    dnsbl_action: ListedAction = setting("reject", choice(ListedAction))
    dnsbl_timeout: float = setting(5.0, number(0.5, 60.0))
    greet_delay: float = setting(0.0, number(0.0, 60.0))
    greylist: bool = setting(False, flag())
    greylist_delay: float = setting("5m", duration())
    greylist_retry_window: float = setting("2d", duration())
    greylist_expiry: float = setting("35d", duration())
    greylist_auto_whitelist: int = setting(5, integer())
    greylist_max_entries: int = setting(100_000, integer(100))


@dataclass(frozen=True)
class Log:
    """
    twistd's log file (C{--logfile}): renamed C{.1} (the older ones shifted
    up) once it holds C{rotate_size} octets, and on SIGUSR1; only the
    C{keep_rotated} newest of those stay, so the log's room on disk is
    bounded whatever a client makes the server log.
    """

    rotate_size: int = setting(10_000_000, integer(10_000))
    keep_rotated: int = setting(10, integer(1, 100_000))


@dataclass(frozen=True)
class Config:
    """
    The whole configuration.  Relative paths in the file are relative to the
    directory the server runs in; C{users_file} and C{aliases_file} default to
    files inside C{data_dir}.
    """

    hostname: str = setting(
        kind=text(v.host_name), factory=socket.getfqdn, shown="the machine's FQDN")
    data_dir: str = setting(DATA_DIR_NAME, text(v.not_empty))
    node_name: str = setting(
        kind=text(v.node_name), factory=v.default_node_name, shown="the machine's host name")
    workers: int = setting(1, integer(1, 256))
    local_domains: tuple[str, ...] = setting(
        ["localhost"], listing(text(v.local_domain), at_least_one="must name at least one domain"))
    users_file: str = setting("", text())
    aliases_file: str = setting("", text())
    listeners: Listeners = section(Listeners)
    tls: TLS = section(TLS)
    limits: Limits = section(Limits)
    smtp: SMTP = section(SMTP)
    pop3: POP3 = section(POP3)
    imap: IMAP = section(IMAP)
    plugins: Plugins = section(Plugins)
    auth: Auth = section(Auth)
    admin: Admin = section(Admin)
    relay: Relay = section(Relay)
    dkim: DKIM = section(DKIM)
    checks: Checks = section(Checks)
    log: Log = section(Log)
    source: str = "<embedded default>"

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    @property
    def mail_path(self) -> Path:
        return self.data_path / "mail"

    @property
    def nodes_path(self) -> Path:
        """
        Where each server sharing the data folder keeps what is its own
        (L{node_path}).
        """
        return self.data_path / "nodes"

    @property
    def node_path(self) -> Path:
        """
        This server's own folder: its relay queue, its defences database,
        its lock, its process id and listener report.  Everything else in
        the data folder is shared by every server that uses it.
        """
        return self.nodes_path / self.node_name

    @property
    def queue_path(self) -> Path:
        return self.node_path / "queue"

    @property
    def pid_path(self) -> Path:
        """
        The primary process's id, for C{mailserver reload}.
        """
        return self.node_path / "mailserver.pid"

    @property
    def listeners_report_path(self) -> Path:
        """
        The addresses the listeners got (C{listeners.json}).
        """
        return self.node_path / "listeners.json"

    @property
    def dkim_key_path(self) -> Path:
        """
        Where C{mailserver dkim keygen} writes keys, and where a C{dkim.keys}
        entry without a path looks.
        """
        return self.data_path / "dkim"

    @property
    def defences_path(self) -> Path:
        """
        The greylisting and rate-limit state, shared by the worker
        processes: an SQLite database, one per node (SQLite's locks do not
        hold across the machines of a network file system).
        """
        return self.node_path / "defences.sqlite"

    @property
    def mta_sts_path(self) -> Path:
        """
        Where the relay caches the MTA-STS policies it fetched.
        """
        return self.data_path / "mta-sts"

    @property
    def users_path(self) -> Path:
        return Path(self.users_file) if self.users_file else self.data_path / "users"

    @property
    def aliases_path(self) -> Path:
        return (
            Path(self.aliases_file) if self.aliases_file else self.data_path / "aliases"
        )

    @property
    def relay_recipients_path(self) -> Path | None:
        return Path(self.relay.relay_recipients) if self.relay.relay_recipients else None

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


def file_keys(cls: type = Config, prefix: str = "") -> Iterator[tuple[str, Setting]]:
    """
    Every key of the file format under C{cls}, dotted, with its L{Setting};
    the C{[plugins.NAME]} tables, which belong to the plugins, are not
    among them.
    """
    for f in dataclasses.fields(cls):
        if "section" in f.metadata:
            yield from file_keys(f.metadata["section"], prefix + f.name + ".")
        elif "setting" in f.metadata:
            yield prefix + f.name, f.metadata["setting"]
