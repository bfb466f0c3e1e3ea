"""
The relay's ESMTP client, byte for byte over StringTransport, with Clock.
"""

from __future__ import annotations

import io
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from mailserver.relay.client import ESMTPClient
from mailserver.relay.transaction import OutboundRecipient, Timeouts, Transaction
from mailserver.wire.dots import DotStuffer


def transaction(data=b"Subject: t\n\nhello\n", **kw):
    defaults = dict(
        sender="s@example.org",
        recipients=(OutboundRecipient("a@remote.test"), OutboundRecipient("b@remote.test")),
        open_body=lambda: io.BytesIO(data),
        size=len(data),
        helo="mx.test",
        tls="none",
    )
    defaults.update(kw)
    return Transaction(**defaults)


class TLSStringTransport(StringTransport):
    tls_options = None

    def startTLS(self, options):
        self.tls_options = options


class Conversation:
    def __init__(self, t: Transaction, chunk_size: int = 2**16) -> None:
        self.clock = Clock()
        self.client = ESMTPClient(t, self.clock, Timeouts(), host="mx.remote.test")
        self.client.chunk_size = chunk_size
        self.transport = TLSStringTransport()
        self.client.makeConnection(self.transport)
        self.results = []
        self.client.result.addCallback(self.results.append)

    def server(self, *lines: str) -> bytes:
        """
        Feed server reply lines; return what the client wrote meanwhile
        (pumping the body producer).
        """
        self.transport.clear()
        for line in lines:
            self.client.dataReceived(line.encode() + b"\r\n")
        while self.transport.producer is not None:
            self.transport.producer.resumeProducing()
        return self.transport.value()


EHLO_PIPELINING = ("250-mx.remote.test", "250-PIPELINING", "250-SIZE 1000000",
                   "250 8BITMIME")


def test_pipelined_transaction_all_recipients_in_one_write():
    c = Conversation(transaction(data=b"Subject: t\n\nhello\n", body="8BITMIME"))
    assert c.server("220 mx.remote.test ESMTP") == b"EHLO mx.test\r\n"
    assert c.server(*EHLO_PIPELINING) == (
        b"MAIL FROM:<s@example.org> SIZE=18 BODY=8BITMIME\r\n"
        b"RCPT TO:<a@remote.test>\r\nRCPT TO:<b@remote.test>\r\nDATA\r\n"
    )
    sent = c.server("250 2.1.0 ok", "250 2.1.5 ok", "550 5.1.1 no such user",
                    "354 go ahead")
    assert sent == b"Subject: t\r\n\r\nhello\r\n.\r\n"
    assert c.results == []
    assert c.server("250 2.0.0 queued as X") == b"QUIT\r\n"
    [result] = c.results
    assert result.reached and result.host == "mx.remote.test"
    assert result.replies["a@remote.test"].code == 250
    assert result.replies["b@remote.test"].code == 550
    assert result.replies["b@remote.test"].status == "5.1.1"
    assert result.replies["b@remote.test"].permanent


def test_dot_line_exactly_at_a_chunk_boundary_is_stuffed():
    # The stored text has a "." line starting exactly where the 2nd chunk
    # begins, and another ending a chunk: neither may end the message.
    head = b"Subject: t\n\n"
    first = head + b"x" * (16 - len(head) - 1) + b"\n"  # 16 bytes: chunk 1
    body = first + b".\n" + b"tail\n" + b".\n" + b"..\n" + b"end"
    assert len(first) == 16
    c = Conversation(transaction(data=body, recipients=(OutboundRecipient("a@remote.test"),)),
                     chunk_size=16)
    c.server("220 hi")
    c.server("250 mx")
    c.server("250 ok")
    c.server("250 ok")
    sent = c.server("354 go")
    assert sent == (first.replace(b"\n", b"\r\n") + b"..\r\ntail\r\n..\r\n...\r\nend\r\n.\r\n")
    assert sent.count(b"\r\n.\r\n") == 1 and sent.endswith(b"\r\n.\r\n")


@given(st.lists(st.sampled_from([b".", b"..", b"a", b"\n", b".\n", b"x.y", b"\r"]),
                max_size=40), st.integers(min_value=1, max_value=7))
