"""The frozen reference policy of objectives that need one (MPO's DPO / BCO terms): its TRAINABLE subtree only.

The reference model is merge(reference, frozen): the parameters the run freezes are the same in the policy and the
reference, so they are shared, never copied; only the trainable subtree (what the policy moves) has a second copy,
sharded like the policy's. It is the policy at step 0 (`reference.source` null), or the trainable-subtree
parameters of another model (`reference.source`: any folder or checkpoint `model.source` accepts).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax

from skyjax.config import ConfigError
from skyjax.train.optimizer import flatten, split_params


def copy_of(trainable: dict, shardings: dict) -> dict:
    """A copy of the trainable parameters in buffers of their own (the step donates the policy's every step)."""
    return jax.jit(lambda t: jax.tree.map(lambda x: x.copy(), t), out_shardings=shardings)(trainable)


def load_reference(source: str, load_bundle, model_cfg, mesh, folder: Path, is_frozen, trainable: dict,
                   shardings: dict) -> dict:
    """The trainable subtree of the model at `source` (loaded as the run's kind loads its model, `load_bundle`), its
    keys and shapes checked against the policy's `trainable` (a ConfigError naming the key otherwise), cast to the
    policy's dtypes and placed with `shardings`."""
    loaded = load_bundle(dataclasses.replace(model_cfg, source=source), mesh, folder).model
    ref_trainable, _ = split_params(loaded.params, is_frozen)  # the frozen part is dropped: the policy's is used
    loaded.params = None
    want, have = flatten(trainable), flatten(ref_trainable)
    for key in sorted(set(want) | set(have)):
        if key not in have:
            raise ConfigError(f"reference.source {source}: it has no parameter {key}, which the policy trains")
        if key not in want:
            raise ConfigError(f"reference.source {source}: parameter {key} is not one the policy trains (a "
                              f"different architecture or trainer.freeze?)")
        if tuple(have[key].shape) != tuple(want[key].shape):
            raise ConfigError(f"reference.source {source}: parameter {key} has shape {tuple(have[key].shape)}, the "
                              f"policy's is {tuple(want[key].shape)}")
    cast = jax.tree.map(lambda r, t: r.astype(t.dtype), ref_trainable, trainable)
    return jax.device_put(cast, shardings)
