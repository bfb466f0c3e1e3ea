"""
MIME structure in one pass, ENVELOPE and BODYSTRUCTURE.
"""

from hypothesis import given
from hypothesis import strategies as st

from mailserver.imap import mime
from mailserver.imap.structure import address_list, body_structure, envelope, parse_addresses

MULTIPART = (
    b"From: Bob <bob@example.org>\n"
    b"To: alice@example.org, \"Carol, C.\" <carol@example.net>\n"
    b"Subject: =?utf-8?q?hi?=\n"
    b"Content-Type: multipart/mixed; boundary=\"XX\"\n"
    b"\n"
    b"preamble\n"
    b"--XX\n"
    b"Content-Type: text/plain; charset=utf-8\n"
    b"\n"
    b"hello\n"
    b"world\n"
    b"--XX\n"
    b"Content-Type: message/rfc822\n"
    b"\n"
    b"Subject: inner\n"
    b"\n"
    b"inner body\n"
    b"--XX--\n"
    b"epilogue\n"
)


def crlf(data: bytes) -> bytes:
    return data.replace(b"\n", b"\r\n")


def section(data: bytes, start: int, end: int) -> bytes:
    return crlf(data)[start:end]


def test_parts_and_their_offsets():
    root = mime.parse_bytes(MULTIPART)
    wire = crlf(MULTIPART)
    assert root.body_end == len(wire)
    assert wire[root.body_start - 4 : root.body_start] == b"\r\n\r\n"
    text, message = root.children
    assert (text.type, text.subtype, text.params) == ("text", "plain", [("charset", "utf-8")])
    assert wire[text.body_start : text.body_end] == b"hello\r\nworld"
    assert text.body_lines == 2
    assert message.is_message
    inner = message.message
    assert wire[inner.start : inner.body_end] == b"Subject: inner\r\n\r\ninner body"
    assert MULTIPART[inner.body_start_lf : inner.body_end_lf] == b"inner body"
    assert root.find((2,)) is message
    assert root.find((2, 1)) is inner
    assert root.find((3,)) is None


def test_a_part_that_is_not_multipart_is_its_own_part_one():
    root = mime.parse_bytes(b"Subject: x\n\nbody\n")
    assert root.find((1,)) is root
    assert root.find((2,)) is None


def test_nested_boundaries_end_inner_parts():
    data = (
        b"Content-Type: multipart/mixed; boundary=outer\n\n"
        b"--outer\n"
        b"Content-Type: multipart/alternative; boundary=inner\n\n"
        b"--inner\n\nplain\n"
        b"--outer--\n"
    )
    root = mime.parse_bytes(data)
    (alternative,) = root.children
    (plain,) = alternative.children
    assert section(data, plain.body_start, plain.body_end) == b"plain"


def test_header_only_message():
    root = mime.parse_bytes(b"Subject: no body\n")
    assert root.body_size == 0
    assert root.field("subject") == b"no body"


def test_folded_header_fields():
    root = mime.parse_bytes(b"Subject: one\n two\nX: y\n\nb")
    assert root.field("subject") == b"one two"


def test_envelope():
    root = mime.parse_bytes(MULTIPART)
    assert envelope(root) == (
        b'(NIL "=?utf-8?q?hi?=" (("Bob" NIL "bob" "example.org")) (("Bob" NIL "bob" "example.org"))'
        b' (("Bob" NIL "bob" "example.org")) ((NIL NIL "alice" "example.org")'
        b'("Carol, C." NIL "carol" "example.net")) NIL NIL NIL NIL)'
    )


def test_groups_in_addresses():
    assert parse_addresses(b"undisclosed-recipients:;") == [(None, b"undisclosed-recipients", None), (None, None, None)]
    assert address_list(b"A: a@x, b@y;, c@z") == (
        b'((NIL NIL "A" NIL)(NIL NIL "a" "x")(NIL NIL "b" "y")(NIL NIL NIL NIL)(NIL NIL "c" "z"))'
    )


def test_body_structure():
    root = mime.parse_bytes(MULTIPART)
    structure = body_structure(root)
    assert structure.startswith(b'(("text" "plain" ("charset" "utf-8") NIL NIL "7bit" 12 2 NIL NIL NIL NIL)')
    assert b'("message" "rfc822" NIL NIL NIL "7bit" 28 (NIL "inner"' in structure
    assert structure.endswith(b' "mixed" ("boundary" "XX") NIL NIL NIL)')
    body = body_structure(root, extensible=False)
    assert body.endswith(b' "mixed")')


def test_default_content_type():
    root = mime.parse_bytes(b"Subject: x\n\nline\n")
    assert body_structure(root) == b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 6 1 NIL NIL NIL NIL)'


@given(st.lists(st.sampled_from([
    b"--b\n", b"--b--\n", b"\n", b"x\n", b"Content-Type: multipart/mixed; boundary=b\n",
    b"Content-Type: message/rfc822\n", b"--c\n", b"y",
]), max_size=30))
def test_any_lines_parse_into_consistent_offsets(lines):
    data = b"".join(lines)
    root = mime.parse_bytes(data)
    wire = crlf(data)

    def check(part, low, high):
        assert low <= part.start <= part.body_start <= part.body_end <= high
        assert part.body_start_lf <= part.body_end_lf <= len(data)
        # The two offsets name the same point.
        assert crlf(data[part.body_start_lf : part.body_end_lf]) == wire[part.body_start : part.body_end]
        for child in part.children:
            check(child, part.body_start, part.body_end)
        if part.message is not None:
            check(part.message, part.body_start, part.body_end)
        body_structure(part)

    check(root, 0, len(wire))


def test_a_comment_after_an_address_is_its_name():
    # As Dovecot and Cyrus give it: clients show the name from ENVELOPE.
    assert address_list(b"bbb@ddd.com (John X. Doe)") == b'(("John X. Doe" NIL "bbb" "ddd.com"))'
    assert address_list(b"Jo (work) <jo@x>, (c) a@y (Al)") == (
        b'(("Jo" NIL "jo" "x")("Al" NIL "a" "y"))'
    )
    assert address_list(b"A (x): a@x;") == b'((NIL NIL "A" NIL)(NIL NIL "a" "x")(NIL NIL NIL NIL))'


def test_addresses_follow_each_other_without_a_space():
    # RFC 3501 9: env-to = "(" 1*address ")"
    assert address_list(b"a@x, b@y") == b'((NIL NIL "a" "x")(NIL NIL "b" "y"))'


def test_an_empty_part_has_no_lines():
    # The CRLF before a boundary is the boundary's: an empty line there is
    # not the part's: a part of 0 octets has 0 lines, "a" and "a\r\n" 1.
    root = mime.parse_bytes(
        b"Content-Type: multipart/mixed; boundary=B\n\n"
        b"--B\nContent-Type: text/plain\n\n\n"
        b"--B\nContent-Type: text/plain\n\n\n\n"
        b"--B\nContent-Type: text/plain\n\na\n"
        b"--B\nContent-Type: text/plain\n\na\n\n"
        b"--B\nContent-Type: text/plain\n\n"
        b"--B--\n"
    )
    sizes = [(part.body_end - part.body_start, part.body_lines) for part in root.children]
    assert sizes == [(0, 0), (2, 1), (1, 1), (3, 1), (0, 0)]
