"""Rotary position embeddings: 1-D (the Qwen2 LLM); the vision 2-D and multimodal (M-RoPE) forms build on these.

cos/sin are computed in fp32 (positions can reach 10^5, where bf16 angles would be meaningless) and cast to the
activation dtype at use, as the reference does.

The inverse frequencies are the correctly rounded fp32 values of the reference's formula, computed in software
(docs/numerics.md): the same bits on every CPU and accelerator. The reference's own values come from its platform's
fp32 pow (a SIMD library on a CPU, powf on a GPU), which is within a couple of ulp of these and not the same
everywhere, so no fixed set of bits can match it on every machine.
"""

from __future__ import annotations

import functools
from decimal import Decimal, localcontext

import jax
import jax.numpy as jnp
import numpy as np


def _nearest_float32(x: Decimal) -> np.float32:
    """x rounded to the nearest fp32 (one rounding, from the exact decimal: no double rounding through fp64)."""
    guess = np.float32(float(x))
    candidates = (np.nextafter(guess, np.float32(-np.inf)), guess, np.nextafter(guess, np.float32(np.inf)))
    return min(candidates, key=lambda c: abs(Decimal(float(c)) - x))


@functools.lru_cache(maxsize=64)
def _inverse_frequencies(dim: int, theta: float) -> tuple[float, ...]:
    base = Decimal(float(np.float32(theta)))  # the reference's base is an fp32 scalar
    out = []
    with localcontext() as ctx:
        ctx.prec = 50  # far past fp32's 24 bits: the decimal result rounds to fp32 correctly
        for j in range(0, dim, 2):
            exponent = np.float32(j) / np.float32(dim)  # one IEEE fp32 division, as the reference's arange / dim
            power = _nearest_float32(base ** Decimal(float(exponent)))  # the fp32 pow, correctly rounded
            out.append(float(np.float32(1.0) / power))  # one IEEE fp32 division, as the reference's 1.0 / pow
    return tuple(out)


def inverse_frequencies(dim: int, theta: float) -> np.ndarray:
    """inv[j] = 1 / theta^(2j/dim), j = 0..dim/2-1, fp32: the reference's fp32 steps with a correctly rounded pow.

    A host constant (computed once per (dim, theta)), identical on every machine: numpy's fp32 `**` is not (its
    SIMD paths differ between CPUs by an ulp in some frequencies), nor is XLA's pow. Against a reference whose pow is
    within k ulp, inv differs by at most about k + 1 ulp, so a rotary angle p * inv differs by at most
    about (k + 2) * 2^-24 * p * inv (docs/numerics.md measures it).
    """
    if dim <= 0:
        raise ValueError(f"rotary dim must be positive, got {dim}")
    return np.asarray(_inverse_frequencies(int(dim), float(theta)), np.float32)


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """positions [B, S] -> cos, sin [B, S, head_dim] (fp32), layout concat(F, F) as in rotate_half."""
    freqs = positions.astype(jnp.float32)[..., None] * inverse_frequencies(head_dim, theta)  # [B, S, head_dim/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, S, H, D]; cos/sin [B, S, D] -> x rotated, in x's dtype."""
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotate_half(x) * sin
