"""
Accounts: the users file, the aliases file, address resolution, and the
C{twisted.cred} checker and realm that authenticate against them.

The users file holds one C{address:hash} per line, the hash being scrypt
(L{mailserver.passwords}), so no plaintext password is ever on disk.  The
aliases file holds C{alias: target[, target]} lines (L{mailserver.aliases});
an alias with several targets is a mailing list.  The files are re-read
whenever their modification time or size changes
(L{mailserver.address_files}), so the running server sees C{mailserver
user add} at once.
"""

from __future__ import annotations

import functools
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from twisted.logger import Logger, LogLevel
from zope.interface import implementer

from mailserver.address_files import (
    LineProblem,
    Parsed,
    WatchedFile,
    content_lines,
    write_atomically,
)
from mailserver.aliases import parse_aliases
from mailserver.config import CatchAll
from mailserver.interfaces import IAccount, IAccounts
from mailserver.logs import emit
from mailserver.passwords import (
    DUMMY_HASH,
    FastestScrypt,
    hash_password,
    openssl_scrypt,
    sodium_scrypt,
    verify_password,
)
from mailserver.relay_recipients import parse_relay_recipients

_MAX_ALIAS_DEPTH = 10

# A local part we are willing to turn into a directory name: no path
# separators, no leading dot, no control characters.
_SAFE_LOCAL = re.compile(r"^[^/\\\x00-\x20\x7f.][^/\\\x00-\x20\x7f]*$")


class AccountError(ValueError):
    """
    A bad address or a missing account, with a message for the user.
    """


def split_address(address: str) -> tuple[str, str]:
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        raise AccountError(f"{address!r} is not an address of the form user@domain")
    return local, domain.lower().rstrip(".")


def canonical(address: str) -> str:
    """
    Accounts are case-insensitive, as users expect (RFC 5321 allows it).
    """
    local, domain = split_address(address)
    return f"{local.lower()}@{domain}"


def _parse_users(text: str, path: Path) -> Parsed[dict[str, str]]:
    users = {}
    for _, line in content_lines(text):
        address, _, hashed = line.rpartition(":")
        if address:
            users[address.lower()] = hashed
    return users, []


