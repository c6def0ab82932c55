"""Attention: masks, the one attention entry point, and the KV cache.

`dot_product_attention` is the single call every model makes, so a faster kernel (cuDNN on GPU, Splash on TPU) is a
config value (`attention_impl`), not a code change. The default 'xla' path is plain einsums with an fp32 softmax;
when the fp32 scores [B, H, S, T] would exceed `max_scores_bytes` (a long row scored or prefilled on a CPU), it runs
the same computation over chunks of queries in a loop, so only one chunk's scores are ever held.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

ATTENTION_IMPLS = ("xla", "jax", "cudnn")
# Above this many bytes of fp32 attention scores the 'xla' path chunks its queries. 256 MiB keeps a 16k-token row of
# a 28-head model to a few hundred MiB of scores, yet leaves every training/decoding shape of the tests unchunked.
MAX_SCORES_BYTES = 256 * 2**20
# A causal call this long skips the key blocks above the diagonal (query chunk j reads keys up to its own end only):
# about half the attention work of a long row, the same result.
CAUSAL_SKIP_MIN_LEN = 256


class KVCache(NamedTuple):
    """Per-layer keys and values, stacked over layers: [layers, batch, kv_heads, max_len, head_dim].

    Heads come before slots: that is the layout the attention dot products read ((batch, kv_heads) as batch
    dimensions, head_dim contracted), so a decode step reads the cache in place instead of transposing all of it
    in every layer. Slots are written in order; `valid` [batch, max_len] marks slots holding a real token (not
    padding, not yet written), so left-padded prompts of different lengths share one cache.
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array

    @classmethod
    def init(cls, num_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype) -> "KVCache":
        shape = (num_layers, batch, kv_heads, max_len, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch, max_len), bool))

    @property
    def max_len(self) -> int:
        return self.valid.shape[1]


