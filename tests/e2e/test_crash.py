"""
The crash harness: concurrent SMTP clients, a POP3 client deleting mail
and the relay working its queue, while the real server is killed with
SIGKILL at random moments, restarted on the same data folder, and killed
again.  At the end every message that got a 250 must be in each local
recipient's Maildir exactly once and byte for byte as sent (unless a POP3
session deleted it and that QUIT was answered), and at the remote MTA; no
file anywhere may be a partial or corrupted message; nothing may be left
in a C{tmp/} folder.

C{MAILSERVER_CRASH_ROUNDS} sets the number of rounds (default 20) and
C{MAILSERVER_CRASH_SEED} the random seed (printed on failure), e.g.
C{MAILSERVER_CRASH_ROUNDS=200 pytest tests/e2e/test_crash.py} by hand.
"""

from __future__ import annotations

import os
import poplib
import random
import re
import signal
import smtplib
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from harness import MailServer
from relay_fixtures import SMTPPeer, wait_until

ROUNDS = int(os.environ.get("MAILSERVER_CRASH_ROUNDS", "20"))
SEED = int(os.environ.get("MAILSERVER_CRASH_SEED", str(random.randrange(1 << 30))))

LOCAL = ("bob@localhost", "carol@localhost")
FORWARD = "fwd@localhost"  # an alias forwarding to the remote MTA
REMOTE = "dave@remote.test"
# Lines of ~80 octets: from one packet, through several reads of DATA, to
# past the size (1 MiB) where the intake spools to disk as the data arrives.
SIZES = (3, 200, 4000, 16000)
TRACE = re.compile(rb"\AReturn-Path: <[^>]*>\r?\n(Received: [^\n]*\n(?:\t[^\n]*\n)*)")
TOKEN = re.compile(rb"Message-ID: <(r\d+c\d+n\d+s\d+)@crash\.test>")

pytestmark = pytest.mark.timeout(900)


def message(token: str) -> bytes:
    """
    The message for C{token}, in CRLF form; rebuilt from the token alone,
    so any stored copy can be checked against it.
    """
    lines = int(token.rsplit("s", 1)[1])
    head = (
        f"From: crash@localhost\r\nTo: someone@localhost\r\nSubject: {token}\r\n"
        f"Message-ID: <{token}@crash.test>\r\n\r\n"
    ).encode()
    body = b"".join(
        f"{token} line {n:05d} ".encode() + b"0123456789" * 6 + b"\r\n" for n in range(lines)
    )
    return head + body + b".leading dot\r\n"


def check_copy(data: bytes, crlf: bool = False) -> str:
    """
    A stored or relayed copy: our trace fields, then the message exactly as
    sent.  Returns its token.
    """
    match = TOKEN.search(data)
    assert match, f"a stored message without its token: {data[:200]!r}"
    token = match.group(1).decode()
    sent = message(token)
    expected = sent if crlf else sent.replace(b"\r\n", b"\n")
    start = data.find(b"From: crash@localhost")
    assert start > 0 and data[start:] == expected, f"{token}: stored copy differs from what was sent"
    prefix = data[:start]
    if not crlf:
        assert TRACE.fullmatch(prefix), f"{token}: unexpected header prefix {prefix!r}"
    return token


@dataclass
class Ledger:
    """
    What the clients know: which messages got a 250, which a POP3 QUIT
    surely or maybe deleted.
    """

    acked: dict[str, tuple[str, ...]] = field(default_factory=dict)
    attempted: set[str] = field(default_factory=set)
    deleted: set[str] = field(default_factory=set)
    maybe_deleted: set[str] = field(default_factory=set)
    retrieved: int = 0
    # How each session that got past the greeting ended: 250 (or another
    # reply code that ended it), or "dropped" without a word.
    outcomes: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)


# When a round kills the server: at a random time, or just as one of these
# moments is reached (plus up to 20 ms).
MOMENTS = ("random", "data", "after-250", "pop3-quit", "queue-run")


class Moments:
    def __init__(self) -> None:
        self._events = {name: threading.Event() for name in MOMENTS}

    def reached(self, name: str) -> None:
        self._events[name].set()

    def wait(self, name: str, timeout: float) -> bool:
        return self._events[name].wait(timeout)

    def clear(self, name: str) -> None:
        self._events[name].clear()


