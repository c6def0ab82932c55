"""The architectures skyjax converts, detected from a Hugging Face `config.json`.

Each `Architecture` ties together: how to recognise a config, the config class, the module to build, and the key
map. New architectures (Qwen2.5-VL, InternVL, reward heads) register here and the CLI picks them up.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from flax import nnx

from skyjax.convert.keymap import KeyRule, qwen2_causal_lm_rules
from skyjax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM


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
