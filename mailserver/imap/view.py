"""
A session's view of its selected mailbox: the message sequence numbers it
has told the client about, and the changes it has yet to tell (RFC 3501
5.2, 7.4.1).

The folder is shared (L{mailserver.folders.store}); the view is told of
every change to it and keeps them until the session may report them: new
messages (C{EXISTS}, C{RECENT}) and other sessions' flag changes
(C{FETCH FLAGS}) at the end of any command or at once during IDLE, and
expunges (C{EXPUNGE}) only where the numbering may change, that is not
during FETCH, STORE or SEARCH (a message expunged meanwhile keeps its
number until then).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Callable

from mailserver.imap.grammar import SequenceSet
from mailserver.imap.responses import Untagged, flag_list

SYSTEM_FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")


class SelectedView:
    """
    @ivar uids: the UIDs by sequence number (index + 1), as the client
        knows them.
    @ivar recent: the UIDs that are \\Recent in this session.
    @ivar on_change: called after a change was noted (the glue pushes it
        during IDLE).
    """

    def __init__(self, folder, readonly: bool, recent: set[int]) -> None:
        self.folder = folder
        self.readonly = readonly
        self.uids: list[int] = list(folder.uids)
        self.recent = recent
        self._removed: set[int] = set()
        self._added = False
        self._flags: set[int] = set()
        self._keywords = list(folder.keywords)
        self._keywords_changed = False
        self._recent_told = len(recent)
        self.on_change: Callable[[], None] | None = None
        folder.watch(self._changed)

    def close(self) -> None:
        self.folder.unwatch(self._changed)
        self.folder.release()

    def _changed(self, change) -> None:
        if change.removed:
            self._removed.update(change.removed)
        if change.added:
            self._added = True
        if change.changed and change.origin is not self:
            self._flags.update(change.changed)
        if list(self.folder.keywords) != self._keywords:
            self._keywords_changed = True
        if self.on_change is not None:
            self.on_change()

    def add_recent(self, uids) -> None:
        """
        Messages this session took as \\Recent after it selected the
        folder (at NOOP, CHECK, IDLE).
        """
        self.recent.update(uids)
        if uids:
            self._recent_told = -1

    @property
    def pending(self) -> bool:
        return bool(self._removed or self._added or self._flags or self._keywords_changed)

    # Numbers.

    @property
    def exists(self) -> int:
        return len(self.uids)

    def seq_of(self, uid: int) -> int | None:
        index = bisect_left(self.uids, uid)
        if index < len(self.uids) and self.uids[index] == uid:
            return index + 1
        return None

    def by_sequence(self, numbers: SequenceSet) -> list[tuple[int, int]] | None:
        """
        (sequence number, UID) of the messages a sequence set names, or
        C{None} if it names a number past the last (RFC 3501 says BAD).
        """
        uids = self.uids
        count = len(uids)
        chosen: set[int] = set()
        for low, high in numbers.resolve(count):
            if high > count or low < 1:
                return None
            chosen.update(range(low, high + 1))
        return [(seq, uids[seq - 1]) for seq in sorted(chosen)]

    def by_uid(self, numbers: SequenceSet) -> list[tuple[int, int]]:
        """
        (sequence number, UID) of the messages a UID set names; UIDs of no
        message are left out (RFC 3501 6.4.8).
        """
        uids = self.uids
        if not uids:
            return []
        spans = sorted(
            (bisect_left(uids, low), bisect_right(uids, high))
            for low, high in numbers.resolve(uids[-1])
        )
        out: list[tuple[int, int]] = []
        reached = 0
        for start, end in spans:
            start = max(start, reached)  # overlapping ranges name a message once
            out.extend(zip(range(start + 1, end + 1), uids[start:end]))
            reached = max(reached, end)
        return out

    # Flags.

    def flags(self, uid: int) -> list[str]:
        flags = self.folder.flags(uid)
        if uid in self.recent:
            flags = [*flags, "\\Recent"]
        return flags

    def permanent_flags(self) -> list[str]:
        keywords = list(self.folder.keywords)
        star = ["\\*"] if self.folder.can_add_keywords else []
        return [*SYSTEM_FLAGS, *keywords, *star]

    def flag_names(self) -> list[str]:
        return [*SYSTEM_FLAGS, *self.folder.keywords]

    def first_unseen(self) -> int | None:
        for uid in self.folder.unseen():
            seq = self.seq_of(uid)
            if seq is not None:
                return seq
        return None

    # Telling the client.

    def updates(self, allow_expunge: bool) -> list:
        """
        The untagged responses for the changes not yet told; expunges only
        if C{allow_expunge}.
        """
        out: list = []
        if self._keywords_changed:
            self._keywords_changed = False
            self._keywords = list(self.folder.keywords)
            out.append(Untagged(b"FLAGS " + flag_list(self.flag_names())))
            out.append(Untagged(
                b"OK [PERMANENTFLAGS " + flag_list(self.permanent_flags()) + b"] Flags permitted."
            ))
        if allow_expunge and self._removed:
            out.extend(self._expunges())
        if self._added:
            self._added = False
            current = self.folder.uids
            last = self.uids[-1] if self.uids else 0
            start = bisect_right(current, last)
            fresh = [uid for uid in current[start:] if uid not in self._removed]
            if fresh:
                self.uids.extend(fresh)
                out.append(Untagged(b"%d EXISTS" % len(self.uids)))
                self._recent_told = -1
        if self._recent_told < 0:
            self.recent.intersection_update(self.uids)
            self._recent_told = len(self.recent)
            out.append(Untagged(b"%d RECENT" % self._recent_told))
        if self._flags:
            changed, self._flags = self._flags, set()
            for uid in sorted(changed):
                seq = self.seq_of(uid)
                if seq is not None and uid not in self._removed:
                    out.append(Untagged(
                        b"%d FETCH (UID %d FLAGS %s)" % (seq, uid, flag_list(self.flags(uid)))
                    ))
        return out

    def _expunges(self) -> list:
        """
        C{EXPUNGE} for each gone message, highest number first, so each
        number is right when it is read (every EXPUNGE renumbers the
        messages after it).
        """
        removed, self._removed = self._removed, set()
        positions = [index for index, uid in enumerate(self.uids) if uid in removed]
        out = [Untagged(b"%d EXPUNGE" % (index + 1)) for index in reversed(positions)]
        if positions:
            self.uids = [uid for uid in self.uids if uid not in removed]
            self.recent -= removed
        return out

    def forget_expunges_silently(self) -> None:
        """
        CLOSE: the expunges are not told (RFC 3501 6.4.2).
        """
        self._expunges()
