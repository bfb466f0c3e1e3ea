"""
The durable outbound queue: what is queued, for whom, in which state.

Layout under C{<data_dir>/queue/}::

    messages/<id>        the message, hard-linked from the intake's spool file
    envelopes/<id>.json  the envelope and per-recipient state (version 1)
    tmp/                 envelope JSON being written
    requests/<id>.<verb> requests from the C{mailserver queue} command

An envelope is the commit point: it is written to C{tmp/}, fsynced, renamed
into C{envelopes/} and the folder fsynced, after the message link is durable.
A message file without an envelope is the remains of a crash before the 250
and is removed at start; an envelope always has its message.

Everything here is blocking file I/O without Twisted: the intake calls
L{QueueStore.enqueue} in a worker thread, the runner calls the rest on the
reactor thread (small files) and the CLI calls it directly.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import BinaryIO

from mailserver.envelope import Envelope
from mailserver.maildir import fsync_directory

FORMAT_VERSION = 1

PENDING = "pending"
DELIVERED = "delivered"
FAILED = "failed"
# Delivered to a server that may not pass DSN requests on (RFC 3464 "relayed").
RELAYED = "relayed"

VERBS = ("flush", "delete", "bounce")


class QueueError(ValueError):
    """
    A problem with a queue request (unknown id, bad domain), printed as one
    line by the CLI.
    """


@dataclass(frozen=True)
class RecipientState:
    """
    One remote destination of a queued message.

    @ivar address: where it goes (a remote address after alias expansion).
    @ivar original: the RCPT address the client gave.
    @ivar orcpt: the RFC 3461 ORCPT parameter, if any.
    @ivar notify: the RFC 3461 NOTIFY values (empty: not given).
    @ivar state: L{PENDING}, L{DELIVERED}, L{RELAYED} or L{FAILED}.
    @ivar status: the RFC 3463 status of the last attempt (C{"5.1.1"}).
    @ivar diagnostic: the last reply, C{"smtp; 550 5.1.1 no such user"}.
    @ivar remote_mta: the host that gave it.
    @ivar notified: whether the DSN this state calls for was sent (or is not
        wanted), so a restart does not send it twice.
    """

    address: str
    original: str = ""
    orcpt: str | None = None
    notify: tuple[str, ...] = ()
    state: str = PENDING
    status: str = ""
    diagnostic: str = ""
    remote_mta: str = ""
    last_attempt: float | None = None
    notified: bool = False

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2].lower().rstrip(".")


@dataclass(frozen=True)
class QueuedMessage:
    """
    A message's envelope in the queue.  Frozen: changes are made with
    L{dataclasses.replace} and written with L{QueueStore.save}.
    """

    id: str
    sender: str
    recipients: tuple[RecipientState, ...]
    arrival: float
    body_offset: int = 0
    size: int = 0
    ret: str | None = None
    envid: str | None = None
    body: str = "7BIT"
    smtputf8: bool = False
    client_address: str = ""
    helo: str = ""
    attempts: int = 0
    next_attempt: float = 0.0
    last_error: str = ""
    delay_warned: bool = False
    version: int = FORMAT_VERSION

    def pending(self) -> tuple[RecipientState, ...]:
        return tuple(r for r in self.recipients if r.state == PENDING)

    def to_json(self) -> str:
        data = asdict(self)
        data["recipients"] = [asdict(r) for r in self.recipients]
        return json.dumps(data, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> QueuedMessage:
        data = json.loads(text)
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"unknown envelope version {data.get('version')!r}")
        names = set(cls.__dataclass_fields__)
        recipient_names = set(RecipientState.__dataclass_fields__)
        recipients = tuple(
            RecipientState(
                **{
                    k: (tuple(v) if k == "notify" else v)
                    for k, v in r.items()
                    if k in recipient_names
                }
            )
            for r in data.pop("recipients")
        )
        return cls(recipients=recipients, **{k: v for k, v in data.items() if k in names})

    def with_recipient(self, address: str, **changes) -> QueuedMessage:
        return replace(
            self,
            recipients=tuple(
                replace(r, **changes) if r.address == address else r for r in self.recipients
            ),
        )


def _new_id(now: float) -> str:
    return f"{int(now * 1000):011x}{secrets.token_hex(3)}".upper()


def _write_durably(path: Path, tmp_dir: Path, text: str) -> None:
    # The writer's pid in the name lets start-up tell a crash's leftovers
    # from a live worker's file (see L{QueueStore.remove_orphans}).
    tmp = tmp_dir / (path.name + f".{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_directory(path.parent)


def _writer_gone(tmp_name: str) -> bool:
    """
    Was this C{tmp/} file written by a process that no longer runs (or by
    an earlier process with this one's pid, which has written nothing yet
    at start-up)?
    """
    parts = tmp_name.rsplit(".", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return False
    pid = int(parts[1])
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class QueueStore:
    """
    The queue folder; implements L{mailserver.intake.RelayQueue}.

    @ivar on_enqueued: called (in the worker thread!) with each new id; the
        runner sets it to hand the id over to the reactor thread.
    """

    def __init__(self, config, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(config.data_path) / "queue"
        self.messages_path = self.path / "messages"
        self.envelopes_path = self.path / "envelopes"
        self.tmp_path = self.path / "tmp"
        self.requests_path = self.path / "requests"
        self._clock = clock
        self.on_enqueued: Callable[[str], None] | None = None
        self._made = False

    def _ensure(self) -> None:
        if self._made:
            return
        for folder in (self.messages_path, self.envelopes_path, self.tmp_path, self.requests_path):
            folder.mkdir(parents=True, exist_ok=True)
        for folder in (self.path, self.path.parent):
            fsync_directory(folder)
        self._made = True

    # The intake's side.

    def enqueue(
        self, envelope: Envelope, recipients: tuple[str, ...], spool: Path, body_offset: int
    ) -> str:
        """
        Durably queue C{spool} for the remote C{recipients}; blocking.

        @raise OSError: when it could not be made durable (the client then
            hears 451 and keeps the message).
        """
        self._ensure()
        now = self._clock()
        queue_id = _new_id(now)
        message_path = self.messages_path / queue_id
        os.link(spool, message_path)
        try:
            fsync_directory(self.messages_path)
            states = []
            for address in recipients:
                given = next(
                    (r for r in envelope.recipients if address in r.destinations), None
                )
                states.append(
                    RecipientState(
                        address=address,
                        original=given.address if given else address,
                        orcpt=given.orcpt if given else None,
                        notify=tuple(n.upper() for n in given.notify) if given else (),
                    )
                )
            message = QueuedMessage(
                id=queue_id,
                sender=envelope.sender,
                recipients=tuple(states),
                arrival=now,
                body_offset=body_offset,
                size=os.stat(message_path).st_size - body_offset,
                ret=envelope.ret.upper() if envelope.ret else None,
                envid=envelope.envid,
                body=envelope.body,
                smtputf8=envelope.smtputf8,
                client_address=envelope.client_address,
                helo=envelope.helo,
                next_attempt=now,
            )
            self.save(message)
        except BaseException:
            os.unlink(message_path)
            raise
        if self.on_enqueued is not None:
            self.on_enqueued(queue_id)
        return queue_id

    # The runner's and the CLI's side.

    def save(self, message: QueuedMessage) -> None:
        self._ensure()
        _write_durably(self._envelope_path(message.id), self.tmp_path, message.to_json())

    def _envelope_path(self, queue_id: str) -> Path:
        if not queue_id or "/" in queue_id or queue_id.startswith("."):
            raise QueueError(f"{queue_id!r} is not a queue id")
        return self.envelopes_path / f"{queue_id}.json"

    def ids(self) -> list[str]:
        try:
            names = os.listdir(self.envelopes_path)
        except FileNotFoundError:
            return []
        return sorted(n[: -len(".json")] for n in names if n.endswith(".json"))

    def load(self, queue_id: str) -> QueuedMessage:
        """
        @raise QueueError: when no such message is queued (or its envelope is
            unreadable).
        """
        try:
            text = self._envelope_path(queue_id).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise QueueError(f"no queued message {queue_id}") from None
        try:
            return QueuedMessage.from_json(text)
        except (ValueError, TypeError, KeyError) as e:
            raise QueueError(f"queued message {queue_id} has a bad envelope: {e}") from None

    def all(self) -> list[QueuedMessage]:
        messages = []
        for queue_id in self.ids():
            try:
                messages.append(self.load(queue_id))
            except QueueError:
                continue
        return sorted(messages, key=lambda m: (m.arrival, m.id))

    def open_body(self, message: QueuedMessage) -> BinaryIO:
        """
        The stored message (LF line endings) positioned after the
        local-delivery C{Return-Path:} line.
        """
        f = open(self.messages_path / message.id, "rb")
        f.seek(message.body_offset)
        return f

    def remove(self, queue_id: str) -> None:
        """
        Take a message out of the queue: the envelope first, so a crash in
        between leaves an orphan file that start-up removes, never an
        envelope without its message.
        """
        try:
            os.unlink(self._envelope_path(queue_id))
        except FileNotFoundError:
            pass
        else:
            fsync_directory(self.envelopes_path)
        try:
            os.unlink(self.messages_path / queue_id)
        except FileNotFoundError:
            pass

    def remove_orphans(self, min_age: float = 3600.0) -> list[str]:
        """
        At start: remove message files that have no envelope (a crash
        between the link and the envelope, before the 250) when older than
        C{min_age} seconds, so an enqueue running meanwhile in a worker is
        never disturbed, and temporary files whose writer is gone (or, with
        no writer in the name, older than C{min_age}).
        """
        self._ensure()
        cutoff = time.time() - min_age
        known = set(self.ids())
        removed = []
        for folder, keep in ((self.messages_path, known), (self.tmp_path, set())):
            for entry in os.scandir(folder):
                if entry.name in keep:
                    continue
                try:
                    if folder == self.tmp_path and _writer_gone(entry.name):
                        os.unlink(entry.path)
                    elif entry.stat().st_mtime < cutoff:
                        os.unlink(entry.path)
                        if folder == self.messages_path:
                            removed.append(entry.name)
                except FileNotFoundError:
                    continue
        return removed

    # Requests from the CLI to the running server.

    def request(self, verb: str, target: str) -> None:
        """
        Ask the running server (or the next one to start) to act: C{verb} is
        one of L{VERBS}, C{target} a queue id, C{"domain:<name>"} or C{"*"}.
        """
        assert verb in VERBS
        self._ensure()
        name = f"{target.replace('/', '_')}.{verb}"
        _write_durably(self.requests_path / name, self.tmp_path, f"{self._clock()}\n")

    def take_requests(self) -> list[tuple[str, str]]:
        """
        The pending requests as C{(verb, target)}, oldest first, removed.
        """
        try:
            entries = list(os.scandir(self.requests_path))
        except FileNotFoundError:
            return []
        requests = []
        for entry in sorted(entries, key=lambda e: e.stat().st_mtime):
            target, _, verb = entry.name.rpartition(".")
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                continue
            if verb in VERBS and target:
                requests.append((verb, target))
        return requests
