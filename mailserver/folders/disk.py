"""
A folder's files reached as L{mailserver.safe_fs} reaches the data folder's:
the folder (INBOX's Maildir or a Maildir++ folder) is opened from the data
folder one name at a time without following a symbolic link, its C{tmp/},
C{new/} and C{cur/} from that descriptor, and every file is made, renamed,
linked, read and removed relative to those descriptors, never by a path a
link planted meanwhile could redirect.

A L{FolderFiles} lives for one job (a worker thread's, or a few renames on
the reactor thread): folders kept loaded between jobs hold no descriptor,
so a server with many idle folders does not run out of them.

Blocking file work without Twisted.
"""

from __future__ import annotations

import os
import stat
import threading

from mailserver.safe_fs import SymlinkRefused, open_file, open_folder, open_subfolder

# What a folder's directory entries may be opened as.
READ = os.O_RDONLY
MAKE = os.O_WRONLY | os.O_CREAT | os.O_EXCL
REPLACE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC


class FolderFiles:
    """
    One folder, open for one job.  A context manager.

    @param base: the data folder, below which no link is followed.
    @param path: the folder, inside C{base}.
    @param create: make the folder (and the folders on the way) 0700 if
        missing, each new name synced.
    @raise SymlinkRefused: the folder, or one on the way, is a link.
    @raise FileNotFoundError: it does not exist (without C{create}).
    """

    def __init__(self, base: str, path: str, *, create: bool = False) -> None:
        self.base = base
        self.path = path
        self.fd = open_folder(base, path, create=create)
        self._subs: dict[str, int] = {}

    def sub(self, name: str) -> int:
        """
        The descriptor of the sub-folder C{name} (C{tmp}, C{new}, C{cur}),
        opened on first use without following a link.
        """
        fd = self._subs.get(name)
        if fd is None:
            fd = self._subs[name] = open_subfolder(self.fd, name, f"{self.path}/{name}")
        return fd

    def open(self, name: str, flags: int = READ, sub: str | None = None) -> int:
        """
        A file of the folder (or of its sub-folder C{sub}), refusing a link.
        """
        folder = self.fd if sub is None else self.sub(sub)
        where = f"{self.path}/{name}" if sub is None else f"{self.path}/{sub}/{name}"
        return open_file(folder, name, flags, path=where)

    def read(self, name: str) -> bytes:
        """
        A small file of the folder, whole.

        @raise FileNotFoundError: there is none.
        """
        with os.fdopen(self.open(name), "rb") as f:
            return f.read()

    def write_durably(self, name: str, data: bytes) -> None:
        """
        Replace a small file of the folder: written to a temporary file,
        synced, renamed over it, the folder synced.  The temporary name is
        the thread's own: two jobs may replace the same file at once (the
        account's C{dovecot-uidvalidity}, for two new folders).
        """
        temporary = f"{name}.{os.getpid()}.{threading.get_native_id()}.tmp"
        fd = self.open(temporary, REPLACE)
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temporary, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        os.fsync(self.fd)

    def stat(self, name: str, sub: str | None = None) -> os.stat_result:
        """
        A directory entry's own facts (a link is not followed).
        """
        return os.stat(name, dir_fd=self.fd if sub is None else self.sub(sub), follow_symlinks=False)

    def rename(self, sub: str, name: str, to_sub: str, to_name: str) -> None:
        os.rename(name, to_name, src_dir_fd=self.sub(sub), dst_dir_fd=self.sub(to_sub))

    def unlink(self, name: str, sub: str | None = None) -> None:
        os.unlink(name, dir_fd=self.fd if sub is None else self.sub(sub))

    def listdir(self, sub: str | None = None) -> list[str]:
        return os.listdir(self.fd if sub is None else self.sub(sub))

    def sync(self, sub: str | None = None) -> None:
        os.fsync(self.fd if sub is None else self.sub(sub))

    def is_folder(self, name: str) -> bool:
        """
        Is C{name} a Maildir folder of this one (a real folder with a
        C{cur/}, neither of them a link)?
        """
        try:
            if not stat.S_ISDIR(self.stat(name).st_mode):
                return False
            fd = open_subfolder(self.fd, name, f"{self.path}/{name}")
        except (FileNotFoundError, NotADirectoryError, SymlinkRefused):
            return False
        try:
            return stat.S_ISDIR(os.stat("cur", dir_fd=fd, follow_symlinks=False).st_mode)
        except FileNotFoundError:
            return False
        finally:
            os.close(fd)

    def close(self) -> None:
        for fd in self._subs.values():
            os.close(fd)
        self._subs.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> FolderFiles:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
