"""
Hooks: the runner's ordering and error handling, header editing, the
message-hook wrapper around the intake, and plugin discovery and loading.
"""

from __future__ import annotations

import os
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from zope.interface import implementer

from mailserver.config import Config, ConfigError, Plugins
from mailserver.envelope import Envelope, Recipient
from mailserver.hooked_intake import HookedIntake
from mailserver.hooks import (
    TEMPORARY_FAILURE,
    Client,
    Delivery,
    Hooks,
    MessageHeaders,
    MessageRejected,
    PluginContext,
    Reject,
    Rewrite,
)
from mailserver.interfaces import IDeliveredHook, IEnvelopeHook, IMessageHook
from mailserver.memory_budget import MemoryBudget
from mailserver.plugin_loading import available_plugins, load_plugins
from mailserver.testing import MemoryIntake

CLIENT = Client(address="192.0.2.1", port=4000, role="smtp")
ENVELOPE = Envelope(
    sender="a@example.com",
    recipients=(Recipient(address="b@example.org", destinations=("b@example.org",)),),
    authenticated="a@example.org",
)


def result_of(coroutine):
    results = []
    defer.ensureDeferred(coroutine).addBoth(results.append)
    assert results, "the hook runner did not finish synchronously"
    return results[0]


@implementer(IEnvelopeHook)
class Recorder:
    def __init__(self, answer=None):
        self.answer = answer
        self.calls = []

    def sender(self, client, address):
        self.calls.append(("sender", address))
        return self.answer

    def recipient(self, client, sender, address):
        self.calls.append(("recipient", address))
        return self.answer


@implementer(IEnvelopeHook)
class Broken:
    def sender(self, client, address):
        raise RuntimeError("boom")

    async def recipient(self, client, sender, address):
        raise RuntimeError("async boom")


def test_hooks_run_in_order_and_stop_at_a_rejection():
    first, second = Recorder(), Recorder(Reject(550, "5.7.1", "no"))
    third = Recorder()
    hooks = Hooks([("first", first), ("second", second), ("third", third)])
    assert result_of(hooks.sender(CLIENT, "x@y")) == Reject(550, "5.7.1", "no")
    assert first.calls == second.calls == [("sender", "x@y")]
    assert third.calls == []


def test_rewrites_chain():
    hooks = Hooks([("a", Recorder(Rewrite("b@z"))), ("c", Recorder())])
    assert result_of(hooks.recipient(CLIENT, "", "a@z")) == "b@z"
    assert hooks._plugins[1][1].calls == [("recipient", "b@z")]


def test_a_raising_plugin_is_a_temporary_failure_and_counted():
    errors = []
    hooks = Hooks([("broken", Broken())], on_error=errors.append)
    assert result_of(hooks.sender(CLIENT, "x@y")) == TEMPORARY_FAILURE
    assert result_of(hooks.recipient(CLIENT, "", "x@y")) == TEMPORARY_FAILURE
    assert errors == ["broken", "broken"]
    assert TEMPORARY_FAILURE.code == 451 and TEMPORARY_FAILURE.enhanced == "4.3.0"


def test_a_wrong_answer_is_an_error_not_a_crash():
    errors = []
    hooks = Hooks([("odd", Recorder("yes please"))], on_error=errors.append)
    assert result_of(hooks.sender(CLIENT, "x@y")) == TEMPORARY_FAILURE
    assert errors == ["odd"]


def test_deferred_answers_are_awaited():
    d = defer.Deferred()
    hooks = Hooks([("slow", Recorder(d))])
    results = []
    defer.ensureDeferred(hooks.sender(CLIENT, "x@y")).addBoth(results.append)
    assert results == []
    d.callback(Reject(450, "4.7.1", "later"))
    assert results == [Reject(450, "4.7.1", "later")]


def test_reject_values_are_checked():
    for bad in ((250, "2.0.0", "ok"), (550, "4.0.0", "x"), (550, "5.0", "x"), (550, "5.0.0", "a\r\nb")):
        with pytest.raises(ValueError):
            Reject(*bad)


def test_a_refusal_is_named_by_its_plugin_unless_it_names_itself():
    hooks = Hooks([("Block List", Recorder(Reject(550, "5.7.1", "no")))])
    assert result_of(hooks.sender(CLIENT, "x@y")).reason == "plugin:block_list"
    hooks = Hooks([("grey", Recorder(Reject(450, "4.7.1", "later", reason="greylisted")))])
    assert result_of(hooks.sender(CLIENT, "x@y")).reason == "greylisted"
    errors = []
    hooks = Hooks([("broken", Broken())], on_error=errors.append)
    assert result_of(hooks.sender(CLIENT, "x@y")).reason == "plugin:broken"
    assert TEMPORARY_FAILURE.reason == ""  # the shared value is not changed
    for bad in ("Upper", "with space", "x" * 65, "-lead"):
        with pytest.raises(ValueError):
            Reject(550, "5.7.1", "no", reason=bad)


