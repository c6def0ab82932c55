"""Rotary inverse frequencies and angles: the same bits on every machine, and within a stated bound of transformers.

The reference computes inv_freq with its platform's fp32 pow (a SIMD library on a CPU, powf on a GPU), which differs
between machines by an ulp in some frequencies; ours is the correctly rounded value of the same fp32 formula. These
tests hold on any CPU: the bound (tests/helpers.py `rotary_tolerance`) allows the reference's pow a couple of ulp.
"""

import jax.numpy as jnp
import mpmath
import numpy as np
import pytest
import torch

from helpers import rotary_tolerance
from skyjax.models.qwen2_5_vl_vision import vision_rope_cos_sin
from skyjax.nn.rotary import inverse_frequencies, rope_cos_sin

# (rotary dim, theta): Qwen2/Qwen2.5 LLMs (64, 128 at 1e6), R1V's Qwen2-32B (128, 1e6), Qwen2.5-VL vision (40 = 80/2,
# 1e4), InternViT-free LLM sizes seen in tests, odd sizes
SIZES = [(8, 1e4), (16, 1e6), (32, 1e4), (40, 1e4), (64, 1e4), (64, 1e6), (80, 1e4), (96, 1e6), (128, 1e4),
         (128, 1e6), (20, 1e4), (6, 1e4)]


def correctly_rounded(dim, theta):
    """An independent computation (mpmath at 60 digits, not the decimal module ours uses) of the fp32 steps
    1 / fp32(fp32(theta) ^ fp32(j / dim)), the pow rounded once to the nearest fp32."""
    out = []
    with mpmath.workdps(60):
        for j in range(0, dim, 2):
            e = np.float32(j) / np.float32(dim)
            exact = mpmath.power(mpmath.mpf(float(np.float32(theta))), mpmath.mpf(float(e)))
            lo = np.float32(float(exact))
            nearest = min((np.nextafter(lo, np.float32(-np.inf)), lo, np.nextafter(lo, np.float32(np.inf))),
                          key=lambda c: abs(mpmath.mpf(float(c)) - exact))
            out.append(np.float32(1.0) / nearest)
    return np.array(out, np.float32)


def ulps(a, b):
    return np.abs(np.asarray(a, np.float32).view(np.int32).astype(np.int64) - np.asarray(b, np.float32).view(np.int32))


@pytest.mark.parametrize("dim,theta", SIZES)
def test_inverse_frequencies_are_the_correctly_rounded_formula(dim, theta):
    ours = inverse_frequencies(dim, theta)
    assert ours.dtype == np.float32 and ours.shape == ((dim + 1) // 2,)
    np.testing.assert_array_equal(ours, correctly_rounded(dim, theta))  # bit for bit, whatever this CPU's SIMD


def reference_inv_freqs(dim, theta):
    """inv_freq of each transformers rotary module skyjax ports, at rotary dim `dim`."""
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    text = Qwen2Config(hidden_size=2 * dim, num_attention_heads=2, num_key_value_heads=1, intermediate_size=8,
                       num_hidden_layers=1, vocab_size=8, rope_parameters={"rope_type": "default", "rope_theta": theta})
    return {"qwen2": Qwen2RotaryEmbedding(text).inv_freq.numpy(),
            "vision": reference_vision_rotary(2 * dim, theta).inv_freq.numpy()}


def reference_vision_rotary(head_dim, theta):
    """transformers' Qwen2.5-VL vision rotary for heads of `head_dim` (its rotary dim is head_dim / 2)."""
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLVisionRotaryEmbedding

    config = Qwen2_5_VLVisionConfig(hidden_size=2 * head_dim, num_heads=2,
                                    rope_parameters={"rope_type": "axial", "rope_theta": theta})
    return Qwen2_5_VLVisionRotaryEmbedding(config)


@pytest.mark.parametrize("dim,theta", [s for s in SIZES if s[0] % 2 == 0])
def test_inverse_frequencies_within_two_ulp_of_transformers(dim, theta):
    ours = inverse_frequencies(dim, theta)
    for name, ref in reference_inv_freqs(dim, theta).items():
        assert ulps(ours, ref).max() <= 2, (name, ulps(ours, ref))
    assert ours[0] == 1.0  # theta^0: exact everywhere


def test_1d_rope_angle_error_is_bounded_by_position():
    """Qwen2's rotary at positions up to 131072 (Qwen2.5's long context): |cos, sin - reference| within the bound,
    which grows linearly with the position."""
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    head_dim, theta = 128, 1e6
    config = Qwen2Config(hidden_size=2 * head_dim, num_attention_heads=2, num_key_value_heads=1, intermediate_size=8,
                         num_hidden_layers=1, vocab_size=8,
                         rope_parameters={"rope_type": "default", "rope_theta": theta})
    positions = np.concatenate([np.arange(64), np.random.default_rng(0).integers(64, 131072, 448)])[None]
    cos_ref, sin_ref = Qwen2RotaryEmbedding(config)(torch.zeros(1), torch.as_tensor(positions))
    cos, sin = rope_cos_sin(jnp.asarray(positions), head_dim, theta)
    inv = inverse_frequencies(head_dim, theta).astype(np.float64)
    tol = rotary_tolerance(np.concatenate([positions[..., None] * inv] * 2, axis=-1))
    for ours, ref in ((cos, cos_ref), (sin, sin_ref)):
        err = np.abs(np.asarray(ours, np.float64) - ref.numpy())
        assert np.all(err <= tol), float((err - tol).max())
    # the bound is not vacuous: 16 ulp off in one frequency breaks it at far positions
    bumped = inverse_frequencies(head_dim, theta)[1].view(np.int32) + 16
    far = np.cos(positions[0, 64:].astype(np.float32) * np.array(bumped, np.int32).view(np.float32))
    assert np.any(np.abs(far - cos_ref.numpy()[0, 64:, 1]) > tol[0, 64:, 1])


def test_vision_2d_rotary_angle_error_is_bounded_by_position():
    """Qwen2.5-VL's vision rotary (rotary dim head_dim / 2 over (row, col)) at grid positions up to 1024."""
    head_dim, theta = 80, 1e4
    ids = np.random.default_rng(1).integers(0, 1024, (500, 2))
    cos_ref, sin_ref = reference_vision_rotary(head_dim, theta)(torch.zeros(1), torch.as_tensor(ids))
    cos, sin = vision_rope_cos_sin(jnp.asarray(ids), head_dim, theta)
    inv = inverse_frequencies(head_dim // 2, theta).astype(np.float64)
    angles = (ids[:, :, None] * inv).reshape(len(ids), -1)
    tol = rotary_tolerance(np.concatenate([angles, angles], axis=-1))
    for ours, ref in ((cos, cos_ref), (sin, sin_ref)):
        err = np.abs(np.asarray(ours, np.float64) - ref.numpy())
        assert np.all(err <= tol), float((err - tol).max())


def test_inverse_frequencies_reject_a_bad_dim():
    with pytest.raises(ValueError, match="rotary dim must be positive"):
        inverse_frequencies(0, 1e4)
