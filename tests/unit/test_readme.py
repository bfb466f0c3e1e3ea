"""
The README's key reference and the configuration model agree both ways:
every key is documented with its default, and every documented key exists.
"""

import re
from pathlib import Path

from mailserver.config import file_keys

README = Path(__file__).resolve().parents[2] / "README.md"
ROW = re.compile(r"^\| `([^`]+)` \|(.*?)\|.*\|$")


def reference() -> dict[str, str]:
    """
    The key reference table: key to its default column.
    """
    text = README.read_text()
    table = text[text.index("### Key reference"):]
    table = table[: table.index("\n\n", table.index("| --- |"))]
    rows = {}
    for line in table.splitlines():
        match = ROW.match(line)
        if match:
            rows[match.group(1)] = match.group(2).strip()
    return rows


def toml(value: object) -> str:
    """
    A default as the README writes it: TOML.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml(v) for v in value) + "]"
    return repr(value)


def test_every_key_is_documented_with_its_default():
    rows = reference()
    problems = []
    for key, setting in file_keys():
        expected = setting.shown or f"`{toml(setting.default)}`"
        if key not in rows:
            problems.append(f"{key}: not in the README")
        elif not rows[key].startswith(expected):
            problems.append(f"{key}: the README says {rows[key]!r}, the default is {expected}")
    assert problems == []


def test_every_documented_key_exists():
    known = {key for key, _ in file_keys()}
    documented = set(reference()) - {"plugins.NAME"}
    assert sorted(documented - known) == []
    assert "plugins.NAME" in reference()  # the table was read to its last row
