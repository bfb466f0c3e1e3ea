"""
The start-up block: one log entry, once every listener is up, telling the
operator what runs where, from which files, as whom, and what to do next
when there is no account yet.
"""

from __future__ import annotations

import os
import platform
import pwd
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import twisted
from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger

import mailserver
from mailserver.config import Config

EMBEDDED_DEFAULT = "<embedded default>"

# What each role is for, and how it offers TLS on a plain endpoint.
_ROLES = {
    "smtp": ("MX: mail for the local domains", "STARTTLS"),
    "submission": ("submission: AUTH required, then relays", "STARTTLS"),
    "submissions": ("submission: AUTH required, then relays", "implicit TLS"),
    "pop3": ("POP3", "STLS"),
    "pop3s": ("POP3", "implicit TLS"),
    "imap": ("IMAP", "STARTTLS"),
    "imaps": ("IMAP", "implicit TLS"),
}


@dataclass(frozen=True)
class ListenerLine:
    role: str
    address: str
    endpoint: str


def cli_command() -> str:
    """
    How to run the console script installed beside this interpreter: by
    name when that is the one on C{PATH}, else by its path.
    """
    beside = Path(sys.executable).parent / "mailserver"
    if not beside.exists():
        return "mailserver"
    found = shutil.which("mailserver")
    if found and Path(found).resolve() == beside.resolve():
        return "mailserver"
    return str(beside)


def add_account_command(config: Config, command: str, cwd: Path) -> str:
    """
    The exact command that adds a first account to this server's users file.
    """
    parts = [command]
    if config.source != EMBEDDED_DEFAULT:
        parts += ["--config", str(Path(config.source).resolve())]
    parts += ["user", "add", f"postmaster@{config.local_domains[0]}"]
    line = " ".join(parts)
    # A relative data folder (the embedded default's) is found from the
    # working folder, so the command must run there.
    if not Path(config.data_dir).is_absolute() or (
        config.users_file and not Path(config.users_file).is_absolute()
    ):
        line = f"cd {cwd} && {line}"
    return line


def startup_lines(
    config: Config,
    listeners: list[ListenerLine],
    accounts: int,
    *,
    user: str,
    add_command: str,
) -> list[str]:
    """
    The block's lines, first the one that names what starts.
    """
    if config.source == EMBEDDED_DEFAULT:
        source = "embedded default (no --config given)"
    else:
        source = str(Path(config.source).resolve())
    if config.tls.certificate:
        certificate = str(Path(config.tls.certificate).resolve())
    else:
        certificate = f"{config.certificate_path.resolve()} (self-signed, made by the server)"
    lines = [
        f"mailserver {mailserver.__version__} starting (Twisted {twisted.__version__}, "
        f"Python {platform.python_version()})",
        f"  configuration:   {source}",
        f"  data folder:     {config.data_path.resolve()}",
        f"  node:            {config.node_name} ({config.node_path.resolve()})",
        f"  local domains:   {', '.join(config.local_domains)}",
        f"  TLS certificate: {certificate}",
        "  listeners:",
    ]
    width = max([len(listener.role) for listener in listeners] + [5])
    address_width = max([len(listener.address) for listener in listeners] + [5])
    for listener in listeners:
        lines.append(
            f"    {listener.role:<{width}}  {listener.address:<{address_width}}  "
            f"{_describe(listener, config)}"
        )
    if not listeners:
        lines.append("    none")
    processes = "1" if config.workers == 1 else f"{config.workers} (this one and {config.workers - 1} worker{'s' if config.workers > 2 else ''})"
    lines += [
        f"  processes:       {processes}",
        f"  running as:      {user}",
        f"  plugins:         {', '.join(config.plugins.enabled) or 'none'}",
    ]
    if accounts:
        lines.append(f"  accounts:        {accounts}")
    else:
        lines.append(f"  accounts:        none yet; add one with: {add_command}")
    return lines


def _describe(listener: ListenerLine, config: Config) -> str:
    if listener.role == "admin":
        token = "token required" if config.admin.token else "no token (loopback only)"
        return f"admin HTTP API (/health, /metrics, /api/queue), {token}"
    purpose, tls = _ROLES[listener.role]
    if listener.endpoint.startswith("ssl:"):
        tls = "TLS (ssl: endpoint)"
    return f"{purpose}; {tls}"


def _user() -> str:
    uid = os.geteuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    return f"{name} (uid {uid}, gid {os.getegid()})"


class StartupReport(Service):
    """
    Logs the start-up block once every listener listens.
    """

    log = Logger()

    def __init__(self, config: Config, listeners: list, count_accounts) -> None:
        """
        @param listeners: L{mailserver.listeners.Listener}s.
        @param count_accounts: returns how many accounts the users file has.
        """
        self._config = config
        self._listeners = listeners
        self._count_accounts = count_accounts

    def startService(self) -> None:
        super().startService()
        d = defer.gatherResults([listener.listening for listener in self._listeners])
        d.addCallback(lambda _: self._report())

    def _report(self) -> None:
        lines = startup_lines(
            self._config,
            [ListenerLine(l.role, l.address(), l.description) for l in self._listeners],
            self._count_accounts(),
            user=_user(),
            add_command=add_account_command(self._config, cli_command(), Path.cwd()),
        )
        self.log.info("{block}", block="\n".join(lines), event="server.started",
                      listeners=[f"{l.role} {l.address()}" for l in self._listeners])
