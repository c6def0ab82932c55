"""Qwen2 decoder: the LLM of Qwen2.5-VL and of Skywork R1V (DeepSeek-R1-Distill-Qwen-32B).

    tokens -> embed_tokens -> N x [RMSNorm -> GQA attention (q/k/v bias, RoPE) -> + -> RMSNorm -> SwiGLU -> +]
           -> norm -> lm_head (or the tied embedding)

Layers are stacked and scanned. The same forward serves training (no cache), prefill (write the prompt into an empty
cache) and decode (one token per row against the cache).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from skyjax.nn.attention import KVCache, attention_mask, dot_product_attention
from skyjax.nn.layers import Embed, Linear, RMSNorm, SwiGLU
from skyjax.nn.rotary import apply_rotary, rope_cos_sin
from skyjax.nn.runtime import PRECISIONS, check_runtime
from skyjax.nn.scan import scan_layers, stacked
from skyjax.parallel.rules import constrain



@dataclasses.dataclass(frozen=True)
class Qwen2Config:
    # architecture (Hugging Face names, so `from_hf` is a lookup)
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # runtime: how it computes, not what it computes
    dtype: str = "float32"  # activation / compute dtype
    param_dtype: str = "float32"  # storage dtype of the parameters (fp32 master weights under bf16 compute)
    remat: str = "none"  # one of skyjax.nn.scan.REMAT_POLICIES
    attention_impl: str = "xla"  # one of skyjax.nn.attention.ATTENTION_IMPLS
    scan_unroll: int = 1
    matmul_precision: str = "default"  # 'highest' for bit-faithful fp32 on TPU

    def __post_init__(self):
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        check_runtime(self)

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def precision(self):
        return PRECISIONS[self.matmul_precision]

    @classmethod
    def from_hf(cls, config: dict[str, Any], **runtime) -> "Qwen2Config":
        """From a Hugging Face config.json dict: Qwen2 (flat), or the `text_config` of a 5.x multimodal config."""
        c = dict(config.get("text_config") or config)
        if c.get("use_sliding_window"):
            raise NotImplementedError("Qwen2 sliding-window attention (use_sliding_window: true) is not supported")
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        theta = c.get("rope_theta", rope.get("rope_theta", 1_000_000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "mrope"):
            raise NotImplementedError(f"rope type {rope_type!r} is not supported (only default / mrope)")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if key not in c:
                raise KeyError(f"config.json has no {key!r}")
        tie = config.get("tie_word_embeddings", c.get("tie_word_embeddings", False))
        return cls(
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_hidden_layers=c["num_hidden_layers"],
            num_attention_heads=c["num_attention_heads"],
            num_key_value_heads=c.get("num_key_value_heads", c["num_attention_heads"]),
            head_dim=c.get("head_dim") or 0,
            rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            tie_word_embeddings=bool(tie),
            max_position_embeddings=c.get("max_position_embeddings", 32768),
            initializer_range=c.get("initializer_range", 0.02),
            bos_token_id=c.get("bos_token_id", config.get("bos_token_id")),
            eos_token_id=c.get("eos_token_id", config.get("eos_token_id")),
            pad_token_id=c.get("pad_token_id", config.get("pad_token_id")),
            **runtime,
        )

    def to_hf(self) -> dict[str, Any]:
        """A config.json that transformers' Qwen2ForCausalLM loads."""
        return {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.initializer_range,
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": self.num_hidden_layers,
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": self.param_dtype,
            "use_cache": True,
        }

    @classmethod
    def tiny(cls, **overrides) -> "Qwen2Config":
        """A 2-layer model for tests and demos (GQA 4:2, untied)."""
        base = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, rope_theta=10000.0, max_position_embeddings=2048)
        return cls(**{**base, **overrides})

    @classmethod
    def qwen2_5_7b(cls, **runtime) -> "Qwen2Config":
        """The text half of Qwen2.5-VL-7B."""
        return cls(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                   num_attention_heads=28, num_key_value_heads=4, rope_theta=1e6, max_position_embeddings=128000,
                   bos_token_id=151643, eos_token_id=151645, **runtime)

    @classmethod
    def r1_distill_32b(cls, **runtime) -> "Qwen2Config":
        """DeepSeek-R1-Distill-Qwen-32B, the LLM of Skywork-R1V-38B."""
        return cls(vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                   num_attention_heads=40, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=1e6,
                   max_position_embeddings=131072, bos_token_id=151646, eos_token_id=151643, **runtime)


