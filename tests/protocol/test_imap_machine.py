"""
The IMAP session machine alone, with no transport: its handlers return
responses and effects as values (a Login to check, an Await on the folder
store, a FetchRequest for the glue) and move the state.
"""

from functools import partial

from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock

from mailserver.folders.store import MailStore
from mailserver.folders.watch import NoWatcher
from mailserver.imap import IMAPDependencies
from mailserver.imap import responses as R
from mailserver.imap.fetcher import FetchRequest
from mailserver.imap.grammar import parse
from mailserver.imap.session import IMAPSession
from mailserver.imap.state import Connection, State
from mailserver.login_throttle import throttle_for
from mailserver.safe_fs import anonymous_file
from mailserver.testing import make_config, make_portal
from mailserver.wire.effects import CLOSE, START_TLS, Await, Login


def machine(tmp_path, loopback=True, tls_options=None) -> IMAPSession:
    clock = MemoryReactorClock()
    store = MailStore(
        lambda address: tmp_path / address, tmp_path, lambda f, *a: defer.maybeDeferred(f, *a), clock,
        NoWatcher(), "h",
    )
    config = make_config()
    deps = IMAPDependencies.for_listener(
        hostname=config.hostname, imap=config.imap, limits=config.limits, portal=make_portal(),
        store=store, login_throttle=throttle_for(config.limits, clock),
        open_spill=partial(anonymous_file, tmp_path, tmp_path), tls_options=tls_options,
        reactor=clock,
    )
    return IMAPSession(deps, Connection("192.0.2.1", "192.0.2.1:1", loopback))


def run(session, line: bytes):
    return session.command(parse([line]))


def settle(result):
    """
    Carry out Awaits (the store's Deferreds have fired) into plain results.
    """
    if isinstance(result, Await):
        outcome = []
        result.deferred.addBoth(outcome.append)
        return settle(result.then(outcome[0]))
    if isinstance(result, tuple):
        return tuple(settle(item) for item in result)
    return result


def flatten(result) -> list:
    if isinstance(result, tuple):
        return [x for item in result for x in flatten(item)]
    return [result]


def test_a_whole_session_as_values(tmp_path):
    session = machine(tmp_path)
    assert isinstance(session.greet(), R.Untagged)
    login = run(session, b"a LOGIN bob@example.org secret")
    assert login == Login(b"bob@example.org", b"secret")
    assert session.state is State.NOT_AUTHENTICATED  # until the glue says it checked
    answer = settle(session.logged_in("bob@example.org", lambda: None))
    assert answer.tag == "a" and answer.ok
    assert session.state is State.AUTHENTICATED
    (tmp_path / "bob@example.org" / "new" / "1.M1P1Q1.h,S=9,W=10").write_bytes(b"Subject:\n")
    selected = flatten(settle(run(session, b"b SELECT INBOX")))
    assert selected[-1] == R.ok("b", "Select completed.", "READ-WRITE")
    assert R.Untagged(b"1 EXISTS") in selected
    assert session.state is State.SELECTED
    fetch = run(session, b"c UID FETCH 1 BODY.PEEK[]")
    assert isinstance(fetch, FetchRequest) and fetch.messages == [(1, 1)] and not fetch.mark_seen
    assert flatten(fetch.then(False))[-1] == R.ok("c", "Fetch completed.")
    stored = flatten(settle(run(session, b"d STORE 1 +FLAGS (\\Seen)")))
    assert stored == [R.Untagged(b"1 FETCH (FLAGS (\\Seen \\Recent))"), R.ok("d", "Store completed.")]
    idle = flatten(run(session, b"e IDLE"))
    assert idle == [R.Continuation("idling")] and session.state is State.IDLE
    assert flatten(settle(session.idle_line(b"DONE")))[-1] == R.ok("e", "Idle completed.")
    logout = run(session, b"f LOGOUT")
    assert logout == (R.untagged("BYE Logging out"), R.ok("f", "Logout completed."), CLOSE)


def test_starttls_is_an_effect(tmp_path):
    session = machine(tmp_path, loopback=False, tls_options=object())
    assert "LOGINDISABLED" in session.capabilities()
    assert run(session, b"a STARTTLS") == (R.ok("a", "Begin TLS negotiation now."), START_TLS)
    assert "LOGINDISABLED" not in session.capabilities()
    assert "AUTH=PLAIN" in session.capabilities()
