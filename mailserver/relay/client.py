"""
The ESMTP client side: one connection, one transaction, per-recipient replies.

Written here rather than taken from C{twisted.mail.smtp}, whose sender
dot-stuffs each 16 KiB chunk on its own (a C{"."} line split across chunks
ends the message early, which is how SMTP smuggling works).  L{DotStuffer}
carries the line-start state across chunks.

The conversation (RFC 5321, 3207, 2920, 1870, 6152, 3461, 4954)::

    greeting -> EHLO (HELO when refused) -> [STARTTLS -> EHLO] -> [AUTH]
    -> MAIL -> RCPT... -> DATA -> body -> "." -> QUIT

or, on a connection kept open for more (C{keep_open}), instead of QUIT:
it waits, and L{ESMTPClient.reuse} sends RSET -> MAIL -> ... for the next.

MAIL, every RCPT and DATA (and RSET before them, on a kept connection) go
in one write when the server offers PIPELINING; a body that fits in one
chunk goes in one write with its final dot.
Every wait has the RFC 5321 4.5.3.2 timeout given in L{Timeouts}.

The result is a L{TransactionResult}: one L{Reply} per recipient, real or
made up here (a 4xx for a connection that broke or timed out), so the layer
above never has to tell exceptions from replies.
"""

from __future__ import annotations

import base64
import io
import ipaddress
from collections import deque
from collections.abc import Callable

from twisted.internet import defer, endpoints, error
from twisted.logger import Logger
from twisted.protocols.basic import FileSender, LineReceiver
from twisted.python.failure import Failure

from mailserver.immediate_write import write_now
from mailserver.relay.transaction import (
    Timeouts,
    Transaction,
    TransactionResult,
    temporary,
)
from mailserver.wire.dots import DotStuffer
from mailserver.wire.reply import Reply


class _BodySender(FileSender):
    CHUNK_SIZE = 2**16