def smtp_client(port, name, rng: random.Random, ledger: Ledger, stop, moments: Moments):
    n = 0
    while not stop.is_set():
        n += 1
        token = f"{name}n{n}s{rng.choice(SIZES)}"
        recipients = tuple(
            r for r in (*LOCAL, FORWARD) if rng.random() < 0.5
        ) or (LOCAL[0],)
        with ledger.lock:
            ledger.attempted.add(token)
        try:
            client = smtplib.SMTP("127.0.0.1", port, timeout=10)
        except (OSError, smtplib.SMTPException):
            time.sleep(0.02)  # the server is down, or not listening any more
            continue
        try:
            code = transaction(client, token, recipients, moments)
        except smtplib.SMTPResponseException as e:
            code = e.smtp_code
        except (OSError, smtplib.SMTPServerDisconnected):
            code = "dropped"
        finally:
            client.close()
        with ledger.lock:
            ledger.outcomes[code] += 1
        if code == 250:
            with ledger.lock:
                ledger.acked[token] = recipients
            moments.reached("after-250")


def transaction(client: smtplib.SMTP, token: str, recipients, moments: Moments):
    """
    One message; returns the reply code that ended it.
    """
    code, _ = client.ehlo()
    if code != 250:
        return code
    code, _ = client.mail("crash@localhost")
    if code != 250:
        return code
    for recipient in recipients:
        code, _ = client.rcpt(recipient)
        if code != 250:
            return code
    if int(token.rsplit("s", 1)[1]) >= 4000:
        moments.reached("data")  # the kill lands while the body is sent
    code, _ = client.data(message(token))
    return code


def pop3_client(port, rng: random.Random, ledger: Ledger, stop, moments: Moments):
    while not stop.is_set():
        dele: list[str] = []
        try:
            client = poplib.POP3("127.0.0.1", port, timeout=10)
            client.user(LOCAL[0])
            client.pass_("pw")
            count, _ = client.stat()
            for number in rng.sample(range(1, count + 1), min(count, 3)):
                _, lines, _ = client.retr(number)
                token = check_copy(b"\r\n".join(lines) + b"\r\n", crlf=True)
                with ledger.lock:
                    ledger.retrieved += 1
                client.dele(number)
                dele.append(token)
        except (OSError, poplib.error_proto):
            time.sleep(0.02)
            continue  # no QUIT: nothing was deleted
        try:
            if dele:
                moments.reached("pop3-quit")
            client.quit()
        except (OSError, poplib.error_proto):
            with ledger.lock:  # QUIT sent, answer lost: all, some or none went
                ledger.maybe_deleted.update(dele)
            continue
        with ledger.lock:
            ledger.deleted.update(dele)
        time.sleep(0.05)


def run_round(
    server: MailServer, rng: random.Random, number: int, ledger: Ledger, peer, stop_server
) -> None:
    stop = threading.Event()
    moments = Moments()
    threads = [
        threading.Thread(
            target=smtp_client,
            args=(server.ports["smtp"], f"r{number}c{c}", random.Random(rng.random()), ledger,
                  stop, moments),
        )
        for c in range(4)
    ]
    threads.append(
        threading.Thread(
            target=pop3_client,
            args=(server.ports["pop3"], random.Random(rng.random()), ledger, stop, moments),
        )
    )
    relayed_before = len(peer.messages)
    for thread in threads:
        thread.start()
    try:
        moment = MOMENTS[number % len(MOMENTS)]
        # Let the load build up first: at least one message acknowledged in
        # this round (however slow the machine is), then a little longer.
        moments.wait("after-250", timeout=30)
        moments.clear("after-250")  # a kill "after a 250" waits for the next one
        time.sleep(rng.uniform(0.2, 0.6))
        if moment == "queue-run":
            wait_until(lambda: len(peer.messages) > relayed_before, timeout=3, interval=0.005)
        elif moment != "random":
            moments.wait(moment, timeout=3)
        time.sleep(rng.uniform(0, 0.02 if moment != "random" else 1.0))
        stop_server()
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)


def mail_copies(server: MailServer, address: str) -> Counter:
    found: Counter = Counter()
    maildir = server.maildir(address)
    for sub in ("new", "cur"):
        for path in (maildir / sub).iterdir():
            found[check_copy(path.read_bytes())] += 1
    return found


def tmp_leftovers(server: MailServer) -> list[Path]:
    """
    Files in any C{tmp/} folder, except those the running server is
    writing at this moment (the relay saving a queue entry): both Maildir
    and queue temporary names carry the writer's pid.
    """
    live = server.process.pid if server.process is not None else None
    return [
        p
        for p in server.data_path.rglob("tmp/*")
        if p.is_file() and not (live and re.search(rf"(P{live}Q|\.{live}\.)", p.name))
    ]


