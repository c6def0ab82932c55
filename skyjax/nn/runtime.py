"""The runtime fields every model config shares (how it computes, not what): one place that validates them."""

from __future__ import annotations

import os

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


# XLA:CPU compiles matmuls into YNNPACK fusions by default (jaxlib 0.10). For a train step's forward and backward on
# the CPU that is slower than XLA's own dot emitter: the reward-model benchmark step (vision tower + decoder, fwd + bwd
# + AdamW) took 6-10% longer and the vision tower's backward 20-25% longer with them, on a 2-core machine. Decoding
# (matrix-vector products) is the other way round (2x faster with them), so this is a per-program compiler option of
# the train step, not a process-wide flag. A YNN setting of the user's own in XLA_FLAGS always wins.
CPU_TRAIN_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def train_compiler_options(platform: str) -> dict | None:
    """Compiler options for a train step compiled for `platform` ('cpu', 'tpu', 'gpu'): CPU_TRAIN_COMPILER_OPTIONS on
    the CPU unless XLA_FLAGS sets the YNN fusion type itself, else None."""
    if platform != "cpu" or "xla_cpu_experimental_ynn_fusion_type" in os.environ.get("XLA_FLAGS", ""):
        return None
    return dict(CPU_TRAIN_COMPILER_OPTIONS)
