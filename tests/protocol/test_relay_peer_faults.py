"""
The relay runner with its real courier against a real misbehaving SMTP
peer on 127.0.0.1 (L{tests.flaky_peer}): a peer that never greets, stalls
after the final dot, drops the connection mid-DATA, says 421 mid-session or
answers garbage fails the first attempt temporarily, within the configured
time-outs; the message stays queued and goes out once when the peer
behaves on the next attempt.
"""

from __future__ import annotations

import functools
import tempfile
import time

from twisted.internet import defer, reactor, task
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from mailserver.config import Config, Relay, TLSLevel, TLSPolicyRule, Transport
from mailserver.envelope import Envelope, Recipient
from mailserver.from_config import accounts_for
from mailserver.intake import Intake
from mailserver.relay import QueueStore, RelayRunner
from mailserver.testing import InlineCommitter
from tests.flaky_peer import listen

TIMEOUT = 0.3
BODY = b"Subject: fault\r\n\r\n" + b"line of the body\r\n" * 2000 + b".dot\r\nend\r\n"


def inline(f):
    @functools.wraps(f)
    def wrapper(self, *args, **kwargs):
        return defer.ensureDeferred(f(self, *args, **kwargs))

    return wrapper


class PeerFaultTests(unittest.TestCase):
    def start(self, script: list[str]):
        port, self.peer, listening = listen(reactor, script)
        self.addCleanup(listening.stopListening)
        folder = tempfile.TemporaryDirectory()
        self.addCleanup(folder.cleanup)
        config = Config(
            hostname="mx.test", data_dir=folder.name, local_domains=("example.org",),
            relay=Relay(transports=(Transport("remote.test", "127.0.0.1", port),),
                        tls_policies=(TLSPolicyRule("remote.test", TLSLevel.NONE),),
                        connect_timeout=TIMEOUT, command_timeout=TIMEOUT,
                        data_timeout=TIMEOUT, retry_schedule=(0.5,), scan_interval=3600),
        )
        accounts = accounts_for(config)
        accounts.add_user("s@example.org", "pw")
        self.queue = QueueStore(config.queue_path)
        self.intake = Intake(accounts=accounts, reactor=reactor, data_path=config.data_path,
                             hostname=config.hostname, min_free_space=0, queue=self.queue,
                             committer=InlineCommitter())
        runner = RelayRunner(relay=config.relay, hostname=config.hostname,
                             mta_sts_path=config.mta_sts_path, queue=self.queue,
                             intake=self.intake, reactor=reactor, accounts=accounts,
                             jitter=lambda d: d)
        runner.startService()
        self.addCleanup(runner.stopService)

    async def send(self) -> None:
        receiver = self.intake.begin(Envelope(
            sender="s@example.org",
            recipients=(Recipient(address="r@remote.test", destinations=("r@remote.test",)),)))
        receiver.write(BODY)
        await receiver.finish()

    async def until(self, predicate, timeout: float = 10.0, interval: float = 0.02):
        deadline = time.monotonic() + timeout
        while not (value := predicate()) and time.monotonic() < deadline:
            await task.deferLater(reactor, interval, lambda: None)
        return value

    def outcomes(self) -> list[tuple[float, str]]:
        """
        Every outcome the relay logs, as C{(when, reply)}, from now on.
        """
        seen: list[tuple[float, str]] = []

        def observe(event) -> None:
            if event.get("event") in ("relay.sent", "relay.deferred", "relay.bounced"):
                seen.append((time.monotonic(), event["reply"]))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        return seen

    async def check(self, behaviour: str, status: str, words: str,
                    at_least: float = 0.0) -> None:
        self.start([behaviour, "ok"])
        outcomes = self.outcomes()
        started = time.monotonic()
        await self.send()
        self.assertTrue(await self.until(lambda: len(outcomes) == 2), outcomes)
        (failed_at, first), (_, second) = outcomes
        self.assertTrue(first.startswith(("451 ", "421 ")), first)
        self.assertEqual(first.split()[1], status)
        self.assertIn(words, first)
        self.assertTrue(second.startswith("250 "), second)
        # The configured time-outs, not RFC 5321's minutes.
        self.assertGreaterEqual(failed_at - started, at_least)
        self.assertLess(failed_at - started, 5.0)
        self.assertTrue(await self.until(lambda: not self.queue.ids()))
        [(sender, recipients, data)] = self.peer.messages
        self.assertEqual((sender, recipients, data), ("s@example.org", ["r@remote.test"], BODY))
        self.assertEqual(self.peer.connections, [behaviour, "ok"])

    @inline
    async def test_no_greeting(self):
        await self.check("silent", "4.4.2", "timed out", at_least=TIMEOUT)

    @inline
    async def test_stall_after_the_final_dot(self):
        await self.check("stall-after-dot", "4.4.2", "timed out", at_least=TIMEOUT)

    @inline
    async def test_connection_dropped_mid_data(self):
        await self.check("drop-in-data", "4.4.2", "connection lost")

    @inline
    async def test_421_mid_session(self):
        await self.check("421", "4.3.2", "421 4.3.2 peer.test shutting down")

    @inline
    async def test_garbage_instead_of_a_reply(self):
        await self.check("garbage", "4.5.0", "bad reply from server")
