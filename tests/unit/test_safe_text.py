"""
The one helper for client text in logs and headers.
"""

import pytest

from mailserver.safe_text import DEFAULT_LIMIT, printable


@pytest.mark.parametrize(
    "character",
    ["\r", "\n", "\t", "\x00", "\x1b", "\x7f", "\x85", "\x9b", "\u2028", "\u2029", "\u202e",
     "\u2066", "\u200f", "\ufeff", "\udc80", "\U000e0001"],
)
def test_unprintable_characters_become_question_marks(character):
    assert printable(f"a{character}b") == "a?b"


def test_printable_text_is_kept_and_bounded():
    assert printable("jürgen@bücher.example (x) <y>") == "jürgen@bücher.example (x) <y>"
    assert printable("x" * 1000) == "x" * DEFAULT_LIMIT
    assert printable("x" * 1000, None) == "x" * 1000
