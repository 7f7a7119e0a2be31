"""The package's layout: no import cycle between its modules, and no top-level module outside the layout."""

from __future__ import annotations

import ast
from pathlib import Path

import rewardforge

ROOT = Path(rewardforge.__file__).parent


def _module_name(path: Path) -> str:
    parts = ["rewardforge", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the rewardforge modules it imports, at module level or inside functions (a lazy import
    still runs; a cycle through one is a cycle). ``from pkg import name`` counts ``pkg.name`` when that is
    a module, else ``pkg``. A module's own parent packages are left out: Python imports them before it
    whatever it says (``from rewardforge import __version__`` is not a choice of dependency)."""
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("rewardforge"):
                subs = {f"{node.module}.{a.name}" for a in node.names} & set(modules)
                edges |= subs or ({node.module} & set(modules))
        parents = {".".join(name.split(".")[:k]) for k in range(1, name.count(".") + 1)}
        graph[name] = edges - {name} - parents
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (as a path that ends where it starts), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_find_cycle_finds_a_cycle_and_accepts_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 40 and "rewardforge.train" in graph and "rewardforge.registry" in graph["rewardforge.train"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# The top level: the recipe and its core (ARCHITECTURE.md says why each is here); everything else lives in a wing.
TOP_LEVEL = {"__init__", "__main__", "cli", "config", "errors", "train", "registry", "losses", "scoring",
             "ensemble",  # the wrapper registry.resolve() puts around any type: core, beside registry and losses
             "client"}  # client: the public `rewardforge.client` path of serve/client.py
WINGS = {"data", "models", "training", "export", "eval", "serve", "integrations"}


def test_no_top_level_module_outside_the_layout():
    modules = {p.stem for p in ROOT.glob("*.py")}
    packages = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert modules == TOP_LEVEL, f"top-level modules outside the layout: {sorted(modules - TOP_LEVEL)}; missing: {sorted(TOP_LEVEL - modules)}"
    assert packages == WINGS, f"packages outside the layout: {sorted(packages - WINGS)}"


def test_lower_wings_do_not_import_upward():
    """data/, models/ and training/ never import the recipe, the registry, serving, export or evaluation
    (except eval.metrics, the numpy formulas): ARCHITECTURE.md's rule."""
    upward = ("rewardforge.train", "rewardforge.registry", "rewardforge.serve", "rewardforge.export", "rewardforge.eval",
              "rewardforge.scoring", "rewardforge.cli")
    bad = [f"{m} -> {n}" for m, deps in import_graph().items()
           if m.split(".")[1:2] and m.split(".")[1] in ("data", "models", "training")
           for n in deps if any(n == u or n.startswith(u + ".") for u in upward) and n != "rewardforge.eval.metrics"]
    assert not bad, bad
