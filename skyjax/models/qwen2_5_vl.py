"""Qwen2.5-VL: window-attention vision tower -> image features scattered into the token embeddings -> Qwen2 decoder
with multimodal rotary positions (M-RoPE) -> LM head.

    pixel_values [N_pad, 1176] --visual--> [N_pad/4, E] (grid order; padding rows last)
    input_ids [B, S] --embed--> [B, S, E]; rows where input_ids == image_token_id take the image features in order
    mrope_positions(token types, mask, grids) -> [3, B, S] -> chunked cos/sin -> decoder -> norm -> lm_head

Every shape inside jit is static: patches are padded to a bucket (`vision_inputs(..., pad_to)`), image grids to a
fixed number of image slots, so a new image size inside the buckets does not recompile.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from skyjax.models.qwen2 import Qwen2Config, Qwen2Model
from skyjax.models.qwen2_5_vl_vision import Qwen2_5_VLVisionConfig, Qwen2_5_VLVisionModel
from skyjax.nn.attention import KVCache
from skyjax.nn.layers import Linear, merge_image_features
from skyjax.nn.mrope import mm_token_types, mrope_cos_sin, mrope_positions
from skyjax.parallel.rules import constrain


class ImageTokenMismatchError(ValueError):
    """The number of <|image_pad|> tokens in a row differs from the number its images produce."""


@dataclasses.dataclass(frozen=True)
class Qwen2_5_VLConfig:
    text: Qwen2Config
    vision: Qwen2_5_VLVisionConfig
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    mrope_section: tuple[int, int, int] = (16, 24, 24)

    def __post_init__(self):
        if sum(self.mrope_section) != self.text.head_dim // 2:
            raise ValueError(f"mrope_section {list(self.mrope_section)} must sum to head_dim / 2 = "
                             f"{self.text.head_dim // 2}")
        if self.vision.out_hidden_size != self.text.hidden_size:
            raise ValueError(f"vision out_hidden_size {self.vision.out_hidden_size} != text hidden_size "
                             f"{self.text.hidden_size}")

    @property
    def param_dtype(self) -> str:
        return self.text.param_dtype

    @classmethod
    def from_hf(cls, config: dict[str, Any], **runtime) -> "Qwen2_5_VLConfig":
        """From config.json: the flat 4.x hub layout (text keys at the top) or the nested 5.x one (`text_config`)."""
        text_src = dict(config.get("text_config") or config)
        rope = text_src.get("rope_parameters") or text_src.get("rope_scaling") or {}
        if "mrope_section" not in rope:
            raise ValueError("config.json has no mrope_section (in rope_scaling or rope_parameters); a Qwen2.5-VL "
                             "config without M-RoPE would silently fall back to 1-D positions")
        for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            if key not in config and key not in text_src:
                raise KeyError(f"config.json has no {key!r}")
        ids = {k: config.get(k, text_src.get(k)) for k in
               ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
        text = Qwen2Config.from_hf({**text_src, "tie_word_embeddings": config.get(
            "tie_word_embeddings", text_src.get("tie_word_embeddings", False))}, **runtime)
        vision = Qwen2_5_VLVisionConfig.from_hf(config["vision_config"], **runtime)
        return cls(text=text, vision=vision, mrope_section=tuple(rope["mrope_section"]), **ids)

    def to_hf(self) -> dict[str, Any]:
        """The nested 5.x layout that transformers' Qwen2_5_VLForConditionalGeneration loads."""
        text = self.text.to_hf()
        for key in ("architectures", "rope_scaling", "rope_theta"):
            text.pop(key, None)
        text["model_type"] = "qwen2_5_vl_text"
        text["rope_parameters"] = {"rope_type": "default", "type": "mrope", "rope_theta": self.text.rope_theta,
                                   "mrope_section": list(self.mrope_section)}
        return {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "model_type": "qwen2_5_vl",
            "text_config": text,
            "vision_config": self.vision.to_hf(),
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": self.text.tie_word_embeddings,
            "torch_dtype": self.text.param_dtype,
        }

    @classmethod
    def hf_tensor_shapes(cls, cfg: "Qwen2_5_VLConfig") -> dict[str, tuple[int, ...]]:
        return Qwen2_5_VLVisionModel.hf_tensor_shapes(cfg.vision)

    @classmethod
    def tiny(cls, vocab_size: int = 320, image_token_id: int = 300, video_token_id: int = 301,
             vision_start_token_id: int = 298, vision_end_token_id: int = 299, **runtime) -> "Qwen2_5_VLConfig":
        """A tiny model whose vision windows are partial on small images (window 56 px = 2 merge units)."""
        text = Qwen2Config.tiny(vocab_size=vocab_size, **runtime)
        vision = Qwen2_5_VLVisionConfig.tiny(out_hidden_size=text.hidden_size, window_size=56, **runtime)
        return cls(text=text, vision=vision, image_token_id=image_token_id, video_token_id=video_token_id,
                   vision_start_token_id=vision_start_token_id, vision_end_token_id=vision_end_token_id,
                   mrope_section=(2, 3, 3))

    @classmethod
    def qwen2_5_vl_7b(cls, **runtime) -> "Qwen2_5_VLConfig":
        return cls(text=Qwen2Config.qwen2_5_7b(**runtime), vision=Qwen2_5_VLVisionConfig.qwen2_5_vl_7b(**runtime))


