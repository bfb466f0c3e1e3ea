"""
The IMAP command grammar: tags, atoms, quoted strings, literals, lists,
sequence sets, dates, FETCH items, SEARCH keys, STORE and LIST arguments.
"""

import pytest

from mailserver.imap import arguments as A
from mailserver.imap import responses as R
from mailserver.imap.grammar import (
    NIL,
    Atom,
    LiteralSpec,
    ParseError,
    String,
    date,
    date_time,
    literal_at_end,
    mailbox,
    parse,
    peek_tag_and_name,
    sequence_set,
)


def test_simple_command():
    command = parse([b"a1 noop"])
    assert (command.tag, command.name, command.args) == ("a1", "NOOP", ())


def test_quoted_strings_with_escapes_and_nil():
    command = parse([b'A LOGIN "bob@example.org" "p\\"w\\\\d" NIL'])
    assert command.args == (String(b"bob@example.org"), String(b'p"w\\d'), NIL)
    assert isinstance(command.args[0], String)


def test_literals_between_lines():
    command = parse([b"A LOGIN {3}", b"bob", b" {7+}", b"se cret", b""])
    assert command.args == (b"bob", b"se cret")


def test_nested_lists():
    command = parse([b"A X (a (b c) ()) d"])
    assert command.args == ([Atom("a"), [Atom("b"), Atom("c")], []], Atom("d"))


def test_bracketed_atoms_keep_spaces_and_lists():
    command = parse([b"A FETCH 1:* (UID BODY.PEEK[HEADER.FIELDS (FROM TO)]<0.100>)"])
    assert command.args[1] == [Atom("UID"), Atom("BODY.PEEK[HEADER.FIELDS (FROM TO)]<0.100>")]


def test_uid_commands():
    assert parse([b"x uid fetch 1 FLAGS"]).name == "UID FETCH"


@pytest.mark.parametrize(
    "line, tag",
    [
        (b"", None),
        (b"A", "A"),
        (b"+ NOOP", None),
        (b"A NO*OP", "A"),
        (b'A LOGIN "unterminated', "A"),
        (b"A X (a b", "A"),
        (b"A X (a )", "A"),
        (b"A X  a", "A"),
        (b'A X "bad\\escape"', "A"),
        (b"A X {5} y", "A"),
        (b"A X caf\xc3\xa9", "A"),
    ],
)
def test_bad_commands(line, tag):
    with pytest.raises(ParseError) as caught:
        parse([line])
    assert caught.value.tag == tag


def test_literal_announcements():
    assert literal_at_end(b"A APPEND INBOX {310}") == LiteralSpec(310, True)
    assert literal_at_end(b"A APPEND INBOX {310+}") == LiteralSpec(310, False)
    assert literal_at_end(b"A LOGIN bob {x}") is None
    assert literal_at_end(b"A NOOP") is None


def test_peek_tag_and_name():
    assert peek_tag_and_name(b"a7 append INBOX {5}") == ("a7", "APPEND")
    assert peek_tag_and_name(b"a7 uid fetch 1:*") == ("a7", "UID FETCH")


def test_mailbox_names_are_modified_utf7():
    assert mailbox(Atom("Entw&APw-rfe")) == "Entwürfe"
    with pytest.raises(ParseError):
        mailbox(Atom("bad&Jjo"))


def test_sequence_sets():
    assert sequence_set(Atom("1:4,7,9:*")).resolve(12) == [(1, 4), (7, 7), (9, 12)]
    assert sequence_set(Atom("*:5")).resolve(3) == [(3, 5)]
    for bad in ("0", "1:", "a", "1,,2", "4294967296"):
        with pytest.raises(ParseError):
            sequence_set(Atom(bad))


def test_dates():
    assert date(Atom("1-Feb-1994")) == (1994, 2, 1)
    assert date(String(b"17-jul-1996")) == (1996, 7, 17)
    assert date_time(String(b"17-Jul-1996 02:44:25 -0700")) == 837596665
    assert date_time(String(b" 7-Jul-1996 02:44:25 +0000")) == 836707465
    with pytest.raises(ParseError):
        date(Atom("31-Foo-1994"))
    with pytest.raises(ParseError):
        date_time(String(b"17-Jul-1996 25:44:25 -0700"))


