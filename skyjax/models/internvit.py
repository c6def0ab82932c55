"""InternViT (InternViT-6B-448px-V2_5 and its 300M siblings): the vision encoder of Skywork R1V / InternVL.

    pixel_values [N, 3, S, S] (one row per 448x448 tile)
      -> patch_embedding (the Conv2d p x p / stride p as a dense layer on flattened patches)   [N, P, E]
      -> prepend class_embedding, add position_embedding (bicubic-resized if S differs)        [N, 1 + P, E]
      -> L x [x + ls1 * proj(MHA(q_norm(q), k_norm(k), v))(norm1(x));  x + ls2 * fc2(gelu(fc1(norm2(x))))]
      -> (no final norm) hidden states of layer `num_layers`                                  [N, 1 + P, E]

q_norm / k_norm are RMSNorms over the FULL width (all heads together), applied before the head split; norm1/norm2 are
RMSNorm or LayerNorm (`norm_type`). Each tile attends only to itself (tiles are the batch axis).

Our parameters keep q, k and v as separate projections (as transformers' native InternVL does); the remote-code
layout's fused `attn.qkv` is split by rows on conversion (`skyjax.convert.internvl`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from skyjax.nn.attention import dot_product_attention
from skyjax.nn.layers import LayerNorm, Linear, RMSNorm, normal_init
from skyjax.nn.runtime import PRECISIONS, check_runtime
from skyjax.nn.scan import scan_layers, stacked
from skyjax.parallel.rules import constrain

NORM_TYPES = ("rms_norm", "layer_norm")


def _square(value: Any, key: str) -> int:
    """transformers' native config stores image_size / patch_size as [h, w]; InternViT needs them square."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise NotImplementedError(f"vision {key} {list(value)} is not square; InternViT tiles are square")
        value = value[0]
    return int(value)


