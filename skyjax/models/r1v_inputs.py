"""Skywork R1V / InternVL model inputs from conversations and images, padded to static bucket shapes.

    batch = prepare_r1v_batch(conversations, images, tokenizer, cfg)
    logits, _ = model(batch.input_ids, **batch.model_kwargs())

Each row: images tiled exactly as `GotOcr2ImageProcessorPil` (dynamic tiling, thumbnail last), the chat template
rendered with the checkpoint's own tokenizer, each `<image>` expanded to `<img>` + `<IMG_CONTEXT>` x (tokens per tile x
tiles) + `</img>`. Then tokens are padded to a sequence bucket and tiles (all rows' tiles in order) to a tile bucket,
so the jitted step sees a handful of shapes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from skyjax.data.chat import IMG_CONTEXT, format_conversation, pad_batch
from skyjax.data.internvl_image import DEFAULT_TILE_BUCKETS, InternVLImageConfig, bucket_tiles, tile_images
from skyjax.data.tokenizer import INTERNVL_IMAGE_MARKER
from skyjax.models.r1v import R1VConfig

DEFAULT_SEQ_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


@dataclasses.dataclass(frozen=True)
class Buckets:
    """Static sizes the batch is padded to (the smallest that fits); None = exact size (recompiles per shape)."""

    seq: tuple[int, ...] | None = DEFAULT_SEQ_BUCKETS
    tiles: tuple[int, ...] | None = DEFAULT_TILE_BUCKETS


@dataclasses.dataclass
class R1VBatch:
    input_ids: np.ndarray  # [B, L] int32
    attention_mask: np.ndarray  # [B, L] bool
    assistant_mask: np.ndarray  # [B, L] bool
    mm_token_type_ids: np.ndarray  # [B, L] int32 (1 on <IMG_CONTEXT>)
    pixel_values: np.ndarray | None  # [N_pad, 3, S, S] float32, real tiles first
    tile_valid: np.ndarray | None  # [N_pad] bool
    tiles_per_row: np.ndarray  # [B] int32
    tiles_per_image: np.ndarray  # [M] int32, all images of the batch in order
    real_pixel_values: np.ndarray | None  # [N, 3, S, S] (what the reference model takes)

    def model_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"attention_mask": self.attention_mask}
        if self.pixel_values is not None:
            kw.update(pixel_values=self.pixel_values, tiles_per_row=self.tiles_per_row)
        return kw


def image_token_id_of(tokenizer, cfg: R1VConfig | None = None) -> int:
    """The <IMG_CONTEXT> id of `tokenizer`; it must agree with the model config's id when that is set."""
    vocab = tokenizer.get_vocab()
    if IMG_CONTEXT not in vocab:
        raise ValueError(f"the tokenizer has no {IMG_CONTEXT} token; it is not an InternVL / R1V tokenizer")
    token_id = int(vocab[IMG_CONTEXT])
    if cfg is not None and cfg.image_token_id is not None and cfg.image_token_id != token_id:
        raise ValueError(f"the tokenizer's {IMG_CONTEXT} id is {token_id} but the model config's image_token_id is "
                         f"{cfg.image_token_id}")
    return token_id


def _pick(size: int, buckets: Sequence[int] | None, what: str, field: str) -> int:
    if buckets is None:
        return size
    fits = sorted(b for b in buckets if b >= size)
    if not fits:
        raise ValueError(f"{size} {what} do not fit the largest bucket {max(buckets)}; raise Buckets.{field}")
    return fits[0]


def prepare_r1v_batch(
    conversations: Sequence[Sequence[Mapping[str, Any]]],
    images: Sequence[Sequence[Image.Image]],
    tokenizer,
    cfg: R1VConfig,
    image_cfg: InternVLImageConfig | None = None,
    *,
    add_generation_prompt: bool = False,
    pad_side: str = "right",
    buckets: Buckets = Buckets(),
    max_length: int | None = None,
    always_vision: bool = False,
) -> R1VBatch:
    """`conversations[i]` are chat messages whose `{"type": "image"}` parts take `images[i]` in order.

    `image_cfg` defaults to the model config's tiling (`cfg.image_config()`); its tile size must equal the model's.
    `always_vision` keeps a (fully padded) tile input for a text-only batch, so both share one compiled program.
    """
    if len(conversations) != len(images):
        raise ValueError(f"{len(conversations)} conversations but {len(images)} image lists")
    image_cfg = image_cfg or cfg.image_config()
    if image_cfg.image_size != cfg.tile_size:
        raise ValueError(f"image tiles are {image_cfg.image_size} px but the model expects {cfg.tile_size} px tiles")
    image_token_id_of(tokenizer, cfg)
    rows, tiles, per_row, per_image = [], [], [], []
    for i, (messages, imgs) in enumerate(zip(conversations, images)):
        pixels, counts = tile_images(list(imgs), image_cfg)
        try:
            rows.append(format_conversation(tokenizer, messages, image_token=INTERNVL_IMAGE_MARKER,
                                            num_image_tokens=[cfg.tokens_per_tile * n for n in counts],
                                            add_generation_prompt=add_generation_prompt, max_length=max_length))
        except ValueError as e:
            raise type(e)(f"row {i}: {e}") from None
        tiles.append(pixels)
        per_row.append(sum(counts))
        per_image.extend(counts)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    seq_len = _pick(max(r.length for r in rows), buckets.seq, "sequence tokens", "seq")
    padded = pad_batch(rows, pad_id, side=pad_side, bucket_sizes=[seq_len])
    pixel_values = tile_valid = real = None
    if sum(per_row) or always_vision:
        s = cfg.tile_size
        real = np.concatenate(tiles).astype(np.float32) if tiles else np.zeros((0, 3, s, s), np.float32)
        n_pad = _pick(max(real.shape[0], 1), buckets.tiles, "tiles", "tiles")
        pixel_values, tile_valid = bucket_tiles(real, real.shape[0], [n_pad])
    return R1VBatch(
        input_ids=padded["input_ids"].astype(np.int32),
        attention_mask=padded["attention_mask"].astype(bool),
        assistant_mask=padded["assistant_mask"].astype(bool),
        mm_token_type_ids=padded["mm_token_type_ids"].astype(np.int32),
        pixel_values=pixel_values,
        tile_valid=tile_valid,
        tiles_per_row=np.asarray(per_row, np.int32),
        tiles_per_image=np.asarray(per_image, np.int32),
        real_pixel_values=real,
    )