def test_dot_stuffing_survives_any_chunking(pieces, chunk):
    text = b"".join(pieces)
    stuffer = DotStuffer()
    wire = b"".join(stuffer.feed(text[i:i + chunk]) for i in range(0, len(text), chunk))
    wire += stuffer.end()
    # A receiver un-stuffs line by line and stops at the first "." line.
    lines = wire.split(b"\r\n")
    end = lines.index(b".")
    assert end == len(lines) - 2
    received = [line[1:] if line.startswith(b".") else line for line in lines[:end]]
    expected = text[:-1] if text.endswith(b"\n") else text
    assert b"\n".join(received) == expected


def test_sequential_without_pipelining_and_helo_fallback():
    c = Conversation(transaction(recipients=(OutboundRecipient("a@remote.test"),)))
    c.server("220 old")
    assert c.server("502 what") == b"HELO mx.test\r\n"
    assert c.server("250 hello") == b"MAIL FROM:<s@example.org>\r\n"
    assert c.server("250 ok") == b"RCPT TO:<a@remote.test>\r\n"
    assert c.server("451 4.3.0 try later") == b"QUIT\r\n"
    [result] = c.results
    assert result.replies["a@remote.test"].code == 451
    assert not result.replies["a@remote.test"].permanent


def test_refused_greeting_is_not_reached_so_the_next_mx_is_tried():
    c = Conversation(transaction())
    assert c.server("554 go away") == b"QUIT\r\n"
    [result] = c.results
    assert not result.reached
    assert result.replies["a@remote.test"].code == 554


def test_mail_refused_fails_every_recipient():
    c = Conversation(transaction())
    c.server("220 hi")
    c.server(*EHLO_PIPELINING)
    assert c.server("550 5.7.1 sender refused", "503 no", "503 no", "503 no") == b"QUIT\r\n"
    [result] = c.results
    assert {r.code for r in result.replies.values()} == {550}


def test_too_big_for_the_server_fails_for_good_without_sending():
    c = Conversation(transaction(size=2_000_000))
    c.server("220 hi")
    assert c.server(*EHLO_PIPELINING) == b"QUIT\r\n"
    [result] = c.results
    assert result.replies["a@remote.test"].status == "5.3.4"


def test_dsn_parameters_are_passed_when_offered():
    t = transaction(recipients=(OutboundRecipient("a@remote.test", ("FAILURE", "DELAY"),
                                                  "rfc822;a@remote.test"),),
                    ret="HDRS", envid="E1")
    c = Conversation(t)
    c.server("220 hi")
    sent = c.server("250-mx", "250-PIPELINING", "250 DSN")
    assert sent == (b"MAIL FROM:<s@example.org> RET=HDRS ENVID=E1\r\n"
                    b"RCPT TO:<a@remote.test> NOTIFY=FAILURE,DELAY ORCPT=rfc822;a@remote.test\r\n"
                    b"DATA\r\n")


def test_no_greeting_times_out_after_five_minutes():
    c = Conversation(transaction())
    c.clock.advance(299)
    assert c.results == []
    c.clock.advance(1)
    [result] = c.results
    assert result.replies["a@remote.test"].status == "4.4.2"
    assert result.replies["a@remote.test"].synthetic
    assert c.transport.disconnecting or c.transport.disconnected


def test_lost_connection_after_data_is_temporary():
    c = Conversation(transaction(recipients=(OutboundRecipient("a@remote.test"),)))
    c.server("220 hi")
    c.server(*EHLO_PIPELINING)
    c.server("250 ok", "250 ok", "354 go")
    from twisted.internet.error import ConnectionLost
    from twisted.python.failure import Failure

    c.client.connectionLost(Failure(ConnectionLost()))
    [result] = c.results
    assert result.replies["a@remote.test"].code == 451


def test_required_tls_not_offered_is_a_temporary_failure():
    c = Conversation(transaction(tls="required"))
    c.server("220 hi")
    assert c.server("250-mx", "250 PIPELINING") == b"QUIT\r\n"
    [result] = c.results
    assert result.replies["a@remote.test"].status == "4.7.0"


