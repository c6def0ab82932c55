"""NNX modules as pure functions of a parameter dict.

Outside a model, parameters are plain nested dicts of arrays (`{'model': {'layers': {'mlp': {'gate_proj':
{'kernel': ...}}}}}`): that is what the optimizer updates, what orbax saves and what the Hugging Face key maps
address. `Functional` holds a module's graph and abstract state, and rebinds a module to any such dict inside jit.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
from flax import nnx
from jax.sharding import Mesh

from skyjax.parallel.rules import DEFAULT_RULES, AxisRules, path_str, tree_shardings


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def flatten_params(params: dict) -> dict[str, Any]:
    """Nested params dict -> {'model/layers/mlp/gate_proj/kernel': array, ...}."""
    return {path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def unflatten_params(flat: dict[str, Any]) -> dict:
    """The inverse of flatten_params."""
    out: dict = {}
    for path, value in flat.items():
        node = out
        parts = path.split("/")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: usable as a static argument of jit
class Functional:
    """The static half of a model: its graph and the shapes, dtypes and logical axes of its parameters."""

    graphdef: Any
    abstract: nnx.State
    make: Callable[[nnx.Rngs], nnx.Module]

    @classmethod
    def create(cls, make: Callable[[nnx.Rngs], nnx.Module]) -> "Functional":
        """`make(rngs)` builds the module; it is only traced here, never run, so no weights are allocated."""
        module = nnx.eval_shape(lambda: make(nnx.Rngs(0)))
        graphdef, abstract = nnx.split(module)
        return cls(graphdef, abstract, make)

    @property
    def shapes(self) -> dict:
        """Nested dict of jax.ShapeDtypeStruct."""
        return nnx.to_pure_dict(self.abstract)

    @property
    def axes(self) -> dict:
        """Nested dict of logical-axes tuples, same structure as `shapes`."""
        return nnx.to_pure_dict(jax.tree.map(lambda v: v.get_metadata()["axes"], self.abstract, is_leaf=_is_var))

    def shardings(self, mesh: Mesh, rules: AxisRules = DEFAULT_RULES) -> dict:
        """NamedShardings for every parameter; a non-dividing dimension raises naming the parameter."""
        return tree_shardings(self.shapes, self.axes, mesh, rules)

    def bind(self, params: dict) -> nnx.Module:
        """A module whose parameters are `params` (works on tracers inside jit and grad)."""
        state = jax.tree.map(lambda v: v, self.abstract, is_leaf=_is_var)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state)

    def init(self, seed: int = 0, mesh: Mesh | None = None, rules: AxisRules = DEFAULT_RULES) -> dict:
        """Random parameters, created directly in their shards on `mesh` (never whole on one device)."""

        def create():
            return nnx.to_pure_dict(nnx.state(self.make(nnx.Rngs(seed))))

        if mesh is None:
            return jax.jit(create)()
        return jax.jit(create, out_shardings=self.shardings(mesh, rules))()

    def num_params(self) -> int:
        return sum(int(x.size) for x in jax.tree.leaves(self.shapes))
