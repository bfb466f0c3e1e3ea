"""
What a queued message is: its envelope and each recipient's state, as the
queue stores them (JSON, version L{FORMAT_VERSION}), checked when read, and
the errors of the queue (L{mailserver.relay.queue}, where they are kept).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path

FORMAT_VERSION = 1
# The version of an envelope whose message file starts with a whole entry's
# line (C{data_offset}): a release before those refuses it as unknown
# rather than sending that line as part of the message.
OFFSET_FORMAT_VERSION = 2

PENDING = "pending"
DELIVERED = "delivered"
FAILED = "failed"
# Delivered to a server that may not pass DSN requests on (RFC 3464 "relayed").
RELAYED = "relayed"

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
    "data_offset": (int,), "size": (int,), "ret": (str, None), "envid": (str, None),
    "body": (str,), "smtputf8": (bool,), "client_address": (str,), "helo": (str,),
    "attempts": (int,), "next_attempt": (_NUMBER,), "last_error": (str,),
    "delay_warned": (bool,),
}
_RECIPIENT_FIELDS: dict[str, tuple] = {
    "address": (str,), "original": (str,), "orcpt": (str, None), "notify": (list,),
    "state": (str,), "status": (str,), "diagnostic": (str,), "remote_mta": (str,),
    "last_attempt": (_NUMBER, None), "notified": (bool,),
}


def read_envelope(raw: bytes, queue_id: str, path: Path) -> QueuedMessage:
    """
    The envelope of C{queue_id} in the bytes C{raw} read from C{path}.

    @raise CorruptEntry: saying what is wrong with them.
    """
    try:
        message = QueuedMessage.from_json(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise CorruptEntry(queue_id, path, "not UTF-8 text") from None
    except (ValueError, TypeError, KeyError) as e:
        raise CorruptEntry(queue_id, path, str(e)) from None
    if message.id != queue_id:
        raise CorruptEntry(queue_id, path, f"it holds the id {message.id!r}")
    return message


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
    if data.get("version") not in (FORMAT_VERSION, OFFSET_FORMAT_VERSION):
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
    # Where the message starts in its file: after the envelope line of a
    # file that holds both (L{mailserver.relay.queue}), else 0.
    data_offset: int = 0
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
        # One line, by the C encoder (an indented dump takes json's Python
        # one), from the fields as they are (asdict deep-copies): 5x faster,
        # and every relayed message's envelope is written in group commit.
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.data_offset:
            data["version"] = OFFSET_FORMAT_VERSION
        data["recipients"] = [{f.name: getattr(r, f.name) for f in fields(r)}
                              for r in self.recipients]
        return json.dumps(data, sort_keys=True, separators=(",", ":")) + "\n"

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
        # The version read was checked; the one written follows the fields.
        data.pop("version")
        return cls(recipients=recipients, **{k: v for k, v in data.items() if k in names})

    def with_recipient(self, address: str, **changes) -> QueuedMessage:
        return replace(
            self,
            recipients=tuple(
                replace(r, **changes) if r.address == address else r for r in self.recipients
            ),
        )