def test_reject_reasons_are_short_words():
    assert Reject(450, "4.7.1", "x", reason="rate").reason == "rate"
    assert Reject(450, "4.7.1", "x", reason="plugin:my-list.v2").reason == "plugin:my-list.v2"
    for bad in ("Rate", "two words", "x" * 65, "-dash", "ünï"):
        with pytest.raises(ValueError):
            Reject(450, "4.7.1", "x", reason=bad)


def test_delivered_errors_are_swallowed():
    @implementer(IDeliveredHook)
    class Fails:
        def delivered(self, event):
            raise RuntimeError("no")

    errors = []
    Hooks([("f", Fails())], on_error=errors.append).delivered(
        Delivery(queue_id="q", sender="", recipient="r@x", status="delivered", size=1)
    )
    assert errors == ["f"]


def test_message_headers_keep_bytes_and_edit():
    raw = b"Received: from a\r\n\tby b\r\nSubject: Hi\r\nX-Spam: yes\r\nx-spam: again\r\n"
    headers = MessageHeaders(raw)
    assert headers.to_bytes() == raw
    assert headers.get("subject") == "Hi"
    assert headers.get_all("X-SPAM") == ["yes", "again"]
    assert headers.remove("x-spam") == 2
    headers.add("X-Checked", "1")
    headers.replace("Subject", "Bye")
    assert headers.to_bytes() == b"Subject: Bye\r\nX-Checked: 1\r\nReceived: from a\r\n\tby b\r\n"
    with pytest.raises(ValueError):
        headers.add("X-Evil", "a\r\nBcc: x@y")


def test_removing_from_untouched_headers_matches_any_case():
    raw = b"Subject: Hi\r\nX-SPAM: yes\r\n"
    assert MessageHeaders(raw).remove("Authentication-Results") == 0
    headers = MessageHeaders(raw)
    assert headers.remove("x-spam") == 1
    assert headers.to_bytes() == b"Subject: Hi\r\n"
    headers = MessageHeaders(raw)
    assert headers.remove("X-Spam", where=lambda value: value == "no") == 0
    assert headers.to_bytes() == raw


@implementer(IMessageHook)
class Tagger:
    def __init__(self, reject=None):
        self.reject = reject

    async def message(self, envelope, headers, body):
        assert body.read() == body.read() and body.size == len(body.read())
        headers.add("X-Tag", envelope.authenticated)
        headers.remove("X-Remove-Me")
        return self.reject


def feed(intake, pieces):
    receiver = intake.begin(ENVELOPE)
    for piece in pieces:
        receiver.write(piece)
    results = []
    receiver.finish().addBoth(results.append)
    return results[0]


def test_hooked_intake_edits_headers_and_keeps_the_body(tmp_path):
    inner = MemoryIntake()
    intake = HookedIntake(inner, Hooks([("tag", Tagger())]), tmp_path)
    message = [b"Subject: s\r\nX-Remove", b"-Me: 1\r\n", b"\r", b"\nbody\r\n", b".line\r\n" * 3]
    assert feed(intake, message) == "Q1"
    assert [message.data for message in inner.finished] == [
        b"X-Tag: a@example.org\r\nSubject: s\r\n\r\nbody\r\n" + b".line\r\n" * 3
    ]


def test_hooked_intake_rejection_stores_nothing(tmp_path):
    inner = MemoryIntake()
    intake = HookedIntake(inner, Hooks([("tag", Tagger(Reject(554, "5.7.0", "spam")))]), tmp_path)
    failure = feed(intake, [b"Subject: s\r\n\r\nbody\r\n"])
    assert failure.check(MessageRejected)
    assert failure.value.reject == Reject(554, "5.7.0", "spam")
    assert inner.finished == []
    assert list(tmp_path.iterdir()) == []


def test_hooked_intake_spills_through_no_symbolic_link(tmp_path):
    """
    Past the memory budget the header section and body go to spill files in
    the spool's tmp/; a link left in its place must not take them elsewhere.
    """
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    data = tmp_path / "data"
    (data / "spool").mkdir(parents=True)
    (data / "spool" / "tmp").symlink_to(elsewhere)
    intake = HookedIntake(
        MemoryIntake(), Hooks([("tag", Tagger())]), data / "spool" / "tmp",
        budget=MemoryBudget(0), base=data,
    )
    receiver = intake.begin(ENVELOPE)
    with pytest.raises(OSError):
        receiver.write(b"Subject: s\r\n\r\nbody\r\n")
    receiver.abort()
    assert os.listdir(elsewhere) == []
    # Without the link, the spill file has no name: nothing is left behind.
    (data / "spool" / "tmp").unlink()
    (data / "spool" / "tmp").mkdir()
    assert feed(intake, [b"Subject: s\r\n\r\n", b"body\r\n" * 1000]) == "Q1"
    assert os.listdir(data / "spool" / "tmp") == []


