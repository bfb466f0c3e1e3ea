"""
What plugins see and return, and the runner that calls their hooks.

The values here are the vocabulary of L{mailserver.interfaces}' hook
interfaces.  L{Hooks} calls every enabled plugin's hooks in order and turns a
plugin that raises into a logged error and a temporary failure for the client,
so no plugin can crash a session or lose a message.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from mailserver.envelope import Envelope
from mailserver.interfaces import (
    IConnectionHook,
    IDeliveredHook,
    IEnvelopeHook,
    IMessageHook,
)
from mailserver.wire.reply import Reply


class PluginOptionsError(ValueError):
    """
    Raised by a plugin's C{build} for a bad option.
    """

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


@dataclass(frozen=True)
class PluginContext:
    """
    What a plugin may use: the reactor (for timers and HTTP clients), the
    server's hostname, the folder for any state it keeps, and a logger.

    @ivar log: a L{Logger} in the namespace C{mailserver.plugins.NAME}; the
        loader (L{mailserver.plugin_loading.load_plugins}) gives each plugin
        its own, so its lines say which plugin wrote them.
    """

    reactor: Any
    hostname: str
    data_path: Any
    log: Logger = field(default_factory=lambda: Logger(namespace="mailserver.plugins"))

    def for_plugin(self, name: str) -> PluginContext:
        """
        This context with a logger of the plugin C{name}'s own.
        """
        return replace(self, log=Logger(namespace=f"mailserver.plugins.{name}"))


def _nothing_unread() -> int:
    return 0


@dataclass(frozen=True)
class Client:
    """
    The SMTP client a hook is asked about.

    @ivar _unread: what L{pending_input} asks (given by the session).
    """

    address: str
    port: int
    role: str
    helo: str = ""
    authenticated: str | None = None
    tls: bool = False
    _unread: Callable[[], int] = field(default=_nothing_unread, repr=False, compare=False)

    def pending_input(self) -> int:
        """
        Octets the client has sent that the server has not read yet.  Asked
        by a connection hook that has waited, it tells an early talker: a
        client that sent commands before the greeting (RFC 5321 4.3.1
        forbids it; spam software does it to save time).
        """
        return self._unread()


@dataclass(frozen=True, slots=True, init=False, repr=False, eq=False)
class Reject(Reply):
    """
    Refuse with this reply, e.g. C{Reject(550, "5.7.1", "Not wanted here")}:
    a L{Reply}, checked to be a refusal with an enhanced code of its class
    and one line of text, which the SMTP server answers as it is.

    @ivar reason: the word the refusal is logged and counted under (the
        C{smtp.rejected} event, the C{smtp_refusals_total} metric), e.g.
        C{"dnsbl"}; a plugin's refusals are C{plugin:NAME} unless it gives
        one.  Never client input: it is a metric label.  Not part of the
        reply (two rejects that answer the same are equal).
    """

    reason: str = ""

    def __init__(self, code: int, enhanced: str, text: str, reason: str = "") -> None:
        if not (400 <= code < 600):
            raise ValueError("a rejection needs a 4xx or 5xx code")
        if not re.fullmatch(r"[45]\.\d{1,3}\.\d{1,3}", enhanced):
            raise ValueError(f"{enhanced!r} is not an enhanced status code")
        if enhanced[0] != str(code)[0]:
            raise ValueError("the enhanced code's class must match the reply code")
        if "\r" in text or "\n" in text:
            raise ValueError("the text must be one line")
        if reason and not re.fullmatch(r"[a-z0-9][a-z0-9:._-]{0,63}", reason):
            raise ValueError(f"{reason!r} is not a reason: lower-case letters, digits, -._:")
        Reply.__init__(self, code, enhanced, (text,))
        object.__setattr__(self, "reason", reason)

    def because(self, reason: str) -> Reject:
        """
        This refusal under C{reason}, unless it has one already.
        """
        if self.reason:
            return self
        return Reject(self.code, self.enhanced, self.text, reason)


@dataclass(frozen=True)
class Rewrite:
    """
    Use C{address} instead of the recipient the client gave.
    """

    address: str


@dataclass(frozen=True)
class Delivery:
    """
    The final outcome for one recipient of one message.

    @ivar status: C{"delivered"} (stored in a local Maildir),
        C{"relayed"} (accepted by the next hop) or C{"bounced"}.
    """

    queue_id: str
    sender: str
    recipient: str
    status: str
    size: int
    detail: str = ""
    envelope: Envelope | None = field(default=None, repr=False, compare=False)


class MessageRejected(Exception):
    """
    The failure of L{mailserver.interfaces.IMessageReceiver.finish} when a
    message hook refused the message: the SMTP server answers C{reject}.
    """

    def __init__(self, reject: Reject) -> None:
        super().__init__(str(reject))
        self.reject = reject


TEMPORARY_FAILURE = Reject(451, "4.3.0", "Temporary failure, please try again later")

_HEADER_START = re.compile(rb"(?m)^(?=[^ \t\r\n])")


class MessageHeaders:
    """
    A message's header section, editable by message hooks.

    Unchanged fields keep their exact bytes (folding included), so a message
    no hook touched is stored exactly as it arrived.  The fields are split
    out only when a hook looks at them: most messages pass through untouched.
    """

    def __init__(self, raw: bytes = b"") -> None:
        self._raw = raw
        self._parsed: list[tuple[str, bytes]] | None = None  # None: exactly _raw

    @property
    def _fields(self) -> list[tuple[str, bytes]]:
        if self._parsed is None:
            self._parsed = []
            for chunk in _HEADER_START.split(self._raw):
                if chunk:
                    name = chunk.split(b":", 1)[0].decode("utf-8", "replace").strip()
                    self._parsed.append((name, chunk))
        return self._parsed

    @staticmethod
    def _render(name: str, value: str) -> bytes:
        if "\r" in value or "\n" in value or "\r" in name or ":" in name:
            raise ValueError("header names and values must be single lines")
        return f"{name}: {value}\r\n".encode("utf-8")

    def names(self) -> list[str]:
        return [name for name, _ in self._fields]

    def get_all(self, name: str) -> list[str]:
        wanted = name.lower()
        return [
            raw.split(b":", 1)[1].decode("utf-8", "replace").strip()
            for field_name, raw in self._fields
            if field_name.lower() == wanted and b":" in raw
        ]

    def get(self, name: str, default: str | None = None) -> str | None:
        values = self.get_all(name)
        return values[0] if values else default

    def add(self, name: str, value: str) -> None:
        """
        Add a field at the top, where trace and verdict fields belong.
        """
        self._fields.insert(0, (name, self._render(name, value)))

    def add_raw(self, field: bytes) -> None:
        """
        Add a field already rendered by the caller (C{b"Name: value\\r\\n"},
        possibly folded, e.g. a C{DKIM-Signature}), at the top.
        """
        lines = field[:-2].split(b"\r\n") if field.endswith(b"\r\n") else []
        name = lines[0].partition(b":")[0].strip() if lines and b":" in lines[0] else b""
        if (not name or any(b"\r" in line or b"\n" in line for line in lines)
                or any(line[:1] not in (b" ", b"\t") for line in lines[1:])):
            raise ValueError("not a header field: Name: value, folded with CRLF + WSP")
        self._fields.insert(0, (name.decode("utf-8", "replace"), field))

    def remove(self, name: str, where=None) -> int:
        """
        Remove the fields called C{name} (those whose unfolded value
        C{where(value)} is true, if C{where} is given); return how many.
        """
        wanted = name.lower()
        if self._parsed is None and wanted.isascii() and wanted.encode() not in self._raw.lower():
            return 0
        before = len(self._fields)
        self._parsed = [
            (n, raw) for n, raw in self._fields
            if n.lower() != wanted or (where is not None and not where(_value(raw)))
        ]
        return before - len(self._fields)

    def replace(self, name: str, value: str) -> None:
        self.remove(name)
        self.add(name, value)

    def to_bytes(self) -> bytes:
        if self._parsed is None:
            return self._raw
        return b"".join(raw for _, raw in self._parsed)


def _value(raw: bytes) -> str:
    value = raw.split(b":", 1)[1] if b":" in raw else b""
    return re.sub(rb"\r\n(?=[ \t])", b"", value).decode("utf-8", "replace").strip()


class MessageBody:
    """
    The body of a message (after the blank line), as a message hook sees it:
    read-only, and spooled on disk, so read it whole only if you must.
    """

    def __init__(self, file) -> None:
        self._file = file
        file.seek(0, 2)
        self.size = file.tell()

    def chunks(self, size: int = 1024 * 1024):
        self._file.seek(0)
        while chunk := self._file.read(size):
            yield chunk

    def read(self) -> bytes:
        return b"".join(self.chunks())


class Hooks:
    """
    The enabled plugins' hook objects, in configuration order.

    A hook's refusal comes back under its reason (C{plugin:NAME} unless it
    gives one); the SMTP session logs and counts it with every other
    refusal (C{smtp.rejected}, C{smtp_refusals_total}), so each defence and
    plugin gets that without code of its own.
    """

    log = Logger()

    def __init__(
        self,
        plugins: list[tuple[str, object]],
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self._plugins = plugins
        self._on_error = on_error
        self.connection_hooks = [(n, h) for n, h in plugins if IConnectionHook.providedBy(h)]
        self.envelope_hooks = [(n, h) for n, h in plugins if IEnvelopeHook.providedBy(h)]
        self.message_hooks = [(n, h) for n, h in plugins if IMessageHook.providedBy(h)]
        self.delivered_hooks = [(n, h) for n, h in plugins if IDeliveredHook.providedBy(h)]

    def __bool__(self) -> bool:
        return bool(self._plugins)

    def _failed(self, name: str, hook: str, error: BaseException) -> Reject:
        self.log.failure(
            "plugin {plugin} failed in {hook}", failure=_as_failure(error), plugin=name, hook=hook,
            event="plugin.failed", log_system="plugin.failed#critical",
        )
        if self._on_error is not None:
            self._on_error(name)
        return TEMPORARY_FAILURE.because(_plugin_reason(name))

    async def _call(self, name: str, hook: str, method, *args, answers: bool = True) -> object:
        try:
            result = method(*args)
            if isinstance(result, defer.Deferred) or hasattr(result, "__await__"):
                result = await result
        except Exception as e:
            return self._failed(name, hook, e)
        if answers and result is not None and not isinstance(result, (Reject, Rewrite)):
            return self._failed(
                name, hook, TypeError(f"{hook} returned {result!r}, not None/Reject/Rewrite")
            )
        if isinstance(result, Reject):
            return result.because(_plugin_reason(name))
        return result

    async def connection(self, client: Client) -> Reject | None:
        for name, hook in self.connection_hooks:
            result = await self._call(name, "connection", hook.connection, client)
            if isinstance(result, Reject):
                return result
        return None

    async def sender(self, client: Client, address: str) -> Reject | None:
        for name, hook in self.envelope_hooks:
            result = await self._call(name, "sender", hook.sender, client, address)
            if isinstance(result, Reject):
                return result
        return None

    async def recipient(self, client: Client, sender: str, address: str) -> Reject | str:
        """
        @return: the rejection, or the (possibly rewritten) address.
        """
        for name, hook in self.envelope_hooks:
            result = await self._call(name, "recipient", hook.recipient, client, sender, address)
            if isinstance(result, Reject):
                return result
            if isinstance(result, Rewrite):
                address = result.address
        return address

    async def message(
        self, envelope: Envelope, headers: MessageHeaders, body: MessageBody
    ) -> Reject | None:
        for name, hook in self.message_hooks:
            result = await self._call(name, "message", hook.message, envelope, headers, body)
            if isinstance(result, Reject):
                return result
        return None

    def delivered(self, event: Delivery) -> None:
        for name, hook in self.delivered_hooks:
            defer.ensureDeferred(
                self._call(name, "delivered", hook.delivered, event, answers=False)
            )


def _plugin_reason(name: str) -> str:
    return "plugin:" + re.sub(r"[^a-z0-9._-]", "_", name.lower())[:56]


def _as_failure(error: BaseException):
    from twisted.python.failure import Failure

    return Failure(error, type(error), error.__traceback__)

