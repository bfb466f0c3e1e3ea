"""
Accounts: password hashing, the users and aliases files, resolution, cred.
"""

import base64
import hashlib
import os
import queue
import sys
import threading
import time

import pytest
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin

from mailserver.accounts import AccountError, make_portal, password_threadpool
from mailserver.passwords import (
    FastestScrypt,
    hash_password,
    openssl_scrypt,
    sodium_scrypt,
    verify_password,
)
from mailserver.config import SMTP, CatchAll, Config
from mailserver.from_config import accounts_for
from mailserver.interfaces import IAccount


@pytest.fixture
def config(tmp_path):
    return Config(
        hostname="mx.test",
        data_dir=str(tmp_path / "data"),
        local_domains=("example.org", "lists.example.org"),
        smtp=SMTP(catch_all=(CatchAll("catchall.example.org", "bob@example.org"),)),
    )


@pytest.fixture
def accounts(config):
    accounts = accounts_for(config)
    accounts.add_user("alice@example.org", "alice-secret")
    accounts.add_user("bob@example.org", "bob-secret")
    config.aliases_path.write_text(
        "# aliases\n"
        "postmaster@example.org: alice@example.org\n"
        "team@lists.example.org: alice@example.org, Bob@Example.org\n"
        "fwd@example.org: someone@remote.test\n"
        "loop1@example.org: loop2@example.org\n"
        "loop2@example.org: loop1@example.org\n"
    )
    return accounts


def test_hash_is_scrypt_and_verifies():
    hashed = hash_password("pässword")
    assert hashed.startswith("scrypt$")
    assert "pässword" not in hashed
    assert verify_password("pässword", hashed)
    assert not verify_password("password", hashed)
    assert not verify_password("x", "garbage")


IMPLEMENTATIONS = pytest.mark.parametrize("implementation", [sodium_scrypt, openssl_scrypt])


@IMPLEMENTATIONS
def test_hashes_are_standard_scrypt(implementation):
    """
    libsodium computes the same function as hashlib (OpenSSL): a hash made
    with either verifies with the other.
    """
    salt = bytes(range(16))
    digest = hashlib.scrypt(b"p\xc3\xa4ss", salt=salt, n=2**14, r=8, p=1)
    b64 = base64.b64encode
    stored = f"scrypt${2**14}$8$1${b64(salt).decode()}${b64(digest).decode()}"
    assert verify_password("päss", stored, implementation)
    assert not verify_password("pass", stored, implementation)
    _, n, r, p, salt64, digest64 = hash_password("päss").split("$")
    again = hashlib.scrypt(
        "päss".encode(), salt=base64.b64decode(salt64), n=int(n), r=int(r), p=int(p)
    )
    assert again == base64.b64decode(digest64)


@pytest.mark.parametrize(
    "n, r, p",
    [(2**30, 8, 1), (2**14, 8, 10**6), (3, 8, 1), (1, 8, 1), (2**14, 0, 1), (2**14, -1, 1)],
)
@IMPLEMENTATIONS
def test_damaged_hash_parameters_are_refused_at_once(n, r, p, implementation):
    """
    A users-file entry asking for gigabytes, a million passes or parameters
    that are not scrypt's fails the check without running it.
    """
    stored = f"scrypt${n}${r}${p}${base64.b64encode(bytes(16)).decode()}${base64.b64encode(bytes(64)).decode()}"
    started = time.monotonic()
    assert not verify_password("x", stored, implementation)
    assert time.monotonic() - started < 1


class _Timed:
    """
    An scrypt stand-in that takes C{cost} seconds on a fake clock.
    """

    def __init__(self, clock: list[float], cost: float, result: bytes) -> None:
        self.clock, self.cost, self.result, self.calls = clock, cost, result, 0

    def __call__(self, password, salt, n, r, p, length) -> bytes:
        self.calls += 1
        self.clock[0] += self.cost
        return self.result


