"""Skywork R1V (and InternVL-chat with a Qwen2 LLM): InternViT -> pixel shuffle -> MLP projector -> Qwen2 decoder.

    pixel_values [N_pad, 3, S, S] --vision_tower--> [N_pad, 1 + P, Ev] (hidden state `select_layer`)
        -> drop CLS -> [N_pad, g, g, Ev] -> pixel_shuffle(downsample_ratio, ps_version) -> [N_pad, T, Ev / r^2]
        -> projector: LayerNorm -> Linear -> GELU -> Linear -> [N_pad, T, E]       (T = tokens per tile, 256)
    input_ids [B, L] --embed--> [B, L, E]; the k-th <IMG_CONTEXT> token of the batch (row-major) takes feature row k
        -> Qwen2 decoder (1-D RoPE, causal) -> norm -> lm_head

Static shapes: tiles are padded to a bucket (`bucket_tiles`) and come after the real ones, so padding tiles' features
are never read. The number of <IMG_CONTEXT> tokens per row is checked on the host against the row's tiles
(`check_image_tokens`); a mismatch raises naming the row.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from skyjax.models.internvit import InternViT, InternViTConfig
from skyjax.models.qwen2 import Qwen2Config, Qwen2Model
from skyjax.nn.attention import KVCache
from skyjax.nn.layers import LayerNorm, Linear, merge_image_features
from skyjax.parallel.rules import constrain

PS_VERSIONS = ("v1", "v2")
IMAGE_TOKEN = "<IMG_CONTEXT>"


class ImageTokenMismatchError(ValueError):
    """The number of <IMG_CONTEXT> tokens in a row differs from what its tiles produce."""


@dataclasses.dataclass(frozen=True)
class R1VConfig:
    vision: InternViTConfig
    text: Qwen2Config
    downsample_ratio: float = 0.5
    ps_version: str = "v2"
    select_layer: int = -1  # vision hidden state fed to the projector (native: vision_feature_layer)
    image_token_id: int | None = None  # <IMG_CONTEXT>; read from the checkpoint's tokenizer when config.json lacks it
    force_image_size: int | None = None  # tile size when it differs from vision.image_size
    # dynamic tiling (remote config.json fields; the image processor's settings)
    dynamic_image_size: bool = True
    use_thumbnail: bool = True
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 12

    def __post_init__(self):
        if self.ps_version not in PS_VERSIONS:
            raise ValueError(f"ps_version {self.ps_version!r} is not one of {PS_VERSIONS}")
        inv = 1 / self.downsample_ratio
        if abs(inv - round(inv)) > 1e-9 or round(inv) < 1:
            raise ValueError(f"downsample_ratio {self.downsample_ratio} is not 1/k for an integer k")
        grid = self.tile_size // self.vision.patch_size
        if self.tile_size % self.vision.patch_size or grid % self.shuffle_factor:
            raise ValueError(f"tile size {self.tile_size} gives a {grid} x {grid} patch grid, which "
                             f"downsample_ratio {self.downsample_ratio} does not divide")
        self.vision.layers_for(self.select_layer)  # range check

    @property
    def param_dtype(self) -> str:
        return self.text.param_dtype

    @property
    def shuffle_factor(self) -> int:
        return int(round(1 / self.downsample_ratio))

    @property
    def tile_size(self) -> int:
        return self.force_image_size or self.vision.image_size

    @property
    def tokens_per_tile(self) -> int:
        """LLM tokens per tile (256 for 448 px tiles): (tile / patch)^2 * downsample_ratio^2."""
        return (self.tile_size // self.vision.patch_size // self.shuffle_factor) ** 2

    @property
    def projector_in(self) -> int:
        return self.vision.hidden_size * self.shuffle_factor**2

    def image_config(self):
        """The dynamic-tiling settings (`skyjax.data.internvl_image.InternVLImageConfig`) this config implies."""
        from skyjax.data.internvl_image import InternVLImageConfig

        tiles = (self.min_dynamic_patch, self.max_dynamic_patch) if self.dynamic_image_size else (1, 1)
        return InternVLImageConfig(image_size=self.tile_size, min_tiles=tiles[0], max_tiles=tiles[1],
                                   use_thumbnail=self.use_thumbnail)

    # --- Hugging Face configs -----------------------------------------------------------------------------------------

    @staticmethod
    def is_remote(config: dict[str, Any]) -> bool:
        return "llm_config" in config

    @classmethod
    def from_hf(cls, config: dict[str, Any], **runtime) -> "R1VConfig":
        """From config.json: transformers-native InternVL (`vision_config` + `text_config`) or the remote-code
        InternVL-chat / Skywork-R1V layout (`vision_config` + `llm_config`)."""
        if "vision_config" not in config:
            raise KeyError("config.json has no 'vision_config'")
        if cls.is_remote(config):
            llm = dict(config["llm_config"])
            text_type = llm.get("model_type")
            arch = llm.get("architectures") or []
            if text_type not in (None, "qwen2") and "Qwen2ForCausalLM" not in arch:
                raise NotImplementedError(f"llm_config model_type {text_type!r}: only Qwen2 LLMs are supported")
            text = Qwen2Config.from_hf(llm, **runtime)
            vision = InternViTConfig.from_hf(config["vision_config"], **runtime)
            fields = dict(downsample_ratio=float(config.get("downsample_ratio", 0.5)),
                          ps_version=config.get("ps_version", "v1"),  # the remote code's default is v1
                          select_layer=int(config.get("select_layer", -1)),
                          image_token_id=config.get("img_context_token_id"),
                          force_image_size=config.get("force_image_size"))
            for key in ("dynamic_image_size", "use_thumbnail", "min_dynamic_patch", "max_dynamic_patch"):
                if config.get(key) is not None:
                    fields[key] = config[key]
            if fields["force_image_size"] == vision.image_size:
                fields["force_image_size"] = None
            return cls(vision=vision, text=text, **fields)
        if "text_config" not in config:
            raise KeyError("config.json has neither 'text_config' (native InternVL) nor 'llm_config' (remote code)")
        text_type = config["text_config"].get("model_type", "qwen2")
        if text_type != "qwen2":
            raise NotImplementedError(f"text_config model_type {text_type!r}: only Qwen2 LLMs are supported")
        strategy = config.get("vision_feature_select_strategy", "default")
        if strategy != "default":
            raise NotImplementedError(f"vision_feature_select_strategy {strategy!r} (only 'default': drop CLS)")
        layer = config.get("vision_feature_layer", -1)
        if not isinstance(layer, int):
            raise NotImplementedError(f"vision_feature_layer {layer!r}: only a single layer index is supported")
        act = config.get("projector_hidden_act", "gelu")
        if act != "gelu":
            raise NotImplementedError(f"projector_hidden_act {act!r} is not supported (only exact 'gelu')")
        text = Qwen2Config.from_hf({**config["text_config"],
                                    "tie_word_embeddings": config.get("tie_word_embeddings", True)}, **runtime)
        vision = InternViTConfig.from_hf(config["vision_config"], **runtime)
        cfg = cls(vision=vision, text=text, downsample_ratio=float(config.get("downsample_ratio", 0.5)),
                  ps_version="v2", select_layer=layer, image_token_id=config.get("image_token_id", 151667))
        seq = config.get("image_seq_length")
        if seq is not None and seq != cfg.tokens_per_tile:
            raise ValueError(f"config.json image_seq_length {seq} disagrees with the vision geometry, which gives "
                             f"{cfg.tokens_per_tile} tokens per tile")
        return cfg

    def to_hf(self) -> dict[str, Any]:
        """transformers' `InternVLForConditionalGeneration` config (it computes pixel shuffle v2 only)."""
        if self.ps_version != "v2":
            raise ValueError("transformers' native InternVL has no ps_version 'v1' pixel shuffle: export this model "
                             "in the remote-code layout (layout='remote')")
        if self.force_image_size is not None:
            raise ValueError(f"force_image_size {self.force_image_size} != vision image_size "
                             f"{self.vision.image_size} has no native InternVL equivalent; use layout='remote'")
        text = self.text.to_hf()
        text.pop("architectures", None)
        return {
            "architectures": ["InternVLForConditionalGeneration"],
            "model_type": "internvl",
            "vision_config": self.vision.to_hf(),
            "text_config": text,
            "image_token_id": self.image_token_id,
            "image_seq_length": self.tokens_per_tile,
            "downsample_ratio": self.downsample_ratio,
            "projector_hidden_act": "gelu",
            "vision_feature_layer": self.select_layer,
            "vision_feature_select_strategy": "default",
            "tie_word_embeddings": self.text.tie_word_embeddings,
            "torch_dtype": self.text.param_dtype,
        }

    def to_remote(self) -> dict[str, Any]:
        """The remote-code InternVL-chat config.json (model_type internvl_chat)."""
        return {
            "architectures": ["InternVLChatModel"],
            "model_type": "internvl_chat",
            "vision_config": self.vision.to_remote(),
            "llm_config": self.text.to_hf(),
            "select_layer": self.select_layer,
            "force_image_size": self.tile_size,
            "downsample_ratio": self.downsample_ratio,
            "ps_version": self.ps_version,
            "dynamic_image_size": self.dynamic_image_size,
            "use_thumbnail": self.use_thumbnail,
            "min_dynamic_patch": self.min_dynamic_patch,
            "max_dynamic_patch": self.max_dynamic_patch,
            "use_backbone_lora": 0,
            "use_llm_lora": 0,
            "tie_word_embeddings": self.text.tie_word_embeddings,
            "torch_dtype": self.text.param_dtype,
        }

    @classmethod
    def hf_tensor_shapes(cls, cfg: "R1VConfig") -> dict[str, tuple[int, ...]]:
        """The Conv2d kernel shape under both layouts' names (our dense kernel cannot imply it)."""
        v = cfg.vision
        shape = (v.hidden_size, v.num_channels, v.patch_size, v.patch_size)
        return {"vision_tower.embeddings.patch_embeddings.projection.weight": shape,
                "vision_model.embeddings.patch_embedding.weight": shape}

    # --- named shapes ---------------------------------------------------------------------------------------------

    @classmethod
    def tiny(cls, vocab_size: int = 320, image_token_id: int | None = 274, **runtime) -> "R1VConfig":
        """2 + 2 layers; 56 px tiles -> 4 tokens per tile; projector 128 -> 64 -> 64."""
        return cls(vision=InternViTConfig.tiny(**runtime), text=Qwen2Config.tiny(vocab_size=vocab_size, **runtime),
                   image_token_id=image_token_id)

    @classmethod
    def r1v_38b(cls, **runtime) -> "R1VConfig":
        """Skywork-R1V-38B: InternViT-6B-448px-V2_5 + projector 12800 -> 5120 -> 5120 + R1-Distill-Qwen-32B."""
        return cls(vision=InternViTConfig.internvit_6b_448px_v2_5(**runtime),
                   text=Qwen2Config.r1_distill_32b(**runtime), image_token_id=151667)


