"""
The admin HTTP API: health, metrics and the relay queue, on C{twisted.web}.

    GET  /health                  200 when every listener serves, else 503
    GET  /metrics                 Prometheus text format 0.0.4
    GET  /api/queue               a page of the queued messages, as a JSON list
                                  (?limit=N, ?after=ID; see L{QUEUE_PAGE})
    POST /api/queue/{id}/flush    202, or 404 for an unknown id

Everything it shows comes in as read-only views (a callable, a
L{QueueView}, a L{Metrics}), so this module knows nothing of sockets, queue
files or the services that own them.  With a token, every request must carry
C{Authorization: Bearer <token>}, checked before the path is looked at.
"""

from __future__ import annotations

import ipaddress
import json
import re
from typing import Callable, Protocol
from urllib.parse import quote

from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from mailserver.metrics import Metrics
from mailserver.web._bearer import authorization_problem

METRICS_CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

QUEUE_PAGE = 100
"""
Messages on one page of C{/api/queue} unless C{?limit=} says otherwise (at
most L{QUEUE_PAGE_MAX}).  The answer says C{X-Total-Count: <queued>} and,
when more follow, C{Link: </api/queue?after=<last id>&limit=N>; rel="next"}
(RFC 8288).
"""
QUEUE_PAGE_MAX = 1000

# Queue ids are upper-case hex; anything else in the path cannot name one,
# and is never handed to the queue (path segments are already URL-decoded,
# so "%2F" would otherwise arrive as "/").
_QUEUE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")


class QueueView(Protocol):
    """
    What the admin API may see and do of the relay queue.
    """

    def page(self, after: str | None, limit: int) -> tuple[list[dict], int, str | None]:
        """
        Up to C{limit} queued messages in the order to show, from the first
        after the one with id C{after} (from the start when C{None}), each
        a JSON-serialisable dict (id, sender, pending recipients, next
        attempt...); the number of messages queued; and the C{after} of the
        next page, C{None} when this is the last.
        """

    def flush(self, queue_id: str) -> bool:
        """
        Ask for an immediate delivery attempt of message C{queue_id}
        (always matching C{[A-Za-z0-9_-]{1,64}}); C{False} when no such
        message is queued.
        """


ListenerStates = Callable[[], list[dict]]
"""
The listeners as dicts C{{"role": str, "address": str, "listening": bool}}.
"""


def _json(request: Request, code: int, value: object) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(value).encode("utf-8") + b"\n"


