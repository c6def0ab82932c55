"""Greedy decoding with a KV cache, compiled as one program (prefill + a `fori_loop` of single-token steps).

Prompts are left-padded into one batch; every row writes its next token into the same cache slot, and the cache's
`valid` mask keeps padding out of attention, so rows of different lengths decode together.
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> (ids [B, L], mask [B, L]) padded on the left."""
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("left_pad: every prompt needs at least one token")
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = True
    return ids, mask


@partial(jax.jit, static_argnames=("fn", "max_new_tokens"))
def greedy_generate(fn, params, input_ids, attention_mask, stop_ids, *, max_new_tokens: int):
    """Greedy tokens [B, max_new_tokens] and lengths [B] for a causal LM built by `fn.bind(params)`.

    A row stops after emitting any of `stop_ids` (the stop token is kept); later slots hold the pad value -1.
    """
    model = fn.bind(params)
    b, prompt_len = input_ids.shape
    cache = model.init_cache(b, prompt_len + max_new_tokens)
    logits, cache = model(input_ids, attention_mask=attention_mask, cache=cache, cache_index=0)
    first = jnp.argmax(logits[:, -1].astype(jnp.float32), axis=-1).astype(jnp.int32)

    def step(t, state):
        tokens, done, token, cache = state
        tokens = tokens.at[:, t].set(jnp.where(done, -1, token))
        done = done | jnp.isin(token, stop_ids)
        logits, cache = model(token[:, None], attention_mask=jnp.ones((b, 1), bool), cache=cache,
                              cache_index=prompt_len + t)
        nxt = jnp.argmax(logits[:, -1].astype(jnp.float32), axis=-1).astype(jnp.int32)
        return tokens, done, nxt, cache

    tokens = jnp.full((b, max_new_tokens), -1, jnp.int32)
    tokens, done, _, _ = jax.lax.fori_loop(0, max_new_tokens, step, (tokens, jnp.zeros(b, bool), first, cache))
    lengths = jnp.sum(tokens >= 0, axis=1)
    return tokens, lengths
