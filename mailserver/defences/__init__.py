"""
Spam and abuse defences built into the server, all through the plugin
hooks (L{mailserver.interfaces}): screening at connection (DNS block- and
allowlists, early talkers: L{screen}), connection and submission rate
limits (L{rates}) and greylisting (L{greylist}), with their shared state
in L{store}.  Content filtering is the C{rspamd} plugin's
(L{mailserver.plugins.rspamd}).

Every refusal carries its reason (C{dnsbl}, C{pregreet}, C{rate},
C{greylist}); the hook runner logs it and counts it in
C{smtp_refusals_total}.
"""

from __future__ import annotations

from pathlib import Path

from mailserver.config import Checks, Limits
from mailserver.defences.dnsbl import DNSBL
from mailserver.defences.greylist import Greylist
from mailserver.defences.rates import ConnectionRate, SubmissionRates
from mailserver.defences.scope import Scope
from mailserver.defences.screen import ConnectionScreen
from mailserver.defences.store import DefenceStore, GreylistPolicy

__all__ = ["defence_hooks"]


def defence_hooks(
    *, checks: Checks, limits: Limits, store_path: Path, resolver, reactor, run=None
) -> tuple[list[tuple[str, object]], DefenceStore]:
    """
    The defences the C{[checks]} and C{[limits]} sections turn on, as
    C{(name, hook)} pairs to run before every other hook, and the store
    they keep their state in (a service: it must run while they do).

    @param resolver: the C{twisted.names} resolver for the DNS lists.
    @param run: see L{DefenceStore}.
    """
    scope = Scope(checks.skip_networks)
    policy = None
    if checks.greylist:
        policy = GreylistPolicy(
            delay=checks.greylist_delay,
            retry_window=checks.greylist_retry_window,
            expiry=checks.greylist_expiry,
            auto_whitelist=checks.greylist_auto_whitelist,
            max_entries=checks.greylist_max_entries,
        )
    store = DefenceStore(store_path, reactor, greylist=policy, run=run)
    hooks: list[tuple[str, object]] = []
    if limits.connection_rate_per_client:
        hooks.append(("connection-rate", ConnectionRate(store, scope, limits.connection_rate_per_client)))
    dnsbl = None
    if checks.dnsbl:
        dnsbl = DNSBL(checks.dnsbl, checks.dnsbl_threshold, resolver, checks.dnsbl_timeout, reactor)
    if dnsbl is not None or checks.greet_delay:
        hooks.append(("screen", ConnectionScreen(
            scope=scope, dnsbl=dnsbl, action=checks.dnsbl_action,
            greet_delay=checks.greet_delay, clock=reactor,
        )))
    if limits.submission_messages_per_hour or limits.submission_recipients_per_hour:
        hooks.append(("submission-rate", SubmissionRates(
            store, messages=limits.submission_messages_per_hour,
            recipients=limits.submission_recipients_per_hour,
        )))
    if policy is not None:
        trusted = dnsbl.allowlisted if dnsbl is not None else (lambda address: False)
        hooks.append(("greylist", Greylist(store, scope, trusted)))
    return hooks, store