class Scenario:
    """
    One server on one data folder, restarted round after round, with the
    remote MTA beside it and the clients' ledger.
    """

    def __init__(self, tmp_path: Path, workers: int) -> None:
        self.workers = workers
        self.rng = random.Random(f"{SEED}-{workers}")
        self.peer = SMTPPeer().start()
        self.server = MailServer(
            tmp_path,
            extra_toml=(
                f"workers = {workers}\n"
                "[limits]\nmin_free_space = 0\nshutdown_timeout = 10.0\n"
                f'[relay]\ntransports = ["remote.test=127.0.0.1:{self.peer.port}"]\n'
                'tls_policies = ["remote.test=none"]\n'
                'retry_schedule = ["1s"]\nmax_retry_interval = "1s"\nscan_interval = 0.5\n'
                "connect_timeout = 2.0\n"
            ),
        )
        self.server.add_user(LOCAL[0], "pw")
        self.server.add_user(LOCAL[1], "pw")
        self.server.data_path.joinpath("aliases").write_text(f"{FORWARD}: {REMOTE}\n")
        self.ledger = Ledger()
        self.rounds = 0

    def round(self, stop_server) -> None:
        self.server.start()
        if self.rounds:  # what the previous stop left in tmp/ is gone
            assert tmp_leftovers(self.server) == [], f"seed {SEED}: {tmp_leftovers(self.server)}"
        run_round(self.server, self.rng, self.rounds, self.ledger, self.peer, stop_server)
        self.rounds += 1

    def relayed(self) -> set[str]:
        return {check_copy(data, crlf=True) for _, _, data in list(self.peer.messages)}

    def finish(self) -> str:
        """
        Start once more, let the relay deliver what is queued, stop, and
        check every promise; returns a summary.
        """
        ledger, server = self.ledger, self.server
        server.start()
        remote = {t for t, r in ledger.acked.items() if FORWARD in r}
        wait_until(lambda: remote <= self.relayed(), timeout=60)
        server.stop()
        note = (
            f"seed {SEED}, {self.rounds} rounds: {len(ledger.acked)} acknowledged of "
            f"{len(ledger.attempted)}, {len(ledger.deleted)} deleted by POP3 "
            f"({len(ledger.maybe_deleted)} maybe), {ledger.retrieved} retrieved, "
            f"{len(remote)} relayed; sessions ended by {dict(ledger.outcomes)}"
        )
        assert len(ledger.acked) >= self.rounds, note  # every round really sent mail
        assert ledger.retrieved > 0, note
        for address in LOCAL:
            copies = mail_copies(server, address)
            assert max(copies.values(), default=1) == 1, f"{note}: a message stored twice"
            assert set(copies) <= ledger.attempted, note
            for token, recipients in ledger.acked.items():
                if address not in recipients:
                    continue
                if address == LOCAL[0] and token in ledger.deleted:
                    assert token not in copies, f"{note}: {token} came back after DELE+QUIT"
                elif address == LOCAL[0] and token in ledger.maybe_deleted:
                    continue
                else:
                    assert token in copies, f"{note}: acknowledged {token} lost for {address}"
        missing = remote - self.relayed()
        assert not missing, f"{note}: acknowledged relay messages never arrived: {sorted(missing)}"
        assert tmp_leftovers(server) == [], note
        return note

    def close(self) -> None:
        self.server.kill()
        self.peer.stop()


@pytest.fixture
def scenario(tmp_path, request):
    made = Scenario(tmp_path, getattr(request, "param", 1))
    yield made
    made.close()


@pytest.mark.parametrize("scenario", [1, 2], indirect=True, ids=["1-process", "2-workers"])
def test_nothing_acknowledged_is_lost_across_kill_9(scenario):
    # With two processes the primary is killed and its worker follows it.
    for _ in range(ROUNDS if scenario.workers == 1 else max(1, ROUNDS // 4)):
        scenario.round(scenario.server.kill)
    print(scenario.finish())


def test_sigterm_under_load_answers_421_and_loses_nothing(scenario):
    """
    A graceful stop: listeners close, transactions in progress are
    finished and answered, every other session hears 421, nobody is cut
    off without a reply.
    """

    def terminate() -> None:
        assert scenario.server.stop(timeout=30) is not None

    for _ in range(3):
        scenario.round(terminate)
    note = scenario.finish()
    print(note)
    assert scenario.ledger.outcomes["dropped"] == 0, note
    assert scenario.ledger.outcomes[421] > 0, note
