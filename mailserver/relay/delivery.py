"""
Delivery of one message to the recipients of one destination, as a stack of
same-interface couriers (STYLE.md habit 2)::

    LoggingCourier -> RouteCourier (MX, smarthost or transport) -> client.deliver

A courier's C{deliver(message, recipients)} returns a Deferred firing with
C{{address: Outcome}} for every recipient given: it never fails, a failure is
an outcome with a 4xx or 5xx reply.  The runner decides what the outcomes
mean for the queue (retry, bounce, done).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet import defer, threads
from twisted.logger import Logger, LogLevel
from zope.interface import implementer

from mailserver.config import SmarthostTLS
from mailserver.interfaces import ICourier
from mailserver.logs import emit
from mailserver.relay import client as smtp_client
from mailserver.relay import line_length
from mailserver.relay.client import OutboundRecipient, Reply, Timeouts, Transaction
from mailserver.relay.mx import Hop, MXRouter, RoutingError
from mailserver.relay.queue import QueuedMessage, QueueStore


@dataclass(frozen=True)
class Outcome:
    """
    @ivar reply: the reply that decides the recipient's fate.
    @ivar remote_mta: the host that gave it (empty if none did).
    @ivar dsn: the host took over the DSN request (it offered DSN).
    """

    reply: Reply
    remote_mta: str = ""
    dsn: bool = False


def destination_of(relay, address: str) -> str:
    """
    The key that groups recipients into one transaction and one
    concurrency limit: the smarthost, or the recipient's domain (always, for
    a domain with a route of its own in C{relay.transports}).
    """
    domain = address.rpartition("@")[2].lower().rstrip(".")
    if relay.smarthost and all(route.domain != domain for route in relay.transports):
        return f"smarthost:{relay.smarthost}"
    return domain


@implementer(ICourier)
class RouteCourier:
    """
    Finds the hosts for the destination and tries them in order until one
    answers about the recipients, sending the message with every line
    fitting the 998-octet limit (L{line_length}).

    @param send: C{client.deliver}'s signature; replaced in tests.
    @param io: runs a blocking call and returns a Deferred of its result
        (default: the reactor's thread pool).
    """

    log = Logger()

    def __init__(
        self,
        *,
        reactor,
        relay,
        hostname: str,
        store: QueueStore,
        router: MXRouter,
        send: Callable[..., defer.Deferred] = smtp_client.deliver,
        tls_options=None,
        io: Callable[..., defer.Deferred] | None = None,
    ) -> None:
        self._reactor = reactor
        self._relay = relay
        self._hostname = hostname
        self._store = store
        self._router = router
        self._send = send
        self._tls_options = tls_options
        self._timeouts = Timeouts.from_config(relay)
        self._transports = {route.domain: route for route in relay.transports}
        self._io = io or (lambda f, *args: threads.deferToThreadPool(
            reactor, reactor.getThreadPool(), f, *args))

    def deliver(self, message, recipients):
        return defer.Deferred.fromCoroutine(self._deliver(message, recipients))

    def _transaction(self, message: QueuedMessage, recipients, tls: str, auth: bool,
                     open_body) -> Transaction:
        relay = self._relay
        return Transaction(
            sender=message.sender,
            recipients=tuple(
                OutboundRecipient(r.address, r.notify, r.orcpt) for r in recipients
            ),
            open_body=open_body,
            size=message.size,
            body=message.body,
            smtputf8=message.smtputf8,
            ret=message.ret,
            envid=message.envid,
            helo=self._hostname,
            tls=tls,
            tls_options=self._tls_options,
            username=relay.smarthost_username if auth else "",
            password=relay.smarthost_password if auth else "",
        )

    async def _hops(self, domain: str) -> tuple[list[Hop], str, bool]:
        """
        A domain's own route first (as Postfix's transport table overrules
        its relayhost: a gateway sends its relay domains inside, and the
        rest through the smarthost), then the smarthost, then MX lookup.
        """
        relay = self._relay
        route = self._transports.get(domain)
        if route is not None:
            port = relay.port if route.port is None else route.port
            return [Hop(route.host, (route.host,), port)], relay.tls, False
        if relay.smarthost:
            host, port = relay.smarthost.host, relay.smarthost.port
            tls = "implicit" if relay.smarthost_tls == SmarthostTLS.IMPLICIT else "required"
            return [Hop(host, (host,), port)], tls, True
        return await self._router.route(domain), relay.tls, False

    async def _deliver(self, message, recipients) -> dict[str, Outcome]:
        domain = recipients[0].domain
        try:
            hops, tls, auth = await self._hops(domain)
        except RoutingError as e:
            return {r.address: Outcome(e.reply) for r in recipients}
        open_body = await self._io(line_length.fitted, lambda: self._store.open_body(message))
        transaction = self._transaction(message, recipients, tls, auth, open_body)
        result = None
        for hop in hops:
            for address in hop.addresses:
                result = await self._send(
                    self._reactor, address, hop.port, transaction, self._timeouts, name=hop.name
                )
                if result.reached:
                    return {
                        r.address: Outcome(result.replies[r.address], hop.name, result.dsn)
                        for r in recipients
                    }
                emit(self.log, LogLevel.info, "relay.host_failed", "did not take the message",
                     host=hop.name, address=address, port=hop.port,
                     reply=str(next(iter(result.replies.values()))), id=message.id)
        return {
            r.address: Outcome(result.replies[r.address], result.host if result else "")
            for r in recipients
        }


@implementer(ICourier)
class LoggingCourier:
    """
    Logs each recipient's outcome, as Postfix's C{status=sent}, C{deferred}
    and C{bounced} lines: events C{relay.sent}, C{relay.deferred} and
    C{relay.bounced}.

    @param clock: for the time the attempt took (C{ms}).
    """

    log = Logger()

    def __init__(self, inner, clock=None) -> None:
        self._inner = inner
        self._clock = clock

    def deliver(self, message, recipients):
        started = self._clock.seconds() if self._clock is not None else None

        def logged(outcomes):
            ms = None if started is None else round((self._clock.seconds() - started) * 1000, 1)
            for address, outcome in outcomes.items():
                reply = outcome.reply
                status = "sent" if reply.positive else "bounced" if reply.permanent else "deferred"
                emit(self.log, LogLevel.info if reply.positive else LogLevel.warn,
                     f"relay.{status}", status, recipient=address, sender=message.sender,
                     relay=outcome.remote_mta or "-", code=reply.code, dsn=reply.status,
                     reply=str(reply), ms=ms, id=message.id)
            return outcomes

        return self._inner.deliver(message, recipients).addCallback(logged)
