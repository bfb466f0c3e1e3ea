"""
DKIM with the message body read a piece at a time.

dkimpy wants the whole message in memory and makes several copies of it
(its line split, each canonicalization step), several times the size of a
large message for every signature checked or made.  Here the body hash
(RFC 6376 3.7) is computed from the body's pieces as they are read from the
spool, and dkimpy is given the header section alone: L{verify} checks its
C{bh=} against ours before dkimpy checks the signature over the header
fields, and L{sign} gives dkimpy's field generation our C{bh=}.

The canonicalizations (RFC 6376 3.4.3, 3.4.4) give exactly what dkimpy's do
for a body in CRLF form, as the SMTP server ensures (a bare LF dkimpy would
first turn into CRLF).
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Callable, Iterable

import dkim
from dkim.canonicalization import CanonicalizationPolicy, InvalidCanonicalizationPolicyError

# Read the body in pieces of this size.
BODY_CHUNK = 64 * 1024


# How the body was hashed: (body canonicalization, the a= tag, the l= tag).
HashKey = tuple[bytes, bytes, "int | None"]


def _compress(text: bytes) -> bytes:
    """
    Every run of spaces and tabs as one space (relaxed), by replacing
    rather than with a regular expression, which makes an object per run.
    """
    text = text.replace(b"\t", b" ")
    while b"  " in text:
        text = text.replace(b"  ", b" ")
    return text


class _Canonical:
    """
    One body canonicalization fed a piece at a time: whole lines are
    canonicalized and passed on; empty lines are held back until a line
    with content follows, since those at the end are dropped.
    """

    def __init__(self, relaxed: bool, out: Callable[[bytes], None]) -> None:
        self._relaxed = relaxed
        self._out = out
        self._rest = b""  # the line not yet ended
        self._empty_lines = 0
        self._any = False

    def feed(self, data: bytes) -> None:
        data = self._rest + data
        end = data.rfind(b"\r\n") + 2
        if end < 2:
            self._rest = data
            return
        lines, self._rest = data[:end], data[end:]
        if self._relaxed:  # and no space at the end of a line
            lines = _compress(lines).replace(b" \r\n", b"\r\n")
        # The lines are some with content, then `empty` empty ones.
        content = len(lines) - 2
        empty = 0
        while lines.endswith(b"\r\n", 0, content):
            content -= 2
            empty += 1
        if content == 0:
            self._empty_lines += empty + 1  # nothing but empty lines
            return
        self._emit(memoryview(lines)[: content + 2])
        self._empty_lines = empty

    def _emit(self, text) -> None:
        if self._empty_lines:
            self._out(b"\r\n" * self._empty_lines)
            self._empty_lines = 0
        self._out(text)
        self._any = True

    def end(self) -> None:
        rest = _compress(self._rest) if self._relaxed else self._rest
        if rest:
            self._emit(rest + b"\r\n")
        elif not self._any and not self._relaxed:
            self._out(b"\r\n")  # an empty body is one CRLF in simple, nothing in relaxed


class _Hash:
    """
    A hash of the canonical body, or of its first C{length} octets.
    """

    def __init__(self, algorithm: bytes, length: int | None) -> None:
        self._hash = dkim.HASH_ALGORITHMS[algorithm]()
        self._left = length

    def update(self, data) -> None:
        if self._left is not None:
            data = data[: self._left]
            self._left -= len(data)
        self._hash.update(data)

    def digest(self) -> bytes:
        return self._hash.digest()


def body_hashes(pieces: Iterable[bytes], wanted: Iterable[HashKey]) -> dict[HashKey, bytes]:
    """
    The digest of the body given as C{pieces} for each way of hashing it in
    C{wanted}, in one pass.
    """
    hashes = {key: _Hash(key[1], key[2]) for key in set(wanted)}
    if not hashes:
        return {}
    canonical = []
    for name in {key[0] for key in hashes}:
        targets = [h for key, h in hashes.items() if key[0] == name]

        def out(data, targets=targets) -> None:
            for target in targets:
                target.update(data)

        canonical.append(_Canonical(name == b"relaxed", out))
    for piece in pieces:
        for c in canonical:
            c.feed(piece)
    for c in canonical:
        c.end()
    return {key: h.digest() for key, h in hashes.items()}


def hash_key(tags: dict[bytes, bytes]) -> HashKey:
    """
    How a signature with these tags hashed the body.

    @raise ValueError: for a c=, a= or l= value dkimpy would refuse too.
    """
    try:
        policy = CanonicalizationPolicy.from_c_value(tags.get(b"c", b"simple/simple"))
    except InvalidCanonicalizationPolicyError as e:
        raise ValueError(f"invalid c= value: {e}") from None
    algorithm = tags.get(b"a", b"")
    if algorithm not in dkim.HASH_ALGORITHMS:
        raise ValueError(f"unknown signature algorithm: {algorithm!r}")
    length = None
    if b"l" in tags:
        length = int(tags[b"l"])
        if length < 0:
            raise ValueError("l= must not be negative")
    return policy.body_algorithm.name, algorithm, length


class HeaderVerifier(dkim.DKIM):
    """
    dkimpy's verifier given the header section only.  Before verifying, set
    C{body} (the body's pieces) and C{wanted} (how the signatures hash it,
    L{hash_key}): the body is read once, for all of them, when the first
    signature whose key was found needs its hash.
    """

    def __init__(self, head: bytes, **options) -> None:
        super().__init__(head + b"\r\n", **options)
        self.body: Iterable[bytes] = ()
        self.wanted: list[HashKey] = []
        self._hashes: dict[HashKey, bytes] | None = None

    def _body_hash(self, key: HashKey) -> bytes | None:
        if self._hashes is None:
            self._hashes = body_hashes(self.body, self.wanted)
        return self._hashes.get(key)

    def verify_sig_process(self, sig, include_headers, sig_header, dnsfunc):
        try:
            key = hash_key(sig)
        except ValueError:  # dkimpy refuses the signature in its own words
            return super().verify_sig_process(sig, include_headers, sig_header, dnsfunc)
        if b"bh" in sig:
            expected = base64.b64decode(re.sub(rb"\s+", b"", sig[b"bh"]))
            if self._body_hash(key) != expected:
                raise dkim.ValidationError("body hash mismatch")
            sig = {tag: value for tag, value in sig.items() if tag != b"bh"}
        return super().verify_sig_process(sig, include_headers, sig_header, dnsfunc)


def sign(
    head: bytes,
    body: Iterable[bytes],
    keys: list[tuple[bytes, bytes, bytes]],
    domain: bytes,
    include: list[bytes],
) -> list[bytes]:
    """
    A C{DKIM-Signature} field (relaxed/relaxed, with CRLF) per key in
    C{keys} (C{(selector, algorithm, private key)}), as dkimpy's C{sign}
    makes it, signing the fields named in C{include}.
    """
    hashes = body_hashes(body, [(b"relaxed", algorithm, None) for _, algorithm, _ in keys])
    include = [name.lower() for name in include]
    fields = []
    for selector, algorithm, private in keys:
        signer = dkim.DKIM(head + b"\r\n", signature_algorithm=algorithm, linesep=b"\r\n")
        forbidden = set(include) & signer.should_not_sign
        if forbidden or b"from" not in include:
            raise dkim.ParameterError(f"cannot sign {sorted(forbidden) or 'without From'}")
        signer.hasher = dkim.HASH_ALGORITHMS[algorithm]
        tags = [
            (b"v", b"1"),
            (b"a", algorithm),
            (b"c", b"relaxed/relaxed"),
            (b"d", domain),
            (b"i", b"@" + domain),
            (b"q", b"dns/txt"),
            (b"s", selector),
            (b"t", str(int(time.time())).encode("ascii")),
            (b"h", b" : ".join(include)),
            (b"bh", base64.b64encode(hashes[(b"relaxed", algorithm, None)])),
            (b"b", b"0" * 60),  # so b= is folded onto a line of its own
        ]
        value = signer.gen_header(
            tags, tuple(include), CanonicalizationPolicy.from_c_value(b"relaxed/relaxed"),
            b"DKIM-Signature", _private_key(algorithm, private),
        )
        fields.append(b"DKIM-Signature: " + value)
    return fields


def _private_key(algorithm: bytes, private: bytes):
    if algorithm == b"ed25519-sha256":
        import nacl.encoding
        import nacl.signing

        return nacl.signing.SigningKey(private, encoder=nacl.encoding.Base64Encoder)
    from dkim.crypto import parse_pem_private_key

    return parse_pem_private_key(private)
