"""
The servers the benchmark compares, each started as a subprocess listening
on 127.0.0.1 on a port the OS chose, in its own temporary folder, and
stopped (SIGTERM, then SIGKILL) on exit from its C{with} block.

 - L{AiosmtpdPeer}: aiosmtpd with a durable Maildir handler
   (L{bench.aiosmtpd_maildir}): fsync of the file and of C{new/} before 250.
 - L{MailServerPeer}: our C{twistd mailserver}, with users added by the CLI.
 - L{free_port}, L{accepting}: for peers that cannot report an OS-chosen
   port (the Debian-packaged ones in L{bench.system_peers}).

The two peers run on the venv's Python (C{sys.executable}).  Also here: CPU time and
memory figures read from C{/proc/<pid>/}.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Self

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LOOPBACK = "tcp:0:interface=127.0.0.1"
_CLK_TCK = os.sysconf("SC_CLK_TCK")


# /proc figures


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    # The command name may contain spaces; fields resume after its ')'.
    # Returned list: index 0 is field 3 (state), so field N is at N - 3.
    return text[text.rindex(")") + 2 :].split()


def _own_cpu(fields: list[str]) -> int:
    # utime, stime, cutime, cstime: fields 14..17.
    return sum(int(x) for x in fields[11:15])


def session_pids(pid: int) -> list[int]:
    """
    C{pid} and every other live process of its session (the peers are
    started with C{start_new_session}, so that is the server, its worker
    processes and any forked helpers).
    """
    pids = [pid]
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == pid:
            continue
        try:
            if int(_stat_fields(int(entry))[3]) == pid:  # field 6: session id
                pids.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return pids


def cpu_seconds(pid: int) -> float:
    """
    CPU time, in seconds, of the server's session (see L{session_pids}):
    utime + stime + cutime + cstime summed over its live processes, all
    threads included.  (A process's cutime/cstime hold its waited-for
    children, which are no longer live, so nothing is counted twice.)
    """
    ticks = 0
    for p in session_pids(pid):
        try:
            ticks += _own_cpu(_stat_fields(p))
        except (OSError, ValueError):
            continue
    return ticks / _CLK_TCK


def _status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _session_sum(pid: int, key: str) -> int:
    total = 0
    for p in session_pids(pid):
        try:
            total += _status_kib(p, key)
        except (OSError, KeyError):
            continue
    return total


def rss_kib(pid: int) -> int:
    """
    Resident memory (VmRSS) summed over the server's session, KiB.
    """
    return _session_sum(pid, "VmRSS")


def peak_rss_kib(pid: int) -> int:
    """
    Peak resident memory (VmHWM) summed over the server's session, KiB
    (for several processes, an upper bound of the joint peak).
    """
    return _session_sum(pid, "VmHWM")


def pss_kib(pid: int) -> int:
    """
    Proportional set size (C{Pss} in C{/proc/<pid>/smaps_rollup}) summed
    over the server's session, KiB, right now.  A page shared by k
    processes counts 1/k in each, so a many-process server (Postfix runs an
    smtpd per client, all sharing their libraries) is counted once, where
    summed VmHWM counts shared pages once per process.
    """
    total = 0
    for p in session_pids(pid):
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except (OSError, ValueError):
            continue
    return total


def reset_peak_rss(pid: int) -> bool:
    """
    Reset VmHWM to the current RSS (C{echo 5 > /proc/PID/clear_refs}) for
    each process of the session; False if the kernel or our rights don't
    allow it.
    """
    ok = True
    for p in session_pids(pid):
        try:
            with open(f"/proc/{p}/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            ok = False
    return ok


def wait_for(predicate, timeout: float, what: str, process: subprocess.Popen, log=None):
    """
    Poll C{predicate} until it returns something true (returned), the
    process exits or C{timeout} passes (both raise, with the log's tail).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if process.poll() is not None:
            raise RuntimeError(
                f"{what}: process exited with {process.returncode}\n{log() if log else ''}"
            )
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready after {timeout}s\n{log() if log else ''}")
        time.sleep(0.05)


def _die_with_parent() -> None:
    """
    In the child before exec: get SIGTERM when the runner dies, even by
    SIGKILL (Linux PR_SET_PDEATHSIG), so no server outlives a killed run.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001, S110 - best effort
        pass


class Peer:
    """
    A server under test.  Use as a context manager; C{port} is its SMTP port
    and C{pid} the process whose CPU and memory are measured.
    """

    name = "peer"
    rcpt = "bob@localhost"
    # When an accepted message is in the recipient's Maildir: "before 250"
    # (the peer fsyncs it there before answering), "queued" (fsynced in the
    # peer's own queue before 250, delivered to the Maildir afterwards) or
    # "discarded" (never stored: a ceiling, not a peer).
    delivery = "before 250"

    def __init__(self, keep: bool = False) -> None:
        self.keep = keep
        self.root = Path(tempfile.mkdtemp(prefix=f"bench-{self.name}-"))
        self.process: subprocess.Popen | None = None
        self.port: int = 0
        self.pop3_port: int = 0
        self._log_file = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def log(self) -> str:
        path = self.root / "server.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def _popen(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self._log_file = open(self.root / "server.log", "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            argv,
            cwd=self.root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - the runner starts no threads
        )

    def start(self) -> None:
        raise NotImplementedError

    def stop(self, timeout: float = 15.0) -> None:
        """
        SIGTERM, wait up to C{timeout}, then SIGKILL to the whole process
        group (the peer was started as a session leader, so the group is
        exactly what it started).  The SIGKILL step runs even if the wait
        is interrupted (Ctrl-C), so nothing is left running.
        """
        process, self.process = self.process, None
        try:
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            try:
                if process is not None:
                    leftovers = [p for p in session_pids(process.pid) if p != process.pid]
                    if process.poll() is None or leftovers:
                        try:
                            os.killpg(process.pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                        process.wait(10)
            finally:
                if self._log_file is not None:
                    self._log_file.close()
                    self._log_file = None

    def cleanup(self) -> None:
        """
        Remove the peer's folder unless C{--keep}; if Ctrl-C lands half-way,
        finish the removal before passing it on.
        """
        if self.keep:
            return
        try:
            shutil.rmtree(self.root, ignore_errors=True)
        except KeyboardInterrupt:
            shutil.rmtree(self.root, ignore_errors=True)
            raise

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            try:
                self.stop()
            finally:
                self.cleanup()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.stop()
        finally:
            self.cleanup()

    def delivered(self) -> int:
        """
        How many messages are in the test recipient's Maildir C{new/}.
        """
        return 0

    def wait_delivered(self, expected: int, timeout: float) -> float:
        """
        Wait until C{expected} messages are in the Maildir (or the peer has
        nothing left to deliver); return the seconds waited.  A peer that
        stores before 250 has nothing to wait for.
        """
        return 0.0

    def own_mailbox(self, path: Path) -> None:
        """
        Hand a Maildir the runner filled (as itself) to the user the server
        reads mail as; ours and aiosmtpd run as the runner, so nothing to do.
        """


class AiosmtpdPeer(Peer):
    name = "aiosmtpd"

    def __init__(self, deliver: str = "thread", keep: bool = False) -> None:
        super().__init__(keep)
        self.deliver = deliver
        self.maildir = self.root / "Maildir"

    def start(self, timeout: float = 20.0) -> None:
        port_file = self.root / "port"
        self._popen(
            [
                sys.executable,
                str(REPO / "bench" / "aiosmtpd_maildir.py"),
                "--maildir",
                str(self.maildir),
                "--port-file",
                str(port_file),
                "--deliver",
                self.deliver,
            ]
        )
        assert self.process is not None
        wait_for(port_file.exists, timeout, "aiosmtpd", self.process, self.log)
        self.port = int(port_file.read_text())

    def delivered(self) -> int:
        try:
            return len(os.listdir(self.maildir / "new"))
        except FileNotFoundError:
            return 0


class MailServerPeer(Peer):
    """
    Our server: C{twistd --nodaemon mailserver --config ...} with SMTP, POP3
    and IMAP on OS-chosen loopback ports.  The connection limits are raised so
    that one client address (127.0.0.1) may open all the benchmark's
    connections; everything else is the default configuration.
    """

    name = "mailserver"

    def __init__(
        self,
        users: tuple[str, ...] = ("bob@localhost",),
        password: str = "bench-password",
        extra_toml: str = "",
        max_connections: int = 5000,
        workers: int = 1,
        keep: bool = False,
        code: Path = REPO,
        admin: bool = False,
    ) -> None:
        """
        @param code: the checkout whose C{mailserver} package runs (put
            first on C{PYTHONPATH}); L{bench.ab} passes another revision's.
        @param admin: serve the admin HTTP API too, on a loopback port the
            OS chooses (C{admin_port} once started).
        """
        if workers != 1:
            self.name = f"mailserver-w{workers}"
        super().__init__(keep)
        self.workers = workers
        self.code = code
        self.users = users
        self.password = password
        self.data_path = self.root / "data"
        self.config_path = self.root / "mailserver.toml"
        self.log_path = self.root / "twistd.log"
        self.config_path.write_text(
            f'hostname = "mx.test"\n'
            f'data_dir = "{self.data_path}"\n'
            f'local_domains = ["localhost"]\n'
            + (f"workers = {workers}\n" if workers != 1 else "")
            + f"{extra_toml}\n"
            f"[listeners]\n"
            f'smtp = ["{LOOPBACK}"]\n'
            f"submission = []\n"
            f"submissions = []\n"
            f'pop3 = ["{LOOPBACK}"]\n'
            f"pop3s = []\n"
            f'imap = ["{LOOPBACK}"]\n'
            f"imaps = []\n"
            # Not the admin listener's default, the fixed port 2080, which
            # two servers (or a developer's own) cannot share.
            + (f'admin = ["{LOOPBACK}"]\n' if admin else "admin = []\n")
            + f"[limits]\n"
            f"max_connections = {max_connections}\n"
            f"max_connections_per_client = {max_connections}\n"
        )

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.code), env.get("PYTHONPATH")]))
        env.pop("MAILSERVER_CONFIG", None)
        return env

    def log(self) -> str:
        parts = []
        for path in (self.root / "server.log", self.log_path):
            if path.exists():
                parts.append(path.read_text(errors="replace")[-4000:])
        return "\n".join(parts)

    def cli(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "mailserver"), "--config", str(self.config_path), *args],
            cwd=self.root,
            env=self.env(),
            input=input,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def add_user(self, address: str) -> None:
        result = self.cli("user", "add", address, "--password-stdin", input=self.password + "\n")
        if result.returncode != 0:
            raise RuntimeError(f"user add {address} failed: {result.stderr or result.stdout}")

    def maildir(self, address: str) -> Path:
        local, domain = address.lower().rsplit("@", 1)
        return self.data_path / "mail" / domain / local

    def start(self, timeout: float = 30.0) -> None:
        self.data_path.mkdir(parents=True, exist_ok=True)
        for user in self.users:
            self.add_user(user)
        # In the node's folder (a revision before nodes: the data folder).
        reports = [*self.data_path.glob("nodes/*/listeners.json"),
                   self.data_path / "listeners.json"]
        for report in reports:
            if report.exists():
                report.unlink()
        self._popen(
            [
                str(BIN / "twistd"),
                "--nodaemon",
                "--pidfile=",
                f"--logfile={self.log_path}",
                "mailserver",
                "--config",
                str(self.config_path),
            ],
            env=self.env(),
        )
        assert self.process is not None

        def ready():
            for report in [*self.data_path.glob("nodes/*/listeners.json"),
                           self.data_path / "listeners.json"]:
                try:
                    return json.loads(report.read_text())
                except (FileNotFoundError, ValueError):
                    continue
            return None

        listening = wait_for(ready, timeout, "mailserver", self.process, self.log)
        ports = {role: int(addrs[0].rsplit(":", 1)[1]) for role, addrs in listening.items() if addrs}
        self.port = ports["smtp"]
        self.pop3_port = ports.get("pop3", 0)
        self.imap_port = ports.get("imap", 0)
        self.admin_port = ports.get("admin", 0)

    def delivered(self) -> int:
        path = self.maildir(self.rcpt) / "new"
        try:
            return len(os.listdir(path))
        except FileNotFoundError:
            return 0


def free_port() -> int:
    """
    A loopback port free right now (for servers that cannot report an
    OS-chosen one); a tiny race with other programs is possible.
    """
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accepting(port: int) -> bool:
    """
    Whether a server on 127.0.0.1:C{port} takes a connection and sends its
    first octet (SMTP 220 or POP3 +OK), i.e. has set the session up.
    """
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.recv(1)
        return True
    except OSError:
        return False