class Qwen2Attention(nnx.Module):
    def __init__(self, cfg: Qwen2Config, *, rngs: nnx.Rngs):
        kw = dict(dtype=cfg.compute_dtype, param_dtype=jnp.dtype(cfg.param_dtype), precision=cfg.precision,
                  init_std=cfg.initializer_range, rngs=rngs)
        d, h, k = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        self.q_proj = Linear(cfg.hidden_size, h * d, axes=("embed", "heads"), use_bias=True, **kw)
        self.k_proj = Linear(cfg.hidden_size, k * d, axes=("embed", "kv_heads"), use_bias=True, **kw)
        self.v_proj = Linear(cfg.hidden_size, k * d, axes=("embed", "kv_heads"), use_bias=True, **kw)
        self.o_proj = Linear(h * d, cfg.hidden_size, axes=("heads", "embed"), use_bias=False, **kw)
        self.cfg = cfg

    def __call__(self, x, cos, sin, mask, kv=None, cache_index=None):
        """x [B, S, E]; kv: this layer's cache (k, v) [B, K, T, D] or None. Returns (out [B, S, E], new kv)."""
        cfg = self.cfg
        b, s, _ = x.shape
        q = self.q_proj(x).reshape(b, s, cfg.num_attention_heads, cfg.head_dim)  # [B, S, H, D]
        k = self.k_proj(x).reshape(b, s, cfg.num_key_value_heads, cfg.head_dim)  # [B, S, K, D]
        v = self.v_proj(x).reshape(b, s, cfg.num_key_value_heads, cfg.head_dim)
        q = constrain(apply_rotary(q, cos, sin), ("batch", "seq", "heads", "head_dim"))
        k = constrain(apply_rotary(k, cos, sin), ("batch", "seq", "kv_heads", "head_dim"))
        v = constrain(v, ("batch", "seq", "kv_heads", "head_dim"))
        if kv is not None:  # write this chunk into the cache ([B, K, T, D]: heads first) and attend over all of it
            k_cache, v_cache = kv
            k = jax.lax.dynamic_update_slice(k_cache, jnp.swapaxes(k, 1, 2).astype(k_cache.dtype),
                                             (0, 0, cache_index, 0))
            v = jax.lax.dynamic_update_slice(v_cache, jnp.swapaxes(v, 1, 2).astype(v_cache.dtype),
                                             (0, 0, cache_index, 0))
            kv = (k, v)
        out = dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, impl=cfg.attention_impl,
                                    precision=cfg.precision, kv_heads_first=kv is not None,
                                    causal=kv is None)  # no cache: query i sees keys <= i
        out = self.o_proj(out.reshape(b, s, cfg.num_attention_heads * cfg.head_dim))
        return out, kv


class Qwen2DecoderLayer(nnx.Module):
    def __init__(self, cfg: Qwen2Config, *, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=pd)
        self.self_attn = Qwen2Attention(cfg, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=pd)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, dtype=cfg.compute_dtype, param_dtype=pd,
                          precision=cfg.precision, init_std=cfg.initializer_range, rngs=rngs)

    def __call__(self, x, cos, sin, mask, kv=None, cache_index=None):
        attn, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv, cache_index)
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x))
        return constrain(x, ("batch", "seq", "embed")), kv


