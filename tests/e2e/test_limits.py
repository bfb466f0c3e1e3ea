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
        assert log.count("authentication failed for") == checked
        assert log.count("login refused unchecked") == refused
