"""
Listener endpoint strings, checked without listening.

Each string goes through Twisted's own endpoint parser, so every form the
server will accept is accepted here, and the endpoint is then asked to
listen on L{_Recorder}, a stand-in reactor that only notes the port and
interface each TCP, SSL or UNIX listener would take.  Those are checked as
the kernel never is at parse time: a port from 0 to 65535, an interface
that is an IP address or a host name (never a string with control
characters that would be looked up in DNS), a sane backlog.  The same
record tells whether an admin listener is reachable from other hosts.
"""

from __future__ import annotations

import ipaddress
import os
import re

from mailserver.config.kinds import Kind, shown, text
from mailserver.config.errors import Invalid
from mailserver.names import host_name_problem

MAX_BACKLOG = 65535
_SYSTEMD_ENDPOINT = re.compile(r"systemd:domain=(INET|INET6|UNIX):(index=[0-9]+|name=[^:]+)")


class _Recorder:
    """
    The part of C{IReactorTCP}, C{IReactorSSL} and C{IReactorUNIX} that an
    endpoint's C{listen} calls, recording instead of listening.
    """

    def __init__(self) -> None:
        self.internet: list[tuple[int, str, int]] = []  # (port, interface, backlog)
        self.unix: list[str] = []

    def listenTCP(self, port, factory, backlog=50, interface=""):
        self.internet.append((port, interface, backlog))

    def listenSSL(self, port, factory, contextFactory, backlog=50, interface=""):
        self.internet.append((port, interface, backlog))

    def listenUNIX(self, address, factory, backlog=50, mode=0o666, wantPID=0):
        self.unix.append(address)


def _record(description: str) -> _Recorder:
    """
    @raise Invalid: Twisted's parser refuses C{description}.
    """
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.protocol import Factory

    recorder = _Recorder()
    if description.startswith("systemd:") and "LISTEN_FDS" not in os.environ:
        # The inherited sockets exist only in the socket-activated server
        # (Twisted looks them up as it parses); elsewhere, as in the console
        # script, the form alone is checked.
        if _SYSTEMD_ENDPOINT.fullmatch(description):
            return recorder
        raise Invalid(
            f"bad endpoint {shown(description)}: expected"
            " systemd:domain=INET|INET6|UNIX:index=N or systemd:domain=...:name=NAME"
        )
    try:
        endpoint = serverFromString(recorder, description)
    except Exception as e:  # the parsers raise many types; all mean "bad"
        raise Invalid(f"bad endpoint {shown(description)}: {e}") from None
    # Endpoints this stand-in cannot serve (systemd:, plugins) fail here,
    # which only means there is nothing of theirs to check.
    endpoint.listen(Factory()).addErrback(lambda failure: None)
    return recorder


def _interface_problem(interface: str) -> str | None:
    if interface == "":
        return None
    try:
        ipaddress.ip_address(interface)
    except ValueError:
        problem = host_name_problem(interface)
        if problem:
            return f"interface {shown(interface)} is not an IP address or a host name"
    return None


def endpoint(description: str) -> str:
    """
    @raise Invalid: a string the server could not listen on.
    """
    recorder = _record(description)
    for port, interface, backlog in recorder.internet:
        problem = _interface_problem(interface)
        if problem:
            raise Invalid(f"bad endpoint {shown(description)}: {problem}")
        if not 0 <= port <= 65535:
            raise Invalid(f"bad endpoint {shown(description)}: the port must be from 0 to 65535")
        if not 0 <= backlog <= MAX_BACKLOG:
            raise Invalid(
                f"bad endpoint {shown(description)}: the backlog must be from 0 to {MAX_BACKLOG}"
            )
    return description


def endpoint_kind() -> Kind:
    return text(endpoint)


def is_loopback_only(description: str) -> bool:
    """
    Whether a listener on C{description} can only be reached from this
    host: a UNIX socket, or TCP on loopback interfaces only.  An endpoint
    type this cannot see through (C{systemd:}, plugins) or an unparseable
    string counts as reachable.
    """
    try:
        recorder = _record(description)
    except Invalid:
        return False
    if recorder.unix and not recorder.internet:
        return True
    interfaces = [interface for _, interface, _ in recorder.internet]
    return bool(interfaces) and all(_is_loopback(i) for i in interfaces)


def _is_loopback(interface: str) -> bool:
    if interface == "localhost":
        return True
    try:
        return ipaddress.ip_address(interface).is_loopback
    except ValueError:
        return False
