"""Import layers (docs/architecture.md): imports point one way. Read from the source with `ast`, so an import inside a
function counts as much as one at the top of a file."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "skyjax"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def skyjax_imports(path: Path) -> set[str]:
    """Every skyjax module `path` imports, at any depth of the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("skyjax"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("skyjax"):
            found.add(node.module)
    return found


MODULES = {module_name(p): skyjax_imports(p) for p in sorted(ROOT.rglob("*.py"))}


def within(name: str, packages) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


# the modules a rule covers -> the skyjax packages they may import (skyjax.rl is checked by the test below: it may
# use sampling, evaluation and models, never the trainer)
LAYERS = {
    "nn": (["skyjax.nn"], ["skyjax.nn", "skyjax.parallel"]),
    # skyjax.errors (the user-error base classes) imports nothing: every layer may raise them
    "data": (["skyjax.data"], ["skyjax.data", "skyjax.errors"]),
    "models": (["skyjax.models"], ["skyjax.models", "skyjax.nn", "skyjax.data", "skyjax.parallel", "skyjax.config",
                                   "skyjax.errors"]),
    "parallel": (["skyjax.parallel"], ["skyjax.parallel", "skyjax.config", "skyjax.errors"]),
    # post-training losses: pure functions of arrays
    "losses": (["skyjax.train.losses"], ["skyjax.train.losses"]),
    "verifiers": (["skyjax.eval.verifiers"], []),
}
EXEMPT = {
    # the `skyjax aot` command's built-in causal-LM kind needs a model; it imports it inside the command only
    "skyjax.parallel.cli",
}


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_imports_point_one_way(layer):
    covered, allowed = LAYERS[layer]
    bad = {}
    for name, imports in MODULES.items():
        if not within(name, covered) or name in EXEMPT:
            continue
        wrong = sorted(i for i in imports if not within(i, allowed))
        if wrong:
            bad[name] = wrong
    assert not bad, f"{layer}: imports outside {allowed}: {bad}"


def test_models_never_import_convert_or_train_and_post_training_never_imports_the_trainer():
    """The two rules stated for users (docs/architecture.md), spelled out so that a relaxed table above cannot
    hide them."""
    for name, imports in MODULES.items():
        if within(name, ["skyjax.models"]):
            assert not any(within(i, ["skyjax.convert", "skyjax.train"]) for i in imports), (name, imports)
        if within(name, ["skyjax.rl", "skyjax.train.losses", "skyjax.eval.verifiers"]):
            assert not any(within(i, ["skyjax.train"]) and not within(i, ["skyjax.train.losses"])
                           for i in imports), (name, imports)


def test_the_walker_sees_function_level_imports(tmp_path):
    """The check would be empty if nested imports were missed: a file with only a function-level import."""
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from skyjax.train.trainer import Trainer\n    import skyjax.convert.keymap\n")
    assert skyjax_imports(f) == {"skyjax.train.trainer", "skyjax.convert.keymap"}


def imported_modules(path: Path) -> set[str]:
    """The skyjax modules `path` imports, at any depth of the file (a function-level import counts: it still runs the
    other module, and a cycle that only a lazy import breaks is still a cycle), `from pkg import sub` resolved to
    the submodule `pkg.sub` when there is one."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in MODULES)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module in MODULES:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
    return found


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (or a module importing itself), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(v):  # Tarjan; the graph is a few hundred modules, well within the recursion limit
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
            if len(component) > 1 or v in graph.get(v, ()):
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(cycles)


def test_no_import_cycles_among_skyjax_modules():
    """No two skyjax modules import each other, directly or through others, counting imports at any depth of a file
    (module level, inside functions, under TYPE_CHECKING): one module's dependencies never lead back to it."""
    graph = {module_name(p): imported_modules(p) for p in sorted(ROOT.rglob("*.py"))}
    assert len(graph) > 80 and sum(map(len, graph.values())) > 200  # the walker sees the package
    assert import_cycles(graph) == []


def test_the_cycle_finder_finds_cycles():
    """Without this, an empty answer could mean a finder that never reports anything."""
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"a"}, "b": set()}) == [["a"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []
