"""
Email authentication: DKIM signing of outbound mail, and SPF, DKIM and DMARC
checks of inbound mail reported in C{Authentication-Results}.

The server wires two kinds of message hooks from L{mail_auth_hooks}: the
inbound checks run before every configured plugin (they see the message as it
arrived), the signer after every plugin (it signs what will be sent).
"""

from __future__ import annotations

__all__ = ["mail_auth_hooks", "load_signing_keys", "add_dkim_commands"]


def load_signing_keys(config) -> dict:
    """
    The keys of C{dkim.keys}, read from their files: domain to a list of
    C{(selector, SigningKey)}.

    @raise mailserver.config.ConfigError: naming C{dkim.keys}, when a key
        file is missing or unusable.
    """
    from mailserver.config import ConfigError
    from mailserver.mailauth._settings import parse_key_entry
    from mailserver.mailauth.keys import DKIMKeyError, load_key

    keys: dict = {}
    for entry in config.dkim.keys:
        parsed = parse_key_entry(entry, config.data_path)
        try:
            key = load_key(parsed.path)
        except DKIMKeyError as e:
            raise ConfigError(config.source, "dkim.keys", str(e)) from None
        keys.setdefault(parsed.domain, []).append((parsed.selector, key))
    return keys


def mail_auth_hooks(config, reactor, *, owns, resolver=None) -> tuple[list, list]:
    """
    The message hooks for C{config}, as C{(name, hook)} pairs like
    L{mailserver.plugin_loading.load_plugins} returns.

    @param owns: whether an account may send as an address
        (L{mailserver.accounts.Accounts.owns}): only such From addresses
        are signed.
    @param resolver: a C{twisted.names} resolver (default: one for
        C{relay.resolver}).
    @return: C{(first, last)}: the hooks to run before the configured
        plugins (inbound checks) and after them (DKIM signing).
    @raise mailserver.config.ConfigError: when a DKIM key cannot be read.
    """
    from mailserver.mailauth.dns import ThreadDNS
    from mailserver.mailauth.signing import DKIMSigner
    from mailserver.mailauth.verify import InboundChecks

    if resolver is None:
        from mailserver.relay.mx import make_resolver

        resolver = make_resolver(config.relay.resolver, reactor)
    first = [(
        "mailauth-checks",
        InboundChecks(
            config.checks, config.hostname,
            ThreadDNS(reactor, resolver, config.checks.dns_timeout), reactor,
        ),
    )]
    last = []
    keys = load_signing_keys(config)
    if keys:
        last.append((
            "mailauth-dkim",
            DKIMSigner(keys, config.dkim.signed_headers, config.dkim.oversigned_headers,
                       reactor, owns=owns, shared_domains=config.dkim.shared_domains),
        ))
    return first, last


def add_dkim_commands(commands) -> None:
    """
    Register C{mailserver dkim ...} on the console script's subcommands.
    """
    from mailserver.mailauth.cli import add_dkim_commands as add

    add(commands)
