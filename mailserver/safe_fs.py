"""
Folders and files inside the data folder: opened without following symbolic
links, and created private.

The data folder (C{data_dir}) may itself be a symbolic link: where it lives is
the operator's choice.  Nothing inside it is followed.  A link planted for a
Maildir's C{new/} would make delivery write outside it, one for C{tmp/} make
the start-up clean-up delete there.  So a folder is opened one name at a time
from the data folder, each step with C{O_NOFOLLOW}, and the work in it is
done relative to that descriptor: it stays in the folder that was checked,
whatever is renamed meanwhile.  A link on the way is refused with
L{SymlinkRefused}, an C{OSError}: callers treat it as any other storage
failure, and their log line names the link.

Folders the server makes are 0700 whatever the umask, as Dovecot makes
Maildirs; the files in them are made 0600 by their writers.

Blocking file work without Twisted, like L{mailserver.maildir}.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from pathlib import Path

FOLDER_MODE = 0o700
# The bits that let other users (not the owner, not the group) in.
OTHERS = 0o007
_FOLDER = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_BASE = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class SymlinkRefused(OSError):
    """
    A symbolic link where the data folder has a folder or file of its own.
    """

    def __init__(self, path: Path | str) -> None:
        super().__init__(
            errno.ELOOP, "is a symbolic link, which is not followed inside the data folder", str(path)
        )


def make_data_folder(path: Path) -> bool:
    """
    Create the data folder itself (and its parents, with the umask's mode)
    if missing, the folder 0700.  An existing one is left as the operator
    made it.

    @return: whether it was made.
    """
    try:
        path.mkdir(parents=True, mode=FOLDER_MODE)
    except FileExistsError:
        return False
    os.chmod(path, FOLDER_MODE)  # whatever the umask
    return True


def open_folder(base: Path | str, folder: Path | str, *, create: bool = False) -> int:
    """
    A descriptor of C{folder} (C{base} itself or a folder inside it), reached
    from C{base} one name at a time without following a link.  The caller
    closes it.

    @param create: make the missing folders on the way (0700), the data
        folder too (L{make_data_folder}), and sync each folder that gained
        one, so the new names are durable.
    @raise SymlinkRefused: when a name on the way is a symbolic link.
    @raise OSError: C{FileNotFoundError} for a missing folder without
        C{create}, C{NotADirectoryError} for a file, and the like.
    """
    names = _names_below(os.fspath(base), os.fspath(folder))
    try:
        fd = os.open(base, _BASE)
    except FileNotFoundError:
        if not create:
            raise
        make_data_folder(Path(base))
        fd = os.open(base, _BASE)
    try:
        for depth, name in enumerate(names):
            child = _child(fd, name, create, lambda: os.path.join(base, *names[: depth + 1]))
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _names_below(base: str, folder: str) -> list[str]:
    """
    The names from C{base} down to C{folder} (string work: this is on
    every delivery's path, where C{pathlib} costs more than the opens).

    @raise ValueError: when C{folder} is not inside C{base}, or a name would
        not go down (C{..}, C{.}).
    """
    if folder == base:
        return []
    prefix = base.rstrip("/") + "/"
    names = folder[len(prefix):].split("/") if folder.startswith(prefix) else [".."]
    if any(name in ("", ".", "..") for name in names):
        raise ValueError(f"{folder!r} is not a folder inside {base!r}")
    return names


def open_subfolder(parent: int, name: str, path: Path | str) -> int:
    """
    Open the folder C{name} in an open folder, refusing a link.

    @param path: the folder's path, for the error.
    """
    return _open_child(parent, name, lambda: path)


def _child(parent: int, name: str, create: bool, path) -> int:
    """
    Open the folder C{name} in C{parent}, making it when missing and
    C{create}.

    @param path: gives the path, for the error only.
    """
    try:
        return _open_child(parent, name, path)
    except FileNotFoundError:
        if not create:
            raise
    try:
        os.mkdir(name, FOLDER_MODE, dir_fd=parent)
    except FileExistsError:  # made meanwhile by another thread or process
        return _open_child(parent, name, path)
    child = _open_child(parent, name, path)
    try:
        os.fchmod(child, FOLDER_MODE)  # whatever the umask
        os.fsync(parent)
    except BaseException:
        os.close(child)
        raise
    return child


def _open_child(parent: int, name: str, path) -> int:
    try:
        return os.open(name, _FOLDER, dir_fd=parent)
    except NotADirectoryError:
        # O_DIRECTORY refuses a link with ENOTDIR too; tell the two apart.
        if stat.S_ISLNK(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode):
            raise SymlinkRefused(path()) from None
        raise


def open_file(folder_fd: int, name: str, flags: int, mode: int = 0o600, *, path=None) -> int:
    """
    Open the file C{name} in an open folder, refusing a link.

    @param path: the file's path for the error (default: C{name}).
    @raise SymlinkRefused: when C{name} is a symbolic link.
    """
    try:
        return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=folder_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise SymlinkRefused(path or name) from None
        raise


def open_path(path: Path | str, flags: int = os.O_RDONLY, mode: int = 0o600) -> int:
    """
    Open a file by its path, refusing a link as its last name (the folders
    on the way were checked when the caller made or opened them).

    @raise SymlinkRefused: when the file is a symbolic link.
    """
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise SymlinkRefused(path) from None
        raise


def anonymous_file(base: Path | str, folder: Path | str):
    """
    A new file with no name in C{folder} (inside C{base}, reached without
    following a link), open for reading and writing: a message's spill file,
    gone when closed or when the process dies.  C{O_TMPFILE} where the file
    system has it, else a name unlinked at once.
    """
    folder_fd = open_folder(base, folder)
    try:
        try:
            fd = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600, dir_fd=folder_fd)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
            name = f".spill-{secrets.token_hex(8)}"
            fd = open_file(folder_fd, name, os.O_RDWR | os.O_CREAT | os.O_EXCL)
            os.unlink(name, dir_fd=folder_fd)
    finally:
        os.close(folder_fd)
    return os.fdopen(fd, "w+b")


def write_file(path: Path | str, text: str) -> None:
    """
    Replace a small file of the data folder's (a pid, the listeners'
    ports), never writing through a link left in its place.
    """
    with os.fdopen(open_path(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "w") as f:
        f.write(text)


def tighten(base: Path, folder: Path) -> int | None:
    """
    Take from an existing folder the access other users have (o+rwx), as
    folders made before they were made 0700 allow listing; the group's
    access is left as the operator chose it.

    @return: the old mode when it changed, else C{None} (also when the
        folder does not exist).
    @raise SymlinkRefused: when the folder or a folder on the way is a link.
    """
    try:
        fd = open_folder(base, folder)
    except FileNotFoundError:
        return None
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if not mode & OTHERS:
            return None
        os.fchmod(fd, mode & ~OTHERS)
        return mode
    finally:
        os.close(fd)
