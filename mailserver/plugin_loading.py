"""
Finding plugins with C{twisted.plugin} and building the enabled ones.

Every problem (an unknown name, a bad option, a plugin that fails to build)
is a L{ConfigError}, so a misconfigured plugin stops start-up with one line
instead of failing on the first message.
"""

from __future__ import annotations

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
    hooks = []
    for name in plugins.enabled:
        factory = found.get(name)
        if factory is None:
            known = ", ".join(sorted(found)) or "none"
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
