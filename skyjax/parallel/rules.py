"""Logical axis names -> mesh axes: the one table that decides how everything is sharded.

Parameters and activations carry logical names ('batch', 'embed', 'heads', ...). `DEFAULT_RULES` maps each name to
zero or more mesh axes. Changing the parallelism is changing this table (or the config's `sharding.rules`), never a
model file.

Two conventions keep the table short:
- A mesh axis is used at most once per array: when two logical axes of one array map to the same mesh axis, the
  first one keeps it (an activation ('batch', 'seq', 'embed') is sharded over data+fsdp on the batch and
  replicated on embed, while the weight ('embed', 'mlp') is sharded over fsdp on embed).
- A parameter dimension that does not divide its mesh axes is an error naming the parameter, its shape and the axis.
  An activation constraint on a dimension that does not divide falls back to replicating that dimension.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from skyjax.errors import UserError

AxisRules = Mapping[str, tuple[str, ...]]

DEFAULT_RULES: dict[str, tuple[str, ...]] = {
    # activations
    "batch": ("slice", "data", "fsdp"),
    "seq": (),
    "kv_seq": (),
    "patches": ("data", "fsdp"),  # the packed patches of a batch: queries split over the data axes
    # parameters (and activation feature axes)
    "embed": ("fsdp",),
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),
    "layers": (),
    # vision tower
    "vision_embed": ("fsdp",),
    "vision_heads": ("tensor",),
    "vision_mlp": ("tensor",),
    "patch_in": (),
    "merger_in": ("fsdp",),
    "norm": (),
    "scalar": (),
}


class ShardingError(UserError, ValueError):
    """A dimension does not divide its mesh axes, or a logical name has no rule."""


def _rule(rules: AxisRules, name: str | None) -> tuple[str, ...]:
    if name is None:
        return ()
    if name not in rules:
        raise ShardingError(f"logical axis {name!r} has no sharding rule (known: {', '.join(sorted(rules))})")
    return tuple(rules[name])


def logical_to_spec(
    axes: Sequence[str | None],
    mesh: Mesh,
    rules: AxisRules = DEFAULT_RULES,
    shape: Sequence[int] | None = None,
    name: str = "array",
    strict: bool = True,
) -> P:
    """The PartitionSpec of an array whose dimensions have the logical names `axes`.

    With `shape`, each dimension is checked against the product of its mesh axes' sizes: `strict` raises a
    ShardingError naming `name`, the shape and the axis; otherwise that dimension is replicated.
    """
    if shape is not None and len(shape) != len(axes):
        raise ShardingError(f"{name}: shape {tuple(shape)} has {len(shape)} dims but logical axes {tuple(axes)}")
    used: set[str] = set()
    spec = []
    for dim, logical in enumerate(axes):
        mesh_axes = [a for a in _rule(rules, logical) if a in mesh.shape and a not in used]
        size = math.prod(mesh.shape[a] for a in mesh_axes)
        if shape is not None and size > 1 and shape[dim] % size:
            if strict:
                raise ShardingError(
                    f"{name}: dimension {dim} ('{logical}') of shape {tuple(shape)} is {shape[dim]}, which does not "
                    f"divide mesh axes {tuple(mesh_axes)} of size {size} (mesh {dict(mesh.shape)}); change the mesh "
                    f"shape or the sharding rule for '{logical}'"
                )
            mesh_axes = []
        used.update(mesh_axes)
        mesh_axes = [a for a in mesh_axes if mesh.shape[a] > 1]  # size-1 axes shard nothing
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else tuple(mesh_axes))
    return P(*spec)


def tree_shardings(
    shapes: Any, axes: Any, mesh: Mesh, rules: AxisRules = DEFAULT_RULES, strict: bool = True
) -> Any:
    """NamedShardings for a tree of arrays / ShapeDtypeStructs, given a tree of logical axes of the same structure.

    Errors name the parameter by its path in the tree (e.g. 'layers/mlp/gate_proj/kernel').
    """
    axes_leaves = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
    path_leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    if len(axes_leaves) != len(path_leaves):
        raise ShardingError(f"{len(path_leaves)} arrays but {len(axes_leaves)} logical-axes entries")
    out = []
    for (path, leaf), ax in zip(path_leaves, axes_leaves):
        name = path_str(path)
        spec = logical_to_spec(ax, mesh, rules, shape=leaf.shape, name=name, strict=strict)
        out.append(NamedSharding(mesh, spec))
    return jax.tree.unflatten(treedef, out)


def path_str(path) -> str:
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


# --- activation constraints -----------------------------------------------------------------------------------------

_CONTEXT: contextvars.ContextVar[tuple[Mesh, AxisRules] | None] = contextvars.ContextVar("skyjax_mesh", default=None)


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None, rules: AxisRules = DEFAULT_RULES):
    """Inside this context, `constrain` shards activations on `mesh` by `rules`; outside it is a no-op.

    Model code calls `constrain(x, ('batch', 'seq', 'embed'))` and never sees a mesh.
    """
    token = _CONTEXT.set(None if mesh is None else (mesh, rules))
    try:
        if mesh is None:
            yield
        else:
            with jax.set_mesh(mesh):
                yield
    finally:
        _CONTEXT.reset(token)


def current_mesh() -> tuple[Mesh, AxisRules] | None:
    return _CONTEXT.get()


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    ctx = _CONTEXT.get()
    if ctx is None:
        return x
    mesh, rules = ctx
    spec = logical_to_spec(axes, mesh, rules, shape=x.shape, strict=False)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def shard_input(x: Any, axes: Sequence[str | None], mesh: Mesh, rules: AxisRules = DEFAULT_RULES, name: str = "input"):
    """Place a host array on the mesh (batch inputs): a batch that does not divide the data axes is an error."""
    sharding = NamedSharding(mesh, logical_to_spec(axes, mesh, rules, shape=x.shape, name=name, strict=True))
    return jax.device_put(x, sharding)
