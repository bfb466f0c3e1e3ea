"""
What the server changes for its whole process: the open-file limit, the
allocator's threshold, signal handlers.  Each is called explicitly by the
composition root (L{mailserver.service}), never as a side effect of an
import, so tests and tools that import the server's modules get none of it.
"""

from __future__ import annotations

import ctypes
import resource
import signal
from collections.abc import Callable

_M_MMAP_THRESHOLD = -3  # glibc mallopt(3)


def raise_open_file_limit() -> None:
    """
    Every connection is a file descriptor, and the usual soft limit (1024)
    is below the default connection caps: raise it to the hard limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass  # keep the soft limit; connections past it are refused by the OS


def return_large_buffers() -> None:
    """
    glibc raises its mmap threshold to the size of the first large buffer
    freed, so later ones come from the freeing thread's arena and stay
    resident there for good (a 16 MiB message buffer freed in each of four
    threads keeps 64 MiB).  A fixed threshold of 1 MiB keeps large buffers
    mapped and returned to the system when freed.
    """
    try:
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, 1024 * 1024)
    except (OSError, AttributeError):
        pass  # not glibc


def on_signal(signum: int, handler: Callable[[], None], reactor) -> Callable[[], None]:
    """
    Call C{handler} in the reactor thread whenever the process gets
    C{signum}; returns a function that puts the previous handler back.
    """
    previous = signal.signal(signum, lambda *_: reactor.callFromThread(handler))

    def restore() -> None:
        signal.signal(signum, previous)

    return restore
