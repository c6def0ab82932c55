"""Hugging Face <-> skyjax parameter maps, as data.

A `KeyRule` says: our parameter at `path` (slash-separated, in the params dict) is the Hugging Face tensor `hf`
after `transform`. A `{i}` in `hf` means our parameter is stacked over layers and tensor `hf.format(i=l)` is its
l-th slice. `aliases` are other spellings of the same tensor (transformers-5 in-memory names, remote-code layouts).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Transform:
    """How a Hugging Face tensor becomes ours and back."""

    name: str

    def to_ours(self, x: np.ndarray, our_shape: Sequence[int]) -> np.ndarray:
        if self.name == "copy":
            return x
        if self.name == "linear":  # torch Linear weight (out, in) -> kernel (in, out)
            return x.T
        if self.name == "conv_dense":  # ConvNd weight (out, in, *k) -> dense kernel (in * prod(k), out)
            return x.reshape(x.shape[0], -1).T
        raise ValueError(f"unknown transform {self.name}")

    def to_hf(self, x: np.ndarray, hf_shape: Sequence[int]) -> np.ndarray:
        if self.name == "copy":
            return x
        if self.name == "linear":
            return x.T
        if self.name == "conv_dense":
            return x.T.reshape(hf_shape)
        raise ValueError(f"unknown transform {self.name}")

    def matches(self, hf_shape: Sequence[int], our_shape: Sequence[int]) -> bool:
        hf_shape, our_shape = tuple(hf_shape), tuple(our_shape)
        if self.name == "copy":
            return hf_shape == our_shape
        if self.name == "linear":
            return hf_shape == our_shape[::-1]
        if self.name == "conv_dense":
            return len(our_shape) == 2 and hf_shape[0] == our_shape[1] and math.prod(hf_shape[1:]) == our_shape[0]
        return False

    def expected_hf(self, our_shape: Sequence[int]) -> str:
        if self.name == "copy":
            return str(tuple(our_shape))
        if self.name == "linear":
            return str(tuple(our_shape)[::-1])
        return f"({our_shape[1]}, ...) with {our_shape[0]} elements per output"


COPY, LINEAR, CONV_DENSE = Transform("copy"), Transform("linear"), Transform("conv_dense")


@dataclasses.dataclass(frozen=True)
class KeyRule:
    path: str
    hf: str
    transform: Transform = COPY
    aliases: tuple[str, ...] = ()

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf

    def hf_names(self, layer: int | None = None) -> tuple[str, ...]:
        names = (self.hf, *self.aliases)
        return tuple(n.format(i=layer) for n in names) if layer is not None else names


def linear(path: str, hf: str, bias: bool = False, aliases: Sequence[str] = ()) -> list[KeyRule]:
    """A Linear layer: `<path>/kernel` <- `<hf>.weight` (transposed) and optionally `<path>/bias` <- `<hf>.bias`."""
    rules = [KeyRule(f"{path}/kernel", f"{hf}.weight", LINEAR, tuple(f"{a}.weight" for a in aliases))]
    if bias:
        rules.append(KeyRule(f"{path}/bias", f"{hf}.bias", COPY, tuple(f"{a}.bias" for a in aliases)))
    return rules


def norm(path: str, hf: str, bias: bool = False, aliases: Sequence[str] = ()) -> list[KeyRule]:
    rules = [KeyRule(f"{path}/weight", f"{hf}.weight", COPY, tuple(f"{a}.weight" for a in aliases))]
    if bias:
        rules.append(KeyRule(f"{path}/bias", f"{hf}.bias", COPY, tuple(f"{a}.bias" for a in aliases)))
    return rules


def qwen2_decoder_rules(ours: str = "model", hf: str = "model", aliases: Sequence[str] = ()) -> list[KeyRule]:
    """The Qwen2 decoder (embeddings, layers, final norm) under our prefix `ours` and HF prefix `hf`."""

    def al(suffix: str) -> list[str]:
        return [f"{a}.{suffix}" for a in aliases]

    rules = [KeyRule(f"{ours}/embed_tokens/embedding", f"{hf}.embed_tokens.weight", COPY,
                     tuple(f"{a}.embed_tokens.weight" for a in aliases))]
    layer = f"{hf}.layers.{{i}}"
    lal = [f"{a}.layers.{{i}}" for a in aliases]
    for proj in ("q_proj", "k_proj", "v_proj"):
        rules += linear(f"{ours}/layers/self_attn/{proj}", f"{layer}.self_attn.{proj}", bias=True,
                        aliases=[f"{a}.self_attn.{proj}" for a in lal])
    rules += linear(f"{ours}/layers/self_attn/o_proj", f"{layer}.self_attn.o_proj",
                    aliases=[f"{a}.self_attn.o_proj" for a in lal])
    for proj in ("gate_proj", "up_proj", "down_proj"):
        rules += linear(f"{ours}/layers/mlp/{proj}", f"{layer}.mlp.{proj}", aliases=[f"{a}.mlp.{proj}" for a in lal])
    rules += norm(f"{ours}/layers/input_layernorm", f"{layer}.input_layernorm",
                  aliases=[f"{a}.input_layernorm" for a in lal])
    rules += norm(f"{ours}/layers/post_attention_layernorm", f"{layer}.post_attention_layernorm",
                  aliases=[f"{a}.post_attention_layernorm" for a in lal])
    rules += norm(f"{ours}/norm", f"{hf}.norm", aliases=al("norm"))
    return rules


def qwen2_causal_lm_rules(tied: bool) -> list[KeyRule]:
    rules = qwen2_decoder_rules("model", "model")
    if not tied:
        rules += linear("lm_head", "lm_head")
    return rules


def qwen2_5_vl_vision_rules(ours: str = "visual", hf: str = "visual", aliases: Sequence[str] = ("model.visual",)) -> list[KeyRule]:
    """The Qwen2.5-VL vision tower: our parameters under prefix `ours` ('' for a bare tower) <- HF tensors under `hf` (or `aliases`)."""

    def p(suffix: str) -> str:
        return f"{ours}/{suffix}" if ours else suffix

    def al(suffix: str) -> list[str]:
        return [f"{a}.{suffix}" for a in aliases]

    rules = [KeyRule(p("patch_embed/proj/kernel"), f"{hf}.patch_embed.proj.weight", CONV_DENSE,
                     tuple(al("patch_embed.proj.weight")))]
    blk = "blocks.{i}"
    rules += norm(p("blocks/norm1"), f"{hf}.{blk}.norm1", aliases=al(f"{blk}.norm1"))
    rules += norm(p("blocks/norm2"), f"{hf}.{blk}.norm2", aliases=al(f"{blk}.norm2"))
    for name in ("qkv", "proj"):
        rules += linear(p(f"blocks/attn/{name}"), f"{hf}.{blk}.attn.{name}", bias=True,
                        aliases=al(f"{blk}.attn.{name}"))
    for name in ("gate_proj", "up_proj", "down_proj"):
        rules += linear(p(f"blocks/mlp/{name}"), f"{hf}.{blk}.mlp.{name}", bias=True, aliases=al(f"{blk}.mlp.{name}"))
    rules += norm(p("merger/ln_q"), f"{hf}.merger.ln_q", aliases=al("merger.ln_q"))
    for i in (0, 2):
        rules += linear(p(f"merger/mlp_{i}"), f"{hf}.merger.mlp.{i}", bias=True, aliases=al(f"merger.mlp.{i}"))
    return rules