class ESMTPClient(LineReceiver):
    """
    One client connection.  C{result} fires with a L{TransactionResult} when
    the transaction is decided (never errbacks).
    """

    delimiter = b"\r\n"
    MAX_LENGTH = 16384
    log = Logger()
    chunk_size = 2**16
    # A body in memory up to this size goes in one write (its stuffed copy
    # waits in the transport); a larger one in chunks, as the peer takes
    # them, so many connections sending large messages hold little each.
    whole_write = 2**18

    def __init__(self, transaction: Transaction, clock, timeouts: Timeouts, host: str = "",
                 keep_open: bool = False) -> None:
        self.transaction = transaction
        self.keep_open = keep_open
        self.lost = False
        self.on_lost: Callable[[], None] | None = None
        self._unanswered = False
        self._rset_first = False
        # The last transaction ended with the reply to its final dot.
        self._ended_cleanly = False
        self.clock = clock
        self.timeouts = timeouts
        self.result: defer.Deferred = defer.Deferred()
        self._outcome = TransactionResult(host=host)
        self._handlers: deque = deque()
        self._lines: list[str] = []
        self._timer = None
        self._extensions: dict[str, str] = {}
        self._tls_started = transaction.tls == "implicit"
        self._mail_reply: Reply | None = None
        self._accepted: list[str] = []
        self._sequential: deque = deque()
        self._decided = False
        self._sender: _BodySender | None = None

    # Plumbing.

    def connectionMade(self) -> None:
        # Each step's commands go out in one write; Nagle's algorithm would
        # hold a small write (the final dot after the body, RSET) until
        # the server's delayed ACK, tens of milliseconds.
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            try:
                set_no_delay(True)
            except OSError:  # not a TCP socket after all
                pass
        if self._tls_started:
            self._outcome.tls = "started"
        self._expect(self._greeting, self.timeouts.command)

    def _expect(self, handler, timeout: float) -> None:
        self._handlers.append((handler, timeout))
        if len(self._handlers) == 1:
            self._arm(timeout)

    def _arm(self, timeout: float) -> None:
        self._disarm()
        self._timer = self.clock.callLater(timeout, self._timed_out)

    def _disarm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _send(self, line: str, handler, timeout: float | None = None) -> None:
        self.sendLine(line.encode("utf-8"))
        self._expect(handler, self.timeouts.command if timeout is None else timeout)

    def lineReceived(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace")
        if len(text) < 3 or not text[:3].isdigit() or text[3:4] not in ("", " ", "-"):
            self._fail(temporary(f"bad reply from server: {text[:80]!r}", "4.5.0"))
            return
        self._lines.append(text[4:])
        if text[3:4] == "-":
            return
        reply = Reply.received(int(text[:3]), self._lines)
        self._lines = []
        if self._outcome.tls == "started":
            self._outcome.tls = "established"
        if not self._handlers:
            return  # an unsolicited reply, e.g. after QUIT
        handler, _ = self._handlers.popleft()
        self._disarm()
        if self._handlers:
            self._arm(self._handlers[0][1])
        handler(reply)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._fail(temporary("reply line too long", "4.5.0"))

    def _timed_out(self) -> None:
        self._timer = None
        self._fail(temporary("timed out waiting for the server", "4.4.2"))

    def connectionLost(self, reason) -> None:
        self._disarm()
        self.lost = True
        self._fail(temporary(f"connection lost: {reason.getErrorMessage()}", "4.4.2"), close=False)
        if self.on_lost is not None:
            self.on_lost()

    def _fail(self, reply: Reply, close: bool = True) -> None:
        """
        Give every recipient without a final reply C{reply} and stop.
        """
        if not self._decided:
            self._outcome.stale = self._unanswered
            for recipient in self.transaction.recipients:
                current = self._outcome.replies.get(recipient.address)
                if current is None or current.positive:
                    self._outcome.replies[recipient.address] = reply
            self._decide()
        if close and self.transport is not None:
            self._handlers.clear()
            self.transport.abortConnection()

    def _decide(self) -> None:
        if self._decided:
            return
        self._decided = True
        self.result.callback(self._outcome)

    def _quit(self) -> None:
        self._handlers.clear()
        self._send("QUIT", lambda reply: self.transport.loseConnection())

    def _done(self, last: Reply | None = None) -> None:
        """
        The transaction is over and the session in a clean state: keep the
        connection for the next message (unless the server is closing it,
        421), or say QUIT.
        """
        if self.keep_open and not self.lost and not (last and last.code == 421):
            self._outcome.connection = self
            self._decide()
            return
        self._decide()
        self._quit()

    def quit(self) -> None:
        """
        End a kept connection.
        """
        self.on_lost = None
        if not self.lost:
            self._quit()

    def reuse(self, transaction: Transaction) -> defer.Deferred:
        """
        Send C{transaction} over this kept connection, after RSET unless the
        last one ended with the reply to its final dot (RFC 5321 4.1.1.4:
        the session is then back where a new MAIL may start; after refused
        recipients the server may still hold the sender).  Fires with its
        L{TransactionResult}; C{stale} when the connection turns out to be
        unusable before anything of the message was sent.
        """
        self.transaction = transaction
        self.on_lost = None
        self.result = defer.Deferred()
        self._outcome = TransactionResult(host=self._outcome.host, tls=self._outcome.tls)
        self._mail_reply = None
        self._accepted = []
        self._sequential = deque()
        self._decided = False
        if self.lost:
            self._unanswered = True
            self._fail(temporary("connection lost", "4.4.2"), close=False)
            return self.result
        self._unanswered = True
        clean, self._ended_cleanly = self._ended_cleanly, False
        if clean:
            self._mail()
        elif "PIPELINING" in self._extensions:
            # RFC 2920 3.1: RSET may lead a pipelined group: one round trip
            # a message, not two.
            self._rset_first = True
            self._mail()
        else:
            self._send("RSET", self._rset_reply)
        return self.result

    def _rset_reply(self, reply: Reply) -> None:
        if reply.code != 250:
            self._fail(temporary(f"RSET refused: {reply}", "4.4.2"), close=False)
            self._quit()
            return
        self._mail()

    def _pipelined_rset_reply(self, reply: Reply) -> None:
        if reply.code != 250:
            # What follows it in the group cannot be trusted: close.
            self._fail(temporary(f"RSET refused: {reply}", "4.4.2"))

    # The conversation.

    def _greeting(self, reply: Reply) -> None:
        if reply.code != 220:
            self._fail(reply, close=False)
            self._quit()
            return
        self._ehlo()

    def _ehlo(self) -> None:
        self._send(f"EHLO {self.transaction.helo}", self._ehlo_reply)

    def _ehlo_reply(self, reply: Reply) -> None:
        if reply.code == 250:
            self._extensions = {}
            for line in reply.lines[1:]:
                keyword, _, params = line.partition(" ")
                self._extensions[keyword.upper()] = params
            self._after_hello()
        elif reply.permanent and not self._tls_started:
            self._send(f"HELO {self.transaction.helo}", self._helo_reply)
        else:
            self._fail(reply, close=False)
            self._quit()

    def _helo_reply(self, reply: Reply) -> None:
        if reply.code != 250:
            self._fail(reply, close=False)
            self._quit()
            return
        self._extensions = {}
        self._after_hello()

    def _after_hello(self) -> None:
        tls = self.transaction.tls
        if not self._tls_started and tls in ("opportunistic", "required"):
            if "STARTTLS" in self._extensions:
                self._send("STARTTLS", self._starttls_reply)
                return
            self._outcome.tls = "not-offered"
            if tls == "required":
                self._fail(temporary("the server does not offer STARTTLS, which is required",
                                     "4.7.0"), close=False)
                self._quit()
                return
        if self.transaction.username:
            self._auth()
            return
        self._mail()

    def _starttls_reply(self, reply: Reply) -> None:
        if reply.code != 220:
            self._outcome.tls = "refused"
            if self.transaction.tls == "required":
                self._fail(reply if not reply.positive else temporary("STARTTLS refused", "4.7.0"),
                           close=False)
                self._quit()
                return
            self._tls_started = True  # do not ask again; go on in plaintext
            self._mail_or_auth()
            return
        self._start_tls()
        self._ehlo()

    def _start_tls(self) -> None:
        """
        Switch to TLS, dropping whatever arrived in the clear after the 220:
        a man in the middle could have put a made-up EHLO reply there, to be
        taken as the one sent over TLS (issue 19, Postfix's CVE-2011-0411).
        """
        self.clearLineBuffer()
        self._lines = []
        options = self.transaction.tls_options
        if options is None:
            from mailserver.relay.tls_policy import unverified_client_tls

            options = unverified_client_tls(self._outcome.host)
        self.transport.startTLS(options)
        self._tls_started = True
        self._outcome.tls = "started"

    def _mail_or_auth(self) -> None:
        if self.transaction.username:
            self._auth()
        else:
            self._mail()

    def _auth(self) -> None:
        if self._outcome.tls != "established":
            # The password goes over TLS or not at all.
            self._fail(temporary("will not send AUTH without TLS", "4.7.0"), close=False)
            self._quit()
            return
        mechanisms = self._extensions.get("AUTH", "").upper().split()
        if "PLAIN" not in mechanisms:
            self._fail(temporary("the server does not offer AUTH PLAIN", "4.7.0"), close=False)
            self._quit()
            return
        token = base64.b64encode(
            b"\0" + self.transaction.username.encode() + b"\0" + self.transaction.password.encode()
        ).decode("ascii")
        self._send(f"AUTH PLAIN {token}", self._auth_reply)

    def _auth_reply(self, reply: Reply) -> None:
        if reply.code != 235:
            # Our credentials are wrong: not the recipients' fault, so retry.
            self._fail(Reply(451, "4.7.0", (f"authentication failed: {reply}",)), close=False)
            self._quit()
            return
        self._mail()

    def _mail(self) -> None:
        t = self.transaction
        if t.smtputf8 and "SMTPUTF8" not in self._extensions:
            self._outcome.reached = True
            self._unanswered = False  # refused here, for good
            self._fail(Reply(553, "5.6.7", ("the server does not support SMTPUTF8",),
                             synthetic=True), close=False)
            self._quit()
            return
        limit = self._extensions.get("SIZE", "")
        if limit.isdigit() and int(limit) and t.size > int(limit):
            self._outcome.reached = True
            self._unanswered = False
            self._fail(Reply(552, "5.3.4", (f"message too big for the server (limit {limit})",),
                             synthetic=True), close=False)
            self._quit()
            return
        params = []
        if "SIZE" in self._extensions:
            params.append(f"SIZE={t.size}")
        if t.body.upper() == "8BITMIME" and "8BITMIME" in self._extensions:
            params.append("BODY=8BITMIME")
        if t.smtputf8:
            params.append("SMTPUTF8")
        dsn = "DSN" in self._extensions
        self._outcome.dsn = dsn
        if dsn and t.ret:
            params.append(f"RET={t.ret}")
        if dsn and t.envid:
            params.append(f"ENVID={t.envid}")
        commands = [(" ".join([f"MAIL FROM:<{t.sender}>", *params]), self._mail_reply_received,
                     None)]
        for recipient in t.recipients:
            rparams = []
            if dsn and recipient.notify:
                rparams.append("NOTIFY=" + ",".join(recipient.notify))
            if dsn and recipient.orcpt:
                rparams.append(f"ORCPT={recipient.orcpt}")
            commands.append((" ".join([f"RCPT TO:<{recipient.address}>", *rparams]),
                             self._rcpt_reply(recipient.address), None))
        commands.append(("DATA", self._data_reply, self.timeouts.data_start))
        if self._rset_first:
            self._rset_first = False
            commands.insert(0, ("RSET", self._pipelined_rset_reply, None))
        if "PIPELINING" in self._extensions:
            write_now(self.transport, b"".join(c[0].encode("utf-8") + b"\r\n" for c in commands))
            for _, handler, timeout in commands:
                self._expect(handler, self.timeouts.command if timeout is None else timeout)
        else:
            self._sequential = deque(commands)
            self._next_command()

    def _next_command(self) -> None:
        line, handler, timeout = self._sequential.popleft()
        self._send(line, handler, timeout)

    def _mail_reply_received(self, reply: Reply) -> None:
        if self._unanswered and reply.code == 421:
            # A kept connection the server is closing (its idle time-out,
            # say): nothing of the message was taken, so it goes over a new
            # connection, as when the connection is found closed.
            self._fail(temporary(f"kept connection closing: {reply}", "4.4.2"))
            return
        self._unanswered = False
        self._outcome.reached = True
        if reply.code != 250:
            self._mail_reply = reply
            for recipient in self.transaction.recipients:
                self._outcome.replies[recipient.address] = reply
            if self._sequential:
                self._sequential.clear()
                self._done(reply)
            return
        if self._sequential:
            self._next_command()

    def _rcpt_reply(self, address: str):
        def received(reply: Reply) -> None:
            if self._mail_reply is None:
                self._outcome.replies[address] = reply
                if reply.code in (250, 251):
                    self._accepted.append(address)
            if self._sequential:
                if not self._accepted and len(self._sequential) == 1:
                    self._sequential.clear()  # nobody to send DATA for
                    self._done(reply)
                else:
                    self._next_command()

        return received

    def _data_reply(self, reply: Reply) -> None:
        if reply.code != 354:
            if self._mail_reply is None:
                for address in self._accepted:
                    self._outcome.replies[address] = reply
            self._done(reply)
            return
        if self._mail_reply is not None or not self._accepted:
            # RFC 2920 3.1: DATA was accepted although nobody was; send an
            # empty message and forget its reply.
            self.transport.write(b".\r\n")
            self._expect(lambda reply: None, self.timeouts.data_end)
            self._decide()
            self._quit()
            return
        stuffer = DotStuffer()
        body = self.transaction.open_body()
        # A body in memory (a message just queued) goes whole; from a file,
        # or a large one, a chunk at a time as the connection takes them.
        in_memory = isinstance(body, io.BytesIO) and self.transaction.size <= self.whole_write
        first = body.read() if in_memory else body.read(self.chunk_size)
        if in_memory or len(first) < self.chunk_size:
            # The whole body (a short read is the end): one write with the dot.
            body.close()
            write_now(self.transport, stuffer.feed(first) + stuffer.end())
            self._expect(self._end_reply, self.timeouts.data_end)
            return
        body.seek(-len(first), io.SEEK_CUR)

        def transform(chunk: bytes) -> bytes:
            self._arm(self.timeouts.data_block)
            return stuffer.feed(chunk)

        self._arm(self.timeouts.data_block)
        sender = self._sender = _BodySender()
        sender.CHUNK_SIZE = self.chunk_size
        d = sender.beginFileTransfer(body, self.transport, transform)

        def sent(_):
            body.close()
            self._sender = None
            self.transport.write(stuffer.end())
            self._expect(self._end_reply, self.timeouts.data_end)

        def not_sent(failure):
            body.close()
            self._sender = None

        d.addCallbacks(sent, not_sent)

    def _end_reply(self, reply: Reply) -> None:
        for address in self._accepted:
            self._outcome.replies[address] = reply
        self._ended_cleanly = True
        self._done(reply)


def _endpoint(reactor, host: str, port: int, timeout: float):
    try:
        version = ipaddress.ip_address(host).version
    except ValueError:
        return endpoints.HostnameEndpoint(reactor, host, port, timeout=timeout)
    if version == 6:
        return endpoints.TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    return endpoints.TCP4ClientEndpoint(reactor, host, port, timeout=timeout)


def deliver(reactor, host: str, port: int, transaction: Transaction, timeouts: Timeouts,
            name: str = "", implicit_tls_options=None, keep_open: bool = False) -> defer.Deferred:
    """
    Connect to C{host} (an IP address or a name) and run C{transaction}.

    @param name: the host's DNS name, for reports (C{Remote-MTA}).
    @param implicit_tls_options: TLS client options when the connection is
        TLS from the start (C{transaction.tls == "implicit"}).
    @param keep_open: leave the connection open after a transaction that
        ends cleanly (C{TransactionResult.connection}).
    @return: a Deferred that fires with a L{TransactionResult}, never fails.
    """
    protocol = ESMTPClient(transaction, reactor, timeouts, host=name or host,
                           keep_open=keep_open)
    endpoint = _endpoint(reactor, host, port, timeouts.connect)
    by_name = isinstance(endpoint, endpoints.HostnameEndpoint)
    deadline = timeouts.resolve + timeouts.connect
    if transaction.tls == "implicit":
        options = implicit_tls_options or transaction.tls_options
        if options is None:
            from mailserver.relay.tls_policy import unverified_client_tls

            options = unverified_client_tls(name or host)
        endpoint = endpoints.wrapClientTLS(options, endpoint)
    connecting = endpoints.connectProtocol(endpoint, protocol)
    if by_name:
        # HostnameEndpoint bounds each connection attempt, not the lookup
        # before them (getaddrinfo in a thread, as long as it takes); it
        # reports a lookup cut short as "not found", hence onTimeoutCancel.
        connecting.addTimeout(
            deadline, reactor,
            onTimeoutCancel=lambda _, seconds: Failure(defer.TimeoutError(seconds)),
        )

    def refused(failure):
        if failure.check(defer.TimeoutError):
            text = f"no connection within {deadline:g}s (name lookup and connecting)"
        elif failure.check(error.ConnectingCancelledError, defer.CancelledError):
            text = "connection timed out"
        else:
            text = failure.getErrorMessage()
        reply = temporary(f"cannot connect to {name or host}:{port}: {text}", "4.4.1")
        return TransactionResult(
            replies={r.address: reply for r in transaction.recipients}, host=name or host
        )

    connecting.addCallbacks(lambda _: protocol.result, refused)
    return connecting
