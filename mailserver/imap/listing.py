"""
LIST and LSUB (RFC 3501 6.3.8-9, RFC 5258 LIST-EXTENDED, RFC 3348
CHILDREN, RFC 6154 SPECIAL-USE): which names a pattern matches and the
attributes each is listed with.  Pure: given the names that exist and the
subscribed ones.
"""

from __future__ import annotations

from collections.abc import Callable

from mailserver.imap.arguments import ListOptions
from mailserver.imap.responses import Untagged, mailbox
from mailserver.mailbox_names import INBOX, SEPARATOR, is_inbox

_SEP = SEPARATOR.encode("ascii")


def pattern(reference: str, text: str) -> Pattern:
    """
    The matcher for a reference and a pattern joined (C{*} matches
    anything, C{%} anything but the separator); INBOX matches in any case.
    """
    joined = reference + text if not text.startswith(SEPARATOR) or not reference else reference + text[1:]
    head, separator, rest = joined.partition(SEPARATOR)
    if is_inbox(head):
        joined = INBOX + separator + rest
    return Pattern(joined)


class Pattern:
    """
    A LIST pattern, matched by following every place in it a name may
    have reached at once: time in the pattern's length times the name's.
    (A regular expression of C{.*a.*a...b} backtracks for minutes on a
    short name, in the reactor thread.)
    """

    def __init__(self, text: str) -> None:
        tokens: list[str] = []
        for char in text:
            if char in "*%" and tokens and tokens[-1] in "*%":
                # Runs of wildcards match what their widest one matches.
                if char == "*":
                    tokens[-1] = "*"
                continue
            tokens.append(char)
        self._tokens = tokens
        # Each character that is not a wildcard takes one of the name's.
        self._least = sum(1 for token in tokens if token not in "*%")

    def _closure(self, places: set[int]) -> set[int]:
        tokens = self._tokens
        out = set(places)
        for place in places:
            while place < len(tokens) and tokens[place] in "*%":
                place += 1
                out.add(place)
        return out

    def match(self, name: str) -> bool:
        if len(name) < self._least:
            return False
        tokens = self._tokens
        end = len(tokens)
        places = self._closure({0})
        for char in name:
            following = set()
            for place in places:
                if place == end:
                    continue
                token = tokens[place]
                if token == "*" or (token == "%" and char != SEPARATOR):
                    following.add(place)
                elif token == char:
                    following.add(place + 1)
            if not following:
                return False
            places = self._closure(following)
        return end in places


def _parents(name: str) -> list[str]:
    levels = name.split(SEPARATOR)
    return [SEPARATOR.join(levels[:n]) for n in range(1, len(levels))]


def list_responses(
    names: list[str],
    subscribed: list[str],
    reference: str,
    patterns: list[str],
    options: ListOptions,
    special_use: Callable[[str], str | None],
    command: str = "LIST",
) -> list[Untagged]:
    """
    The untagged LIST (or LSUB) responses, INBOX first, then by name.
    """
    matchers = [pattern(reference, text) for text in patterns]
    existing = set(names)
    subscribed_set = set(subscribed)
    lsub = command == "LSUB"
    candidates = set(subscribed_set if (lsub or options.subscribed) else existing)
    implied: set[str] = set()
    for name in list(existing | (subscribed_set if lsub or options.subscribed else set())):
        for parent in _parents(name):
            if parent not in existing:
                implied.add(parent)
    if not (lsub or options.subscribed):
        candidates |= implied
    children_of = {parent for name in existing for parent in _parents(name)}
    subscribed_children = {parent for name in subscribed_set for parent in _parents(name)}
    out = []
    for name in sorted(candidates, key=lambda n: (n != INBOX, n)):
        if not any(m.match(name) for m in matchers):
            continue
        use = special_use(name) if name in existing else None
        if options.special_use and use is None:
            continue
        attributes = []
        if name not in existing:
            attributes.append("\\NonExistent" if options.extended else "\\Noselect")
        if not lsub:
            attributes.append("\\HasChildren" if name in children_of else "\\HasNoChildren")
        if options.return_subscribed and name in subscribed_set:
            attributes.append("\\Subscribed")
        if use is not None:  # always, as Dovecot does (RFC 6154 allows it)
            attributes.append(use)
        out.append(_response(command, attributes, name))
    if options.recursive and options.subscribed:
        for parent in sorted(subscribed_children - candidates):
            if any(m.match(parent) for m in matchers):
                attributes = [] if parent in existing else ["\\NonExistent"]
                out.append(Untagged(
                    _response(command, attributes, parent).data + b' ("CHILDINFO" ("SUBSCRIBED"))'
                ))
    if lsub and any(text.endswith("%") for text in patterns):
        # RFC 3501 6.3.9: a parent matched by a trailing % is listed too.
        for parent in sorted(subscribed_children - subscribed_set):
            if any(m.match(parent) for m in matchers):
                out.append(_response(command, ["\\Noselect"], parent))
    return out


def _response(command: str, attributes: list[str], name: str) -> Untagged:
    return Untagged(
        command.encode("ascii") + b" (" + " ".join(attributes).encode("ascii") + b') "'
        + _SEP + b'" ' + mailbox(name)
    )


def root_response() -> Untagged:
    """
    C{LIST "" ""}: the hierarchy separator and the root (RFC 3501 6.3.8).
    """
    return Untagged(b'LIST (\\Noselect) "' + _SEP + b'" ""')
