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
C{Authorization: Bearer <token>}.  The token is checked as soon as the
request's headers are in, before the path is looked at and before a byte of
the body is read: twisted.web would otherwise spool the whole body (to a
temporary file when large) before any resource sees the request.  Bodies
are capped at L{MAX_BODY} octets (413 beyond); no call needs more.
"""

from __future__ import annotations

import json
import re
from io import BytesIO
from typing import Callable, Protocol
from urllib.parse import quote

from twisted.web.http import HTTPChannel
from twisted.web.http_headers import Headers
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

# The largest request body taken: the API's calls carry none, so anything
# near this is not a client of ours.
MAX_BODY = 64 * 1024

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
    The whole API as one leaf resource: route on the path segments and the
    method, answering errors in JSON too.  Only requests that passed
    L{_AdminChannel}'s check get here.
    """

    isLeaf = True

    def __init__(
        self, metrics: Metrics, listener_states: ListenerStates, queue_view: QueueView
    ) -> None:
        super().__init__()
        self._metrics = metrics
        self._listener_states = listener_states
        self._queue_view = queue_view

    def render(self, request: Request) -> bytes:
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


_REASONS = {401: b"Unauthorized", 413: b"Content Too Large"}


class _AdminChannel(HTTPChannel):
    """
    An HTTP/1.1 connection that decides on each request from its headers
    alone: without the token, or with a declared body over L{MAX_BODY}, it
    answers at once and closes, so the body is never read.  (twisted.web's
    own answer to a malformed request works the same way.)
    """

    refused = False

    def allHeadersReceived(self) -> None:
        request = self.requests[-1]
        refusal = self.site.refusal(request.requestHeaders, self.length)
        if refusal is None:
            super().allHeadersReceived()
        else:
            self.refuse(*refusal)

    def allContentReceived(self) -> None:
        if not self.refused:  # a refused request is never served
            super().allContentReceived()

    def refuse(self, code: int, headers: dict[bytes, bytes], error: str) -> None:
        """
        Answer C{code} with C{{"error": error}} and close the connection
        without reading further.
        """
        self.refused = True
        body = b"" if self._command == b"HEAD" else json.dumps({"error": error}).encode() + b"\n"
        lines = [b"HTTP/1.1 %d %s" % (code, _REASONS[code])]
        headers = {
            b"Connection": b"close",
            b"Content-Type": b"application/json",
            b"Content-Length": b"%d" % len(body),
            **headers,
        }
        lines += [name + b": " + value for name, value in headers.items()]
        self.transport.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        self.loseConnection()


class _AdminRequest(Request):
    """
    A request whose body (at most L{MAX_BODY} octets) is held in memory and
    counted as it comes, so a chunked body cannot grow past the cap either.
    """

    def gotLength(self, length: int | None) -> None:
        self.content = BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        if self.channel.refused:
            return
        if self.content.tell() + len(data) > MAX_BODY:
            self.channel.refuse(413, {}, "request body too large")
            return
        self.content.write(data)


class _AdminSite(Site):
    """
    The admin API's site: the token check and the body cap, applied by its
    channels before a request is read further.  It writes no access log:
    monitoring polls /health and /metrics every few seconds, which would
    drown the server's own log.
    """

    protocol = _AdminChannel
    requestFactory = _AdminRequest

    def __init__(self, resource: Resource, token: bytes | None) -> None:
        super().__init__(resource)
        self._token = token

    def refusal(
        self, headers: Headers, length: int | None
    ) -> tuple[int, dict[bytes, bytes], str] | None:
        """
        Why a request with these C{headers} and body C{length} (C{None}:
        chunked, not known yet) must not be read, if it must not.
        """
        if self._token is not None:
            challenge = authorization_problem(headers, self._token)
            if challenge is not None:
                return 401, {b"WWW-Authenticate": challenge}, "unauthorized"
        if length is not None and length > MAX_BODY:
            return 413, {}, "request body too large"
        return None

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
    no authentication, which only a loopback listener may have (the
    configuration refuses others: L{mailserver.config.endpoints}).
    """
    root = _AdminResource(metrics, listener_states, queue_view)
    return _AdminSite(root, token.encode("utf-8") if token else None)
