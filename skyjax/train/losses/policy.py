"""GRPO's policy loss: the PPO-clipped surrogate per completion token, an optional k3 KL to a frozen reference, and
the token aggregation that distinguishes GRPO, BNPO, Dr. GRPO and DAPO.

Pure and jittable; differentiable in the policy's per-token log-probs `logps` (the old-policy and reference
log-probs carry no gradient). `mask` [B, T] marks completion tokens; values at masked positions never reach the
loss or its gradient, so padding may hold anything finite or not.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


@dataclasses.dataclass(frozen=True)
class PolicyLossConfig:
    """Defaults as TRL 1.16's GRPOConfig: DAPO aggregation, symmetric clip 0.2, no KL."""

    loss_type: str = "dapo"
    epsilon_low: float = 0.2  # ratio clipped below at 1 - epsilon_low
    epsilon_high: float = 0.2  # ... and above at 1 + epsilon_high (DAPO's clip-higher: 0.28)
    beta: float = 0.0  # weight of the k3 KL to the reference (0: no reference needed)
    # multiply the k3 KL by the ratio pi / pi_old (with its gradient), so that its gradient is that of the reverse KL
    # under the sampling policy (TRL's use_bias_correction_kl, on by default); off: the plain k3 of DeepSeek's GRPO
    kl_ratio_correction: bool = True
    ratio_cap: float | None = None  # two-sided GRPO: cap the unclipped ratio at this value (TRL's `delta`)
    # dr_grpo's fixed divisor per row: the generation cap (max new tokens), not the padded width of the batch
    max_completion_length: int | None = None
    # "token": one importance ratio per token; "sequence": one per completion, exp of the mean per-token log-ratio
    # (GSPO; TRL's importance_sampling_level)
    importance_sampling_level: str = "token"

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type {self.loss_type!r} is not one of {LOSS_TYPES}")
        if self.loss_type == "dr_grpo" and not self.max_completion_length:
            raise ValueError("loss_type 'dr_grpo' needs max_completion_length (the generation cap)")
        if self.importance_sampling_level not in ("token", "sequence"):
            raise ValueError(f"importance_sampling_level {self.importance_sampling_level!r} is not 'token' or "
                             f"'sequence'")
        if self.epsilon_low < 0 or self.epsilon_high < 0:
            raise ValueError("epsilon_low and epsilon_high must be >= 0")


