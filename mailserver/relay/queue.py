"""
The durable outbound queue: what is queued, for whom, in which state.

Layout under C{<data_dir>/queue/}::

    messages/<id>        the message, hard-linked from the intake's spool file
    envelopes/<id>.json  the envelope and per-recipient state (version 1)
    tmp/                 envelope JSON being written
    requests/<id>.<verb> requests from the C{mailserver queue} command
    incoming/<id>        messages queued by another process (a worker), not
                         yet seen by the runner: empty and not synced, since
                         the runner reads every envelope when it starts
    corrupt/             entries set aside: <id>.json, <id> and <id>.problem

An envelope is the commit point: it is written to C{tmp/}, fsynced, renamed
into C{envelopes/} and the folder fsynced, after the message link is durable.
A message file without an envelope is the remains of a crash before the 250
and is removed at start; an envelope always has its message.  An envelope
that cannot be used (not JSON, truncated, an unknown version, wrong types, no
message file) raises L{CorruptEntry}; the runner then moves it and its
message into C{corrupt/} with a note of the problem (L{QueueStore.set_aside}),
so it is neither lost nor retried in a loop.

Everything here is blocking file I/O without Twisted: the intake calls
L{QueueStore.enqueue} in a worker thread, the runner calls the rest on the
reactor thread (small files) and the CLI calls it directly.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import BinaryIO

from mailserver.envelope import Envelope
from mailserver.maildir import fsync_directory, writer_alive
from mailserver.message_ids import new_message_id
from mailserver.safe_fs import open_folder, open_path

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


class CorruptEntry(QueueError):
    """
    A queued message whose files cannot be used; C{problem} says why in a
    few words and C{path} names the envelope file.
    """

    def __init__(self, queue_id: str, path: Path, problem: str) -> None:
        super().__init__(f"queued message {queue_id} is corrupt: {problem}")
        self.queue_id = queue_id
        self.path = path
        self.problem = problem


_NUMBER = "number"
_STATES = (PENDING, DELIVERED, FAILED, RELAYED)

# What each envelope field must hold (None: may be null), so a hand-edited
# or damaged file is refused when read, not halfway through an attempt.
_MESSAGE_FIELDS: dict[str, tuple] = {
    "id": (str,), "sender": (str,), "arrival": (_NUMBER,), "body_offset": (int,),
    "size": (int,), "ret": (str, None), "envid": (str, None), "body": (str,),
    "smtputf8": (bool,), "client_address": (str,), "helo": (str,), "attempts": (int,),
    "next_attempt": (_NUMBER,), "last_error": (str,), "delay_warned": (bool,),
}
_RECIPIENT_FIELDS: dict[str, tuple] = {
    "address": (str,), "original": (str,), "orcpt": (str, None), "notify": (list,),
    "state": (str,), "status": (str,), "diagnostic": (str,), "remote_mta": (str,),
    "last_attempt": (_NUMBER, None), "notified": (bool,),
}


def _fits(value, kinds: tuple) -> bool:
    for kind in kinds:
        if kind is None and value is None:
            return True
        if kind is _NUMBER and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if kind in (int, str, list) and isinstance(value, kind) and not isinstance(value, bool):
            return True
        if kind is bool and isinstance(value, bool):
            return True
    return False


def _check_fields(data: dict, fields: dict, where: str) -> None:
    for name, kinds in fields.items():
        if name in data and not _fits(data[name], kinds):
            raise ValueError(f"{where}{name} has the wrong type ({type(data[name]).__name__})")


def _check_envelope(data) -> None:
    """
    @raise ValueError: naming the first thing wrong with decoded envelope
        JSON.
    """
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    if data.get("version") != FORMAT_VERSION:
        raise ValueError(f"unknown envelope version {data.get('version')!r}")
    for name in ("id", "sender", "recipients", "arrival"):
        if name not in data:
            raise ValueError(f"no {name} field")
    _check_fields(data, _MESSAGE_FIELDS, "")
    recipients = data["recipients"]
    if not isinstance(recipients, list) or not recipients:
        raise ValueError("recipients is not a non-empty list")
    for i, r in enumerate(recipients):
        if not isinstance(r, dict) or "address" not in r:
            raise ValueError(f"recipient {i} has no address")
        _check_fields(r, _RECIPIENT_FIELDS, f"recipient {i}: ")
        if not all(isinstance(n, str) for n in r.get("notify", [])):
            raise ValueError(f"recipient {i}: notify is not a list of strings")
        if r.get("state", PENDING) not in _STATES:
            raise ValueError(f"recipient {i}: unknown state {r['state']!r}")


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
        """
        @raise ValueError: saying what is wrong, for JSON that is not a
            version 1 envelope.
        """
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ValueError(f"not valid JSON ({e})") from None
        _check_envelope(data)
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


def _write_durably(path: Path, tmp_dir: Path, text: str) -> None:
    # The writer's pid in the name lets start-up tell a crash's leftovers
    # from a live worker's file (see L{QueueStore.remove_orphans}).
    tmp = tmp_dir / (path.name + f".{os.getpid()}.{secrets.token_hex(4)}")
    fd = open_path(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
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
    Was this C{tmp/} file (C{<name>.<pid>.<hex>}) written by a process that
    can no longer be writing it?
    """
    parts = tmp_name.rsplit(".", 2)
    return len(parts) == 3 and parts[1].isdigit() and not writer_alive(int(parts[1]))