def test_hooked_intake_hands_a_large_message_on_a_chunk_per_turn(tmp_path):
    from twisted.internet.task import Clock

    import mailserver.hooked_intake as hooked

    clock = Clock()
    inner = MemoryIntake()
    intake = HookedIntake(inner, Hooks([("tag", Tagger())]), tmp_path, clock=clock)
    line = b"x" * 998 + b"\r\n"
    body = line * (3 * hooked._COPY_CHUNK // len(line) + 10)  # a bit over three chunks
    receiver = intake.begin(ENVELOPE)
    receiver.write(b"Subject: big\r\n\r\n" + body)
    results = []
    receiver.finish().addBoth(results.append)
    # One chunk went on; the rest waits for the reactor's next turn, when
    # the other sessions have had theirs.
    assert results == [] and len(clock.getDelayedCalls()) == 1
    clock.advance(0)
    assert results == ["Q1"]
    assert [message.data for message in inner.finished] == [
        b"X-Tag: a@example.org\r\nSubject: big\r\n\r\n" + body
    ]


@implementer(IMessageHook)
class Looker:
    """
    Records the header section and body each message hook call sees.
    """

    def __init__(self):
        self.seen = []

    def message(self, envelope, headers, body):
        self.seen.append((headers.to_bytes(), body.read()))


_message_parts = st.lists(
    st.sampled_from([b"A: 1\r\n", b"Long: " + b"x" * 40 + b"\r\n", b" folded\r\n", b"\r\n",
                     b"body\r\n", b"\r", b"\n", b"\r\n\r\n"]),
    max_size=20,
)


@settings(max_examples=300, deadline=None)
@given(parts=_message_parts, cuts=st.lists(st.integers(0, 500), max_size=6),
       budget=st.sampled_from([0, 100, 10**6]), max_header=st.sampled_from([40, 10**6]))
def test_hooked_intake_passes_any_message_on_whole_however_it_is_cut_and_held(
    tmp_path_factory, parts, cuts, budget, max_header
):
    import mailserver.hooked_intake as hooked

    message = b"".join(parts)
    edges = sorted({0, len(message), *(c % (len(message) + 1) for c in cuts)})
    inner, looker = MemoryIntake(), Looker()
    memory = MemoryBudget(budget)
    intake = HookedIntake(inner, Hooks([("look", looker)]), tmp_path_factory.mktemp("spool"),
                          budget=memory)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hooked, "MAX_HEADER_BYTES", max_header)
        assert feed(intake, [message[a:b] for a, b in zip(edges, edges[1:])]) == "Q1"
    assert [m.data for m in inner.finished] == [message]
    (head, body), = looker.seen
    blank = message.find(b"\r\n\r\n")
    if message.startswith(b"\r\n"):
        assert (head, body) == (b"", message[2:])
    elif 0 <= blank and blank + 4 <= max_header:
        assert (head, body) == (message[: blank + 2], message[blank + 4:])
    assert memory.held == 0


THIRD_PARTY = textwrap.dedent(
    """
    from twisted.plugin import IPlugin
    from zope.interface import implementer, provider

    from mailserver.hooks import PluginOptionsError, Reject
    from mailserver.interfaces import IEnvelopeHook, IPluginFactory


    @implementer(IEnvelopeHook)
    class NoSales:
        def __init__(self, code):
            self.code = code

        def sender(self, client, address):
            return None

        def recipient(self, client, sender, address):
            if address.startswith("sales@"):
                return Reject(self.code, "5.7.1", "sales@ takes no mail")


    @provider(IPlugin, IPluginFactory)
    class NoSalesPlugin:
        name = "nosales"
        description = "Refuses mail to sales@."

        @staticmethod
        def build(options, context):
            code = options.get("code", 550)
            if not isinstance(code, int) or not 500 <= code < 600:
                raise PluginOptionsError("code", "must be a 5xx reply code")
            return NoSales(code)


    plugin = NoSalesPlugin
    """
)


def plugin_config(folder, enabled, options):
    return Config(
        hostname="mx.test",
        plugins=Plugins(paths=(str(folder),), enabled=enabled, options=options),
        source="test.toml",
    )


def load_configured(config, context):
    return load_plugins(config.plugins, context, config.source)


