"""
What C{docs/plugins.md} tells a plugin author, read out of the markdown, so
the tests built on it break when the page and the code drift apart.
"""

from __future__ import annotations

import ast
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "plugins.md"


def text() -> str:
    return DOC.read_text()


def section(title: str) -> str:
    """
    The body of the C{## title} section.
    """
    match = re.search(rf"(?ms)^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text())
    assert match, f"docs/plugins.md has no section '## {title}'"
    return match.group(1)


def code_block(title: str, language: str) -> str:
    match = re.search(rf"(?ms)^```{language}\n(.*?)^```", section(title))
    assert match, f"no ```{language} block in '## {title}'"
    return match.group(1)


def hook_table() -> dict[str, dict[str, tuple[str, ...]]]:
    """
    The hook table: interface name -> {method name: parameter names}.
    """
    hooks: dict[str, dict[str, tuple[str, ...]]] = {}
    interface = None
    for line in section("The five hooks").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) < 2 or not cells[1].startswith("`"):
            continue
        if cells[0]:
            interface = cells[0].strip("`")
        signature = re.fullmatch(r"`(\w+)\(([^)]*)\)`", cells[1])
        assert interface and signature, f"unreadable hook table row: {line}"
        params = tuple(p.strip() for p in signature.group(2).split(",") if p.strip())
        hooks.setdefault(interface, {})[signature.group(1)] = params
    return hooks


@dataclass
class Outline:
    """
    One class of the outline under "What the hooks are given".
    """

    fields: list[str] = field(default_factory=list)
    # method name -> [(parameter, default source or None)], without self
    methods: dict[str, list[tuple[str, str | None]]] = field(default_factory=dict)


def value_outline() -> dict[str, Outline]:
    tree = ast.parse(code_block("What the hooks are given", "python"))
    outline = {}
    for node in tree.body:
        assert isinstance(node, ast.ClassDef), ast.dump(node)
        entry = outline[node.name] = Outline()
        for item in node.body:
            if isinstance(item, ast.AnnAssign):
                entry.fields.append(item.target.id)
            elif isinstance(item, ast.FunctionDef):
                args = item.args.args[1:]
                defaults = [None] * (len(args) - len(item.args.defaults)) + [
                    ast.unparse(d) for d in item.args.defaults
                ]
                entry.methods[item.name] = [(a.arg, d) for a, d in zip(args, defaults)]
    return outline


def value_examples() -> list[str]:
    """
    The C{Reject(...)} and C{Rewrite(...)} expressions with literal
    arguments quoted in the text.
    """
    return re.findall(r"`((?:Reject|Rewrite)\((?:\d|\")[^`]*\))`", text())


def example_plugin() -> Path:
    """
    The example plugin file the page tells the reader to copy.
    """
    match = re.search(r"(?m)^cp (docs/examples/\S+\.py) ", section("A complete example"))
    assert match, "no 'cp docs/examples/...' in '## A complete example'"
    return REPO / match.group(1)


def example_config() -> dict:
    return tomllib.loads(code_block("A complete example", "toml"))