def test_starttls_then_ehlo_again_then_auth_plain():
    c = Conversation(transaction(tls="required", username="u", password="p"))
    c.server("220 hi")
    assert c.server("250-mx", "250-STARTTLS", "250 AUTH LOGIN") == b"STARTTLS\r\n"
    assert c.server("220 go") == b"EHLO mx.test\r\n"
    assert c.transport.tls_options is not None
    assert c.server("250-mx", "250 AUTH LOGIN PLAIN") == b"AUTH PLAIN AHUAcA==\r\n"
    assert c.server("235 ok").startswith(b"MAIL FROM:<s@example.org>")


def test_all_recipients_refused_sends_no_body():
    c = Conversation(transaction())
    c.server("220 hi")
    c.server(*EHLO_PIPELINING)
    sent = c.server("250 ok", "550 no", "550 no", "354 go")
    assert sent == b".\r\nQUIT\r\n"
    [result] = c.results
    assert all(r.code == 550 for r in result.replies.values())


# Misbehaving peers, with the timeouts taken from the configuration.

from mailserver.config import Relay  # noqa: E402
from mailserver.relay.client import deliver  # noqa: E402

CONFIGURED = Timeouts.from_config(Relay(connect_timeout=3, command_timeout=7, data_timeout=11))


class Body(io.BufferedReader):
    """
    A message file (read a chunk at a time as the connection takes it),
    noting its closing.
    """

    closed_by_client = False

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))

    def close(self):
        self.closed_by_client = True
        super().close()


def test_a_body_in_memory_goes_whole_with_its_dot_in_one_write():
    # A message just queued is sent from memory: no chunks, no producer.
    data = b"Subject: t\n\n" + b".dot\n" * 40_000
    c = at_the_body(one_recipient(open_body=lambda: io.BytesIO(data), size=len(data)))
    assert c.transport.producer is None
    sent = c.transport.value()
    assert len(sent) > 2 ** 16 and sent.endswith(b"..dot\r\n.\r\n")
    assert sent == DotStuffer().feed(data) + b".\r\n"


def test_a_large_body_in_memory_goes_in_chunks_as_the_peer_takes_them():
    data = b"Subject: t\n\n" + b"line\n" * 60_000  # over ESMTPClient.whole_write
    c = at_the_body(one_recipient(open_body=lambda: io.BytesIO(data), size=len(data)))
    assert c.transport.producer is not None
    while c.transport.producer is not None:
        c.transport.producer.resumeProducing()
    assert c.transport.value() == DotStuffer().feed(data) + b".\r\n"


def at_the_body(t: Transaction) -> Conversation:
    """
    A conversation whose server has just said 354 to C{t}'s pipelined
    MAIL, RCPT and DATA; what the client wrote before is cleared.
    """
    c = configured(t)
    c.server("220 hi")
    c.server(*EHLO_PIPELINING)
    c.transport.clear()
    for line in ("250 ok", "250 ok", "354 go"):
        c.client.dataReceived(line.encode() + b"\r\n")
    return c


def configured(t: Transaction) -> Conversation:
    c = Conversation.__new__(Conversation)
    c.clock = Clock()
    c.client = ESMTPClient(t, c.clock, CONFIGURED, host="mx.remote.test")
    c.transport = TLSStringTransport()
    c.client.makeConnection(c.transport)
    c.results = []
    c.client.result.addCallback(c.results.append)
    return c


def one_recipient(**kw) -> Transaction:
    return transaction(recipients=(OutboundRecipient("a@remote.test"),), **kw)


def assert_temporary(c: Conversation, status: str, words: str = "") -> None:
    [result] = c.results
    reply = result.replies["a@remote.test"]
    assert 400 <= reply.code < 500 and not reply.permanent, reply
    assert reply.status == status, reply
    assert words in reply.text


def test_no_greeting_times_out_at_the_configured_command_timeout():
    c = configured(one_recipient())
    c.clock.advance(6.9)
    assert c.results == []
    c.clock.advance(0.1)
    assert_temporary(c, "4.4.2", "timed out")
    assert c.transport.disconnecting or c.transport.disconnected


