"""The package layout's rules, read from the source (imports in function bodies included).

Layers, top to bottom; a package may import any package of a lower layer, and packages of one
layer may import each other where that makes no cycle:

    cli | monitor, check | alerts, store | estimation | proposals, judges | engines | estimators, core

`estimators` (the statistics) and the core (`tailmon/`: errors, paths, redaction, the plug-in
registry) import nothing of tailmon but themselves and the core. No module imports a tailmon
module inside a function, except the CLI's commands (which keep `tailmon --help` fast). Module
import cycles are refused everywhere, function bodies included.
"""

from __future__ import annotations

import ast
import tomllib
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = [("cli",), ("monitor", "check"), ("alerts", "store"), ("estimation",), ("proposals", "judges"),
          ("engines",), ("estimators", "core")]
LAYER = {pkg: i for i, names in enumerate(LAYERS) for pkg in names}
LAZY_ALLOWED = {"cli"}
# A package may hold at most about a fifth of the product's Python (tests and benchmarks aside).
LARGEST_SHARE = 0.22


def package_dirs() -> dict[str, Path]:
    """tailmon subpackage name ('core' for tailmon itself) -> its folder, from pyproject's mapping."""
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    dirs = {}
    for name, folder in mapping.items():
        parts = name.split(".")
        if parts == ["tailmon"]:
            dirs["core"] = ROOT / folder
        elif len(parts) == 2:
            dirs[parts[1]] = ROOT / folder
    return dirs


def modules() -> dict[str, tuple[str, Path]]:
    """Dotted module name -> (package, file), for every .py file of the product."""
    out = {}
    for pkg, folder in package_dirs().items():
        prefix = "tailmon" if pkg == "core" else f"tailmon.{pkg}"
        for file in sorted(folder.rglob("*.py")):
            rel = file.relative_to(folder).with_suffix("").parts
            if any(part.startswith(".") or part == "__pycache__" for part in rel):
                continue
            if rel[-1] == "__init__":
                rel = rel[:-1]
            out[".".join((prefix, *rel))] = (pkg, file)
    return out


MODULES = modules()


def package_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "tailmon":
        return None
    if len(parts) == 1:
        return "core"
    return parts[1] if parts[1] in LAYER and parts[1] != "core" else "core"


def resolve(name: str) -> str:
    """The longest known module that `name` (a module or `module.attribute`) starts with."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        candidate = ".".join(parts[:i])
        if candidate in MODULES:
            return candidate
    return name


class Imports(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool):
        self.module, self.is_package = module, is_package
        self.found: list[tuple[str, int, bool]] = []  # (imported module, line, inside a function)
        self.depth = 0

    def _function(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def _add(self, name: str, line: int):
        if name == "tailmon" or name.startswith("tailmon."):
            self.found.append((resolve(name), line, self.depth > 0))

    def visit_Import(self, node):
        for alias in node.names:
            self._add(alias.name, node.lineno)

    def visit_ImportFrom(self, node):
        if node.level:
            base = self.module.split(".")
            base = base if self.is_package else base[:-1]
            base = base[: len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        if target == "tailmon" or target.startswith("tailmon."):
            for alias in node.names:  # `from tailmon.x import y` may import the module tailmon.x.y
                self._add(f"{target}.{alias.name}", node.lineno)


def imports() -> dict[str, list[tuple[str, int, bool]]]:
    out = {}
    for module, (_, file) in MODULES.items():
        visitor = Imports(module, file.name == "__init__.py")
        visitor.visit(ast.parse(file.read_text(encoding="utf-8")))
        out[module] = visitor.found
    return out


IMPORTS = imports()


def test_the_walk_sees_the_product():
    # A walk that found nothing would pass every rule below.
    assert {pkg for pkg, _ in MODULES.values()} == set(LAYER)
    assert len(MODULES) > 60
    assert any(m == "tailmon.estimation.pipeline" for m, _, _ in IMPORTS["tailmon.estimation.plan"])


def test_no_upward_import():
    bad = []
    for module, found in IMPORTS.items():
        pkg = MODULES[module][0]
        for target, line, _ in found:
            other = package_of(target)
            if other is None or other == pkg:
                continue
            if pkg in ("estimators", "core"):
                if other != "core":
                    bad.append(f"{module}:{line} imports {target} ({pkg} imports only itself and the core)")
            elif LAYER[other] < LAYER[pkg]:
                bad.append(f"{module}:{line} imports {target} ({other} is above {pkg})")
    assert not bad, "\n".join(bad)


def test_no_package_cycle():
    graph = defaultdict(set)
    for module, found in IMPORTS.items():
        pkg = MODULES[module][0]
        for target, _, _ in found:
            other = package_of(target)
            if other and other != pkg:
                graph[pkg].add(other)
    assert not strongly_connected(graph), strongly_connected(graph)


def test_no_module_cycle():
    graph = defaultdict(set)
    for module, found in IMPORTS.items():
        for target, _, _ in found:
            # a package's __init__ re-exporting its own modules is how packages work, not a cycle
            if target in MODULES and target != module and not target.startswith(module + "."):
                graph[module].add(target)
    cycles = strongly_connected(graph)
    assert not cycles, "\n".join(" <-> ".join(sorted(c)) for c in cycles)


def test_no_tailmon_import_inside_a_function():
    bad = [f"{module}:{line} imports {target} inside a function"
           for module, found in IMPORTS.items() if MODULES[module][0] not in LAZY_ALLOWED
           for target, line, lazy in found if lazy]
    assert not bad, "\n".join(bad)


def test_no_package_holds_more_than_a_fifth_of_the_code():
    lines = defaultdict(int)
    for pkg, file in MODULES.values():
        lines[pkg] += len(file.read_text(encoding="utf-8").splitlines())
    total = sum(lines.values())
    shares = {pkg: n / total for pkg, n in lines.items()}
    assert max(shares.values()) <= LARGEST_SHARE, {p: f"{s:.0%}" for p, s in sorted(shares.items())}


def strongly_connected(graph) -> list[set]:
    """Tarjan's algorithm: the components of more than one node (the cycles)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


@pytest.mark.parametrize("source, expected", [
    ("from tailmon.engines.base import Engine\n", [("tailmon.engines.base", False)]),
    ("def f():\n    from tailmon.judges import parse_judge\n", [("tailmon.judges", True)]),
    ("from tailmon.estimation import pipeline\n", [("tailmon.estimation.pipeline", False)]),
])
def test_the_import_reader(source, expected):
    # The walk itself: a reader that missed function bodies or `from package import module`
    # would let the rules above pass on a tree that breaks them.
    visitor = Imports("tailmon.check.gate", False)
    visitor.visit(ast.parse(source))
    assert [(m, lazy) for m, _, lazy in visitor.found] == expected
