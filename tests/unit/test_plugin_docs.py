"""
docs/plugins.md against the code: the hook table against the interfaces,
the outline of the values against the classes, the quoted examples against
the constructors.  (A plugin written from the page, run in the real server:
tests/e2e/test_documented_plugin.py.)
"""

from __future__ import annotations

import inspect
from io import BytesIO

import pytest
from zope.interface.interface import InterfaceClass

from mailserver import envelope, hooks, interfaces
from tests import plugin_docs

# One real instance of each class the page describes, to look the
# documented attributes up on.
SAMPLES = {
    "Client": hooks.Client(address="192.0.2.1", port=4000, role="smtp"),
    "Envelope": envelope.Envelope(sender="", recipients=()),
    "Recipient": envelope.Recipient(address="a@example.org", destinations=("a@example.org",)),
    "MessageHeaders": hooks.MessageHeaders(b"Subject: s\r\n"),
    "MessageBody": hooks.MessageBody(BytesIO(b"body\r\n")),
    "Delivery": hooks.Delivery(queue_id="Q", sender="", recipient="a@b", status="bounced", size=1),
    "PluginContext": hooks.PluginContext(reactor=None, hostname="mx.test", data_path=None),
}


def test_the_hook_table_lists_every_hook_with_its_signature():
    documented = plugin_docs.hook_table()
    real = {
        name: value
        for name, value in vars(interfaces).items()
        if isinstance(value, InterfaceClass) and name.endswith("Hook")
    }
    assert sorted(documented) == sorted(real)
    for name, methods in documented.items():
        interface = real[name]
        assert sorted(methods) == sorted(interface.names()), name
        for method, params in methods.items():
            assert params == tuple(interface[method].getSignatureInfo()["positional"]), (
                f"docs/plugins.md gives {name}.{method}{params}"
            )


def test_the_outline_of_the_values_matches_the_classes():
    outline = plugin_docs.value_outline()
    assert sorted(outline) == sorted(SAMPLES), "give each documented class a sample here"
    for name, entry in outline.items():
        sample = SAMPLES[name]
        home = envelope if name in ("Envelope", "Recipient") else hooks
        assert type(sample) is getattr(home, name)
        for attribute in entry.fields:
            assert hasattr(sample, attribute), f"{name}.{attribute} is documented but missing"
            assert not callable(getattr(sample, attribute)), f"{name}.{attribute} is a method"
        for method, params in entry.methods.items():
            signature = inspect.signature(getattr(sample, method))
            real = [
                (p.name, None if p.default is p.empty else repr(p.default))
                for p in signature.parameters.values()
            ]
            assert real == params, f"docs/plugins.md gives {name}.{method}{params}, the code {real}"


def test_the_outline_leaves_no_dataclass_field_undocumented():
    outline = plugin_docs.value_outline()
    for name, entry in outline.items():
        fields = getattr(type(SAMPLES[name]), "__dataclass_fields__", {})
        public = {f for f in fields if not f.startswith("_")}  # private: not for plugins
        assert sorted(public - set(entry.fields)) == [], name


@pytest.mark.parametrize("expression", plugin_docs.value_examples())
def test_the_quoted_reject_and_rewrite_examples_build(expression):
    value = eval(expression, {"Reject": hooks.Reject, "Rewrite": hooks.Rewrite})
    assert isinstance(value, (hooks.Reject, hooks.Rewrite))


def test_the_quoted_examples_are_found():
    assert any(e.startswith("Reject(") for e in plugin_docs.value_examples())
    assert any(e.startswith("Rewrite(") for e in plugin_docs.value_examples())
