"""
What one client address can cost the real server: logins sent all at once,
many connections, memory.
"""

from __future__ import annotations

import base64
import signal
import socket
import time

import pytest

from harness import MailServer
from test_operating import _mail_until_both_processes_deliver

GUESSES = 60


class Line:
    """
    A connection read a line at a time.
    """

    def __init__(self, port: int, source: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
        self._file = self.sock.makefile("rb")

    def read(self) -> bytes:
        return self._file.readline()

    def reply(self) -> bytes:
        """
        An SMTP reply's last line.
        """
        while True:
            line = self.read()
            if len(line) < 4 or line[3:4] != b"-":
                return line

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self._file.close()
        self.sock.close()


def _guess_pop3_at_once(port: int) -> list[bytes]:
    """
    C{GUESSES} connections, each through USER, then every PASS sent before
    any answer is read.
    """
    clients = [Line(port) for _ in range(GUESSES)]
    try:
        for client in clients:
            assert client.read().startswith(b"+OK")
            client.send(b"USER bob@localhost\r\n")
        for client in clients:
            assert client.read() == b"+OK\r\n"
        for client in clients:
            client.send(b"PASS wrong\r\n")
        return [client.read() for client in clients]
    finally:
        for client in clients:
            client.close()


def _guess_smtp_at_once(port: int) -> list[bytes]:
    token = base64.b64encode(b"\0bob@localhost\0wrong")
    clients = [Line(port) for _ in range(GUESSES)]
    try:
        for client in clients:
            assert client.reply().startswith(b"220")
            client.send(b"EHLO guesser.example\r\n")
        for client in clients:
            assert client.reply().startswith(b"250 ")
        for client in clients:
            client.send(b"AUTH PLAIN " + token + b"\r\n")
        return [client.reply() for client in clients]
    finally:
        for client in clients:
            client.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_logins_sent_at_once_from_one_address_get_no_more_checks_than_the_limit(tmp_path, workers):
    limit = 20
    server = MailServer(
        tmp_path,
        extra_toml=(
            f"workers = {workers}\n[limits]\nmax_auth_failures_per_client = {limit}\n"
            "auth_failure_delay = 0.0\nmax_connections_per_client = 200\n"
        ),
    )
    server.start()
    try:
        server.add_user("bob@localhost", "right")
        pop3 = _guess_pop3_at_once(server.ports["pop3"])
        smtp = _guess_smtp_at_once(server.ports["submission"])
    finally:
        assert server.stop() in (0, -signal.SIGTERM)
    # A checked password is answered as wrong; the others are refused
    # unchecked, whichever process the kernel gave the connection.
    checked = pop3.count(b"-ERR [AUTH] Authentication failed.\r\n")
    checked += sum(answer.startswith(b"535 5.7.8") for answer in smtp)
    refused = sum(answer.startswith(b"-ERR [SYS/TEMP] Too many failed logins") for answer in pop3)
    refused += sum(answer.startswith(b"454 4.7.0") for answer in smtp)
    assert checked + refused == 2 * GUESSES, (pop3, smtp)
    assert checked <= limit
    if workers == 1:  # and the log agrees
        log = server.log()
        assert log.count("[pop3.auth_failed#") + log.count("[smtp.auth_failed#") == checked
        assert log.count("[pop3.auth_throttled#") + log.count("[smtp.auth_throttled#") == refused


def _greetings(port: int, count: int, sources) -> list[bytes]:
    """
    Open C{count} connections (from the C{sources} addresses in turn) and
    keep them open; return each one's first line (empty: closed unanswered).
    """
    clients = []
    for n in range(count):
        clients.append(Line(port, source=sources[n % len(sources)]))
    return clients, [client.read() for client in clients]


def _smtp_greeting(port: int, source: str) -> bytes:
    client = Line(port, source=source)
    try:
        client.sock.settimeout(10)
        return client.reply()
    finally:
        client.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_pop3_connections_over_the_per_client_cap_are_refused_and_smtp_still_answers(
    tmp_path, workers
):
    server = MailServer(tmp_path, extra_toml=f"workers = {workers}\n")
    server.start()
    clients = []
    try:
        if workers == 2:
            server.add_user("bob@localhost", "pw")
            _mail_until_both_processes_deliver(server)
        clients, greetings = _greetings(server.ports["pop3"], 200, ["127.0.0.1"])
        admitted = sum(g.startswith(b"+OK") for g in greetings)
        refused = greetings.count(
            b"-ERR [SYS/TEMP] Too many connections from your address, try again later.\r\n"
        )
        assert admitted + refused == 200, greetings
        # The default cap, 50, for the whole server (with two workers, 25 each).
        assert admitted == 50 if workers == 1 else 25 <= admitted <= 50
        assert _smtp_greeting(server.ports["smtp"], "127.0.0.2").startswith(b"220 ")
    finally:
        for client in clients:
            client.close()
        assert server.stop() in (0, -signal.SIGTERM)


def test_a_pop3_flood_leaves_descriptors_for_smtp(tmp_path):
    # 600 descriptors: the POP3 flood from many addresses gets some of
    # them, the rest is refused early, and SMTP keeps its part.
    server = MailServer(
        tmp_path, open_files=600, extra_toml="[limits]\nmax_connections_per_client = 10000\n"
    )
    server.start()
    clients = []
    try:
        sources = [f"127.0.{n // 250}.{n % 250 + 2}" for n in range(700)]
        clients, greetings = _greetings(server.ports["pop3"], 700, sources)
        admitted = sum(g.startswith(b"+OK") for g in greetings)
        busy = greetings.count(b"-ERR [SYS/TEMP] Server too busy, try again later.\r\n")
        assert admitted + busy + greetings.count(b"") == 700, set(greetings)
        assert 0 < admitted < 600 and busy > 0
        assert _smtp_greeting(server.ports["smtp"], "127.0.3.1").startswith(b"220 ")
    finally:
        for client in clients:
            client.close()
        server.stop()
    assert "Could not accept" not in server.log()
