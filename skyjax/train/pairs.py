"""Preference pairs -> padded, static-shape Qwen2.5-VL batches (shared by training, `score` and `eval`).

A batch of b pairs becomes 2b rows, the b chosen rows first, then the b rejected rows, so the loss reads
`scores[:b] - scores[b:]`. The pair's images are encoded ONCE (their features serve both rows), so the batch carries
the images of the b prompts, and `image_grid_thw` lists them twice (chosen rows, then rejected rows) for M-RoPE.
With gradient accumulation the batch has a leading micro-batch axis [A, ...] with one padded shape for all A.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from skyjax.data.chat import SequenceTooLongError, format_conversation, pad_batch
from skyjax.data.qwen_vl_image import ImageError, QwenVLImageConfig, load_image, num_image_tokens, preprocess_image
from skyjax.data.records import Record
from skyjax.models.qwen2_5_vl_vision import Qwen2_5_VLVisionConfig, bucket_size, pad_pixel_values, vision_inputs


class BadRowError(ValueError):
    """A row that cannot be used (missing or corrupt image, too long, ...); names the file and line."""


@dataclasses.dataclass
class PairExample:
    row_id: str
    where: str
    chosen: Any  # FormattedConversation
    rejected: Any
    patches: np.ndarray  # [N, 1176]
    grids: np.ndarray  # [n_images, 3]


def row_location(record: Record) -> str:
    return f"{record.source}:{record.line}" if record.source else f"row {record.line}"


def featurize_pair(record: Record, tokenizer, image_cfg: QwenVLImageConfig, *, max_length: int | None = None,
                   blank_images: bool = False, response_keys=("chosen", "rejected")) -> PairExample:
    """Load and preprocess the images, render both conversations; errors name the file and line."""
    where = row_location(record)
    patches, grids, counts = [], [], []
    for path in record.images:
        try:
            image = load_image(path)
        except ImageError as e:
            raise BadRowError(f"{where}: {e}") from None
        if blank_images:
            from PIL import Image

            image = Image.new("RGB", image.size, (128, 128, 128))
        pv, grid = preprocess_image(image, image_cfg)
        patches.append(pv)
        grids.append(grid)
        counts.append(int(num_image_tokens(grid, image_cfg.merge_size)))
    convs = []
    for key in response_keys:
        try:
            convs.append(format_conversation(tokenizer, record.conversation(key), num_image_tokens=counts,
                                             max_length=max_length))
        except SequenceTooLongError as e:
            raise BadRowError(f"{where}: {key} is too long: {e}") from None
        except ValueError as e:
            raise BadRowError(f"{where}: {key}: {e}") from None
    patch_dim = 3 * image_cfg.temporal_patch_size * image_cfg.patch_size**2
    return PairExample(
        row_id=str(record.id if record.id is not None else where), where=where, chosen=convs[0],
        rejected=convs[-1],
        patches=np.concatenate(patches) if patches else np.zeros((0, patch_dim), np.float32),
        grids=np.stack(grids).astype(np.int32) if grids else np.zeros((0, 3), np.int32))


@dataclasses.dataclass(frozen=True)
class PairBuckets:
    seq: tuple[int, ...]
    patches: tuple[int, ...]
    images: tuple[int, ...]


def fit_bucket(n: int, buckets: Sequence[int], what: str, where: str) -> int:
    try:
        return bucket_size(n, buckets)
    except ValueError:
        raise BadRowError(f"{where}: {n} {what} do not fit the largest bucket {max(buckets)} (data.{what}_buckets)")


def split_micro_batches(examples: Sequence, micro_batches: int, weights: Sequence[float] | None, what: str):
    """(weights [n] float32, the examples cut into `micro_batches` equal groups, "file:line, ..." of the first rows
    for error messages). Shared by the pair and SFT collators."""
    if len(examples) % micro_batches:
        raise ValueError(f"{len(examples)} {what} do not split into {micro_batches} micro-batches")
    weights = np.ones(len(examples), np.float32) if weights is None else np.asarray(weights, np.float32)
    per = len(examples) // micro_batches
    groups = [examples[i * per:(i + 1) * per] for i in range(micro_batches)]
    where = ", ".join(e.where for e in examples[:3]) + (" ..." if len(examples) > 3 else "")
    return weights, groups, where


def collate_pairs(examples: Sequence[PairExample], vision_cfg: Qwen2_5_VLVisionConfig, buckets: PairBuckets,
                  pad_id: int, *, micro_batches: int = 1, weights: Sequence[float] | None = None) -> dict:
    """Stack pairs into arrays with a leading micro-batch axis [A, ...]; every micro-batch has the same shapes."""
    weights, groups, where = split_micro_batches(examples, micro_batches, weights, "pairs")
    per = len(groups[0])
    longest = max(max(e.chosen.length, e.rejected.length) for e in examples)
    seq = fit_bucket(longest, buckets.seq, "seq", where)
    n_patches = max(sum(e.patches.shape[0] for e in g) for g in groups)
    n_images = max(sum(e.grids.shape[0] for e in g) for g in groups)
    patches = fit_bucket(max(n_patches, vision_cfg.merge_unit), buckets.patches, "patch", where)
    slots = fit_bucket(max(n_images, 1), buckets.images, "image", where)
    out = []
    for i, group in enumerate(groups):
        rows = [e.chosen for e in group] + [e.rejected for e in group]
        padded = pad_batch(rows, pad_id, side="right", bucket_sizes=[seq])
        grids = np.concatenate([e.grids for e in group]) if n_images else np.zeros((0, 3), np.int32)
        pixels = np.concatenate([e.patches for e in group]).astype(np.float32)
        grid_slots = np.zeros((slots, 3), np.int32)
        grid_slots[: len(grids)] = grids
        out.append({
            "input_ids": padded["input_ids"].astype(np.int32),
            "attention_mask": padded["attention_mask"].astype(bool),
            "pixel_values": pad_pixel_values(pixels, patches),
            "vision_meta": vision_inputs(grids, vision_cfg, pad_to=patches),
            "image_grid_thw": np.concatenate([grid_slots, grid_slots]),  # chosen rows' images, then rejected rows'
            "pair_weight": weights[i * per:(i + 1) * per],
        })
    import jax

    batch = jax.tree.map(lambda *xs: np.stack(xs), *out)
    batch["row_ids"] = [e.row_id for e in examples]  # host-side only (named in errors)
    return batch


def host_batch(batch: dict) -> tuple[dict, list[str]]:
    """Split the host-only fields off a collated batch."""
    batch = dict(batch)
    return batch, batch.pop("row_ids")


def resolve(path: str | Path, base: Path | None = None) -> Path:
    path = Path(path)
    return path if path.is_absolute() or base is None else base / path