def k3_kl(logps: jax.Array, ref_logps: jax.Array) -> jax.Array:
    """Per-token k3 estimate of KL(pi || pi_ref): exp(ref - logp) - (ref - logp) - 1 (>= 0, unbiased), elementwise."""
    d = ref_logps - logps
    return jnp.exp(d) - d - 1.0


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _row_means(x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-row masked means [B] and which rows have tokens [B]."""
    tokens = jnp.sum(mask, axis=-1)
    return jnp.sum(x * mask, axis=-1) / jnp.maximum(tokens, 1.0), tokens > 0


def grpo_policy_loss(logps: jax.Array, advantages: jax.Array, mask: jax.Array,
                     cfg: PolicyLossConfig = PolicyLossConfig(), old_logps: jax.Array | None = None,
                     ref_logps: jax.Array | None = None, entropies: jax.Array | None = None,
                     token_normalizer: jax.Array | float | None = None,
                     grad_accum_steps: int = 1) -> tuple[jax.Array, dict]:
    """The GRPO policy loss of one micro-batch: (loss scalar float32, metrics).

    logps [B, T]: the policy's per-token log-probs of the sampled completions (differentiated);
    advantages [B] (one per completion) or [B, T]; mask [B, T] (1 on completion tokens);
    old_logps [B, T]: the sampling policy's log-probs (None: on-policy, the ratio is 1 with its gradient);
    ref_logps [B, T]: the reference's log-probs (needed when cfg.beta != 0);
    entropies [B, T]: per-token entropies, only reported.

    Per token: l = -min(w A, clip(w, 1 - eps_low, 1 + eps_high) A) + beta * kl, w = exp(logp - logp_old).
    Aggregation (m = mask, G = grad_accum_steps):
      grpo:    mean over rows of sum_t(l m) / max(sum_t m, 1), / G
      bnpo:    sum(l m) / max(sum m, 1), / G
      dr_grpo: sum(l m) / (B * max_completion_length), / G
      dapo:    sum(l m) / token_normalizer. TRL divides by num_items_in_batch / num_processes * G /
               steps_per_generation (num_items_in_batch: completion tokens of the whole generation batch over all
               processes, at least 1); pass that. None: max(sum m, 1) * G (this micro-batch's count standing in).
    Metrics: loss (as returned), policy_loss (before the division by G), kl (when beta != 0), entropy (when given),
    clip_ratio/{low_mean, high_mean, region_mean} (token means of where the clip is active: ratio below 1 - eps_low
    with A < 0, above 1 + eps_high with A > 0), clip_ratio/low_min and clip_ratio/high_max (over rows with tokens of
    the row's fraction; NaN if no row has a token).
    """
    m = mask.astype(jnp.float32)
    live = m > 0
    logps = logps.astype(jnp.float32)
    old = jax.lax.stop_gradient(logps if old_logps is None else old_logps.astype(jnp.float32))
    adv = advantages.astype(jnp.float32)
    adv = adv[:, None] if adv.ndim == 1 else adv

    # padding may hold anything: the log-ratio is zeroed there before exp so it cannot overflow into 0 * inf = NaN
    log_ratio = jnp.where(live, logps - old, 0.0)
    if cfg.importance_sampling_level == "sequence":  # one ratio per completion [B, 1]: its mean log-ratio
        log_ratio = (jnp.sum(log_ratio * m, axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1.0))[:, None]
    ratio = jnp.exp(log_ratio)
    clipped = jnp.clip(ratio, 1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high)
    if cfg.ratio_cap is not None:
        ratio = jnp.minimum(ratio, cfg.ratio_cap)
    per_token = jnp.broadcast_to(-jnp.minimum(ratio * adv, clipped * adv), m.shape)

    metrics: dict = {}
    if cfg.beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta != 0 needs ref_logps")
        ref = jax.lax.stop_gradient(ref_logps.astype(jnp.float32))
        kl = k3_kl(jnp.where(live, logps, 0.0), jnp.where(live, ref, 0.0))
        if cfg.kl_ratio_correction:
            kl = kl * ratio
        per_token = per_token + cfg.beta * kl
        metrics["kl"] = jax.lax.stop_gradient(_masked_mean(kl, m))
    per_token = jnp.where(live, per_token, 0.0)

    total = jnp.sum(per_token * m)
    if cfg.loss_type == "grpo":
        policy_loss = jnp.mean(_row_means(per_token, m)[0])
        loss = policy_loss / grad_accum_steps
    elif cfg.loss_type == "bnpo":
        policy_loss = total / jnp.maximum(jnp.sum(m), 1.0)
        loss = policy_loss / grad_accum_steps
    elif cfg.loss_type == "dr_grpo":
        policy_loss = total / (per_token.shape[0] * cfg.max_completion_length)
        loss = policy_loss / grad_accum_steps
    else:  # dapo
        normalizer = (jnp.maximum(jnp.sum(m), 1.0) * grad_accum_steps if token_normalizer is None
                      else jnp.asarray(token_normalizer, jnp.float32))
        loss = total / normalizer
        policy_loss = loss

    ratio_d = jax.lax.stop_gradient(ratio)
    low = ((ratio_d < 1.0 - cfg.epsilon_low) & (adv < 0)).astype(jnp.float32)
    high = ((ratio_d > 1.0 + cfg.epsilon_high) & (adv > 0)).astype(jnp.float32)
    region = jnp.maximum(low, high)
    metrics.update({"loss": jax.lax.stop_gradient(loss), "policy_loss": jax.lax.stop_gradient(policy_loss)})
    if low.shape[-1] == 1:  # one ratio per completion (sequence level): fractions of completions, as TRL logs them
        metrics.update({"clip_ratio/low_mean": jnp.mean(low), "clip_ratio/high_mean": jnp.mean(high),
                        "clip_ratio/region_mean": jnp.mean(region), "clip_ratio/low_min": jnp.min(low),
                        "clip_ratio/high_max": jnp.max(high)})
    else:
        low_rows, has = _row_means(low, m)
        high_rows, _ = _row_means(high, m)
        any_rows = jnp.any(has)
        metrics.update({
            "clip_ratio/low_mean": _masked_mean(low, m),
            "clip_ratio/high_mean": _masked_mean(high, m),
            "clip_ratio/region_mean": _masked_mean(region, m),
            "clip_ratio/low_min": jnp.where(any_rows, jnp.min(jnp.where(has, low_rows, jnp.inf)), jnp.nan),
            "clip_ratio/high_max": jnp.where(any_rows, jnp.max(jnp.where(has, high_rows, -jnp.inf)), jnp.nan),
        })
    if entropies is not None:
        metrics["entropy"] = _masked_mean(jax.lax.stop_gradient(entropies.astype(jnp.float32)), m)
    return loss, metrics
