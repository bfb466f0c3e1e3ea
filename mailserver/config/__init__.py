"""
The configuration file, parsed once into frozen, typed values.

The TOML file maps one-to-one onto dataclasses (L{model}): a top-level key
is a field of L{Config}, a table is a field whose type is another
dataclass.  Every key is declared with its default as the file writes it
and its kind (L{kinds}, L{values}, L{endpoints}), which checks the file's
value and turns it into what the server uses: durations into seconds,
C{"host:port"} into a L{HostPort}, words from a fixed set into
C{enum.StrEnum} members (which still compare equal to their strings), rules
such as C{"domain=account"} into small frozen records.  L{load} parses every
key and then checks the rules that tie keys together (L{loading}); that is
the only validation, and the rooms of the server are handed their own
section and paths, never re-parsing a string.

Every problem is a L{ConfigError} naming the file, the key and what is
wrong, one printable line, so C{twistd} and C{mailserver check-config}
print it and exit non-zero.

Adding a key: one field in its section's dataclass in L{model}, declared
with L{setting} (the default as the file writes it, and a kind: an existing
one, or a converter function in L{values} that raises L{Invalid}); a line
in the section's docstring; a row in the README's key reference (a test
checks the README against the model both ways).  A rule between keys goes
into L{loading._check_together}.

Why standard-library dataclasses and a small loader, not attrs/cattrs:
attrs validators and converters run at construction and name no TOML key,
and cattrs (not installed) reports structuring errors as exception groups
that would have to be flattened back into one line per key.  The loader
here is some sixty lines; a kind is a TOML type plus a function, so the
error for a key is always written where its rule is.
"""

from mailserver.config.errors import ConfigError, Invalid
from mailserver.config.loading import default, load, override
from mailserver.config.model import (
    DATA_DIR_NAME,
    DKIM,
    IMAP,
    POP3,
    SMTP,
    TLS,
    Admin,
    Auth,
    Checks,
    Config,
    Limits,
    Listeners,
    Log,
    Plugins,
    Relay,
    Setting,
    file_keys,
)
from mailserver.config.values import (
    BareNewline,
    CatchAll,
    CheckAction,
    Disclosure,
    DKIMKey,
    DNSBLSite,
    HostPort,
    ListedAction,
    RelayTLS,
    SmarthostTLS,
    TLSLevel,
    TLSPolicyRule,
    Transport,
)

__all__ = [
    "DATA_DIR_NAME", "DKIM", "IMAP", "POP3", "SMTP", "TLS", "Admin", "Auth", "BareNewline",
    "CatchAll", "CheckAction", "Checks", "Config", "ConfigError", "DKIMKey", "DNSBLSite",
    "Disclosure", "HostPort", "Invalid", "Limits", "ListedAction",
    "Listeners", "Log", "Plugins", "Relay", "RelayTLS", "Setting", "SmarthostTLS", "TLSLevel",
    "TLSPolicyRule", "Transport",
    "default", "file_keys", "load", "override",
]
