"""Rotary position embeddings: 1-D (the Qwen2 LLM); the vision 2-D and multimodal (M-RoPE) forms build on these.

cos/sin are computed in fp32 (positions can reach 10^5, where bf16 angles would be meaningless) and cast to the
activation dtype at use, as the reference does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def inverse_frequencies(dim: int, theta: float) -> np.ndarray:
    """inv[j] = theta^(-2j/dim), j = 0..dim/2-1 (fp32), computed on the host as a trace-time constant.

    numpy's float32 pow matches torch's inv_freq bit for bit at the usual head sizes; XLA's CPU pow is a few ulp off
    at 80 and 96, an angle error that grows with the position.
    """
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    return (np.float32(1.0) / (np.float32(theta) ** exponents)).astype(np.float32)


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
