"""
The SMTP session over a StringTransport: greeting, EHLO, every command's
reply codes, pipelining, limits, timeouts, connection caps and shutdown.
"""

from mailserver.testing import LOOPBACK, REMOTE, SMTPHarness, make_config, reply_codes


def test_greeting_and_ehlo_keywords():
    session = SMTPHarness(tls_options=object())
    assert session.greeting == b"220 mx.example.org ESMTP mailserver\r\n"
    lines = session.ehlo().decode().split("\r\n")[:-1]
    assert lines[0] == "250-mx.example.org"
    keywords = [line[4:] for line in lines[1:]]
    assert keywords == [
        "PIPELINING", "SIZE 36700160", "VRFY", "ETRN", "STARTTLS",
        "ENHANCEDSTATUSCODES", "8BITMIME", "DSN", "SMTPUTF8", "CHUNKING",
    ]
    assert lines[-1].startswith("250 ")


def test_auth_advertised_on_loopback_or_when_allowed():
    assert b"AUTH PLAIN LOGIN" in SMTPHarness(peer=LOOPBACK, role="submission").ehlo()
    assert b"AUTH" not in SMTPHarness(role="submission").ehlo()
    allowed = SMTPHarness(role="submission", config=make_config(smtp={"auth_over_plaintext": True}))
    assert b"AUTH PLAIN LOGIN" in allowed.ehlo()


def test_mx_role_offers_no_auth_by_default():
    # As Postfix on port 25: users log in on submission.
    for peer in (LOOPBACK, REMOTE):
        session = SMTPHarness(peer=peer, config=make_config(smtp={"auth_over_plaintext": True}))
        assert b"AUTH" not in session.ehlo()
        assert session.login() == b"503 5.5.1 Error: authentication not enabled\r\n"
        assert reply_codes(session.command("MAIL FROM:<bob@example.org>")) == ["250 2.1.0"]
    offered = SMTPHarness(peer=LOOPBACK, config=make_config(smtp={"mx_auth": True}))
    assert b"AUTH PLAIN LOGIN" in offered.ehlo()
    assert reply_codes(offered.login()) == ["235 2.7.0"]


def test_no_starttls_without_tls_options():
    session = SMTPHarness()
    assert b"STARTTLS" not in session.ehlo()
    assert reply_codes(session.command("STARTTLS")) == ["502 5.5.1"]


def test_helo_is_plain_250():
    assert SMTPHarness().command("HELO client") == b"250 mx.example.org\r\n"


def test_helo_and_ehlo_need_an_argument():
    session = SMTPHarness()
    assert reply_codes(session.command("EHLO")) == ["501 5.5.4"]
    assert reply_codes(session.command("HELO")) == ["501 5.5.4"]


def test_mail_before_helo_is_503():
    assert reply_codes(SMTPHarness().command("MAIL FROM:<a@b.c>")) == ["503 5.5.1"]


def test_rcpt_before_mail_and_data_before_rcpt():
    session = SMTPHarness()
    session.ehlo()
    assert reply_codes(session.command("RCPT TO:<bob@example.org>")) == ["503 5.5.1"]
    assert reply_codes(session.command("DATA")) == ["503 5.5.1"]
    session.command("MAIL FROM:<a@b.c>")
    assert reply_codes(session.command("MAIL FROM:<a@b.c>")) == ["503 5.5.1"]
    assert reply_codes(session.command("DATA")) == ["554 5.5.1"]


def test_full_transaction_codes():
    session = SMTPHarness()
    session.ehlo()
    assert reply_codes(session.command("MAIL FROM:<a@remote.net>")) == ["250 2.1.0"]
    assert reply_codes(session.command("RCPT TO:<bob@example.org>")) == ["250 2.1.5"]
    assert session.command("DATA") == b"354 End data with <CR><LF>.<CR><LF>\r\n"
    assert reply_codes(session.send("Subject: x\r\n\r\nhello\r\n.\r\n")) == ["250 2.0.0"]
    (stored,) = session.intake.finished
    assert stored.body == b"Subject: x\r\n\r\nhello\r\n"