def attention_mask(
    q_slots: jax.Array,
    kv_slots: jax.Array,
    kv_valid: jax.Array | None,
    *,
    causal: bool = True,
    q_segments: jax.Array | None = None,
    kv_segments: jax.Array | None = None,
) -> jax.Array:
    """Boolean mask [B, S, T]: query slot i may see key slot j.

    q_slots [S] / kv_slots [T] are cache (or sequence) indices; kv_valid [B, T] masks padding; segment ids
    [B, S] / [B, T] make the mask block-diagonal (packed sequences, per-image or per-window vision attention).
    """
    mask = jnp.ones((1, q_slots.shape[0], kv_slots.shape[0]), bool)
    if causal:
        mask = mask & (kv_slots[None, None, :] <= q_slots[None, :, None])
    if kv_valid is not None:
        mask = mask & kv_valid[:, None, :]
    if q_segments is not None:
        mask = mask & (q_segments[:, :, None] == kv_segments[:, None, :])
    return mask


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None,
    *,
    scale: float | None = None,
    impl: str = "xla",
    precision=None,
    kv_heads_first: bool = False,
    max_scores_bytes: int | None = MAX_SCORES_BYTES,
    causal: bool = False,
) -> jax.Array:
    """Grouped-query attention. q [B, S, H, D], k/v [B, T, K, D] with H a multiple of K, mask [B, S, T] -> [B, S, H, D].
    kv_heads_first: k/v are [B, K, T, D] instead (the KVCache layout).

    The logits are computed in the activation dtype and the softmax in fp32, as the reference does.
    A fully masked query row (a padding position) gets a uniform distribution instead of NaN.
    'xla' with `max_scores_bytes` (None: never): queries are processed in chunks when the fp32 scores of the whole
    call would be larger; each query's softmax still spans every key, so the result equals the unchunked one.
    `causal` promises that query i never sees a key after slot i + T - S (a forward pass without a cache): long
    calls then skip the key blocks the mask hides entirely.
    """
    b, s, h, d = q.shape
    kv_heads = k.shape[1 if kv_heads_first else 2]
    if h % kv_heads:
        raise ValueError(f"attention: {h} query heads are not a multiple of {kv_heads} kv heads")
    scale = d**-0.5 if scale is None else scale
    if impl in ("jax", "cudnn") and kv_heads_first:
        k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    if impl in ("jax", "cudnn"):
        return jax.nn.dot_product_attention(
            q, k, v, mask=None if mask is None else mask[:, None], scale=scale,
            implementation="cudnn" if impl == "cudnn" else None,
        )
    if impl != "xla":
        raise ValueError(f"attention_impl {impl!r} is not one of {ATTENTION_IMPLS}")
    t = k.shape[2 if kv_heads_first else 1]
    chunk = query_chunk_size(b, h, s, t, max_scores_bytes)
    if causal and s >= CAUSAL_SKIP_MIN_LEN:
        return _causal_chunked_attention(q, k, v, mask, min(chunk or s, max(128, s // 8)), scale, precision,
                                         kv_heads_first)
    if chunk is None:
        return _xla_attention(q, k, v, mask, scale, precision, kv_heads_first)
    return _chunked_attention(q, k, v, mask, chunk, scale, precision, kv_heads_first)


def query_chunk_size(b: int, h: int, s: int, t: int, max_scores_bytes: int | None) -> int | None:
    """Queries per chunk so that one chunk's fp32 scores [b, h, chunk, t] fit `max_scores_bytes`; None when the whole
    call fits (no chunking). A power of two (at least 16), so bucketed lengths split evenly."""
    if max_scores_bytes is None or s <= 16 or 4 * b * h * s * t <= max_scores_bytes:
        return None
    chunk = 16
    while chunk * 2 < s and 4 * b * h * (chunk * 2) * t <= max_scores_bytes:
        chunk *= 2
    return chunk


def _xla_attention(q, k, v, mask, scale, precision, kv_heads_first):
    b, s, h, d = q.shape
    kv_heads = k.shape[1 if kv_heads_first else 2]
    g = h // kv_heads
    qg = q.reshape(b, s, kv_heads, g, d)
    kv = "bktd" if kv_heads_first else "btkd"
    logits = jnp.einsum(f"bskgd,{kv}->bkgst", qg, k, precision=precision) * jnp.asarray(scale, q.dtype)
    logits = logits.astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum(f"bkgst,{kv}->bskgd", probs, v, precision=precision)
    return out.reshape(b, s, h, d)


def _chunked_attention(q, k, v, mask, chunk, scale, precision, kv_heads_first):
    """`_xla_attention` over query chunks of `chunk` rows, one at a time (lax.map is a loop: XLA keeps one chunk's
    scores alive, not all of them). The query axis is padded to a multiple of `chunk`; padded rows are dropped."""
    b, s, h, d = q.shape
    n = -(-s // chunk)
    pad = n * chunk - s
    if mask is not None:
        mask = jnp.broadcast_to(mask, (mask.shape[0], s, mask.shape[2]))
    if pad:
        q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
        if mask is not None:
            mask = jnp.pad(mask, ((0, 0), (0, pad), (0, 0)))
    qs = jnp.moveaxis(q.reshape(b, n, chunk, h, d), 1, 0)  # [n, B, chunk, H, D]
    if mask is None:
        out = jax.lax.map(lambda qc: _xla_attention(qc, k, v, None, scale, precision, kv_heads_first), qs)
    else:
        ms = jnp.moveaxis(mask.reshape(mask.shape[0], n, chunk, mask.shape[2]), 1, 0)
        out = jax.lax.map(lambda a: _xla_attention(a[0], k, v, a[1], scale, precision, kv_heads_first), (qs, ms))
    return jnp.moveaxis(out, 0, 1).reshape(b, n * chunk, h, d)[:, :s]


def _causal_chunked_attention(q, k, v, mask, chunk, scale, precision, kv_heads_first):
    """Query chunk j attends to keys [0, end_j + T - S) only (the rest is masked out by causality): a static loop
    over chunks, each an `_xla_attention` on its own key prefix."""
    b, s, h, d = q.shape
    t = k.shape[2 if kv_heads_first else 1]
    outs = []
    for start in range(0, s, chunk):
        stop = min(start + chunk, s)
        keys = min(t, stop + t - s)
        qc = q[:, start:stop]
        if outs:
            # Make chunk j wait for chunk j-1 (XLA:CPU runs independent work concurrently, each with its own
            # buffers): adding 0 * one element of the previous output is exact for finite values, and keeps only
            # one chunk's scores alive at a time.
            qc = qc + (outs[-1][:, :1, :1, :1] * 0).astype(qc.dtype)
        kc = k[:, :, :keys] if kv_heads_first else k[:, :keys]
        vc = v[:, :, :keys] if kv_heads_first else v[:, :keys]
        mc = None if mask is None else jnp.broadcast_to(mask, (mask.shape[0], s, t))[:, start:stop, :keys]
        outs.append(_xla_attention(qc, kc, vc, mc, scale, precision, kv_heads_first))
    return jnp.concatenate(outs, axis=1)
