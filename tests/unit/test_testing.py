"""
The public fakes keep the contracts of what they stand for, and the way
docs/plugins.md shows them to plugin authors works.
"""

import importlib.util
import re
import sys
from pathlib import Path

from zope.interface.verify import verifyObject

from mailserver.from_config import accounts_for
from mailserver.envelope import Envelope
from mailserver.interfaces import (
    IAccounts,
    IIntake,
    IMailbox,
    IMailboxStore,
    IMessageReceiver,
    IStoredMessage,
)
from mailserver.maildir import MaildirStore
from mailserver.testing import FakeAccounts, MemoryIntake, MemoryMaildirs, make_config

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_the_fakes_provide_the_interfaces_of_what_they_stand_for(tmp_path):
    config = make_config(data_dir=str(tmp_path))
    assert verifyObject(IAccounts, FakeAccounts(config))
    assert verifyObject(IAccounts, accounts_for(config))
    intake = MemoryIntake()
    assert verifyObject(IIntake, intake)
    assert verifyObject(IMessageReceiver, intake.begin(Envelope("a@b.c", ())))


def test_the_mailbox_fakes_provide_the_interfaces_of_what_they_stand_for(tmp_path):
    fake = MemoryMaildirs()
    fake.deliver("bob@localhost", b"Subject: x\n\nbody\n")
    real = MaildirStore(lambda address: tmp_path / address, tmp_path)
    real_box = real.mailbox("bob@localhost")
    assert real_box.lock()
    (tmp_path / "bob@localhost" / "new" / "1700000000.M1P1Q1.test,S=17,W=20").write_bytes(
        b"Subject: x\n\nbody\n"
    )
    for store, box in ((fake, fake.mailbox("bob@localhost")), (real, real_box)):
        assert verifyObject(IMailboxStore, store)
        assert verifyObject(IMailbox, box)
        (message,) = box.messages()
        assert verifyObject(IStoredMessage, message)
        assert (message.size, message.seen) == (20, False)
        assert box.read_whole(message, 1024) == b"Subject: x\n\nbody\n"
    real_box.unlock()


def test_the_plugin_guides_testing_example_runs(monkeypatch):
    guide = (DOCS / "plugins.md").read_text()
    section = guide.split("## Testing a plugin", 1)[1]
    (example,) = re.findall(r"```python\n(.*?)```", section.split("\n## ", 1)[0], re.S)
    spec = importlib.util.spec_from_file_location("blocklist", DOCS / "examples" / "blocklist.py")
    blocklist = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(blocklist)
    monkeypatch.setitem(sys.modules, "blocklist", blocklist)
    namespace: dict = {}
    exec(compile(example, "docs/plugins.md", "exec"), namespace)
    assert namespace["session"].intake.messages == []  # the example ran to its end