def test_null_sender_accepted_on_mx():
    session = SMTPHarness()
    session.ehlo()
    assert reply_codes(session.command("MAIL FROM:<>")) == ["250 2.1.0"]
    session.command("RCPT TO:<bob@example.org>")
    session.command("DATA")
    session.send(".\r\n")
    assert session.intake.finished[0].envelope.sender == ""


def test_soml_and_saml_act_as_mail():
    for verb in ("SOML", "SAML"):
        session = SMTPHarness()
        session.ehlo()
        assert reply_codes(session.command(f"{verb} FROM:<a@b.c>")) == ["250 2.1.0"]


def test_turn_and_send_are_not_implemented():
    session = SMTPHarness()
    assert reply_codes(session.command("TURN")) == ["502 5.5.1"]
    assert reply_codes(session.command("SEND FROM:<a@b.c>")) == ["502 5.5.1"]


def test_unknown_command_and_bad_syntax():
    session = SMTPHarness()
    session.ehlo()
    assert reply_codes(session.command("FROB")) == ["500 5.5.2"]
    assert reply_codes(session.command("MAIL TO:<a@b.c>")) == ["501 5.5.2"]
    assert reply_codes(session.command("MAIL FROM:<a@@b.c>")) == ["501 5.1.7"]
    session.command("MAIL FROM:<a@b.c>")
    assert reply_codes(session.command("RCPT TO:<bob@>")) == ["501 5.1.3"]
    assert reply_codes(session.command("RCPT TO:<bob@example.org> FOO=1")) == ["555 5.5.4"]


def test_nul_and_invalid_utf8_in_commands_are_errors_not_crashes():
    session = SMTPHarness()
    assert reply_codes(session.send(b"NO\x00OP\r\n")) == ["500 5.5.2"]
    assert reply_codes(session.send(b"EHLO \xff\xfe\r\n")) == ["500 5.5.2"]
    assert reply_codes(session.send(b"MAIL FROM:<a\x00@b.c>\r\n")) == ["500 5.5.2"]
    assert reply_codes(session.command("NOOP")) == ["250 2.0.0"]


def test_rset_noop_quit():
    session = SMTPHarness()
    session.ehlo()
    session.command("MAIL FROM:<a@b.c>")
    assert reply_codes(session.command("RSET")) == ["250 2.0.0"]
    assert reply_codes(session.command("MAIL FROM:<a@b.c>")) == ["250 2.1.0"]
    assert reply_codes(session.command("NOOP anything")) == ["250 2.0.0"]
    assert reply_codes(session.command("QUIT")) == ["221 2.0.0"]
    assert session.closed


def test_help():
    session = SMTPHarness()
    assert reply_codes(session.command("HELP")) == ["214 2.0.0"]
    assert session.command("HELP mail").startswith(b"214 2.0.0 MAIL FROM:<address>")
    assert reply_codes(session.command("HELP frob")) == ["504 5.5.4"]


def test_vrfy_and_expn_policy():
    session = SMTPHarness()
    assert reply_codes(session.command("VRFY bob@example.org")) == ["252 2.5.0"]
    assert reply_codes(session.command("VRFY nobody@example.org")) == ["252 2.5.0"]
    assert reply_codes(session.command("EXPN list@example.org")) == ["502 5.5.1"]
    assert reply_codes(session.command("VRFY")) == ["501 5.5.4"]


def test_vrfy_and_expn_for_authenticated_clients():
    session = SMTPHarness(peer=LOOPBACK, role="submission")
    session.ehlo()
    session.login()
    assert session.command("VRFY <bob@example.org>") == b"250 2.1.5 <bob@example.org>\r\n"
    assert reply_codes(session.command("VRFY nobody@example.org")) == ["550 5.1.1"]
    assert session.command("EXPN list") == (
        b"250-2.1.5 <bob@example.org>\r\n250 2.1.5 <alice@example.org>\r\n"
    )


