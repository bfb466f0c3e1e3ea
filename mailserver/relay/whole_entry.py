"""
A whole entry of the relay queue: one file holding a message's envelope and
the message (L{mailserver.relay.queue} says when one is written and how it
is committed).

The file's first line is C{MAILSERVER-QUEUED } and the envelope's JSON (one
line, L{QueuedMessage.to_json}); the message follows.  Once the message's
state is saved in an envelope file of its own, the first word is
overwritten with C{MAILSERVER-STALE!} (the same length), so the line no
longer counts: the file is then an ordinary message file whose message
starts after that line.  No client's text can pass for such a line: every
other message file begins with the C{Return-Path:} line the intake
writes, and the envelope's JSON is one line (JSON escapes line breaks).
Blocking file work, for the queue's threads.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from mailserver.relay.queued import CorruptEntry, QueuedMessage, QueueError, read_envelope
from mailserver.safe_fs import open_file, open_path

WHOLE = b"MAILSERVER-QUEUED "
STALE = b"MAILSERVER-STALE! "
# The longest envelope line read (a message's recipients are bounded far
# below this).
_MAX_LINE = 16 * 1024 * 1024


def entry_bytes(message: QueuedMessage, data: bytes) -> tuple[bytes, int]:
    """
    The file of C{message} holding C{data}, and where C{data} starts in it.
    """
    line = WHOLE + message.to_json().encode("utf-8")
    return line + data, len(line)


def read_entry(path: Path, queue_id: str) -> QueuedMessage:
    """
    The envelope of the whole entry at C{path}, checked, with its
    C{data_offset}.

    @raise QueueError: when the file is not (or no longer) a whole entry,
        or is gone: no message is queued by it.
    @raise CorruptEntry: when it is one that cannot be used.
    """
    try:
        with os.fdopen(open_path(path), "rb") as f:
            line = f.readline(_MAX_LINE)
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        raise QueueError(f"no queued message {queue_id}") from None
    except OSError as e:
        raise CorruptEntry(queue_id, path, f"cannot read it: {e.strerror or e}") from None
    if not line.startswith(WHOLE):
        raise QueueError(f"no queued message {queue_id}")
    if not line.endswith(b"\n"):
        raise CorruptEntry(queue_id, path, "its envelope line is cut short")
    message = read_envelope(line[len(WHOLE):], queue_id, path)
    if size < len(line) + message.body_offset:
        raise CorruptEntry(queue_id, path, "it is shorter than the message it holds")
    return replace(message, data_offset=len(line))


def is_entry(entry: os.DirEntry) -> bool:
    """
    Does this file begin as a whole entry?  One that cannot be read counts
    as one (kept, never removed unread); a file gone meanwhile raises
    C{FileNotFoundError}.
    """
    if not entry.is_file(follow_symlinks=False):
        return False
    try:
        with os.fdopen(open_path(Path(entry.path)), "rb") as f:
            return f.read(len(WHOLE)) == WHOLE
    except FileNotFoundError:
        raise
    except OSError:
        return True


def mark_stale(folder_fd: int, name: str) -> None:
    """
    The whole entry C{name} of an open folder no longer counts (durably),
    once an envelope file holds its message's state.
    """
    fd = open_file(folder_fd, name, os.O_RDWR)
    try:
        if os.pread(fd, len(WHOLE), 0) == WHOLE:
            os.pwrite(fd, STALE, 0)
            os.fdatasync(fd)
    finally:
        os.close(fd)
