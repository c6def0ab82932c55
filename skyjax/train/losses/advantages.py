"""Group-relative advantages for GRPO: each completion's reward against the other completions of its prompt.

Rewards arrive prompt-major, [num_prompts * G] with a prompt's G completions next to each other. A NaN reward marks
a completion no reward function could score: it is left out of its group's statistics and gets advantage 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SCALE_REWARDS = ("group", "batch", "none")


def nanstd(x: jax.Array, axis: int | None = None, keepdims: bool = False, unbiased: bool = True) -> jax.Array:
    """Standard deviation ignoring NaNs. unbiased: Bessel's correction n / (n - 1), NaN where fewer than two values
    are finite (there is no spread to estimate); otherwise the population value (0 for a single value)."""
    mean = jnp.nanmean(x, axis=axis, keepdims=True)
    var = jnp.nanmean(jnp.square(x - mean), axis=axis, keepdims=True)
    if unbiased:
        count = jnp.sum(~jnp.isnan(x), axis=axis, keepdims=True).astype(x.dtype)
        var = var * jnp.where(count > 1, count / jnp.maximum(count - 1, 1), jnp.nan)
    std = jnp.sqrt(var)
    return std if keepdims else jnp.squeeze(std, axis=axis)


def group_advantages(rewards: jax.Array, num_generations: int, scale_rewards: str = "group", eps: float = 1e-4,
                     unbiased_std: bool = True) -> tuple[jax.Array, dict]:
    """A = r - mean of the prompt's group, divided by (std + eps) unless scale_rewards == "none".

    rewards [P * G] float (NaN = unscorable), num_generations G (static) -> (advantages [P * G] float32, metrics).
    scale_rewards "group": std within each prompt's group; "batch": one std over the whole batch (the mean stays the
    group's); "none": no division (Dr. GRPO). A group whose rewards are all equal has advantage 0 everywhere (its std
    is 0, and 0 / eps = 0); a NaN advantage (unscorable row, or a group with one scorable row under Bessel's
    correction) becomes 0. Metrics: reward (mean), reward_std (over the batch), frac_reward_zero_std (fraction of
    rows whose scaling std is 0; with "none" the group std is what is measured).
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards {scale_rewards!r} is not one of {SCALE_REWARDS}")
    rewards = rewards.astype(jnp.float32)
    if rewards.ndim != 1 or rewards.shape[0] % num_generations:
        raise ValueError(f"rewards {rewards.shape} is not [num_prompts * {num_generations}]")
    grouped = rewards.reshape(-1, num_generations)
    group_mean = jnp.repeat(jnp.nanmean(grouped, axis=1), num_generations)
    if scale_rewards in ("group", "none"):
        if num_generations > 1:
            std = jnp.repeat(nanstd(grouped, axis=1, unbiased=unbiased_std), num_generations)
        else:  # one completion per prompt: no spread to measure
            std = jnp.zeros_like(rewards)
    else:
        std = (jnp.broadcast_to(nanstd(rewards, unbiased=unbiased_std), rewards.shape) if rewards.shape[0] > 1
               else jnp.zeros_like(rewards))
    advantages = rewards - group_mean
    if scale_rewards != "none":
        advantages = advantages / (std + eps)
    advantages = jnp.nan_to_num(advantages, nan=0.0)
    std_is_zero = jnp.abs(std) <= 1e-8  # NaN std (too few scorable rows) counts as not zero
    metrics = {
        "reward": jnp.nanmean(rewards),
        "reward_std": nanstd(rewards, unbiased=unbiased_std),
        "frac_reward_zero_std": jnp.mean(std_is_zero.astype(jnp.float32)),
    }
    return advantages, metrics
