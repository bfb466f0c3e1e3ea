"""
Peers for relay tests, all on 127.0.0.1 with OS-chosen ports:

  - L{DNSServer}: a real C{twisted.names} server (UDP and TCP on one port)
    in a child process, serving records for test domains from a dict (see
    L{tests.dns_zone}, whose L{ZoneResolver} unit tests use directly);
  - L{SMTPPeer}: an aiosmtpd server that records what it receives and can be
    told to answer RCPT or DATA with a 4xx or 5xx.
"""

from __future__ import annotations

import socket
import time

from tests.dns_zone import DNSProcess, ZoneResolver

__all__ = ["REMOTE_ZONE", "DNSServer", "SMTPPeer", "ZoneResolver", "free_port", "wait_until"]


# The loopback DNS server (in-process resolver and child process) is shared
# with the mail-authentication tests.
DNSServer = DNSProcess

# What the relay tests resolve: one remote domain whose MX is this machine.
REMOTE_ZONE = {
    "remote.test": {"MX": [[10, "mx1.remote.test"]]},
    "mx1.remote.test": {"A": ["127.0.0.1"]},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Recorder:
    """
    The aiosmtpd handler: keeps every message; C{rcpt_reply} and
    C{data_reply} (e.g. C{"550 5.1.1 no such user"}) refuse.
    """

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.rcpt_reply: str | None = None
        self.data_reply: str | None = None
        self.refused_data = 0  # messages answered with data_reply
        self.ehlo_seen: list[str] = []

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.rcpt_reply:
            return self.rcpt_reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.data_reply:
            self.refused_data += 1
            return self.data_reply
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
        return "250 2.0.0 OK"


class SMTPPeer:
    """
    An aiosmtpd server on 127.0.0.1:C{port} (a free one by default).
    """

    def __init__(self, port: int | None = None) -> None:
        from aiosmtpd.controller import Controller

        self.port = port or free_port()
        self.handler = Recorder()
        self.controller = Controller(self.handler, hostname="127.0.0.1", port=self.port,
                                     data_size_limit=50_000_000)

    def start(self) -> SMTPPeer:
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()

    @property
    def messages(self):
        return self.handler.messages

    def wait_for(self, count: int, timeout: float = 30.0) -> list:
        deadline = time.monotonic() + timeout
        while len(self.messages) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.messages


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()
