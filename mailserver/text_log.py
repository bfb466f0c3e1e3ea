"""
The text log twistd writes, written with less work a line.

twistd's own observer (C{twisted.logger.textFileLogObserver}) renders each
event through C{string.Formatter} and C{strftime} and takes Twisted's
pure-Python lock: for the few events of every message that was about a
tenth of the reactor thread's time under relay load.  L{TextLogObserver}
writes the same lines: an event made by L{mailserver.logs.emit} carries
its text ready, and the time stamp is made once a second; any other event
(Twisted's, a plugin's, one with a traceback) goes through Twisted's own
formatter.

L{twistd_observer} picks the same destination twistd would: the
C{--logfile} (rotated on SIGUSR1 as twistd does, and by size, keeping as
many old files as the C{[log]} settings say), or the standard output in
the foreground.  With C{--syslog}, or a C{--logger} of the user's
choosing, twistd's choice stands.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import IO

from twisted.logger import ILogObserver, formatEventAsClassicLogText, formatTime
from twisted.python.compat import ioType
from twisted.python.logfile import LogFile
from zope.interface import implementer


@implementer(ILogObserver)
class TextLogObserver:
    """
    Each event as C{<time> [<system>] <text>} on one line (later lines of a
    text indented with a tab), written and flushed at once.
    """

    def __init__(self, out: IO) -> None:
        self._out = out
        # twistd's log file takes bytes; the standard output, text.
        self._encoding = None if ioType(out) is str else "utf-8"
        # The C lock: re-entrant, and never left half-taken by a signal.
        self._lock = threading.RLock()
        # (second, its stamp), replaced whole: threads log too.
        self._stamped: tuple[int, str] = (-1, "")

    def __call__(self, event: dict) -> None:
        text = event.get("log_text")
        system = event.get("log_system")
        when = event.get("log_time")
        if (
            isinstance(text, str)
            and isinstance(system, str)
            and isinstance(when, (int, float))
            and event.get("log_format") == "{log_text}"
            and "log_failure" not in event
        ):
            if not text:
                return
            line = f"{self._time_stamp(when)} [{system}] {text}\n"
            if "\n" in text:
                line = line[:-1].replace("\n", "\n\t") + "\n"
        else:
            line = formatEventAsClassicLogText(event)
            if not line:
                return
        self._write(line.encode(self._encoding) if self._encoding is not None else line)

    def write_lines(self, lines: bytes) -> None:
        """
        Lines another process wrote already (a worker's log, whole lines),
        put in among this one's.
        """
        self._write(lines if self._encoding is not None else lines.decode("utf-8", "replace"))

    def _write(self, text: bytes | str) -> None:
        with self._lock:
            self._out.write(text)
            self._out.flush()

    def _time_stamp(self, when: float) -> str:
        # The stamp has whole seconds (RFC 3339 as Twisted writes it).
        second = int(when)
        stamped_second, stamp = self._stamped
        if second != stamped_second:
            stamp = formatTime(second)
            self._stamped = (second, stamp)
        return stamp


def twistd_observer(twistd_options, rotate_size: int = 1_000_000,
                    keep_rotated: int | None = None) -> TextLogObserver | None:
    """
    The observer for the log twistd's options ask for, or C{None} where
    twistd's own choice should stand (C{--syslog}, C{--logger}, a daemon
    told to log to the standard output, which twistd refuses).

    @param rotate_size: the log file's size that has it renamed.
    @param keep_rotated: how many renamed files are kept (C{None}: all, as
        twistd's own observer keeps them).
    """
    if twistd_options is None or twistd_options.get("syslog") or twistd_options.get("logger"):
        return None
    name = twistd_options.get("logfile")
    foreground = bool(twistd_options.get("nodaemon"))
    if name == "-" or (foreground and not name):
        return TextLogObserver(sys.stdout) if foreground else None
    log_file = LogFile.fromFullPath(name or "twistd.log", rotateLength=rotate_size,
                                    maxRotatedFiles=keep_rotated)
    if not signal.getsignal(signal.SIGUSR1):
        def reopen(signum, frame) -> None:
            from twisted.internet import reactor

            reactor.callFromThread(log_file.rotate)

        signal.signal(signal.SIGUSR1, reopen)
    return TextLogObserver(log_file)
