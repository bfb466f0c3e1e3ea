"""
C{docs/architecture.md} matches the tree: every module of the package is
named in it, and every module it names exists.

A module C{pkg/name.py} counts as named when a line that mentions C{pkg/}
also names C{name.py} (or C{pkg/name}); a top-level module when its file
name appears anywhere.  So a room row that lists its modules keeps this test
green, and a module added without a row turns it red.
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "mailserver"
DOC = ROOT / "docs" / "architecture.md"
NAMED_FILE = re.compile(r"[\w/]*\w\.py\b")


def modules() -> list[Path]:
    return sorted(
        path.relative_to(PACKAGE)
        for path in PACKAGE.rglob("*.py")
        if path.name != "__init__.py" and "__pycache__" not in path.parts
    )


def is_named(module: Path, lines: list[str]) -> bool:
    if len(module.parts) == 1:
        return any(module.name in line for line in lines)
    package = "/".join(module.parts[:-1]) + "/"
    dotted = package + module.stem
    return any(
        dotted in line or (package in line and re.search(rf"\b{re.escape(module.name)}\b", line))
        for line in lines
    )


def test_every_module_is_in_the_architecture_document():
    lines = DOC.read_text(encoding="utf-8").splitlines()
    missing = [str(module) for module in modules() if not is_named(module, lines)]
    assert missing == [], (
        "modules docs/architecture.md does not name (add them to their room's row "
        f"or to 'Where things go'): {missing}"
    )


def test_every_file_the_document_names_exists():
    known = {path.name for path in ROOT.rglob("*.py") if ".venv" not in path.parts}
    named = set(NAMED_FILE.findall(DOC.read_text(encoding="utf-8")))
    gone = sorted(name for name in named if name.rsplit("/", 1)[-1] not in known)
    assert gone == [], f"docs/architecture.md names files that do not exist: {gone}"
