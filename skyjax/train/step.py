"""The train step as a pure function of (state, batch), shared by the Trainer and ahead-of-time compiles.

    step = build_train_step(fn, objective, optimizer, schedule, cfg.objective)
    extras = objective_extras(objective, cfg.objective, cfg.reference)  # (keep a reference?, initial objective state)
    shardings = state_shardings(fn, optimizer, is_frozen, mesh, *extras)
    jitted = jax.jit(step, donate_argnums=0, out_shardings=(shardings, NamedSharding(mesh, P())))
    jitted.lower(abstract_state(fn, optimizer, is_frozen, mesh, *extras), abstract_batch)   # AOT: nothing allocated

The state is a dict:
    step       int32 []
    trainable  nested params dict (what the optimizer updates)
    frozen     nested params dict (never differentiated: no gradient memory, no optimizer moments)
    opt        the optax state of `trainable`
    reference  only when the objective needs one: a frozen copy of the TRAINABLE subtree (the reference model is
               merge(reference, frozen): frozen parameters are shared with the policy, never duplicated); sharded
               like `trainable`, passed through the step unchanged
    objective  only when the objective keeps state (e.g. MPO's running BCO delta): a pytree of fp32 arrays,
               replicated, threaded through the micro-batch scan
A batch has a leading micro-batch axis [A, ...] on every array; the step scans over it (gradient accumulation).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from skyjax.nn.functional import Functional
from skyjax.train.objectives import Objective
from skyjax.train.optimizer import merge_params, split_params

STEP_KEYS = ("grad_norm", "lr")  # what the step adds to the objective's sums (not weighted)


def build_train_step(fn: Functional, objective: Objective, optimizer: optax.GradientTransformation,
                     schedule: optax.Schedule, objective_cfg):
    """`train_step(state, batch) -> (new_state, stats)`: one optimizer step over the batch's A micro-batches.

    The objective's loss on each micro-batch is a weighted mean with weight `sums["weight"]`; gradients are
    accumulated as weighted sums and divided by the total weight, so A micro-batches equal one batch of A times the
    size (up to fp32 summation order). `stats` = the objective's summed `sums` + `grad_norm` + `lr` (scalars).
    """

    settings = objective.settings(objective_cfg)

    def train_step(state: dict, batch: dict):
        frozen = state["frozen"]
        reference = state.get("reference")
        # the reference policy: its own trainable subtree with the policy's frozen parameters, never differentiated
        ref_model = None if reference is None else fn.bind(merge_params(jax.lax.stop_gradient(reference), frozen))

        def loss_fn(trainable, mb, objective_state):
            value, sums, new_state = objective.loss(fn.bind(merge_params(trainable, frozen)), mb, settings,
                                                    reference=ref_model, state=objective_state)
            return value, (sums, jax.lax.stop_gradient(new_state))

        def micro(carry, mb):
            grads_acc, sums_acc, objective_state = carry
            (_, (sums, new_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["trainable"], mb,
                                                                                       objective_state)
            # loss_fn is a weighted mean over this micro-batch: scale back to a weighted sum before accumulating
            grads_acc = jax.tree.map(lambda a, g: a + g * sums["weight"], grads_acc, grads)
            # the next micro-batch sees this one's state (as a per-forward update in a PyTorch trainer would)
            new_state = jax.tree.map(lambda n, o: n.astype(o.dtype), new_state, objective_state)
            return (grads_acc, jax.tree.map(jnp.add, sums_acc, sums), new_state), None

        zeros = jax.tree.map(jnp.zeros_like, state["trainable"])
        objective_state = state.get("objective")
        # the accumulator has exactly the objective's keys (shapes from tracing it on the first micro-batch)
        sums_shape = jax.eval_shape(loss_fn, state["trainable"], jax.tree.map(lambda x: x[0], batch),
                                    objective_state)[1][0]
        sums0 = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), sums_shape)
        (grads, sums, objective_state), _ = jax.lax.scan(micro, (zeros, sums0, objective_state), batch)
        grads = jax.tree.map(lambda g: g / jnp.maximum(sums["weight"], 1.0), grads)
        updates, opt = optimizer.update(grads, state["opt"], state["trainable"])
        trainable = optax.apply_updates(state["trainable"], updates)
        stats = dict(sums, grad_norm=optax.global_norm(grads), lr=jnp.asarray(schedule(state["step"]), jnp.float32))
        new = {"step": state["step"] + 1, "trainable": trainable, "frozen": frozen, "opt": opt}
        if reference is not None:
            new["reference"] = reference
        if objective_state is not None:
            new["objective"] = objective_state
        return new, stats

    return train_step


def report(objective: Objective, stats: dict) -> dict:
    """Host-side metrics of one step's `stats` (floats): the objective's report + grad_norm and lr."""
    sums = {k: v for k, v in stats.items() if k not in STEP_KEYS}
    return {**objective.report(sums), **{k: float(stats[k]) for k in STEP_KEYS}}


def objective_extras(objective: Objective, objective_cfg, reference_cfg=None) -> tuple[bool, Any]:
    """(whether the state keeps a reference, the objective's initial state or None) for this run's objective. With
    `reference_cfg.precompute` and an objective that can read precomputed log-probs, no reference is kept."""
    settings = objective.settings(objective_cfg)
    precomputed = bool(reference_cfg is not None and reference_cfg.precompute and objective.precompute)
    return bool(objective.needs_reference(settings)) and not precomputed, objective.initial_state(settings)


def state_shardings(fn: Functional, optimizer: optax.GradientTransformation, is_frozen, mesh: Mesh,
                    reference: bool = False, objective_state: Any = None) -> dict:
    """NamedShardings of the state: parameters as the model's axis rules say, optimizer moments like their
    parameters, scalars (step, counts) replicated; the reference (when `reference`) like the trainable parameters,
    the objective's state (when given: arrays or shape structs) replicated."""
    param_sh = fn.shardings(mesh)
    trainable_sh, frozen_sh = split_params(param_sh, is_frozen)
    trainable_shapes, _ = split_params(fn.shapes, is_frozen)
    replicated = NamedSharding(mesh, P())
    opt_sh = optax.tree_map_params(optimizer, lambda _, s: s, jax.eval_shape(optimizer.init, trainable_shapes),
                                   trainable_sh, transform_non_params=lambda _: replicated)
    out = {"step": replicated, "trainable": trainable_sh, "frozen": frozen_sh, "opt": opt_sh}
    if reference:
        out["reference"] = trainable_sh
    if objective_state is not None:
        out["objective"] = jax.tree.map(lambda _: replicated, objective_state)
    return out


def abstract_state(fn: Functional, optimizer: optax.GradientTransformation, is_frozen, mesh: Mesh,
                   reference: bool = False, objective_state: Any = None) -> dict:
    """The state as ShapeDtypeStructs with their shardings (nothing allocated): for `jit(...).lower`. With
    `reference` it holds the resident reference (the trainable subtree's shapes); with `objective_state` (arrays or
    shape structs) the objective's state."""
    trainable, frozen = split_params(fn.shapes, is_frozen)
    shapes = {"step": jax.ShapeDtypeStruct((), jnp.int32), "trainable": trainable, "frozen": frozen,
              "opt": jax.eval_shape(optimizer.init, trainable)}
    if reference:
        shapes["reference"] = trainable
    if objective_state is not None:
        shapes["objective"] = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), objective_state)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                        state_shardings(fn, optimizer, is_frozen, mesh, reference, objective_state))


def jit_train_step(step, shardings: dict, mesh: Mesh):
    """The step under jit: the state is donated and comes back with exactly its input shardings (so the first and
    every later step share one compiled program); the stats are replicated scalars. On a CPU mesh the step is
    compiled with `train_compiler_options` (XLA's own matmul emitter instead of YNNPACK fusions: faster for a train
    step there, see skyjax.nn.runtime)."""
    from skyjax.nn.runtime import train_compiler_options

    return jax.jit(step, donate_argnums=0, out_shardings=(shardings, NamedSharding(mesh, P())),
                   compiler_options=train_compiler_options(mesh.devices.flat[0].platform))
