"""
The test suite's layout, for every folder below:

  - C{unit/}: one module's logic, no connection;
  - C{protocol/}: one session over a C{StringTransport} (or a loopback
    socket) with a fake clock;
  - C{e2e/}: the real C{twistd} on OS-chosen loopback ports.

Fakes come from L{mailserver.testing} (the same ones plugin authors use);
helpers shared between folders are imported by their package path from the
repository root (C{tests.dns_zone}, C{tests.flaky_peer}), which
pytest puts on the import path (C{pythonpath} in C{pyproject.toml}): no test
changes C{sys.path}.  Each test is marked with its folder's name, so
C{-m "not e2e"} runs the fast part.
"""

from pathlib import Path

import pytest

_FOLDERS = ("unit", "protocol", "e2e")


def pytest_collection_modifyitems(items):
    for item in items:
        folder = Path(str(item.fspath)).parent.name
        if folder in _FOLDERS:
            item.add_marker(getattr(pytest.mark, folder))
