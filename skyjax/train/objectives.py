"""Training objectives: small functions the one trainer plugs in by the run's `kind`.

An objective maps (model, micro-batch, config) to (loss, sums): the loss is what gets differentiated; `sums` are
weighted sums of metrics plus their total weight under the key "weight", so micro-batches and hosts combine exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from skyjax.train.config import ObjectiveConfig


def pair_scores(model, batch: dict) -> tuple[jax.Array, jax.Array]:
    """Rewards of the chosen rows and the rejected rows [b] each, encoding the pairs' images once."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    b = ids.shape[0] // 2
    feats = model.visual(batch["pixel_values"], batch["vision_meta"])  # [U, E]: the b prompts' images
    embeds = jnp.concatenate([model.embed(ids[:b], image_features=feats),
                              model.embed(ids[b:], image_features=feats)])  # [2b, S, E]
    scores = model.score(ids, attention_mask=mask, image_grid_thw=batch["image_grid_thw"], inputs_embeds=embeds)
    return scores[:b], scores[b:]


def bradley_terry(chosen: jax.Array, rejected: jax.Array, weight: jax.Array, cfg: ObjectiveConfig):
    """-log sigmoid(r+ - r- - margin) in fp32, weighted mean over pairs (+ optional reward centering)."""
    chosen, rejected = chosen.astype(jnp.float32), rejected.astype(jnp.float32)
    diff = chosen - rejected
    per_pair = -jax.nn.log_sigmoid(diff - cfg.margin)
    if cfg.center_coef:
        per_pair = per_pair + cfg.center_coef * jnp.square(chosen + rejected)
    total = jnp.sum(weight)
    loss = jnp.sum(per_pair * weight) / jnp.maximum(total, 1.0)
    sums = {
        "loss": jnp.sum(per_pair * weight),
        "accuracy": jnp.sum((diff > 0) * weight),  # a tie counts as wrong
        "margin": jnp.sum(diff * weight),
        "chosen_score": jnp.sum(chosen * weight),
        "rejected_score": jnp.sum(rejected * weight),
        "weight": total,
    }
    return loss, sums


def reward_model_loss(model, batch: dict, cfg: ObjectiveConfig):
    chosen, rejected = pair_scores(model, batch)
    return bradley_terry(chosen, rejected, batch["pair_weight"], cfg)


OBJECTIVES = {"reward_model": reward_model_loss}


def finalize(sums: dict) -> dict:
    """Weighted sums -> means."""
    w = max(float(sums["weight"]), 1e-9)
    return {k: float(v) / w for k, v in sums.items() if k != "weight"}