def test_fastest_scrypt_times_each_implementation_then_keeps_to_the_faster():
    now = [0.0]
    slow, fast = _Timed(now, 0.050, b"same"), _Timed(now, 0.030, b"same")
    scrypt = FastestScrypt((slow, fast), trials=2, clock=lambda: now[0])
    for _ in range(2):
        assert scrypt(b"pw", b"salt", 2, 1, 1, 4) == b"same"
    assert (slow.calls, fast.calls) == (2, 2) and scrypt.chosen is fast
    for _ in range(3):
        assert scrypt(b"pw", b"salt", 2, 1, 1, 4) == b"same"
    assert (slow.calls, fast.calls) == (2, 5)


def test_fastest_scrypt_goes_by_each_implementations_best_time():
    """
    One slow trial (the machine busy with something else) does not decide.
    """
    now = [0.0]
    first, second = _Timed(now, 0.100, b"d"), _Timed(now, 0.040, b"d")
    scrypt = FastestScrypt((first, second), trials=2, clock=lambda: now[0])
    scrypt(b"pw", b"salt", 2, 1, 1, 4)
    first.cost = 0.030
    scrypt(b"pw", b"salt", 2, 1, 1, 4)
    assert scrypt.chosen is first


def test_fastest_scrypt_times_one_check_at_a_time():
    """
    A check that arrives while another is timing both runs the first
    implementation alone.
    """
    now = [0.0]
    first, second = _Timed(now, 0.050, b"d"), _Timed(now, 0.030, b"d")
    meanwhile = []

    def first_with_another_check_arriving(*args):
        if not meanwhile:
            meanwhile.append(None)
            meanwhile.append((scrypt(*args), first.calls, second.calls))
        return first(*args)

    scrypt = FastestScrypt((first_with_another_check_arriving, second), trials=1, clock=lambda: now[0])
    scrypt(b"pw", b"salt", 2, 1, 1, 4)
    assert meanwhile[1] == (b"d", 1, 0)  # the other check: the first implementation only
    assert (first.calls, second.calls) == (2, 1)
    assert scrypt.chosen is second


def test_real_implementations_agree_through_fastest_scrypt():
    scrypt = FastestScrypt((openssl_scrypt, sodium_scrypt))
    stored = hash_password("secret")
    for _ in range(3):
        assert verify_password("secret", stored, scrypt)
        assert not verify_password("wrong", stored, scrypt)
    assert scrypt.chosen in (openssl_scrypt, sodium_scrypt)


def test_users_file_holds_no_plaintext(accounts, config):
    text = config.users_path.read_text()
    assert "alice-secret" not in text and "bob-secret" not in text
    assert text.startswith("alice@example.org:scrypt$")
    assert accounts.users() == ["alice@example.org", "bob@example.org"]


def test_add_refuses_duplicates_bad_names_and_foreign_domains(accounts):
    with pytest.raises(AccountError, match="already exists"):
        accounts.add_user("ALICE@example.org", "x")
    with pytest.raises(AccountError, match="not a local domain"):
        accounts.add_user("eve@elsewhere.test", "x")
    for bad in ("../../etc@example.org", ".hidden@example.org", "a/b@example.org", "noat"):
        with pytest.raises(AccountError):
            accounts.add_user(bad, "x")


def test_resolution(accounts):
    assert accounts.resolve("alice@example.org") == ("alice@example.org",)
    assert accounts.resolve("ALICE@EXAMPLE.ORG") == ("alice@example.org",)
    assert accounts.resolve("alice+news@example.org") == ("alice@example.org",)
    assert accounts.resolve("postmaster@example.org") == ("alice@example.org",)
    assert accounts.resolve("team@lists.example.org") == (
        "alice@example.org",
        "bob@example.org",
    )
    assert accounts.resolve("fwd@example.org") == ("someone@remote.test",)
    assert accounts.resolve("nobody@example.org") is None
    assert accounts.resolve("loop1@example.org") is None
    assert accounts.resolve("alice%remote.test@example.org") is None
    assert accounts.resolve("anything@catchall.example.org") is None  # not a local domain


def test_catch_all(config, tmp_path):
    config = Config(
        hostname="mx.test",
        data_dir=config.data_dir,
        local_domains=("example.org",),
        smtp=SMTP(catch_all=(CatchAll("example.org", "bob@example.org"),)),
    )
    accounts = accounts_for(config)
    accounts.add_user("bob@example.org", "x")
    assert accounts.resolve("whoever@example.org") == ("bob@example.org",)


