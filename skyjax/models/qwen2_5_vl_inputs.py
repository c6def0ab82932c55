"""Qwen2.5-VL model inputs from conversations and images, padded to static bucket shapes.

(It lives beside the model, not in skyjax.data, because the padding needs the vision tower's window metadata.)

    batch = prepare_vl_batch(conversations, images, tokenizer, image_cfg, vision_cfg)
    logits, _ = model(batch.input_ids, **batch.model_kwargs())

Each row: images preprocessed exactly as `Qwen2VLImageProcessorPil`, the chat template rendered with the checkpoint's
own tokenizer, each `<|image_pad|>` expanded to the image's merged-token count. Then the batch is padded: tokens to a
sequence bucket, patches to a patch bucket (with the vision tower's window/segment metadata), image grids to an
image-slot bucket, so the jitted step sees a handful of shapes and never recompiles for a new image size.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from skyjax.data.chat import format_conversation, pad_batch
from skyjax.data.qwen_vl_image import QwenVLImageConfig, num_image_tokens, preprocess_image
from skyjax.models.qwen2_5_vl_vision import Qwen2_5_VLVisionConfig, bucket_size, pad_pixel_values, vision_inputs

DEFAULT_SEQ_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
DEFAULT_PATCH_BUCKETS = (64, 256, 1024, 4096, 16384, 65536)
DEFAULT_IMAGE_BUCKETS = (1, 2, 4, 8, 16, 32)


@dataclasses.dataclass(frozen=True)
class Buckets:
    """Static sizes the batch is padded to (the smallest that fits); None = exact size (recompiles per shape)."""

    seq: tuple[int, ...] | None = DEFAULT_SEQ_BUCKETS
    patches: tuple[int, ...] | None = DEFAULT_PATCH_BUCKETS
    images: tuple[int, ...] | None = DEFAULT_IMAGE_BUCKETS


@dataclasses.dataclass
class VLBatch:
    input_ids: np.ndarray  # [B, L] int32
    attention_mask: np.ndarray  # [B, L] bool
    assistant_mask: np.ndarray  # [B, L] bool
    mm_token_type_ids: np.ndarray  # [B, L] int32 (0 text, 1 image)
    pixel_values: np.ndarray | None  # [N_pad, 1176] float32
    image_grid_thw: np.ndarray | None  # [M_pad, 3] int32, zero rows unused
    vision_meta: dict[str, np.ndarray] | None
    images_per_row: np.ndarray  # [B] int32
    real_grid_thw: np.ndarray  # [M, 3] the real grids (what the reference processor returns)
    real_pixel_values: np.ndarray | None  # [N, 1176] unpadded

    def model_kwargs(self) -> dict[str, Any]:
        kw = {"attention_mask": self.attention_mask}
        if self.pixel_values is not None:
            kw.update(pixel_values=self.pixel_values, vision_meta=self.vision_meta, image_grid_thw=self.image_grid_thw)
        return kw


def _pick(size: int, buckets: Sequence[int] | None, what: str) -> int:
    if buckets is None:
        return size
    try:
        return bucket_size(size, buckets)
    except ValueError:
        raise ValueError(f"{size} {what} do not fit the largest bucket {max(buckets)}; raise the bucket sizes "
                         f"(Buckets.{what.split()[0]})") from None


def prepare_vl_batch(
    conversations: Sequence[Sequence[Mapping[str, Any]]],
    images: Sequence[Sequence[Image.Image]],
    tokenizer,
    image_cfg: QwenVLImageConfig,
    vision_cfg: Qwen2_5_VLVisionConfig,
    *,
    add_generation_prompt: bool = False,
    pad_side: str = "right",
    buckets: Buckets = Buckets(),
    max_length: int | None = None,
    always_vision: bool = False,
) -> VLBatch:
    """`conversations[i]` are chat messages whose `{"type": "image"}` parts take `images[i]` in order: PIL images,
    or (patches, grid_thw) pairs that `preprocess_image` made already (a scorer reusing a shared image).

    `always_vision` keeps a (fully padded) vision input even for a text-only batch, so text-only and image batches
    share one compiled program.
    """
    if len(conversations) != len(images):
        raise ValueError(f"{len(conversations)} conversations but {len(images)} image lists")
    rows, patches, grids, per_row = [], [], [], []
    for i, (messages, imgs) in enumerate(zip(conversations, images)):
        counts = []
        for img in imgs:
            pv, grid = img if isinstance(img, tuple) else preprocess_image(img, image_cfg)
            patches.append(pv)
            grids.append(grid)
            counts.append(int(num_image_tokens(grid, image_cfg.merge_size)))
        try:
            rows.append(format_conversation(tokenizer, messages, num_image_tokens=counts,
                                            add_generation_prompt=add_generation_prompt, max_length=max_length))
        except ValueError as e:
            raise type(e)(f"row {i}: {e}") from None
        per_row.append(len(imgs))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    seq_len = _pick(max(r.length for r in rows), buckets.seq, "seq tokens")
    padded = pad_batch(rows, pad_id, side=pad_side, bucket_sizes=[seq_len])
    real_grid = np.stack(grids).astype(np.int32) if grids else np.zeros((0, 3), np.int32)
    pixel_values = image_grid = meta = real_pixels = None
    if grids or always_vision:
        real_pixels = np.concatenate(patches).astype(np.float32) if patches else np.zeros(
            (0, vision_cfg.patch_dim), np.float32)
        n_pad = _pick(max(real_pixels.shape[0], vision_cfg.merge_unit), buckets.patches, "patches")
        pixel_values = pad_pixel_values(real_pixels, n_pad)
        meta = vision_inputs(real_grid, vision_cfg, pad_to=n_pad)
        slots = _pick(max(len(grids), 1), buckets.images, "images per batch")
        image_grid = np.zeros((slots, 3), np.int32)
        image_grid[: len(grids)] = real_grid
    return VLBatch(
        input_ids=padded["input_ids"].astype(np.int32),
        attention_mask=padded["attention_mask"].astype(bool),
        assistant_mask=padded["assistant_mask"].astype(bool),
        mm_token_type_ids=padded["mm_token_type_ids"].astype(np.int32),
        pixel_values=pixel_values,
        image_grid_thw=image_grid,
        vision_meta=meta,
        images_per_row=np.asarray(per_row, np.int32),
        real_grid_thw=real_grid,
        real_pixel_values=real_pixels,
    )