@implementer(IAccounts)
class Accounts:
    """
    Users and aliases of the local domains, where an address delivers, and
    which recipients of the relay domains are accepted.
    """

    log = Logger()

    def __init__(
        self,
        *,
        users_path: Path,
        aliases_path: Path,
        mail_path: Path,
        local_domains: tuple[str, ...],
        subaddress_separator: str = "+",
        catch_all: tuple[CatchAll, ...] = (),
        relay_domains: tuple[str, ...] = (),
        relay_recipients_path: Path | None = None,
    ) -> None:
        """
        @param mail_path: the folder of the Maildirs, one per domain and user.
        @param local_domains: lower case; the first is the default domain.
        @param catch_all: where mail to unknown users of a domain goes.
        @param relay_domains: domains we take mail for and relay.
        @param relay_recipients_path: the valid recipients of the relay
            domains (L{mailserver.relay_recipients}); C{None}: all are.
        """
        self.users_path = users_path
        self.local_domains = local_domains
        self.relay_domains = relay_domains
        self._mail_path = mail_path
        self._separator = subaddress_separator
        self._catch_all = catch_all
        self._users = WatchedFile(users_path, _parse_users)
        self._aliases = WatchedFile(
            aliases_path, functools.partial(parse_aliases, local_domains=local_domains),
            self._report)
        self._relay_recipients = None
        if relay_recipients_path is not None:
            self._relay_recipients = WatchedFile(
                relay_recipients_path,
                functools.partial(parse_relay_recipients, relay_domains=relay_domains),
                self._report)
        # Account address -> Maildir; one Path (and its cached hash) per
        # account instead of three new ones per message.
        self._mailbox_paths: dict[str, Path] = {}

    def _report(self, path: Path, problems: list[LineProblem]) -> None:
        for problem in problems:
            emit(self.log, LogLevel.warn, "accounts.bad_line", "line skipped",
                 file=str(path), line=problem.line, problem=problem.problem)

    def problems(self) -> list[LineProblem]:
        """
        The lines of the aliases and relay recipients files that cannot be
        used, as the files are now.
        """
        found = []
        for watched in (self._aliases, self._relay_recipients):
            if watched is not None:
                watched.get()
                found += watched.problems
        return found

    @property
    def default_domain(self) -> str:
        """
        The domain of a bare user name.
        """
        return self.local_domains[0]

    def is_local_domain(self, domain: str) -> bool:
        return domain.lower().rstrip(".") in self.local_domains

    def forget(self) -> None:
        """
        Drop what was read, so the next lookup reads the files again (for a
        reload, in case a change kept the same mtime and size).
        """
        for watched in (self._users, self._aliases, self._relay_recipients):
            if watched is not None:
                watched.forget()

    # Lookups

    def users(self) -> list[str]:
        return sorted(self._users.get())

    def password_hash(self, address: str) -> str | None:
        try:
            return self._users.get().get(canonical(address))
        except AccountError:
            return None

    def mailbox_path(self, account: str) -> Path:
        path = self._mailbox_paths.get(account)
        if path is None:
            local, domain = split_address(canonical(account))
            path = self._mail_path / domain / local
            if len(self._mailbox_paths) < 100_000:
                self._mailbox_paths[account] = path
        return path

    def resolve(self, address: str) -> tuple[str, ...] | None:
        """
        Where mail to C{address} in a local domain goes: account addresses
        and, for forwarding aliases, remote addresses.  C{None} means there is
        no such recipient, or the domain is not local.
        """
        try:
            address = canonical(address)
        except AccountError:
            return None
        local, domain = split_address(address)
        if not self.is_local_domain(domain):
            return None
        found = self._resolve(address, 0, set())
        if found:
            return tuple(dict.fromkeys(found))
        local, domain = split_address(address)
        separator = self._separator
        if separator and separator in local:
            base = local.split(separator, 1)[0]
            if base:
                found = self._resolve(f"{base}@{domain}", 0, set())
                if found:
                    return tuple(dict.fromkeys(found))
        for rule in self._catch_all:
            if rule.domain == domain:
                found = self._resolve(rule.account, 0, set())
                if found:
                    return tuple(dict.fromkeys(found))
        return None

    def _resolve(self, address: str, depth: int, seen: set[str]) -> list[str]:
        if address in seen or depth > _MAX_ALIAS_DEPTH:
            return []
        seen.add(address)
        local, domain = split_address(address)
        if not self.is_local_domain(domain):
            return [address]
        aliases = self._aliases.get()
        if address in aliases:
            result: list[str] = []
            for target in aliases[address]:
                try:
                    result.extend(self._resolve(canonical(target), depth + 1, seen))
                except AccountError:
                    continue
            return result
        if address in self._users.get():
            return [address]
        return []

    def is_relay_domain(self, domain: str) -> bool:
        """
        Is C{domain} one whose mail we take from anyone and relay
        (C{relay.relay_domains}: a backup MX, a gateway)?
        """
        return domain.lower().rstrip(".") in self.relay_domains

    def is_relay_recipient(self, address: str) -> bool:
        """
        Is mail for C{address}, of a relay domain, accepted?  All of a
        domain's are, unless C{relay.relay_recipients} lists some.
        """
        if self._relay_recipients is None:
            return True
        return self._relay_recipients.get().accepts(address, self._separator)

    def exists(self, address: str) -> bool:
        return self.resolve(address) is not None

    def expand(self, address: str) -> tuple[str, ...] | None:
        """
        The members of an alias or list, for EXPN; C{None} if not an alias.
        """
        try:
            return self._aliases.get().get(canonical(address))
        except AccountError:
            return None

    def owns(self, account: str, address: str) -> bool:
        """
        May the authenticated C{account} send as C{address}?  Its own address,
        a subaddress of it, or an alias that delivers to it.
        """
        try:
            account = canonical(account)
            address = canonical(address)
        except AccountError:
            return False
        if address == account:
            return True
        local, domain = split_address(address)
        separator = self._separator
        if separator and separator in local:
            address = f"{local.split(separator, 1)[0]}@{domain}"
            if address == account:
                return True
        if address in self._aliases.get():
            return account in (self._resolve(address, 0, set()))
        return False

    # Changes (used by the CLI)

    def add_user(self, address: str, password: str) -> None:
        address = self._checked_new_address(address)
        users = dict(self._users.get())
        if address in users:
            raise AccountError(f"{address} already exists")
        users[address] = hash_password(password)
        self._save_users(users)

    def set_password(self, address: str, password: str) -> None:
        address = canonical(address)
        users = dict(self._users.get())
        if address not in users:
            raise AccountError(f"no such user: {address}")
        users[address] = hash_password(password)
        self._save_users(users)

    def remove_user(self, address: str) -> None:
        address = canonical(address)
        users = dict(self._users.get())
        if address not in users:
            raise AccountError(f"no such user: {address}")
        del users[address]
        self._save_users(users)

    def _checked_new_address(self, address: str) -> str:
        address = canonical(address)
        local, domain = split_address(address)
        if not self.is_local_domain(domain):
            raise AccountError(
                f"{domain} is not a local domain (local_domains: "
                f"{', '.join(self.local_domains)})"
            )
        if not _SAFE_LOCAL.match(local) or ":" in local or "@" in local:
            raise AccountError(f"{local!r} cannot be used as a mailbox name")
        return address

    def _save_users(self, users: dict[str, str]) -> None:
        text = "".join(f"{a}:{h}\n" for a, h in sorted(users.items()))
        write_atomically(self.users_path, text)


@implementer(IAccount)
@dataclass(frozen=True)
class Account:
    address: str