class _AdminResource(Resource):
    """
    The whole API as one leaf resource: authenticate, then route on the
    path segments and the method, answering errors in JSON too.
    """

    isLeaf = True

    def __init__(
        self,
        metrics: Metrics,
        listener_states: ListenerStates,
        queue_view: QueueView,
        token: bytes | None,
    ) -> None:
        super().__init__()
        self._metrics = metrics
        self._listener_states = listener_states
        self._queue_view = queue_view
        self._token = token

    def render(self, request: Request) -> bytes:
        if self._token is not None:
            challenge = authorization_problem(request, self._token)
            if challenge is not None:
                request.setHeader(b"www-authenticate", challenge)
                return _json(request, 401, {"error": "unauthorized"})
        handlers = self._route(request.postpath)
        if handlers is None:
            return _json(request, 404, {"error": "not found"})
        # twisted.web answers HEAD with the GET response minus its body.
        method = b"GET" if request.method == b"HEAD" else request.method
        handler = handlers.get(method)
        if handler is None:
            allowed = sorted(handlers) + ([b"HEAD"] if b"GET" in handlers else [])
            request.setHeader(b"allow", b", ".join(allowed))
            return _json(request, 405, {"error": "method not allowed"})
        return handler(request)

    def _route(self, path: list[bytes]) -> dict[bytes, Callable[[Request], bytes]] | None:
        """
        The handlers by method for C{path}, or C{None} when nothing lives there.
        """
        if path == [b"health"]:
            return {b"GET": self._health}
        if path == [b"metrics"]:
            return {b"GET": self._render_metrics}
        if path == [b"api", b"queue"]:
            return {b"GET": self._queue}
        if len(path) == 4 and path[:2] == [b"api", b"queue"] and path[3] == b"flush":
            queue_id = path[2].decode("utf-8", "replace")
            return {b"POST": lambda request: self._flush(request, queue_id)}
        return None

    def _health(self, request: Request) -> bytes:
        listeners = list(self._listener_states())
        serving = all(listener["listening"] for listener in listeners)
        body = {"status": "ok" if serving else "unavailable", "listeners": listeners}
        return _json(request, 200 if serving else 503, body)

    def _render_metrics(self, request: Request) -> bytes:
        request.setHeader(b"content-type", METRICS_CONTENT_TYPE)
        return self._metrics.render()

    def _queue(self, request: Request) -> bytes:
        after = _argument(request, b"after")
        limit_text = _argument(request, b"limit")
        if after is not None and not _QUEUE_ID.match(after):
            return _json(request, 400, {"error": "after must be a queue id"})
        if limit_text is None:
            limit = QUEUE_PAGE
        elif limit_text.isdigit() and 1 <= int(limit_text) <= QUEUE_PAGE_MAX:
            limit = int(limit_text)
        else:
            return _json(request, 400, {"error": f"limit must be from 1 to {QUEUE_PAGE_MAX}"})
        messages, total, next_after = self._queue_view.page(after, limit)
        request.setHeader(b"x-total-count", str(total).encode("ascii"))
        if next_after is not None:
            link = f'</api/queue?after={quote(next_after, safe="")}&limit={limit}>; rel="next"'
            request.setHeader(b"link", link.encode("ascii"))
        return _json(request, 200, messages)

    def _flush(self, request: Request, queue_id: str) -> bytes:
        if not _QUEUE_ID.match(queue_id) or not self._queue_view.flush(queue_id):
            return _json(request, 404, {"error": "unknown queue id", "id": queue_id})
        return _json(request, 202, {"id": queue_id, "status": "flush requested"})


def _argument(request: Request, name: bytes) -> str | None:
    values = request.args.get(name)
    return values[-1].decode("utf-8", "replace") if values else None


class _QuietSite(Site):
    """
    A site that writes no access log: monitoring polls /health and /metrics
    every few seconds, which would drown the server's own log.
    """

    def log(self, request: Request) -> None:
        pass


def make_admin_site(
    *,
    metrics: Metrics,
    listener_states: ListenerStates,
    queue_view: QueueView,
    token: str | None,
) -> Site:
    """
    The admin API as a site to listen on.  C{token} C{None} or empty means
    no authentication, which only a loopback listener should have (see
    L{admin_listener_needs_token}).
    """
    root = _AdminResource(
        metrics, listener_states, queue_view, token.encode("utf-8") if token else None
    )
    return _QuietSite(root)


def admin_listener_needs_token(description: str) -> bool:
    """
    Whether a listener on endpoint string C{description} can be reached from
    other hosts, so that the admin API must demand a token there.

    Loopback TCP interfaces and UNIX sockets are local; every other address,
    an unparseable string or an endpoint type this cannot see through
    (C{systemd:}, plugins) needs a token.  The string is parsed by Twisted's
    own parser and listened on in a L{MemoryReactor}, so positional forms
    and defaults (C{tcp6} means C{::}) are read as the server would.
    """
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.protocol import Factory
    from twisted.internet.testing import MemoryReactor

    reactor = MemoryReactor()
    try:
        serverFromString(reactor, description).listen(Factory())
    except Exception:  # the parsers raise many types; all mean "not local"
        return True
    if reactor.unixServers:
        return False
    interfaces = [server[-1] for server in reactor.tcpServers + reactor.sslServers]
    return not interfaces or not all(_is_loopback(i) for i in interfaces)


def _is_loopback(interface: str) -> bool:
    if interface == "localhost":
        return True
    try:
        return ipaddress.ip_address(interface).is_loopback
    except ValueError:
        return False
