"""
The reports (RFC 3464) the relay owes senders: failures, successes that
asked for one (C{NOTIFY=SUCCESS} to a server without DSN), delay notices;
built by L{mailserver.relay.dsn} and injected through the intake, so a
report is queued or delivered like any other message.
"""

from __future__ import annotations

from dataclasses import replace

from twisted.logger import Logger, LogLevel

from mailserver.envelope import Envelope, Recipient
from mailserver.logs import emit
from mailserver.relay import dsn as dsn_module
from mailserver.relay.queue import DELIVERED, FAILED, RELAYED, QueuedMessage, QueueError
from mailserver.safe_text import printable


class ReportSender:
    """
    @param policy: the L{RetryPolicy} (when a delay notice is due, the
        date a report says retries end).
    @param io: runs a blocking call and returns a Deferred of its result.
    """

    log = Logger()

    def __init__(self, *, relay, hostname: str, queue, intake, accounts, policy, io) -> None:
        self._relay = relay
        self._hostname = hostname
        self._queue = queue
        self._intake = intake
        self._accounts = accounts
        self.policy = policy
        self._io = io

    async def send_owed(self, message: QueuedMessage, now: float) -> QueuedMessage:
        """
        Send the reports the recipients' states call for; mark them sent.
        """
        failed = [r for r in message.recipients if r.state == FAILED and not r.notified]
        relayed = [r for r in message.recipients
                   if r.state in (RELAYED, DELIVERED) and not r.notified]
        reports = []
        if failed:
            reports.append((dsn_module.FAILED, failed))
        if relayed:
            reports.append((dsn_module.RELAYED, relayed))
        delay_due = (
            self.policy.delay_warning is not None
            and not message.delay_warned
            and message.pending()
            and now - message.arrival >= self.policy.delay_warning
        )
        if delay_due:
            delayed = [r for r in message.pending() if dsn_module.wants(r, dsn_module.DELAYED)]
            if delayed and message.sender:
                reports.append((dsn_module.DELAYED, delayed))
            message = replace(message, delay_warned=True)
        for action, recipients in reports:
            wanted = [r for r in recipients if dsn_module.wants(r, action)]
            if wanted and message.sender:
                try:
                    await self._send_report(message, wanted, action, now)
                except QueueError as e:  # nowhere to send it: drop it
                    emit(self.log, LogLevel.error, "relay.dsn_dropped", "dropping a report",
                         action=action, recipient=printable(message.sender), problem=str(e),
                         id=message.id)
                except Exception as e:
                    emit(self.log, LogLevel.error, "relay.dsn_failed", "cannot send a report",
                         action=action, recipient=printable(message.sender), problem=str(e),
                         id=message.id)
                    if action == dsn_module.DELAYED:
                        message = replace(message, delay_warned=False)
                    continue
            if action != dsn_module.DELAYED:
                for r in recipients:
                    message = message.with_recipient(r.address, notified=True)
        if reports:
            await self._io(self._queue.save, message)
        return message

    async def _send_report(self, message, recipients, action, now) -> None:
        headers_only = message.ret == "HDRS" or (
            message.ret is None and message.size > self._relay.bounce_full_limit
        )
        if action != dsn_module.FAILED:
            headers_only = True

        def read() -> bytes:
            with self._queue.open_body(message) as body:
                return dsn_module.read_original(body, headers_only)

        original = await self._io(read)
        data = dsn_module.build_dsn(
            message, recipients, action,
            hostname=self._hostname,
            original=original,
            headers_only=headers_only,
            now=now,
            retry_until=message.arrival + self.policy.max_age,
        )
        receiver = self._intake.begin(
            Envelope(
                sender="",
                recipients=(Recipient(address=message.sender,
                                      destinations=self._report_destinations(message.sender)),),
                body="8BITMIME" if any(b > 127 for b in data) else "7BIT",
            )
        )
        try:
            receiver.write(data)
        except Exception:
            receiver.abort()
            raise
        report_id = await receiver.finish()
        emit(self.log, LogLevel.info, "relay.dsn_sent", f"{action} report sent", action=action,
             recipient=printable(message.sender), report=report_id, id=message.id)

    def _report_destinations(self, sender: str) -> tuple[str, ...]:
        domain = sender.rpartition("@")[2]
        if self._accounts is not None and self._accounts.is_local_domain(domain):
            resolved = self._accounts.resolve(sender)
            if not resolved:
                raise QueueError(f"local sender <{sender}> has no mailbox")
            return tuple(resolved)
        return (sender,)
