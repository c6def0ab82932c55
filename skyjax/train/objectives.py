"""Training objectives: small functions the one trainer plugs in by the run's `kind`.

An objective maps (model, micro-batch, config) to (loss, sums): the loss is what gets differentiated; `sums` are
additive fp32 scalars (weighted sums of metrics) plus the loss's denominator under the key "weight", so that
micro-batches and hosts combine exactly: the train step scales each micro-batch's gradient by its weight, adds the
sums, and divides by the total weight. Which keys `sums` has is the objective's business (the step zero-initialises
its accumulator from the objective's own output); `Objective.report` turns summed sums into the logged metrics.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from skyjax.train.config import ObjectiveConfig
from skyjax.train.global_batch import host_blocks


def finalize(sums: dict) -> dict:
    """Weighted sums -> means (every key divided by "weight")."""
    w = max(float(sums["weight"]), 1e-9)
    return {k: float(v) / w for k, v in sums.items() if k != "weight"}


@dataclasses.dataclass(frozen=True)
class Objective:
    name: str
    loss: Callable  # (model, micro_batch, ObjectiveConfig) -> (loss, sums)
    report: Callable[[dict], dict] = finalize  # host side: summed sums (floats) -> metrics


# --- reward model: Bradley-Terry on preference pairs ------------------------------------------------------------------


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


def reward_model_loss(model, batch: dict, cfg: ObjectiveConfig):
    scores = shared_prompt_scores if "branch_ids" in batch else pair_scores
    chosen, rejected = scores(model, batch)
    return bradley_terry(chosen, rejected, batch["pair_weight"], cfg)


# --- SFT: next-token cross-entropy on assistant tokens ----------------------------------------------------------------


def next_token_targets(input_ids: jax.Array, assistant_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(targets, mask) [b, S]: position t predicts token t+1, and counts when token t+1 is an assistant token (its
    content or the end-of-turn token that closes it; see skyjax.data.chat). The last position predicts nothing."""
    targets = jnp.concatenate([input_ids[:, 1:], jnp.zeros_like(input_ids[:, :1])], axis=1)
    mask = jnp.concatenate([assistant_mask[:, 1:], jnp.zeros_like(assistant_mask[:, :1])], axis=1)
    return targets, mask.astype(bool)


def token_nll(hidden: jax.Array, logits_fn, targets: jax.Array, chunk: int = 0) -> tuple[jax.Array, jax.Array]:
    """Per-token -log p(target) and argmax == target, both [b, S], from hidden states [b, S, E] in fp32.

    With `chunk` the head runs over [b, chunk] slices in a rematerialised loop, so only one chunk's [b, chunk, V]
    logits are live (forward and backward); S must be a multiple of `chunk`.
    """

    def piece(h, t):  # h [b, c, E], t [b, c]
        logits = logits_fn(h).astype(jnp.float32)  # [b, c, V]
        picked = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        return jax.nn.logsumexp(logits, axis=-1) - picked, jnp.argmax(logits, axis=-1) == t

    b, s, e = hidden.shape
    if not chunk or chunk >= s:
        return piece(hidden, targets)
    if s % chunk:
        raise ValueError(f"objective.logits_chunk {chunk} does not divide the sequence bucket {s} (data.seq_buckets)")
    n = s // chunk
    h = hidden.reshape(b, n, chunk, e).swapaxes(0, 1)  # [n, b, c, E]
    t = targets.reshape(b, n, chunk).swapaxes(0, 1)
    nll, correct = jax.lax.map(lambda x: jax.checkpoint(piece)(*x), (h, t))  # [n, b, c]
    return nll.swapaxes(0, 1).reshape(b, s), correct.swapaxes(0, 1).reshape(b, s)


def masked_cross_entropy(nll: jax.Array, correct: jax.Array, mask: jax.Array, row_weight: jax.Array,
                         average: str = "token"):
    """(loss, sums) from per-token nll / correct [b, S], the trained positions `mask` [b, S] and `row_weight` [b]
    (0 for padding rows).

    average "token": sum of every trained token's nll / their number (weight = tokens).
    average "sequence": mean over rows (with at least one trained token) of the row's per-token mean
    (weight = such rows). Either way the micro-batch's loss is sums["loss"] / sums["weight"].
    """
    mask = mask.astype(jnp.float32)
    w = row_weight.astype(jnp.float32)
    nll, correct = nll.astype(jnp.float32), correct.astype(jnp.float32)
    row_tokens = jnp.sum(mask, axis=1)  # [b]
    row_nll = jnp.sum(nll * mask, axis=1)
    has_tokens = (row_tokens > 0).astype(jnp.float32) * w
    tokens = jnp.sum(row_tokens * w)
    if average == "token":
        loss_sum, weight = jnp.sum(row_nll * w), tokens
    elif average == "sequence":
        loss_sum, weight = jnp.sum(row_nll / jnp.maximum(row_tokens, 1.0) * has_tokens), jnp.sum(has_tokens)
    else:
        raise ValueError(f"objective.sft_average {average!r} is not 'token' or 'sequence'")
    sums = {"loss": loss_sum, "weight": weight, "correct": jnp.sum(jnp.sum(correct * mask, axis=1) * w),
            "tokens": tokens, "sequences": jnp.sum(has_tokens)}
    return loss_sum / jnp.maximum(weight, 1.0), sums


def sft_loss(model, batch: dict, cfg: ObjectiveConfig):
    """Next-token cross-entropy on the assistant tokens of a micro-batch.

    batch: input_ids / attention_mask / assistant_mask [b, S], row_weight [b], and `vision`: the model's image
    inputs as keyword arguments of `model.hidden_states` (R1V: pixel_values [N_tiles, 3, s, s]). A multi-host global
    batch (skyjax.train.global_batch) holds H hosts' rows and packed images one after another: the model is told
    (`feature_blocks`) so that each host's rows read their host's image features.
    """
    ids = batch["input_ids"]
    vision = dict(batch.get("vision", {}))
    hosts = host_blocks(batch)
    if hosts > 1 and vision:
        vision["feature_blocks"] = hosts
    hidden, _ = model.hidden_states(ids, attention_mask=batch["attention_mask"], **vision)
    targets, mask = next_token_targets(ids, batch["assistant_mask"])
    nll, correct = token_nll(hidden, model.logits, targets, cfg.logits_chunk)
    return masked_cross_entropy(nll, correct, mask, batch["row_weight"], cfg.sft_average)


def sft_report(sums: dict) -> dict:
    """Mean loss (as averaged), token accuracy, and the number of trained tokens and conversations."""
    return {"loss": float(sums["loss"]) / max(float(sums["weight"]), 1e-9),
            "accuracy": float(sums["correct"]) / max(float(sums["tokens"]), 1e-9),
            "tokens": float(sums["tokens"]), "sequences": float(sums["sequences"])}


OBJECTIVES = {
    "reward_model": Objective("reward_model", reward_model_loss),
    "sft": Objective("sft", sft_loss, sft_report),
}