def test_a_dropped_in_plugin_file_is_found_and_built(tmp_path):
    (tmp_path / "nosales.py").write_text(THIRD_PARTY)
    assert {"nosales", "headers", "webhook"} <= set(available_plugins((str(tmp_path),)))
    context = PluginContext(reactor=None, hostname="mx.test", data_path=tmp_path)
    ((name, hook),) = load_configured(plugin_config(tmp_path, ("nosales",), {"nosales": {"code": 553}}), context)
    assert name == "nosales"
    assert hook.recipient(CLIENT, "", "sales@x") == Reject(553, "5.7.1", "sales@ takes no mail")


@pytest.mark.parametrize(
    "enabled, options, key, problem",
    [
        (("nosuch",), {}, "plugins.enabled", "no plugin named 'nosuch'"),
        (("nosales",), {"nosales": {"code": 250}}, "plugins.nosales.code", "must be a 5xx"),
        ((), {"nosales": {}}, "plugins.nosales", "not in plugins.enabled"),
        (("headers",), {"headers": {"add": {"X": "a\nb"}}}, "plugins.headers.add", "one-line"),
        (("webhook",), {"webhook": {}}, "plugins.webhook.url", "must be an http"),
    ],
)
def test_plugin_problems_are_config_errors(tmp_path, enabled, options, key, problem):
    (tmp_path / "nosales.py").write_text(THIRD_PARTY)
    context = PluginContext(reactor=None, hostname="mx.test", data_path=tmp_path)
    with pytest.raises(ConfigError) as caught:
        load_configured(plugin_config(tmp_path, enabled, options), context)
    assert caught.value.key == key
    assert problem in caught.value.problem


def test_plugin_tables_parse_from_toml(tmp_path):
    from mailserver.config import load

    path = tmp_path / "c.toml"
    path.write_text(
        '[plugins]\nenabled = ["headers"]\n[plugins.headers]\nremove = ["X-A"]\n'
        '[[plugins.headers.rules]]\nauthenticated = true\nadd = { "X-B" = "1" }\n'
    )
    config = load(path)
    assert config.plugins.enabled == ("headers",)
    assert config.plugins.options == {
        "headers": {"remove": ["X-A"], "rules": [{"authenticated": True, "add": {"X-B": "1"}}]}
    }
    context = PluginContext(reactor=None, hostname="mx.test", data_path=tmp_path)
    ((_, hook),) = load_configured(config, context)
    headers = MessageHeaders(b"X-A: 1\r\nSubject: s\r\n")
    hook.message(ENVELOPE, headers, None)
    assert headers.to_bytes() == b"X-B: 1\r\nSubject: s\r\n"
    anonymous = Envelope(sender="", recipients=())
    headers = MessageHeaders(b"X-A: 1\r\n")
    hook.message(anonymous, headers, None)
    assert headers.to_bytes() == b""


def test_the_documented_example_plugin_loads_and_works(tmp_path):
    from pathlib import Path

    examples = Path(__file__).resolve().parents[2] / "docs" / "examples"
    context = PluginContext(reactor=None, hostname="mx.test", data_path=tmp_path)
    config = plugin_config(examples, ("blocklist",), {"blocklist": {"domains": ["Spam.example"]}})
    ((_, hook),) = load_configured(config, context)
    assert hook.sender(CLIENT, "x@spam.example").code == 550
    assert hook.sender(CLIENT, "x@ham.example") is None
    headers = MessageHeaders(b"Subject: s\r\n")
    assert result_of(hook.message(ENVELOPE, headers, None)) is None
    assert headers.get("X-Blocklist") == "checked"


CONTEXT_KEEPER = '''
from twisted.plugin import IPlugin
from zope.interface import provider

from mailserver.interfaces import IPluginFactory


@provider(IPlugin, IPluginFactory)
class Keeper:
    name = "keeper"
    description = "Hands back the context it was built with."

    @staticmethod
    def build(options, context):
        return context


plugin = Keeper
'''


def test_each_plugin_gets_a_logger_in_its_own_namespace(tmp_path):
    from twisted.logger import capturedLogs

    (tmp_path / "keeper.py").write_text(CONTEXT_KEEPER)
    shared = PluginContext(reactor=None, hostname="mx.test", data_path=tmp_path)
    config = plugin_config(tmp_path, ("keeper",), {})
    ((_, context),) = load_plugins(config.plugins, shared, config.source)
    assert (context.reactor, context.hostname, context.data_path) == (None, "mx.test", tmp_path)
    with capturedLogs() as events:
        context.log.info("built with {n} options", n=0)
    assert [(e["log_namespace"], e["n"]) for e in events] == [("mailserver.plugins.keeper", 0)]
