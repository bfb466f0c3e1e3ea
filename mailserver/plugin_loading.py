"""
Finding plugins and building the enabled ones.

Plugins are found two ways: as C{twisted.plugin} dropin modules of the
package C{mailserver.plugins} (the built-in ones, and single files in the
folders of C{plugins.paths}), and as entry points of the group
C{mailserver.plugins} that installed distributions declare, which is how a
plugin is shipped as a package: its distribution installs only its own
modules, whichever way the server itself was installed.  A dropin wins over
an entry point of the same name.  Entry points are loaded only when enabled,
so a broken distribution that is not enabled costs nothing.

Every problem (an unknown name, a bad option, a plugin that fails to load or
build) is a L{ConfigError}, so a misconfigured plugin stops start-up with one
line instead of failing on the first message.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points
from types import MappingProxyType

from twisted.plugin import getPlugins

from mailserver.config import ConfigError, Plugins
from mailserver.hooks import PluginContext, PluginOptionsError
from mailserver.interfaces import IPluginFactory


def available_plugins(paths: tuple[str, ...] = ()) -> dict[str, object]:
    """
    Every plugin factory found in C{mailserver.plugins}, after adding
    C{paths} to the package's search path.
    """
    import mailserver.plugins as package

    for path in reversed(paths):
        if path not in package.__path__:
            package.__path__.insert(0, path)
    return {factory.name: factory for factory in getPlugins(IPluginFactory, package)}


ENTRY_POINT_GROUP = "mailserver.plugins"


def installed_plugins() -> dict[str, EntryPoint]:
    """
    The plugins installed distributions declare, by name, not yet loaded.
    """
    return {entry.name: entry for entry in entry_points(group=ENTRY_POINT_GROUP)}


def _load_entry_point(entry: EntryPoint, source: str):
    try:
        factory = entry.load()
    except Exception as e:
        raise ConfigError(
            source, "plugins.enabled",
            f"plugin {entry.name!r} ({entry.value}) failed to load: {type(e).__name__}: {e}",
        ) from None
    if not IPluginFactory.providedBy(factory):
        raise ConfigError(
            source, "plugins.enabled",
            f"plugin {entry.name!r} ({entry.value}) does not provide IPluginFactory",
        )
    return factory


def load_plugins(
    plugins: Plugins, context: PluginContext, source: str
) -> list[tuple[str, object]]:
    """
    Build the enabled plugins' hook objects, in the configured order; each
    plugin's C{build} gets C{context} with a logger of its own.

    @param plugins: the C{[plugins]} section.
    @param source: the configuration file, for errors.
    """
    found = available_plugins(plugins.paths)
    for name in plugins.options:
        if name not in plugins.enabled:
            raise ConfigError(
                source, f"plugins.{name}", "options for a plugin that is not in plugins.enabled"
            )
    installed = installed_plugins()
    hooks = []
    for name in plugins.enabled:
        factory = found.get(name)
        if factory is None and name in installed:
            factory = _load_entry_point(installed[name], source)
        if factory is None:
            known = ", ".join(sorted({*found, *installed})) or "none"
            raise ConfigError(
                source, "plugins.enabled", f"no plugin named {name!r} (found: {known})"
            )
        options = MappingProxyType(dict(plugins.options.get(name, {})))
        try:
            hook = factory.build(options, context.for_plugin(name))
        except PluginOptionsError as e:
            raise ConfigError(source, f"plugins.{name}.{e.key}", e.problem) from None
        except Exception as e:
            raise ConfigError(source, f"plugins.{name}", f"failed to load: {e}") from None
        hooks.append((name, hook))
    return hooks