def test_vrfy_answered_when_configured():
    session = SMTPHarness(config=make_config(smtp={"vrfy": "answer", "expn": "answer"}))
    assert reply_codes(session.command("VRFY bob")) == ["250 2.1.5"]
    assert reply_codes(session.command("EXPN list@example.org")) == ["250 2.1.5"]


class FakeRunner:
    def __init__(self, count):
        self.count = count
        self.flushed = []

    def flush(self, domain):
        self.flushed.append(domain)
        return self.count


def test_etrn():
    runner = FakeRunner(3)
    session = SMTPHarness(peer=LOOPBACK, queue_runner=runner)
    assert reply_codes(session.command("ETRN remote.net")) == ["503 5.5.1"]
    session.ehlo()
    assert reply_codes(session.command("ETRN @remote.net")) == ["253 2.0.0"]
    assert reply_codes(session.command("ETRN #queue")) == ["458 4.3.0"]
    assert reply_codes(session.command("ETRN not..a.domain")) == ["501 5.5.4"]
    runner.count = 0
    assert reply_codes(session.command("ETRN remote.net")) == ["251 2.0.0"]
    assert runner.flushed == ["remote.net", "remote.net"]
    runner.count = None  # a worker: the primary keeps the queue and its count
    assert session.command("ETRN remote.net") == (
        b"250 2.0.0 OK, queuing for node remote.net started\r\n")


def test_etrn_refused_to_strangers_and_without_queue():
    session = SMTPHarness(queue_runner=FakeRunner(1))
    session.ehlo()
    assert reply_codes(session.command("ETRN remote.net")) == ["459 4.7.1"]
    session = SMTPHarness(peer=LOOPBACK)
    session.ehlo()
    assert reply_codes(session.command("ETRN remote.net")) == ["458 4.3.0"]


def test_pipelined_replies_come_in_one_write():
    session = SMTPHarness()
    writes = []
    original = session.transport.write
    session.transport.write = lambda data: (writes.append(data), original(data))
    session.send(
        "EHLO c\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<bob@example.org>\r\n"
        "RCPT TO:<nobody@example.org>\r\nDATA\r\n"
    )
    assert len(writes) == 1
    assert reply_codes(writes[0])[1:] == ["250 2.1.0", "250 2.1.5", "550 5.1.1", "354"]


def test_pipelined_group_split_across_reads():
    session = SMTPHarness()
    out = session.send("EHLO c\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<bob@exa")
    assert reply_codes(out)[-1] == "250 2.1.0"
    assert reply_codes(session.send("mple.org>\r\n")) == ["250 2.1.5"]


def test_tcp_nodelay_is_set():
    from twisted.internet.testing import StringTransport

    class TCPTransport(StringTransport):
        no_delay = False

        def setTcpNoDelay(self, enabled):
            self.no_delay = enabled

    session = SMTPHarness()
    transport = TCPTransport(peerAddress=REMOTE)
    session.factory.buildProtocol(REMOTE).makeConnection(transport)
    assert transport.no_delay is True


def test_command_line_too_long_is_500_and_session_goes_on():
    session = SMTPHarness()
    assert reply_codes(session.send(b"NOOP " + b"x" * 600 + b"\r\n")) == ["500 5.5.2"]
    out = session.send(b"HELO " + b"y" * 2000)
    assert reply_codes(out) == ["500 5.5.2"]
    assert session.send(b"y" * 2000 + b"\r\n") == b""
    assert reply_codes(session.command("NOOP")) == ["250 2.0.0"]


def test_too_many_errors_closes_with_421():
    session = SMTPHarness(config=make_config(limits={"max_errors": 3}))
    out = session.send("FROB\r\nFROB\r\nFROB\r\nNOOP\r\n")
    assert reply_codes(out) == ["500 5.5.2", "500 5.5.2", "500 5.5.2", "421 4.7.0"]
    assert session.closed