@dataclasses.dataclass(frozen=True)
class InternViTConfig:
    # architecture
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    image_size: int = 448  # the size the position table was trained for (other tile sizes interpolate it)
    patch_size: int = 14
    num_channels: int = 3
    norm_type: str = "rms_norm"  # 'rms_norm' (6B) or 'layer_norm' (300M)
    layer_norm_eps: float = 1e-6  # norm1/norm2 and (as in the remote code) q_norm/k_norm
    qk_normalization: bool = True
    qkv_bias: bool = False
    layer_scale_init: float = 0.1  # initial ls1/ls2 (remote `initializer_factor`, native `layer_scale_init_value`)
    initializer_range: float = 0.02
    # runtime: how it computes, not what it computes
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    attention_impl: str = "xla"
    scan_unroll: int = 1
    matmul_precision: str = "default"

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"vision hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"vision image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.norm_type not in NORM_TYPES:
            raise ValueError(f"vision norm_type {self.norm_type!r} is not one of {NORM_TYPES}")
        check_runtime(self)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid(self) -> int:
        """Patches per side of the position table (32 for 448 / 14)."""
        return self.image_size // self.patch_size

    @property
    def patch_dim(self) -> int:
        """Features per flattened patch: C * p * p (588), in the Conv2d weight's (C, kh, kw) order."""
        return self.num_channels * self.patch_size**2

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def precision(self):
        return PRECISIONS[self.matmul_precision]

    def layers_for(self, select_layer: int) -> int:
        """How many layers produce hidden state `select_layer` (-1: all; k >= 0: the first k; 0: the embeddings).

        Hidden states are indexed as in both references' `hidden_states` tuples: L + 1 entries, entry 0 the
        embeddings, entry k the output of layer k.
        """
        n = self.num_hidden_layers + 1
        if not -n <= select_layer < n:
            raise ValueError(f"select_layer {select_layer} out of range for {self.num_hidden_layers} vision layers "
                             f"(valid: {-n}..{n - 1})")
        return select_layer % n

    @classmethod
    def from_hf(cls, config: dict[str, Any], **runtime) -> "InternViTConfig":
        """From a `vision_config` dict: the remote-code InternVisionConfig (`qk_normalization`, `qkv_bias`,
        `initializer_factor`) or transformers' InternVLVisionConfig (`use_qk_norm`, `attention_bias`,
        `layer_scale_init_value`, [h, w] sizes)."""
        c = dict(config)
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            if key not in c:
                raise KeyError(f"vision_config has no {key!r}")
        act = c.get("hidden_act", "gelu")
        if act != "gelu":
            raise NotImplementedError(f"vision hidden_act {act!r} is not supported (InternViT uses exact 'gelu')")
        if c.get("use_mean_pooling") is False:
            raise NotImplementedError("vision use_mean_pooling false adds a final LayerNorm that InternViT "
                                      "checkpoints do not have; not supported")
        if c.get("use_absolute_position_embeddings") is False:
            raise NotImplementedError("vision use_absolute_position_embeddings false is not supported")
        if c.get("use_mask_token"):
            raise NotImplementedError("vision use_mask_token (masked image modelling) is not supported")
        # missing keys take each reference config class's own defaults
        native = "use_qk_norm" in c or "attention_bias" in c or c.get("model_type") == "internvl_vision"
        return cls(
            hidden_size=c["hidden_size"],
            num_hidden_layers=c["num_hidden_layers"],
            num_attention_heads=c["num_attention_heads"],
            intermediate_size=c["intermediate_size"],
            image_size=_square(c.get("image_size", 448 if native else 224), "image_size"),
            patch_size=_square(c.get("patch_size", 14), "patch_size"),
            num_channels=c.get("num_channels", 3),
            norm_type=c.get("norm_type", "layer_norm" if native else "rms_norm"),
            layer_norm_eps=float(c.get("layer_norm_eps", 1e-6)),
            qk_normalization=bool(c.get("use_qk_norm", False) if native else c.get("qk_normalization", True)),
            qkv_bias=bool(c.get("attention_bias", False) if native else c.get("qkv_bias", False)),
            layer_scale_init=float(c.get("layer_scale_init_value", 0.1) if native
                                   else c.get("initializer_factor", 0.1)),
            initializer_range=c.get("initializer_range", 0.02),
            **runtime,
        )

    def to_hf(self) -> dict[str, Any]:
        """transformers' native `InternVLVisionConfig` (use_mean_pooling true: no final norm)."""
        return {
            "model_type": "internvl_vision",
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "intermediate_size": self.intermediate_size,
            "image_size": [self.image_size, self.image_size],
            "patch_size": [self.patch_size, self.patch_size],
            "num_channels": self.num_channels,
            "norm_type": self.norm_type,
            "layer_norm_eps": self.layer_norm_eps,
            "use_qk_norm": self.qk_normalization,
            "attention_bias": self.qkv_bias,
            "layer_scale_init_value": self.layer_scale_init,
            "hidden_act": "gelu",
            "use_mean_pooling": True,
            "use_absolute_position_embeddings": True,
            "use_mask_token": False,
            "initializer_range": self.initializer_range,
            "attention_dropout": 0.0,
            "projection_dropout": 0.0,
            "hidden_dropout_prob": 0.0,
        }

    def to_remote(self) -> dict[str, Any]:
        """The remote-code `InternVisionConfig` (InternVL-chat / Skywork-R1V `vision_config`)."""
        return {
            "architectures": ["InternVisionModel"],
            "model_type": "intern_vit_6b",
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "intermediate_size": self.intermediate_size,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "num_channels": self.num_channels,
            "norm_type": self.norm_type,
            "layer_norm_eps": self.layer_norm_eps,
            "qk_normalization": self.qk_normalization,
            "qkv_bias": self.qkv_bias,
            "initializer_factor": self.layer_scale_init,
            "initializer_range": self.initializer_range,
            "hidden_act": "gelu",
            "dropout": 0.0,
            "attention_dropout": 0.0,
            "drop_path_rate": 0.0,
            "use_flash_attn": False,
        }

    @classmethod
    def tiny(cls, **overrides) -> "InternViTConfig":
        """2 layers, 56 px tiles of 14 px patches (4 x 4 patches, 4 LLM tokens per tile after pixel shuffle)."""
        base = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=56,
                    patch_size=14)
        return cls(**{**base, **overrides})

    @classmethod
    def internvit_6b_448px_v2_5(cls, **runtime) -> "InternViTConfig":
        """InternViT-6B-448px-V2_5, Skywork-R1V-38B's encoder (5.536B parameters)."""
        return cls(hidden_size=3200, num_hidden_layers=45, num_attention_heads=25, intermediate_size=12800,
                   image_size=448, patch_size=14, norm_type="rms_norm", layer_norm_eps=1e-6, qk_normalization=True,
                   qkv_bias=False, **runtime)


