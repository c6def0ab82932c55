"""Per-token log-probabilities and entropies from logits: the one computation every policy objective shares.

Conventions: `logits[:, t]` scores `labels[:, t]` (the caller has already aligned them; `next_token_alignment`
does the usual shift of a causal LM's outputs), and `mask[:, t]` says whether position t is a completion token.
Everything is computed in float32 whatever the logits' dtype, because a bf16 log_softmax loses the small
differences between policy and reference that the preference and policy losses are made of.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def next_token_alignment(logits: jax.Array, input_ids: jax.Array,
                         completion_mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Shift a causal LM's outputs so that position t's logits score token t+1.

    logits [B, S, V], input_ids [B, S], completion_mask [B, S] (1 on completion tokens) ->
    (logits [B, S-1, V], labels [B, S-1], mask [B, S-1]): a token is scored by the logits of the position before it,
    and counts when the token itself is a completion token.
    """
    return logits[:, :-1], input_ids[:, 1:], completion_mask[:, 1:]


def token_logprobs(logits: jax.Array, labels: jax.Array, mask: jax.Array,
                   temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """log pi(label_t | context) per token and summed per sequence.

    logits [B, T, V] (any float dtype), labels [B, T] int (values at masked positions are ignored, -100 included),
    mask [B, T] -> (per_token [B, T] float32, zero where mask is 0; per_sequence [B] float32 = sum over t).
    `temperature` divides the logits first (GRPO scores completions under the temperature they were sampled with).
    """
    logits = logits.astype(jnp.float32)
    if temperature != 1.0:
        logits = logits / temperature
    mask = mask.astype(bool)
    safe_labels = jnp.where(mask, labels, 0)  # a -100 label would index out of range
    picked = jnp.take_along_axis(logits, safe_labels[..., None], axis=-1)[..., 0]
    per_token = jnp.where(mask, picked - jax.nn.logsumexp(logits, axis=-1), 0.0)
    return per_token, jnp.sum(per_token, axis=-1)


def token_entropy(logits: jax.Array, mask: jax.Array, temperature: float = 1.0) -> jax.Array:
    """Shannon entropy (nats) of each position's next-token distribution: logits [B, T, V], mask [B, T] -> [B, T]
    float32, zero where mask is 0."""
    logits = logits.astype(jnp.float32)
    if temperature != 1.0:
        logits = logits / temperature
    logp = jax.nn.log_softmax(logits, axis=-1)
    entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    return jnp.where(mask.astype(bool), entropy, 0.0)