# --- pixel shuffle ----------------------------------------------------------------------------------------------------


def pixel_shuffle(x: jax.Array, scale_factor: float = 0.5, version: str = "v2") -> jax.Array:
    """The reference's pixel shuffle, op for op. x [n, w, h, c] (the reference's names; w is the patch ROW axis)
    -> [n, w*s, h*s, c/s^2]. v1 skips the second permute (and so transposes the token grid)."""
    n, w, h, c = x.shape
    hs, ws, cs = h * scale_factor, w * scale_factor, c / scale_factor
    if hs != int(hs) or ws != int(ws) or cs != int(cs):
        raise ValueError(f"pixel_shuffle: shape {tuple(x.shape)} does not divide by scale_factor {scale_factor}")
    x = x.reshape(n, w, int(hs), int(cs))  # [n, w, h*s, c/s]
    x = x.transpose(0, 2, 1, 3)  # [n, h*s, w, c/s]
    x = x.reshape(n, int(hs), int(ws), int(c / (scale_factor * scale_factor)))  # [n, h*s, w*s, c/s^2]
    if version == "v2":
        x = x.transpose(0, 2, 1, 3)
    elif version != "v1":
        raise ValueError(f"ps_version {version!r} is not one of {PS_VERSIONS}")
    return x


# --- modules ----------------------------------------------------------------------------------------------------------


