"""
The relay benchmark's peers (L{bench.relay_load}): a sink that stands for
the remote MX, the loopback DNS that points at it, and the two relays, ours
and Postfix, each taking mail for C{remote.test} over SMTP and relaying it.

 - L{RelaySink}: Postfix's C{smtp-sink -c} on 127.0.0.2 (its running
   counters of sessions and messages read from its output as they change),
   or, where Postfix is not installed or we are not root, an aiosmtpd sink
   (C{bench/relay_sink.py}) printing the same counters.
 - L{BenchDNS}: the loopback C{twisted.names} zone of the tests
   (C{tests/dns_zone.py}): C{remote.test MX 10 mx1.remote.test}, C{mx1 A
   127.0.0.2}; on 127.0.0.3 port 53 when it can bind there (Postfix asks
   DNS through the C library's resolver, which only knows port 53), else
   on a free port.
 - L{MailServerRelayPeer}: our server, AUTH on its MX listener, the relay's
   resolver the zone and its port the sink's.
 - L{PostfixRelayPeer}: Postfix relaying for 127.0.0.0/8 through its C{smtp}
   client, with C{smtp_tcp_port} the sink's and either the same DNS (in a
   mount namespace whose C{/etc/resolv.conf} names the zone) or, where that
   cannot be set up, a transport map to the sink (no DNS); C{dns} says
   which.

The sink is on 127.0.0.2 rather than 127.0.0.1 because Postfix refuses to
relay to an MX host that is one of its own addresses (its smtpd listens on
127.0.0.1), whatever the port: "mail for remote.test loops back to myself".
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.peers import REPO, MailServerPeer, accepting, free_port, wait_for
from bench.system_peers import PostfixPeer

SINK_ADDRESS = "127.0.0.2"
DNS_ADDRESS = "127.0.0.3"
REMOTE_DOMAIN = "remote.test"
REMOTE_RCPT = f"user@{REMOTE_DOMAIN}"
SENDER = "bob@localhost"
PASSWORD = "bench-password"

_COUNTERS = re.compile(rb"sess=(\d+) quit=(\d+) mesg=(\d+)")


def zone() -> dict:
    return {
        # An SOA, as every real zone has: negative answers (no AAAA, no
        # MTA-STS record) carry it, so a resolver may keep them (RFC 2308).
        REMOTE_DOMAIN: {"MX": [[10, f"mx1.{REMOTE_DOMAIN}"]], "SOA": 60},
        f"mx1.{REMOTE_DOMAIN}": {"A": [SINK_ADDRESS]},
    }


def _connected(port: int) -> int:
    """
    TCP connections established to C{SINK_ADDRESS:port} right now (from
    C{/proc/net/tcp}: the sink's side of each).
    """
    octets = [int(x) for x in SINK_ADDRESS.split(".")]
    local = "".join(f"{o:02X}" for o in reversed(octets)) + f":{port:04X}"
    count = 0
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if fields[1] == local and fields[3] == "01":  # ESTABLISHED
                count += 1
    return count


class RelaySink:
    """
    The remote MX: takes every message and throws it away, counting
    sessions (connections that ended) and messages (250s to the final dot).
    A thread reads the counters as the sink prints them, with the time of
    each change, so the time of the N-th 250 is known to a few ms.
    """

    SMTP_SINK = Path("/usr/sbin/smtp-sink")

    def __init__(self) -> None:
        self.port = 0
        self.process: subprocess.Popen | None = None
        self.kind = ""
        self._lock = threading.Lock()
        self._sessions = 0
        self._messages = 0
        self._reached: list[tuple[int, float]] = []  # (messages, monotonic time), increasing
        self._reader: threading.Thread | None = None

    def __enter__(self) -> RelaySink:
        self.port = free_port()
        if self.SMTP_SINK.exists() and os.geteuid() == 0:
            self.kind = "smtp-sink"
            # -c: running counters; -u: the user after binding (required as
            # root); 1024: the listen backlog; -m: connections at once.
            argv = [str(self.SMTP_SINK), "-c", "-u", "nobody", "-m", "1000",
                    f"{SINK_ADDRESS}:{self.port}", "1024"]
        else:
            self.kind = "aiosmtpd"
            argv = [sys.executable, str(REPO / "bench" / "relay_sink.py"), SINK_ADDRESS,
                    str(self.port)]
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        wait_for(lambda: accepting_on(SINK_ADDRESS, self.port), 20, self.kind, self.process)
        # The readiness probe is a session of its own.
        deadline = time.monotonic() + 5
        while self.counts()[0] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process.stdout.close()
            self.process = None

    def _read(self) -> None:
        assert self.process is not None
        stream = self.process.stdout
        pending = b""
        while True:
            chunk = stream.read1(65536)
            if not chunk:
                return
            now = time.monotonic()
            pending += chunk
            *records, pending = re.split(rb"[\r\n]", pending)
            for record in records:
                m = _COUNTERS.search(record)
                if m is None:
                    continue
                with self._lock:
                    self._sessions = int(m.group(1))
                    messages = int(m.group(3))
                    if messages > self._messages:
                        self._messages = messages
                        self._reached.append((messages, now))

    def counts(self) -> tuple[int, int]:
        """
        (sessions ended, messages taken) so far.
        """
        with self._lock:
            return self._sessions, self._messages

    def wait_messages(self, total: int, timeout: float) -> float | None:
        """
        Wait until C{total} messages were taken; the monotonic time the
        sink reported the C{total}-th, or None after C{timeout}.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self._messages >= total:
                    return next(t for n, t in self._reached if n >= total)
            time.sleep(0.005)
        return None

    def wait_idle(self, timeout: float = 15.0) -> bool:
        """
        Wait until no connection to the sink is open (a relay that caches
        connections, like Postfix's, closes them a few seconds after its
        last message), so the session count is complete.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _connected(self.port) == 0:
                time.sleep(0.1)  # the sink prints the count once the session ends
                return True
            time.sleep(0.05)
        return False


def accepting_on(address: str, port: int) -> bool:
    import socket

    try:
        with socket.create_connection((address, port), timeout=1) as s:
            s.recv(1)
        return True
    except OSError:
        return False


class BenchDNS:
    """
    The loopback zone in a child process, on C{DNS_ADDRESS}:53 if possible.
    C{on_port_53} says whether it is (so a system resolver can ask it).
    """

    def __init__(self) -> None:
        self._process = None
        self.on_port_53 = False

    def __enter__(self) -> BenchDNS:
        sys.path.insert(0, str(REPO))
        from tests.dns_zone import DNSProcess

        try:
            self._process = DNSProcess(zone(), interface=DNS_ADDRESS, port=53)
            self.on_port_53 = True
        except RuntimeError:
            self._process = DNSProcess(zone(), interface=DNS_ADDRESS)
        return self

    def __exit__(self, *exc) -> None:
        if self._process is not None:
            self._process.stop()

    @property
    def port(self) -> int:
        return self._process.port

    @property
    def resolver(self) -> str:
        return self._process.resolver


class MailServerRelayPeer(MailServerPeer):
    """
    Our server with the default configuration except: AUTH on the MX
    listener over plaintext (the injector logs in once per connection, as
    relaying needs), no submission rate limits (Postfix has none here
    either), the relay's DNS server the zone and its remote port the
    sink's, and any C{relay_toml} lines (the A/B of a relay setting).
    """

    name = "mailserver-relay"

    def __init__(self, dns: BenchDNS, sink_port: int, relay_toml: str = "", keep: bool = False,
                 code: Path = REPO, workers: int = 1) -> None:
        super().__init__(
            users=(SENDER,), password=PASSWORD, keep=keep, code=code, workers=workers,
            extra_toml=(
                "[smtp]\nmx_auth = true\nauth_over_plaintext = true\n"
                f'[relay]\nresolver = "{dns.resolver}"\nport = {sink_port}\n{relay_toml}\n'
            ),
        )
        text = self.config_path.read_text()
        self.config_path.write_text(text.replace(
            "[limits]\n",
            "[limits]\nsubmission_messages_per_hour = 0\nsubmission_recipients_per_hour = 0\n"))

    def queued(self) -> int:
        # Message files, one per queued message whatever its layout (the
        # node's queue; a revision before nodes: the data folder's).
        for folder in [*self.data_path.glob("nodes/*/queue/messages"),
                       self.data_path / "queue" / "messages"]:
            try:
                return len(os.listdir(folder))
            except FileNotFoundError:
                continue
        return 0

    def wait_queue_empty(self, timeout: float) -> bool:
        return _wait_empty(self, timeout)


class PostfixRelayPeer(PostfixPeer):
    """
    Postfix (as L{PostfixPeer}: its own folder and configuration, smtpd on
    127.0.0.1) relaying for 127.0.0.0/8: mail for C{remote.test} leaves
    through the C{smtp} client to port C{smtp_tcp_port} = the sink's.  With
    C{dns} the client asks the same zone as ours: master runs in a mount
    namespace (C{unshare -m}) where C{/etc/resolv.conf} is bind-mounted from
    a file naming the zone's address, so nothing outside changes.  Without,
    a transport map sends C{remote.test} to C{[127.0.0.2]} (no DNS at all).
    Every other relay setting is Postfix's default: up to 20 connections
    per destination (starting at 5), the connection cache on demand.
    """

    name = "postfix-relay"

    def __init__(self, dns: BenchDNS, sink_port: int, keep: bool = False) -> None:
        super().__init__(keep)
        self.sink_port = sink_port
        self.dns = dns.on_port_53 and self.namespaces_work()
        self.resolv_conf = self.root / "resolv.conf"

    @staticmethod
    def namespaces_work() -> bool:
        unshare = shutil.which("unshare")
        if unshare is None or os.geteuid() != 0:
            return False
        probe = subprocess.run([unshare, "-m", "true"], capture_output=True, timeout=30,
                               check=False)
        return probe.returncode == 0

    def main_cf(self) -> str:
        text = super().main_cf().replace("smtp_dns_support_level = disabled\n", "")
        text += (
            "\n# Relaying (bench/relay_load.py): remote.test's MX is the sink.\n"
            f"smtp_tcp_port = {self.sink_port}\n"
        )
        if not self.dns:
            text += (f"transport_maps = texthash:{self.config_dir}/transport\n"
                     "smtp_dns_support_level = disabled\n")
        return text

    def start(self, timeout: float = 30.0) -> None:
        self.config_dir.mkdir(parents=True, exist_ok=True)
        (self.config_dir / "transport").write_text(
            f"{REMOTE_DOMAIN} smtp:[{SINK_ADDRESS}]:{self.sink_port}\n")
        self.resolv_conf.write_text(f"nameserver {DNS_ADDRESS}\noptions timeout:2 attempts:2\n")
        super().start(timeout)

    def _popen(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        if self.dns:
            argv = ["unshare", "-m", "sh", "-c", 'mount --bind "$0" /etc/resolv.conf && exec "$@"',
                    str(self.resolv_conf), *argv]
        super()._popen(argv, env)

    def wait_queue_empty(self, timeout: float) -> bool:
        return _wait_empty(self, timeout)


def _wait_empty(peer, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if peer.queued() == 0:
            return True
        time.sleep(0.02)
    return False


__all__ = ["BenchDNS", "MailServerRelayPeer", "PostfixRelayPeer", "RelaySink", "REMOTE_RCPT",
           "SENDER", "PASSWORD"]
