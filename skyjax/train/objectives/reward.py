"""The reward model's objective: Bradley-Terry on preference pairs, scored by a Qwen2.5-VL + value head.

Stateless and reference-free: `reward_model_loss(model, micro_batch, cfg) -> (loss, sums)` (objective.reward_model).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from skyjax.train.config import RewardModelObjectiveConfig
from skyjax.train.global_batch import host_blocks


def pair_scores(model, batch: dict) -> tuple[jax.Array, jax.Array]:
    """Rewards of the chosen rows and the rejected rows [b] each, encoding the pairs' images once.

    A multi-host global batch (skyjax.train.global_batch) is H host blocks [chosen_h, rejected_h] one after another,
    with the hosts' packed images side by side: each block's rows read their host's image features, and the scores
    come back host-major (chosen = chosen_0 + chosen_1 + ..., like the global `pair_weight`).
    """
    ids, mask = batch["input_ids"], batch["attention_mask"]
    hosts = host_blocks(batch)  # 1 unless a multi-host global batch: a static Python int
    feats = model.visual(batch["pixel_values"], batch["vision_meta"])  # [U, E]: the pairs' images, once
    # 2H row groups (each host's chosen rows, then its rejected rows) over H feature blocks (H = 1 on one host)
    embeds = model.embed(ids, image_features=feats, image_groups=2 * hosts, feature_blocks=hosts)
    scores = model.score(ids, attention_mask=mask, image_grid_thw=batch["image_grid_thw"], inputs_embeds=embeds)
    per_host = scores.reshape(hosts, 2, -1)  # [H, chosen / rejected, b_l]
    return per_host[:, 0].reshape(-1), per_host[:, 1].reshape(-1)


def bradley_terry(chosen: jax.Array, rejected: jax.Array, weight: jax.Array, cfg: RewardModelObjectiveConfig):
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


def shared_prompt_scores(model, batch: dict) -> tuple[jax.Array, jax.Array]:
    """Rewards [b] of the chosen and rejected responses of b pairs packed one pair per row (data.share_prompt):
    [prompt | chosen tail | rejected tail] with `branch_ids` 0 / 1 / 2 (skyjax.train.pairs.collate_shared_prompt).

    The prompt (with its images) runs once instead of once per response. Each tail attends to the prompt and to
    itself only (Qwen2Model's branch mask), and the rejected tail's positions are moved back by the chosen tail's
    length, so every token sees exactly what it sees in its own (prompt + response) row: the same scores as
    `pair_scores` on the two-row layout. `score_index` [b, 2] is each response's last token.
    """
    from skyjax.nn.mrope import mm_token_types, mrope_positions

    ids, mask, branch = batch["input_ids"], batch["attention_mask"], batch["branch_ids"]
    cfg = model.cfg
    types = mm_token_types(ids, cfg.image_token_id, cfg.video_token_id)
    positions, _ = mrope_positions(types, mask, batch["image_grid_thw"],
                                   spatial_merge_size=cfg.vision.spatial_merge_size, validate=False)
    chosen_len = jnp.sum((branch == 1) & mask, axis=1, keepdims=True)  # [b, 1]
    positions = positions - jnp.where(branch == 2, chosen_len, 0)[None].astype(positions.dtype)
    feats = model.visual(batch["pixel_values"], batch["vision_meta"])
    hosts = host_blocks(batch)  # a multi-host global batch: host h's rows read host h's features
    embeds = model.embed(ids, image_features=feats, image_groups=hosts, feature_blocks=hosts)
    scores = model.score(ids, attention_mask=mask, positions=positions, inputs_embeds=embeds, branch_ids=branch,
                         index=batch["score_index"])  # [b, 2]
    return scores[:, 0], scores[:, 1]


def reward_model_loss(model, batch: dict, cfg: RewardModelObjectiveConfig):
    scores = shared_prompt_scores if "branch_ids" in batch else pair_scores
    chosen, rejected = scores(model, batch)
    return bradley_terry(chosen, rejected, batch["pair_weight"], cfg)
