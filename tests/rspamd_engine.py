"""
A real Rspamd on 127.0.0.1 for the tests, from Debian's C{rspamd} package
(C{.ci/run} installs it), started from C{tests/rspamd/rspamd.conf.in}: one
normal worker, no network look-ups, and the rules of
C{tests/rspamd/rules.lua}, which force each of Rspamd's actions by a word
in the Subject and report what the MTA told Rspamd.

    engine = RspamdEngine(tmp_path).start()
    engine.url   # "http://127.0.0.1:PORT"
    engine.stop()
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent / "rspamd"
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
# Public suffixes Rspamd's URL code needs: a short list starts in a second
# where the full one takes half a minute to compile.
SUFFIXES = "test\nexample\norg\ncom\nnet\n"


def installed() -> bool:
    return shutil.which("rspamd") is not None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RspamdEngine:
    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        path = self.folder / "rspamd.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self, timeout: float = 90.0, port: int | None = None) -> RspamdEngine:
        """
        @param port: where to listen (default: a free port).
        """
        (self.folder / "tld.dat").write_text(SUFFIXES)
        for _ in range(5):
            self.port = port or free_port()
            config = (HERE / "rspamd.conf.in").read_text()
            for name, value in (("DIR", self.folder), ("PORT", self.port),
                                ("RULES", HERE / "rules.lua")):
                config = config.replace(f"@{name}@", str(value))
            (self.folder / "rspamd.conf").write_text(config)
            command = ["rspamd", "--no-fork", "--config", str(self.folder / "rspamd.conf")]
            if os.geteuid() == 0:  # it refuses to run its workers as root otherwise
                command += ["--user", "root", "--group", "root", "--insecure"]
            self.process = subprocess.Popen(
                command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            if self._wait(timeout):
                return self
            self.stop()
        raise RuntimeError(f"rspamd did not start:\n{self.log()[-3000:]}")

    def _wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False  # e.g. the port was taken meanwhile
            try:
                with urllib.request.urlopen(f"{self.url}/ping", timeout=2) as answer:
                    if answer.read().strip() == b"pong":
                        return True
            except OSError:
                pass
            time.sleep(0.1)
        return False

    def stop(self) -> None:
        """
        SIGTERM to Rspamd's main process, which ends its workers; SIGKILL
        to the process group it leads if that takes too long.
        """
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(process.pid, signal.SIGKILL)  # any worker left behind
        except ProcessLookupError:
            pass
        process.wait()