def check_image_tokens(input_ids, image_grid_thw, image_token_id: int, merge_size: int = 2,
                       images_per_row=None) -> None:
    """Host-side check that every row's <|image_pad|> count equals what its images produce; raises naming the row.

    image_grid_thw [M, 3] lists the batch's images in row-major order (zero rows = unused slots). Without
    `images_per_row`, images are assigned to rows by consuming them in order.
    """
    ids = np.asarray(input_ids)
    grid = np.asarray(image_grid_thw).reshape(-1, 3) if image_grid_thw is not None else np.zeros((0, 3), int)
    grid = grid[np.prod(grid, axis=1) > 0]
    per_image = (np.prod(grid, axis=1) // merge_size**2).tolist()
    counts = (ids == image_token_id).sum(axis=1).tolist()
    k = 0
    for row, count in enumerate(counts):
        if images_per_row is not None:
            n = int(images_per_row[row])
            expected = sum(per_image[k:k + n])
            if expected != count or k + n > len(per_image):
                raise ImageTokenMismatchError(
                    f"row {row}: {count} <|image_pad|> placeholder tokens but its {n} image(s) give {expected} image "
                    f"tokens (grids {grid[k:k + n].tolist()})")
            k += n
            continue
        start, got = k, 0
        while got < count and k < len(per_image):
            got += per_image[k]
            k += 1
        if got != count:
            raise ImageTokenMismatchError(
                f"row {row}: {count} <|image_pad|> placeholder tokens but the image(s) assigned to it give {got} "
                f"image tokens (grids {grid[start:k].tolist()})")
    if k != len(per_image):
        raise ImageTokenMismatchError(
            f"{len(per_image) - k} image(s) left over after all rows' placeholders were filled: "
            f"{sum(counts)} placeholder tokens for {sum(per_image)} image tokens")


def _is_concrete(*xs) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs if x is not None)


class Qwen2_5_VLForConditionalGeneration(nnx.Module):
    def __init__(self, cfg: Qwen2_5_VLConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.visual = Qwen2_5_VLVisionModel(cfg.vision, rngs=rngs)
        self.model = Qwen2Model(cfg.text, rngs=rngs)
        t = cfg.text
        self.lm_head = None if t.tie_word_embeddings else Linear(
            t.hidden_size, t.vocab_size, axes=("embed", "vocab"), dtype=t.compute_dtype,
            param_dtype=jnp.dtype(t.param_dtype), precision=t.precision, init_std=t.initializer_range, rngs=rngs)

    def embed(self, input_ids, pixel_values=None, vision_meta=None, image_features=None,
              image_groups: int = 1, feature_blocks: int = 1) -> jax.Array:
        """Token embeddings with the image features written over the <|image_pad|> slots, in order.

        `image_features` [U, E] (the vision tower's output) may be passed instead of pixels, e.g. to encode the
        images of a preference pair once for both of its rows. With `image_groups=g` the rows form g equal groups
        (e.g. chosen rows, then rejected rows) that each read the features from the first row on. With
        `feature_blocks=H` the features are H hosts' blocks of a multi-host global batch and the groups are spread
        over them in order (see `merge_image_features`).
        """
        x = self.model.embed_tokens(input_ids)  # [B, S, E]
        if image_features is None and pixel_values is None:
            return x
        if image_features is None:
            image_features = self.visual(pixel_values, vision_meta)  # [U, E], real rows first
        return merge_image_features(x, input_ids, image_features, self.cfg.image_token_id, groups=image_groups,
                                    feature_blocks=feature_blocks)

    def hidden_states(
        self,
        input_ids: jax.Array,
        *,
        attention_mask: jax.Array | None = None,
        pixel_values: jax.Array | None = None,
        vision_meta: dict | None = None,
        image_grid_thw: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
        cache_index: jax.Array | int = 0,
        inputs_embeds: jax.Array | None = None,
        feature_blocks: int = 1,
        branch_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Final-norm hidden states [B, S, E] (`inputs_embeds` from `embed` skips the embedding step).

        `feature_blocks=H`: the batch is a multi-host global batch (skyjax.train.global_batch) of H hosts' rows and
        packed images, one after another: host h's rows read host h's image features.

        positions [3, B, S] default to the reference's `get_rope_index` over (input_ids, attention_mask,
        image_grid_thw); pass them explicitly when decoding (see `skyjax.nn.mrope.decode_positions`). `branch_ids`
        [B, S]: continuations of one prompt in one row (see Qwen2Model; skyjax.train.pairs.collate_shared_prompt).
        """
        cfg = self.cfg
        if pixel_values is not None and (vision_meta is None or image_grid_thw is None):
            raise ValueError("pixel_values needs vision_meta (vision_inputs(...)) and image_grid_thw")
        if pixel_values is not None and inputs_embeds is None and _is_concrete(input_ids, image_grid_thw):
            check_image_tokens(input_ids, image_grid_thw, cfg.image_token_id, cfg.vision.spatial_merge_size)
        elif pixel_values is None and inputs_embeds is None and _is_concrete(input_ids) and positions is None:
            n = int(np.sum(np.asarray(input_ids) == cfg.image_token_id))
            if n:
                raise ImageTokenMismatchError(f"{n} <|image_pad|> placeholder tokens but no pixel_values were given")
        if inputs_embeds is None:  # H host blocks: host h's rows (group h) read host h's features
            x = self.embed(input_ids, pixel_values, vision_meta, image_groups=feature_blocks,
                           feature_blocks=feature_blocks)
        else:
            x = inputs_embeds
        if positions is None:
            types = mm_token_types(input_ids, cfg.image_token_id, cfg.video_token_id)
            positions, _ = mrope_positions(types, attention_mask, image_grid_thw,
                                           spatial_merge_size=cfg.vision.spatial_merge_size)
        rope = mrope_cos_sin(positions, cfg.text.head_dim, cfg.text.rope_theta, cfg.mrope_section)
        return self.model(inputs_embeds=x, attention_mask=attention_mask, rope=rope, cache=cache,
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
