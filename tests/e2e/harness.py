"""
The real C{twistd mailserver} process as a test fixture.

Every listener asks the OS for a free loopback port (C{tcp:0}); the server
writes the ports it got into C{listeners.json} in its node's folder
(C{<data_dir>/nodes/<node_name>/}), which is how the harness learns them.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
LOOPBACK = "tcp:0:interface=127.0.0.1"


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.pop("MAILSERVER_CONFIG", None)
    return env


class MailServer:
    """
    One server process with its own data folder and configuration file.
    """

    def __init__(
        self,
        tmp_path: Path,
        *,
        local_domains: tuple[str, ...] = ("localhost",),
        extra_toml: str = "",
        roles: tuple[str, ...] = ("smtp", "submission", "pop3", "admin"),
        endpoints: dict[str, str] | None = None,
        data_path: Path | None = None,
        twistd: list[str] | None = None,
        twistd_options: tuple[str, ...] = (),
        cli: list[str] | None = None,
        env: dict[str, str] | None = None,
        json_log: bool = False,
        open_files: int | None = None,
    ) -> None:
        """
        @param endpoints: role to endpoint string, for roles that must not
            listen on an OS-chosen loopback port (the others in C{roles} do).
        @param twistd: the command that runs twistd (default: the venv's).
        @param twistd_options: twistd's own options (C{--uid}...).
        @param cli: the command that runs the console script.
        @param env: the environment of both (default: L{environment}).
        @param json_log: log through C{mailserver.logs.json_stdout} (into
            C{log_path}) instead of twistd's text log.
        @param open_files: the server's C{RLIMIT_NOFILE} (soft and hard),
            if not this process's.
        """
        self.json_log = json_log
        self.open_files = open_files
        self.root = tmp_path
        self.data_path = data_path or tmp_path / "data"
        self.config_path = tmp_path / "mailserver.toml"
        self.log_path = tmp_path / "twistd.log"
        self.twistd = twistd or [str(BIN / "twistd")]
        self.twistd_options = twistd_options
        self.cli_command = cli or [str(BIN / "mailserver")]
        self.env = env or environment()
        endpoints = endpoints or {}
        listeners = "\n".join(
            f'{role} = ["{endpoints.get(role, LOOPBACK)}"]'
            if role in roles or role in endpoints
            else f"{role} = []"
            for role in ("smtp", "submission", "submissions", "pop3", "pop3s", "imap", "imaps", "admin")
        )
        domains = ", ".join(f'"{d}"' for d in local_domains)
        # Top-level keys of extra_toml must come before any table.
        first_table = re.search(r"(?m)^\[", extra_toml)
        split = first_table.start() if first_table else len(extra_toml)
        self.config_path.write_text(
            f'hostname = "mx.test"\n'
            f'data_dir = "{self.data_path}"\n'
            f"local_domains = [{domains}]\n"
            f"{extra_toml[:split]}\n"
            f"[listeners]\n{listeners}\n"
            f"{extra_toml[split:]}\n"
        )
        self.process: subprocess.Popen | None = None
        self.ports: dict[str, int] = {}
        self.output = ""  # what the process wrote on stdout and stderr, once stopped

    def _config(self):
        from mailserver.config import load

        return load(self.config_path)

    @property
    def node_path(self) -> Path:
        """
        The server's own folder in the data folder (its queue, its lock...).
        """
        return self._config().node_path

    @property
    def queue_path(self) -> Path:
        return self._config().queue_path

    def start(self, timeout: float = 20.0) -> None:
        report = self.node_path / "listeners.json"
        if report.exists():
            report.unlink()
        logging = [f"--logfile={self.log_path}"]
        stdout = subprocess.PIPE
        if self.json_log:
            logging = ["--logger=mailserver.logs.json_stdout"]
            stdout = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [
                *self.twistd,
                "--nodaemon",
                "--pidfile=",
                *logging,
                *self.twistd_options,
                "mailserver",
                "--config",
                str(self.config_path),
            ],
            cwd=self.root,
            env=self.env,
            stdout=stdout,
            stderr=subprocess.STDOUT,
            preexec_fn=self._limit_open_files if self.open_files else None,
        )
        if stdout is not subprocess.PIPE:
            stdout.close()  # the child has its own copy
        deadline = time.monotonic() + timeout
        while not report.exists():
            if self.process.poll() is not None:
                output = self.process.stdout.read().decode(errors="replace") \
                    if self.process.stdout else ""
                raise RuntimeError(f"server exited {self.process.returncode}: {output}\n{self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"server did not start in time:\n{self.log()}")
            time.sleep(0.05)
        listening = json.loads(report.read_text())
        self.ports = {
            role: int(addresses[0].rsplit(":", 1)[1]) for role, addresses in listening.items()
        }

    def _limit_open_files(self) -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.open_files, self.open_files))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 20.0) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        code = self.process.returncode
        self.output = ""
        if self.process.stdout:
            self.output = self.process.stdout.read().decode(errors="replace")
            self.process.stdout.close()
        self.process = None
        return code

    def kill(self) -> None:
        """
        SIGKILL: no clean-up, no flushing, as in a crash.
        """
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            if self.process.stdout:
                self.process.stdout.close()
            self.process = None

    def cli(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*self.cli_command, "--config", str(self.config_path), *args],
            cwd=self.root,
            env=self.env,
            input=input,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def add_user(self, address: str, password: str) -> None:
        result = self.cli("user", "add", address, "--password-stdin", input=password + "\n")
        assert result.returncode == 0, result.stderr

    def maildir(self, address: str) -> Path:
        local, domain = address.lower().rsplit("@", 1)
        return self.data_path / "mail" / domain / local
