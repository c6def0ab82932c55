"""The architectures skyjax converts, detected from a Hugging Face `config.json`.

Each `Architecture` ties together: how to recognise a config, the config class, the module to build, and the key
map. New architectures (Qwen2.5-VL, InternVL, reward heads) register here and the CLI picks them up.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from flax import nnx

from pathlib import Path

from skyjax.convert.keymap import (COPY, LINEAR, KeyRule, linear, qwen2_5_vl_vision_rules, qwen2_causal_lm_rules,
                                   qwen2_decoder_rules)
from skyjax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM
from skyjax.models.qwen2_5_vl import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from skyjax.models.reward import VALUE_HEAD_FILE, Qwen2_5_VLRewardModel


@dataclasses.dataclass(frozen=True)
class Architecture:
    name: str
    config_cls: type
    build: Callable[[Any, nnx.Rngs], nnx.Module]
    rules: Callable[[Any], list[KeyRule]]
    matches: Callable[[dict], bool]
    extra_weight_files: tuple[str, ...] = ()  # read beside the model's safetensors when present
    ignore_keys: tuple[str, ...] = ()  # regexes of HF tensors that are dropped on purpose
    requires_files: tuple[str, ...] = ()  # files that must be in the folder for this architecture to match
    separate_files: tuple[tuple[str, str], ...] = ()  # (HF key prefix, file): tensors exported to their own file
    separate_files_dtype: str | None = None  # dtype of those files (None: as the rest)

    def config_from_hf(self, hf_config: dict, **runtime):
        return self.config_cls.from_hf(hf_config, **runtime)


def _is_qwen2(c: dict) -> bool:
    return c.get("model_type") == "qwen2" or "Qwen2ForCausalLM" in (c.get("architectures") or [])


def _is_qwen2_5_vl(c: dict) -> bool:
    return c.get("model_type") == "qwen2_5_vl" or "Qwen2_5_VLForConditionalGeneration" in (c.get("architectures") or [])


def qwen2_5_vl_rules(cfg: Qwen2_5_VLConfig) -> list[KeyRule]:
    """Hub layout (`visual.*`, `model.*`) with the transformers >= 4.52 in-memory names as aliases
    (`model.visual.*`, `model.language_model.*`). Export writes the hub layout."""
    rules = qwen2_5_vl_vision_rules("visual", "visual", aliases=("model.visual",))
    rules += qwen2_decoder_rules("model", "model", aliases=("model.language_model",))
    if not cfg.text.tie_word_embeddings:
        rules += linear("lm_head", "lm_head")
    return rules


def qwen2_5_vl_reward_rules(cfg: Qwen2_5_VLConfig) -> list[KeyRule]:
    """Qwen2.5-VL + the TRL/LLaMA-Factory value head (`v_head.summary.weight` (1, hidden), `.bias` (1,))."""
    return qwen2_5_vl_rules(cfg) + [KeyRule("v_head/summary/kernel", "v_head.summary.weight", LINEAR),
                                    KeyRule("v_head/summary/bias", "v_head.summary.bias", COPY)]


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
    "qwen2_5_vl_reward": Architecture(
        name="qwen2_5_vl_reward",
        config_cls=Qwen2_5_VLConfig,
        build=lambda cfg, rngs: Qwen2_5_VLRewardModel(cfg, rngs=rngs),
        rules=qwen2_5_vl_reward_rules,
        matches=_is_qwen2_5_vl,
        extra_weight_files=(VALUE_HEAD_FILE,),
        ignore_keys=(r"lm_head\.weight",),
        requires_files=(VALUE_HEAD_FILE,),
        separate_files=(("v_head.", VALUE_HEAD_FILE),),
        separate_files_dtype="float32",  # the head is computed in fp32; keep its file exact
    ),
}


def register(arch: Architecture) -> None:
    ARCHITECTURES[arch.name] = arch


def detect(hf_config: dict, source: str = "config.json", folder: Path | None = None) -> Architecture:
    """The architecture of a Hugging Face config (and folder); the most specific match wins: an architecture that
    requires extra files (a reward head) is tried before the plain one."""
    candidates = sorted(ARCHITECTURES.values(), key=lambda a: -len(a.requires_files))
    for arch in candidates:
        if arch.requires_files and (folder is None or not all((folder / f).is_file() for f in arch.requires_files)):
            continue
        if arch.matches(hf_config):
            return arch
    from skyjax.convert.safetensors_io import CheckpointError

    raise CheckpointError(
        f"{source}: unsupported architecture (model_type={hf_config.get('model_type')!r}, "
        f"architectures={hf_config.get('architectures')}); supported: {', '.join(ARCHITECTURES)}"
    )


# Modules that register further architectures (kept in their own files; each calls `register(...)` on import).
ARCH_MODULES: list[str] = ["skyjax.convert.internvl"]


def _load_arch_modules() -> None:
    import importlib

    for module in ARCH_MODULES:
        importlib.import_module(module)


_load_arch_modules()
