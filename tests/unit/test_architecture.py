"""
Import directions between the server's modules, read from the source with
C{ast}: no import cycles, and the rooms import each other only as the table
below says.

Every import counts, wherever it is written: at the top, inside a function
(a lazy import still ties the two modules together) or under
C{if TYPE_CHECKING:} (a type-only import is still a dependency of the
design).  The rules hold along chains of imports, so a room cannot reach a
forbidden one through a third; a failure prints the chain, file and line of
each step.
"""

from __future__ import annotations

import ast
from collections import deque
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "mailserver"

# The rooms, as module paths under mailserver/: "smtp" is the package and
# everything in it, "relay.queue" one module.  Derived from the tree as it
# stands; a room not in the tree yet is listed in PLANNED.
PROTOCOLS = ("smtp", "pop3", "imap", "web", "relay.client")
STORAGE = ("maildir", "folders", "relay.queue", "group_commit", "safe_fs", "stale_tmp", "nodes")
VOCABULARY = ("interfaces", "envelope", "metrics", "names", "mailbox_names", "safe_text",
              "message_ids", "logs", "text_log")
# wire.reply: the Reject a plugin returns; safe_text: client text in a log
# line (the hook runner's refusal line, a plugin's own).
PLUGIN_API = ("hooks", "interfaces", "envelope", "wire.reply", "safe_text")
LIMITS = ("login_throttle", "connection_limits", "memory_budget")
DEFENCES = (*PLUGIN_API, "config", "names", "mailauth.dns", "login_throttle", "safe_fs")
COMPOSITION = (
    "service", "tap", "cli", "workers", "worker_link", "plugin_loading",
    "listeners", "lifecycle", "process", "startup", "ownership",
)
PLANNED: set[str] = set()

# (rooms, "never" or "only", rooms, why): what the first rooms may reach.
RULES = [
    (STORAGE, "never", PROTOCOLS, "a store serves every protocol and knows none"),
    (("config",), "only", ("names",), "every room reads the configuration; it reads no room"),
    (("wire",), "never", PROTOCOLS + STORAGE, "the shared wire codecs know no protocol or store"),
    *(
        ((protocol,), "never", tuple(p for p in PROTOCOLS if p != protocol),
         "a protocol knows no other protocol")
        for protocol in PROTOCOLS
    ),
    (PROTOCOLS, "never", STORAGE, "a protocol reaches the stores through mailserver.interfaces"),
    (LIMITS, "never", PROTOCOLS + STORAGE, "the limits every protocol shares know none of them"),
    (VOCABULARY, "only", (), "the shared vocabulary depends on nothing"),
    (("plugins",), "only", PLUGIN_API, "a built-in plugin uses only what any plugin can"),
    (("defences",), "only", DEFENCES,
     "the defences work through the plugin hooks, their DNS and their own store, not a protocol"),
    (("*",), "never", COMPOSITION, "only the composition root wires rooms together"),
]

# Imports that break the rules today, each to be removed by the work named;
# the lead empties these lists.  An entry that no longer exists fails the
# test, so the lists only shrink.
KNOWN_CYCLES: list[set[str]] = []
KNOWN_IMPORTS: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / PACKAGE).rglob("*.py"))}


def short(module: str) -> str:
    return module.removeprefix(PACKAGE + ".")


