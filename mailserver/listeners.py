"""
The server's listening sockets: one L{Listener} per endpoint string of a
role, and the C{listeners.json} report of the addresses they got.

Listeners bind in C{privilegedStartService}, which C{twistd} runs before it
drops privileges (C{--uid}/C{--gid}), so ports below 1024 work for a server
that runs as an unprivileged user.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger

from mailserver.safe_fs import write_file
from mailserver.workers import reuseport_socket, shared_address



class Listener(Service):
    """
    One endpoint string of one role, listening while the service runs.

    Unlike C{StreamServerEndpointService}, a failure to listen stops the
    start-up with one line naming the role and the endpoint.
    """

    log = Logger()

    def __init__(
        self,
        role: str,
        description: str,
        factory,
        reactor,
        share: bool = False,
    ) -> None:
        """
        @param share: bind a TCP endpoint with C{SO_REUSEPORT}, so worker
            processes can serve it too (see L{mailserver.workers}).
        """
        self.role = role
        self.description = description
        self.factory = factory
        # The factories' "Starting factory <...>" lines would say nothing
        # the start-up block does not.
        factory.noisy = False
        getattr(factory, "wrappedFactory", factory).noisy = False
        self._reactor = reactor
        self._endpoint = serverFromString(reactor, description)
        self.shared_address = shared_address(self._endpoint) if share else None
        # In a worker process: (file descriptor, address family) of the
        # listening socket the primary bound for it, served instead.
        self.inherited: tuple[int, int] | None = None
        self.port = None
        self.listening: defer.Deferred = defer.Deferred()

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._listen()

    def startService(self) -> None:
        super().startService()
        if self.port is None:  # started without the privileged step
            self._listen()

    def _listen(self) -> None:
        try:
            if self.inherited is not None:
                self._listened(self._adopt_inherited(*self.inherited))
                return
            if self.shared_address is not None:
                self._listened(self._adopt(*self.shared_address))
                return
            failures = []
            d = self._endpoint.listen(self.factory)
            d.addCallbacks(self._listened, failures.append)
            if failures:
                failures[0].raiseException()
        except Exception as e:
            raise SystemExit(
                f"cannot listen for {self.role} on {self.description!r}: {e}"
            ) from None

    def _adopt(self, family: int, host: str, port: int, backlog: int):
        sock = reuseport_socket(family, host, port, backlog)
        try:
            listening = self._reactor.adoptStreamPort(sock.fileno(), family, self.factory)
        finally:
            sock.close()  # the reactor holds its own duplicate
        address = listening.getHost()
        self.shared_address = (family, address.host, address.port, backlog)
        return listening

    def _adopt_inherited(self, fd: int, family: int):
        try:
            return self._reactor.adoptStreamPort(fd, family, self.factory)
        finally:
            os.close(fd)  # the reactor holds its own duplicate

    def state(self) -> dict[str, object]:
        """
        For C{/health}: is this listener serving?
        """
        address = self.port.getHost() if self.port is not None else None
        return {
            "role": self.role,
            "address": f"{address.host}:{address.port}" if address else self.description,
            "listening": self.port is not None and bool(self.running),
        }

    def address(self) -> str:
        """
        Where it listens, for people: C{host:port}, or the endpoint string
        for endpoints that have no such address.
        """
        address = self.port.getHost() if self.port is not None else None
        host, port = getattr(address, "host", None), getattr(address, "port", None)
        if host is None or port is None:
            return self.description
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def _listened(self, port) -> None:
        self.port = port
        self.listening.callback(port.getHost())

    def stopService(self):
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()


class ListenerReport(Service):
    """
    Writes C{<data_dir>/nodes/<node>/listeners.json} (role to C{"host:port"} list) once
    every listener is up, so scripts and tests that asked for port 0 can find
    the ports the OS chose.
    """

    def __init__(self, path: Path, listeners: list[Listener]) -> None:
        self._path = path
        self._listeners = listeners

    def startService(self) -> None:
        super().startService()
        d = defer.gatherResults([listener.listening for listener in self._listeners])
        d.addCallback(self._write)

    def _write(self, addresses) -> None:
        report: dict[str, list[str]] = {}
        for listener, address in zip(self._listeners, addresses):
            report.setdefault(listener.role, []).append(f"{address.host}:{address.port}")
        tmp = self._path.with_suffix(".tmp")
        write_file(tmp, json.dumps(report, indent=2) + "\n")
        os.replace(tmp, self._path)

    def stopService(self):
        super().stopService()
        try:
            self._path.unlink()
        except FileNotFoundError:
            pass
