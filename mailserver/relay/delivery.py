"""
Delivery of one message to the recipients of one destination, as a stack of
same-interface couriers (STYLE.md habit 2)::

    LoggingCourier -> RouteCourier (MX, smarthost or transport; the TLS
                      policy: tls_policy, mta_sts) -> a kept connection
                      (connections) or client.deliver

A courier's C{deliver(message, recipients)} returns a Deferred firing with
C{{address: Outcome}} for every recipient given: it never fails, a failure is
an outcome with a 4xx or 5xx reply.  The runner decides what the outcomes
mean for the queue (retry, bounce, done).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from twisted.internet import defer, threads
from twisted.logger import Logger, LogLevel
from zope.interface import implementer

from mailserver.config import SmarthostTLS, TLSLevel
from mailserver.interfaces import ICourier
from mailserver.logs import emit
from mailserver.relay import client as smtp_client
from mailserver.relay import line_length
from mailserver.relay.client import ESMTPClient
from mailserver.relay.connections import ConnectionCache, ConnectionKey, KeptConnection
from mailserver.relay.mx import Hop, MXRouter, RoutingError
from mailserver.relay.queue import QueuedMessage, QueueStore
from mailserver.relay.tls_policy import (
    ClientTLS,
    PolicyTable,
    SessionVerdict,
    TLSPolicy,
    ca_certificates,
    judge,
)
from mailserver.relay.transaction import (
    OutboundRecipient,
    Timeouts,
    Transaction,
    TransactionResult,
    temporary,
)
from mailserver.safe_text import printable
from mailserver.wire.reply import Reply


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
    return destination_of_domain(relay, address.rpartition("@")[2].lower().rstrip("."))


def destination_of_domain(relay, domain: str) -> str:
    """
    L{destination_of} for a recipient in C{domain} (lower case).
    """
    if relay.smarthost and all(route.domain != domain for route in relay.transports):
        return f"smarthost:{relay.smarthost}"
    return domain


@dataclass(frozen=True)
class Route:
    """
    Where a destination's mail goes and how: the hosts in order, the TLS
    policy, whether to AUTH (the smarthost) and whether TLS starts at once.
    """

    hops: list[Hop]
    policy: TLSPolicy
    auth: bool = False
    implicit: bool = False


@implementer(ICourier)
class RouteCourier:
    """
    Finds the hosts and the TLS policy for the destination and tries the
    hosts in order until one answers about the recipients, sending the
    message with every line fitting the 998-octet limit (L{line_length}).

    @param send: C{client.deliver}'s signature; replaced in tests.
    @param tls: the L{ClientTLS} (trust roots); default: the system's and
        C{relay.ca_file}.
    @param mta_sts: an L{mailserver.relay.mta_sts.MTASTS}, or C{None} to
        apply no MTA-STS policies.
    @param count: counts a TLS outcome, C{count(domain=, mode=, result=)}.
    @param io: runs a blocking call and returns a Deferred of its result
        (default: the reactor's thread pool).
    @param connections: where connections are kept between messages
        (C{None}: one connection per message).
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
        tls: ClientTLS | None = None,
        mta_sts=None,
        count: Callable[..., None] | None = None,
        io: Callable[..., defer.Deferred] | None = None,
        connections: ConnectionCache | None = None,
    ) -> None:
        self._reactor = reactor
        self._connections = connections
        self._relay = relay
        self._hostname = hostname
        self._store = store
        self._router = router
        self._send = send
        self._tls = tls or ClientTLS(ca_certificates(relay))
        self._policies = PolicyTable(relay)
        self._mta_sts = mta_sts
        self._count = count or (lambda **labels: None)
        self._timeouts = Timeouts.from_config(relay)
        self._transports = {route.domain: route for route in relay.transports}
        self._io = io or (lambda f, *args: threads.deferToThreadPool(
            reactor, reactor.getThreadPool(), f, *args))

    def deliver(self, message, recipients):
        return defer.Deferred.fromCoroutine(self._deliver(message, recipients))

    def _transaction(self, message: QueuedMessage, recipients, auth: bool,
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
            username=relay.smarthost_username if auth else "",
            password=relay.smarthost_password if auth else "",
        )

    async def _route(self, domain: str) -> Route:
        """
        A domain's own route first (as Postfix's transport table overrules
        its relayhost: a gateway sends its relay domains inside, and the
        rest through the smarthost), then the smarthost, then MX lookup.
        """
        relay = self._relay
        transport = self._transports.get(domain)
        if relay.smarthost and transport is None:
            host, port = relay.smarthost.host, relay.smarthost.port
            return Route([Hop(host, (host,), port)], self._policies.smarthost(), auth=True,
                         implicit=relay.smarthost_tls == SmarthostTLS.IMPLICIT)
        configured = self._policies.configured(domain, transport is not None)
        if transport is not None:
            port = relay.port if transport.port is None else transport.port
            return Route([Hop(transport.host, (transport.host,), port)], configured)
        if configured is not None or self._mta_sts is None:
            return Route(await self._router.route(domain), configured or self._policies.default())
        routing = self._router.route(domain)  # both lookups at once
        sts = await self._mta_sts.policy(domain)
        hops = await routing
        if sts is not None and sts.mode in ("enforce", "testing"):
            return Route(hops, self._policies.from_mta_sts(sts.domain, sts.mode, sts.mx))
        return Route(hops, self._policies.default())

    def _kept_route(self, destination: str) -> Route | None:
        """
        The route of a connection kept for C{destination}, if there is one:
        its next message goes the same way, with no DNS lookup and no
        MTA-STS check (Postfix's connection cache, searched by destination
        first).  Kept connections live at most C{connection_reuse_time}.
        """
        key = None if self._connections is None else self._connections.key_for(destination)
        if key is None:
            return None
        return Route([Hop(key.host, (key.address,), key.port)], key.policy,
                     auth=bool(key.username), implicit=key.tls == "implicit")

    async def _deliver(self, message, recipients) -> dict[str, Outcome]:
        domain = recipients[0].domain
        destination = destination_of_domain(self._relay, domain)
        open_body = None
        kept = self._kept_route(destination)
        if kept is not None:
            open_body = await self._fitted(message)
            outcomes, reached = await self._over(kept, message, recipients, destination,
                                                 open_body)
            if reached:
                return outcomes  # else the whole route, looked up
        try:
            route = await self._route(domain)
        except RoutingError as e:
            return {r.address: Outcome(e.reply) for r in recipients}
        # Read only once there is somewhere to send it: a domain that is
        # down costs its retries no file reads.
        open_body = open_body or await self._fitted(message)
        outcomes, _ = await self._over(route, message, recipients, destination, open_body)
        return outcomes

    def _fitted(self, message) -> defer.Deferred:
        body = self._store.take_recent_body(message.id)
        if body is not None:  # just queued: no file to read
            if not line_length.has_long_lines(body):
                return defer.succeed(line_length.in_memory(body))
            if len(body) > line_length.IN_MEMORY:
                # Re-encoding it is long work in Python: not on the reactor.
                return self._io(line_length.fitted_data, body)
            return defer.succeed(line_length.fitted_data(body))
        return self._io(line_length.fitted, lambda: self._store.open_body(message))

    async def _over(self, route: Route, message, recipients, destination: str,
                    open_body) -> tuple[dict[str, Outcome], bool]:
        """
        The message sent along C{route}: each recipient's outcome, and
        whether a server took or refused it.
        """
        transaction = self._transaction(message, recipients, route.auth, open_body)
        result = refusal = None
        for hop in route.hops:
            if not route.policy.allows_mx(hop.name):
                refusal = self._mx_not_in_policy(message, route.policy, hop)
                if refusal is not None:
                    continue
            for address in hop.addresses:
                result = await self._attempt(message, transaction, route, hop, address,
                                             destination)
                if result.reached:
                    return {
                        r.address: Outcome(result.replies[r.address], hop.name, result.dsn)
                        for r in recipients
                    }, True
                emit(self.log, LogLevel.info, "relay.host_failed", "did not take the message",
                     host=hop.name, address=address, port=hop.port,
                     reply=printable(str(next(iter(result.replies.values()))), None),
                     id=message.id)
        if result is None and refusal is not None:
            return {r.address: Outcome(refusal) for r in recipients}, False
        return {
            r.address: Outcome(result.replies[r.address], result.host if result else "")
            for r in recipients
        }, False

    async def _attempt(self, message, transaction: Transaction, route: Route, hop: Hop,
                       address: str, destination: str) -> TransactionResult:
        """
        One connection under the route's TLS policy, and a second one in
        plaintext when the policy allows it and the TLS handshake failed.
        """
        policy = route.policy
        mode = "implicit" if route.implicit else policy.client_mode
        key = ConnectionKey(destination, hop.name, address, hop.port, mode, policy,
                            transaction.username)
        result, session = await self._send_to(message, key, transaction)
        verdict = judge(policy, session, result.tls)
        self._report(message, policy, hop, address, verdict)
        if result.reached or not verdict.failed:
            return result
        if policy.level == TLSLevel.MAY:
            if not verdict.handshake_failed:
                return result  # TLS was optional: what failed was not TLS
            emit(self.log, LogLevel.info, "relay.tls_fallback",
                 "TLS failed; trying again without", host=hop.name, address=address,
                 reason=printable(verdict.problem or str(next(iter(result.replies.values()))),
                                  None),
                 id=message.id)
            result, _ = await self._send_to(message, replace(key, tls="none"), transaction)
            return result
        original = next(iter(result.replies.values()))
        prefix = "MTA-STS: " if policy.source == "MTA-STS" else ""
        detail = verdict.problem or original.text.removeprefix(original.status).strip()
        reply = temporary(
            f"{prefix}TLS with {hop.name} [{address}]:{hop.port} failed: {detail}",
            "4.7.5" if verdict.handshake_failed else original.status,
        )
        return TransactionResult(replies={a: reply for a in result.replies}, host=result.host,
                                 tls=result.tls)

    async def _send_to(self, message, key: ConnectionKey,
                       transaction: Transaction) -> tuple[TransactionResult, object]:
        """
        Send over a connection kept under C{key}, else over a new one (also
        when a kept one turns out to be closed or refuses RSET: that try
        sent nothing, so it is no attempt).  Returns the result and the TLS
        session checker of the connection used.
        """
        cache = self._connections
        while cache is not None and (kept := cache.take(key)) is not None:
            result = await kept.client.reuse(
                replace(transaction, tls=key.tls, tls_options=kept.session))
            if not result.stale:
                self._keep(key, kept, result.connection)
                result.connection = None
                return result, kept.session
            emit(self.log, LogLevel.info, "relay.reuse_failed",
                 "kept connection unusable; opening a new one", host=key.host,
                 address=key.address, port=key.port, messages=kept.messages - 1,
                 reply=printable(str(next(iter(result.replies.values()))), None), id=message.id)
        session = None if key.tls == "none" else self._tls.for_policy(key.policy, key.host)
        keep_open = {} if cache is None else {"keep_open": True}
        result = await self._send(
            self._reactor, key.address, key.port,
            replace(transaction, tls=key.tls, tls_options=session), self._timeouts,
            name=key.host, **keep_open,
        )
        if result.connection is not None:
            self._keep(key, KeptConnection(result.connection, session),
                       result.connection)
            result.connection = None
        return result, session

    def _keep(self, key: ConnectionKey, kept: KeptConnection, client: ESMTPClient | None) -> None:
        if client is not None and self._connections is not None:
            self._connections.keep(key, kept)
        elif client is not None:
            client.quit()

    def _mx_not_in_policy(self, message, policy: TLSPolicy, hop: Hop) -> Reply | None:
        """
        Count and log an MX host outside an MTA-STS policy; in C{enforce}
        mode, the reply that defers the message (C{None}: try it anyway).
        """
        self._count(domain=policy.domain, mode=policy.mode, result="mx-not-in-policy")
        allowed = ", ".join(policy.mx or ())
        if policy.testing:
            emit(self.log, LogLevel.warn, "relay.mta_sts_testing",
                 "MTA-STS testing: would have failed", domain=policy.domain, host=hop.name,
                 reason=f"mx not in policy ({allowed})", id=message.id)
            return None
        emit(self.log, LogLevel.warn, "relay.mx_not_in_policy",
             "MTA-STS: not an MX host the policy allows; not used", domain=policy.domain,
             host=hop.name, allowed=allowed, id=message.id)
        return temporary(f"MTA-STS: mx not in policy: {hop.name} (the policy of "
                         f"{policy.domain} allows {allowed})", "4.7.5")

    def _report(self, message, policy: TLSPolicy, hop: Hop, address: str,
                verdict: SessionVerdict) -> None:
        if policy.domain and policy.mode and verdict.result:
            self._count(domain=policy.domain, mode=policy.mode, result=verdict.result)
        if policy.testing and verdict.failed:
            emit(self.log, LogLevel.warn, "relay.mta_sts_testing",
                 "MTA-STS testing: would have failed", domain=policy.domain, host=hop.name,
                 address=address, reason=printable(verdict.problem or verdict.result, None),
                 id=message.id)


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
                     f"relay.{status}", status, recipient=printable(address),
                     sender=printable(message.sender),
                     relay=printable(outcome.remote_mta or "-"), code=reply.code,
                     dsn=reply.status, reply=printable(str(reply), None), ms=ms, id=message.id)
            return outcomes

        return self._inner.deliver(message, recipients).addCallback(logged)
