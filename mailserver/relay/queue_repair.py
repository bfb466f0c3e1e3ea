"""
What a crash or a damaged file leaves in the relay queue, and what start-up
and the C{mailserver queue} command do with it: message files that never
got their envelope, temporary files whose writer is gone, and entries that
cannot be used, set aside with a note.  A part of L{QueueStore}
(L{mailserver.relay.queue}), kept apart so the store's own module holds
the queue's everyday work; blocking file I/O, as there.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from mailserver.maildir import fsync_directory
from mailserver.relay.whole_entry import is_entry
from mailserver.safe_fs import open_path
from mailserver.stale_tmp import writer_alive


def _writer_gone(tmp_name: str) -> bool:
    """
    Was this C{tmp/} file (C{<name>.<pid>.<hex>}) written by a process that
    can no longer be writing it?
    """
    parts = tmp_name.rsplit(".", 2)
    return len(parts) == 3 and parts[1].isdigit() and not writer_alive(int(parts[1]))


class QueueRepair:
    """
    L{QueueStore}'s methods for the remains of crashes and damaged entries;
    they use its folders and helpers.
    """

    def set_aside(self, queue_id: str, problem: str) -> Path:
        """
        Move a corrupt entry (envelope and message file, whichever exist)
        into C{corrupt/} beside a C{.problem} note, so an operator can look
        at it and nothing tries it again.  The message goes first: a crash
        in between leaves an envelope without its message, which is set
        aside in turn, never a message file that start-up removes as an
        orphan.

        @return: where the envelope now is (for a whole entry without an
            envelope file, the message file holding it).
        """
        self.ensure()
        name, n = queue_id, 0
        while any((self.corrupt_path / f"{name}{suffix}").exists()
                  for suffix in ("", ".json", ".problem")):
            n += 1
            name = f"{queue_id}.{n}"
        self._write_durably(self.corrupt_path / f"{name}.problem", problem + "\n")
        for source, target in ((self.messages_path / queue_id, self.corrupt_path / name),
                               (self.envelopes_path / f"{queue_id}.json",
                                self.corrupt_path / f"{name}.json")):
            try:
                os.rename(source, target)
            except FileNotFoundError:
                continue
            fsync_directory(self.corrupt_path)
            fsync_directory(source.parent)
        envelope = self.corrupt_path / f"{name}.json"
        return envelope if envelope.exists() else self.corrupt_path / name

    def corrupt_entries(self) -> list[tuple[str, str]]:
        """
        The entries set aside, as C{(name, problem)}.
        """
        try:
            notes = sorted(p for p in self.corrupt_path.iterdir() if p.suffix == ".problem")
        except FileNotFoundError:
            return []
        out = []
        for note in notes:
            try:
                with os.fdopen(open_path(note), "rb") as f:
                    problem = f.read().decode("utf-8", "replace").strip()
            except OSError as e:
                problem = f"(note unreadable: {e.strerror})"
            out.append((note.stem, problem))
        return out

    def remove_orphans(self, min_age: float = 3600.0) -> list[str]:
        """
        At start: remove message files that have no envelope and are not
        whole entries (a crash between the link and the envelope, before the
        250, or a removal cut short after a stale entry's envelope) when older than
        C{min_age} seconds, so an enqueue running meanwhile in a worker is
        never disturbed, and stale temporary files (L{remove_stale_tmp}).
        """
        self.ensure()
        cutoff = time.time() - min_age
        known = set(self._envelope_ids())
        removed = []
        for entry in os.scandir(self.messages_path):
            if entry.name in known:
                continue
            try:
                if entry.stat(follow_symlinks=False).st_mtime < cutoff and not is_entry(entry):
                    os.unlink(entry.path)
                    removed.append(entry.name)
            except FileNotFoundError:
                continue
        self.remove_stale_tmp(min_age, writing=True)
        return removed

    def remove_stale_tmp(self, min_age: float = 3600.0, writing: bool = False) -> None:
        """
        Remove the temporary files whose writer is gone (or, with no writer
        in the name, older than C{min_age} seconds).  Quick: C{tmp/} holds
        only the writes in progress.

        @param writing: this process may be queueing messages meanwhile
            (the start-up read runs in a thread while clients are served),
            so a file with this process's id is a write in progress, not
            an earlier process's leftover, and is kept unless older than
            C{min_age}.
        """
        self.ensure()
        cutoff = time.time() - min_age
        ours = f".{os.getpid()}."
        for entry in os.scandir(self.tmp_path):
            try:
                gone = _writer_gone(entry.name) and not (writing and ours in entry.name)
                if gone or entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(entry.path)
            except FileNotFoundError:
                continue