def _imported(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """
    The modules of ours that C{node} (in C{module}) imports.
    """
    known = modules()
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            base = module.split(".")
            if not modules()[module].name == "__init__.py":
                base.pop()
            base = base[: len(base) - node.level + 1]
            origin = ".".join(base + ([node.module] if node.module else []))
        else:
            origin = node.module or ""
        # "from a import b": the module a.b when there is one, else a.
        names = [f"{origin}.{a.name}" if f"{origin}.{a.name}" in known else origin for a in node.names]
    found = []
    for name in names:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name != module:
            found.append(name)
    return found


@cache
def imports() -> dict[str, dict[str, int]]:
    """
    module -> {module it imports: line of the first such import}.
    """
    return {module: edges(module, path.read_text(), str(path)) for module, path in modules().items()}


def edges(module: str, source: str, filename: str = "<source>") -> dict[str, int]:
    """
    The modules of ours that C{source}, read as C{module}, imports: {module:
    line of the first such import}.
    """
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for target in _imported(module, node):
                found.setdefault(target, node.lineno)
    return found


def step(source: str, target: str) -> str:
    path = modules()[source].relative_to(ROOT)
    return f"  {path}:{imports()[source][target]} imports {target}"


def chain(path: list[str]) -> str:
    return "\n".join(step(a, b) for a, b in zip(path, path[1:]))


def in_room(module: str, room: str) -> bool:
    name = short(module)
    return name == room or name.startswith(room + ".")


def room_of(module: str, rooms: tuple[str, ...]) -> str | None:
    matching = [room for room in rooms if in_room(module, room)]
    return max(matching, key=len) if matching else None


def without_known(graph: dict[str, dict[str, int]]) -> dict[str, set[str]]:
    known = {(f"{PACKAGE}.{a}", f"{PACKAGE}.{b}") for a, b in KNOWN_IMPORTS}
    return {m: {t for t in targets if (m, t) not in known} for m, targets in graph.items()}


def reach(graph: dict[str, set[str]], start: str) -> dict[str, str | None]:
    """
    Every module reachable from C{start}, each with the module it was
    first reached from (breadth first, so the chains are shortest).
    """
    parents: dict[str, str | None] = {start: None}
    queue = deque([start])
    while queue:
        module = queue.popleft()
        for target in sorted(graph[module]):
            if target not in parents:
                parents[target] = module
                queue.append(target)
    return parents


def path_to(parents: dict[str, str | None], end: str) -> list[str]:
    path = [end]
    while parents[path[-1]] is not None:
        path.append(parents[path[-1]])
    return path[::-1]


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """
    The strongly connected components of more than one module (Tarjan).
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in graph[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = set()
            while True:
                member = stack.pop()
                component.add(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(component)

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def cycle_chain(graph: dict[str, set[str]], component: set[str]) -> str:
    start = min(component)
    inside = {m: graph[m] & component for m in component}
    parents = reach({m: inside[m] - {start} for m in component}, start)
    back = min(m for m in parents if start in inside[m])
    return chain(path_to(parents, back) + [start])


def test_no_import_cycles():
    graph = {m: set(targets) for m, targets in imports().items()}
    known = [{f"{PACKAGE}.{m}" for m in cycle} for cycle in KNOWN_CYCLES]
    found = cycles(graph)
    problems = [
        "import cycle:\n" + cycle_chain(graph, component)
        for component in found
        if component not in known
    ]
    problems += [
        f"the known cycle {sorted(map(short, cycle))} is gone: remove it from KNOWN_CYCLES"
        for cycle in known
        if cycle not in found
    ]
    assert not problems, "\n".join(problems)


def test_rooms_import_only_in_the_allowed_directions():
    graph = without_known(imports())
    problems = []
    for sources, kind, targets, why in RULES:
        for module in sorted(graph):
            own = room_of(module, sources) if sources != ("*",) else None
            if own is None and (sources != ("*",) or room_of(module, targets)):
                continue
            parents = reach(graph, module)
            for reached in parents:
                if reached == module or (own and in_room(reached, own)):
                    continue
                allowed = room_of(reached, targets) is not None
                if allowed != (kind == "only"):
                    problems.append(
                        f"{short(module)} reaches {short(reached)}, but {why}:\n"
                        + chain(path_to(parents, reached))
                    )
    assert not problems, "\n".join(problems)


def test_the_known_exceptions_still_exist():
    graph = imports()
    stale = [
        f"{a} -> {b}"
        for a, b in sorted(KNOWN_IMPORTS)
        if f"{PACKAGE}.{b}" not in graph.get(f"{PACKAGE}.{a}", {})
    ]
    assert not stale, f"these imports are gone: remove them from KNOWN_IMPORTS: {stale}"


def test_the_rooms_of_the_table_are_in_the_tree():
    named = {room for sources, _, targets, _ in RULES for room in sources + targets} - {"*"}
    present = {room for room in named if any(in_room(m, room) for m in modules())}
    assert named - present == PLANNED - present, "a room of the table is not in the tree"
    assert not PLANNED & present, f"now in the tree, no longer planned: {PLANNED & present}"


def test_the_reader_resolves_imports():
    """
    The graph is right where it is easy to check: a relative import, a
    lazy one, a type-only one and a package's re-export.  No module of the
    tree has a type-only import now, so that one is read from a snippet.
    """
    type_only = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .factory import SMTPFactory\n"
    assert edges(f"{PACKAGE}.smtp.protocol", type_only) == {f"{PACKAGE}.smtp.factory": 3}
    graph = imports()
    assert f"{PACKAGE}.service" in graph[f"{PACKAGE}.tap"]  # inside a function
    assert f"{PACKAGE}.relay.client" in graph[f"{PACKAGE}.relay.delivery"]  # from pkg import module
    assert set(graph[f"{PACKAGE}.web"]) == {f"{PACKAGE}.web.admin"}
