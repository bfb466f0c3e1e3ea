"""
Screening a stranger at connection, before the greeting, as Postfix's
postscreen does: DNS block- and allowlists, and the early-talker test.

The blocklist look-ups run while the greeting waits (C{checks.greet_delay},
off by default); a listed client hears 554 5.7.1 (or 450 4.7.1) naming the
lists, and goes.  A client that sends anything before our greeting is a
bot saving itself the round trip (RFC 5321 4.3.1: the client waits for the
greeting): it hears 554 5.5.0 and goes.  A client the allowlists trust
skips the rest of the wait.  The session holds what a client sends while
connection hooks run, and tells it through L{Client.pending_input}.
"""

from __future__ import annotations

from twisted.internet.task import deferLater
from zope.interface import implementer

from mailserver.config.values import ListedAction
from mailserver.defences.dnsbl import DNSBL
from mailserver.defences.scope import Scope
from mailserver.hooks import Client, Reject
from mailserver.interfaces import IConnectionHook

EARLY_TALKER = Reject(
    554, "5.5.0", "Error: SMTP protocol synchronization (talked before the greeting)",
    reason="pregreet",
)


def listed_reply(client: Client, listed_by: tuple[str, ...], action: ListedAction) -> Reject:
    code, enhanced = (554, "5.7.1") if action == ListedAction.REJECT else (450, "4.7.1")
    lists = ", ".join(listed_by) or "DNS blocklists"
    return Reject(
        code, enhanced, f"Service unavailable; client [{client.address}] blocked using {lists}",
        reason="dnsbl",
    )


@implementer(IConnectionHook)
class ConnectionScreen:
    """
    @param dnsbl: the lists to look clients up in, or C{None}.
    @param greet_delay: seconds from connection to the greeting (at least
        as long as the look-ups take).
    """

    def __init__(self, *, scope: Scope, dnsbl: DNSBL | None, action: ListedAction,
                 greet_delay: float, clock) -> None:
        self._scope = scope
        self._dnsbl = dnsbl
        self._action = action
        self._greet_delay = greet_delay
        self._clock = clock

    async def connection(self, client: Client) -> Reject | None:
        if not self._scope.covers(client):
            return None
        started = self._clock.seconds()
        if self._dnsbl is not None:
            verdict = await self._dnsbl.verdict(client.address)
            if self._dnsbl.listed(verdict):
                return listed_reply(client, verdict.listed_by, self._action)
            if verdict.score < 0:
                return None
        left = self._greet_delay - (self._clock.seconds() - started)
        if left > 0:
            await deferLater(self._clock, left, lambda: None)
        if client.pending_input():
            return EARLY_TALKER
        return None
