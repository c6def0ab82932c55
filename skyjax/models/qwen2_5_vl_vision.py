"""Qwen2.5-VL vision tower: patches -> windowed ViT with 2-D RoPE -> 2x2 patch merger -> LLM-width image features.

    pixel_values [N, C*T*p*p] -> patch_embed (the Conv3d as a dense layer) -> permute merge units into window order
        -> depth x [RMSNorm -> attention (qkv bias, 2-D RoPE, window or full segments) -> + -> RMSNorm -> SwiGLU -> +]
        -> merger (RMSNorm, concat 2x2 patches, Linear, GELU, Linear) -> undo the window permutation

Static shapes: everything that depends on the image sizes (window permutation, rotary ids, attention segments) is
computed on the host by `vision_inputs` as numpy arrays of a fixed length `pad_to` (a bucket), so every image mix
that fits the bucket runs the same compiled program. Padding patches form their own attention segment (id -1):
they never attend to, nor are attended by, real patches, and their merged rows (at the end) are zeroed.

Video (grid t > 1) is not supported: `vision_inputs` raises NotImplementedError.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from skyjax.nn.attention import attention_mask, dot_product_attention
from skyjax.nn.layers import Linear, RMSNorm, SwiGLU
from skyjax.nn.rotary import apply_rotary, inverse_frequencies
from skyjax.nn.runtime import PRECISIONS, check_runtime
from skyjax.nn.scan import scan_layers, stacked
from skyjax.parallel.rules import constrain

PAD_SEGMENT = -1  # attention segment id of padding patches

# Keys of the dict `vision_inputs` returns and `Qwen2_5_VLVisionModel.__call__` reads.
META_KEYS = ("window_index", "reverse_index", "rope_ids", "window_segment", "image_segment", "valid",
             "valid_merged")


@dataclasses.dataclass(frozen=True)
class Qwen2_5_VLVisionConfig:
    # architecture (Hugging Face `vision_config` names)
    depth: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    out_hidden_size: int
    fullatt_block_indexes: tuple[int, ...]
    in_channels: int = 3  # HF 4.x hub configs spell it `in_chans`
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112  # in pixels: windows are window_size // spatial_merge_size // patch_size merge units wide
    tokens_per_second: int = 2  # used by the LLM's M-RoPE for video, kept for the round trip
    rms_norm_eps: float = 1e-6  # HF hard-codes 1e-6 (blocks and merger)
    rope_theta: float = 10000.0
    initializer_range: float = 0.02
    # runtime: how it computes, not what it computes
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    attention_impl: str = "xla"
    scan_unroll: int = 1
    matmul_precision: str = "default"
    # The most patches one image may have (the image processor's max_pixels / patch_size^2), when the run knows it:
    # full-attention blocks then attend by blocks of neighbouring patches instead of under the dense N x N mask
    # (see attention_plan), and `vision_inputs` rejects a larger image. None: no bound, the dense mask.
    max_image_patches: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "fullatt_block_indexes", tuple(int(i) for i in self.fullatt_block_indexes))
        if self.hidden_size % self.num_heads:
            raise ValueError(f"vision hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if self.head_dim % 4:
            raise ValueError(f"vision head_dim {self.head_dim} must be a multiple of 4 (2-D rotary over row and col)")
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"fullatt_block_indexes {bad} out of range for depth {self.depth}")
        if self.window_units < 1:
            raise ValueError(
                f"window_size {self.window_size} is smaller than one merge unit "
                f"({self.spatial_merge_size} x patch {self.patch_size} pixels)"
            )
        if self.max_image_patches is not None and self.max_image_patches < self.merge_unit:
            raise ValueError(f"max_image_patches {self.max_image_patches} is smaller than one merge unit "
                             f"({self.merge_unit} patches)")
        check_runtime(self)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Features per patch row of pixel_values: C * T * p * p (1176 for Qwen2.5-VL)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        """Patches per merged token (4)."""
        return self.spatial_merge_size**2

    @property
    def window_units(self) -> int:
        """Window side in merge units (HF `vit_merger_window_size`, 4 for Qwen2.5-VL)."""
        return self.window_size // self.spatial_merge_size // self.patch_size

    @property
    def window_patches(self) -> int:
        """The most patches one window holds (64 for Qwen2.5-VL): windows are contiguous runs in window order."""
        return self.window_units**2 * self.merge_unit

    @property
    def is_full_attention(self) -> tuple[bool, ...]:
        """Per block: full (per-image) attention, else window attention."""
        return tuple(i in self.fullatt_block_indexes for i in range(self.depth))

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def precision(self):
        return PRECISIONS[self.matmul_precision]

    @classmethod
    def from_hf(cls, config: dict[str, Any], **runtime) -> "Qwen2_5_VLVisionConfig":
        """From a Hugging Face `vision_config` dict (or a whole Qwen2.5-VL config.json holding one)."""
        c = dict(config.get("vision_config") or config)
        act = c.get("hidden_act", "silu")
        if act != "silu":
            raise NotImplementedError(f"vision hidden_act {act!r} is not supported (Qwen2.5-VL uses 'silu')")
        for key in ("depth", "hidden_size", "num_heads", "intermediate_size", "out_hidden_size"):
            if key not in c:
                raise KeyError(f"vision_config has no {key!r}")
        rope = c.get("rope_parameters") or {}
        for key in ("patch_size", "temporal_patch_size"):
            if isinstance(c.get(key), (list, tuple)):
                raise NotImplementedError(f"vision {key} {c[key]} (non-square) is not supported")
        return cls(
            depth=c["depth"],
            hidden_size=c["hidden_size"],
            num_heads=c["num_heads"],
            intermediate_size=c["intermediate_size"],
            out_hidden_size=c["out_hidden_size"],
            fullatt_block_indexes=tuple(c.get("fullatt_block_indexes", (7, 15, 23, 31))),
            in_channels=c.get("in_channels", c.get("in_chans", 3)),
            patch_size=c.get("patch_size", 14),
            temporal_patch_size=c.get("temporal_patch_size", 2),
            spatial_merge_size=c.get("spatial_merge_size", 2),
            window_size=c.get("window_size", 112),
            tokens_per_second=c.get("tokens_per_second", 2),
            rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
            initializer_range=c.get("initializer_range", 0.02),
            **runtime,
        )

    def to_hf(self) -> dict[str, Any]:
        """A `vision_config` dict that transformers' Qwen2_5_VLVisionConfig (5.x) and hub 4.x loaders accept."""
        return {
            "depth": self.depth,
            "hidden_size": self.hidden_size,
            "hidden_act": "silu",
            "intermediate_size": self.intermediate_size,
            "num_heads": self.num_heads,
            "in_chans": self.in_channels,
            "in_channels": self.in_channels,
            "out_hidden_size": self.out_hidden_size,
            "patch_size": self.patch_size,
            "spatial_merge_size": self.spatial_merge_size,
            "spatial_patch_size": self.patch_size,
            "temporal_patch_size": self.temporal_patch_size,
            "window_size": self.window_size,
            "fullatt_block_indexes": list(self.fullatt_block_indexes),
            "tokens_per_second": self.tokens_per_second,
            "initializer_range": self.initializer_range,
            "rope_parameters": {"rope_type": "axial", "rope_theta": self.rope_theta},
        }

    @classmethod
    def tiny(cls, **overrides) -> "Qwen2_5_VLVisionConfig":
        """4 blocks (1 and 3 full attention), real patch geometry (1176 features, 4x4-unit windows)."""
        base = dict(depth=4, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=64,
                    fullatt_block_indexes=(1, 3), window_size=112)
        return cls(**{**base, **overrides})

    @classmethod
    def qwen2_5_vl_7b(cls, **runtime) -> "Qwen2_5_VLVisionConfig":
        """The vision tower of Qwen2.5-VL-7B (676.6M parameters)."""
        return cls(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420, out_hidden_size=3584,
                   fullatt_block_indexes=(7, 15, 23, 31), window_size=112, tokens_per_second=2, **runtime)


