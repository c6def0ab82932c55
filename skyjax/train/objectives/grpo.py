"""GRPO's objective (objective.grpo): the clipped surrogate of skyjax.train.losses.policy on rollouts, with an
optional k3 KL to the frozen reference.

A rollout micro-batch (skyjax.train.grpo) holds, per completion row: the left-padded prompt followed by the sampled
completion (`input_ids`, `attention_mask` [b, S]), `completion` [b, S] (the completion's tokens that count),
`old_logps` [b, S] (the sampler's raw log-probs of those tokens, aligned with `completion`), `advantages` [b] and
`row_weight` [b] (0 for padding rows), plus the policy's image inputs (`vision`). Positions are the count of real
tokens before each token (R1V) or M-RoPE over the whole row (Qwen2.5-VL): what the sampler used, so at the first
update of a rollout the policy's log-probs equal `old_logps`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from skyjax.train.config import GRPOObjectiveConfig
from skyjax.train.global_batch import host_blocks
from skyjax.train.losses.policy import PolicyLossConfig, grpo_policy_loss


def policy_config(cfg: GRPOObjectiveConfig, max_new_tokens: int | None = None) -> PolicyLossConfig:
    return PolicyLossConfig(loss_type=cfg.loss_type, epsilon_low=cfg.epsilon,
                            epsilon_high=cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high,
                            beta=cfg.beta, kl_ratio_correction=cfg.kl_bias_correction, ratio_cap=cfg.delta,
                            max_completion_length=max_new_tokens,
                            importance_sampling_level=cfg.importance_sampling_level)


def completion_logps(model, batch: dict, logits_chunk: int = 0) -> jax.Array:
    """log pi(token) [b, S] of every token from the position before it (0 at position 0), fp32."""
    return completion_logps_entropy(model, batch, logits_chunk)[0]


def completion_logps_entropy(model, batch: dict, logits_chunk: int = 0) -> tuple[jax.Array, jax.Array]:
    """(log pi(token) [b, S] as `completion_logps`, the entropy [b, S] of the policy's distribution that predicts
    each token, under stop_gradient: a metric), fp32. Positions are the model's default for the row: 1-D counts of
    real tokens (R1V), M-RoPE over the whole row (Qwen2.5-VL): what the sampler used (skyjax.train.grpo_rows)."""
    ids = batch["input_ids"]
    vision = dict(batch.get("vision", {}))
    hosts = host_blocks(batch)
    if hosts > 1 and vision:
        vision["feature_blocks"] = hosts
    hidden, _ = model.hidden_states(ids, attention_mask=batch["attention_mask"], **vision)
    # position t - 1 predicts token t: shift the hidden states right by one (position 0 predicts nothing)
    shifted = jnp.concatenate([hidden[:, :1], hidden[:, :-1]], axis=1)
    logps, entropy = token_logps_entropy(shifted, model.logits, ids, logits_chunk)
    first = jnp.arange(ids.shape[1])[None] > 0
    return jnp.where(first, logps, 0.0), jnp.where(first, entropy, 0.0)


def token_logps_entropy(hidden: jax.Array, logits_fn, targets: jax.Array, chunk: int = 0):
    """(log p(target) [b, S], entropy [b, S] under stop_gradient) from hidden states [b, S, E], fp32; `chunk` as
    skyjax.train.objectives.sft.token_nll (the head over [b, chunk] slices, rematerialised)."""

    def piece(h, t):  # h [b, c, E], t [b, c]
        logits = logits_fn(h).astype(jnp.float32)  # [b, c, V]
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        probs = jnp.exp(logits - lse[..., None])
        entropy = lse - jnp.sum(probs * logits, axis=-1)
        return -(lse - picked), jax.lax.stop_gradient(entropy)

    b, s, e = hidden.shape
    if not chunk or chunk >= s:
        return piece(hidden, targets)
    if s % chunk:
        raise ValueError(f"objective.grpo.logits_chunk {chunk} does not divide the row length {s}")
    n = s // chunk
    h = hidden.reshape(b, n, chunk, e).swapaxes(0, 1)  # [n, b, c, E]
    t = targets.reshape(b, n, chunk).swapaxes(0, 1)
    logps, entropy = jax.lax.map(lambda x: jax.checkpoint(piece)(*x), (h, t))  # [n, b, c]
    return logps.swapaxes(0, 1).reshape(b, s), entropy.swapaxes(0, 1).reshape(b, s)


def grpo_objective(model, batch: dict, cfg: GRPOObjectiveConfig, *, reference=None, state=None):
    mask = batch["completion"] & (batch["row_weight"][:, None] > 0)
    logps, entropy = completion_logps_entropy(model, batch, cfg.logits_chunk)
    ref_logps = None
    if cfg.beta:
        if reference is None:
            raise ValueError("objective.grpo.beta > 0 needs the reference (kept in the train state)")
        ref_logps = jax.lax.stop_gradient(completion_logps(reference, batch, cfg.logits_chunk))
    # dr_grpo divides by a constant: the completion budget (rollout.max_new_tokens), never the row's width, which
    # also holds the prompt
    pcfg = policy_config(cfg, cfg.max_completion_length or batch["input_ids"].shape[1])
    weight_rows = jnp.sum((jnp.sum(mask, axis=1) > 0).astype(jnp.float32))
    tokens = jnp.sum(mask.astype(jnp.float32))
    # the step averages micro-batches by "weight": tokens for the token-level aggregations, rows otherwise
    weight = tokens if cfg.loss_type in ("bnpo", "dapo") else weight_rows
    normalizer = jnp.maximum(tokens, 1.0) if cfg.loss_type == "dapo" else None
    loss, metrics = grpo_policy_loss(logps, batch["advantages"], mask, pcfg, old_logps=batch["old_logps"],
                                     ref_logps=ref_logps, token_normalizer=normalizer)
    keep = ("loss", "policy_loss", "kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")
    sums = {k: metrics[k] * weight for k in keep if k in metrics}
    ratio = jnp.exp(jnp.where(mask, logps - batch["old_logps"], 0.0))
    sums["ratio_max_dev"] = jax.lax.stop_gradient(jnp.max(jnp.where(mask, jnp.abs(ratio - 1.0), 0.0))) * weight
    sums["weight"] = weight
    # per completion token (grpo_report divides these by "tokens"): the policy's entropy where it is trained
    sums["tokens"] = tokens
    sums["token/entropy"] = jnp.sum(jnp.where(mask, entropy, 0.0))
    # per completion row (grpo_report divides these by "rows"): what the rollout produced
    rw = batch["row_weight"].astype(jnp.float32)
    sums["rows"] = jnp.sum(rw)
    for key in ROLLOUT_NAMES:
        if key in batch:
            sums[f"rollout/{ROLLOUT_NAMES[key]}"] = jnp.sum(batch[key].astype(jnp.float32) * rw)
    return loss, sums, state


ROLLOUT_NAMES = {"rewards": "reward", "lengths": "completion_length", "truncated": "truncated_fraction",
                 "zero_std": "frac_reward_zero_std",
                 # rows with a non-zero advantage (after rollout.buffer, and before it), rows from the buffer
                 "effective": "effective_fraction", "effective_fresh": "effective_fraction_fresh",
                 "buffered": "buffer_fraction",
                 # completions a reward function failed on (rollout.on_reward_error: skip)
                 "reward_skipped": "reward_skipped_fraction"}


def needs_reference(cfg: GRPOObjectiveConfig) -> bool:
    return bool(cfg.beta)


def grpo_report(sums: dict) -> dict:
    """Loss terms as averaged by the step; rollout metrics per completion row; `token/` metrics (entropy) per
    trained completion token."""
    w = max(float(sums["weight"]), 1e-9)
    rows = max(float(sums["rows"]), 1e-9)
    tokens = max(float(sums.get("tokens", 0.0)), 1e-9)
    out = {k: float(v) / w for k, v in sums.items()
           if k not in ("weight", "rows", "tokens") and not k.startswith(("rollout/", "token/"))}
    out.update({k.split("/", 1)[1]: float(v) / rows for k, v in sums.items() if k.startswith("rollout/")})
    out.update({k.split("/", 1)[1]: float(v) / tokens for k, v in sums.items() if k.startswith("token/")})
    return out