def test_expand_and_owns(accounts):
    assert accounts.expand("team@lists.example.org") == ("alice@example.org", "bob@example.org")
    assert accounts.expand("alice@example.org") is None
    assert accounts.owns("alice@example.org", "alice@example.org")
    assert accounts.owns("alice@example.org", "Alice+x@Example.org")
    assert accounts.owns("alice@example.org", "postmaster@example.org")
    assert accounts.owns("bob@example.org", "team@lists.example.org")
    assert not accounts.owns("bob@example.org", "alice@example.org")
    assert not accounts.owns("bob@example.org", "postmaster@example.org")


def test_changes_are_seen_without_a_restart(accounts, config):
    other = accounts_for(config)  # as the running server holds it
    assert other.resolve("carol@example.org") is None
    accounts.add_user("carol@example.org", "c")
    assert other.resolve("carol@example.org") == ("carol@example.org",)
    accounts.remove_user("carol@example.org")
    assert other.resolve("carol@example.org") is None


def test_mailbox_path(accounts, config):
    assert accounts.mailbox_path("Alice@Example.org") == config.mail_path / "example.org" / "alice"


def test_portal_login(accounts):
    portal = make_portal(accounts)
    results = []
    portal.login(UsernamePassword(b"alice@example.org", b"alice-secret"), None, IAccount).addBoth(
        results.append
    )
    interface, avatar, logout = results[0]
    assert interface is IAccount and avatar.address == "alice@example.org"
    for user, password in ((b"alice@example.org", b"wrong"), (b"nobody@example.org", b"x"), (b"\xff", b"x")):
        failures = []
        portal.login(UsernamePassword(user, password), None, IAccount).addErrback(failures.append)
        assert failures and failures[0].check(UnauthorizedLogin)


def test_strcred_file_checker_works_beside_the_users_file(accounts, config, tmp_path):
    from mailserver.accounts import strcred_checkers
    from mailserver.config import Auth, ConfigError, load

    passwd = tmp_path / "passwd"
    passwd.write_text("frank:frank-pw\n")
    with_file = Config(
        hostname=config.hostname,
        data_dir=config.data_dir,
        local_domains=config.local_domains,
        auth=Auth(checkers=(f"file:{passwd}",)),
    )
    portal = make_portal(
        accounts_for(with_file), extra_checkers=strcred_checkers(with_file.auth.checkers)
    )
    for user, password, address in (
        (b"frank", b"frank-pw", "frank@example.org"),
        (b"alice@example.org", b"alice-secret", "alice@example.org"),
    ):
        results = []
        portal.login(UsernamePassword(user, password), None, IAccount).addBoth(results.append)
        assert results[0][1].address == address
    failures = []
    portal.login(UsernamePassword(b"frank", b"nope"), None, IAccount).addErrback(failures.append)
    assert failures[0].check(UnauthorizedLogin)
    # The configuration refuses a checker that cannot work.
    bad = tmp_path / "bad.toml"
    for description, problem in (
        ("nosuchchecker:x", "nosuchchecker"),
        (f"file:{tmp_path / 'missing'}", "No such file"),
        ("anonymous", "cannot check passwords"),
    ):
        bad.write_text(f'[auth]\ncheckers = ["{description}"]\n')
        with pytest.raises(ConfigError) as caught:
            load(bad)
        assert (caught.value.key, problem in caught.value.problem) == ("auth.checkers", True)


class _Triggers:
    def __init__(self) -> None:
        self.triggers = []

    def addSystemEventTrigger(self, phase, event, callable_, *args):
        self.triggers.append((phase, event, callable_))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_password_threads_run_at_a_lower_priority_than_the_server():
    reactor = _Triggers()
    pool = password_threadpool(reactor)
    seen = queue.Queue()
    pool.callInThread(lambda: seen.put(os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
    try:
        niceness = seen.get(timeout=10)
    finally:
        pool.stop()
    own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert niceness == min(own + 10, 19)
    assert ("during", "shutdown", pool.stop) in reactor.triggers
