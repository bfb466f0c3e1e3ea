"""
The two errors of the configuration: L{Invalid} for one value, raised by a
kind's parser, and L{ConfigError}, the one line the user sees.
"""

from __future__ import annotations


class Invalid(ValueError):
    """
    A value its kind refuses; the message says what is wrong with it, and
    the loader adds the file and the key.
    """


class ConfigError(Exception):
    """
    A configuration problem, rendered as C{file: key: problem}.
    """

    def __init__(self, source: str, key: str, problem: str) -> None:
        # One line, whatever the file held: control characters are escaped.
        message = f"{source}: {key}: {problem}"
        super().__init__(
            "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in message)
        )
        self.source = source
        self.key = key
        self.problem = problem
