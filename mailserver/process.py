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


def stop_signals_in_the_loop(reactor) -> None:
    """
    Have the reactor's SIGTERM and SIGINT handlers run in its loop, not in
    the signal handler.  Twisted's handlers log, and the log file's lock is
    Twisted's pure-Python re-entrant lock: a signal that lands inside that
    lock's C{acquire} or C{release} in the main thread blocks the handler on
    a lock its own thread holds, and the process never stops (a SIGTERM in
    the middle of a log write hung the server until SIGKILL).  Call it once
    the reactor runs (it installs its handlers then); handlers that are not
    the reactor's (C{installSignalHandlers=False}) are left alone.
    """
    for signum, handler in ((signal.SIGTERM, reactor.sigTerm), (signal.SIGINT, reactor.sigInt)):
        if signal.getsignal(signum) == handler:
            signal.signal(signum, lambda number, frame, handler=handler:
                          reactor.callFromThread(handler, number))


def on_signal(signum: int, handler: Callable[[], None], reactor) -> Callable[[], None]:
    """
    Call C{handler} in the reactor thread whenever the process gets
    C{signum}; returns a function that puts the previous handler back.
    """
    previous = signal.signal(signum, lambda *_: reactor.callFromThread(handler))

    def restore() -> None:
        signal.signal(signum, previous)

    return restore
