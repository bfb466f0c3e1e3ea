"""
The aliases file: C{alias@domain: target[, target...]} per line, C{#}
starts a comment.  An alias with several targets is a mailing list; a
target in a foreign domain forwards there.

Parsing reports every line it cannot use (L{LineProblem}): no colon, an
alias that is not an address of a local domain, a target that is not an
address, an alias given twice (the first line counts, as Postfix's
C{postalias} keeps the first).  The good targets of a line with a bad one
still count, so a typo loses no other member's mail.

L{AliasesFile} is what C{mailserver alias add/del/list} edits: it changes
only the lines of the alias it is given, so comments and every other line
stay as they were, and writes the file atomically.
"""

from __future__ import annotations

from pathlib import Path

from mailserver.address_files import (
    LineProblem,
    Parsed,
    address_problem,
    content_lines,
    write_atomically,
)

Aliases = dict[str, tuple[str, ...]]

# Targets other mail servers accept in an aliases file, which deliver to
# programs or files: never here.
_UNSUPPORTED = ("|", "/", ":include:")


class AliasError(ValueError):
    """
    A change to the aliases file that cannot be made, with a message for
    the user.
    """


def _domain(address: str) -> str:
    return address.rpartition("@")[2].rstrip(".")


def _canonical(address: str) -> str:
    local, _, domain = address.rpartition("@")
    return f"{local}@{domain.rstrip('.')}".lower()


def alias_problem(alias: str, local_domains: tuple[str, ...]) -> str | None:
    """
    Why C{alias} cannot be an alias here, or C{None}.
    """
    if alias.startswith("@"):
        return (f"{alias!r}: a whole domain cannot be an alias (smtp.catch_all sends a "
                "local domain's unknown users to one account)")
    problem = address_problem(alias)
    if problem:
        return problem
    if _domain(alias).lower() not in local_domains:
        return f"{alias!r}: {_domain(alias)} is not one of local_domains"
    return None


def target_problem(target: str) -> str | None:
    if target.startswith(_UNSUPPORTED):
        return f"target {target!r}: programs, files and :include: are not supported"
    problem = address_problem(target)
    return f"target {problem}" if problem else None


def parse_aliases(text: str, path: Path, local_domains: tuple[str, ...]) -> Parsed[Aliases]:
    aliases, problems, _ = _parse(text, path, local_domains)
    return aliases, problems


def _parse(
    text: str, path: Path, local_domains: tuple[str, ...]
) -> tuple[Aliases, list[LineProblem], dict[str, int]]:
    """
    L{parse_aliases}, and the line number of each alias.
    """
    aliases: Aliases = {}
    first_line: dict[str, int] = {}
    problems = []
    for number, line in content_lines(text):
        def bad(problem: str) -> None:
            problems.append(LineProblem(path, number, problem))

        alias, colon, targets = line.partition(":")
        alias = alias.strip()
        if not colon:
            bad(f"no colon: {line[:60]!r} (write alias@domain: target[, target...])")
            continue
        problem = alias_problem(alias, local_domains)
        if problem:
            bad(problem)
            continue
        alias = _canonical(alias)
        if alias in first_line:
            bad(f"{alias} is an alias already, on line {first_line[alias]} (that line counts)")
            continue
        members = []
        for target in (t.strip() for t in targets.split(",")):
            if not target:
                continue
            problem = target_problem(target)
            if problem:
                bad(f"{alias}: {problem}")
            elif _canonical(target) not in members:
                members.append(_canonical(target))
        if not members:
            if not targets.strip():
                bad(f"{alias} has no targets")
            continue
        aliases[alias] = tuple(members)
        first_line[alias] = number
    return aliases, problems, first_line


def _format(alias: str, targets: tuple[str, ...] | list[str]) -> str:
    return f"{alias}: {', '.join(targets)}"


class AliasesFile:
    """
    The aliases file as C{mailserver alias} edits it.
    """

    def __init__(self, path: Path, local_domains: tuple[str, ...]) -> None:
        self.path = path
        self.local_domains = local_domains

    def read(self) -> Parsed[Aliases]:
        return parse_aliases(self._text(), self.path, self.local_domains)

    def _text(self) -> str:
        try:
            return self.path.read_text("utf-8")
        except FileNotFoundError:
            return ""

    def add(self, alias: str, targets: list[str]) -> tuple[str, ...]:
        """
        Make C{alias} deliver to C{targets} too (a new alias, or new members
        of an existing one).  Returns its targets now.
        """
        problem = alias_problem(alias, self.local_domains)
        if problem:
            raise AliasError(problem)
        if not targets:
            raise AliasError("give at least one target")
        for target in targets:
            problem = target_problem(target)
            if problem:
                raise AliasError(problem)
        alias = _canonical(alias)
        text = self._text()
        lines = text.splitlines()
        aliases, _, line_of = _parse(text, self.path, self.local_domains)
        current = list(aliases.get(alias, ()))
        added = [t for t in dict.fromkeys(map(_canonical, targets)) if t not in current]
        if not added:
            raise AliasError(f"{alias} delivers to {', '.join(targets)} already")
        if alias in line_of:
            lines[line_of[alias] - 1] = _format(alias, current + added)
        else:
            lines.append(_format(alias, added))
        write_atomically(self.path, "".join(line + "\n" for line in lines))
        return tuple(current + added)

    def remove(self, alias: str, targets: list[str]) -> tuple[str, ...]:
        """
        Remove C{targets} from C{alias}, or the whole alias when none are
        given (or none are left).  Returns its remaining targets.
        """
        alias = _canonical(alias)
        text = self._text()
        lines = text.splitlines()
        aliases, _, line_of = _parse(text, self.path, self.local_domains)
        if alias not in aliases:
            raise AliasError(f"no such alias: {alias}")
        index = line_of[alias] - 1
        current = list(aliases[alias])
        gone = [_canonical(t) for t in targets]
        missing = [t for t in gone if t not in current]
        if missing:
            raise AliasError(f"{alias} does not deliver to {', '.join(missing)}")
        left = [t for t in current if t not in gone] if targets else []
        if left:
            lines[index] = _format(alias, left)
        else:
            del lines[index]
        write_atomically(self.path, "".join(line + "\n" for line in lines))
        return tuple(left)

    def listing(self) -> list[str]:
        aliases, _ = self.read()
        return [_format(alias, targets) for alias, targets in sorted(aliases.items())]
