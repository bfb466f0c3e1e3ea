"""
TLS for STARTTLS, STLS and the implicit-TLS listeners.

With no certificate configured, a self-signed one for the configured hostname
is generated into C{<data_dir>/tls/} on first start, so TLS works out of the
box (clients must be told to accept it; configure a real certificate for
production).
"""

from __future__ import annotations

import datetime
import fcntl
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from zope.interface import implementer

from mailserver.config import ConfigError


@dataclass(frozen=True)
class CertificateFiles:
    """
    The PEM certificate and key every TLS role uses.

    @ivar self_signed: when none is configured, a self-signed pair for
        C{hostname} is made at these paths if they do not exist.
    @ivar source: the configuration file, named in errors.
    """

    certificate: Path
    key: Path
    hostname: str
    self_signed: bool
    source: str


def self_signed_names(hostname: str) -> list:
    """
    The subject alternative names of the self-signed certificate: the
    hostname and the loopback names clients use in the README's examples,
    each once, so C{curl --cacert <data>/tls/cert.pem smtps://127.0.0.1}
    verifies.
    """
    from cryptography import x509

    names: list = []
    for value in (hostname, "localhost", "127.0.0.1", "::1"):
        try:
            entry = x509.IPAddress(ipaddress.ip_address(value))
        except ValueError:
            entry = x509.DNSName(value.lower())
        if entry not in names:
            names.append(entry)
    return names


def ensure_self_signed(cert_path: Path, key_path: Path, hostname: str) -> None:
    """
    Write a self-signed certificate and key unless both already exist.

    Servers sharing a data folder (L{mailserver.nodes}) may start together:
    an exclusive C{flock} beside the files makes one write the pair and the
    others find it, so none serves a certificate whose key another replaced.
    """
    if cert_path.exists() and key_path.exists():
        return
    cert_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW
    lock = os.open(cert_path.parent / ".self-signed.lock", flags, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (cert_path.exists() and key_path.exists()):
            _write_self_signed(cert_path, key_path, hostname)
    finally:
        os.close(lock)


def _write_self_signed(cert_path: Path, key_path: Path, hostname: str) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64])])
    now = datetime.datetime.now(datetime.timezone.utc)
    names = self_signed_names(hostname)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Each whole or not at all (renamed into place), the key first: a
    # server that finds the certificate finds its key.  Never written
    # through a link left in their place.
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
    for path, content, mode in ((key_path, key_bytes, 0o600),
                                (cert_path, certificate.public_bytes(serialization.Encoding.PEM),
                                 0o644)):
        partial = path.with_name(path.name + ".partial")
        with os.fdopen(os.open(partial, flags, mode), "wb") as f:
            f.write(content)
        os.rename(partial, path)


def server_options(files: CertificateFiles) -> ssl.CertificateOptions:
    """
    The TLS server context for every role.

    @raise ConfigError: if the certificate or key cannot be used.
    """
    if files.self_signed:
        ensure_self_signed(files.certificate, files.key, files.hostname)
    try:
        cert_pem = files.certificate.read_bytes()
        key_pem = files.key.read_bytes()
        private = ssl.PrivateCertificate.loadPEM(cert_pem + b"\n" + key_pem)
    except OSError as e:
        raise ConfigError(files.source, "tls", f"cannot read certificate: {e}") from None
    except Exception as e:  # OpenSSL raises its own error types
        raise ConfigError(
            files.source, "tls", f"certificate and key are not usable: {e}"
        ) from None
    return private.options()


@implementer(IOpenSSLServerConnectionCreator)
class ReloadableServerOptions:
    """
    The TLS context every listener uses, swappable at run time so SIGHUP
    can bring in a renewed certificate without dropping connections: new
    handshakes use the new context, running sessions keep theirs.

    It provides the connection-creator interface Twisted asks of server TLS
    options (else each first use logs a C{LegacyContextFactoryWarning}).
    """

    def __init__(self, files: CertificateFiles) -> None:
        self._files = files
        self.current = server_options(files)

    def getContext(self):
        return self.current.getContext()

    def serverConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        return SSL.Connection(self.current.getContext(), None)

    def reload(self) -> None:
        """
        @raise ConfigError: the new files are unusable; the old ones stay.
        """
        self.current = server_options(self._files)
