"""
The POP3 AUTHORIZATION state: USER/PASS, AUTH PLAIN and LOGIN, STLS, the
plaintext rule, failure delays and the RFC 3206 response codes.
"""

from __future__ import annotations

from base64 import b64encode

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher

from mailserver.interfaces import IAccount
from mailserver.testing import REMOTE, FakeRealm, MemoryMaildirs, POP3Harness, make_pop3_config

PLAINTEXT_REFUSED = (
    b"-ERR [AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections.\r\n"
)
TLS = object()  # stands for the server's TLS options


def b64(data: bytes) -> str:
    return b64encode(data).decode()


@pytest.fixture
def store() -> MemoryMaildirs:
    store = MemoryMaildirs()
    store.deliver("bob@localhost", b"Subject: hi\n\nhello\n")
    return store


def test_user_pass_logs_in(store):
    session = POP3Harness(store)
    assert session.login() == b"+OK Logged in: 1 messages (22 octets).\r\n"
    assert store.locked == {"bob@localhost"}


def test_password_with_spaces(store):
    session = POP3Harness(store)
    assert session.login("carol@localhost", "pass word").startswith(b"+OK Logged in")


def test_pass_without_user(store):
    assert POP3Harness(store).command("PASS secret") == b"-ERR No user name given.\r\n"


@pytest.mark.parametrize("name", ["../../etc", "a/b", "..", ".hidden", "a\\b", ""])
def test_path_like_user_names_refused(store, name):
    session = POP3Harness(store)
    assert session.command(f"USER {name}") == b"-ERR [AUTH] Invalid user name.\r\n"
    assert session.login().startswith(b"+OK Logged in")


def test_path_like_name_through_sasl_is_a_failed_login(store):
    session = POP3Harness(store)
    assert session.command("AUTH PLAIN " + b64(b"\0../../etc\0x")) == b""
    session.clock.advance(1)
    assert session.take() == b"-ERR [AUTH] Authentication failed.\r\n"


def test_bad_password_is_answered_later_each_time_later(store):
    session = POP3Harness(store)
    session.command("USER bob@localhost")
    assert session.command("PASS wrong") == b""
    session.clock.advance(0.99)
    assert session.take() == b""
    session.clock.advance(0.01)
    assert session.take() == b"-ERR [AUTH] Authentication failed.\r\n"
    session.command("USER bob@localhost")
    session.command("PASS wrong")
    session.clock.advance(1.99)
    assert session.take() == b""
    session.clock.advance(0.01)
    assert session.take() == b"-ERR [AUTH] Authentication failed.\r\n"
    assert session.login().startswith(b"+OK Logged in")


def test_commands_wait_during_the_failure_delay(store):
    session = POP3Harness(store)
    pipelined = b"USER bob@localhost\r\nPASS wrong\r\nUSER bob@localhost\r\nPASS secret\r\n"
    assert session.send(pipelined) == b"+OK\r\n"
    assert session.transport.producerState == "paused"
    session.clock.advance(1)
    assert session.take() == (
        b"-ERR [AUTH] Authentication failed.\r\n+OK\r\n+OK Logged in: 1 messages (22 octets).\r\n"
    )
    assert session.transport.producerState == "producing"


def test_disconnect_after_max_auth_failures_and_log_each(store):
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        session = POP3Harness(store, make_pop3_config(limits={"max_auth_failures": 3}))
        for attempt in range(3):
            session.command("USER bob@localhost")
            session.command("PASS wrong")
            session.clock.advance(10)
            assert session.take() == b"-ERR [AUTH] Authentication failed.\r\n"
            assert session.closed == (attempt == 2)
    finally:
        globalLogPublisher.removeObserver(events.append)
    failures = [e for e in events if e.get("event") == "pop3.auth_failed"]
    assert [e["failures"] for e in failures] == [1, 2, 3]
    assert failures[0]["user"] == "bob@localhost"


def test_drop_during_failure_delay_cancels_the_reply(store):
    session = POP3Harness(store)
    session.command("USER bob@localhost")
    session.command("PASS wrong")
    session.drop()
    assert session.clock.getDelayedCalls() == []


def test_second_session_gets_in_use(store):
    first = POP3Harness(store)
    first.login()
    second = POP3Harness(store, factory=first.factory)
    assert second.login() == b"-ERR [IN-USE] Mailbox is locked by another POP3 session.\r\n"
    assert first.realm.logouts == 1
    assert not second.closed
    first.command("QUIT")
    assert second.login().startswith(b"+OK Logged in")


