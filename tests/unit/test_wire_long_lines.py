"""
long_line_in against the plain definition (split at each LF, measure each
line), on edge cases and on random texts of random line lengths.
"""

import random

import pytest

from mailserver.wire.long_lines import long_line_in


def by_split(text: bytes, limit: int, start: int = 0, end: int | None = None) -> bool:
    return max(map(len, text[start:end].split(b"\n"))) > limit


@pytest.mark.parametrize(
    "text, limit, expected",
    [
        (b"", 0, False),
        (b"\n", 0, False),
        (b"a", 0, True),
        (b"abc\n", 3, False),
        (b"abcd\n", 3, True),
        (b"abc\nabc\nabc", 3, False),
        (b"abc\nabc\nabcd", 3, True),  # the last line, without its LF
        (b"abcd\nabc\n", 3, True),  # the first
        (b"ab\r\n", 2, True),  # a CR is an octet of its line
        (b"a" * 998 + b"\n" + b"b" * 998, 998, False),
        (b"a" * 998 + b"\n" + b"b" * 999 + b"\n", 998, True),
    ],
)
def test_edges(text, limit, expected):
    assert long_line_in(text, limit) is expected
    assert by_split(text, limit) is expected


def test_agrees_with_splitting_on_random_texts():
    rng = random.Random(5321)
    for _ in range(3000):
        limit = rng.choice([0, 1, 2, 7, 76, 998])
        lines = [b"x" * rng.choice([0, 1, limit, limit + 1, rng.randrange(2 * limit + 3)])
                 for _ in range(rng.randrange(1, 30))]
        text = b"\n".join(lines) + rng.choice([b"", b"\n"])
        assert long_line_in(text, limit) == by_split(text, limit), (text, limit)
        # A part of the text, from a line start.
        starts = [0] + [i + 1 for i, c in enumerate(text) if c == 10]
        start = rng.choice(starts)
        end = rng.randrange(start, len(text) + 1)
        assert long_line_in(text, limit, start, end) == by_split(text, limit, start, end)