class QueueStore:
    """
    The queue folder; implements L{mailserver.intake.RelayQueue}.

    @ivar on_enqueued: called (in the worker thread!) with each new
        L{QueuedMessage}; the runner sets it to hand the message over to the
        reactor thread.  Without it (in a worker process) the id is left in
        C{incoming/} for the runner's next scan.
    """

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        """
        @param path: the queue folder (C{<data_dir>/queue}); no link is
            followed below its parent, the data folder.
        """
        self.path = Path(path)
        self._base = self.path.parent
        self.messages_path = self.path / "messages"
        self.envelopes_path = self.path / "envelopes"
        self.tmp_path = self.path / "tmp"
        self.requests_path = self.path / "requests"
        self.corrupt_path = self.path / "corrupt"
        self.incoming_path = self.path / "incoming"
        self._clock = clock
        self.on_enqueued: Callable[[QueuedMessage], None] | None = None
        self._made = False

    def _ensure(self) -> None:
        if self._made:
            return
        # Made 0700 (and synced) if missing; a link for any is refused, and
        # the files in them are opened without following one either.
        for folder in (self.messages_path, self.envelopes_path, self.tmp_path, self.requests_path,
                       self.corrupt_path, self.incoming_path):
            os.close(open_folder(self._base, folder, create=True))
        self._made = True

    # The intake's side.

    def enqueue(
        self, envelope: Envelope, recipients: tuple[str, ...], spool: Path, body_offset: int
    ) -> str:
        """
        Durably queue C{spool} for the remote C{recipients}, under the
        message's ID; blocking.

        @raise OSError: when it could not be made durable (the client then
            hears 451 and keeps the message).
        """
        self._ensure()
        now = self._clock()
        queue_id = envelope.id or new_message_id()
        message_path = self.messages_path / queue_id
        os.link(spool, message_path, follow_symlinks=False)
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
            self.on_enqueued(message)
        else:
            try:
                os.close(open_path(self.incoming_path / queue_id, os.O_WRONLY | os.O_CREAT))
            except OSError:
                pass  # it is queued all the same: the runner reads it when it next starts
        return queue_id

    # The runner's and the CLI's side.

    def save(self, message: QueuedMessage) -> None:
        self._ensure()
        _write_durably(self._envelope_path(message.id), self.tmp_path, message.to_json())

    def _envelope_path(self, queue_id: str) -> Path:
        if not queue_id or "/" in queue_id or queue_id.startswith("."):
            raise QueueError(f"{queue_id!r} is not a queue id")
        return self.envelopes_path / f"{queue_id}.json"

    def ids(self, ordered: bool = True) -> list[str]:
        """
        The ids of the envelopes on disk, in id (arrival) order unless
        C{ordered} is false (names that cannot be queue ids, such as an
        editor's hidden files, are not envelopes).
        """
        try:
            names = os.listdir(self.envelopes_path)
        except FileNotFoundError:
            return []
        ids = [n[:-5] for n in names if n.endswith(".json") and len(n) > 5 and n[0] != "."]
        if ordered:
            ids.sort()
        return ids

    def load(self, queue_id: str) -> QueuedMessage:
        """
        The envelope, checked, with its message file present.

        @raise CorruptEntry: when its files cannot be used.
        @raise QueueError: when no such message is queued.
        """
        path = self._envelope_path(queue_id)
        try:
            with os.fdopen(open_path(path), "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise QueueError(f"no queued message {queue_id}") from None
        except OSError as e:
            raise CorruptEntry(queue_id, path, f"cannot read it: {e.strerror or e}") from None
        try:
            message = QueuedMessage.from_json(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise CorruptEntry(queue_id, path, "not UTF-8 text") from None
        except (ValueError, TypeError, KeyError) as e:
            raise CorruptEntry(queue_id, path, str(e)) from None
        if message.id != queue_id:
            raise CorruptEntry(queue_id, path, f"it holds the id {message.id!r}")
        try:
            info = os.stat(self.messages_path / queue_id, follow_symlinks=False)
        except FileNotFoundError:
            if not path.exists():  # removed meanwhile: not corrupt, just gone
                raise QueueError(f"no queued message {queue_id}") from None
            raise CorruptEntry(queue_id, path, "its message file is missing") from None
        except OSError as e:
            raise CorruptEntry(queue_id, path,
                               f"cannot read its message file: {e.strerror or e}") from None
        if not stat.S_ISREG(info.st_mode) or info.st_size < message.body_offset:
            raise CorruptEntry(queue_id, path, "its message file is not the message it holds")
        return message

    def set_aside(self, queue_id: str, problem: str) -> Path:
        """
        Move a corrupt entry (envelope and message file, whichever exist)
        into C{corrupt/} beside a C{.problem} note, so an operator can look
        at it and nothing tries it again.  The message goes first: a crash
        in between leaves an envelope without its message, which is set
        aside in turn, never a message file that start-up removes as an
        orphan.

        @return: where the envelope now is.
        """
        self._ensure()
        name, n = queue_id, 0
        while any((self.corrupt_path / f"{name}{suffix}").exists()
                  for suffix in ("", ".json", ".problem")):
            n += 1
            name = f"{queue_id}.{n}"
        _write_durably(self.corrupt_path / f"{name}.problem", self.tmp_path, problem + "\n")
        for source, target in ((self.messages_path / queue_id, self.corrupt_path / name),
                               (self.envelopes_path / f"{queue_id}.json",
                                self.corrupt_path / f"{name}.json")):
            try:
                os.rename(source, target)
            except FileNotFoundError:
                continue
            fsync_directory(self.corrupt_path)
            fsync_directory(source.parent)
        return self.corrupt_path / f"{name}.json"

    def corrupt_entries(self) -> list[tuple[str, str]]:
        """
        The entries set aside, as C{(name, problem)}.
        """
        try:
            notes = sorted(p for p in self.corrupt_path.iterdir() if p.suffix == ".problem")
        except FileNotFoundError:
            return []
        out = []
        for note in notes:
            try:
                with os.fdopen(open_path(note), "rb") as f:
                    problem = f.read().decode("utf-8", "replace").strip()
            except OSError as e:
                problem = f"(note unreadable: {e.strerror})"
            out.append((note.stem, problem))
        return out

    def open_body(self, message: QueuedMessage) -> BinaryIO:
        """
        The stored message (LF line endings) positioned after the
        local-delivery C{Return-Path:} line.
        """
        f = os.fdopen(open_path(self.messages_path / message.id), "rb")
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
        never disturbed, and stale temporary files (L{remove_stale_tmp}).
        """
        self._ensure()
        cutoff = time.time() - min_age
        known = set(self.ids())
        removed = []
        for entry in os.scandir(self.messages_path):
            if entry.name in known:
                continue
            try:
                if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed.append(entry.name)
            except FileNotFoundError:
                continue
        self.remove_stale_tmp(min_age)
        return removed

    def remove_stale_tmp(self, min_age: float = 3600.0) -> None:
        """
        Remove the temporary files whose writer is gone (or, with no writer
        in the name, older than C{min_age} seconds).  Quick: C{tmp/} holds
        only the writes in progress.
        """
        self._ensure()
        cutoff = time.time() - min_age
        for entry in os.scandir(self.tmp_path):
            try:
                if _writer_gone(entry.name) or entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(entry.path)
            except FileNotFoundError:
                continue

    def take_incoming(self) -> list[str]:
        """
        The ids other processes queued since the last call, removed from
        C{incoming/}.
        """
        try:
            names = os.listdir(self.incoming_path)
        except FileNotFoundError:
            return []
        for name in names:
            try:
                os.unlink(self.incoming_path / name)
            except FileNotFoundError:
                continue
        return [name for name in names if name and not name.startswith(".")]

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
        for entry in sorted(entries, key=lambda e: e.stat(follow_symlinks=False).st_mtime):
            target, _, verb = entry.name.rpartition(".")
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                continue
            if verb in VERBS and target:
                requests.append((verb, target))
        return requests