# --- position-table interpolation -------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) float32 matrix W such that W @ x is torch's 1-D bicubic resize (align_corners False, A = -0.75,
    edge-clamped taps). The identity when in_size == out_size."""
    a = -0.75

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    w = np.zeros((out_size, in_size), np.float64)
    scale = in_size / out_size
    for d in range(out_size):
        src = (d + 0.5) * scale - 0.5  # no clamp at 0 for cubic, as torch
        i0 = math.floor(src)
        t = src - i0
        for k, c in enumerate((far(t + 1), near(t), near(1 - t), far(2 - t))):
            w[d, min(max(i0 - 1 + k, 0), in_size - 1)] += c
    return w.astype(np.float32)


def resize_position_table(table: jax.Array, grid: int, out_h: int, out_w: int) -> jax.Array:
    """table [grid * grid, E] -> [out_h * out_w, E], bicubic in fp32 (identity at the native size)."""
    if (out_h, out_w) == (grid, grid):
        return table
    t = table.astype(jnp.float32).reshape(grid, grid, -1)
    wh, ww = jnp.asarray(bicubic_matrix(grid, out_h)), jnp.asarray(bicubic_matrix(grid, out_w))
    hi = jax.lax.Precision.HIGHEST
    t = jnp.einsum("oh,hwe->owe", wh, t, precision=hi)
    t = jnp.einsum("pw,owe->ope", ww, t, precision=hi)
    return t.reshape(out_h * out_w, -1).astype(table.dtype)


# --- modules ----------------------------------------------------------------------------------------------------------


def _linear_kw(cfg: InternViTConfig, rngs: nnx.Rngs) -> dict:
    return dict(dtype=cfg.compute_dtype, param_dtype=jnp.dtype(cfg.param_dtype), precision=cfg.precision,
                init_std=cfg.initializer_range, rngs=rngs)


def _norm(cfg: InternViTConfig) -> nnx.Module:
    cls = RMSNorm if cfg.norm_type == "rms_norm" else LayerNorm
    return cls(cfg.hidden_size, eps=cfg.layer_norm_eps, param_dtype=jnp.dtype(cfg.param_dtype))


class VisionEmbeddings(nnx.Module):
    """Patch embedding + class token + (interpolated) absolute positions."""

    def __init__(self, cfg: InternViTConfig, *, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        self.patch_embedding = Linear(cfg.patch_dim, cfg.hidden_size, axes=("patch_in", "vision_embed"),
                                      use_bias=True, **_linear_kw(cfg, rngs))
        std = cfg.initializer_range
        self.class_embedding = nnx.Param(normal_init(std)(rngs.params(), (1, 1, cfg.hidden_size), pd),
                                         axes=(None, None, "vision_embed"))
        self.position_embedding = nnx.Param(
            normal_init(std)(rngs.params(), (1, cfg.grid**2 + 1, cfg.hidden_size), pd),
            axes=(None, None, "vision_embed"))
        self.cfg = cfg

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        cfg = self.cfg
        n, c, h, w = pixel_values.shape
        p = cfg.patch_size
        if c != cfg.num_channels or h % p or w % p:
            raise ValueError(f"pixel_values {tuple(pixel_values.shape)}: expected [tiles, {cfg.num_channels}, H, W] "
                             f"with H and W multiples of patch_size {p}")
        gh, gw = h // p, w // p
        # [N, C, gh, p, gw, p] -> [N, gh, gw, C, p, p]: patches row-major, features in the Conv2d weight's order
        patches = pixel_values.reshape(n, c, gh, p, gw, p).transpose(0, 2, 4, 1, 3, 5).reshape(n, gh * gw, -1)
        x = self.patch_embedding(patches)  # [N, P, E]
        dtype = x.dtype
        cls = jnp.broadcast_to(self.class_embedding[...].astype(dtype), (n, 1, cfg.hidden_size))
        x = jnp.concatenate([cls, x], axis=1)  # [N, 1 + P, E]
        table = self.position_embedding[...][0]  # [1 + grid^2, E]
        pos = jnp.concatenate([table[:1], resize_position_table(table[1:], cfg.grid, gh, gw)], axis=0)
        return x + pos.astype(dtype)[None]


class VisionAttention(nnx.Module):
    def __init__(self, cfg: InternViTConfig, *, rngs: nnx.Rngs):
        kw = _linear_kw(cfg, rngs)
        e = cfg.hidden_size
        self.q_proj = Linear(e, e, axes=("vision_embed", "vision_heads"), use_bias=cfg.qkv_bias, **kw)
        self.k_proj = Linear(e, e, axes=("vision_embed", "vision_heads"), use_bias=cfg.qkv_bias, **kw)
        self.v_proj = Linear(e, e, axes=("vision_embed", "vision_heads"), use_bias=cfg.qkv_bias, **kw)
        pd = jnp.dtype(cfg.param_dtype)
        # over the full width, before the head split; the remote code uses layer_norm_eps here
        self.q_norm = RMSNorm(e, eps=cfg.layer_norm_eps, param_dtype=pd) if cfg.qk_normalization else None
        self.k_norm = RMSNorm(e, eps=cfg.layer_norm_eps, param_dtype=pd) if cfg.qk_normalization else None
        self.proj = Linear(e, e, axes=("vision_heads", "vision_embed"), use_bias=True, **kw)
        self.cfg = cfg

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [N, S, E] -> [N, S, E]; every tile attends to all of itself."""
        cfg = self.cfg
        n, s, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        shape = (n, s, cfg.num_attention_heads, cfg.head_dim)
        axes = ("batch", "patches", "vision_heads", "head_dim")
        q, k, v = (constrain(t.reshape(shape), axes) for t in (q, k, v))
        out = dot_product_attention(q, k, v, None, impl=cfg.attention_impl, precision=cfg.precision)
        return self.proj(out.reshape(n, s, cfg.hidden_size))


