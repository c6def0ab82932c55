"""The architectures skyjax converts, detected from a Hugging Face `config.json`.

Each `Architecture` ties together: how to recognise a config, the config class, the module to build, and the key
map. New architectures (Qwen2.5-VL, InternVL, reward heads) register here and the CLI picks them up.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from flax import nnx

from skyjax.convert.keymap import KeyRule, linear, qwen2_causal_lm_rules, qwen2_decoder_rules
from skyjax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM
from skyjax.models.qwen2_5_vl import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from skyjax.models.qwen2_5_vl_vision import vision_rules


@dataclasses.dataclass(frozen=True)
class Architecture:
    name: str
    config_cls: type
    build: Callable[[Any, nnx.Rngs], nnx.Module]
    rules: Callable[[Any], list[KeyRule]]
    matches: Callable[[dict], bool]
    extra_weight_files: tuple[str, ...] = ()
    ignore_keys: tuple[str, ...] = ()  # regexes of HF tensors that are dropped on purpose

    def config_from_hf(self, hf_config: dict, **runtime):
        return self.config_cls.from_hf(hf_config, **runtime)


def _is_qwen2(c: dict) -> bool:
    return c.get("model_type") == "qwen2" or "Qwen2ForCausalLM" in (c.get("architectures") or [])


def _is_qwen2_5_vl(c: dict) -> bool:
    return c.get("model_type") == "qwen2_5_vl" or "Qwen2_5_VLForConditionalGeneration" in (c.get("architectures") or [])


def qwen2_5_vl_rules(cfg: Qwen2_5_VLConfig) -> list[KeyRule]:
    """Hub layout (`visual.*`, `model.*`) with the transformers >= 4.52 in-memory names as aliases
    (`model.visual.*`, `model.language_model.*`). Export writes the hub layout."""
    rules = vision_rules("visual", "visual", aliases=("model.visual",))
    rules += qwen2_decoder_rules("model", "model", aliases=("model.language_model",))
    if not cfg.text.tie_word_embeddings:
        rules += linear("lm_head", "lm_head")
    return rules


ARCHITECTURES: dict[str, Architecture] = {
    "qwen2": Architecture(
        name="qwen2",
        config_cls=Qwen2Config,
        build=lambda cfg, rngs: Qwen2ForCausalLM(cfg, rngs=rngs),
        rules=lambda cfg: qwen2_causal_lm_rules(cfg.tie_word_embeddings),
        matches=_is_qwen2,
        # a tied checkpoint may still carry lm_head.weight (a copy of the embedding); it is not needed
        ignore_keys=(r"lm_head\.weight",),
    ),
    "qwen2_5_vl": Architecture(
        name="qwen2_5_vl",
        config_cls=Qwen2_5_VLConfig,
        build=lambda cfg, rngs: Qwen2_5_VLForConditionalGeneration(cfg, rngs=rngs),
        rules=qwen2_5_vl_rules,
        matches=_is_qwen2_5_vl,
        ignore_keys=(r"lm_head\.weight",),  # the tied (3B) variant may still carry a copy of the embedding
    ),
}


def register(arch: Architecture) -> None:
    ARCHITECTURES[arch.name] = arch


def detect(hf_config: dict, source: str = "config.json") -> Architecture:
    """The architecture of a Hugging Face config; the most specific match wins (reward head before plain VL)."""
    for arch in reversed(list(ARCHITECTURES.values())):
        if arch.matches(hf_config):
            return arch
    raise ValueError(
        f"{source}: unsupported architecture (model_type={hf_config.get('model_type')!r}, "
        f"architectures={hf_config.get('architectures')}); supported: {', '.join(ARCHITECTURES)}"
    )


# Modules that register further architectures (kept in their own files; each calls `register(...)` on import).
ARCH_MODULES: list[str] = []


def _load_arch_modules() -> None:
    import importlib

    for module in ARCH_MODULES:
        importlib.import_module(module)


_load_arch_modules()
