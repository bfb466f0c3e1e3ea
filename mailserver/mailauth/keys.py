"""
DKIM keys: generating them, reading them, and the DNS record to publish.

Keys are PEM files: RSA (2048 bits, PKCS#1 as C{openssl genrsa} writes) or
Ed25519 (PKCS#8, RFC 8463); a bare base64 Ed25519 seed as dkimpy's
C{dknewkey} writes is accepted too.  The public half goes into a TXT record
at C{<selector>._domainkey.<domain>} (RFC 6376 3.6.1).
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

ALGORITHMS = ("rsa", "ed25519")
RSA_BITS = 2048


class DKIMKeyError(ValueError):
    """
    A key file that cannot be used, with the reason.
    """


@dataclass(frozen=True)
class SigningKey:
    """
    A key ready for dkimpy: C{algorithm} is C{b"rsa-sha256"} or
    C{b"ed25519-sha256"}, C{private} is what C{dkim.DKIM.sign} takes,
    C{public} the base64 C{p=} value of the DNS record.
    """

    algorithm: bytes
    private: bytes = b""
    public: str = ""

    @property
    def k(self) -> str:
        return "ed25519" if self.algorithm == b"ed25519-sha256" else "rsa"

    def __repr__(self) -> str:  # never print the private key
        return f"SigningKey({self.algorithm.decode()}, p={self.public[:12]}...)"


def generate(algorithm: str) -> bytes:
    """
    A new private key as PEM bytes.
    """
    if algorithm == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
        return key.private_bytes(serialization.Encoding.PEM,
                                 serialization.PrivateFormat.TraditionalOpenSSL,
                                 serialization.NoEncryption())
    if algorithm == "ed25519":
        return ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())
    raise ValueError(f"unknown algorithm {algorithm!r}: use rsa or ed25519")


def _public_p(public_key) -> str:
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    else:
        raw = public_key.public_bytes(serialization.Encoding.DER,
                                      serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(raw).decode("ascii")


def parse_key(data: bytes) -> SigningKey:
    """
    @raise DKIMKeyError: when C{data} is not a usable RSA or Ed25519 key.
    """
    stripped = data.strip()
    if b"-----BEGIN" not in stripped:
        try:
            seed = base64.b64decode(stripped, validate=True)
        except (binascii.Error, ValueError):
            seed = b""
        if len(seed) != 32:
            raise DKIMKeyError("not a PEM key, nor a base64 Ed25519 seed")
        key = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
    else:
        try:
            key = serialization.load_pem_private_key(stripped, password=None)
        except (ValueError, TypeError) as e:
            raise DKIMKeyError(f"cannot read the PEM key: {e}") from None
    if isinstance(key, ed25519.Ed25519PrivateKey):
        seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())
        return SigningKey(b"ed25519-sha256", base64.b64encode(seed), _public_p(key.public_key()))
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 1024:
            raise DKIMKeyError(f"an RSA key of {key.key_size} bits is too short (RFC 8301)")
        pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
        return SigningKey(b"rsa-sha256", pem, _public_p(key.public_key()))
    raise DKIMKeyError(f"unsupported key type {type(key).__name__}: use RSA or Ed25519")


def load_key(path: Path) -> SigningKey:
    """
    @raise DKIMKeyError: naming the file, when it is missing or unusable.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DKIMKeyError(f"cannot read {path}: {e.strerror}") from None
    try:
        return parse_key(data)
    except DKIMKeyError as e:
        raise DKIMKeyError(f"{path}: {e}") from None


def txt_record(key: SigningKey) -> str:
    """
    The value of the key's TXT record, e.g. C{"v=DKIM1; k=rsa; p=MIIB..."}.
    """
    return f"v=DKIM1; k={key.k}; p={key.public}"


def zone_entry(domain: str, selector: str, key: SigningKey) -> str:
    """
    The record in zone-file syntax, split into strings of at most 255
    octets as TXT records need (RFC 1035 3.3.14).
    """
    value = txt_record(key)
    chunks = [value[i:i + 255] for i in range(0, len(value), 255)]
    quoted = " ".join(f'"{c}"' for c in chunks)
    if len(chunks) > 1:
        quoted = f"( {quoted} )"
    return f"{selector}._domainkey.{domain}. IN TXT {quoted}"


def write_key(path: Path, pem: bytes, force: bool = False) -> None:
    """
    Write a private key readable by its owner only (0600), never
    overwriting one unless C{force}.

    @raise FileExistsError: when the file exists and not C{force}.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_TRUNC if force else os.O_EXCL)
    fd = os.open(path, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
