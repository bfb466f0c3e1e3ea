"""
The one reply type: rendering, a peer's reply read back byte for byte, the
status and diagnostic the relay keeps, and plugins' checked refusals.
"""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailserver.hooks import Reject
from mailserver.wire.reply import Reply


def test_one_line_and_multi_line_rendering_with_the_enhanced_code_on_each_line():
    assert Reply(250, "2.1.0", ("Ok",)).render() == b"250 2.1.0 Ok\r\n"
    assert Reply(220, "", ("mx ESMTP",)).render() == b"220 mx ESMTP\r\n"
    assert Reply(250, "2.1.5", ("<a@b>", "<c@d>")).render() == (
        b"250-2.1.5 <a@b>\r\n250 2.1.5 <c@d>\r\n"
    )
    assert Reply(250, "", ("mx", "PIPELINING", "SIZE 10")).render() == (
        b"250-mx\r\n250-PIPELINING\r\n250 SIZE 10\r\n"
    )


def test_classes():
    assert Reply(250).positive and not Reply(250).is_error
    assert Reply(354).positive
    assert Reply(451).temporary and Reply(451).is_error and not Reply(451).permanent
    assert Reply(550).permanent and not Reply(550).temporary


def test_a_peers_reply_keeps_its_enhanced_code_apart_when_every_line_has_it():
    reply = Reply.received(550, ["5.1.1 no such user", "5.1.1 really"])
    assert (reply.enhanced, reply.lines) == ("5.1.1", ("no such user", "really"))
    assert reply.status == "5.1.1"
    assert reply.text == "no such user really"
    assert str(reply) == "550 5.1.1 no such user 5.1.1 really"
    assert reply.diagnostic() == "smtp; 550 5.1.1 no such user 5.1.1 really"


def test_a_peers_reply_with_the_code_on_the_first_line_only_is_kept_whole():
    reply = Reply.received(550, ["5.1.1 no such user", "more"])
    assert (reply.enhanced, reply.lines) == ("", ("5.1.1 no such user", "more"))
    assert reply.status == "5.1.1"
    assert reply.diagnostic() == "smtp; 550 5.1.1 no such user more"


def test_an_enhanced_code_of_another_class_is_text():
    reply = Reply.received(550, ["2.0.0 odd"])
    assert reply.enhanced == "" and reply.status == "5.0.0"
    assert Reply.received(421, [""]).status == "4.0.0"


def test_a_made_up_reply_reads_like_a_received_one():
    made = Reply(451, "4.4.1", ("cannot connect",), synthetic=True)
    assert made.synthetic and made.status == "4.4.1"
    assert made.diagnostic() == "smtp; 451 4.4.1 cannot connect"
    assert str(made) == str(Reply.received(451, ["4.4.1 cannot connect"]))


LINE_TEXT = st.text(
    alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=20
) | st.sampled_from(["2.0.0 ok", "5.1.1 no", "4.7.0 later", "5.1.1", "5.1.1  two spaces", ""])


@given(st.sampled_from([220, 221, 250, 354, 421, 451, 550, 554]), st.lists(LINE_TEXT, min_size=1, max_size=4))
def test_a_received_reply_renders_back_to_the_peers_bytes(code, texts):
    wire = "".join(
        f"{code}{' ' if i == len(texts) - 1 else '-'}{text}\r\n" for i, text in enumerate(texts)
    ).encode()
    reply = Reply.received(code, texts)
    assert reply.render() == wire
    assert str(reply) == f"{code} {' '.join(texts)}".strip()


def test_a_reject_is_a_checked_reply():
    reject = Reject(550, "5.7.1", "Not wanted here")
    assert isinstance(reject, Reply)
    assert reject.render() == b"550 5.7.1 Not wanted here\r\n"
    assert reject.text == "Not wanted here"
    assert reject == Reject(550, "5.7.1", "Not wanted here")
    for bad in ((250, "2.0.0", "ok"), (550, "4.0.0", "x"), (550, "5.0", "x"), (550, "5.0.0", "a\nb")):
        with pytest.raises(ValueError):
            Reject(*bad)
