"""
The relay runner: the service that works the queue.

It keeps (L{QueueStore}), knows (L{QueueIndex}), decides (L{schedule},
L{Dispatcher}) and delivers (an L{mailserver.interfaces.ICourier}) through
separate pieces:

  - at start, every envelope is read, in a thread, into the in-memory index
    (a restart or a C{kill -9} loses nothing that got its 250); from then on
    the runner puts every change it makes into the index, and nothing on the
    reactor thread reads the queue folder to learn what is queued;
  - the dispatcher starts each message when it comes due, within the
    connection limits, and lets a destination that no server answers at
    rest (its messages wait in memory: a few attempts per rest);
  - an attempt groups the pending recipients by destination and sends each
    group in one transaction, within the connection limits (in total and
    per destination), over a connection kept from an earlier message to the
    same destination when there is one (L{ConnectionCache}; closed at stop);
  - 2xx: done; 5xx: failed at once; 4xx or no answer: retried on the back-off
    schedule until C{max_age}, then failed; failures are reported to the
    sender in one RFC 3464 report per attempt, injected through the intake
    (L{ReportSender});
  - every C{scan_interval} it takes in the messages worker processes
    queued (C{queue/incoming/}) and the requests from C{mailserver queue}
    (flush, delete, bounce; C{queue/requests/}), two small folders;
  - an entry that cannot be used (a corrupt envelope, a missing message
    file) is moved into C{queue/corrupt/} with one log line, at start, at a
    scan or at its attempt, and the others go on.

Delivery is at-least-once.  A message can go out twice when the server stops
(or dies) after a remote server accepted it and before its new state is on
disk, or when the remote server's reply to the final dot is lost; a report
can be sent twice when the server dies between injecting it and recording
that it was sent.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger, LogLevel

from mailserver.hooks import Delivery
from mailserver.logs import emit, emit_failure
from mailserver.metrics import unregistered_metrics
from mailserver.relay import dsn as dsn_module
from mailserver.relay.delivery import (
    LoggingCourier,
    Outcome,
    RouteCourier,
    destination_of,
    destination_of_domain,
)
from mailserver.relay.connections import ConnectionCache, ReuseLimits
from mailserver.relay.dispatch import Concurrency, ConnectionSlots, Dispatcher
from mailserver.relay.index import IndexEntry, QueueIndex
from mailserver.relay.index import build as build_index
from mailserver.relay.mta_sts import make_mta_sts
from mailserver.relay.mx import MXRouter, Ourselves
from mailserver.relay.resolver import RELAY_DNS_CACHE, make_resolver
from mailserver.relay.queue import (
    DELIVERED,
    FAILED,
    PENDING,
    RELAYED,
    CorruptEntry,
    QueuedMessage,
    QueueError,
    QueueStore,
)
from mailserver.relay.removal import BatchedRemoval
from mailserver.relay.reports import ReportSender
from mailserver.relay.schedule import RetryPolicy, next_attempt, random_jitter, retry_delay
from mailserver.relay.tls_policy import ClientTLS, TLSPolicyCounter, ca_certificates
from mailserver.safe_text import printable

# Messages kept as committed until their first attempt, at most.
FRESH_MESSAGES = 1000


class RelayRunner(Service):
    """
    @param relay: the C{[relay]} section (L{mailserver.config.Relay}).
    @param hostname: ours, for EHLO and reports.
    @param mta_sts_path: the folder MTA-STS policies are cached in
        (L{mailserver.config.Config.mta_sts_path}).
    @param courier: an L{ICourier}; default: MX routing and the SMTP client.
    @param accounts: resolves local senders' addresses to their accounts
        for reports (without it, the sender address is used as is).
    @param jitter: spreads retry delays (L{schedule.Jitter}).
    @param io: runs a blocking call and returns a Deferred of its result;
        default: the reactor's thread pool.

    @ivar index: what is queued (L{QueueIndex}), complete once the start-up
        read of the queue is done.
    """

    log = Logger()
    name = "relay"

    def __init__(
        self,
        *,
        relay,
        hostname: str,
        mta_sts_path: Path,
        queue: QueueStore,
        intake,
        reactor,
        index: QueueIndex | None = None,
        courier=None,
        accounts=None,
        jitter=None,
        io=None,
        metrics=None,
        on_delivered=None,
    ) -> None:
        """
        @param index: the index to keep (default: a new one); the server
            makes it first, for the gauges.
        @param metrics: the server's L{ServerMetrics}, counting attempts.
        @param on_delivered: told of each recipient's final outcome (the
            plugins' delivered hooks).
        """
        self._metrics = metrics or unregistered_metrics()
        self._on_delivered = on_delivered
        self._hostname = hostname
        self._mta_sts_path = mta_sts_path
        self._relay = relay
        self._queue = queue
        self._intake = intake
        self._reactor = reactor
        self._courier = courier
        self._own_courier = courier is None
        self._resolver = None
        self._connections: ConnectionCache | None = None
        self._accounts = accounts
        self._jitter = jitter or random_jitter()
        self._io = io or self._in_thread
        self.policy = RetryPolicy.from_config(relay)
        self._reports = ReportSender(relay=relay, hostname=hostname, queue=queue, intake=intake,
                                     accounts=accounts, policy=self.policy, io=self._io)
        concurrency = Concurrency(self._relay.max_connections_per_destination)
        self._slots = ConnectionSlots(self._relay.max_connections, concurrency)
        self.index = index if index is not None else QueueIndex()
        self._dispatcher = Dispatcher(
            index=self.index, clock=reactor, start=self._start_attempt,
            destinations=self._destinations, wait=self._wait,
            rest_for=lambda n: retry_delay(self.policy, n, self._jitter),
            total=self._relay.max_connections,
            per_destination=self._relay.max_connections_per_destination,
            concurrency=concurrency,
        )
        self._active: dict[str, defer.Deferred] = {}
        self._after: dict[str, str] = {}
        # Messages just queued by this process, as committed, until their
        # first attempt: it need not read back what was just written.
        self._fresh: dict[str, QueuedMessage] = {}
        self._arriving: list[QueuedMessage] = []
        self._arriving_lock = threading.Lock()
        self._removal = BatchedRemoval(queue.remove_all, self._io)
        self._scanner: task.LoopingCall | None = None
        self._scanning: defer.Deferred | None = None
        self._scan_again = False
        # Fires once the start-up read of the queue is done (worker
        # processes start after it: what they queue from then on is theirs).
        self.queue_read: defer.Deferred = defer.Deferred()
        self._destination_cache: dict[tuple[str, ...], tuple[str, ...]] = {}

    # Service.

    def _in_thread(self, f, *args):
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), f, *args)

    def startService(self) -> None:
        super().startService()
        self._start_courier()
        # A crash's half-written files go before clients come (as the spool's
        # and the mailboxes' do); the orphans and the envelopes are read in
        # a thread.  Told of new messages from now on (kept in the index
        # until the start-up read is done).
        self._queue.remove_stale_tmp()
        self._queue.on_enqueued = self._enqueued_in_thread
        began = time.monotonic()
        d = self._io(self._read_queue)
        d.addCallback(self._read, began)
        d.addErrback(lambda f: emit_failure(self.log, "relay.read_failed", "cannot read the queue",
                                            f))
        d.addBoth(lambda _: self.queue_read.called or self.queue_read.callback(None))

    def _start_courier(self) -> None:
        if self._own_courier:
            resolver = self._resolver = make_resolver(self._relay.resolver, self._reactor,
                                                      timeout=self._relay.dns_timeout,
                                                      cache=RELAY_DNS_CACHE)
            # A route takes at most an MX query, a CNAME hop and the address
            # queries (made at once); the deadline holds whatever happens.
            router = MXRouter(resolver, port=self._relay.port, clock=self._reactor,
                              deadline=3 * self._relay.dns_timeout,
                              ourselves=Ourselves.from_config(self._hostname, self._relay))
            tls = ClientTLS(ca_certificates(self._relay))
            self._connections = ConnectionCache(
                self._reactor, ReuseLimits.from_config(self._relay),
                per_key=self._relay.max_connections_per_destination,
                total=self._relay.max_connections)
            self._courier = LoggingCourier(
                clock=self._reactor,
                inner=RouteCourier(
                    reactor=self._reactor,
                    relay=self._relay,
                    hostname=self._hostname,
                    store=self._queue,
                    router=router,
                    tls=tls,
                    mta_sts=make_mta_sts(self._relay, self._mta_sts_path, self._reactor, resolver,
                                         router, tls, io=self._io),
                    count=TLSPolicyCounter(self._metrics.relay_tls_policy_total),
                    io=self._io,
                    connections=self._connections,
                )
            )
            if not self._relay.smarthost_tls_verify:
                emit(self.log, LogLevel.warn, "relay.tls_unverified",
                     "smarthost_tls_verify = false: the certificates of the smarthost and "
                     "transport hosts are not checked, so anyone on the way can read the "
                     "mail and the smarthost password")

    def _read_queue(self) -> tuple[list[str], QueueIndex, list[CorruptEntry]]:
        removed = self._queue.remove_orphans()
        self._queue.take_incoming()  # read below with the rest
        return (removed, *build_index(self._queue))

    def _read(self, result, began: float) -> None:
        if not self.running:
            return
        removed, index, corrupt = result
        if removed:
            emit(self.log, LogLevel.info, "relay.orphans_removed",
                 "removed unacknowledged queue files", count=len(removed))
        self.index.take_over(index)
        emit(self.log, LogLevel.info, "relay.queue_read", "queued messages read",
             count=len(self.index), seconds=round(time.monotonic() - began, 2))
        for e in corrupt:
            self._set_aside(e)
        self._scanner = task.LoopingCall(self.scan)
        self._scanner.clock = self._reactor
        self._scanner.start(self._relay.scan_interval, now=True)
        self._dispatcher.start()

    def stopService(self):
        super().stopService()
        self._queue.on_enqueued = None
        self._fresh.clear()
        if self._scanner is not None and self._scanner.running:
            self._scanner.stop()
        self._dispatcher.stop()
        if self._resolver is not None:
            self._resolver.stop()
        if self._connections is not None:
            return self._connections.close()
        return None

    def _enqueued_in_thread(self, message: QueuedMessage) -> None:
        # The messages of one group commit come together: one wake-up of the
        # reactor for all that arrive before it takes them.
        with self._arriving_lock:
            self._arriving.append(message)
            if len(self._arriving) > 1:
                return
        self._reactor.callFromThread(self._take_arrivals)

    def _take_arrivals(self) -> None:
        with self._arriving_lock:
            arrived, self._arriving = self._arriving, []
        for message in arrived:
            self._enqueued(message)

    def _enqueued(self, message: QueuedMessage) -> None:
        if self.running and message.id not in self.index:
            if len(self._fresh) < FRESH_MESSAGES:
                self._fresh[message.id] = message
            self.index.put(self.index.entry_for(message))
            self._dispatcher.resume()

    def _destinations(self, entry) -> tuple[str, ...]:
        # The index shares its tuples of domains among the messages.
        found = self._destination_cache.get(entry.domains)
        if found is None:
            if len(self._destination_cache) > 4096:
                self._destination_cache.clear()
            found = self._destination_cache[entry.domains] = tuple(dict.fromkeys(
                destination_of_domain(self._relay, d) for d in entry.domains))
        return found

    def _wait(self, entry: IndexEntry, until: float) -> bool:
        """
        Put off a due message whose destinations rest until C{until}, in the
        index only (its envelope keeps its time: a restart tries it), unless
        it must be tried now: it expires, or a delay notice is due.
        """
        latest = entry.arrival + self.policy.max_age
        if self.policy.delay_warning is not None and not entry.delay_warned:
            latest = min(latest, entry.arrival + self.policy.delay_warning)
        if latest <= self._reactor.seconds():
            return False
        self.index.reschedule(entry.id, min(until, latest))
        return True

    # Scanning and requests.

    def scan(self) -> defer.Deferred:
        """
        Take in what other processes queued (workers) and what
        C{mailserver queue} asked for.  One scan at a time: asked while one
        runs, another follows it (a worker telling of a message it queued
        asks for one; so does the timer).
        """
        if not self.running:
            return defer.succeed(None)
        if self._scanning is not None:
            self._scan_again = True
            return self._scanning
        d = self._scanning = self._scan_once()

        def ended(result):
            self._scanning = None
            if self._scan_again and self.running:
                self._scan_again = False
                self.scan()
            return result

        d.addBoth(ended)
        return d

    def _scan_once(self) -> defer.Deferred:
        began = time.monotonic()
        d = self._io(self._take_news)
        d.addCallback(self._apply_news)
        d.addErrback(lambda f: emit_failure(self.log, "relay.scan_failed", "queue scan failed", f))
        d.addBoth(lambda _: self._metrics.relay_queue_scan_seconds.set(time.monotonic() - began))
        return d

    def take_in_writer(self, pid: int) -> defer.Deferred:
        """
        Take in the messages a worker process queued and still had when it
        ended (the queue ids name their writer): those it was sending, and
        those it handed over whose word was lost.
        """
        if not self.running:
            return defer.succeed(None)
        d = self._io(self._queue.written_by, pid, self.index)
        d.addCallback(lambda loaded: [self._enqueued(m) for m in loaded])
        d.addErrback(lambda f: emit_failure(self.log, "relay.scan_failed",
                                            "cannot take in a worker's messages", f))
        return d

    def _take_news(self):
        loaded, corrupt = [], []
        for queue_id in self._queue.take_incoming():
            try:
                loaded.append(self._queue.load(queue_id))
            except CorruptEntry as e:
                corrupt.append(e)
            except QueueError:
                continue  # gone already
        return loaded, corrupt, self._queue.take_requests()

    def _apply_news(self, news) -> None:
        loaded, corrupt, requests = news
        for message in loaded:
            self._enqueued(message)
        for e in corrupt:
            self._set_aside(e)
        for verb, target in requests:
            try:
                self.request(verb, target)
            except QueueError as e:
                emit(self.log, LogLevel.warn, "relay.request_refused", "queue request refused",
                     verb=verb, target=target, problem=str(e))

    def _set_aside(self, e: CorruptEntry) -> defer.Deferred:
        """
        Move a corrupt entry out of the way, saying so once.
        """
        self.index.remove(e.queue_id)

        def moved(where):
            self._metrics.relay_queue_corrupt_total.inc()
            emit(self.log, LogLevel.error, "relay.corrupt", "queue file is corrupt; moved it aside",
                 file=str(e.path), problem=e.problem, where=str(where), id=e.queue_id)

        def stuck(failure):
            error = failure.trap(OSError) and failure.value
            emit(self.log, LogLevel.error, "relay.corrupt",
                 "queue file is corrupt and cannot be moved aside; ignoring it",
                 file=str(e.path), problem=e.problem, error=error.strerror or str(error),
                 id=e.queue_id)

        return self._io(self._queue.set_aside, e.queue_id, e.problem).addCallbacks(moved, stuck)

    def request(self, verb: str, target: str) -> int:
        """
        Act on a request: C{verb} is C{flush}, C{delete} or C{bounce};
        C{target} a queue id, C{"domain:NAME"} or C{"*"}.  Returns how many
        messages it touched.
        """
        if verb == "flush" and (target == "*" or target.startswith("domain:")):
            return self.flush(None if target == "*" else target[len("domain:"):])
        if target not in self.index:
            raise QueueError(f"no queued message {target}")
        if target in self._active:
            if verb != "flush":
                self._after[target] = verb
            return 1
        if verb == "delete":
            self.index.remove(target)
            self._fresh.pop(target, None)
            self._io(self._queue.remove, target).addCallbacks(
                lambda _: emit(self.log, LogLevel.info, "relay.deleted", "deleted on request",
                               id=target),
                lambda f: emit_failure(self.log, "relay.delete_failed", "cannot delete it", f,
                                       id=target))
        elif verb == "bounce":
            self._start_attempt(target, bounce=True)
        else:
            self._dispatcher.wake(list(self._destinations(self.index.get(target))))
            self.index.reschedule(target, self._reactor.seconds())
            self._dispatcher.resume()
        return 1

    def flush(self, domain: str | None = None) -> int:
        """
        Try now every queued message (with a pending recipient in C{domain},
        if given).  Returns how many were scheduled.  ETRN calls this.
        """
        domain = domain.lower().rstrip(".") if domain else None
        due = [i for i in self.index.pending_ids(domain) if i not in self._active]
        self._dispatcher.wake([destination_of_domain(self._relay, domain)] if domain else None)
        self.index.due_now(due, self._reactor.seconds())
        self._dispatcher.resume()
        return len(due)

    # Attempts.

    def _start_attempt(self, queue_id: str, bounce: bool = False) -> bool:
        if queue_id in self._active or not self.running:
            return False
        d = defer.Deferred.fromCoroutine(self._attempt(queue_id, bounce))
        self._active[queue_id] = d

        def done(result):
            self._active.pop(queue_id, None)
            self._dispatcher.finished(queue_id)
            verb = self._after.pop(queue_id, None)
            if verb and queue_id in self.index:
                self.request(verb, queue_id)
            return result

        def failed(failure):
            # A bug or a full disk: back off, rather than retry it (and
            # maybe deliver it again) at once.
            emit_failure(self.log, "relay.attempt_failed", "attempt failed", failure, id=queue_id)
            if self.running and queue_id in self.index:
                self._back_off(queue_id)

        d.addBoth(done)
        d.addErrback(failed)
        return True

    async def _attempt(self, queue_id: str, bounce: bool) -> None:
        try:
            message = self._fresh.pop(queue_id, None) or await self._io(self._queue.load,
                                                                        queue_id)
        except CorruptEntry as e:
            await self._set_aside(e)
            return
        except QueueError:
            self.index.remove(queue_id)  # removed by hand
            return
        now = self._reactor.seconds()
        if bounce:
            message = self._fail_pending(message, "5.0.0", "smtp; 554 5.0.0 returned by the "
                                         "administrator", now)
        elif message.pending():
            message = await self._deliver(message)
            now = self._reactor.seconds()
            if message.pending():
                when = next_attempt(self.policy, message.arrival, now, message.attempts,
                                    self._jitter)
                if when is None:
                    message = self._fail_pending(
                        message, "4.4.7", "smtp; 451 4.4.7 delivery time expired", now,
                        keep_last=True)
                else:
                    message = replace(message, next_attempt=when)
        if not _finished(message):
            await self._io(self._queue.save, message)
            message = await self._reports.send_owed(message, now)
        # A message done with, nothing to report, is removed without saving
        # its last state first: one fsync (of the envelope folder) instead
        # of three while the attempt holds its destination's slot.  A crash
        # before the removal is on disk sends it again, as a crash before
        # the save did.
        if _finished(message):
            await self._removal.remove(message.id)
            self.index.remove(message.id)
            emit(self.log, LogLevel.info, "relay.removed", "done", id=message.id)
        elif message.pending():
            self._requeue(message, message.next_attempt)
        else:
            # Only reports are owed (the intake failed): try again later.
            self._requeue(message, now + self.policy.delays[0])

    def _back_off(self, queue_id: str) -> None:
        self.index.reschedule(queue_id, self._reactor.seconds()
                              + retry_delay(self.policy, 1, self._jitter))
        self._dispatcher.resume()

    def _requeue(self, message: QueuedMessage, when: float) -> None:
        self.index.put(self.index.entry_for(message, next_attempt=when))
        self._dispatcher.resume()

    def _fail_pending(self, message: QueuedMessage, status: str, diagnostic: str,
                      now: float, keep_last: bool = False) -> QueuedMessage:
        for r in message.pending():
            self._metrics.relay_deliveries_total.inc(result="bounced")
            self._tell(message, r.address, "bounced", diagnostic)
            emit(self.log, LogLevel.warn, "relay.bounced", "bounced",
                 recipient=printable(r.address), sender=printable(message.sender), dsn=status,
                 reason=printable(diagnostic, None), id=message.id)
            message = message.with_recipient(
                r.address,
                state=FAILED,
                status=status,
                diagnostic=r.diagnostic if keep_last and r.diagnostic else diagnostic,
                last_attempt=r.last_attempt or now,
                notified=False,
            )
        return message

    async def _deliver(self, message: QueuedMessage) -> QueuedMessage:
        groups: dict[str, list] = {}
        for r in message.pending():
            groups.setdefault(destination_of(self._relay, r.address), []).append(r)
        if len(groups) == 1:  # most messages: no DeferredList around one attempt
            [(key, group)] = groups.items()
            results = [await self._deliver_group(message, key, tuple(group))]
        else:
            results = await defer.gatherResults(
                [defer.Deferred.fromCoroutine(self._deliver_group(message, key, tuple(group)))
                 for key, group in groups.items()],
                consumeErrors=True,
            )
        now = self._reactor.seconds()
        last_error = ""
        for outcomes in results:
            for address, outcome in outcomes.items():
                message = self._apply(message, address, outcome, now)
                if not outcome.reply.positive and not last_error:
                    last_error = str(outcome.reply)
        return replace(message, attempts=message.attempts + 1, last_error=last_error)

    async def _deliver_group(self, message, key, group) -> dict[str, Outcome]:
        await self._slots.acquire(key)
        try:
            outcomes = await self._courier.deliver(message, group)
        finally:
            self._slots.release(key)
        # RFC 3463 X.4.X: network and routing, so no server answered.
        unreachable = [o.reply for o in outcomes.values() if o.reply.status.startswith("4.4.")]
        until = self._dispatcher.reached(key, len(unreachable) < len(outcomes))
        if until is not None:
            emit(self.log, LogLevel.info, "relay.unreachable",
                 "not reachable; its messages wait", destination=key,
                 reply=printable(str(unreachable[0]), None),
                 seconds=round(until - self._reactor.seconds()), id=message.id)
        return outcomes

    def _apply(self, message: QueuedMessage, address: str, outcome: Outcome,
               now: float) -> QueuedMessage:
        reply = outcome.reply
        recipient = next(r for r in message.recipients if r.address == address)
        common = dict(status=reply.status, diagnostic=reply.diagnostic(),
                      remote_mta=outcome.remote_mta, last_attempt=now)
        result = "delivered" if reply.positive else "bounced" if reply.permanent else "deferred"
        self._metrics.relay_deliveries_total.inc(result=result)
        if result != "deferred":
            self._tell(message, address, "relayed" if reply.positive else "bounced",
                       reply.diagnostic())
        if reply.positive:
            relayed = not outcome.dsn
            wants_success = dsn_module.wants(recipient, dsn_module.RELAYED) and relayed
            return message.with_recipient(
                address, state=RELAYED if relayed else DELIVERED,
                notified=not wants_success or not message.sender, **common)
        if reply.permanent:
            return message.with_recipient(address, state=FAILED, notified=False, **common)
        return message.with_recipient(address, **common)

    def _tell(self, message: QueuedMessage, address: str, status: str, detail: str) -> None:
        if self._on_delivered is not None:
            self._on_delivered(Delivery(queue_id=message.id, sender=message.sender,
                                        recipient=address, status=status, size=message.size,
                                        detail=detail))


def _finished(message: QueuedMessage) -> bool:
    """
    Every recipient delivered or failed, and every report owed sent.
    """
    return all(r.state != PENDING and r.notified for r in message.recipients)
