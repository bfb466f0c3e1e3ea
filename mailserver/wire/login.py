"""
A session's password checks, throttled per client address: the part of a
login that is the same in every protocol (SMTP AUTH, POP3 USER/PASS and
AUTH).

L{Logins.attempt} runs the portal login through the L{LoginThrottle} (an
address that failed too often lately, counting the checks of it still
running, is refused unchecked: see L{LoginThrottle.check}), and counts a
failure in the session.  What to answer, what to log
and when to close are the protocol's: the outcome says how long the answer
to a failure should be held back and whether the session has now failed
too often.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import LoginFailed
from twisted.internet import defer
from twisted.python.failure import Failure

from mailserver.interfaces import IAccount
from mailserver.login_throttle import LoginThrottle


class _Refused:
    def __repr__(self) -> str:
        return "REFUSED"


# The address has failed too often lately; its credentials were not checked.
REFUSED = _Refused()


@dataclass(frozen=True)
class LoggedIn:
    """
    @ivar avatar: the portal's avatar (an L{IAccount} by default).
    @ivar logout: to be called when the session ends.
    """

    avatar: object
    logout: Callable[[], None]


@dataclass(frozen=True)
class BadCredentials:
    """
    @ivar failures: failed logins in this session so far.
    @ivar delay: seconds to hold the answer back, growing with the
        address's recent failures.
    @ivar final: the session has failed C{max_failures} times: close it.
    """

    failures: int
    delay: float
    final: bool


@dataclass(frozen=True)
class LoginBroken:
    """
    The check itself failed (not the credentials): a temporary failure.
    """

    failure: Failure


class Logins:
    """
    @param max_failures: failed logins after which a session is to close.
    @param interface: the avatar interface asked of the portal.
    """

    def __init__(
        self, portal, throttle: LoginThrottle, *, max_failures: int, interface=IAccount
    ) -> None:
        self._portal = portal
        self._throttle = throttle
        self._max_failures = max_failures
        self._interface = interface
        self.failures = 0

    def attempt(
        self, address: str, username: bytes, password: bytes,
        gone: Callable[[], bool] = lambda: False,
    ) -> defer.Deferred | _Refused:
        """
        Check a client's credentials.

        @param address: the client's IP address, the unit of throttling.
        @param gone: whether the connection has closed meanwhile; a login
            that succeeds after that is logged out at once (no session is
            left to do it).
        @return: L{REFUSED}, or a Deferred that fires (never fails) with a
            L{LoggedIn}, L{BadCredentials} or L{LoginBroken}.
        """
        checking = self._throttle.check(
            address,
            lambda: self._portal.login(UsernamePassword(username, password), None, self._interface),
        )
        if checking is None:
            return REFUSED
        return checking.addBoth(self._checked, address, gone)

    def _checked(self, result, address: str, gone) -> LoggedIn | BadCredentials | LoginBroken:
        if not isinstance(result, Failure):
            _, avatar, logout = result
            self.failures = 0
            if gone():
                logout()
            return LoggedIn(avatar, logout)
        if not result.check(LoginFailed):  # UnauthorizedLogin is a LoginFailed
            return LoginBroken(result)
        self.failures += 1  # and counted by the throttle as it ended
        delay = self._throttle.delay(address)
        return BadCredentials(self.failures, delay, self.failures >= self._max_failures)