def test_fetch_items():
    items = A.fetch_items(parse([b"A FETCH 1 (UID FLAGS BODY.PEEK[1.2.MIME] BODY[]<5.10> RFC822)"]).args[1])
    assert items[:2] == ["UID", "FLAGS"]
    assert items[2] == A.BodyItem(A.Section((1, 2), "MIME"), True, None, "BODY[1.2.MIME]")
    assert items[3] == A.BodyItem(A.Section(), False, (5, 10), "BODY[]<5>")
    assert items[4].name == "RFC822" and not items[4].peek
    assert A.fetch_items(Atom("fast")) == ["FLAGS", "INTERNALDATE", "RFC822.SIZE"]
    fields = A.fetch_items(Atom("BODY[header.fields (From To)]"))[0]
    assert fields.name == "BODY[HEADER.FIELDS (FROM TO)]"
    for bad in ("BODY[0]", "BODY[TEXT (A)]", "BODY[HEADER.FIELDS]", "BODY[MIME]", "BOGUS", "BODY[]<1.0>"):
        with pytest.raises(ParseError):
            A.fetch_items(Atom(bad))


def test_search_keys():
    command = parse([b'A SEARCH CHARSET UTF-8 OR SEEN (FROM "bob" 1:3) NOT UID 5:* LARGER 10 HEADER X-Y ""'])
    charset, keys = A.search_keys(command.args)
    assert charset == "UTF-8"
    assert keys[0][0] == "OR" and keys[0][1] == ("FLAG", "\\Seen", True)
    assert keys[0][2][0] == "AND" and keys[0][2][1][0] == ("HEADER", "FROM", "bob")
    assert keys[1][0] == "NOT" and keys[1][1][0] == "UID"
    assert keys[2] == ("LARGER", 10)
    assert keys[3] == ("HEADER", "X-Y", "")
    for bad in ([b"A SEARCH"], [b"A SEARCH OR SEEN"], [b"A SEARCH BOGUS"], [b"A SEARCH SINCE x"]):
        with pytest.raises(ParseError):
            A.search_keys(parse(bad).args)


def test_store_action():
    action = A.store_action(Atom("+FLAGS.SILENT"), [Atom("\\Seen"), Atom("$Junk")])
    assert action == A.StoreAction("+", True, ("\\Seen", "$Junk"))
    assert A.store_action(Atom("FLAGS"), Atom("\\Deleted")).flags == ("\\Deleted",)
    with pytest.raises(ParseError):
        A.store_action(Atom("LABELS"), [])


def test_list_extended_arguments():
    options, reference, patterns = A.list_arguments(
        parse([b'A LIST (SPECIAL-USE) "" ("*" INBOX) RETURN (CHILDREN)']).args
    )
    assert options.special_use and options.return_children and options.extended
    assert patterns == [b"*", Atom("INBOX")]
    with pytest.raises(ParseError):
        A.list_arguments(parse([b'A LIST (RECURSIVEMATCH) "" *']).args)


def test_responses_quote_or_use_literals():
    assert R.string(b'a"b') == b'"a\\"b"'
    assert R.string("ü") == b"{2}\r\n\xc3\xbc"
    assert R.mailbox("Entwürfe") == b'"Entw&APw-rfe"'
    assert R.ok("a1", "Done", "READ-WRITE").render() == b"a1 OK [READ-WRITE] Done\r\n"


@pytest.mark.parametrize(
    "text",
    [b"29-Feb-2021 10:00:00 +0000", b"31-Apr-2021 10:00:00 +0000", b"31-Dec-9999 23:59:59 -1200",
     b"01-Jan-0000 00:00:00 +0000", b"01-Jan-0001 00:00:00 +0100"],
)
def test_append_dates_that_are_no_day_or_leave_four_digit_years_are_refused(text):
    # INTERNALDATE's year has 4 digits (RFC 3501 9): 31-Dec-9999 -1200 is
    # in the year 10000 in UTC, which clients could not parse back.
    with pytest.raises(ParseError):
        date_time(String(text))


def test_append_dates_at_the_edges():
    assert date_time(String(b"29-Feb-2024 10:00:00 +0000")) == 1709200800
    assert date_time(String(b"31-Dec-9999 23:59:59 +0000")) == 253402300799


def test_internaldate_keeps_four_digit_years():
    from mailserver.imap.fetch import internal_date

    assert internal_date(1e20) == "31-Dec-9999 23:59:59 +0000"
    assert internal_date(-1e20) == " 1-Jan-0001 00:00:00 +0000"
    assert internal_date(0) == " 1-Jan-1970 00:00:00 +0000"
