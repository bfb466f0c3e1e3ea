"""
The C{twisted.plugin} dropin package for mailserver plugins.

Built-in plugins live here; third parties add theirs by shipping a
C{mailserver/plugins/NAME.py} on the Python path (no C{__init__.py} in their
C{mailserver/plugins/}), or by naming a folder in C{plugins.paths}.
"""

from twisted.plugin import pluginPackagePaths

__path__.extend(pluginPackagePaths(__name__))  # type: ignore[name-defined]  # noqa: F821
__all__: list[str] = []
