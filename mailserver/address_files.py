"""
The files of addresses the running server reads (users, aliases, the relay
domains' recipients): each is parsed again whenever it changes, into its
value and one L{LineProblem} per line that could not be used, and the
console script rewrites them atomically.

A bad line is skipped, never fatal: the server keeps serving the good ones
and says which line is wrong (in its log, and through C{mailserver
check-config}, which exits non-zero).
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from mailserver.names import host_name_problem

T = TypeVar("T")

# What a local part may hold in these files: no space, control character or @.
_LOCAL_PART = re.compile(r"[^\x00-\x20\x7f@,:]+")


@dataclass(frozen=True)
class LineProblem:
    """
    Line C{line} of C{path} could not be used, because of C{problem}.
    """

    path: Path
    line: int
    problem: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.problem}"


Parsed = tuple[T, list[LineProblem]]


def content_lines(text: str) -> Iterator[tuple[int, str]]:
    """
    C{(line number, stripped line)} of every line that is neither empty
    nor a C{#} comment.
    """
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            yield number, line


def address_problem(address: str) -> str | None:
    """
    Why C{address} is not a C{user@domain} address, or C{None}.
    """
    local, at, domain = address.rpartition("@")
    if not at or not local:
        return f"{address!r} is not an address (user@domain)"
    if not _LOCAL_PART.fullmatch(local):
        return f"{address!r}: the user part holds a space, a control character, ',' or ':'"
    problem = host_name_problem(domain.rstrip("."))
    if problem:
        return f"{address!r}: the domain {problem}"
    return None


class WatchedFile(Generic[T]):
    """
    A file parsed again whenever its mtime or size changes; a missing file
    is an empty one.

    @param parse: the file's text and path to its value and problems.
    @param on_parsed: told the problems each time a new version is parsed
        (the server logs them).
    """

    def __init__(
        self,
        path: Path,
        parse: Callable[[str, Path], Parsed[T]],
        on_parsed: Callable[[Path, list[LineProblem]], None] | None = None,
    ) -> None:
        self.path = path
        self._parse = parse
        self._on_parsed = on_parsed
        self._stamp: tuple[int, int] | None = None
        self._value, self.problems = parse("", path)

    def forget(self) -> None:
        """
        Read the file again at the next L{get}, even if it looks unchanged.
        """
        self._stamp = (-1, -1)

    def get(self) -> T:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp != self._stamp:
            text = self.path.read_text("utf-8", errors="replace") if stamp else ""
            self._value, self.problems = self._parse(text, self.path)
            self._stamp = stamp
            if self._on_parsed is not None:
                self._on_parsed(self.path, self.problems)
        return self._value


def write_atomically(path: Path, text: str) -> None:
    """
    Replace C{path} with C{text}: written and synced under a temporary
    name, then renamed, so a reader sees the old file or the new one.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)  # the data folder, often
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