class Projector(nnx.Module):
    """InternVL's `mlp1`: LayerNorm(Ev * k^2, eps 1e-5) -> Linear -> exact GELU -> Linear (-> LLM width)."""

    def __init__(self, cfg: R1VConfig, *, rngs: nnx.Rngs):
        v = cfg.vision
        kw = dict(dtype=v.compute_dtype, param_dtype=jnp.dtype(v.param_dtype), precision=v.precision,
                  init_std=v.initializer_range, rngs=rngs)
        width = cfg.text.hidden_size
        self.layer_norm = LayerNorm(cfg.projector_in, eps=1e-5, param_dtype=jnp.dtype(v.param_dtype))
        self.linear_1 = Linear(cfg.projector_in, width, axes=("merger_in", "mlp"), use_bias=True, **kw)
        self.linear_2 = Linear(width, width, axes=("mlp", "embed"), use_bias=True, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.gelu(self.linear_1(self.layer_norm(x)), approximate=False)
        return self.linear_2(h)


def check_image_tokens(input_ids, tiles_per_row, image_token_id: int, tokens_per_tile: int,
                       num_tiles: int | None = None) -> None:
    """Host-side check that every row's <IMG_CONTEXT> count is tokens_per_tile x its tiles; raises naming the row.

    `tiles_per_row` [B] (None: every tile is real and rows take them in order); `num_tiles` is the number of tile
    slots given to the model (the padded bucket), which must hold all rows' tiles.
    """
    ids = np.asarray(input_ids)
    counts = (ids == image_token_id).sum(axis=1).tolist()
    if tiles_per_row is None:
        for row, count in enumerate(counts):
            if count % tokens_per_tile:
                raise ImageTokenMismatchError(
                    f"row {row}: {count} {IMAGE_TOKEN} placeholder tokens is not a whole number of tiles "
                    f"({tokens_per_tile} tokens per tile)")
        used = sum(counts) // tokens_per_tile
        if num_tiles is not None and used != num_tiles:
            raise ImageTokenMismatchError(
                f"{sum(counts)} {IMAGE_TOKEN} placeholder tokens ({used} tiles x {tokens_per_tile}) but {num_tiles} "
                f"tiles were given; pass tiles_per_row when the tiles are padded")
        return
    tiles = [int(t) for t in np.asarray(tiles_per_row).reshape(-1).tolist()]
    if len(tiles) != len(counts):
        raise ImageTokenMismatchError(f"tiles_per_row has {len(tiles)} entries for {len(counts)} rows")
    for row, (count, n) in enumerate(zip(counts, tiles)):
        if count != n * tokens_per_tile:
            raise ImageTokenMismatchError(
                f"row {row}: {count} {IMAGE_TOKEN} placeholder tokens but its {n} tile(s) give "
                f"{n * tokens_per_tile} image tokens ({tokens_per_tile} per tile)")
    if num_tiles is not None and sum(tiles) > num_tiles:
        raise ImageTokenMismatchError(f"rows need {sum(tiles)} tiles but pixel_values has only {num_tiles}")


def _is_concrete(*xs) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs if x is not None)


