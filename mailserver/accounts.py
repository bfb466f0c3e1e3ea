"""
Accounts: the users file, the aliases file, address resolution, and the
C{twisted.cred} checker and realm that authenticate against them.

The users file holds one C{address:hash} per line, the hash being scrypt
(C{scrypt$n$r$p$salt$digest}, base64), so no plaintext password is ever on
disk.  The aliases file holds C{alias: target[, target]}
lines; an alias with several targets is a mailing list.  Both files are
re-read whenever their modification time or size changes, so the running
server sees C{mailserver user add} at once.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nacl.bindings import crypto_pwhash_scryptsalsa208sha256_ll
from nacl.exceptions import CryptoError
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from zope.interface import implementer

from mailserver.config import CatchAll
from mailserver.interfaces import IAccount, IAccounts

_SCRYPT_N = 2**14
_SCRYPT_R = 8
_SCRYPT_P = 1
# What a stored hash may ask of one check, as hashlib's scrypt allows by
# default: a damaged users file cannot make a login take gigabytes.
_SCRYPT_MAX_MEMORY = 32 * 1024 * 1024
_MAX_ALIAS_DEPTH = 10

# A local part we are willing to turn into a directory name: no path
# separators, no leading dot, no control characters.
_SAFE_LOCAL = re.compile(r"^[^/\\\x00-\x20\x7f.][^/\\\x00-\x20\x7f]*$")


class AccountError(ValueError):
    """
    A bad address or a missing account, with a message for the user.
    """


def sodium_scrypt(password: bytes, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    """
    scrypt as libsodium computes it; it maps its buffer itself, so none is
    left in a thread's malloc arena.
    """
    return crypto_pwhash_scryptsalsa208sha256_ll(password, salt, n, r, p, dklen=length)


def openssl_scrypt(password: bytes, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    """
    scrypt as OpenSSL computes it (C{hashlib}); its buffer is an ordinary
    C{malloc}, returned to the system when the server has set the allocator
    up (L{mailserver.process}).  L{scrypt} has bounded the memory already.
    """
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, maxmem=2 * _SCRYPT_MAX_MEMORY, dklen=length)


ScryptFunction = Callable[[bytes, bytes, int, int, int, int], bytes]


class FastestScrypt:
    """
    Whichever of several implementations of the same scrypt runs faster on
    this machine: it depends on the CPU (libsodium's took a third less time
    than OpenSSL's on an Intel Xeon, OpenSSL's 20% less than libsodium's on
    an AMD EPYC), and every login pays it.  The first C{trials} checks run
    each implementation in turn, timing it (one such check at a time: the
    others meanwhile run the first implementation, so logins that arrive
    together do not all pay double); later checks run the one with the
    shortest time.  Safe to call from several threads at once.
    """

    def __init__(
        self, implementations: tuple[ScryptFunction, ...], trials: int = 2, clock=time.perf_counter
    ) -> None:
        self._implementations = implementations
        self._trials = trials
        self._clock = clock
        self._lock = threading.Lock()
        self._best: dict[ScryptFunction, float] = {}
        self._runs = 0
        self._timing = False
        self.chosen: ScryptFunction | None = None

    def __call__(self, password: bytes, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
        chosen = self.chosen
        if chosen is not None:
            return chosen(password, salt, n, r, p, length)
        with self._lock:
            timing, self._timing = not self._timing, True
        if not timing:
            return self._implementations[0](password, salt, n, r, p, length)
        times = []
        try:
            for implementation in self._implementations:
                started = self._clock()
                digest = implementation(password, salt, n, r, p, length)
                times.append((implementation, self._clock() - started))
        finally:
            with self._lock:
                self._timing = False
                for implementation, elapsed in times:
                    self._best[implementation] = min(elapsed, self._best.get(implementation, elapsed))
                if len(times) == len(self._implementations):
                    self._runs += 1
                if self._runs >= self._trials and self.chosen is None:
                    self.chosen = min(self._implementations, key=self._best.__getitem__)
        return digest


def scrypt(
    password: bytes, salt: bytes, n: int, r: int, p: int, length: int,
    implementation: ScryptFunction = sodium_scrypt,
) -> bytes:
    """
    scrypt (RFC 7914), computed by C{implementation}: libsodium's and
    OpenSSL's compute the same function (the tests check it).

    @raise ValueError: parameters that are not scrypt's, or that need more
        than L{_SCRYPT_MAX_MEMORY}.
    """
    if n < 2 or n & (n - 1) or r < 1 or not 1 <= p <= 16 or not 1 <= length <= 1024:
        raise ValueError("not scrypt parameters")
    if 128 * r * (n + p) > _SCRYPT_MAX_MEMORY:
        raise ValueError("scrypt parameters need too much memory")
    return implementation(password, salt, n, r, p, length)


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = scrypt(password.encode("utf-8"), salt, _SCRYPT_N, _SCRYPT_R, _SCRYPT_P, 64)
    b64 = base64.b64encode
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


# Checked against when the user does not exist: a well-formed entry that no
# password matches, so checking it costs what checking a real one does.
_DUMMY_HASH = f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${base64.b64encode(bytes(16)).decode()}$" + (
    base64.b64encode(bytes(64)).decode()
)


def verify_password(password: str, stored: str, implementation: ScryptFunction = sodium_scrypt) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        actual = scrypt(
            password.encode("utf-8"), base64.b64decode(salt), int(n), int(r), int(p), len(expected),
            implementation,
        )
    except (ValueError, TypeError, CryptoError):
        return False
    return hmac.compare_digest(actual, expected)


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


class _WatchedFile:
    """
    A file parsed again whenever its mtime or size changes.
    """

    def __init__(self, path: Path, parse) -> None:
        self.path = path
        self._parse = parse
        self._stamp: tuple[int, int] | None = None
        self._value = parse("")

    def forget(self) -> None:
        self._stamp = None
        self._value = self._parse("")

    def get(self):
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp != self._stamp:
            text = self.path.read_text("utf-8") if stamp else ""
            self._value = self._parse(text)
            self._stamp = stamp
        return self._value


def _parse_users(text: str) -> dict[str, str]:
    users = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        address, _, hashed = line.rpartition(":")
        if address:
            users[address.lower()] = hashed
    return users


def _parse_aliases(text: str) -> dict[str, tuple[str, ...]]:
    aliases = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or ":" not in line:
            continue
        alias, _, targets = line.partition(":")
        members = tuple(t.strip().lower() for t in targets.split(",") if t.strip())
        if members:
            aliases[alias.strip().lower()] = members
    return aliases


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)  # the data folder, often
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


@implementer(IAccounts)
class Accounts:
    """
    Users and aliases of the local domains, and where an address delivers.
    """

    def __init__(
        self,
        *,
        users_path: Path,
        aliases_path: Path,
        mail_path: Path,
        local_domains: tuple[str, ...],
        subaddress_separator: str = "+",
        catch_all: tuple[CatchAll, ...] = (),
    ) -> None:
        """
        @param mail_path: the folder of the Maildirs, one per domain and user.
        @param local_domains: lower case; the first is the default domain.
        @param catch_all: where mail to unknown users of a domain goes.
        """
        self.users_path = users_path
        self.local_domains = local_domains
        self._mail_path = mail_path
        self._separator = subaddress_separator
        self._catch_all = catch_all
        self._users = _WatchedFile(users_path, _parse_users)
        self._aliases = _WatchedFile(aliases_path, _parse_aliases)
        # Account address -> Maildir; one Path (and its cached hash) per
        # account instead of three new ones per message.
        self._mailbox_paths: dict[str, Path] = {}

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
        self._users.forget()
        self._aliases.forget()

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
        _write_atomically(self.users_path, text)


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
            if verify_password(password, stored or _DUMMY_HASH, self._scrypt) and stored is not None:
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
