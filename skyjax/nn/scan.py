"""Layer stacks: build N identical blocks as one module with stacked parameters, and run them with `lax.scan`.

Scanning keeps compile time flat in depth (a 64-layer model compiles like a 2-layer one); `remat` picks what the
backward pass recomputes.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx

REMAT_POLICIES: dict[str, Any] = {
    "none": None,  # save every activation (fastest, most memory)
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block
    "dots": jax.checkpoint_policies.checkpoint_dots,  # keep matmul outputs, recompute element-wise ops
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep weight matmuls only
}


def stacked(make_block: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs) -> nnx.Module:
    """`num_layers` blocks as one module whose parameters have a leading 'layers' axis."""

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(r):
        return make_block(r)

    stack = make(rngs)
    for _, node in nnx.iter_graph(stack):
        if isinstance(node, nnx.Variable) and "axes" in node.get_metadata():
            node.set_metadata("axes", ("layers", *node.get_metadata()["axes"]))
    return stack


def scan_layers(
    stack: nnx.Module,
    body: Callable[[nnx.Module, Any, Any], tuple[Any, Any]],
    carry: Any,
    xs: Any = None,
    *,
    remat: str = "none",
    unroll: int = 1,
    layers: slice | None = None,
) -> tuple[Any, Any]:
    """Run `body(layer, carry, x) -> (carry, y)` over the stacked layers (and per-layer inputs `xs`).

    `layers` (a static slice) runs only those layers of the stack, e.g. one run of blocks of the same kind, so that
    a model whose blocks differ in a static way (window or full attention) scans each run with its own body instead
    of branching inside one scan (a `lax.cond` in a scanned body keeps the residuals of both branches)."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat policy {remat!r} is not one of {sorted(REMAT_POLICIES)}")
    graphdef, state = nnx.split(stack)
    if layers is not None:
        state = jax.tree.map(lambda a: a[layers], state)

    def step(c, inputs):
        layer_state, x = inputs
        return body(nnx.merge(graphdef, layer_state), c, x)

    if remat != "none":
        step = jax.checkpoint(step, policy=REMAT_POLICIES[remat], prevent_cse=False)
    return jax.lax.scan(step, carry, (state, xs), unroll=unroll)
