"""
Plugins shipped as distributions: found through their C{mailserver.plugins}
entry points, loaded only when enabled, and a broken one named in one line.
"""

from __future__ import annotations

import pytest

from mailserver.config import Config, ConfigError, Plugins
from mailserver.hooks import PluginContext
from mailserver.plugin_loading import installed_plugins, load_plugins
from mailserver.testing import InlineReactor

PLUGIN = '''
from twisted.plugin import IPlugin
from zope.interface import implementer, provider

from mailserver.hooks import Reject
from mailserver.interfaces import IEnvelopeHook, IPluginFactory


@implementer(IEnvelopeHook)
class NoInfo:
    def sender(self, client, address):
        return None

    def recipient(self, client, sender, address):
        if address.startswith("info@"):
            return Reject(550, "5.7.1", "no info")
        return None


@provider(IPlugin, IPluginFactory)
class NoInfoPlugin:
    name = "noinfo"
    description = "Refuses mail to info@."

    @staticmethod
    def build(options, context):
        return NoInfo()
'''


def _distribution(folder, name: str, entry_points: str, modules: dict[str, str]) -> None:
    """
    An installed distribution as importlib.metadata sees one: a
    C{.dist-info} folder beside its modules on the path.
    """
    info = folder / f"{name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[mailserver.plugins]\n{entry_points}\n")
    for module, text in modules.items():
        (folder / f"{module}.py").write_text(text)


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def _config(enabled) -> Config:
    return Config(hostname="mx.test", plugins=Plugins(enabled=enabled))


def _context(tmp_path) -> PluginContext:
    return PluginContext(reactor=InlineReactor(), hostname="mx.test", data_path=tmp_path)


def test_an_entry_point_plugin_is_built_when_enabled(site):
    _distribution(site, "noinfo_dist", "noinfo = noinfo_module:NoInfoPlugin", {"noinfo_module": PLUGIN})
    assert "noinfo" in installed_plugins()
    ((name, hook),) = load_plugins(_config(("noinfo",)).plugins, _context(site), "test.toml")
    assert name == "noinfo"
    assert hook.recipient(None, "a@b", "info@example.org").code == 550


def test_a_broken_distribution_costs_nothing_until_it_is_enabled(site):
    _distribution(site, "broken_dist", "broken = broken_module:Plugin", {"broken_module": "import nosuchmodule\n"})
    _distribution(site, "wrong_dist", "wrong = wrong_module:thing", {"wrong_module": "thing = 42\n"})
    assert load_plugins(_config(()).plugins, _context(site), "test.toml") == []
    with pytest.raises(ConfigError) as broken:
        load_plugins(_config(("broken",)).plugins, _context(site), "test.toml")
    assert broken.value.key == "plugins.enabled"
    assert broken.value.problem == (
        "plugin 'broken' (broken_module:Plugin) failed to load: "
        "ModuleNotFoundError: No module named 'nosuchmodule'"
    )
    with pytest.raises(ConfigError) as wrong:
        load_plugins(_config(("wrong",)).plugins, _context(site), "test.toml")
    assert wrong.value.problem == "plugin 'wrong' (wrong_module:thing) does not provide IPluginFactory"


def test_an_unknown_name_lists_the_installed_plugins_too(site):
    _distribution(site, "noinfo_dist", "noinfo = noinfo_module:NoInfoPlugin", {"noinfo_module": PLUGIN})
    with pytest.raises(ConfigError) as unknown:
        load_plugins(_config(("nosuch",)).plugins, _context(site), "test.toml")
    assert "no plugin named 'nosuch' (found: " in unknown.value.problem
    assert "noinfo" in unknown.value.problem and "headers" in unknown.value.problem