# --- host-side inputs -------------------------------------------------------------------------------------------------


def _check_grid(grid_thw, cfg: Qwen2_5_VLVisionConfig) -> np.ndarray:
    grid = np.asarray(grid_thw, dtype=np.int64)
    if grid.ndim == 1:
        grid = grid[None]
    if grid.ndim != 2 or grid.shape[1] != 3:
        raise ValueError(f"grid_thw must have shape (n_images, 3), got {grid.shape}")
    m, bound = cfg.spatial_merge_size, cfg.max_image_patches
    for i, (t, h, w) in enumerate(grid.tolist()):
        if t != 1:
            raise NotImplementedError(
                f"grid_thw[{i}] = {(t, h, w)}: video (grid t = {t} > 1) is not supported by the skyjax Qwen2.5-VL "
                f"vision tower; only still images (t = 1)"
            )
        if h <= 0 or w <= 0 or h % m or w % m:
            raise ValueError(f"grid_thw[{i}] = {(t, h, w)}: h and w must be positive multiples of "
                             f"spatial_merge_size {m}")
        if bound is not None and t * h * w > bound:
            raise ValueError(f"grid_thw[{i}] = {(t, h, w)}: {t * h * w} patches exceed the vision config's "
                             f"max_image_patches {bound} (the image processor's max_pixels / patch_size^2); "
                             f"resize the image with the run's max_pixels or raise the bound")
    return grid


