"""
Throttled password checks: the outcomes a protocol answers from.
"""

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from twisted.internet.task import Clock
from zope.interface import implementer

from mailserver.interfaces import IAccount
from mailserver.login_throttle import LoginThrottle
from mailserver.wire.login import REFUSED, BadCredentials, LoggedIn, LoginBroken, Logins


@implementer(IRealm)
class Realm:
    def requestAvatar(self, avatar_id, mind, *interfaces):
        return IAccount, avatar_id.decode(), lambda: None


def logins(max_failures=3, limit=10, checker=None):
    if checker is None:
        checker = InMemoryUsernamePasswordDatabaseDontUse(bob=b"secret")
    clock = Clock()
    throttle = LoginThrottle(clock, delay=1.0, limit=limit, window=60)
    return Logins(Portal(Realm(), [checker]), throttle, max_failures=max_failures), clock


def outcome(d):
    results = []
    d.addBoth(results.append)
    (result,) = results
    return result


def test_good_credentials_log_in():
    checks, _ = logins()
    result = outcome(checks.attempt("192.0.2.1", b"bob", b"secret"))
    assert isinstance(result, LoggedIn) and result.avatar == "bob"


def test_a_login_that_succeeds_after_the_client_left_is_logged_out():
    logged_out = []

    @implementer(IRealm)
    class CountingRealm:
        def requestAvatar(self, avatar_id, mind, *interfaces):
            return IAccount, avatar_id.decode(), lambda: logged_out.append(avatar_id)

    checker = InMemoryUsernamePasswordDatabaseDontUse(bob=b"secret")
    throttle = LoginThrottle(Clock(), delay=1.0, limit=10, window=60)
    checks = Logins(Portal(CountingRealm(), [checker]), throttle, max_failures=3)
    outcome(checks.attempt("192.0.2.1", b"bob", b"secret", gone=lambda: False))
    assert logged_out == []
    result = outcome(checks.attempt("192.0.2.1", b"bob", b"secret", gone=lambda: True))
    assert isinstance(result, LoggedIn) and logged_out == [b"bob"]


def test_failures_are_counted_delayed_more_and_more_then_final():
    checks, _ = logins(max_failures=3)
    results = [outcome(checks.attempt("192.0.2.1", b"bob", b"guess")) for _ in range(3)]
    assert results == [
        BadCredentials(1, 1.0, False), BadCredentials(2, 2.0, False), BadCredentials(3, 3.0, True),
    ]


def test_a_success_clears_the_sessions_count():
    checks, _ = logins(max_failures=2)
    outcome(checks.attempt("192.0.2.1", b"bob", b"guess"))
    outcome(checks.attempt("192.0.2.1", b"bob", b"secret"))
    assert outcome(checks.attempt("192.0.2.1", b"bob", b"guess")).failures == 1


def test_an_address_that_failed_too_often_is_refused_unchecked():
    checks, clock = logins(max_failures=10, limit=2)
    outcome(checks.attempt("192.0.2.1", b"bob", b"guess"))
    outcome(checks.attempt("192.0.2.1", b"bob", b"guess"))
    assert checks.attempt("192.0.2.1", b"bob", b"secret") is REFUSED
    assert isinstance(outcome(checks.attempt("192.0.2.99", b"bob", b"secret")), LoggedIn)
    clock.advance(61)
    assert isinstance(outcome(checks.attempt("192.0.2.1", b"bob", b"secret")), LoggedIn)


def test_a_broken_check_is_not_a_failure():
    class Broken:
        credentialInterfaces = InMemoryUsernamePasswordDatabaseDontUse.credentialInterfaces

        def requestAvatarId(self, credentials):
            return defer.fail(RuntimeError("database down"))

    checks, _ = logins(checker=Broken())
    result = outcome(checks.attempt("192.0.2.1", b"bob", b"secret"))
    assert isinstance(result, LoginBroken) and result.failure.check(RuntimeError)
    assert checks.failures == 0


def test_checks_still_running_count_against_the_address():
    class Held:
        credentialInterfaces = InMemoryUsernamePasswordDatabaseDontUse.credentialInterfaces

        def __init__(self):
            self.checks = []

        def requestAvatarId(self, credentials):
            self.checks.append((credentials.username, defer.Deferred()))
            return self.checks[-1][1]

    held = Held()
    checks, _ = logins(max_failures=10, limit=2, checker=held)
    first = checks.attempt("192.0.2.1", b"bob", b"guess")
    second = checks.attempt("192.0.2.1", b"bob", b"secret")
    # Two checks running: a third waits for neither, it is refused unchecked.
    assert checks.attempt("192.0.2.1", b"bob", b"guess") is REFUSED
    assert len(held.checks) == 2
    held.checks[1][1].callback(b"bob")  # a success gives its place back
    assert isinstance(outcome(second), LoggedIn)
    third = checks.attempt("192.0.2.1", b"bob", b"guess")
    assert len(held.checks) == 3
    for _, check in (held.checks[0], held.checks[2]):
        check.errback(UnauthorizedLogin())
    assert [outcome(first).failures, outcome(third).failures] == [1, 2]
    assert checks.attempt("192.0.2.1", b"bob", b"secret") is REFUSED  # two failures now