def test_stall_after_the_final_dot_times_out_at_data_timeout():
    c = configured(one_recipient())
    c.server("220 hi")
    c.server(*EHLO_PIPELINING)
    sent = c.server("250 ok", "250 ok", "354 go")
    assert sent.endswith(b"\r\n.\r\n")
    c.clock.advance(10.9)
    assert c.results == []
    c.clock.advance(0.1)
    assert_temporary(c, "4.4.2", "timed out")
    assert c.results[0].reached  # the host answered: no other MX would do better
    assert c.transport.disconnecting or c.transport.disconnected


def test_peer_that_stops_reading_mid_data_times_out():
    body = Body(b"Subject: t\n\n" + b"x" * 200_000 + b"\n")
    c = at_the_body(one_recipient(open_body=lambda: body))
    c.transport.producer.resumeProducing()  # one chunk goes out, then the window is full
    c.clock.advance(6.9)
    assert c.results == []
    c.clock.advance(0.1)
    assert_temporary(c, "4.4.2", "timed out")


def test_connection_dropped_mid_data_is_temporary_and_closes_the_body():
    from twisted.internet.error import ConnectionLost
    from twisted.python.failure import Failure

    body = Body(b"Subject: t\n\n" + b"x" * 200_000 + b"\n")
    c = at_the_body(one_recipient(open_body=lambda: body))
    producer = c.transport.producer
    producer.resumeProducing()
    assert b"\r\n.\r\n" not in c.transport.value()  # in the middle of the body
    producer.stopProducing()  # what a TCP transport does when the line drops
    c.client.connectionLost(Failure(ConnectionLost("reset by peer")))
    assert_temporary(c, "4.4.2", "connection lost")
    assert body.closed_by_client
    assert c.clock.getDelayedCalls() == []


def test_421_after_mail_is_temporary_for_every_recipient():
    c = configured(transaction())
    c.server("220 hi")
    assert c.server("250 mx") == b"MAIL FROM:<s@example.org>\r\n"
    assert c.server("421 4.3.2 shutting down") == b"QUIT\r\n"
    [result] = c.results
    assert {(r.code, r.status) for r in result.replies.values()} == {(421, "4.3.2")}


def test_421_to_a_pipelined_rcpt_then_close_is_temporary():
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    c = configured(transaction())
    c.server("220 hi")
    c.server(*EHLO_PIPELINING)
    c.server("250 ok", "421 4.4.5 too busy, closing")
    c.client.connectionLost(Failure(ConnectionDone()))
    [result] = c.results
    assert result.replies["a@remote.test"].code == 421
    assert result.replies["b@remote.test"].status == "4.4.2"
    assert not any(r.permanent or r.positive for r in result.replies.values())


def test_garbage_instead_of_a_reply_is_temporary():
    for point in ("greeting", "ehlo", "data"):
        c = configured(one_recipient())
        if point != "greeting":
            c.server("220 hi")
        if point == "data":
            c.server(*EHLO_PIPELINING)
            c.server("250 ok", "250 ok")
        c.server("HTTP/1.1 400 Bad Request")
        assert_temporary(c, "4.5.0", "bad reply from server")
        assert c.transport.disconnecting or c.transport.disconnected, point


def test_endless_reply_line_is_temporary():
    c = configured(one_recipient())
    c.client.dataReceived(b"220 " + b"x" * 20_000)
    assert_temporary(c, "4.5.0", "too long")


def test_connect_timeout_is_passed_and_a_timed_out_connect_is_temporary():
    from twisted.internet.error import TimeoutError
    from twisted.internet.testing import MemoryReactorClock
    from twisted.python.failure import Failure

    reactor = MemoryReactorClock()
    results = []
    deliver(reactor, "127.0.0.1", 2525, one_recipient(), CONFIGURED).addBoth(results.append)
    [(host, port, factory, timeout, _)] = reactor.tcpClients
    assert (host, port, timeout) == ("127.0.0.1", 2525, 3)
    factory.clientConnectionFailed(reactor.connectors[0], Failure(TimeoutError()))
    [result] = results
    assert not result.reached
    reply = result.replies["a@remote.test"]
    assert reply.code == 451 and reply.status == "4.4.1" and "cannot connect" in reply.text


