"""
Outbound TLS: the level a destination gets, and the client side of each TLS
session, which checks the server's certificate and says what was wrong.

The levels are Postfix's (C{smtp_tls_security_level})::

    none     no STARTTLS
    may      STARTTLS when offered, any certificate; a failed handshake is
             tried again in plaintext (RFC 7435: unverified encryption beats
             plaintext, and plaintext beats no delivery)
    encrypt  TLS required, any certificate
    verify   TLS required; the chain must lead to a trusted root (the system
             trust store and C{relay.ca_file}) and the certificate must name
             the host (the MX host name, or the configured smarthost or
             transport host)

Where a destination's level comes from, the first that applies
(L{policy_for}): the smarthost (C{verify}, C{encrypt} when
C{relay.smarthost_tls_verify} is false); a C{relay.tls_policies} entry for
the recipient domain; a transport host (as the smarthost); the domain's
MTA-STS policy (L{mailserver.relay.mta_sts}: C{enforce} is C{verify} plus the
policy's MX patterns; C{testing} checks and reports but delivers at the
C{may} level, or C{encrypt} when C{relay.tls} requires TLS); C{relay.tls}.

A certificate is checked in the handshake (L{CheckedClientTLS}): when the
level enforces it, a bad one ends the handshake before any byte of SMTP goes
over the connection, so no AUTH reaches a server that failed.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

from mailserver.config import RelayTLS, TLSLevel
from mailserver.logs import emit_failure

# What C{Transaction.tls} the client is given for a level.
_CLIENT_MODE = {
    TLSLevel.NONE: "none",
    TLSLevel.MAY: "opportunistic",
    TLSLevel.ENCRYPT: "required",
    TLSLevel.VERIFY: "required",
}
_FROM_RELAY_TLS = {
    RelayTLS.OPPORTUNISTIC: TLSLevel.MAY,
    RelayTLS.REQUIRED: TLSLevel.ENCRYPT,
    RelayTLS.NONE: TLSLevel.NONE,
}

# OpenSSL's X509_V_ERR_* codes, as TLS-RPT (RFC 8460 4.3) names their kind.
_EXPIRED = {9, 10}  # not yet valid, expired
_UNTRUSTED = {2, 18, 19, 20, 21}  # no issuer, self-signed, no local issuer, ...


@dataclass(frozen=True)
class TLSPolicy:
    """
    How one destination is to be reached.

    @ivar level: the L{TLSLevel}.
    @ivar source: what chose it, for messages (C{"relay.tls_policies"},
        C{"MTA-STS"}, C{"smarthost"}, ...).
    @ivar domain: the policy domain counted in C{relay_tls_policy_total}
        (C{""}: not counted).
    @ivar mode: that metric's C{mode} label (C{enforce}, C{testing}, or the
        level of a C{relay.tls_policies} entry).
    @ivar mx: MTA-STS: the MX host patterns of the policy (C{None}: any).
    @ivar testing: check the certificate and the MX patterns and report
        what fails, but deliver anyway (MTA-STS C{testing}).
    """

    level: TLSLevel
    source: str
    domain: str = ""
    mode: str = ""
    mx: tuple[str, ...] | None = None
    testing: bool = False

    @property
    def client_mode(self) -> str:
        return _CLIENT_MODE[self.level]

    @property
    def checks(self) -> bool:
        """
        Whether certificates are verified (and failures enforced or, in
        testing, reported).
        """
        return self.level == TLSLevel.VERIFY or self.testing

    def allows_mx(self, host: str) -> bool:
        return self.mx is None or any(mx_matches(p, host) for p in self.mx)


def mx_matches(pattern: str, host: str) -> bool:
    """
    RFC 8461 4.1: C{"mail.example.com"} matches itself; C{"*.example.com"}
    matches exactly one more label on the left.
    """
    pattern = pattern.lower().rstrip(".")
    host = host.lower().rstrip(".")
    if pattern.startswith("*."):
        first, _, rest = host.partition(".")
        return bool(first) and rest == pattern[2:]
    return host == pattern


def policy_entry(policies: dict[str, TLSLevel], domain: str) -> tuple[str, TLSLevel] | None:
    """
    The C{relay.tls_policies} entry for C{domain} as C{(key, level)}: its
    own, else the C{".parent"} entry of the nearest parent domain.
    """
    if domain in policies:
        return domain, policies[domain]
    labels = domain.split(".")
    for i in range(1, len(labels)):
        key = "." + ".".join(labels[i:])
        if key in policies:
            return key, policies[key]
    return None


class PolicyTable:
    """
    The configured part of the choice: smarthost, C{relay.tls_policies},
    transports and C{relay.tls}.  MTA-STS is asked by the courier in
    between (L{configured} returns C{None} when it should be).
    """

    def __init__(self, relay) -> None:
        self._relay = relay
        self._policies = {rule.domain: rule.level for rule in relay.tls_policies}
        self._next_hop = TLSLevel.VERIFY if relay.smarthost_tls_verify else TLSLevel.ENCRYPT

    def smarthost(self) -> TLSPolicy:
        return TLSPolicy(self._next_hop, "smarthost")

    def configured(self, domain: str, transport: bool) -> TLSPolicy | None:
        """
        The policy set by configuration for mail to C{domain}; C{None} when
        an MTA-STS policy may decide.
        """
        entry = policy_entry(self._policies, domain)
        if entry is not None:
            key, level = entry
            # Counted under the entry's key: one label value per entry.
            return TLSPolicy(level, "relay.tls_policies", domain=key,
                             mode=level if level != TLSLevel.NONE else "")
        if transport:
            return TLSPolicy(self._next_hop, "transport")
        return None

    def default(self) -> TLSPolicy:
        return TLSPolicy(_FROM_RELAY_TLS[self._relay.tls], "relay.tls")

    def from_mta_sts(self, domain: str, mode: str, mx: tuple[str, ...]) -> TLSPolicy:
        """
        An MTA-STS policy in C{enforce} or C{testing} mode as a L{TLSPolicy}.
        """
        if mode == "enforce":
            return TLSPolicy(TLSLevel.VERIFY, "MTA-STS", domain=domain, mode=mode, mx=mx)
        base = self.default().level
        level = TLSLevel.ENCRYPT if base == TLSLevel.ENCRYPT else TLSLevel.MAY
        return TLSPolicy(level, "MTA-STS", domain=domain, mode=mode, mx=mx, testing=True)


def ca_certificates(relay) -> bytes:
    """
    The PEM text of C{relay.ca_file} (empty when not set).
    """
    if not relay.ca_file:
        return b""
    with open(relay.ca_file, "rb") as f:
        return f.read()


class ClientTLS:
    """
    Makes the per-connection L{CheckedClientTLS}; holds the two OpenSSL
    contexts all connections share, one loaded with the trust roots: the
    system's trust store plus the certificates in C{extra_ca} (both, so a
    private smarthost CA does not turn off MTA-STS towards public domains).
    """

    def __init__(self, extra_ca: bytes = b"") -> None:
        from cryptography import x509
        from OpenSSL import crypto

        self._checking = ssl.CertificateOptions(trustRoot=ssl.platformTrust())
        store = self._checking.getContext().get_cert_store()
        for certificate in (x509.load_pem_x509_certificates(extra_ca) if extra_ca else []):
            store.add_cert(crypto.X509.from_cryptography(certificate))
        self._plain = ssl.CertificateOptions()

    def session(self, host: str, *, check: bool, enforce: bool) -> CheckedClientTLS:
        return CheckedClientTLS(self._checking if check else self._plain, host,
                                check=check, enforce=enforce)

    def for_policy(self, policy: TLSPolicy, host: str) -> CheckedClientTLS | None:
        if policy.level == TLSLevel.NONE:
            return None
        return self.session(host, check=policy.checks, enforce=not policy.testing)


def unverified_client_tls(host: str) -> CheckedClientTLS:
    """
    TLS with no certificate check, for a client given no options.
    """
    return CheckedClientTLS(ssl.CertificateOptions(), host, check=False, enforce=False)


def _verify_error(code: int) -> str:
    try:
        from OpenSSL._util import ffi, lib

        return ffi.string(lib.X509_verify_cert_error_string(code)).decode("ascii", "replace")
    except Exception:  # pragma: no cover - a pyOpenSSL without its bindings
        return f"X509 error {code}"


@implementer(IOpenSSLClientConnectionCreator)
class CheckedClientTLS:
    """
    The client side of one TLS session with C{host} (a DNS name or an IP
    address).  With C{check}, the chain and the name are verified; a failure
    ends the handshake when C{enforce}, else it is only recorded.

    @ivar problem: what was wrong with the certificate (C{""}: nothing, or
        not checked), e.g. C{"certificate verify failed: unable to get
        local issuer certificate"} or C{"hostname mismatch: ..."}.
    @ivar result: the TLS-RPT kind of the problem: C{certificate-not-trusted},
        C{certificate-expired}, C{certificate-host-mismatch} or
        C{validation-failure}.
    """

    log = Logger()

    def __init__(self, options: ssl.CertificateOptions, host: str, *, check: bool,
                 enforce: bool) -> None:
        self._options = options
        self.host = host
        self.check = check
        self.enforce = enforce
        self.problem = ""
        self.result = ""
        try:
            ipaddress.ip_address(host)
            self._is_address = True
        except ValueError:
            self._is_address = False

    def clientConnectionForTLS(self, tls_protocol) -> SSL.Connection:
        connection = self._options.clientConnectionForTLS(tls_protocol)
        if not self._is_address:
            try:
                connection.set_tlsext_host_name(self.host.encode("idna"))
            except UnicodeError:
                pass
        if self.check:
            connection.set_verify(SSL.VERIFY_PEER, self._verify)
        return connection

    def _record(self, problem: str, result: str) -> None:
        if not self.problem:
            self.problem, self.result = problem, result

    def _verify(self, connection, certificate, code: int, depth: int, ok: int) -> bool:
        # An exception in an OpenSSL callback is lost: catch everything.
        try:
            if not ok:
                kind = ("certificate-expired" if code in _EXPIRED else
                        "certificate-not-trusted" if code in _UNTRUSTED else
                        "validation-failure")
                self._record(f"certificate verify failed: {_verify_error(code)}", kind)
            elif depth == 0 and not self._names_host(certificate):
                ok = False
                self._record(f"hostname mismatch: the certificate does not name {self.host}",
                             "certificate-host-mismatch")
        except Exception:
            emit_failure(self.log, "relay.certificate_check_failed",
                         "checking the certificate failed", host=self.host)
            ok = False
            self._record("certificate verify failed: cannot check it", "validation-failure")
        return bool(ok) or not self.enforce

    def _names_host(self, certificate) -> bool:
        from service_identity import CertificateError, VerificationError
        from service_identity.hazmat import DNS_ID, IPAddress_ID, verify_service_identity
        from service_identity.pyopenssl import extract_patterns

        wanted = IPAddress_ID(self.host) if self._is_address else DNS_ID(self.host)
        try:
            verify_service_identity(extract_patterns(certificate), [wanted], [])
        except (VerificationError, CertificateError):
            return False
        return True


@dataclass(frozen=True)
class SessionVerdict:
    """
    What one connection's TLS came to, under its policy.

    @ivar result: C{"success"}, a TLS-RPT failure kind
        (C{starttls-not-supported}, C{certificate-not-trusted}, ...), or
        C{""} when TLS was not reached (the connection failed before).
    @ivar problem: the failure in words (C{""} on success).
    @ivar handshake_failed: TLS began and broke; at the C{may} level the
        message may go again in plaintext.
    """

    result: str
    problem: str = ""
    handshake_failed: bool = False

    @property
    def failed(self) -> bool:
        return self.result not in ("", "success")


def judge(policy: TLSPolicy, session: CheckedClientTLS | None, tls: str) -> SessionVerdict:
    """
    @param tls: the client's account of TLS (C{TransactionResult.tls}).
    """
    if tls == "established":
        if session is not None and session.problem:  # recorded, not enforced
            return SessionVerdict(session.result, session.problem)
        return SessionVerdict("success")
    if tls == "started":
        if session is not None and session.problem:
            return SessionVerdict(session.result, session.problem, handshake_failed=True)
        return SessionVerdict("validation-failure", "", handshake_failed=True)
    if tls == "not-offered":
        return SessionVerdict("starttls-not-supported", "the server does not offer STARTTLS")
    if tls == "refused":
        return SessionVerdict("starttls-not-supported", "the server refused STARTTLS")
    return SessionVerdict("")


class TLSPolicyCounter:
    """
    Counts outcomes into C{relay_tls_policy_total}, with at most
    C{max_domains} distinct domain labels (the rest as C{"other"}): policy
    domains come from recipients, and each label is kept for good.
    """

    def __init__(self, counter, max_domains: int = 1000) -> None:
        self._counter = counter
        self._max = max_domains
        self._domains: set[str] = set()

    def __call__(self, *, domain: str, mode: str, result: str) -> None:
        if domain not in self._domains:
            if len(self._domains) >= self._max:
                domain = "other"
            else:
                self._domains.add(domain)
        self._counter.inc(domain=domain, mode=mode, result=result)
