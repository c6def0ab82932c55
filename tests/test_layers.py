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
    "data": (["skyjax.data"], ["skyjax.data"]),
    "models": (["skyjax.models"], ["skyjax.models", "skyjax.nn", "skyjax.data", "skyjax.parallel", "skyjax.config"]),
    "parallel": (["skyjax.parallel"], ["skyjax.parallel", "skyjax.config"]),
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