def test_too_many_recipients_is_452():
    session = SMTPHarness(config=make_config(limits={"max_recipients": 2}))
    session.ehlo()
    session.command("MAIL FROM:<a@b.c>")
    out = session.send("RCPT TO:<bob@example.org>\r\n" * 3)
    assert reply_codes(out) == ["250 2.1.5", "250 2.1.5", "452 4.5.3"]


def test_command_timeout_says_421_and_closes():
    session = SMTPHarness()
    session.clock.advance(299)
    assert not session.closed
    session.command("NOOP")
    session.clock.advance(299)
    assert not session.closed
    session.clock.advance(1)
    assert reply_codes(session.read()) == ["421 4.4.2"]
    assert session.closed


def test_data_timeout_is_the_data_limit():
    session = SMTPHarness(config=make_config(limits={"smtp_command_timeout": 10, "smtp_data_timeout": 100}))
    session.ehlo()
    session.send("MAIL FROM:<a@b.c>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n")
    session.clock.advance(50)
    assert not session.closed
    session.clock.advance(50)
    assert reply_codes(session.read()) == ["421 4.4.2"]
    assert session.intake.messages[0].aborted


def test_connection_caps():
    config = make_config(limits={"max_connections_per_client": 2, "max_connections": 3})
    first = SMTPHarness(config=config)
    factory = first.factory
    SMTPHarness(factory=factory)
    third = SMTPHarness(factory=factory)
    assert reply_codes(third.greeting) == ["421 4.7.0"] and third.closed
    other = SMTPHarness(factory=factory, peer=LOOPBACK)
    assert reply_codes(other.greeting) == ["220"]
    fourth = SMTPHarness(factory=factory, peer=LOOPBACK)
    assert reply_codes(fourth.greeting) == ["421 4.7.0"]
    first.lose()
    assert reply_codes(SMTPHarness(factory=factory).greeting) == ["220"]


def test_shutdown_tells_idle_clients_421_and_waits_for_a_transfer():
    idle = SMTPHarness()
    factory = idle.factory
    busy = SMTPHarness(factory=factory)
    busy.ehlo()
    busy.send("MAIL FROM:<a@b.c>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\nSubject: x\r\n")
    done = factory.shutdown()
    assert reply_codes(idle.read()) == ["421 4.3.2"] and idle.closed
    assert not busy.closed
    assert reply_codes(busy.send("\r\nbody\r\n.\r\n")) == ["250 2.0.0", "421 4.3.2"]
    assert busy.closed
    assert reply_codes(SMTPHarness(factory=factory).greeting) == ["421 4.3.2"]
    fired = []
    done.addCallback(fired.append)
    idle.lose()
    busy.lose()
    assert fired


def test_a_role_out_of_descriptors_says_421_then_drops_connections_unanswered():
    from mailserver.config import Limits
    from mailserver.connection_limits import ConnectionLimits
    from mailserver.smtp import SMTPFactory

    # 6 descriptors: two sessions (each may hold a file, and one refused
    # may be closing), four connections open at most.
    limits = ConnectionLimits(Limits(), descriptors=6, reserve=0)
    first = SMTPHarness(config=make_config())
    factory = SMTPFactory(first.factory.dependencies, limits)
    sessions = [SMTPHarness(factory=factory) for _ in range(5)]
    assert [reply_codes(s.greeting) for s in sessions[:4]] == [["220"]] * 2 + [["421 4.3.2"]] * 2
    assert sessions[4].transport.disconnected  # aborted: no room to answer
    sessions[2].lose()  # a refused one closed: room to answer again
    assert reply_codes(SMTPHarness(factory=factory).greeting) == ["421 4.3.2"]
    sessions[0].lose()
    assert reply_codes(SMTPHarness(factory=factory).greeting) == ["220"]
