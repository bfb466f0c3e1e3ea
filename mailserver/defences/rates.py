"""
Rate limits, counted in the L{DefenceStore} so every worker process counts
against the same allowance and a restart does not reset it.

 - Per authenticated user (on any role: a user may also authenticate on
   the MX port, which then relays for them): MAIL commands and RCPT
   commands in an hour, so a stolen password cannot send a million
   messages.  Past the limit MAIL or RCPT is told 450 4.7.1 with the time
   the allowance comes back; what was accepted before goes.
 - Per client address (IPv6: its /64) on the MX role: connections in a
   minute, as Postfix's C{smtpd_client_connection_rate_limit}; past it,
   421 4.7.0 at the greeting.

Attempts are counted, not deliveries: a recipient the server refuses
after the hook counted it still counts, as in Postfix's anvil.
"""

from __future__ import annotations

import time

from zope.interface import implementer

from mailserver.defences.scope import Scope
from mailserver.defences.store import DefenceStore
from mailserver.hooks import Client, Reject
from mailserver.interfaces import IConnectionHook, IEnvelopeHook
from mailserver.login_throttle import client_key

HOUR = 3600.0
MINUTE = 60.0


def _utc(moment: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(moment))


@implementer(IEnvelopeHook)
class SubmissionRates:
    """
    @param messages: MAIL commands per user per hour (0: no limit).
    @param recipients: RCPT commands per user per hour (0: no limit).
    """

    def __init__(self, store: DefenceStore, *, messages: int, recipients: int) -> None:
        self._store = store
        self._limits = {"messages": messages, "recipients": recipients}

    def _count(self, client: Client, what: str):
        """
        Nothing to wait for unless the client is a user with a limit (most
        MAIL and RCPT commands, on the MX role, are answered at once).
        """
        limit = self._limits[what]
        if client.authenticated is None or not limit:
            return None
        return self._take(client.authenticated, what, limit)

    async def _take(self, user: str, what: str, limit: int) -> Reject | None:
        counted, resets_at = await self._store.take(what, user.lower(), limit, HOUR)
        if counted:
            return None
        return Reject(
            450, "4.7.1",
            f"Sending limit of {limit} {what} per hour reached for {user};"
            f" try again after {_utc(resets_at)}",
            reason="rate",
        )

    def sender(self, client: Client, address: str):
        return self._count(client, "messages")

    def recipient(self, client: Client, sender: str, address: str):
        return self._count(client, "recipients")


@implementer(IConnectionHook)
class ConnectionRate:
    def __init__(self, store: DefenceStore, scope: Scope, per_minute: int) -> None:
        self._store = store
        self._scope = scope
        self._per_minute = per_minute

    async def connection(self, client: Client) -> Reject | None:
        if not self._scope.covers(client):
            return None
        key = client_key(client.address)
        counted, _ = await self._store.take("connections", key, self._per_minute, MINUTE)
        if counted:
            return None
        return Reject(421, "4.7.0", f"Error: too many connections from {client.address}",
                      reason="rate")
