"""
A plugin written from docs/plugins.md alone works in the real server.

The plugin is generated from the page: one method per row of its hook
table, with the parameters the table gives, recording the attributes the
page's outline of the values promises.  Next to it runs the page's complete
example, installed and configured as the page says.  If the page and the
server drift apart (a parameter, an attribute, the example, the steps), this
test fails.
"""

from __future__ import annotations

import json
import shutil
import smtplib
import time

from harness import MailServer
from tests import plugin_docs

RECORDER = '''
import json

from twisted.plugin import IPlugin
from zope.interface import implementer, provider

from mailserver.interfaces import IPluginFactory, {interfaces}

# The attributes docs/plugins.md promises, per class.
FIELDS = {fields!r}


def describe(value):
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if isinstance(value, tuple):
        return [describe(item) for item in value]
    kind = type(value).__name__
    if kind == "MessageHeaders":
        return {{"names": value.names(), "Subject": value.get("Subject")}}
    if kind == "MessageBody":
        return {{"size": value.size, "text": value.read().decode()}}
    return {{"type": kind, **{{name: describe(getattr(value, name)) for name in FIELDS[kind]}}}}


@implementer({interfaces})
class Recorder:
    def __init__(self, path):
        self.path = path

    def record(self, hook, **arguments):
        described = {{name: describe(value) for name, value in arguments.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps({{"hook": hook, "arguments": described}}) + "\\n")
{methods}

@provider(IPlugin, IPluginFactory)
class RecorderPlugin:
    name = "docs_recorder"
    description = "Records each hook call, written from docs/plugins.md."

    @staticmethod
    def build(options, context):
        context.log.info("recording to {{path}}", path=options["record"])
        return Recorder(options["record"])


plugin = RecorderPlugin
'''

METHOD = '''
    def {name}(self, {params}):
        self.record("{name}", {arguments})
        return None
'''


def recorder_source() -> str:
    table = plugin_docs.hook_table()
    methods = "".join(
        METHOD.format(
            name=name,
            params=", ".join(params),
            arguments=", ".join(f"{p}={p}" for p in params),
        )
        for signatures in table.values()
        for name, params in signatures.items()
    )
    fields = {name: entry.fields for name, entry in plugin_docs.value_outline().items()}
    return RECORDER.format(interfaces=", ".join(table), fields=fields, methods=methods)


def recorded_calls(path, until: str, timeout: float = 20.0) -> list[dict]:
    """
    The calls recorded so far, once one of hook C{until} is among them.
    """
    deadline = time.monotonic() + timeout
    while True:
        calls = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        if any(call["hook"] == until for call in calls) or time.monotonic() > deadline:
            return calls
        time.sleep(0.05)


def test_a_plugin_written_from_the_docs_gets_each_hook_with_the_documented_arguments(tmp_path):
    folder = tmp_path / "plugins"
    folder.mkdir()
    # As "A complete example" says: copy the example into a folder...
    shutil.copy(plugin_docs.example_plugin(), folder)
    (folder / "docs_recorder.py").write_text(recorder_source())
    record = tmp_path / "calls.jsonl"
    # ...and configure it with the page's table, plus our recorder after it.
    documented = plugin_docs.example_config()["plugins"]
    (example,) = documented["enabled"]
    blocked = documented[example]["domains"][0]
    server = MailServer(
        tmp_path,
        extra_toml=f'[plugins]\npaths = ["{folder}"]\n'
        f'enabled = ["{example}", "docs_recorder"]\n'
        f"[plugins.{example}]\ndomains = {json.dumps(documented[example]['domains'])}\n"
        f'[plugins.docs_recorder]\nrecord = "{record}"\n',
    )
    checked = server.cli("check-config", str(server.config_path))
    assert checked.returncode == 0 and checked.stdout.strip().endswith(": OK"), checked
    server.start()
    try:
        server.add_user("bob@localhost", "pw")
        with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as client:
            client.ehlo("client.test")
            assert client.mail(f"someone@{blocked}")[0] == 550  # the example's sender hook
            client.rset()
            assert client.mail("a@example.com")[0] == 250
            assert client.rcpt("bob@localhost")[0] == 250
            code, _ = client.data(b"Subject: docs\r\n\r\nhello from the docs\r\n")
            assert code == 250
        calls = recorded_calls(record, until="delivered")
    finally:
        server.stop()

    documented_hooks = {name for methods in plugin_docs.hook_table().values() for name in methods}
    assert {call["hook"] for call in calls} == documented_hooks
    by_hook = {call["hook"]: call["arguments"] for call in calls}
    client = {"type": "Client", "address": "127.0.0.1", "role": "smtp", "authenticated": None, "tls": False}

    connected = by_hook["connection"]["client"]
    assert connected.items() >= (client | {"helo": ""}).items()
    assert isinstance(connected["port"], int) and connected["port"] > 0

    sender = by_hook["sender"]  # once: the example refused the blocked sender first
    assert [c["hook"] for c in calls].count("sender") == 1
    assert sender["client"].items() >= (client | {"helo": "client.test"}).items()
    assert sender["address"] == "a@example.com"

    recipient = by_hook["recipient"]
    assert (recipient["sender"], recipient["address"]) == ("a@example.com", "bob@localhost")
    assert recipient["client"]["helo"] == "client.test"

    message = by_hook["message"]
    assert message["envelope"]["sender"] == "a@example.com"
    assert [r["address"] for r in message["envelope"]["recipients"]] == ["bob@localhost"]
    assert message["envelope"]["recipients"][0]["destinations"] == ["bob@localhost"]
    assert message["headers"]["Subject"] == "docs"
    assert "X-Blocklist" in message["headers"]["names"]  # the example ran first and edited them
    assert message["body"] == {"size": len(b"hello from the docs\r\n"), "text": "hello from the docs\r\n"}

    event = by_hook["delivered"]["event"]
    assert (event["type"], event["status"], event["sender"], event["recipient"]) == (
        "Delivery", "delivered", "a@example.com", "bob@localhost"
    )
    assert event["queue_id"] and event["envelope"]["sender"] == "a@example.com"

    (stored,) = (server.maildir("bob@localhost") / "new").iterdir()
    assert b"X-Blocklist: checked\n" in stored.read_bytes().replace(b"\r\n", b"\n")
    # The context's logger is the plugin's own.
    assert "[mailserver.plugins.docs_recorder#info] recording to" in server.log()
