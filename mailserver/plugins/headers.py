"""
The built-in C{headers} plugin: add or remove header fields by rule.

::

    [plugins]
    enabled = ["headers"]

    [plugins.headers]
    remove = ["X-Originating-IP"]          # for every message
    add = { "X-Scanned" = "no" }

    [[plugins.headers.rules]]               # only where a rule matches
    authenticated = true                    # mail from logged-in users
    recipient_domain = "example.org"        # with a recipient in this domain
    sender_domain = "example.net"           # from this sender domain
    remove = ["Received"]
    add = { "X-Submitted" = "yes" }
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from twisted.plugin import IPlugin
from zope.interface import implementer, provider

from mailserver.envelope import Envelope
from mailserver.hooks import MessageHeaders, PluginContext, PluginOptionsError
from mailserver.interfaces import IMessageHook, IPluginFactory


@dataclass(frozen=True)
class Rule:
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()
    authenticated: bool | None = None
    recipient_domain: str | None = None
    sender_domain: str | None = None

    def applies(self, envelope: Envelope) -> bool:
        if self.authenticated is not None and self.authenticated != bool(envelope.authenticated):
            return False
        if self.sender_domain is not None and not envelope.sender.lower().endswith(
            "@" + self.sender_domain
        ):
            return False
        if self.recipient_domain is not None and not any(
            r.address.lower().endswith("@" + self.recipient_domain) for r in envelope.recipients
        ):
            return False
        return True


def _rule(table: Mapping[str, object], where: str) -> Rule:
    known = {"add", "remove", "authenticated", "recipient_domain", "sender_domain", "rules"}
    for key in table:
        if key not in known or (key == "rules" and where != ""):
            raise PluginOptionsError(where + key, "unknown option")
    add = table.get("add", {})
    if not isinstance(add, Mapping) or not all(
        isinstance(v, str) and "\n" not in v and "\r" not in v for v in add.values()
    ):
        raise PluginOptionsError(where + "add", "must be a table of header names to one-line strings")
    remove = table.get("remove", [])
    if not isinstance(remove, list) or not all(isinstance(v, str) for v in remove):
        raise PluginOptionsError(where + "remove", "must be a list of header names")
    authenticated = table.get("authenticated")
    if authenticated is not None and not isinstance(authenticated, bool):
        raise PluginOptionsError(where + "authenticated", "must be true or false")
    domains = {}
    for key in ("recipient_domain", "sender_domain"):
        value = table.get(key)
        if value is not None and not isinstance(value, str):
            raise PluginOptionsError(where + key, "must be a domain name")
        domains[key] = value.lower() if value else None
    return Rule(
        add=tuple(add.items()),
        remove=tuple(remove),
        authenticated=authenticated,
        **domains,
    )


@implementer(IMessageHook)
class HeaderRules:
    def __init__(self, rules: tuple[Rule, ...]) -> None:
        self.rules = rules

    def message(self, envelope: Envelope, headers: MessageHeaders, body: object) -> None:
        for rule in self.rules:
            if rule.applies(envelope):
                for name in rule.remove:
                    headers.remove(name)
                for name, value in rule.add:
                    headers.add(name, value)


@provider(IPlugin, IPluginFactory)
class HeadersPlugin:
    name = "headers"
    description = "Adds or removes header fields, for every message or by rule."

    @staticmethod
    def build(options: Mapping[str, object], context: PluginContext) -> HeaderRules:
        rules = [_rule(options, "")]
        extra = options.get("rules", [])
        if not isinstance(extra, list) or not all(isinstance(t, Mapping) for t in extra):
            raise PluginOptionsError("rules", "must be an array of tables ([[plugins.headers.rules]])")
        for index, table in enumerate(extra):
            rules.append(_rule(table, f"rules[{index}]."))
        return HeaderRules(tuple(rules))


plugin = HeadersPlugin