class VisionMLP(nnx.Module):
    def __init__(self, cfg: InternViTConfig, *, rngs: nnx.Rngs):
        kw = _linear_kw(cfg, rngs)
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, axes=("vision_embed", "vision_mlp"), use_bias=True,
                          **kw)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, axes=("vision_mlp", "vision_embed"), use_bias=True,
                          **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.gelu(self.fc1(x), approximate=False)  # [N, S, I]
        return self.fc2(constrain(h, ("batch", "patches", "vision_mlp")))


class VisionLayer(nnx.Module):
    def __init__(self, cfg: InternViTConfig, *, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        self.norm1 = _norm(cfg)
        self.attn = VisionAttention(cfg, rngs=rngs)
        self.ls1 = nnx.Param(jnp.full((cfg.hidden_size,), cfg.layer_scale_init, pd), axes=("norm",))
        self.norm2 = _norm(cfg)
        self.mlp = VisionMLP(cfg, rngs=rngs)
        self.ls2 = nnx.Param(jnp.full((cfg.hidden_size,), cfg.layer_scale_init, pd), axes=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x)) * self.ls1[...].astype(x.dtype)
        x = x + self.mlp(self.norm2(x)) * self.ls2[...].astype(x.dtype)
        return constrain(x, ("batch", "patches", "vision_embed"))


class InternViT(nnx.Module):
    """`__call__(pixel_values [N, C, H, W], num_layers=None) -> hidden states [N, 1 + P, E]` (CLS first)."""

    def __init__(self, cfg: InternViTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embeddings = VisionEmbeddings(cfg, rngs=rngs)
        self.layers = stacked(lambda r: VisionLayer(cfg, rngs=r), cfg.num_hidden_layers, rngs)

    def __call__(self, pixel_values: jax.Array, num_layers: int | None = None) -> jax.Array:
        """The output of layer `num_layers` (default all; 0 = the embeddings). Only those layers run: the scan
        stops early over the first `num_layers` slices of the stacked parameters (the rest get zero gradient)."""
        cfg = self.cfg
        total = cfg.num_hidden_layers
        n = total if num_layers is None else int(num_layers)
        if not 0 <= n <= total:
            raise ValueError(f"num_layers {n} out of range 0..{total}")
        x = self.embeddings(pixel_values.astype(cfg.compute_dtype))
        x = constrain(x, ("batch", "patches", "vision_embed"))  # [N, 1 + P, E]
        if n == 0:
            return x
        layers = self.layers
        if n < total:
            graphdef, state = nnx.split(layers)
            layers = nnx.merge(graphdef, jax.tree.map(lambda a: a[:n], state))

        def body(layer, h, _):
            return layer(h), None

        x, _ = scan_layers(layers, body, x, None, remat=cfg.remat, unroll=cfg.scan_unroll)
        return x
