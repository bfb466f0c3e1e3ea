"""
Password hashes: scrypt (RFC 7914) in the users file's form
C{scrypt$n$r$p$salt$digest} (base64), so no plaintext password is ever on
disk, computed by whichever of two implementations is faster here.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Callable

from nacl.bindings import crypto_pwhash_scryptsalsa208sha256_ll
from nacl.exceptions import CryptoError

_SCRYPT_N = 2**14
_SCRYPT_R = 8
_SCRYPT_P = 1
# What a stored hash may ask of one check, as hashlib's scrypt allows by
# default: a damaged users file cannot make a login take gigabytes.
_SCRYPT_MAX_MEMORY = 32 * 1024 * 1024


def sodium_scrypt(password: bytes, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    """
    scrypt as libsodium computes it; it maps its buffer itself, so none is
    left in a thread's malloc arena.
    """
    return crypto_pwhash_scryptsalsa208sha256_ll(password, salt, n, r, p, dklen=length)


def openssl_scrypt(password: bytes, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    """
    scrypt as OpenSSL computes it (C{hashlib}); its buffer is an ordinary
    C{malloc}, returned to the system when the server has set the allocator
    up (L{mailserver.process}).  L{scrypt} has bounded the memory already.
    """
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, maxmem=2 * _SCRYPT_MAX_MEMORY, dklen=length)


ScryptFunction = Callable[[bytes, bytes, int, int, int, int], bytes]


class FastestScrypt:
    """
    Whichever of several implementations of the same scrypt runs faster on
    this machine: it depends on the CPU (libsodium's took a third less time
    than OpenSSL's on an Intel Xeon, OpenSSL's 20% less than libsodium's on
    an AMD EPYC), and every login pays it.  The first C{trials} checks run
    each implementation in turn, timing it (one such check at a time: the
    others meanwhile run the first implementation, so logins that arrive
    together do not all pay double); later checks run the one with the
    shortest time.  Safe to call from several threads at once.
    """

    def __init__(
        self, implementations: tuple[ScryptFunction, ...], trials: int = 2, clock=time.perf_counter
    ) -> None:
        self._implementations = implementations
        self._trials = trials
        self._clock = clock
        self._lock = threading.Lock()
        self._best: dict[ScryptFunction, float] = {}
        self._runs = 0
        self._timing = False
        self.chosen: ScryptFunction | None = None

    def __call__(self, password: bytes, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
        chosen = self.chosen
        if chosen is not None:
            return chosen(password, salt, n, r, p, length)
        with self._lock:
            timing, self._timing = not self._timing, True
        if not timing:
            return self._implementations[0](password, salt, n, r, p, length)
        times = []
        try:
            for implementation in self._implementations:
                started = self._clock()
                digest = implementation(password, salt, n, r, p, length)
                times.append((implementation, self._clock() - started))
        finally:
            with self._lock:
                self._timing = False
                for implementation, elapsed in times:
                    self._best[implementation] = min(elapsed, self._best.get(implementation, elapsed))
                if len(times) == len(self._implementations):
                    self._runs += 1
                if self._runs >= self._trials and self.chosen is None:
                    self.chosen = min(self._implementations, key=self._best.__getitem__)
        return digest


def scrypt(
    password: bytes, salt: bytes, n: int, r: int, p: int, length: int,
    implementation: ScryptFunction = sodium_scrypt,
) -> bytes:
    """
    scrypt (RFC 7914), computed by C{implementation}: libsodium's and
    OpenSSL's compute the same function (the tests check it).

    @raise ValueError: parameters that are not scrypt's, or that need more
        than L{_SCRYPT_MAX_MEMORY}.
    """
    if n < 2 or n & (n - 1) or r < 1 or not 1 <= p <= 16 or not 1 <= length <= 1024:
        raise ValueError("not scrypt parameters")
    if 128 * r * (n + p) > _SCRYPT_MAX_MEMORY:
        raise ValueError("scrypt parameters need too much memory")
    return implementation(password, salt, n, r, p, length)


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = scrypt(password.encode("utf-8"), salt, _SCRYPT_N, _SCRYPT_R, _SCRYPT_P, 64)
    b64 = base64.b64encode
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


# Checked against when the user does not exist: a well-formed entry that no
# password matches, so checking it costs what checking a real one does.
DUMMY_HASH = f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${base64.b64encode(bytes(16)).decode()}$" + (
    base64.b64encode(bytes(64)).decode()
)


def verify_password(password: str, stored: str, implementation: ScryptFunction = sodium_scrypt) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        actual = scrypt(
            password.encode("utf-8"), base64.b64decode(salt), int(n), int(r), int(p), len(expected),
            implementation,
        )
    except (ValueError, TypeError, CryptoError):
        return False
    return hmac.compare_digest(actual, expected)