@implementer(ICredentialsChecker)
class AccountsChecker:
    """
    Checks a username and password against the users file.

    scrypt is deliberately slow (tens of milliseconds and 16 MiB), so it
    runs in threads of its own, no more of them than there are cores: the
    reactor's pool stays free for file work, a flood of logins cannot take
    more CPU than the machine has, and each thread keeps at most one scrypt
    buffer.  An unknown user costs the same check against a dummy hash, so
    the answer's timing does not tell which accounts exist.  The first
    checks also find out which scrypt implementation is faster here
    (L{FastestScrypt}).
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, accounts: Accounts, reactor=None, threadpool=None) -> None:
        """
        @param threadpool: where the checks run (see L{password_threadpool});
            by default the reactor's own pool.
        """
        self._accounts = accounts
        self._reactor = reactor
        self._threadpool = threadpool
        self._scrypt = FastestScrypt((openssl_scrypt, sodium_scrypt))

    def requestAvatarId(self, credentials):
        try:
            username = credentials.username
            password = credentials.password
            if isinstance(username, bytes):
                username = username.decode("utf-8")
            if isinstance(password, bytes):
                password = password.decode("utf-8")
        except UnicodeDecodeError:
            return defer.fail(UnauthorizedLogin())
        stored = self._accounts.password_hash(username)
        try:
            address = canonical(username)
        except AccountError:
            stored = None

        def check() -> str:
            if verify_password(password, stored or DUMMY_HASH, self._scrypt) and stored is not None:
                return address
            raise UnauthorizedLogin()

        if self._reactor is None:
            return defer.maybeDeferred(check)
        from twisted.internet.threads import deferToThreadPool

        pool = self._threadpool or self._reactor.getThreadPool()
        return deferToThreadPool(self._reactor, pool, check)


# How much lower than the server's own a password thread's scheduling
# priority is (nice, per thread on Linux): when the cores are busy, the
# sessions already logged in go first and a flood of logins cannot starve
# them; an A/B of 20 POP3 rounds of 4 logins and 4,000 RETRs gave 1.04x.
_PASSWORD_NICENESS = 10


def _lower_priority_thread(*args, target, **kwargs) -> threading.Thread:
    def run() -> None:
        try:
            thread = threading.get_native_id()
            own = os.getpriority(os.PRIO_PROCESS, thread)
            os.setpriority(os.PRIO_PROCESS, thread, min(own + _PASSWORD_NICENESS, 19))
        except (OSError, AttributeError):
            pass  # not Linux, or not allowed: the priority stays
        target()

    return threading.Thread(*args, target=run, **kwargs)


def password_threadpool(reactor):
    """
    The threads password checks run in: one per core (at most four), at a
    lower priority than the reactor's, started now and stopped with the
    reactor.
    """
    from twisted.python.threadpool import ThreadPool

    pool = ThreadPool(0, max(1, min(os.cpu_count() or 1, 4)), "mailserver-passwords")
    pool.threadFactory = _lower_priority_thread
    pool.start()
    reactor.addSystemEventTrigger("during", "shutdown", pool.stop)
    return pool


@implementer(IRealm)
class AccountRealm:
    """
    Turns an avatar id into an L{Account}.  Checkers from C{strcred} (a
    C{file:} or C{unix} source) know bare user names: those get the first
    local domain.
    """

    def __init__(self, default_domain: str) -> None:
        self._default_domain = default_domain

    def requestAvatar(self, avatarId, mind, *interfaces):
        if IAccount not in interfaces:
            raise NotImplementedError("only IAccount avatars are offered")
        if isinstance(avatarId, bytes):
            avatarId = avatarId.decode("utf-8")
        if "@" not in avatarId:
            avatarId = f"{avatarId}@{self._default_domain}"
        return IAccount, Account(canonical(avatarId)), lambda: None


def strcred_checkers(descriptions: tuple[str, ...]) -> list[ICredentialsChecker]:
    """
    The extra account sources named in C{auth.checkers}, built with
    Twisted's C{strcred} plugins (C{file:PATH}, C{unix}, ...); the
    configuration has checked each string (L{mailserver.config.values}).
    """
    from twisted.cred import strcred

    return [strcred.makeChecker(description) for description in descriptions]


def make_portal(accounts: Accounts, reactor=None, extra_checkers=(), threadpool=None) -> Portal:
    """
    The users file first, then any extra checkers: a portal tries each
    checker registered for the credentials' interface, so several sources
    are combined by L{_FirstThatAccepts}.

    @param threadpool: for the users file's password checks.
    """
    checkers = [AccountsChecker(accounts, reactor, threadpool), *extra_checkers]
    portal = Portal(AccountRealm(accounts.default_domain))
    portal.registerChecker(_FirstThatAccepts(checkers))
    return portal


@implementer(ICredentialsChecker)
class _FirstThatAccepts:
    """
    A C{Portal} keeps one checker per credentials interface; this one asks
    several in turn, so the users file and C{strcred} sources work side by
    side.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, checkers: list[ICredentialsChecker]) -> None:
        self._checkers = checkers

    async def _check(self, credentials):
        for checker in self._checkers:
            try:
                return await defer.maybeDeferred(checker.requestAvatarId, credentials)
            except UnauthorizedLogin:
                continue
        raise UnauthorizedLogin()

    def requestAvatarId(self, credentials):
        return defer.ensureDeferred(self._check(credentials))
