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
from mailserver.interfaces import IAccounts, IIntake, IMessageReceiver
from mailserver.testing import FakeAccounts, MemoryIntake, make_config

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_the_fakes_provide_the_interfaces_of_what_they_stand_for(tmp_path):
    config = make_config(data_dir=str(tmp_path))
    assert verifyObject(IAccounts, FakeAccounts(config))
    assert verifyObject(IAccounts, accounts_for(config))
    intake = MemoryIntake()
    assert verifyObject(IIntake, intake)
    assert verifyObject(IMessageReceiver, intake.begin(Envelope("a@b.c", ())))


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
