"""
Email authentication: DKIM signing of outbound mail, and SPF, DKIM and DMARC
checks of inbound mail reported in C{Authentication-Results}.

The server wires two kinds of message hooks from L{mail_auth_hooks}: the
inbound checks run before every configured plugin (they see the message as it
arrived), the signer after every plugin (it signs what will be sent).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["mail_auth_hooks", "load_signing_keys", "add_dkim_commands"]


def load_signing_keys(dkim, key_folder: Path, source: str) -> dict:
    """
    The keys of the C{[dkim]} section (L{mailserver.config.DKIM}), read from
    their files: domain to a list of C{(selector, SigningKey)}.

    @param key_folder: where a key without a path of its own is
        (C{<data_dir>/dkim}).
    @param source: the configuration file, for the error.
    @raise mailserver.config.ConfigError: naming C{dkim.keys}, when a key
        file is missing or unusable.
    """
    from mailserver.config import ConfigError
    from mailserver.mailauth.keys import DKIMKeyError, load_key

    keys: dict = {}
    for entry in dkim.keys:
        try:
            key = load_key(entry.file(key_folder))
        except DKIMKeyError as e:
            raise ConfigError(source, "dkim.keys", str(e)) from None
        keys.setdefault(entry.domain, []).append((entry.selector, key))
    return keys


def mail_auth_hooks(
    *, checks, dkim, hostname: str, key_folder: Path, resolver, reactor, source: str, owns
) -> tuple[list, list]:
    """
    The message hooks for the C{[checks]} and C{[dkim]} sections, as
    C{(name, hook)} pairs like L{mailserver.plugin_loading.load_plugins}
    returns.

    @param hostname: ours, the authserv-id of C{Authentication-Results}.
    @param key_folder: and C{source}: see L{load_signing_keys}.
    @param resolver: a C{twisted.names} resolver for the checks.
    @param owns: whether an account may send as an address
        (L{mailserver.accounts.Accounts.owns}): only such From addresses
        are signed.
    @return: C{(first, last)}: the hooks to run before the configured
        plugins (inbound checks) and after them (DKIM signing).
    @raise mailserver.config.ConfigError: when a DKIM key cannot be read.
    """
    from mailserver.mailauth.dns import ThreadDNS
    from mailserver.mailauth.signing import DKIMSigner
    from mailserver.mailauth.verify import InboundChecks

    first = [(
        "mailauth-checks",
        InboundChecks(checks, hostname, ThreadDNS(reactor, resolver, checks.dns_timeout), reactor),
    )]
    last = []
    keys = load_signing_keys(dkim, key_folder, source)
    if keys:
        last.append((
            "mailauth-dkim",
            DKIMSigner(keys, dkim.signed_headers, dkim.oversigned_headers, reactor,
                       owns=owns, shared_domains=dkim.shared_domains),
        ))
    return first, last


def add_dkim_commands(commands) -> None:
    """
    Register C{mailserver dkim ...} on the console script's subcommands.
    """
    from mailserver.mailauth.cli import add_dkim_commands as add

    add(commands)
