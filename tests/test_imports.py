"""The package's import graph, read with `ast` (issue 23): no circle among auxnb's modules, and the
methods never import the Trainer (a method is driven by the Trainer, never the other way round).

Every import counts, at module level or inside a function: a late import hides a circle from the
interpreter, not from a reader."""

from __future__ import annotations

import ast
from pathlib import Path

import auxnb

ROOT = Path(auxnb.__file__).parent


def modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The auxnb modules `name` imports (``from . import x`` of a submodule counts as that submodule)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            targets = [target] + [f"{target}.{a.name}" for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_hand_made_circle_and_nothing_in_a_tree():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_the_import_reader_resolves_relative_imports_by_hand():
    edges = graph()
    assert "auxnb.results" in edges["auxnb.train"]  # from .results import RunResult
    assert "auxnb.methods.base" in edges["auxnb.selection"]  # from .methods.base import Method


def test_no_circle_among_the_packages_modules():
    assert cycles(graph()) == []


def test_no_method_imports_the_trainer():
    edges = graph()
    offenders = sorted(m for m, deps in edges.items() if m.startswith("auxnb.methods") and "auxnb.train" in deps)
    assert offenders == []


def test_the_trainers_step_loop_reads_in_one_screen():
    """Issue 23: a run (`Trainer._fit` and its step loop `_steps`) reads in one screen, at most 80 lines
    together; its concerns are named rooms."""
    import inspect

    from auxnb.train import Trainer

    run, loop = inspect.getsource(Trainer._fit), inspect.getsource(Trainer._steps)
    assert len(run.splitlines()) + len(loop.splitlines()) <= 80, (len(run.splitlines()), len(loop.splitlines()))
    for room in ("_start", "_steps", "_finish"):
        assert room in run, room
    for room in ("lower_update", "_upper", "_evaluate"):
        assert room in loop, room
