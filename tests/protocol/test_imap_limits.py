"""
What an IMAP client may cost the server: connections admitted under the
caps every protocol shares (L{mailserver.connection_limits}), and a large
APPEND literal held under the process's memory budget or spooled to an
anonymous file.
"""

from functools import partial

from mailserver.config import Limits
from mailserver.connection_limits import ConnectionLimits
from mailserver.imap import IMAPFactory
from mailserver.memory_budget import MemoryBudget
from mailserver.safe_fs import anonymous_file
from mailserver.smtp import SMTPFactory
from mailserver.testing import REMOTE, SMTPHarness, make_config, reply_codes
from tests.protocol.imap_harness import IMAPHarness, Later, tagged

MESSAGE = b"Subject: big\r\n\r\n" + b"0123456789abcde\r\n" * 12_000  # ~200 KiB


def _factory(tmp_path, limits: ConnectionLimits) -> IMAPFactory:
    return IMAPFactory(IMAPHarness(tmp_path).factory.dependencies, limits)


def test_connections_per_client_are_capped_with_bye_unavailable(tmp_path):
    limits = ConnectionLimits(Limits(max_connections_per_client=2), descriptors=1000, reserve=0)
    factory = _factory(tmp_path, limits)
    first, second, third = (IMAPHarness(tmp_path, factory=factory, peer=REMOTE) for _ in range(3))
    assert first.greeting.startswith(b"* OK")
    assert second.greeting.startswith(b"* OK")
    assert third.greeting == b"* BYE [UNAVAILABLE] Too many connections from your address.\r\n"
    assert third.closed
    third.lose()
    first.lose()
    assert IMAPHarness(tmp_path, factory=factory, peer=REMOTE).greeting.startswith(b"* OK")


def test_an_imap_flood_leaves_smtp_its_share(tmp_path):
    # 24 descriptors: 8 sessions, half of them promised to the two roles.
    limits = ConnectionLimits(Limits(), descriptors=24, reserve=0)
    imap_factory = _factory(tmp_path, limits)
    smtp = SMTPHarness(config=make_config())
    smtp_factory = SMTPFactory(smtp.factory.dependencies, limits)
    greetings = [IMAPHarness(tmp_path, factory=imap_factory).greeting for _ in range(7)]
    assert all(g.startswith(b"* OK") for g in greetings[:6])
    assert greetings[6] == b"* BYE [UNAVAILABLE] Server too busy, try again later.\r\n"
    assert reply_codes(SMTPHarness(factory=smtp_factory).greeting) == ["220"]


def test_shutdown_says_bye_and_refuses_newcomers(tmp_path):
    imap = IMAPHarness(tmp_path)
    done = imap.factory.shutdown()
    assert imap.read() == b"* BYE Server shutting down.\r\n"
    imap.lose()
    assert done.called
    late = IMAPHarness(tmp_path, factory=imap.factory)
    assert late.greeting == b"* BYE Server shutting down.\r\n"


def _append(imap: IMAPHarness, message: bytes, cut: int) -> bytes:
    imap.login()
    imap.send(b"a APPEND INBOX {%d+}\r\n" % len(message) + message[:cut])
    return message[cut:] + b"\r\n"


def test_a_large_literal_is_held_under_the_memory_budget_until_stored(tmp_path):
    budget = MemoryBudget(10 * 1024 * 1024)
    spills = []
    later = Later()
    imap = IMAPHarness(
        tmp_path, budget=budget, run_blocking=later,
        open_spill=lambda: spills.append(1) or anonymous_file(tmp_path, tmp_path / "spool"),
    )
    later.run()  # the login's folder set-up
    rest = _append(imap, MESSAGE, 100_000)
    later.run()
    assert 100_000 <= budget.held < 101_000
    out = imap.send(rest)
    assert later.calls  # the folder is being opened, then the message stored
    assert budget.held >= len(MESSAGE)
    later.run()
    out += imap.read()
    assert tagged(out, "a").startswith("a OK [APPENDUID")
    assert budget.held == 0
    assert spills == []
    (stored,) = (imap.maildir / "new").iterdir()
    assert stored.read_bytes() == MESSAGE.replace(b"\r\n", b"\n")


def test_a_large_literal_goes_to_a_file_when_the_budget_has_no_room(tmp_path):
    budget = MemoryBudget(64 * 1024)
    imap = IMAPHarness(tmp_path, budget=budget)
    rest = _append(imap, MESSAGE, 100_000)
    assert budget.held == 0
    assert list((tmp_path / "spool").iterdir()) == []  # the spill file has no name
    assert tagged(imap.send(rest), "a").startswith("a OK [APPENDUID")
    (stored,) = (imap.maildir / "new").iterdir()
    assert stored.read_bytes() == MESSAGE.replace(b"\r\n", b"\n")


def test_a_literal_over_a_megabyte_goes_straight_to_a_file(tmp_path):
    budget = MemoryBudget(64 * 1024 * 1024)
    message = b"Subject: huge\r\n\r\n" + (b"y" * 78 + b"\r\n") * 20_000
    imap = IMAPHarness(tmp_path, budget=budget)
    rest = _append(imap, message, 10_000)
    assert budget.held == 0
    assert tagged(imap.send(rest), "a").startswith("a OK [APPENDUID")
    (stored,) = (imap.maildir / "new").iterdir()
    assert stored.read_bytes() == message.replace(b"\r\n", b"\n")


def test_a_literal_that_cannot_be_spooled_is_refused_and_the_session_goes_on(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "spool").symlink_to(elsewhere)
    imap = IMAPHarness(
        tmp_path, budget=MemoryBudget(64 * 1024),
        open_spill=partial(anonymous_file, tmp_path, tmp_path / "spool"),
    )
    rest = _append(imap, MESSAGE, 100_000)
    out = imap.send(rest)
    assert tagged(out, "a") == "a NO [UNAVAILABLE] Cannot take the message now."
    assert list(elsewhere.iterdir()) == []
    assert tagged(imap.command("b NOOP"), "b") == "b OK NOOP completed."
