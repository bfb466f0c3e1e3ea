"""
What the server logs, and the JSON observer for twistd's C{--logger}.

Every event of ours has a stable name (its C{event} key, such as
C{relay.sent}) and its facts as separate keys (C{id}, C{client}, C{sender},
C{recipient}, C{code}, C{reason}, C{size}, C{ms}...).  L{emit} writes
such an event with a message that renders every field, Postfix-like
(C{ID: text key=value, key=value}), and sets its C{log_system} to the
event's name, so twistd's text log shows one line per event with the same
content as the JSON log::

    2026-12-03T14:16:00+0000 [relay.sent#info] Q1: relayed to=<b@remote.test>, ...

C{twistd --logger=mailserver.logs.json_stdout -n mailserver} writes each
event as one flat JSON object per line (L{flatten}): C{time}, C{level},
C{event}, C{message} and the fields.  Events from Twisted itself (and from
plugins that give no name) get their logger's namespace as C{event}
(C{twisted.legacy} through the old C{twisted.python.log} API); any log call
names its event by passing C{event=NAME}.  The README lists the names.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from datetime import datetime, timezone
from time import time
from typing import IO

from twisted.logger import FileLogObserver, ILogObserver, Logger, LogLevel, formatEvent

# Keys of an event that are no field: twisted.logger's own, and what the
# legacy twisted.python.log API adds.
_NOT_FIELDS = {"message", "format", "isError", "system", "time", "printed", "failure", "why",
               "event", "level"}


class Addresses(tuple):
    """
    A list of addresses as a field: written C{<a@b>,<c@d>} in the text log,
    a JSON array in the JSON log.
    """

    def __str__(self) -> str:
        return ",".join(f"<{address}>" for address in self)

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


def addresses(items: Iterable[str]) -> Addresses:
    return Addresses(items)


def _rendered(text: str, fields: dict) -> str:
    """
    The event's line: C{ID: text key=value, ...}, addresses in angle
    brackets as Postfix writes them.
    """
    shown = []
    for key, value in fields.items():
        if key == "id":
            continue
        if key == "sender":
            shown.append(f"from=<{value}>")
        elif key == "recipient":
            shown.append(f"to=<{value}>")
        elif key == "recipients":
            shown.append(f"to={value}")
        else:
            shown.append(f"{key}={value}")
    line = ", ".join(shown)
    if text:
        line = f"{text} {line}" if line else text
    return f"{fields['id']}: {line}" if "id" in fields else line


def emit(log: Logger, level: LogLevel, event: str, text: str = "", **fields) -> None:
    """
    Log the event named C{event}: C{text}, a few words for a person, then
    every field.

    The line is put together here, once, rather than by twisted.logger's
    formatter (C{string.Formatter} over every field, once per observer):
    for the events of every message that is most of their cost.  The event
    goes to the logger's observer as C{Logger.emit} would send it, less
    its check that C{level} is a L{LogLevel} (it sorts the levels on every
    call: a quarter of an event's cost).
    """
    fields.update(
        log_text=_rendered(text, fields), event=event, log_system=f"{event}#{level.name}",
        log_logger=log, log_level=level, log_namespace=log.namespace, log_source=log.source,
        log_format="{log_text}", log_time=time(),
    )
    log.observer(fields)


def emit_failure(log: Logger, event: str, text: str, failure=None, **fields) -> None:
    """
    L{emit} at the error level, with the failure (the current exception
    when C{None}) and its traceback.
    """
    log.failure("{log_text}", failure, LogLevel.error, log_text=_rendered(text, fields),
                event=event, log_system=f"{event}#error", **fields)


def _plain(value: object) -> object:
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(item) for item in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _name(event: dict) -> str:
    """
    The event's own name, else its logger's namespace (C{twisted.legacy}
    for what comes through the old C{twisted.python.log} API).
    """
    name = event.get("event")
    if isinstance(name, str) and name:
        return name
    namespace = event.get("log_namespace") or "twisted.legacy"
    return "twisted.legacy" if namespace == "log_legacy" else str(namespace)


def flatten(event: dict) -> dict:
    """
    One event as a flat JSON-ready object: C{time} (UTC, ISO 8601),
    C{level}, C{event}, C{message} (rendered), then its fields; a failure
    adds C{error} and C{traceback}.
    """
    level = event.get("log_level")
    when = datetime.fromtimestamp(event.get("log_time") or 0, timezone.utc)
    flat: dict = {
        "time": when.isoformat(timespec="microseconds").replace("+00:00", "Z"),
        "level": level.name if isinstance(level, type(LogLevel.info)) else "info",
        "event": _name(event),
        "message": formatEvent(event),
    }
    failure = event.get("log_failure")
    if failure is not None:
        flat["error"] = f"{failure.type.__name__}: {failure.getErrorMessage()}"
        flat["traceback"] = failure.getTraceback()
    for key, value in event.items():
        if key.startswith(("log_", "_")) or key in _NOT_FIELDS or key in flat:
            continue
        flat[key] = _plain(value)
    return flat


def json_line(event: dict) -> str:
    return json.dumps(flatten(event), ensure_ascii=False) + "\n"


def json_file(stream: IO[str]) -> ILogObserver:
    return FileLogObserver(stream, json_line)


def json_stdout() -> ILogObserver:
    """
    For C{twistd --logger=mailserver.logs.json_stdout}: one JSON object per
    line on the standard output twistd was started with.
    """
    return json_file(sys.stdout)
