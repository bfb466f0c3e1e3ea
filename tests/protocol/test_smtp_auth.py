"""
AUTH PLAIN and LOGIN (RFC 4954) and STARTTLS (RFC 3207) over a
StringTransport.
"""

from base64 import b64encode

from mailserver.testing import LOOPBACK, REMOTE, SMTPHarness, make_config, reply_codes


def b64(text: str) -> str:
    return b64encode(text.encode()).decode()


# The MX role offers AUTH only with smtp.mx_auth.
MX_AUTH = make_config(smtp={"mx_auth": True})


def authenticating(**kwargs) -> SMTPHarness:
    session = SMTPHarness(peer=LOOPBACK, role="submission", **kwargs)
    session.ehlo()
    return session


def test_plain_with_initial_response():
    session = authenticating()
    assert session.login() == b"235 2.7.0 Authentication successful\r\n"
    assert reply_codes(session.login()) == ["503 5.5.1"]


def test_plain_with_challenge():
    session = authenticating()
    assert session.command("AUTH PLAIN") == b"334 \r\n"
    assert reply_codes(session.command(b64("\0bob@example.org\0secret"))) == ["235 2.7.0"]


def test_plain_with_authzid_of_someone_else_is_refused():
    session = authenticating()
    out = session.command("AUTH PLAIN " + b64("alice@example.org\0bob@example.org\0secret"))
    assert reply_codes(out) == ["501 5.5.2"]


def test_login_mechanism():
    session = authenticating()
    assert session.command("AUTH LOGIN") == b"334 VXNlcm5hbWU6\r\n"
    assert session.command(b64("bob@example.org")) == b"334 UGFzc3dvcmQ6\r\n"
    assert reply_codes(session.command(b64("secret"))) == ["235 2.7.0"]


def test_login_with_initial_response():
    session = authenticating()
    assert session.command("AUTH LOGIN " + b64("bob@example.org")) == b"334 UGFzc3dvcmQ6\r\n"
    assert reply_codes(session.command(b64("secret"))) == ["235 2.7.0"]


def test_equals_is_an_empty_initial_response():
    session = authenticating()
    assert reply_codes(session.command("AUTH PLAIN =")) == ["501 5.5.2"]


def test_star_cancels_with_501():
    session = authenticating()
    session.command("AUTH LOGIN")
    assert reply_codes(session.command("*")) == ["501 5.0.0"]
    assert reply_codes(session.command("NOOP")) == ["250 2.0.0"]


def test_bad_base64_and_unknown_mechanism():
    session = authenticating()
    assert reply_codes(session.command("AUTH PLAIN !!!")) == ["501 5.5.2"]
    assert reply_codes(session.command("AUTH CRAM-MD5")) == ["504 5.5.4"]


def test_auth_needs_ehlo_and_no_transaction():
    session = SMTPHarness(peer=LOOPBACK, config=MX_AUTH)
    assert reply_codes(session.login()) == ["503 5.5.1"]
    session.ehlo()
    session.command("MAIL FROM:<a@b.c>")
    assert reply_codes(session.login()) == ["503 5.5.1"]


def test_auth_refused_over_plaintext_from_afar():
    session = SMTPHarness(peer=REMOTE, role="submission")
    session.ehlo()
    assert reply_codes(session.login()) == ["538 5.7.11"]
    allowed = SMTPHarness(
        peer=REMOTE, role="submission", config=make_config(smtp={"auth_over_plaintext": True})
    )
    allowed.ehlo()
    assert reply_codes(allowed.login()) == ["235 2.7.0"]


def test_bad_password_is_535_after_a_growing_delay_then_dropped():
    config = make_config(limits={"auth_failure_delay": 2.0, "max_auth_failures": 3})
    session = authenticating(config=config)
    assert session.login(password="wrong") == b""
    session.clock.advance(1.9)
    assert session.read() == b""
    session.clock.advance(0.1)
    assert reply_codes(session.read()) == ["535 5.7.8"]
    session.login(password="wrong")
    session.clock.advance(3.9)
    assert session.read() == b""
    session.clock.advance(0.1)
    assert reply_codes(session.read()) == ["535 5.7.8"]
    assert reply_codes(session.login(password="wrong")) == ["535 5.7.8", "421 4.7.0"]
    assert session.closed


def test_commands_sent_during_the_delay_wait_their_turn():
    session = authenticating(config=make_config(limits={"auth_failure_delay": 1.0}))
    assert session.send("AUTH PLAIN " + b64("\0bob@example.org\0no") + "\r\nNOOP\r\n") == b""
    session.clock.advance(1)
    assert reply_codes(session.read()) == ["535 5.7.8", "250 2.0.0"]


# STARTTLS


def test_starttls_discards_pipelined_commands_and_resets_the_session():
    options = object()
    session = SMTPHarness(tls_options=options, role="submission")
    session.ehlo()
    out = session.send("STARTTLS\r\nNOOP\r\n")
    assert out == b"220 2.0.0 Ready to start TLS\r\n"
    assert session.transport.tls_started_with is options
    assert session.read() == b""
    # The session starts over: HELO is forgotten, STARTTLS is no longer offered.
    assert reply_codes(session.command("MAIL FROM:<a@b.c>")) == ["503 5.5.1"]
    ehlo = session.ehlo()
    assert b"STARTTLS" not in ehlo and b"AUTH PLAIN LOGIN" in ehlo
    assert reply_codes(session.command("STARTTLS")) == ["503 5.5.1"]


def test_after_starttls_auth_is_allowed_from_afar_and_received_says_esmtpsa():
    session = SMTPHarness(tls_options=object(), peer=REMOTE, role="submission")
    session.ehlo()
    session.command("STARTTLS")
    session.ehlo()
    assert reply_codes(session.login()) == ["235 2.7.0"]
    session.send("MAIL FROM:<bob@example.org>\r\nRCPT TO:<x@remote.net>\r\nDATA\r\nx\r\n.\r\n")
    data = session.intake.finished[0].data
    assert b" with ESMTPSA id " in data and b"(using TLS)" in data


def test_starttls_refused_in_a_transaction_or_with_argument():
    session = SMTPHarness(tls_options=object())
    session.ehlo()
    assert reply_codes(session.command("STARTTLS now")) == ["501 5.5.4"]
    session.command("MAIL FROM:<a@b.c>")
    assert reply_codes(session.command("STARTTLS")) == ["503 5.5.1"]


def test_implicit_tls_offers_no_starttls():
    session = SMTPHarness(tls_options=object(), implicit_tls=True, peer=REMOTE, role="submission")
    ehlo = session.ehlo()
    assert b"STARTTLS" not in ehlo and b"AUTH PLAIN LOGIN" in ehlo


def test_an_over_long_sasl_response_ends_the_exchange():
    session = authenticating()
    assert session.command("AUTH LOGIN") == b"334 VXNlcm5hbWU6\r\n"
    assert reply_codes(session.send(b"A" * 13_000 + b"\r\n")) == ["500 5.5.2"]
    # The next line is a command again, not the user name.
    assert reply_codes(session.command("NOOP")) == ["250 2.0.0"]
    # Likewise when the refused line's end comes in a later read.
    assert session.command("AUTH LOGIN") == b"334 VXNlcm5hbWU6\r\n"
    assert reply_codes(session.send(b"A" * 13_000)) == ["500 5.5.2"]
    assert session.send(b"A" * 100 + b"\r\n") == b""
    assert reply_codes(session.command("NOOP")) == ["250 2.0.0"]
    assert reply_codes(session.login()) == ["235 2.7.0"]
