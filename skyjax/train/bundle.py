"""A run's model as training uses it, whatever the kind: the `ModelBundle` (model on the mesh, tokenizer, image
settings) and the model-config helpers every kind's loader shares."""

from __future__ import annotations

import dataclasses
from typing import Any

from skyjax.config import ConfigError
from skyjax.convert.checkpoint import LoadedModel
from skyjax.data.qwen_vl_image import QwenVLImageConfig
from skyjax.train.config import DataConfig, ModelConfig


@dataclasses.dataclass
class ModelBundle:
    model: LoadedModel
    tokenizer: Any
    image_cfg: Any  # QwenVLImageConfig (Qwen2.5-VL) or InternVLImageConfig (R1V)


def runtime_overrides(cfg: ModelConfig) -> dict:
    """The model config fields a run may override (remat, attention_impl), when set."""
    out = {}
    for key in ("remat", "attention_impl"):
        if getattr(cfg, key) is not None:
            out[key] = getattr(cfg, key)
    return out


SHAPE_PREFIX = "shape:"  # model.source "shape:NAME" / "shape:FILE.yaml": a model shape, no weights (skyjax aot)


def require_weights(cfg: ModelConfig) -> None:
    """Training needs weights: a shape-only model.source (for `skyjax aot`) is an error naming the field."""
    if cfg.source.startswith(SHAPE_PREFIX):
        raise ConfigError(f"model.source {cfg.source!r} is a model shape without weights, for `skyjax aot` only; "
                          f"training needs a Hugging Face folder, a skyjax checkpoint or 'tiny'")


def image_config(bundle: ModelBundle, data: DataConfig) -> QwenVLImageConfig:
    changes = {k: getattr(data, k) for k in ("min_pixels", "max_pixels") if getattr(data, k) is not None}
    return dataclasses.replace(bundle.image_cfg, **changes) if changes else bundle.image_cfg
