"""The runtime fields every model config shares (how it computes, not what): one place that validates them."""

from __future__ import annotations

import jax

from skyjax.nn.attention import ATTENTION_IMPLS
from skyjax.nn.scan import REMAT_POLICIES

PRECISIONS = {"default": None, "high": jax.lax.Precision.HIGH, "highest": jax.lax.Precision.HIGHEST}


def check_runtime(cfg) -> None:
    """Raise naming the field when remat / attention_impl / matmul_precision has an unknown value."""
    if cfg.remat not in REMAT_POLICIES:
        raise ValueError(f"remat {cfg.remat!r} is not one of {sorted(REMAT_POLICIES)}")
    if cfg.attention_impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl {cfg.attention_impl!r} is not one of {ATTENTION_IMPLS}")
    if cfg.matmul_precision not in PRECISIONS:
        raise ValueError(f"matmul_precision {cfg.matmul_precision!r} is not one of {sorted(PRECISIONS)}")
