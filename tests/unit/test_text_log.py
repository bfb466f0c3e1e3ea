"""
The text log: the same lines as twistd's own observer writes, and the
same destination twistd would pick.
"""

from __future__ import annotations

import io
import signal
import sys

import pytest
from twisted.application.service import Application, IService, Service
from twisted.logger import ILogObserver, Logger, LogLevel, LogPublisher, textFileLogObserver
from twisted.python.failure import Failure

from mailserver.config import ConfigError, Log, load
from mailserver.logs import emit, emit_failure
from mailserver.tap import _LoggingTo
from mailserver.text_log import TextLogObserver, twistd_observer


def _both(log_calls) -> tuple[str, str]:
    """
    What twistd's observer and ours write for the same events.
    """
    theirs, ours = io.StringIO(), io.StringIO()
    publisher = LogPublisher(textFileLogObserver(theirs), TextLogObserver(ours))
    log = Logger(namespace="tests.text_log", observer=publisher)
    log_calls(log)
    return theirs.getvalue(), ours.getvalue()


def test_our_events_are_written_as_twistd_writes_them():
    def calls(log):
        emit(log, LogLevel.info, "relay.sent", "relayed", id="Q1", recipient="b@remote.test",
             relay="mx.remote.test[127.0.0.1]:25", reply="250 2.0.0 {braces} Ok")
        emit(log, LogLevel.warn, "smtp.refused", "two\nlines", id="Q2")
        emit(log, LogLevel.info, "server.note", "Grüße")

    theirs, ours = _both(calls)
    assert ours == theirs
    assert ours.count("\n") == 4  # the second line of a text is indented
    assert "[relay.sent#info] Q1: relayed to=<b@remote.test>, " in ours
    assert "\n\tlines\n" in ours


def test_other_events_go_through_twisted_s_formatter():
    def calls(log):
        log.info("a plugin's {thing}", thing="event")
        log.emit(LogLevel.info, "{log_text}", log_text="legacy text", log_system="-")
        log.debug("")  # nothing to write
        try:
            1 / 0
        except ZeroDivisionError:
            emit_failure(log, "relay.crashed", "the relay failed", id="Q3")
            log.failure("a plugin failed")

    theirs, ours = _both(calls)
    assert ours == theirs
    assert "[tests.text_log#info] a plugin's event\n" in ours
    assert "[-] legacy text\n" in ours
    assert ours.count("ZeroDivisionError") == 2


def test_time_stamps_follow_the_clock():
    out = io.StringIO()
    observer = TextLogObserver(out)
    for when in (1_700_000_000.2, 1_700_000_000.9, 1_700_000_001.0):
        observer({"log_format": "{log_text}", "log_text": "x", "log_system": "s",
                  "log_time": when})
    stamps = [line.split(" ")[0] for line in out.getvalue().splitlines()]
    assert stamps[0] == stamps[1] != stamps[2]
    assert stamps[0].startswith("2023-11-14T")


def test_a_binary_file_gets_utf8():
    out = io.BytesIO()
    TextLogObserver(out)({"log_format": "{log_text}", "log_text": "Grüße",
                          "log_system": "s", "log_time": 0.0})
    assert out.getvalue().endswith(" [s] Grüße\n".encode())


@pytest.fixture
def sigusr1():
    saved = signal.getsignal(signal.SIGUSR1)
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGUSR1, saved)


def test_the_destination_is_twistd_s(tmp_path, sigusr1):
    assert twistd_observer(None) is None
    assert twistd_observer({"syslog": True, "logfile": None, "nodaemon": False}) is None
    assert twistd_observer({"logger": "mailserver.logs.json_stdout", "nodaemon": True}) is None
    assert twistd_observer({"logfile": "-", "nodaemon": False}) is None  # twistd refuses it
    assert twistd_observer({"logfile": "-", "nodaemon": True})._out is sys.stdout
    assert twistd_observer({"logfile": None, "nodaemon": True})._out is sys.stdout

    path = tmp_path / "twistd.log"
    observer = twistd_observer({"logfile": str(path), "nodaemon": False})
    observer({"log_format": "{log_text}", "log_text": "hello", "log_system": "s",
              "log_time": 0.0})
    assert path.read_text().endswith(" [s] hello\n")
    assert signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, None)


def test_the_log_file_rotates_by_size_and_keeps_only_the_newest_old_files(tmp_path, sigusr1):
    path = tmp_path / "twistd.log"
    observer = twistd_observer({"logfile": str(path), "nodaemon": False},
                               rotate_size=10_000, keep_rotated=2)
    line = "x" * 999
    for n in range(45):  # a thousand octets and a bit a line: four rotations
        observer({"log_format": "{log_text}", "log_text": f"{n:02} {line}", "log_system": "s",
                  "log_time": 0.0})
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["twistd.log", "twistd.log.1", "twistd.log.2"]

    def numbers(name):
        return [int(line.split("] ")[1][:2]) for line in (tmp_path / name).read_text().splitlines()]

    # Ten lines reach the size; the oldest two files' worth are gone.
    assert numbers("twistd.log") == list(range(40, 45))
    assert numbers("twistd.log.1") == list(range(30, 40))
    assert numbers("twistd.log.2") == list(range(20, 30))


def test_the_log_settings_are_checked(tmp_path):
    def parse_config(text):
        path = tmp_path / "mailserver.toml"
        path.write_text(text)
        return load(path)

    with pytest.raises(ConfigError, match="rotate_size"):
        parse_config("[log]\nrotate_size = 10\n")
    with pytest.raises(ConfigError, match="keep_rotated"):
        parse_config("[log]\nkeep_rotated = 0\n")
    assert parse_config("[log]\nkeep_rotated = 3\n").log == Log(keep_rotated=3)


def test_twistd_s_application_gets_the_observer():
    observer = TextLogObserver(io.StringIO())
    server = Service()
    application = Application("mailserver")
    _LoggingTo(server, observer).setServiceParent(application)
    assert application.getComponent(ILogObserver) is observer
    root = IService(application)
    root.startService()
    try:
        assert server.running
    finally:
        root.stopService()

    # An observer the application already has stays.
    theirs = TextLogObserver(io.StringIO())
    other = Application("mailserver")
    other.setComponent(ILogObserver, theirs)
    _LoggingTo(Service(), observer).setServiceParent(other)
    assert other.getComponent(ILogObserver) is theirs


def test_a_failure_given_explicitly_is_written_with_its_traceback():
    def calls(log):
        emit_failure(log, "relay.crashed", "failed", Failure(ValueError("bad")), id="Q4")

    theirs, ours = _both(calls)
    assert ours == theirs and "ValueError: bad" in ours
