"""
Greylisting (off by default): a stranger's first attempt to send from a
client network to a recipient is told 451 4.7.1; a real mail server tries
again later and is let through, a spam bot that fires and forgets is not.

The triplet is (client network, sender, recipient): the network (IPv4 /24,
IPv6 /64) because big senders retry from another host of the same farm;
the sender with the parts that change on every attempt taken out (a
BATV tag, a C{+extension}, digits of a VERP address), so a retry matches.
The state is in the L{DefenceStore}, so it survives a restart and every
worker process sees the same.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

from zope.interface import implementer

from mailserver.defences.scope import Scope, client_network
from mailserver.defences.store import DefenceStore
from mailserver.hooks import Client, Reject
from mailserver.interfaces import IEnvelopeHook

_BATV = re.compile(r"^(?:prvs|msprvs\d*|btv\d*)=[^=@]*=", re.IGNORECASE)
_DIGITS = re.compile(r"\d+")


def sender_key(sender: str) -> str:
    """
    The sender as greylisting compares it: lower case, without a BATV
    tag, a C{+extension} or the digits VERP puts in the local part.
    """
    local, at, domain = sender.lower().rpartition("@")
    if not at:
        return sender.lower()
    local = _BATV.sub("", local).split("+", 1)[0]
    return f"{_DIGITS.sub('#', local)}@{domain}"


@implementer(IEnvelopeHook)
class Greylist:
    """
    @param trusted: whether a client address is trusted already (a DNS
        allowlist named it), which skips greylisting.
    """

    def __init__(self, store: DefenceStore, scope: Scope,
                 trusted: Callable[[str], bool] = lambda address: False) -> None:
        self._store = store
        self._scope = scope
        self._trusted = trusted

    def sender(self, client: Client, address: str) -> None:
        return None

    async def recipient(self, client: Client, sender: str, address: str) -> Reject | None:
        if not self._scope.covers(client) or self._trusted(client.address):
            return None
        wait = await self._store.greylist_wait(
            client_network(client.address), sender_key(sender), address.lower())
        if wait <= 0:
            return None
        return Reject(451, "4.7.1", f"Greylisted, please try again in {math.ceil(wait)} seconds",
                      reason="greylist")