def bucket_size(num_patches: int, buckets: Sequence[int]) -> int:
    """The smallest bucket holding `num_patches` patches (buckets are patch counts, multiples of the merge unit)."""
    fits = sorted(b for b in buckets if b >= num_patches)
    if not fits:
        raise ValueError(f"{num_patches} patches do not fit the largest vision bucket {max(buckets)}")
    return fits[0]


def vision_inputs(grid_thw, cfg: Qwen2_5_VLVisionConfig, pad_to: int | None = None) -> dict[str, np.ndarray]:
    """Per-patch metadata for `Qwen2_5_VLVisionModel`, padded to `pad_to` patches (default: no padding).

    grid_thw: (n_images, 3) = (t, h, w) in patches, as the image processor returns it. Returns numpy arrays, with
    U = pad_to / merge_unit merge units ("window order" is the order the blocks see):
        window_index   [U] int32   window-order unit j is original unit window_index[j] (padding units last, fixed)
        reverse_index  [U] int32   its inverse permutation (argsort)
        rope_ids       [pad_to, 2] int32  (row, col) of every patch, in window order (padding: 0)
        window_segment [pad_to] int32     window id of every patch in window order (padding: -1)
        image_segment  [pad_to] int32     image id of every patch in window order (padding: -1)
        valid          [pad_to] bool      real patch, window order
        valid_merged   [U] bool           real merged token, original order (= the first sum(t*h*w)/4 rows)
    """
    grid = _check_grid(grid_thw, cfg)
    m, unit, ws = cfg.spatial_merge_size, cfg.merge_unit, cfg.window_units
    n = int(np.prod(grid, axis=1).sum())
    pad_to = n if pad_to is None else int(pad_to)
    if pad_to % unit:
        raise ValueError(f"pad_to {pad_to} is not a multiple of the merge unit {unit} patches")
    if n > pad_to:
        raise ValueError(f"{n} patches (grid_thw {grid.tolist()}) do not fit pad_to = {pad_to}")
    units, units_pad = n // unit, pad_to // unit

    window_index, unit_window, unit_image, rope = [], [], [], []
    base, window_id = 0, 0
    for image, (_, h, w) in enumerate(grid.tolist()):
        gh, gw = h // m, w // m
        ids = base + np.arange(gh * gw).reshape(gh, gw)
        for y in range(0, gh, ws):  # windows row-major, units row-major inside; edge windows are partial
            for x in range(0, gw, ws):
                block = ids[y:y + ws, x:x + ws].reshape(-1)
                window_index.append(block)
                unit_window.append(np.full(block.size, window_id))
                window_id += 1
        unit_image.append(np.full(gh * gw, image))
        # (row, col) of every patch, in merge-block order (block_row, block_col, in_row, in_col)
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        blocks = lambda a: a.reshape(gh, m, gw, m).transpose(0, 2, 1, 3).reshape(-1)  # noqa: E731
        rope.append(np.stack([blocks(rows), blocks(cols)], axis=-1))
        base += gh * gw

    pad_units = np.arange(units, units_pad)
    window_index = np.concatenate(window_index + [pad_units]).astype(np.int32)
    unit_window_w = np.concatenate(unit_window + [np.full(pad_units.size, PAD_SEGMENT)])  # already window order
    unit_image_o = np.concatenate(unit_image + [np.full(pad_units.size, PAD_SEGMENT)])  # original order
    rope_o = np.concatenate(rope + [np.zeros((pad_to - n, 2), np.int64)]).reshape(units_pad, unit, 2)
    return {
        "window_index": window_index,
        "reverse_index": np.argsort(window_index).astype(np.int32),
        "rope_ids": rope_o[window_index].reshape(pad_to, 2).astype(np.int32),
        "window_segment": np.repeat(unit_window_w, unit).astype(np.int32),
        "image_segment": np.repeat(unit_image_o[window_index], unit).astype(np.int32),
        "valid": np.repeat(window_index < units, unit),
        "valid_merged": np.arange(units_pad) < units,
    }


