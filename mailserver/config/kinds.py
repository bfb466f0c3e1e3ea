"""
Kinds of configuration value: what the TOML file must give for a key, and
the typed value the server gets from it.

A L{Kind} checks the TOML type, then converts: a duration such as C{"5m"}
becomes seconds, C{"host:port"} a L{mailserver.config.values.HostPort}, a
word from a fixed set an enumeration member.  Each conversion happens once,
when the file is loaded; the server never parses a configuration string
again.  A refused value raises L{Invalid} with a short message; the loader
names the file and the key.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from mailserver.config.errors import Invalid

LIMIT = 2**63 - 1
FINITE = "must be a finite number less than 2**63"

_TYPE_PROBLEMS = {
    bool: "must be true or false",
    int: "must be an integer",
    float: "must be a number",
    str: "must be a string",
    list: "must be a list of strings",
}


def shown(value: object, width: int = 60) -> str:
    """
    C{repr(value)}, cut short: a problem line stays short whatever the
    file held.
    """
    text = repr(value)
    return text if len(text) <= width else text[: width - 4] + "...'"


@dataclass(frozen=True)
class Kind:
    """
    @ivar file_type: what the file gives: C{bool}, C{int}, C{float} (an
        integer is accepted too), C{str} or C{list} (of strings).
    @ivar convert: the file's value, of C{file_type}, to the typed value;
        raises L{Invalid}.
    """

    file_type: type
    convert: Callable[[Any], Any]

    def parse(self, raw: object) -> Any:
        """
        @raise Invalid: the value is of the wrong type or refused.
        """
        expected = self.file_type
        if expected is float:
            ok = isinstance(raw, (int, float)) and not isinstance(raw, bool)
        elif expected is int:
            ok = isinstance(raw, int) and not isinstance(raw, bool)
        elif expected is list:
            ok = isinstance(raw, list) and all(isinstance(v, str) for v in raw)
        else:
            ok = isinstance(raw, expected)
        if not ok:
            raise Invalid(_TYPE_PROBLEMS[expected])
        if any("\0" in v for v in (raw if expected is list else [raw]) if isinstance(v, str)):
            raise Invalid("must not contain NUL characters")
        return self.convert(raw)


def _bounds(value: float, minimum: float, maximum: float, why: str = "") -> None:
    why = f" ({why})" if why else ""
    if value < minimum:
        raise Invalid("must not be negative" if minimum == 0 else f"must be at least {minimum}{why}")
    if value > maximum:
        raise Invalid("must be less than 2**63" if maximum == LIMIT else f"must be at most {maximum}")


def flag() -> Kind:
    return Kind(bool, lambda value: value)


def integer(minimum: int = 0, maximum: int = LIMIT, why: str = "") -> Kind:
    def convert(value: int) -> int:
        _bounds(value, minimum, maximum, why=why)
        return value

    return Kind(int, convert)


def number(minimum: float = 0.0, maximum: float = LIMIT, why: str = "") -> Kind:
    """
    A number of seconds, or any other real number; nan, infinities and
    numbers too large to wait for are refused.
    """

    def convert(value: float) -> float:
        if not value < 2**63 or (isinstance(value, float) and math.isnan(value)):
            raise Invalid(FINITE)
        _bounds(value, minimum, maximum, why=why)
        return float(value)

    return Kind(float, convert)


def text(check: Callable[[str], Any] | None = None) -> Kind:
    """
    A string, converted by C{check} when given (which raises L{Invalid}).
    """
    return Kind(str, check or (lambda value: value))


def choice(options: type[enum.StrEnum]) -> Kind:
    names = [f'"{member.value}"' for member in options]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]

    def convert(value: str) -> enum.StrEnum:
        try:
            return options(value)
        except ValueError:
            raise Invalid(f"must be {listed}") from None

    return Kind(str, convert)


_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_DURATION = 3650 * 86400.0


def seconds(text_value: str, minimum: float = 1.0) -> float:
    """
    C{"90"}, C{"90s"}, C{"5m"}, C{"4h"}, C{"1.5d"} to seconds.

    @raise Invalid: anything else, or a duration shorter than C{minimum}
        seconds or longer than ten years.
    """
    match = _DURATION.fullmatch(text_value)
    if not match:
        raise Invalid(f"{shown(text_value)} is not a duration like 30s, 5m, 4h or 5d")
    value = float(match.group(1)) * _UNITS[match.group(2)]
    if value < minimum:
        raise Invalid(f"{shown(text_value)} must be at least {minimum:g}s")
    if not value <= MAX_DURATION:  # also the infinity of 400 nines
        raise Invalid(f"{shown(text_value)} must be at most 3650d")
    return value


def duration(minimum: float = 1.0, optional: bool = False) -> Kind:
    """
    A duration string, in seconds; with C{optional}, C{""} is C{None}.
    """

    def convert(value: str) -> float | None:
        if optional and not value:
            return None
        return seconds(value, minimum)

    return Kind(str, convert)


def listing(
    item: Kind,
    *,
    unique: Callable[[Any], Hashable] | None = None,
    at_least_one: str = "",
) -> Kind:
    """
    A list of strings, each converted by C{item} (a L{text} kind), into a
    tuple.

    @param unique: the identity of an entry; two entries with the same one
        are refused.
    @param at_least_one: the problem when the list is empty (default: an
        empty list is fine).
    """

    def convert(values: list[str]) -> tuple:
        if at_least_one and not values:
            raise Invalid(at_least_one)
        converted = []
        seen = set()
        for value in values:
            try:
                entry = item.convert(value)
            except Invalid as e:
                problem = str(e)
                prefix = shown(value)
                raise Invalid(problem if prefix in problem else f"{prefix}: {problem}") from None
            if unique is not None:
                identity = unique(entry)
                if identity in seen:
                    raise Invalid(f"{shown(value)} is listed twice")
                seen.add(identity)
            converted.append(entry)
        return tuple(converted)

    return Kind(list, convert)
