"""The layers contract: imports flow one way between the stage packages.

Every import statement of the package is read, those inside functions included, and
resolved to the unit it names (a top-level module or stage package of ``nas_grouping``,
or ``search_spaces``). The contract: no cycle between units; the core never imports the
CLI, the benchmarks or the integrations; no module imports another unit's private names
or private modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("nas_grouping", "search_spaces")
#: the units above the core: nothing in the core may import them
TOP = {"nas_grouping.cli", "nas_grouping.bench", "nas_grouping.integrations"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    base = ROOT.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _unit(name: str) -> str:
    """A stage package or top-level module of nas_grouping; a module of search_spaces (one space, one unit)."""
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else parts[0]


def _owner(name: str) -> str:
    """The package whose private names a module may use: its stage package of nas_grouping, or search_spaces."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "nas_grouping" and len(parts) > 1 else parts[0]


def _imports() -> list[tuple[str, str, str | None]]:
    """(importing module, imported module, imported name or None) for every import of the two packages."""
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            module = _module_name(path)
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    found += [(module, a.name, None) for a in node.names if a.name.split(".")[0] in PACKAGES]
                elif isinstance(node, ast.ImportFrom):
                    if node.level:
                        base = module.split(".")[: len(module.split(".")) - node.level + (path.name == "__init__.py")]
                        target = ".".join(base + ([node.module] if node.module else []))
                    else:
                        target = node.module or ""
                    if target.split(".")[0] not in PACKAGES:
                        continue
                    for a in node.names:
                        sub = f"{target}.{a.name}"
                        found.append((module, sub, None) if _is_module(sub) else (module, target, a.name))
    return found


IMPORTS = _imports()


def _unit_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for importer, imported, _ in IMPORTS:
        a, b = _unit(importer), _unit(imported)
        if a != b and b != "nas_grouping":
            graph.setdefault(a, set()).add(b)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one unit (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_reader_sees_every_import():
    pairs = {(a, b) for a, b, _ in IMPORTS}
    assert ("nas_grouping.cli", "nas_grouping.search") in pairs or any(
        a == "nas_grouping.cli" and b.startswith("nas_grouping.search") for a, b in pairs)
    assert len(IMPORTS) > 300


def test_no_import_cycle_between_units():
    assert _cycles(_unit_graph()) == []


@pytest.mark.parametrize("top", sorted(TOP))
def test_the_core_never_imports_the_cli_benchmarks_or_integrations(top):
    offenders = sorted({f"{a} -> {b}" for a, b, _ in IMPORTS
                        if _unit(b) == top and _unit(a) not in TOP and not a.startswith("search_spaces")})
    assert offenders == []


def test_no_module_imports_the_package_facade():
    """``nas_grouping/__init__`` re-exports the public API; a module that imported it would import everything."""
    assert sorted({a for a, b, _ in IMPORTS if b == "nas_grouping" and a != "nas_grouping"}) == []


def test_only_the_cli_imports_the_cli():
    assert sorted({a for a, b, _ in IMPORTS if _unit(b) == "nas_grouping.cli" and _unit(a) != "nas_grouping.cli"}) \
        == []


def test_no_unit_imports_another_units_private_names():
    offenders = []
    for importer, imported, name in IMPORTS:
        if _owner(importer) == _owner(imported):
            continue
        private_module = any(part.startswith("_") and part != "__init__" for part in imported.split("."))
        if private_module or (name or "").startswith("_"):
            offenders.append(f"{importer}: {imported}{'.' + name if name else ''}")
    assert offenders == []


def test_no_private_module_at_the_top_of_the_package():
    assert sorted(p.name for p in (ROOT / "nas_grouping").glob("_*.py") if p.name != "__init__.py") == []


def test_the_contract_catches_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
