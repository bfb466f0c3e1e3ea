"""
The arguments of the commands that have a grammar of their own: FETCH's
items (RFC 3501 6.4.5, with BODY[section]<partial>), SEARCH's keys (6.4.4),
STORE's action (6.4.6), STATUS's items (6.3.10) and LIST's options
(RFC 5258 LIST-EXTENDED, RFC 6154 SPECIAL-USE).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mailserver.imap.grammar import (
    NIL,
    Atom,
    ParseError,
    SequenceSet,
    String,
    astring,
    date,
    flag_list,
    number,
    sequence_set,
)


@dataclass(frozen=True, slots=True)
class Section:
    """
    A BODY[] section: C{part} is the part's numbers (empty: the message),
    C{kind} one of C{""}, C{HEADER}, C{HEADER.FIELDS}, C{HEADER.FIELDS.NOT},
    C{TEXT}, C{MIME}.
    """

    part: tuple[int, ...] = ()
    kind: str = ""
    fields: tuple[str, ...] = ()

    def spec(self) -> str:
        """
        The section as a response names it.
        """
        text = ".".join(str(n) for n in self.part)
        if self.kind:
            text = f"{text}.{self.kind}" if text else self.kind
        if self.fields:
            text += " (" + " ".join(field.upper() for field in self.fields) + ")"
        return text


@dataclass(frozen=True, slots=True)
class BodyItem:
    """
    A fetch of message text: BODY[...], BODY.PEEK[...] or an RFC822 item.

    @ivar name: how the response names it (C{"BODY[TEXT]<0>"}, C{"RFC822"}).
    @ivar partial: (first octet, most octets) or C{None}.
    """

    section: Section
    peek: bool
    partial: tuple[int, int] | None
    name: str


# The items, as FETCH names them; body items are BodyItems.
SIMPLE_ITEMS = frozenset(
    {"UID", "FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY", "BODYSTRUCTURE"}
)
_MACROS = {
    "ALL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"),
    "FAST": ("FLAGS", "INTERNALDATE", "RFC822.SIZE"),
    "FULL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"),
}
_BODY_ITEM = re.compile(r"^(BODY|BODY\.PEEK|BINARY|BINARY\.PEEK)\[([^\]]*)\](?:<(\d+)\.(\d+)>)?$", re.I)
_SECTION_PART = re.compile(r"^(\d+(?:\.\d+)*)(?:\.(.*))?$")
_SECTION_KINDS = ("HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT", "MIME")


def _section(text: str) -> Section:
    fields: tuple[str, ...] = ()
    head, space, rest = text.partition(" ")
    if space:
        if not (rest.startswith("(") and rest.endswith(")")):
            raise ParseError("Invalid header field list")
        fields = tuple(rest[1:-1].split())
        if not fields or any(not f.isascii() or not f.isprintable() or ":" in f for f in fields):
            raise ParseError("Invalid header field list")
    part: tuple[int, ...] = ()
    kind = head.upper()
    match = _SECTION_PART.match(head)
    if match:
        numbers = match.group(1).split(".")
        if any(n == "0" or len(n) > 6 for n in numbers):
            raise ParseError("Invalid section part")
        part = tuple(int(n) for n in numbers)
        kind = (match.group(2) or "").upper()
    if kind not in ("", *_SECTION_KINDS):
        raise ParseError("Invalid section")
    if kind == "MIME" and not part:
        raise ParseError("MIME needs a part number")
    if bool(fields) != kind.startswith("HEADER.FIELDS"):
        raise ParseError("Invalid section")
    return Section(part, kind, fields)


def _body_item(text: str) -> BodyItem | None:
    match = _BODY_ITEM.match(text)
    if match is None:
        return None
    verb = match.group(1).upper()
    if verb.startswith("BINARY"):
        raise ParseError("BINARY is not supported")
    section = _section(match.group(2))
    partial = None
    name = f"BODY[{section.spec()}]"
    if match.group(3) is not None:
        start, length = int(match.group(3)), int(match.group(4))
        if length == 0 or len(match.group(3)) > 10 or len(match.group(4)) > 10:
            raise ParseError("Invalid partial")
        partial = (start, length)
        name += f"<{start}>"
    return BodyItem(section, verb == "BODY.PEEK", partial, name)


_RFC822_ITEMS = {
    "RFC822": BodyItem(Section(), False, None, "RFC822"),
    "RFC822.HEADER": BodyItem(Section((), "HEADER"), True, None, "RFC822.HEADER"),
    "RFC822.TEXT": BodyItem(Section((), "TEXT"), False, None, "RFC822.TEXT"),
}


# Parsed item lists by their text: a client sends the same few for every
# message.
_PARSED_ITEMS: dict[tuple[str, ...], list] = {}
_MAX_PARSED_ITEMS = 256


def fetch_items(value) -> list[str | BodyItem]:
    """
    FETCH's items: a macro, one item, or a list of items.
    """
    values = value if isinstance(value, list) else [value]
    if all(isinstance(item, Atom) for item in values):
        key = (str(isinstance(value, list)), *values)
        parsed = _PARSED_ITEMS.get(key)
        if parsed is None:
            parsed = _fetch_items(value)
            if len(_PARSED_ITEMS) < _MAX_PARSED_ITEMS:
                _PARSED_ITEMS[key] = parsed
        return list(parsed)
    return _fetch_items(value)


def _fetch_items(value) -> list[str | BodyItem]:
    if isinstance(value, Atom) and value.upper() in _MACROS:
        return list(_MACROS[value.upper()])
    values = value if isinstance(value, list) else [value]
    if not values:
        raise ParseError("Empty fetch item list")
    items: list[str | BodyItem] = []
    for item in values:
        if not isinstance(item, Atom):
            raise ParseError("Invalid fetch item")
        upper = item.upper()
        if upper in SIMPLE_ITEMS:
            items.append(upper)
        elif upper in _RFC822_ITEMS:
            items.append(_RFC822_ITEMS[upper])
        else:
            body = _body_item(str(item))
            if body is None:
                raise ParseError(f"Unknown fetch item {str(item)[:40]}")
            items.append(body)
    # An item named twice is answered once: a line of "BODYSTRUCTURE ..."
    # would otherwise ask for thousands of copies of a large structure.
    return list(dict.fromkeys(items))


# STORE.


@dataclass(frozen=True)
class StoreAction:
    mode: str  # "", "+" or "-"
    silent: bool
    flags: tuple[str, ...]


def store_action(item, value) -> StoreAction:
    if not isinstance(item, Atom):
        raise ParseError("Invalid STORE item")
    text = item.upper()
    mode = text[0] if text[:1] in "+-" and text else ""
    text = text[len(mode) :]
    silent = text.endswith(".SILENT")
    if (text[: -len(".SILENT")] if silent else text) != "FLAGS":
        raise ParseError("Invalid STORE item")
    return StoreAction(mode, silent, tuple(flag_list(value)))


# STATUS.

STATUS_ITEMS = ("MESSAGES", "RECENT", "UIDNEXT", "UIDVALIDITY", "UNSEEN")


def status_items(value) -> list[str]:
    if not isinstance(value, list) or not value:
        raise ParseError("Invalid status items")
    items = []
    for item in value:
        if not isinstance(item, Atom) or item.upper() not in STATUS_ITEMS:
            raise ParseError("Invalid status item")
        items.append(item.upper())
    return items


# LIST (RFC 5258).


@dataclass(frozen=True)
class ListOptions:
    subscribed: bool = False
    recursive: bool = False
    special_use: bool = False
    return_subscribed: bool = False
    return_children: bool = False
    return_special_use: bool = False
    extended: bool = False


def list_arguments(args: tuple) -> tuple[ListOptions, object, list]:
    """
    LIST's arguments: the options, the reference and the patterns.
    """
    args = list(args)
    selection: list = []
    extended = False
    if args and isinstance(args[0], list):
        selection = args.pop(0)
        extended = True
    if len(args) < 2:
        raise ParseError("LIST needs a reference and a mailbox pattern")
    reference, patterns = args[0], args[1]
    rest = args[2:]
    returns: list = []
    if rest:
        if len(rest) != 2 or not isinstance(rest[0], Atom) or rest[0].upper() != "RETURN":
            raise ParseError("Invalid LIST arguments")
        if not isinstance(rest[1], list):
            raise ParseError("Invalid LIST return options")
        returns = rest[1]
        extended = True
    patterns = patterns if isinstance(patterns, list) else [patterns]
    if not patterns:
        raise ParseError("Missing mailbox pattern")
    chosen = {str(o).upper() for o in selection if isinstance(o, Atom)}
    wanted = {str(o).upper() for o in returns if isinstance(o, Atom)}
    if len(chosen) != len(selection) or len(wanted) != len(returns):
        raise ParseError("Invalid LIST options")
    unknown = chosen - {"SUBSCRIBED", "REMOTE", "RECURSIVEMATCH", "SPECIAL-USE"}
    unknown |= wanted - {"SUBSCRIBED", "CHILDREN", "SPECIAL-USE"}
    if unknown:
        raise ParseError(f"Unknown LIST option {sorted(unknown)[0]}")
    if "RECURSIVEMATCH" in chosen and not chosen & {"SUBSCRIBED", "SPECIAL-USE"}:
        raise ParseError("RECURSIVEMATCH needs another selection option")
    options = ListOptions(
        subscribed="SUBSCRIBED" in chosen,
        recursive="RECURSIVEMATCH" in chosen,
        special_use="SPECIAL-USE" in chosen,
        return_subscribed="SUBSCRIBED" in wanted or "SUBSCRIBED" in chosen,
        return_children="CHILDREN" in wanted,
        return_special_use="SPECIAL-USE" in wanted or "SPECIAL-USE" in chosen,
        extended=extended,
    )
    return options, reference, patterns


# SEARCH.

_FLAG_KEYS = {
    "ANSWERED": ("\\Answered", True), "UNANSWERED": ("\\Answered", False),
    "DELETED": ("\\Deleted", True), "UNDELETED": ("\\Deleted", False),
    "DRAFT": ("\\Draft", True), "UNDRAFT": ("\\Draft", False),
    "FLAGGED": ("\\Flagged", True), "UNFLAGGED": ("\\Flagged", False),
    "SEEN": ("\\Seen", True), "UNSEEN": ("\\Seen", False),
}
_HEADER_KEYS = ("BCC", "CC", "FROM", "SUBJECT", "TO")
_DATE_KEYS = ("BEFORE", "ON", "SINCE", "SENTBEFORE", "SENTON", "SENTSINCE")


def search_keys(args: tuple) -> tuple[str | None, list]:
    """
    SEARCH's charset (or C{None}) and keys, as nested tuples:
    C{("ALL",)}, C{("SEQ", set)}, C{("UID", set)}, C{("FLAG", flag, present)},
    C{("RECENT", present)}, C{("NEW",)}, C{("HEADER", field, text)},
    C{("BODY", text)}, C{("TEXT", text)}, C{("DATE", key, (y, m, d))},
    C{("LARGER", n)}, C{("SMALLER", n)}, C{("NOT", key)},
    C{("OR", key, key)}, C{("AND", [keys])}.
    """
    items = list(args)
    charset = None
    if len(items) >= 2 and isinstance(items[0], Atom) and items[0].upper() == "CHARSET":
        charset = astring(items[1]).decode("ascii", "replace").upper()
        items = items[2:]
    if not items:
        raise ParseError("Missing search key")
    keys = []
    while items:
        keys.append(_search_key(items))
    return charset, keys


# How deep NOT, OR and parentheses may nest in SEARCH: keys are parsed
# and matched recursively, and a line of "NOT NOT ..." must be a BAD, not
# a RecursionError.
MAX_SEARCH_DEPTH = 64


def _text(items: list) -> str:
    if not items:
        raise ParseError("Missing search argument")
    value = items.pop(0)
    if value is NIL:
        raise ParseError("Invalid search argument")
    return astring(value).decode("utf-8", "replace")


def _search_key(items: list, depth: int = 0):
    if depth >= MAX_SEARCH_DEPTH:
        raise ParseError("Search keys nested too deeply")
    value = items.pop(0)
    if isinstance(value, list):
        if not value:
            raise ParseError("Empty search key list")
        inner = list(value)
        keys = []
        while inner:
            keys.append(_search_key(inner, depth + 1))
        return ("AND", keys)
    if not isinstance(value, Atom):
        raise ParseError("Invalid search key")
    key = value.upper()
    if key == "ALL":
        return ("ALL",)
    if key[:1].isdigit() or key[:1] == "*":
        return ("SEQ", sequence_set(value))
    if key in _FLAG_KEYS:
        flag, present = _FLAG_KEYS[key]
        return ("FLAG", flag, present)
    if key in ("KEYWORD", "UNKEYWORD"):
        flags = flag_list(items.pop(0)) if items else []
        if len(flags) != 1:
            raise ParseError("Missing keyword")
        return ("FLAG", flags[0], key == "KEYWORD")
    if key in ("RECENT", "OLD"):
        return ("RECENT", key == "RECENT")
    if key == "NEW":
        return ("NEW",)
    if key == "UID":
        if not items:
            raise ParseError("Missing UID set")
        return ("UID", sequence_set(items.pop(0)))
    if key in _HEADER_KEYS:
        return ("HEADER", key, _text(items))
    if key == "HEADER":
        field = _text(items)
        return ("HEADER", field.upper(), _text(items))
    if key in ("BODY", "TEXT"):
        return (key, _text(items))
    if key in _DATE_KEYS:
        if not items:
            raise ParseError("Missing date")
        return ("DATE", key, date(items.pop(0)))
    if key in ("LARGER", "SMALLER"):
        if not items:
            raise ParseError("Missing size")
        return (key, number(items.pop(0)))
    if key == "NOT":
        if not items:
            raise ParseError("Missing search key after NOT")
        return ("NOT", _search_key(items, depth + 1))
    if key == "OR":
        if len(items) < 2:
            raise ParseError("OR needs two search keys")
        first = _search_key(items, depth + 1)
        if not items:
            raise ParseError("OR needs two search keys")
        return ("OR", first, _search_key(items, depth + 1))
    raise ParseError(f"Unknown search key {key[:30]}")


__all__ = [
    "BodyItem", "ListOptions", "Section", "SequenceSet", "StoreAction", "String",
    "fetch_items", "list_arguments", "search_keys", "status_items", "store_action",
]
