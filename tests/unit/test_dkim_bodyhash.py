"""
DKIM with the body read a piece at a time: the same canonical body and
hashes as dkimpy's for any body and any cutting into pieces, the same
signatures, the same verdicts, and memory that does not grow with the body.
"""

from __future__ import annotations

import hashlib
import tracemalloc

import dkim
import pytest
from dkim.canonicalization import CanonicalizationPolicy
from hypothesis import given, settings
from hypothesis import strategies as st

from mailserver.mailauth import bodyhash
from mailserver.mailauth.bodyhash import body_hashes, sign
from mailserver.mailauth.dns import DictDNS
from mailserver.mailauth.keys import generate, parse_key, txt_record
from mailserver.mailauth.verify import check_dkim

pytestmark = pytest.mark.filterwarnings("ignore::BytesWarning")  # dkimpy's logging

RSA = parse_key(generate("rsa"))
ED = parse_key(generate("ed25519"))
DNS = DictDNS({
    ("rsa._domainkey.x.test", "TXT"): [[txt_record(RSA).encode()]],
    ("ed._domainkey.x.test", "TXT"): [[txt_record(ED).encode()]],
})
HEAD = b"From: <a@x.test>\r\nTo: b@y.test\r\nSubject: s\r\n"

# Bodies as the SMTP server passes them on: every LF in a CRLF.
bodies = st.lists(
    st.sampled_from([b"a", b"bc", b" ", b"\t", b"  \t", b"\r\n", b"\r\n\r\n", b"\r"]), max_size=40
).map(b"".join)


def cut(body: bytes, points: list[int]) -> list[bytes]:
    edges = sorted({0, len(body), *(p % (len(body) + 1) for p in points)})
    return [body[a:b] for a, b in zip(edges, edges[1:])]


@settings(max_examples=400, deadline=None)
@given(body=bodies, points=st.lists(st.integers(0, 10_000), max_size=8),
       length=st.none() | st.integers(0, 60))
def test_the_canonical_body_hashes_as_dkimpys_however_it_is_cut(body, points, length):
    pieces = cut(body, points)
    keys = [(c, b"rsa-sha256", length) for c in (b"simple", b"relaxed")]
    hashes = body_hashes(iter(pieces), keys)
    for c, _, _ in keys:
        canonical = CanonicalizationPolicy.from_c_value(b"simple/" + c).canonicalize_body(body)
        if length is not None:
            canonical = canonical[:length]
        assert hashes[(c, b"rsa-sha256", length)] == hashlib.sha256(canonical).digest(), c


def dkimpy_signed(body: bytes, selector: bytes, key, c=b"relaxed/relaxed", length=False) -> bytes:
    return dkim.DKIM(HEAD + b"\r\n" + body, signature_algorithm=key.algorithm).sign(
        selector, b"x.test", key.private, include_headers=[b"from", b"subject"],
        canonicalize=tuple(c.split(b"/")), length=length,
    )


@pytest.mark.parametrize("c", [b"relaxed/relaxed", b"simple/simple", b"relaxed/simple"])
def test_signatures_made_by_dkimpy_verify_and_a_changed_body_fails(c):
    body = b"Hello  there \r\n\r\n.dots\t\r\n\r\n\r\n"
    head = dkimpy_signed(body, b"rsa", RSA, c) + dkimpy_signed(body, b"ed", ED, c) + HEAD
    pieces = [body[:7], body[7:8], body[8:]]
    assert [r.result for r in check_dkim(DNS, head, pieces)] == ["pass", "pass"]
    changed = check_dkim(DNS, head, [body.replace(b"there", b"where")])
    assert [(r.result, r.reason) for r in changed] == [("fail", "body hash did not verify")] * 2


def test_a_length_tag_signs_only_the_start_of_the_body():
    body = b"signed part\r\n"
    head = dkimpy_signed(body, b"rsa", RSA, length=True) + HEAD
    added = body + b"appended by a list\r\n"
    assert check_dkim(DNS, head, [added])[0].result == "pass"


def test_the_body_is_not_read_unless_a_signature_needs_it():
    def never():
        raise AssertionError("read")
        yield b""

    assert check_dkim(DNS, HEAD, never()) == ()
    unknown = dkimpy_signed(b"x\r\n", b"gone", RSA) + HEAD  # no key published
    assert check_dkim(DNS, unknown, never())[0].result == "permerror"


@pytest.mark.parametrize("key, selector", [(RSA, b"rsa"), (ED, b"ed")])
def test_signatures_are_dkimpys_byte_for_byte(monkeypatch, key, selector):
    monkeypatch.setattr(dkim.time, "time", lambda: 1_700_000_000)
    monkeypatch.setattr(bodyhash.time, "time", lambda: 1_700_000_000)
    body = b"Hi \t there\r\n\r\n"
    include = [b"from", b"subject", b"to", b"from"]
    expected = dkim.DKIM(HEAD + b"\r\n" + body, signature_algorithm=key.algorithm,
                         linesep=b"\r\n").sign(
        selector, b"x.test", key.private, canonicalize=(b"relaxed", b"relaxed"),
        include_headers=include,
    )
    (field,) = sign(HEAD, [body[:3], body[3:]], [(selector, key.algorithm, key.private)],
                    b"x.test", include)
    assert field == expected
    with pytest.raises(dkim.ParameterError):
        sign(HEAD, [body], [(selector, key.algorithm, key.private)], b"x.test", [b"received"])


def _traced_peak(work) -> int:
    tracemalloc.start()
    try:
        work()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_checking_and_signing_take_no_more_memory_for_a_larger_body(tmp_path):
    line = b"Lorem ipsum dolor sit amet,  consectetur\t adipiscing elit. " * 12 + b"\r\n"

    def body_file(mib: int):
        path = tmp_path / f"{mib}"
        path.write_bytes(line * (mib * 1024 * 1024 // len(line)))

        def pieces():
            with open(path, "rb") as f:
                while piece := f.read(bodyhash.BODY_CHUNK):
                    yield piece

        return pieces

    small, large = body_file(1), body_file(8)
    keys = [(b"rsa", RSA.algorithm, RSA.private)]
    fields = {pieces: sign(HEAD, pieces(), keys, b"x.test", [b"from"])[0] for pieces in (small, large)}
    results = []
    peaks = [
        _traced_peak(lambda: results.extend(check_dkim(DNS, fields[pieces] + HEAD, pieces())))
        for pieces in (small, large)
    ]
    peaks.append(_traced_peak(lambda: sign(HEAD, large(), keys, b"x.test", [b"from"])))
    assert [r.result for r in results] == ["pass", "pass"]
    # A few pieces at a time (dkimpy alone held several copies of the body).
    assert max(peaks) < 16 * bodyhash.BODY_CHUNK, peaks
    assert abs(peaks[1] - peaks[0]) < 4 * bodyhash.BODY_CHUNK, peaks