class R1VForConditionalGeneration(nnx.Module):
    def __init__(self, cfg: R1VConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.vision_tower = InternViT(cfg.vision, rngs=rngs)
        self.projector = Projector(cfg, rngs=rngs)
        self.model = Qwen2Model(cfg.text, rngs=rngs)
        t = cfg.text
        self.lm_head = None if t.tie_word_embeddings else Linear(
            t.hidden_size, t.vocab_size, axes=("embed", "vocab"), dtype=t.compute_dtype,
            param_dtype=jnp.dtype(t.param_dtype), precision=t.precision, init_std=t.initializer_range, rngs=rngs)

    def image_features(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values [N, 3, S, S] -> LLM-width features [N, T, E], tokens in the reference's order."""
        cfg = self.cfg
        n, _, height, width = pixel_values.shape
        p = cfg.vision.patch_size
        if height != width:
            raise ValueError(f"pixel_values tiles are {height} x {width}; InternVL tiles are square")
        h = self.vision_tower(pixel_values, num_layers=cfg.vision.layers_for(cfg.select_layer))
        g = height // p
        h = h[:, 1:].reshape(n, g, g, -1)  # drop CLS; [N, rows, cols, Ev]
        h = pixel_shuffle(h, cfg.downsample_ratio, cfg.ps_version)  # [N, g/k, g/k, Ev k^2]
        h = h.reshape(n, -1, h.shape[-1])  # [N, T, Ev k^2]
        return self.projector(h)  # [N, T, E]

    def embed(self, input_ids: jax.Array, pixel_values: jax.Array | None = None,
              feature_blocks: int = 1) -> jax.Array:
        """Token embeddings with the tile features written over the <IMG_CONTEXT> slots, in order.

        `feature_blocks=H`: a multi-host global batch (skyjax.train.global_batch): the rows are H equal host blocks
        and the tiles H equal blocks of each host's packed tiles; host h's rows read host h's tiles."""
        x = self.model.embed_tokens(input_ids)  # [B, L, E]
        if pixel_values is None:
            return x
        if self.cfg.image_token_id is None:
            raise ValueError("image_token_id is unknown (the remote-code config.json does not carry it and the "
                             "checkpoint folder had no tokenizer with <IMG_CONTEXT>); set R1VConfig.image_token_id")
        feats = self.image_features(pixel_values)
        # [N * T, E], real tiles first: the k-th image token (row-major) takes feature row k
        return merge_image_features(x, input_ids, feats.reshape(-1, feats.shape[-1]), self.cfg.image_token_id,
                                    groups=feature_blocks, feature_blocks=feature_blocks)

    def hidden_states(
        self,
        input_ids: jax.Array,
        *,
        attention_mask: jax.Array | None = None,
        pixel_values: jax.Array | None = None,
        tiles_per_row: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
        cache_index: jax.Array | int = 0,
        feature_blocks: int = 1,
        branch_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Final-norm hidden states [B, L, E].

        pixel_values [N_pad, 3, S, S]: every row's tiles in order, padding tiles last. tiles_per_row [B]: real tiles
        per row (for the host-side count check; None = all N_pad tiles are real). positions default to the count of
        real tokens before each one (1-D RoPE), as `generate` does. `feature_blocks=H`: a multi-host global batch
        of H hosts' rows and tiles (see `embed`). `branch_ids` [B, L]: continuations of one prompt in one row (a
        preference pair's prompt computed once; see Qwen2Model), with `positions` moved back accordingly.
        """
        cfg = self.cfg
        if pixel_values is not None and cfg.image_token_id is not None and _is_concrete(input_ids, tiles_per_row):
            check_image_tokens(input_ids, tiles_per_row, cfg.image_token_id, cfg.tokens_per_tile,
                               pixel_values.shape[0])
        elif pixel_values is None and cfg.image_token_id is not None and _is_concrete(input_ids) and cache is None:
            n = int(np.sum(np.asarray(input_ids) == cfg.image_token_id))
            if n:
                raise ImageTokenMismatchError(f"{n} {IMAGE_TOKEN} placeholder tokens but no pixel_values were given")
        x = self.embed(input_ids, pixel_values, feature_blocks)
        return self.model(inputs_embeds=x, attention_mask=attention_mask, positions=positions, cache=cache,
                          cache_index=cache_index, branch_ids=branch_ids)

    def logits(self, hidden: jax.Array) -> jax.Array:
        out = self.model.embed_tokens.attend(hidden) if self.lm_head is None else self.lm_head(hidden)
        return constrain(out, ("batch", "seq", "vocab"))

    def __call__(self, input_ids: jax.Array, **kwargs) -> tuple[jax.Array, KVCache | None]:
        hidden, cache = self.hidden_states(input_ids, **kwargs)
        return self.logits(hidden), cache

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        t = self.cfg.text
        return KVCache.init(t.num_hidden_layers, batch, max_len, t.num_key_value_heads, t.head_dim,
                            dtype or t.compute_dtype)