def test_login_delay(store):
    config = make_pop3_config(login_delay=60)
    first = POP3Harness(store, config)
    first.login()
    first.command("QUIT")
    first.drop()
    second = POP3Harness(store, factory=first.factory)
    assert second.login() == b"-ERR [LOGIN-DELAY] Minimum time between logins is 60 seconds.\r\n"
    assert store.locked == set()
    second.clock.advance(60)
    assert second.login().startswith(b"+OK Logged in")


def test_storage_errors_are_sys_temp(store):
    session = POP3Harness(store)
    store.fail_listing = True
    assert session.login() == b"-ERR [SYS/TEMP] Mailbox is temporarily unavailable.\r\n"
    assert store.locked == set()
    store.fail_listing = False
    store.fail_lock = True
    assert session.login() == b"-ERR [SYS/TEMP] Mailbox is temporarily unavailable.\r\n"


def test_no_mailbox_is_sys_perm(store):
    session = POP3Harness(store)

    def no_mailbox(address):
        raise LookupError(address)

    store.mailbox = no_mailbox
    assert session.login() == b"-ERR [SYS/PERM] Mailbox is unavailable.\r\n"


def test_broken_credentials_checker_is_sys_temp(store):
    class BrokenPortal:
        def login(self, credentials, mind, *interfaces):
            raise_later = Deferred()
            raise_later.errback(RuntimeError("database down"))
            return raise_later

    session = POP3Harness(store, portal=BrokenPortal())
    assert session.login() == b"-ERR [SYS/TEMP] Temporary authentication failure.\r\n"


def test_login_finishing_after_the_client_left_takes_no_lock(store):
    answers = []

    class SlowPortal:
        def login(self, credentials, mind, *interfaces):
            answers.append(Deferred())
            return answers[-1]

    session = POP3Harness(store, portal=SlowPortal())
    session.command("USER bob@localhost")
    assert session.send(b"PASS secret\r\nSTAT\r\n") == b""
    session.drop()
    realm = FakeRealm()
    answers[0].callback(realm.requestAvatar(b"bob@localhost", None, IAccount))
    assert store.locked == set()
    assert realm.logouts == 1


# AUTH (RFC 5034)


def test_auth_plain_with_initial_response(store):
    session = POP3Harness(store)
    reply = session.command("AUTH PLAIN " + b64(b"\0bob@localhost\0secret"))
    assert reply.startswith(b"+OK Logged in")


def test_auth_plain_with_matching_authzid_and_continuation(store):
    session = POP3Harness(store)
    assert session.command("AUTH plain") == b"+ \r\n"
    assert session.command(b64(b"bob@localhost\0bob@localhost\0secret")).startswith(b"+OK Logged in")


def test_auth_plain_other_authzid_refused(store):
    session = POP3Harness(store)
    reply = session.command("AUTH PLAIN " + b64(b"carol@localhost\0bob@localhost\0secret"))
    assert reply == b"-ERR [AUTH] Authorization identity must match the user.\r\n"


def test_auth_plain_bad_password(store):
    session = POP3Harness(store)
    assert session.command("AUTH PLAIN " + b64(b"\0bob@localhost\0nope")) == b""
    session.clock.advance(1)
    assert session.take() == b"-ERR [AUTH] Authentication failed.\r\n"


def test_auth_login(store):
    session = POP3Harness(store)
    assert session.command("AUTH LOGIN") == b"+ " + b64encode(b"Username:") + b"\r\n"
    assert session.command(b64(b"bob@localhost")) == b"+ " + b64encode(b"Password:") + b"\r\n"
    assert session.command(b64(b"secret")).startswith(b"+OK Logged in")


def test_auth_login_with_initial_response(store):
    session = POP3Harness(store)
    reply = session.command("AUTH LOGIN " + b64(b"bob@localhost"))
    assert reply == b"+ " + b64encode(b"Password:") + b"\r\n"
    assert session.command(b64(b"secret")).startswith(b"+OK Logged in")


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_star_cancels(store, mechanism):
    session = POP3Harness(store)
    session.command(f"AUTH {mechanism}")
    assert session.command("*") == b"-ERR Authentication aborted by client.\r\n"
    assert session.command("CAPA").startswith(b"+OK Capability list follows")


def test_bad_base64_and_unknown_mechanism(store):
    session = POP3Harness(store)
    session.command("AUTH PLAIN")
    assert session.command("not base64!") == b"-ERR Invalid base64 data in continued response.\r\n"
    assert session.command("AUTH CRAM-MD5") == b"-ERR Unsupported authentication mechanism.\r\n"
    assert session.command("AUTH PLAIN =") == b"-ERR Invalid AUTH PLAIN response.\r\n"


