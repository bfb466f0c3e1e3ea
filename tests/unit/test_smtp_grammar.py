"""
The SMTP grammar (RFC 5321 4.1.2, RFC 6531, ESMTP parameters).
"""

import pytest

from mailserver.smtp.grammar import (
    GrammarError,
    Mailbox,
    mail_options,
    parse_command,
    parse_mail,
    parse_mailbox,
    parse_rcpt,
    recipient_options,
)


def test_command_verb_is_upper_cased_and_argument_kept():
    command = parse_command(b"mail FROM:<a@b.c> SIZE=1")
    assert (command.verb, command.argument) == ("MAIL", "FROM:<a@b.c> SIZE=1")


@pytest.mark.parametrize("line", [b"MA\x00IL x", b"NOOP \xff\xfe", b"NOOP a\x01b", b"", b"12 x"])
def test_bad_command_bytes_are_grammar_errors(line):
    with pytest.raises(GrammarError):
        parse_command(line)


def test_null_reverse_path():
    assert parse_mail("FROM:<>").mailbox is None


def test_space_after_colon_and_bare_address_are_tolerated():
    assert parse_mail("FROM: <a@b.c>").mailbox == Mailbox("a", "b.c")
    assert parse_mail("FROM:a@b.c SIZE=3").parameters == (("SIZE", "3"),)


def test_source_route_is_dropped():
    path = parse_rcpt("TO:<@relay.one,@relay.two:user@example.org>")
    assert path.mailbox == Mailbox("user", "example.org")


def test_domain_is_lower_cased_and_local_part_kept():
    assert parse_rcpt("TO:<Bob@Example.ORG>").mailbox == Mailbox("Bob", "example.org")


@pytest.mark.parametrize(
    "literal", ["[127.0.0.1]", "[IPv6:2001:db8::1]", "[IPv6:::1]", "[x-tag:whatever]"]
)
def test_address_literals(literal):
    mailbox = parse_mailbox(f"user@{literal}")
    assert mailbox.domain == literal and mailbox.is_address_literal


@pytest.mark.parametrize("literal", ["[300.1.1.1]", "[IPv6:zz::1]", "[1.2.3]", "[]"])
def test_bad_address_literals(literal):
    with pytest.raises(GrammarError):
        parse_mailbox(f"user@{literal}")


def test_quoted_local_part_that_needs_no_quotes_is_unquoted():
    assert parse_mailbox('"bob"@example.org').local == "bob"
    assert parse_mailbox('"b\\ob"@example.org').local == "bob"


def test_quoted_local_part_with_specials_keeps_quotes():
    mailbox = parse_rcpt('TO:<"user@other"@example.org>').mailbox
    assert mailbox == Mailbox('"user@other"', "example.org")


@pytest.mark.parametrize(
    "address",
    ["user@other@example.org", "user", "@example.org", "user@", "us er@example.org",
     "user@-bad.org", "user@bad-.org", "user@a..b", ".user@example.org", "user.@example.org",
     "a" * 65 + "@example.org"],
)
def test_bad_mailboxes(address):
    with pytest.raises(GrammarError):
        parse_mailbox(address)


def test_utf8_mailbox_parses_and_is_not_ascii():
    mailbox = parse_mailbox("jürgen@bücher.example")
    assert mailbox.local == "jürgen" and not mailbox.is_ascii


def test_postmaster_without_domain():
    assert parse_rcpt("TO:<Postmaster>").mailbox == Mailbox("postmaster", "")
    with pytest.raises(GrammarError):
        parse_mail("FROM:<postmaster>")


def test_mail_options():
    path = parse_mail("FROM:<a@b.c> SIZE=1000 BODY=8bitmime RET=HDRS ENVID=abc+2B1 SMTPUTF8 AUTH=<>")
    options = mail_options(path.parameters)
    assert (options.size, options.body, options.ret, options.envid, options.smtputf8) == (
        1000, "8BITMIME", "HDRS", "abc+2B1", True
    )


@pytest.mark.parametrize(
    "parameters",
    ["SIZE=x", "SIZE", "BODY=BINARYMIME", "RET=ALL", "ENVID=a+zz", "SMTPUTF8=yes", "FOO=bar",
     "SIZE=1 SIZE=2"],
)
def test_bad_mail_options(parameters):
    with pytest.raises(GrammarError) as raised:
        mail_options(parse_mail(f"FROM:<a@b.c> {parameters}").parameters)
    assert raised.value.enhanced == "5.5.4"


