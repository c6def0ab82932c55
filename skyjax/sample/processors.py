"""Logits processing for sampling, with Hugging Face `generate` semantics and PER-ROW parameters.

transformers 5.24 `_get_logits_processor` applies, in this order (the ones we implement):

    RepetitionPenaltyLogitsProcessor      (also under greedy decoding: it is a processor, not a warper)
    TemperatureLogitsWarper               (sampling only)
    TopKLogitsWarper                      (sampling only)
    TopPLogitsWarper                      (sampling only)
    MinPLogitsWarper                      (sampling only)

then `softmax` + `multinomial` (we draw the same distribution with `jax.random.categorical`), or `argmax` for greedy.
Every parameter here is a [B] array (one value per row), so rows with different settings share one batch: AL-CoTD's
repetition penalty differs per prompt. "Off" values are those for which HF does not add the processor at all:
penalty 1, top_k 0, top_p 1, min_p 0; temperature 0 means greedy for that row (argmax of the penalised logits).

Semantics (each equal to the HF class on the same float32 logits; see tests/test_sample.py):
- repetition penalty p: for every token id already in the row's sequence (prompt + generated), logit l becomes
  l * p if l < 0 else l / p. "In the sequence" = the row's REAL tokens (image placeholder tokens included), as
  HF 5.24, which skips a left-padded row's padding (`prompt_ignore_length` = its pad count).
- temperature T: l / T.
- top-k k: remove logits strictly below the k-th largest (ties with it are kept).
- top-p p: sort ascending, remove tokens whose cumulative probability is <= 1 - p, always keep the largest.
  The removed set is a prefix of the ascending order, so we keep logits >= the first kept value; HF's per-index
  removal can differ only when equal logits straddle the cut.
- min-p m: remove tokens whose probability is < m * (top probability); the top token is always kept.
Removed tokens get -inf.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

NEG_INF = float("-inf")


@dataclasses.dataclass(frozen=True)
class ProcessorFlags:
    """Which processors run at all (static: a processor no row uses costs nothing). `max_top_k` bounds the
    `lax.top_k` width (the largest k of any row)."""

    penalty: bool = False
    sample: bool = False
    max_top_k: int = 0
    top_p: bool = False
    min_p: bool = False

    @classmethod
    def from_rows(cls, temperature, top_k, top_p, min_p, repetition_penalty, vocab_size: int) -> "ProcessorFlags":
        t, k, p, m, r = (np.asarray(x) for x in (temperature, top_k, top_p, min_p, repetition_penalty))
        sample = bool(np.any(t > 0))
        # warpers act on sampled rows only; greedy rows ignore them (argmax survives every warper anyway)
        return cls(
            penalty=bool(np.any(r != 1.0)),
            sample=sample,
            max_top_k=int(min(np.max(np.where(t > 0, k, 0), initial=0), vocab_size)) if sample else 0,
            top_p=sample and bool(np.any((p < 1.0) & (t > 0))),
            min_p=sample and bool(np.any((m > 0.0) & (t > 0))),
        )


    def union(self, other: "ProcessorFlags | None") -> "ProcessorFlags":
        """Every processor either needs (to keep one compiled program across batches with different settings)."""
        if other is None:
            return self
        return ProcessorFlags(self.penalty or other.penalty, self.sample or other.sample,
                              max(self.max_top_k, other.max_top_k), self.top_p or other.top_p,
                              self.min_p or other.min_p)


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: jax.Array) -> jax.Array:
    """logits [B, V] float32, seen [B, V] bool (token ids already in the row), penalty [B]."""
    p = penalty.astype(logits.dtype)[:, None]
    penalised = jnp.where(logits < 0, logits * p, logits / p)
    return jnp.where(seen, penalised, logits)


def apply_temperature(logits: jax.Array, temperature: jax.Array) -> jax.Array:
    """logits / T per row; rows with T <= 0 (greedy) are left unchanged."""
    t = jnp.where(temperature > 0, temperature, 1.0).astype(logits.dtype)
    return logits / t[:, None]


def apply_top_k(logits: jax.Array, top_k: jax.Array, max_top_k: int) -> jax.Array:
    """Keep the top_k[b] largest logits of row b (ties with the k-th kept); rows with top_k <= 0 unchanged.
    `max_top_k` (static) >= every row's k."""
    if max_top_k <= 0:
        return logits
    width = min(int(max_top_k), logits.shape[-1])
    values = jax.lax.top_k(logits, width)[0]  # [B, width], descending
    k = jnp.clip(top_k, 1, width).astype(jnp.int32)
    kth = jnp.take_along_axis(values, (k - 1)[:, None], axis=-1)
    remove = (logits < kth) & (top_k > 0)[:, None]
    return jnp.where(remove, NEG_INF, logits)


def apply_top_p(logits: jax.Array, top_p: jax.Array, one_minus_top_p: jax.Array | None = None) -> jax.Array:
    """Nucleus filtering per row; rows with top_p >= 1 unchanged. `one_minus_top_p` may be given precomputed in
    float64 and rounded to float32, as HF compares against the Python double `1 - top_p`."""
    threshold = (1.0 - top_p) if one_minus_top_p is None else one_minus_top_p
    ascending = jnp.sort(logits, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    removed = cumulative <= threshold.astype(cumulative.dtype)[:, None]
    removed = removed.at[:, -1].set(False)  # min_tokens_to_keep = 1
    n_removed = jnp.sum(removed, axis=-1, dtype=jnp.int32)  # a prefix: the cumulative sum never decreases
    cutoff = jnp.take_along_axis(ascending, n_removed[:, None], axis=-1)
    remove = (logits < cutoff) & (top_p < 1.0)[:, None]
    return jnp.where(remove, NEG_INF, logits)


def apply_min_p(logits: jax.Array, min_p: jax.Array) -> jax.Array:
    """Remove tokens with probability < min_p[b] * max probability of row b; the top token is always kept."""
    probs = jax.nn.softmax(logits, axis=-1)
    top = jnp.max(probs, axis=-1, keepdims=True)
    remove = probs < min_p.astype(probs.dtype)[:, None] * top
    is_top = jnp.arange(logits.shape[-1])[None, :] == jnp.argmax(probs, axis=-1)[:, None]
    remove = remove & ~is_top & (min_p > 0)[:, None]
    return jnp.where(remove, NEG_INF, logits)


def process_logits(logits: jax.Array, seen: jax.Array | None, rows: dict, flags: ProcessorFlags):
    """HF's chain on raw float32 logits [B, V]. Returns (penalised, warped): `penalised` is what greedy rows take
    the argmax of; `warped` (= penalised -> temperature -> top-k -> top-p -> min-p) is what sampled rows draw from.
    `rows` holds [B] arrays: temperature, top_k, top_p, one_minus_top_p, min_p, repetition_penalty."""
    if flags.penalty:
        logits = apply_repetition_penalty(logits, seen, rows["repetition_penalty"])
    if not flags.sample:
        return logits, logits
    warped = apply_temperature(logits, rows["temperature"])
    warped = apply_top_k(warped, rows["top_k"], flags.max_top_k)
    if flags.top_p:
        warped = apply_top_p(warped, rows["top_p"], rows.get("one_minus_top_p"))
    if flags.min_p:
        warped = apply_min_p(warped, rows["min_p"])
    return logits, warped