def test_overlong_sasl_response_cancels(store):
    session = POP3Harness(store)
    session.command("AUTH PLAIN")
    assert session.send(b"A" * 1000 + b"\r\n") == b"-ERR Line too long.\r\n"
    assert session.command("NOOP") == b"-ERR NOOP is not valid in this state.\r\n"


def test_bare_auth_lists_mechanisms(store):
    assert POP3Harness(store).command("AUTH") == b"+OK\r\nPLAIN\r\nLOGIN\r\n.\r\n"


# Plaintext rule (RFC 2595 section 2) and STLS


def test_plaintext_refused_from_remote_peer_without_tls(store):
    session = POP3Harness(store, peer=REMOTE, tls_options=TLS)
    assert session.command("USER bob@localhost") == PLAINTEXT_REFUSED
    assert session.command("PASS secret") == PLAINTEXT_REFUSED
    assert session.command("AUTH PLAIN " + b64(b"\0bob@localhost\0secret")) == PLAINTEXT_REFUSED
    capabilities = session.command("CAPA").split(b"\r\n")
    assert b"USER" in capabilities and b"SASL PLAIN LOGIN" in capabilities
    assert store.locked == set()


def test_plaintext_allowed_from_remote_when_configured(store):
    session = POP3Harness(store, make_pop3_config(auth_over_plaintext=True), peer=REMOTE)
    assert session.login().startswith(b"+OK Logged in")


def test_implicit_tls_allows_plaintext_and_offers_no_stls(store):
    session = POP3Harness(store, peer=REMOTE, tls_options=TLS, implicit_tls=True)
    assert b"STLS" not in session.command("CAPA").split(b"\r\n")
    assert session.command("STLS") == b"-ERR TLS is already active.\r\n"
    assert session.login().startswith(b"+OK Logged in")


def test_stls_discards_pipelined_bytes_and_then_allows_login(store):
    session = POP3Harness(store, peer=REMOTE, tls_options=TLS)
    assert b"STLS" in session.command("CAPA").split(b"\r\n")
    reply = session.send(b"STLS\r\nUSER bob@localhost\r\nPASS secret\r\nQUI")
    assert reply == b"+OK Begin TLS negotiation.\r\n"
    assert session.transport.tls_started_with is TLS
    assert store.locked == set()
    # Bytes after the handshake are acted upon (the partial "QUI" was dropped).
    assert session.command("T") == b"-ERR Unknown command.\r\n"
    assert b"STLS" not in session.command("CAPA").split(b"\r\n")
    assert session.command("STLS") == b"-ERR TLS is already active.\r\n"
    assert session.login().startswith(b"+OK Logged in")


def test_stls_forgets_a_user_given_in_clear(store):
    session = POP3Harness(store, tls_options=TLS)
    session.command("USER bob@localhost")
    session.command("STLS")
    assert session.command("PASS secret") == b"-ERR No user name given.\r\n"


def test_no_stls_without_tls_options(store):
    session = POP3Harness(store)
    assert b"STLS" not in session.command("CAPA").split(b"\r\n")
    assert session.command("STLS") == b"-ERR TLS is not available.\r\n"


# The rest of AUTHORIZATION


def test_capa_lists_what_is_there(store):
    session = POP3Harness(store, make_pop3_config(login_delay=900, expire="30"), tls_options=TLS)
    assert session.command("CAPA") == (
        b"+OK Capability list follows\r\n"
        b"TOP\r\nUSER\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\n"
        b"EXPIRE 30\r\nLOGIN-DELAY 900\r\nSASL PLAIN LOGIN\r\nSTLS\r\n"
        b"IMPLEMENTATION mailserver\r\n.\r\n"
    )
    default = POP3Harness(store).command("CAPA").split(b"\r\n")
    assert b"EXPIRE NEVER" in default
    assert not any(c.startswith(b"LOGIN-DELAY") for c in default)


def test_apop_is_never_offered(store):
    session = POP3Harness(store, make_pop3_config(apop=True))
    assert b"<" not in session.greeting
    assert session.command("APOP bob@localhost 0123456789abcdef") == b"-ERR APOP is not available.\r\n"


def test_quit_before_login(store):
    session = POP3Harness(store)
    assert session.command("QUIT") == b"+OK Logging out.\r\n"
    assert session.closed
    session.drop()
    assert store.deletions == []


def test_tcp_nodelay_is_set(store):
    class TCPTransport(StringTransport):
        no_delay = None

        def setTcpNoDelay(self, enabled):
            self.no_delay = enabled

    session = POP3Harness(store)
    transport = TCPTransport()
    protocol = session.factory.buildProtocol(None)
    protocol.makeConnection(transport)
    assert transport.no_delay is True
