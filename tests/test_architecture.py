"""The library's shape, measured from its own imports: layers a reader can see, no import
cycles, a shallow import graph, short modules, and imports at the top of modules.

Run ``python tests/test_architecture.py`` to print the figures (layers, levels, cycles, upward
imports, the longest modules, deferred imports) without pytest.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from functools import lru_cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ema_utils"
LAYERS = ("core", "methods", "chapters", "build", "cli")
"""From the bottom up; a module may import its own layer and the ones below."""
MAX_LEVELS = 8
MAX_UPWARD = 2
MAX_LINES = 800
DEFERRED = "# deferred:"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(name: str) -> str | None:
    """core / methods / chapters / build from the subpackage; cli.py is the top; the package's
    own __init__ belongs to no layer (it holds constants and imports nothing)."""
    parts = name.split(".")
    if len(parts) > 1 and parts[1] in LAYERS:
        return parts[1]
    return "cli" if parts[-1] == "cli" else None


def _targets(name: str, path: Path, node, known: dict) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in known]
    if node.level:
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        package = package[:len(package) - (node.level - 1)]
        base = ".".join(package + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    if not base.startswith("ema_utils"):
        return []
    out = []
    for alias in node.names:
        full = f"{base}.{alias.name}"
        out.append(full if full in known else base)
    return [t for t in out if t in known]


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, int, str]]]:
    """(module -> the package modules it imports, anywhere), and every import inside a function
    as (module, line, text) with whether the line above says why it is deferred."""
    known = modules()
    edges: dict[str, set[str]] = defaultdict(set)
    inner = []
    for name, path in known.items():
        source = path.read_text()
        lines = source.splitlines()
        tree = ast.parse(source)
        top = {id(n) for n in tree.body}
        top |= {id(n) for stmt in tree.body if isinstance(stmt, (ast.If, ast.Try))
                for n in ast.walk(stmt)}  # `if TYPE_CHECKING:` / try-import blocks count as top
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _targets(name, path, node, known):
                    if target != name:
                        edges[name].add(target)
                if id(node) not in top:
                    # the reason sits on the line above, or above a block of deferred imports
                    row = node.lineno - 2
                    while row >= 0 and lines[row].strip().startswith(("import ", "from ")):
                        row -= 1
                    above = lines[row].strip() if row >= 0 else ""
                    inner.append((name, node.lineno, lines[node.lineno - 1].strip(),
                                  above.startswith(DEFERRED)))
        edges.setdefault(name, set())
    return edges, inner


def cycles(edges) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in list(edges):
        if v not in index:
            visit(v)
    return out


def levels(edges) -> dict[str, int]:
    """1 for a module that imports no package module, else 1 + the highest level it imports
    (the graph must be acyclic)."""
    @lru_cache(maxsize=None)
    def level(v):
        return 1 + max((level(w) for w in edges[v]), default=0)

    return {v: level(v) for v in edges}


def upward_imports(edges) -> list[tuple[str, str]]:
    rank = {name: i for i, name in enumerate(LAYERS)}
    return sorted((a, b) for a, targets in edges.items() for b in targets
                  if layer(a) in rank and layer(b) in rank and rank[layer(b)] > rank[layer(a)])


# --- the tests ----------------------------------------------------------------------------------

def test_every_module_sits_in_a_layer():
    loose = [m for m in modules() if layer(m) is None and m not in ("ema_utils",)
             and not m.endswith(tuple(f".{name}" for name in LAYERS[:-1]))]
    assert not loose, f"modules outside core/methods/chapters/build/cli: {loose}"


def test_no_import_cycles():
    edges, _ = import_graph()
    assert cycles(edges) == []


def test_the_import_graph_is_shallow():
    edges, _ = import_graph()
    depth = levels(edges)
    deepest = max(depth, key=depth.get)
    assert depth[deepest] <= MAX_LEVELS, f"{deepest} sits {depth[deepest]} levels high"


def test_imports_go_down_the_layers():
    edges, _ = import_graph()
    up = upward_imports(edges)
    assert len(up) <= MAX_UPWARD, f"upward imports: {up}"


def test_no_module_over_800_lines():
    long = {m: n for m, p in modules().items()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_imports_inside_functions_say_why():
    _, inner = import_graph()
    unexplained = [f"{m}:{line}: {text}" for m, line, text, why in inner if not why]
    assert not unexplained, ("imports inside functions without a '# deferred: <why>' comment "
                             "on the line above:\n" + "\n".join(unexplained))


def test_the_command_line_loads_without_torch():
    # `ema --help` and every parameter error must stay fast: building the parser (which imports
    # each module that adds a subcommand) must not import torch
    import subprocess

    code = ("import sys, ema_utils.cli as c; c.build_parser(); "
            "sys.exit(3 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0, "the CLI imports torch"


def test_the_measure_sees_a_cycle_and_a_deep_chain():
    # the helpers themselves: a cycle is found, levels count a chain
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert cycles(edges) == [["a", "b", "c"]]
    assert levels({"a": {"b"}, "b": {"c"}, "c": set()}) == {"a": 3, "b": 2, "c": 1}


if __name__ == "__main__":
    edges, inner = import_graph()
    depth = levels(edges) if not cycles(edges) else {}
    print(f"modules: {len(edges)}; cycles: {cycles(edges)}; levels: {max(depth.values(), default='-')}")
    for name in LAYERS:
        members = sorted(m.removeprefix(f"ema_utils.{name}.") for m in edges
                         if layer(m) == name and (name == "cli" or m != f"ema_utils.{name}"))
        print(f"  {name:9} {', '.join(members)}")
    print(f"upward imports: {upward_imports(edges)}")
    print(f"imports inside functions: {len(inner)} ({sum(not w for *_, w in inner)} without a reason)")
    sizes = sorted(((len(p.read_text().splitlines()), m) for m, p in modules().items()), reverse=True)
    print("longest modules: " + ", ".join(f"{m} {n}" for n, m in sizes[:5]))
