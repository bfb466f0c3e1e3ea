"""
Named log events and the flat JSON form (mailserver/logs.py).
"""

from __future__ import annotations

import io
import json

from twisted.logger import Logger, LogLevel, LogPublisher, formatEvent, globalLogPublisher
from twisted.python import log as legacy_log

from mailserver.logs import addresses, emit, emit_failure, flatten, json_file


def captured():
    publisher = LogPublisher()
    events = []
    publisher.addObserver(events.append)
    return Logger(namespace="mailserver.test", observer=publisher), events


def test_an_event_renders_every_field_postfix_like_and_names_its_system():
    log, events = captured()
    emit(log, LogLevel.info, "relay.sent", "sent", recipient="b@remote.test",
         sender="a@example.org", code=250, reply="250 2.0.0 {ok}", id="Q1")
    [event] = events
    assert formatEvent(event) == (
        "Q1: sent to=<b@remote.test>, from=<a@example.org>, code=250, reply=250 2.0.0 {ok}")
    assert event["event"] == "relay.sent" and event["log_system"] == "relay.sent#info"
    emit(log, LogLevel.warn, "x.y", "{braces} stay", recipients=addresses(["a@b", "c@d"]))
    assert formatEvent(events[1]) == "{braces} stay to=<a@b>,<c@d>"


def test_the_flat_form():
    log, events = captured()
    emit(log, LogLevel.warn, "accounts.bad_line", "line skipped", file="/a", line=2,
         problem="no colon", recipients=addresses(["x@y"]))
    flat = flatten(events[0])
    assert list(flat) == ["time", "level", "event", "message", "file", "line", "problem",
                          "recipients"]
    assert flat["level"] == "warn" and flat["event"] == "accounts.bad_line"
    assert flat["recipients"] == ["x@y"] and flat["time"].endswith("Z")
    assert flat["message"] == "line skipped file=/a, line=2, problem=no colon, to=<x@y>"


def test_a_failure_carries_its_error_and_traceback():
    log, events = captured()
    try:
        1 / 0
    except ZeroDivisionError:
        emit_failure(log, "relay.attempt_failed", "attempt failed", id="Q2")
    flat = flatten(events[0])
    assert (flat["event"], flat["level"], flat["id"]) == ("relay.attempt_failed", "error", "Q2")
    assert flat["error"] == "ZeroDivisionError: division by zero"
    assert "Traceback" in flat["traceback"] and "1 / 0" in flat["traceback"]
    assert "log_failure" not in flat


def test_foreign_events_are_named_by_their_namespace_and_keep_only_plain_values():
    stream = io.StringIO()
    observer = json_file(stream)
    publisher = LogPublisher(observer)
    Logger(namespace="twisted.internet.base", observer=publisher).info(
        "Received {signal}", signal="SIGTERM", thing=object(), data=b"\xff", nested={"a": 1})
    line = json.loads(stream.getvalue())
    assert line["event"] == "twisted.internet.base"
    assert line["message"] == "Received SIGTERM"
    assert line["data"] == "\ufffd" and line["thing"].startswith("<object object")
    assert line["nested"] == "{'a': 1}"
    # The old twisted.python.log API.
    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        legacy_log.msg("(TCP Port 1 Closed)")
    finally:
        globalLogPublisher.removeObserver(seen.append)
    flat = flatten(seen[-1])
    assert flat["event"] == "twisted.legacy" and flat["message"] == "(TCP Port 1 Closed)"
    assert set(flat) == {"time", "level", "event", "message"}, flat
