"""
LIST pattern matching (mailserver.imap.listing.pattern): what matches, and
that a pattern full of wildcards costs the reactor no more than its length
times the name's (a regular expression of ".*a.*a..." backtracks for
minutes on a 40-character name).
"""

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from mailserver.imap.listing import pattern


def _reference(text: str, name: str) -> bool:
    regex = "".join(".*" if c == "*" else "[^/]*" if c == "%" else re.escape(c) for c in text)
    return re.fullmatch(regex, name, re.DOTALL) is not None


@settings(max_examples=300, deadline=None)
@given(st.text("ab/*%", max_size=8), st.text("ab/", max_size=8))
def test_wildcards_match_as_rfc_3501_says(text, name):
    assert bool(pattern("", text).match(name)) == _reference(text, name)


def test_inbox_reference_and_cases():
    assert pattern("", "inbox").match("INBOX")
    assert pattern("Archive/", "%").match("Archive/2024")
    assert not pattern("Archive/", "%").match("Archive/2024/05")
    assert pattern("Archive/", "*").match("Archive/2024/05")
    assert not pattern("", "%").match("Archive/2024")


def test_many_wildcards_do_not_backtrack():
    text = "*a" * 2000 + "b"
    name = "a" * 200
    assert not pattern("", text).match(name)
    assert not pattern("", text.replace("*", "%")).match(name)
    assert pattern("", "*a" * 2000).match("a" * 2000)


def test_a_pattern_longer_than_the_name_is_refused_at_once():
    assert not pattern("", "%a" * 30000).match("a" * 200)
