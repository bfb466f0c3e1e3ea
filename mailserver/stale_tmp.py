"""
What a crash leaves in the C{tmp/} folders of the Maildirs: at start-up,
files whose writer is gone were never acknowledged, so nobody is owed them
and they go; so does anything older than Maildir's 36 hours.  Apart from
L{mailserver.maildir} because only start-up needs it and it knows which
process wrote a file (by its name), which delivery does not.

Blocking file work without Twisted; no symbolic link inside the data folder
is followed (L{mailserver.safe_fs}).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from mailserver.message_ids import writer_pid
from mailserver.safe_fs import open_folder

# The writer's process id in a unique name of an earlier version,
# C{<seconds>.M<usec>P<pid>Q<n>.<host>}.
_OLD_WRITER_PID = re.compile(r"^\d+\.M\d+P(\d+)Q\d+\.")
# Maildir's rule for files in tmp/ of unknown origin (qmail's maildir(5)).
STALE_TMP_SECONDS = 36 * 3600


def writer_alive(pid: int) -> bool:
    """
    At start-up: may the process that wrote a temporary file still be
    writing it?  Not if it is gone, nor if it has our pid (an earlier
    process's, since this one has written nothing yet).
    """
    if pid == os.getpid():
        return False  # at start-up this process has written nothing yet
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_tmp(base: Path, folder: Path, host: str, now: float | None = None) -> int:
    """
    Remove what a crash left in a C{tmp/} folder inside C{base}: files
    written by a process of this node (C{host}, the host part of its names,
    L{mailserver.maildir.UniqueNames.host}) that is gone (never acknowledged, so nobody is
    owed them), and any file older than 36 hours.  Files of live processes
    (a worker still writing) are kept, and so is anything not a plain file;
    so are other nodes' files younger than that, whose process ids mean
    nothing here (another machine sharing the folder).  Meant for start-up;
    returns how many went.

    @raise mailserver.safe_fs.SymlinkRefused: when the folder, or one on
        the way to it, is a symbolic link (nothing is removed then).
    """
    cutoff = (time.time() if now is None else now) - STALE_TMP_SECONDS
    removed = 0
    try:
        fd = open_folder(base, folder)
    except (FileNotFoundError, NotADirectoryError):
        return 0
    try:
        with os.scandir(fd) as entries:
            names = [e.name for e in entries if e.is_file(follow_symlinks=False)]
        for name in names:
            try:
                writer = _writer(name, host)
                if (writer is not None and not writer_alive(writer)) or (
                    os.stat(name, dir_fd=fd, follow_symlinks=False).st_mtime < cutoff
                ):
                    os.unlink(name, dir_fd=fd)
                    removed += 1
            except FileNotFoundError:
                continue
    finally:
        os.close(fd)
    return removed


def _writer(name: str, host: str) -> int | None:
    """
    The process id of the writer of a file named by L{Intake}'s rule (or by
    an earlier version's) on this node (C{host}, the host part of its
    names), or C{None} when the name does not tell or another node wrote
    it: that node's process ids mean nothing here.
    """
    pid = writer_pid(name)
    if pid is None:
        old = _OLD_WRITER_PID.match(name)
        if old is None:
            return None
        pid, rest = int(old.group(1)), name[old.end():]
    else:
        rest = name.split(".", 1)[1] if "." in name else ""
    return pid if re.split(r"[,:]", rest, maxsplit=1)[0] == host else None


def maildir_tmp_folders(mail_path: Path) -> tuple[list[Path], list[Path]]:
    """
    The C{tmp/} folder of every Maildir under C{mail/<domain>/<user>/} and
    of its Maildir++ folders (C{<user>/.Sent/}...: IMAP's), and the symbolic
    links met on the way, which are not followed.
    """
    folders: list[Path] = []
    links: list[Path] = []
    for domain in _folders(mail_path, links):
        for user in _folders(domain, links):
            folders.append(user / "tmp")
            folders.extend(sub / "tmp" for sub in _folders(user, links, prefix="."))
    return folders, links


def _folders(path: Path, links: list[Path], prefix: str = "") -> list[Path]:
    try:
        with os.scandir(path) as entries:
            found = [(Path(e.path), e.is_symlink(), e.is_dir(follow_symlinks=False))
                     for e in entries if e.name.startswith(prefix)]
    except (FileNotFoundError, NotADirectoryError):
        return []
    links.extend(p for p, link, _ in found if link)
    return sorted(p for p, _, folder in found if folder)
