"""SFT's objective: next-token cross-entropy on assistant tokens (objective.sft).

Stateless and reference-free: `sft_loss(model, micro_batch, cfg) -> (loss, sums)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from skyjax.train.config import SFTObjectiveConfig
from skyjax.train.global_batch import host_blocks


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
        raise ValueError(f"objective.sft.logits_chunk {chunk} does not divide the sequence bucket {s} "
                         "(data.seq_buckets)")
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
        raise ValueError(f"objective.sft.average {average!r} is not 'token' or 'sequence'")
    sums = {"loss": loss_sum, "weight": weight, "correct": jnp.sum(jnp.sum(correct * mask, axis=1) * w),
            "tokens": tokens, "sequences": jnp.sum(has_tokens)}
    return loss_sum / jnp.maximum(weight, 1.0), sums


def sft_loss(model, batch: dict, cfg: SFTObjectiveConfig):
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
    return masked_cross_entropy(nll, correct, mask, batch["row_weight"], cfg.average)


def sft_report(sums: dict) -> dict:
    """Mean loss (as averaged), token accuracy, and the number of trained tokens and conversations."""
    return {"loss": float(sums["loss"]) / max(float(sums["weight"]), 1e-9),
            "accuracy": float(sums["correct"]) / max(float(sums["tokens"]), 1e-9),
            "tokens": float(sums["tokens"]), "sequences": float(sums["sequences"])}