def test_a_host_name_whose_lookup_never_ends_is_temporary_after_lookup_and_connect_time():
    """
    A smarthost or transport given by name is looked up by the system's
    resolver; a lookup that never answers still ends the attempt after
    dns_timeout + connect_timeout, as a temporary failure.
    """
    from twisted.internet.testing import MemoryReactorClock

    lookups = []

    class SilentResolver:
        def resolveHostName(self, receiver, hostName, portNumber=0, addressTypes=None,
                            transportSemantics="TCP"):
            lookups.append(hostName)
            receiver.resolutionBegan(None)
            return receiver  # and never a resolutionComplete

    reactor = MemoryReactorClock()
    reactor.nameResolver = SilentResolver()
    timeouts = Timeouts.from_config(Relay(connect_timeout=3, dns_timeout=5))
    results = []
    deliver(reactor, "smarthost.example", 587, one_recipient(), timeouts).addBoth(results.append)
    assert lookups == ["smarthost.example"]
    reactor.advance(7.9)
    assert results == []
    reactor.advance(0.1)
    [result] = results
    assert not result.reached and reactor.tcpClients == []
    reply = result.replies["a@remote.test"]
    assert reply.code == 451 and reply.status == "4.4.1", reply
    assert "smarthost.example:587" in reply.text and "name lookup" in reply.text, reply.text


def test_an_address_gets_no_overall_deadline_beyond_the_connect_timeout():
    from twisted.internet.testing import MemoryReactorClock

    reactor = MemoryReactorClock()
    deliver(reactor, "127.0.0.1", 2525, one_recipient(), CONFIGURED)
    assert reactor.getDelayedCalls() == []


def test_plaintext_after_the_starttls_220_is_discarded():
    """
    Issue 19 (the CVE-2011-0411 class): lines sent in the clear after the
    STARTTLS 220, in the same write, must not be taken as the reply to the
    EHLO sent over TLS.
    """
    c = Conversation(transaction(tls="required", username="u", password="p"))
    c.server("220 hi")
    assert c.server("250-mx", "250 STARTTLS") == b"STARTTLS\r\n"
    c.transport.clear()
    c.client.dataReceived(b"220 go ahead\r\n250-evil.invalid\r\n250 AUTH PLAIN\r\n")
    assert c.transport.value() == b"EHLO mx.test\r\n"
    assert c.transport.tls_options is not None
    assert c.results == []
    # Only the reply that comes after TLS started counts.
    assert c.server("250-mx", "250 AUTH PLAIN") == b"AUTH PLAIN AHUAcA==\r\n"


def test_auth_is_never_sent_without_tls():
    # A server that refuses STARTTLS on an opportunistic connection.
    c = Conversation(transaction(tls="opportunistic", username="u", password="p"))
    c.server("220 hi")
    assert c.server("250-mx", "250-STARTTLS", "250 AUTH PLAIN") == b"STARTTLS\r\n"
    assert c.server("454 4.7.0 not now") == b"QUIT\r\n"
    [result] = c.results
    reply = result.replies["a@remote.test"]
    assert reply.status == "4.7.0" and "without TLS" in reply.text
    assert not reply.permanent and result.tls == "refused"


def test_tls_outcome_is_reported():
    from twisted.internet.error import ConnectionLost
    from twisted.python.failure import Failure

    broken = Conversation(transaction(tls="required"))
    broken.server("220 hi")
    broken.server("250-mx", "250 STARTTLS")
    broken.server("220 go")
    broken.client.connectionLost(Failure(ConnectionLost("handshake failed")))
    assert [(r.tls, r.reached) for r in broken.results] == [("started", False)]

    fine = Conversation(transaction(tls="required", recipients=(OutboundRecipient("a@remote.test"),)))
    fine.server("220 hi")
    fine.server("250-mx", "250 STARTTLS")
    fine.server("220 go")
    fine.server(*EHLO_PIPELINING)
    fine.server("250 ok", "250 ok", "354 go")
    fine.server("250 queued")
    assert [(r.tls, r.reached) for r in fine.results] == [("established", True)]

    plain = Conversation(transaction(tls="opportunistic"))
    plain.server("220 hi")
    plain.server(*EHLO_PIPELINING)
    plain.client.connectionLost(Failure(ConnectionLost()))
    assert [r.tls for r in plain.results] == ["not-offered"]
