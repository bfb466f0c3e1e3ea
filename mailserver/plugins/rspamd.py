"""
The built-in C{rspamd} plugin: every message scanned by Rspamd at the end
of DATA, before the 250, and Rspamd's action carried out.

::

    [plugins]
    enabled = ["rspamd"]

    [plugins.rspamd]
    url = "http://127.0.0.1:11333"   # Rspamd's normal worker (or its proxy)
    password = ""                    # sent as the Password header, if set
    timeout = 15                     # seconds for the whole scan
    scan_authenticated = true        # scan what our own users send too
    fallback = "accept"              # Rspamd down or slow: "accept" (and log) or "tempfail" (451)
    max_size = 20971520              # octets; larger messages are not scanned (0: all are)
    result_header = "always"         # X-Spamd-Result: "always", "spam" or "never"

The message goes to C{/checkv2} with Rspamd's request headers (the client
C{IP}, C{Helo}, the envelope C{From} and one C{Rcpt} per recipient, the
authenticated C{User}, the C{Queue-Id} of our C{Received} field, the
session's C{TLS-Version} and C{TLS-Cipher}, our C{MTA-Name}) with C{treq};
a body over 64 KiB is streamed from the spool a piece at a time through a
C{FileBodyProducer}, so a large message neither sits in memory twice nor
holds up the reactor.

Rspamd's action:

 - C{reject}: 550 5.7.1 with Rspamd's SMTP message;
 - C{soft reject}, C{greylist}: 451 4.7.1;
 - C{add header}, C{rewrite subject}: delivered with C{X-Spam: Yes} and
   the new Subject;
 - C{no action}: delivered.

In every delivered case the changes Rspamd's C{milter} block asks for
(C{add_headers}, C{remove_headers}) are made, and C{X-Spamd-Result} is
added (per C{result_header}) unless Rspamd added its own; fields of those
names that came with the message are removed first, so a sender cannot
forge a verdict.  When Rspamd cannot be asked (refused, timed out, an HTTP
error, an answer that is not Rspamd's), C{fallback} decides: C{accept}
logs a warning and delivers unscanned, C{tempfail} answers 451 4.7.1 and
the client keeps the message.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping
from email.header import Header

import treq
from hyperlink import EncodedURL
from twisted.internet import defer
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger
from twisted.plugin import IPlugin
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer, provider

from mailserver.envelope import Envelope
from mailserver.hooks import MessageBody, MessageHeaders, PluginContext, PluginOptionsError, Reject
from mailserver.interfaces import IMessageHook, IPluginFactory

READ_SIZE = 64 * 1024
# An answer longer than this is not Rspamd's.
MAX_ANSWER = 4 * 1024 * 1024
FALLBACKS = ("accept", "tempfail")
RESULT_HEADER = ("always", "spam", "never")
SPAM_ACTIONS = ("add header", "rewrite subject")
_VERDICT_FIELDS = ("X-Spam", "X-Spamd-Result")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]+")


class ScanFailed(Exception):
    """
    Rspamd could not be asked, or did not answer as Rspamd does.
    """


class _MessageFile:
    """
    The message as Rspamd is sent it (header section, empty line, body),
    read a piece at a time, with what C{FileBodyProducer} asks of a file:
    C{seek}/C{tell} to learn the length (for Content-Length), C{read},
    C{close}.  The body is the hook's, read through its public C{chunks}.
    """

    def __init__(self, head: bytes, body: MessageBody) -> None:
        self._head = head + b"\r\n"
        self._body = body
        self._length = len(self._head) + body.size
        self._position = 0
        self._rewind()

    def _rewind(self) -> None:
        self._pieces = iter((self._head,))
        self._in_body = False
        self._buffer = bytearray()

    def _next_piece(self) -> bytes | None:
        piece = next(self._pieces, None)
        if piece is None and not self._in_body:
            self._in_body = True
            self._pieces = self._body.chunks(READ_SIZE)
            piece = next(self._pieces, None)
        return piece

    def read(self, size: int) -> bytes:
        while len(self._buffer) < size:
            piece = self._next_piece()
            if piece is None:
                break
            self._buffer += piece
        out = bytes(self._buffer[:size])
        del self._buffer[:size]
        self._position += len(out)
        return out

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = 0) -> None:
        if (offset, whence) == (0, 2):  # to learn the length
            self._position = self._length
        elif (offset, whence) == (0, 0):
            self._position = 0
            self._rewind()
        else:
            raise OSError("only a rewind or a seek to the end is supported")

    def close(self) -> None:
        """
        The body belongs to the hook runner, which closes it.
        """


@implementer(IAgentEndpointFactory)
class _Endpoints:
    """
    Where the agent connects: Rspamd is usually at an IP address
    (127.0.0.1), which is connected to directly; Twisted's default would
    look even that up in a thread, once per message.
    """

    def __init__(self, reactor, timeout: float) -> None:
        self._reactor = reactor
        self._timeout = timeout

    def endpointForURI(self, uri):
        host = uri.host.decode("ascii") if isinstance(uri.host, bytes) else uri.host
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            endpoint = HostnameEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
        else:
            kind = TCP4ClientEndpoint if ip.version == 4 else TCP6ClientEndpoint
            endpoint = kind(self._reactor, host, uri.port, timeout=self._timeout)
        if uri.scheme == b"https":
            endpoint = wrapClientTLS(optionsForClientTLS(host), endpoint)
        return endpoint


def _one_line(text: object, limit: int = 300) -> str:
    """
    Text from Rspamd made fit for an SMTP reply or a header: printable
    ASCII, one line, not too long.
    """
    if not isinstance(text, str):
        return ""
    return _UNPRINTABLE.sub(" ", text).strip()[:limit]


def request_headers(envelope: Envelope, hostname: str, password: str) -> Headers:
    """
    What Rspamd's protocol lets an MTA tell it besides the message.
    """
    fields: dict[bytes, list[bytes]] = {
        b"From": [(envelope.sender or "<>").encode("utf-8")],
        b"Rcpt": [r.address.encode("utf-8") for r in envelope.recipients],
        b"MTA-Name": [hostname.encode("ascii")],
    }
    optional = {
        b"IP": envelope.client_address,
        b"Helo": envelope.helo,
        b"User": envelope.authenticated,
        b"Queue-Id": envelope.id,
        b"TLS-Version": envelope.tls_version,
        b"TLS-Cipher": envelope.tls_cipher,
        b"Password": password,
    }
    for name, value in optional.items():
        if value:
            fields[name] = [value.encode("utf-8")]
    return Headers(fields)


def spamd_result(answer: Mapping) -> str:
    """
    The C{X-Spamd-Result} field's value, as Rspamd's own milter_headers
    writes it: the verdict, then each symbol with its score and options.
    """
    score = _number(answer.get("score"))
    required = _number(answer.get("required_score"))
    lines = [f"default: {score >= required} [{score:.2f} / {required:.2f}]"]
    symbols = answer.get("symbols")
    if isinstance(symbols, Mapping):
        for name, symbol in sorted(symbols.items()):
            if not isinstance(symbol, Mapping):
                continue
            options = symbol.get("options")
            listed = ",".join(_one_line(o, 60) for o in options) if isinstance(options, list) else ""
            lines.append(
                f"{_one_line(name, 60)}({_number(symbol.get('score')):.2f})[{_one_line(listed, 200)}]"
            )
    return ";\r\n\t".join(lines)


def _number(value: object) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def _field(name: str, value: str) -> bytes | None:
    """
    C{name: value} as a header field, folded lines kept (a continuation
    line gets a tab if it lacks white space), non-ASCII text encoded
    (RFC 2047); C{None} when the name is not a field name.
    """
    if not re.fullmatch(r"[\x21-\x39\x3b-\x7e]+", name):
        return None
    lines = value.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if not value.isascii():
        unfolded = " ".join(line.strip() for line in lines)
        lines = Header(unfolded, "utf-8", header_name=name).encode().split("\n")
    lines = [lines[0]] + [line if line[:1] in (" ", "\t") else "\t" + line for line in lines[1:]]
    folded = "\r\n".join(lines)
    return f"{name}: {folded}\r\n".encode("ascii")


def _remove(headers: MessageHeaders, name: str, which: object) -> None:
    """
    Rspamd's C{remove_headers}: 0 removes every field C{name}, N the Nth,
    -N the Nth from the end.
    """
    if not isinstance(which, int) or isinstance(which, bool):
        return
    if which == 0:
        headers.remove(name)
        return
    count = len(headers.get_all(name))
    wanted = which if which > 0 else count + which + 1
    if not 1 <= wanted <= count:
        return
    seen = iter(range(1, count + 1))
    headers.remove(name, where=lambda value: next(seen) == wanted)


@implementer(IMessageHook)
class RspamdScanner:
    log = Logger()

    def __init__(
        self,
        *,
        url: str,
        reactor,
        hostname: str,
        timeout: float = 15.0,
        password: str = "",
        scan_authenticated: bool = True,
        fallback: str = "accept",
        max_size: int = 20 * 1024 * 1024,
        result_header: str = "always",
        http: treq.client.HTTPClient | None = None,
        log: Logger | None = None,
    ) -> None:
        self.url = url.rstrip("/") + "/checkv2"
        self._parsed_url = EncodedURL.from_text(self.url)  # once, not per message
        self._reactor = reactor
        self._hostname = hostname
        self._timeout = timeout
        self._password = password
        self._scan_authenticated = scan_authenticated
        self._fallback = fallback
        self._max_size = max_size
        self._result_header = result_header
        # Rspamd closes the connection after each answer: nothing to keep.
        self._http = http or treq.client.HTTPClient(Agent.usingEndpointFactory(
            reactor, _Endpoints(reactor, timeout), pool=HTTPConnectionPool(reactor, persistent=False)
        ))
        if log is not None:
            self.log = log

    async def message(self, envelope: Envelope, headers: MessageHeaders,
                      body: MessageBody) -> Reject | None:
        if envelope.authenticated and not self._scan_authenticated:
            return None
        head = headers.to_bytes()
        size = len(head) + 2 + body.size
        if self._max_size and size > self._max_size:
            self.log.info("rspamd: not scanning {id}: {size} octets is over max_size",
                          id=envelope.id or "-", size=size, event="rspamd.not_scanned",
                          log_system="rspamd.not_scanned#info")
            return None
        scanning = defer.ensureDeferred(self._scan(envelope, head, body))
        late = self._reactor.callLater(self._timeout, scanning.cancel)
        try:
            answer = await scanning
        except ScanFailed as e:
            return self._unscanned(envelope, str(e))
        except Exception as e:  # the HTTP client's many ways of saying the peer is gone
            if not late.active():
                return self._unscanned(envelope, f"no answer in {self._timeout:g} seconds")
            return self._unscanned(envelope, f"{type(e).__name__}: {e}")
        finally:
            if late.active():
                late.cancel()
        return self._apply(answer, headers)

    async def _scan(self, envelope: Envelope, head: bytes, body: MessageBody) -> Mapping:
        if body.size <= READ_SIZE:  # one piece: no producer needed
            data = head + b"\r\n" + body.read()
        else:
            data = FileBodyProducer(_MessageFile(head, body), readSize=READ_SIZE)
        response = await self._http.post(
            self._parsed_url, data=data, allow_redirects=False,
            headers=request_headers(envelope, self._hostname, self._password),
        )
        content = await treq.content(response)
        if response.code != 200:
            raise ScanFailed(f"HTTP {response.code}: {_one_line(content.decode('utf-8', 'replace'), 100)}")
        if len(content) > MAX_ANSWER:
            raise ScanFailed("the answer is too long")
        try:
            answer = json.loads(content)
        except ValueError:
            raise ScanFailed("the answer is not JSON") from None
        if not isinstance(answer, dict) or not isinstance(answer.get("action"), str):
            raise ScanFailed("the answer has no action")
        return answer

    def _unscanned(self, envelope: Envelope, problem: str) -> Reject | None:
        if self._fallback == "tempfail":
            self.log.warn(
                "rspamd at {url} failed for {id} from {client}: {problem}; answering 451",
                url=self.url, id=envelope.id or "-", client=envelope.client_address or "-",
                problem=problem, event="rspamd.failed", log_system="rspamd.failed#warn",
            )
            return Reject(451, "4.7.1", "Content filter unavailable, please try again later",
                          reason="rspamd")
        self.log.warn(
            "rspamd at {url} failed for {id} from {client}: {problem}; delivering unscanned",
            url=self.url, id=envelope.id or "-", client=envelope.client_address or "-",
            problem=problem, event="rspamd.failed", log_system="rspamd.failed#warn",
        )
        return None

    def _apply(self, answer: Mapping, headers: MessageHeaders) -> Reject | None:
        action = answer["action"]
        messages = answer.get("messages")
        smtp_message = _one_line(messages.get("smtp_message")) if isinstance(messages, Mapping) else ""
        if action == "reject":
            return Reject(550, "5.7.1", smtp_message or "Spam message rejected", reason="rspamd")
        if action in ("soft reject", "greylist"):
            return Reject(451, "4.7.1", smtp_message or "Try again later", reason="rspamd")
        if action not in ("no action", *SPAM_ACTIONS):
            self.log.warn("rspamd answered the unknown action {action!r}: delivering",
                          action=_one_line(action, 40), event="rspamd.unknown_action",
                          log_system="rspamd.unknown_action#warn")
        for name in _VERDICT_FIELDS:
            headers.remove(name)
        milter = answer.get("milter")
        milter = milter if isinstance(milter, Mapping) else {}
        removals = milter.get("remove_headers")
        if isinstance(removals, Mapping):
            for name, which in removals.items():
                _remove(headers, str(name), which)
        added = set()
        additions = milter.get("add_headers")
        if isinstance(additions, Mapping):
            for name, spec in additions.items():
                for value in _values(spec):
                    if self._add(headers, str(name), value):
                        added.add(str(name).lower())
        spam = action in SPAM_ACTIONS
        if action == "rewrite subject" and isinstance(answer.get("subject"), str):
            headers.remove("Subject")
            self._add(headers, "Subject", answer["subject"])
        if spam and "x-spam" not in added:
            headers.add("X-Spam", "Yes")
        wanted = self._result_header == "always" or (self._result_header == "spam" and spam)
        if wanted and "x-spamd-result" not in added:
            self._add(headers, "X-Spamd-Result", spamd_result(answer))
        return None

    def _add(self, headers: MessageHeaders, name: str, value: str) -> bool:
        field = _field(name, value)
        if field is None:
            self.log.warn("rspamd asked for a header field we cannot write: {name!r}",
                          name=_one_line(name, 60), event="rspamd.bad_field",
                          log_system="rspamd.bad_field#warn")
            return False
        try:
            headers.add_raw(field)
        except ValueError:
            self.log.warn("rspamd asked for a header field we cannot write: {name!r}",
                          name=_one_line(name, 60), event="rspamd.bad_field",
                          log_system="rspamd.bad_field#warn")
            return False
        return True


def _values(spec: object) -> list[str]:
    """
    The values of one C{add_headers} entry: a string, C{{"value": ...,
    "order": ...}}, or a list of either.
    """
    if isinstance(spec, str):
        return [spec]
    if isinstance(spec, Mapping):
        value = spec.get("value")
        return [value] if isinstance(value, str) else []
    if isinstance(spec, list):
        return [v for item in spec for v in _values(item) if not isinstance(item, list)]
    return []


def _number_option(options: Mapping[str, object], key: str, default: float,
                   minimum: float = 0.0) -> float:
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= minimum:
        raise PluginOptionsError(key, f"must be a number of at least {minimum:g}")
    if value > 3600:
        raise PluginOptionsError(key, "must be at most 3600")
    return float(value)


def _choice(options: Mapping[str, object], key: str, allowed: tuple[str, ...]) -> str:
    value = options.get(key, allowed[0])
    if value not in allowed:
        raise PluginOptionsError(key, "must be " + " or ".join(f'"{a}"' for a in allowed))
    return value  # type: ignore[return-value]


@provider(IPlugin, IPluginFactory)
class RspamdPlugin:
    name = "rspamd"
    description = "Scans every message with Rspamd at the end of DATA and applies its action."

    @staticmethod
    def build(options: Mapping[str, object], context: PluginContext) -> RspamdScanner:
        known = {"url", "password", "timeout", "scan_authenticated", "fallback", "max_size",
                 "result_header"}
        for key in options:
            if key not in known:
                raise PluginOptionsError(key, "unknown option")
        url = options.get("url", "http://127.0.0.1:11333")
        if not isinstance(url, str) or not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", url):
            raise PluginOptionsError("url", "must be an http:// or https:// URL, without ? or #")
        password = options.get("password", "")
        if not isinstance(password, str) or not password.isprintable() or not password.isascii():
            raise PluginOptionsError("password", "must be a string of printable ASCII")
        scan_authenticated = options.get("scan_authenticated", True)
        if not isinstance(scan_authenticated, bool):
            raise PluginOptionsError("scan_authenticated", "must be true or false")
        max_size = options.get("max_size", 20 * 1024 * 1024)
        if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 0:
            raise PluginOptionsError("max_size", "must be a number of octets (0: no limit)")
        return RspamdScanner(
            url=url,
            reactor=context.reactor,
            hostname=context.hostname,
            timeout=_number_option(options, "timeout", 15.0, minimum=0.1),
            password=password,
            scan_authenticated=scan_authenticated,
            fallback=_choice(options, "fallback", FALLBACKS),
            max_size=max_size,
            result_header=_choice(options, "result_header", RESULT_HEADER),
            log=context.log,
        )


plugin = RspamdPlugin
