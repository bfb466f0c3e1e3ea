"""
The README's key reference lists every configuration key.
"""

import dataclasses
from pathlib import Path

from mailserver.config import Config

README = Path(__file__).resolve().parents[2] / "README.md"


def keys(cls, prefix=""):
    for f in dataclasses.fields(cls):
        if f.name == "source" or f.metadata.get("tables_by_name"):
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            yield from keys(type(default), prefix + f.name + ".")
        else:
            yield prefix + f.name


def test_every_key_is_documented():
    text = README.read_text()
    missing = [key for key in keys(Config) if f"| `{key}` |" not in text]
    assert missing == []