def test_recipient_options():
    path = parse_rcpt("TO:<a@b.c> NOTIFY=success,failure ORCPT=rfc822;a+40b.c")
    options = recipient_options(path.parameters)
    assert options.notify == ("SUCCESS", "FAILURE")
    assert options.orcpt == "rfc822;a+40b.c"
    assert recipient_options(parse_rcpt("TO:<a@b.c> NOTIFY=NEVER").parameters).notify == ("NEVER",)


@pytest.mark.parametrize("parameters", ["NOTIFY=NEVER,SUCCESS", "NOTIFY=SOMETIMES", "ORCPT=rfc822", "X=1"])
def test_bad_recipient_options(parameters):
    with pytest.raises(GrammarError):
        recipient_options(parse_rcpt(f"TO:<a@b.c> {parameters}").parameters)


@pytest.mark.parametrize("argument", ["FROM<a@b.c>", "FROM:<a@b.c", "FROM:<a@b.c>junk", "TO:<a@b.c>"])
def test_bad_mail_syntax(argument):
    with pytest.raises(GrammarError):
        parse_mail(argument)


def test_trailing_dot_of_an_absolute_domain_is_accepted_and_dropped():
    # RFC 5321's Domain has no trailing dot; Postfix accepts it and drops it.
    assert parse_mail("FROM:<bob@test.example.>").mailbox == Mailbox("bob", "test.example")
    assert parse_rcpt("TO:<bob@Test.Example.> NOTIFY=NEVER").mailbox == Mailbox("bob", "test.example")
    assert parse_mailbox("bob@test.example.") == Mailbox("bob", "test.example")


@pytest.mark.parametrize(
    "address", ["bob@test.example..", "bob@.", "bob@test..example.", "bob.@test.example", "bob@[127.0.0.1]."]
)
def test_only_one_trailing_dot_after_a_whole_domain(address):
    with pytest.raises(GrammarError):
        parse_mailbox(address)


def test_quoted_local_part_with_an_escaped_quote():
    # RFC 5321 4.1.2: quoted-pairSMTP is a backslash and any printable ASCII.
    assert parse_mail('FROM:<"bob\\""@test.example>').mailbox == Mailbox('"bob\\""', "test.example")
    assert parse_rcpt('TO:<"a\\"b>c"@test.example> NOTIFY=NEVER').mailbox == Mailbox(
        '"a\\"b>c"', "test.example"
    )
    with pytest.raises(GrammarError):
        parse_mail('FROM:<"bob\\">')


@pytest.mark.parametrize(
    "envid",
    [
        "abc+0D+0AX-Injected:+20envid+0D+0A+0D+0A--fake-boundary",
        "a+0Ab", "a+0Db", "a+09b", "a+00b", "a+7Fb", "a+C3+A9",
    ],
)
def test_envid_must_decode_to_printable_ascii(envid):
    with pytest.raises(GrammarError) as raised:
        mail_options(parse_mail(f"FROM:<bob@test.example> ENVID={envid}").parameters)
    assert (raised.value.code, raised.value.enhanced) == (501, "5.5.4")


@pytest.mark.parametrize(
    "orcpt", ["rfc822;x+0D+0AX-Orcpt-Injected:+20yes", "rfc822;a+0Ab", "rfc822;a+85b", "rfc822;a+00"]
)
def test_orcpt_must_decode_to_printable_ascii(orcpt):
    with pytest.raises(GrammarError) as raised:
        recipient_options(parse_rcpt(f"TO:<a@b.c> ORCPT={orcpt}").parameters)
    assert (raised.value.code, raised.value.enhanced) == (501, "5.5.4")


def test_printable_xtext_values_still_pass():
    options = mail_options(parse_mail("FROM:<a@b.c> ENVID=a+20b+2B+3D~").parameters)
    assert options.envid == "a+20b+2B+3D~"
    options = recipient_options(parse_rcpt("TO:<a@b.c> ORCPT=rfc822;a+20b+40c.d").parameters)
    assert options.orcpt == "rfc822;a+20b+40c.d"


def test_unknown_parameters_stay_555():
    with pytest.raises(GrammarError) as raised:
        mail_options(parse_mail("FROM:<a@b.c> FOO=bar").parameters)
    assert raised.value.code == 555