def pad_pixel_values(pixel_values: np.ndarray, pad_to: int) -> np.ndarray:
    """Zero rows appended to pixel_values [N, patch_dim] up to [pad_to, patch_dim]."""
    pixel_values = np.asarray(pixel_values)
    n = pixel_values.shape[0]
    if n > pad_to:
        raise ValueError(f"{n} patches do not fit pad_to = {pad_to}")
    return np.concatenate([pixel_values, np.zeros((pad_to - n, *pixel_values.shape[1:]), pixel_values.dtype)])


# --- modules ----------------------------------------------------------------------------------------------------------


def vision_rope_cos_sin(rope_ids: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """rope_ids [..., 2] (row, col) -> cos, sin [..., head_dim] fp32: emb = concat(E, E), E = (row*inv, col*inv)."""
    inv = inverse_frequencies(head_dim // 2, theta)  # [head_dim/4]
    freqs = rope_ids.astype(jnp.float32)[..., None] * inv  # [..., 2, head_dim/4]
    e = freqs.reshape(*freqs.shape[:-2], -1)  # [..., head_dim/2]: rows then cols
    emb = jnp.concatenate([e, e], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def _linear_kw(cfg: Qwen2_5_VLVisionConfig, rngs: nnx.Rngs) -> dict:
    return dict(dtype=cfg.compute_dtype, param_dtype=jnp.dtype(cfg.param_dtype), precision=cfg.precision,
                init_std=cfg.initializer_range, rngs=rngs)


class PatchEmbed(nnx.Module):
    """The Conv3d with kernel = stride = (T, p, p) and no bias, as a dense layer on flattened patches."""

    def __init__(self, cfg: Qwen2_5_VLVisionConfig, *, rngs: nnx.Rngs):
        self.proj = Linear(cfg.patch_dim, cfg.hidden_size, axes=("patch_in", "vision_embed"), use_bias=False,
                           **_linear_kw(cfg, rngs))

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        return self.proj(pixel_values)


def segment_reach(max_len: int, block: int) -> int:
    """How many neighbouring blocks on each side hold the rest of a contiguous segment of at most `max_len`
    positions, seen from any block of `block` positions: ceil((max_len - 1) / block)."""
    return -(-(max_len - 1) // block)


def blocked_segment_attention(q, k, v, segments, block: int, reach: int = 1, **kw) -> jax.Array:
    """Attention within segments that are contiguous runs of positions (vision windows, or whole images).

    q/k/v [B, N, H, D], segments [B, N] with N a multiple of `block`. When no segment is longer than
    `reach * block + 1` positions, every key of a query's segment lies in the query's block or in the `reach` blocks
    on either side, so query block i attends to those (2 * reach + 1) * block keys only, under the segment mask,
    instead of to all N: the same result as the dense block-diagonal mask (masked keys get weight exactly 0) for a
    fraction (2 * reach + 1) * block / N of the work and memory.
    """
    b, n, h, d = q.shape
    nb = n // block
    span = (2 * reach + 1) * block

    def neighbours(x, fill):  # [B, N, ...] -> [B, nb, span, ...]: each block with `reach` neighbours either side
        x = x.reshape(b, nb, block, *x.shape[2:])
        x = jnp.pad(x, [(0, 0), (reach, reach)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
        return jnp.concatenate([x[:, i:i + nb] for i in range(2 * reach + 1)], axis=2)

    kn, vn = neighbours(k, 0), neighbours(v, 0)
    seg_k = neighbours(segments, -2)  # outside the sequence: matches no segment (padding patches are -1)
    mask = segments.reshape(b, nb, block)[..., :, None] == seg_k[..., None, :]  # [B, nb, block, span]
    out = dot_product_attention(q.reshape(b * nb, block, h, d), kn.reshape(b * nb, span, *k.shape[2:]),
                                vn.reshape(b * nb, span, *v.shape[2:]), mask.reshape(b * nb, block, span), **kw)
    return out.reshape(b, n, h, d)


def attention_plan(n: int, max_segment: int | None, unit: int, max_copies: int = 9) -> tuple[int, int] | None:
    """(block, reach) for blocked attention over N positions whose segments are at most `max_segment` long, or None
    when the dense mask is as cheap (or the bound is unknown).

    Blocks are multiples of `unit` that divide N; among those whose key span (2 * reach + 1) * block is below N and
    whose neighbour copies of K/V (2 * reach + 1) stay within `max_copies`, the smallest span wins (ties: the
    larger block, fewer and larger matmuls)."""
    if max_segment is None or n % unit:
        return None
    best = None
    for block in range(unit, n + 1, unit):
        if n % block:
            continue
        reach = segment_reach(max_segment, block)
        span = (2 * reach + 1) * block
        if span >= n or 2 * reach + 1 > max_copies:
            continue
        if best is None or span < best[2] or (span == best[2] and block > best[0]):
            best = (block, reach, span)
    return None if best is None else best[:2]


class VisionAttention(nnx.Module):
    def __init__(self, cfg: Qwen2_5_VLVisionConfig, *, rngs: nnx.Rngs):
        kw = _linear_kw(cfg, rngs)
        self.qkv = Linear(cfg.hidden_size, 3 * cfg.hidden_size, axes=("vision_embed", "vision_heads"), use_bias=True,
                          **kw)
        self.proj = Linear(cfg.hidden_size, cfg.hidden_size, axes=("vision_heads", "vision_embed"), use_bias=True,
                           **kw)
        self.cfg = cfg

    def __call__(self, x, cos, sin, mask, segments=None, plan: tuple[int, int] | None = None):
        """x [B, S, E]; cos/sin [B, S, head_dim] fp32; mask [B, S, S] -> [B, S, E].

        With `plan` = (block, reach), attention runs within `segments` [B, S] (contiguous runs of at most
        reach * block + 1 positions) by blocks instead of under the dense `mask` (see blocked_segment_attention)."""
        cfg = self.cfg
        b, s, _ = x.shape
        qkv = self.qkv(x).reshape(b, s, 3, cfg.num_heads, cfg.head_dim)  # rows: q, k, v, each head-major
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        # rotary in fp32 as the reference (q, k upcast, rotated, cast back)
        q = apply_rotary(q.astype(jnp.float32), cos, sin).astype(q.dtype)
        k = apply_rotary(k.astype(jnp.float32), cos, sin).astype(k.dtype)
        axes = ("batch", "patches", "vision_heads", "head_dim")
        q, k, v = constrain(q, axes), constrain(k, axes), constrain(v, axes)
        kw = dict(impl=cfg.attention_impl, precision=cfg.precision)
        if plan is None:
            out = dot_product_attention(q, k, v, mask, **kw)
        else:
            out = blocked_segment_attention(q, k, v, segments, *plan, **kw)
        return self.proj(out.reshape(b, s, cfg.hidden_size))


class VisionBlock(nnx.Module):
    def __init__(self, cfg: Qwen2_5_VLVisionConfig, *, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        self.norm1 = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=pd)
        self.norm2 = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=pd)
        self.attn = VisionAttention(cfg, rngs=rngs)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, use_bias=True, embed_axis="vision_embed",
                          mlp_axis="vision_mlp", **_linear_kw(cfg, rngs))

    def __call__(self, x, cos, sin, mask, segments=None, plan: tuple[int, int] | None = None):
        x = x + self.attn(self.norm1(x), cos, sin, mask, segments, plan)
        x = x + self.mlp(self.norm2(x))
        return constrain(x, ("batch", "patches", "vision_embed"))


class PatchMerger(nnx.Module):
    """RMSNorm, then each merge unit's 4 consecutive patches concatenated -> Linear -> exact GELU -> Linear."""

    def __init__(self, cfg: Qwen2_5_VLVisionConfig, *, rngs: nnx.Rngs):
        kw = _linear_kw(cfg, rngs)
        merged = cfg.hidden_size * cfg.merge_unit
        self.ln_q = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=jnp.dtype(cfg.param_dtype))
        self.mlp_0 = Linear(merged, merged, axes=("merger_in", "vision_mlp"), use_bias=True, **kw)
        self.mlp_2 = Linear(merged, cfg.out_hidden_size, axes=("vision_mlp", "embed"), use_bias=True, **kw)
        self.merged = merged

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [N, E] (window order, N a multiple of the merge unit) -> [N / merge_unit, out_hidden]."""
        h = self.ln_q(x).reshape(-1, self.merged)
        h = jax.nn.gelu(self.mlp_0(h), approximate=False)
        return self.mlp_2(h)


class Qwen2_5_VLVisionModel(nnx.Module):
    """The vision tower. `__call__(pixel_values [N_pad, patch_dim], vision_inputs(...)) -> [N_pad / 4, out_hidden]`."""

    def __init__(self, cfg: Qwen2_5_VLVisionConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg, rngs=rngs)
        self.blocks = stacked(lambda r: VisionBlock(cfg, rngs=r), cfg.depth, rngs)
        self.merger = PatchMerger(cfg, rngs=rngs)

    def __call__(self, pixel_values: jax.Array, meta: dict[str, jax.Array]) -> jax.Array:
        """Merged image features [N_pad / merge_unit, out_hidden] in the original (grid) order of the images;
        rows of padding (where meta['valid_merged'] is False, always the last ones) are zero.

        `meta` is `vision_inputs(grid_thw, cfg, pad_to=N_pad)` (numpy or device arrays; extra keys are ignored).
        """
        cfg = self.cfg
        n, features = pixel_values.shape
        unit = cfg.merge_unit
        if features != cfg.patch_dim:
            raise ValueError(f"pixel_values has {features} features per patch, the vision config expects "
                             f"{cfg.patch_dim} (channels x temporal_patch x patch^2)")
        if meta["window_segment"].shape != (n,) or meta["window_index"].shape != (n // unit,):
            raise ValueError(f"vision meta is for {meta['window_segment'].shape[0]} patches but pixel_values has "
                             f"{n} rows: build both with the same pad_to")
        # Window order is a permutation of merge units. Applied to the (replicated) input rows, it costs one small
        # gather and never moves sharded activations (the patch embedding is per row, so the order commutes with it).
        pixels = jnp.take(pixel_values.reshape(n // unit, unit, features), meta["window_index"], axis=0)
        x = self.patch_embed(pixels.reshape(1, n, features))  # [1, N, E], window order
        x = constrain(x, ("batch", "patches", "vision_embed"))
        cos, sin = vision_rope_cos_sin(meta["rope_ids"][None], cfg.head_dim, cfg.rope_theta)  # [1, N, head_dim]
        window_seg, image_seg = meta["window_segment"][None], meta["image_segment"][None]
        # Window blocks attend within windows (<= window_patches contiguous patches), full blocks within images
        # (<= max_image_patches when the config bounds them): by blocks of neighbours when that is cheaper than
        # the dense N x N mask (see attention_plan). Runs of blocks of the same kind are scanned separately.
        kinds = {False: (window_seg, attention_plan(n, cfg.window_patches, cfg.window_patches, max_copies=3)),
                 True: (image_seg, attention_plan(n, cfg.max_image_patches, cfg.window_patches))}
        for start, stop, full in _runs(cfg.is_full_attention):
            seg, plan = kinds[full]
            mask = None
            if plan is None:
                slots = jnp.arange(n)
                mask = attention_mask(slots, slots, None, causal=False, q_segments=seg, kv_segments=seg)

            def body(block, h, _, mask=mask, seg=seg, plan=plan):
                return block(h, cos, sin, mask, seg, plan), None

            x, _ = scan_layers(self.blocks, body, x, remat=cfg.remat, unroll=cfg.scan_unroll,
                               layers=slice(start, stop))
        merged = self.merger(x[0])  # [U, out], window order
        merged = constrain(merged, (None, "embed"))  # gather the rows first: the inverse permutation is then local
        merged = jnp.take(merged, meta["reverse_index"], axis=0)  # original order
        return jnp.where(meta["valid_merged"][:, None], merged, jnp.zeros((), merged.dtype))

    @classmethod
    def hf_tensor_shapes(cls, cfg: Qwen2_5_VLVisionConfig, hf: str = "visual") -> dict[str, tuple[int, ...]]:
        """HF shapes our parameters cannot imply (the Conv3d kernel), for `export_params(hf_shapes=...)`."""
        p = cfg.patch_size
        return {f"{hf}.patch_embed.proj.weight": (cfg.hidden_size, cfg.in_channels, cfg.temporal_patch_size, p, p)}


# --- Hugging Face key map ---------------------------------------------------------------------------------------------


def _runs(flags: Sequence[bool]) -> list[tuple[int, int, bool]]:
    """Maximal runs of equal flags: [(start, stop, flag), ...]."""
    runs, start = [], 0
    for i in range(1, len(flags) + 1):
        if i == len(flags) or flags[i] != flags[start]:
            runs.append((start, i, bool(flags[start])))
            start = i
    return runs