class Qwen2Model(nnx.Module):
    """The decoder without its head: embeddings -> scanned layers -> final norm."""

    def __init__(self, cfg: Qwen2Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.compute_dtype,
                                  param_dtype=jnp.dtype(cfg.param_dtype), precision=cfg.precision,
                                  init_std=cfg.initializer_range, rngs=rngs)
        self.layers = stacked(lambda r: Qwen2DecoderLayer(cfg, rngs=r), cfg.num_hidden_layers, rngs)
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=jnp.dtype(cfg.param_dtype))

    def __call__(
        self,
        input_ids: jax.Array | None = None,
        *,
        inputs_embeds: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        rope: tuple[jax.Array, jax.Array] | None = None,
        segment_ids: jax.Array | None = None,
        branch_ids: jax.Array | None = None,
        cache: KVCache | None = None,
        cache_index: jax.Array | int = 0,
    ) -> tuple[jax.Array, KVCache | None]:
        """Returns the final-norm hidden states [B, S, E] and the updated cache.

        attention_mask [B, S] (True = real token) covers the S new tokens. positions [B, S] default to the count of
        real tokens before each one (so left padding does not shift them); `rope` = (cos, sin) [B, S, head_dim]
        overrides them (M-RoPE). segment_ids [B, S] restrict attention to equal ids (packed rows; no cache).
        branch_ids [B, S] put continuations of one prompt in one row: a token of branch k > 0 sees the shared trunk
        (id 0) and its own branch, never another branch (a preference pair's prompt computed once; no cache).
        With `cache`, the tokens are written at slots cache_index.. and attend to every valid earlier slot.
        """
        cfg = self.cfg
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds.astype(cfg.compute_dtype)
        x = constrain(x, ("batch", "seq", "embed"))  # [B, S, E]
        b, s, _ = x.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, s), bool)
        attention_mask = attention_mask.astype(bool)
        q_slots = jnp.arange(s) + cache_index
        if cache is None:
            valid = attention_mask
            kv_slots = jnp.arange(s)
        else:
            if segment_ids is not None or branch_ids is not None:
                raise ValueError("segment_ids / branch_ids cannot be combined with a KV cache")
            valid = jax.lax.dynamic_update_slice(cache.valid, attention_mask, (0, cache_index))
            kv_slots = jnp.arange(cache.max_len)
        mask = attention_mask_for(q_slots, kv_slots, valid, segment_ids)
        if branch_ids is not None:
            mask = mask & ((branch_ids[:, None, :] == 0) | (branch_ids[:, None, :] == branch_ids[:, :, None]))
        if rope is None:
            if positions is None:
                # count of real tokens strictly before each slot: robust to left padding and to decoding
                before = jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1
                positions = jax.lax.dynamic_slice_in_dim(before, cache_index, s, axis=1)
                positions = jnp.maximum(positions, 0)
            rope = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
        cos, sin = rope

        def body(layer, h, kv):
            h, kv = layer(h, cos, sin, mask, kv, cache_index)
            return h, kv

        xs = None if cache is None else (cache.k, cache.v)
        x, new_kv = scan_layers(self.layers, body, x, xs, remat=cfg.remat, unroll=cfg.scan_unroll)
        new_cache = None if cache is None else KVCache(new_kv[0], new_kv[1], valid)
        return self.norm(x), new_cache


def attention_mask_for(q_slots, kv_slots, valid, segment_ids):
    return attention_mask(q_slots, kv_slots, valid, causal=True, q_segments=segment_ids, kv_segments=segment_ids)


class Qwen2ForCausalLM(nnx.Module):
    def __init__(self, cfg: Qwen2Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.model = Qwen2Model(cfg, rngs=rngs)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(
            cfg.hidden_size, cfg.vocab_size, axes=("embed", "vocab"), dtype=cfg.compute_dtype,
            param_dtype=jnp.dtype(cfg.param_dtype), precision=cfg.precision, init_std=cfg.initializer_range,
            rngs=rngs)

    def logits(self, hidden: jax.Array) -> jax.Array:
        out = self.model.embed_tokens.attend(hidden) if self.lm_head is None else self.lm_head(hidden)
        return constrain(out, ("batch", "seq", "vocab"))  # [B, S, V]

    def hidden_states(self, input_ids: jax.Array, **kwargs) -> tuple[jax.Array, KVCache | None]:
        """Final-norm hidden states [B, S, E] and the cache: the model without its head, as R1V and Qwen2.5-VL have
        it (so objectives that run the head themselves, e.g. MPO's chunked log-probs, take a text-only policy too).
        Keyword arguments are Qwen2Model's (attention_mask, positions, branch_ids, cache, ...)."""
        return self.model(input_ids, **kwargs)

    def __call__(self, input_ids: jax.Array, **kwargs) -> tuple[jax.Array, KVCache | None]:
        hidden, cache = self.hidden_states(input_ids, **kwargs)
        return self.logits(hidden), cache

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        cfg = self.cfg
        return KVCache.init(cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim,
                            dtype or cfg.compute_dtype)
