"""
Parsed message structures, kept for every session of the process: a
client that fetches ENVELOPE, BODYSTRUCTURE or header fields of a folder
(as every client does on its first look, and again on each new message)
has each message parsed once, not at each fetch.

Messages are immutable, so an entry keyed by the file's base name (which
no other message has) never goes stale.  The cache is bounded by the
octets of the header sections it holds plus a cost per part.
"""

from __future__ import annotations

from collections import OrderedDict

from mailserver.imap.mime import Part

# What one part costs besides its header section, roughly.
_PART_COST = 600


def cost(part: Part) -> int:
    total = 0
    stack = [part]
    while stack:
        current = stack.pop()
        total += len(current.header) + _PART_COST
        stack.extend(current.children)
        if current.message is not None:
            stack.append(current.message)
    return total


class StructureCache:
    def __init__(self, max_octets: int = 32 * 1024 * 1024) -> None:
        self._entries: OrderedDict[str, tuple[Part, int]] = OrderedDict()
        self._octets = 0
        self._max = max_octets

    def get(self, key: str) -> Part | None:
        found = self._entries.get(key)
        if found is None:
            return None
        self._entries.move_to_end(key)
        return found[0]

    def put(self, key: str, part: Part) -> None:
        size = cost(part)
        if size > self._max // 4:
            return  # one huge header section would push out everything else
        old = self._entries.pop(key, None)
        if old is not None:
            self._octets -= old[1]
        self._entries[key] = (part, size)
        self._octets += size
        while self._octets > self._max:
            _, (_, dropped) = self._entries.popitem(last=False)
            self._octets -= dropped

    def __len__(self) -> int:
        return len(self._entries)
