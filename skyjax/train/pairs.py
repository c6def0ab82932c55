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
from skyjax.models.qwen2_5_vl_vision import Qwen2_5_VLVisionConfig, pad_pixel_values, vision_inputs
from skyjax.train.batching import (BadRowError, fit_bucket, row_location, split_micro_batches,  # noqa: F401
                                   stack_micro_batches)


@dataclasses.dataclass
class PairExample:
    row_id: str
    where: str
    chosen: Any  # FormattedConversation
    rejected: Any
    patches: np.ndarray  # [N, 1176]
    grids: np.ndarray  # [n_images, 3]


def featurize_pair(record: Record, tokenizer, image_cfg: QwenVLImageConfig, *, max_length: int | None = None,
                   blank_images: bool = False, response_keys=("chosen", "rejected"),
                   max_image_patches: int | None = None) -> PairExample:
    """Load and preprocess the images, render both conversations; errors name the file and line. An image with
    more than `max_image_patches` patches (the vision tower's bound, see bound_image_patches) is a bad row."""
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
        if max_image_patches is not None and int(np.prod(grid)) > max_image_patches:
            raise BadRowError(f"{where}: image {path} resized to {grid[1] * image_cfg.patch_size}x"
                              f"{grid[2] * image_cfg.patch_size} has {int(np.prod(grid))} patches, more than the "
                              f"{max_image_patches} of max_pixels {image_cfg.max_pixels} (an extreme aspect ratio)")
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


def collate_pairs(examples: Sequence[PairExample], vision_cfg: Qwen2_5_VLVisionConfig, buckets: PairBuckets,
                  pad_id: int, *, micro_batches: int = 1, weights: Sequence[float] | None = None) -> dict:
    """Stack pairs into arrays with a leading micro-batch axis [A, ...]; every micro-batch has the same shapes."""
    weights, groups, where = split_micro_batches(examples, micro_batches, weights, "pairs")
    per = len(groups[0])
    longest = max(max(e.chosen.length, e.rejected.length) for e in examples)
    seq = fit_bucket(longest, buckets.seq, "seq", where)
    images = PackedImages.of(groups, vision_cfg, buckets, where)
    out = []
    for i, group in enumerate(groups):
        rows = [e.chosen for e in group] + [e.rejected for e in group]
        padded = pad_batch(rows, pad_id, side="right", bucket_sizes=[seq])
        vision = images.collate(group)
        out.append({
            "input_ids": padded["input_ids"].astype(np.int32),
            "attention_mask": padded["attention_mask"].astype(bool),
            **vision,
            "image_grid_thw": np.concatenate([vision["image_grid_thw"]] * 2),  # chosen rows' images, then rejected's
            "pair_weight": weights[i * per:(i + 1) * per],
        })
    return stack_micro_batches(out, examples)


@dataclasses.dataclass(frozen=True)
class PackedImages:
    """The buckets of a batch's packed images (the same for every micro-batch) and how one group is collated."""

    vision_cfg: Qwen2_5_VLVisionConfig
    patches: int
    slots: int

    @classmethod
    def of(cls, groups, vision_cfg: Qwen2_5_VLVisionConfig, buckets: PairBuckets, where: str) -> "PackedImages":
        n_patches = max(sum(e.patches.shape[0] for e in g) for g in groups)
        n_images = max(sum(e.grids.shape[0] for e in g) for g in groups)
        return cls(vision_cfg, fit_bucket(max(n_patches, vision_cfg.merge_unit), buckets.patches, "patch", where),
                   fit_bucket(max(n_images, 1), buckets.images, "image", where))

    def collate(self, group) -> dict:
        """pixel_values, vision_meta and image_grid_thw [slots, 3] (each image once, zero slots after)."""
        grids = np.concatenate([e.grids for e in group]).astype(np.int32)
        grid_slots = np.zeros((self.slots, 3), np.int32)
        grid_slots[: len(grids)] = grids
        pixels = np.concatenate([e.patches for e in group]).astype(np.float32)
        return {"pixel_values": pad_pixel_values(pixels, self.patches),
                "vision_meta": vision_inputs(grids, self.vision_cfg, pad_to=self.patches),
                "image_grid_thw": grid_slots}


def shared_prompt_split(example: PairExample) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(prompt, chosen tail, rejected tail) token ids of a pair (see split_rows)."""
    return split_rows(example.chosen.input_ids, example.rejected.input_ids, example.chosen.mm_token_type_ids,
                      example.rejected.mm_token_type_ids, example.where)


def split_rows(chosen, rejected, chosen_types, rejected_types, where: str = "pair"):
    """(prompt, chosen tail, rejected tail) of two rendered rows: the prompt is their longest common prefix (by
    construction each row is exactly prompt + its tail), and it must hold every image token."""
    c, r = np.asarray(chosen), np.asarray(rejected)
    n = min(len(c), len(r))
    diff = np.nonzero(c[:n] != r[:n])[0]
    common = int(diff[0]) if diff.size else n
    for name, types in (("chosen", chosen_types), ("rejected", rejected_types)):
        if np.any(np.asarray(types)[common:] != 0):
            raise BadRowError(f"{where}: the {name} response holds image tokens after the shared prompt "
                              f"({common} tokens); data.share_prompt needs the images in the prompt")
    return c[:common], c[common:], r[common:]


def shared_prompt_rows(parts: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], seq: int, pad_id: int) -> dict:
    """One right-padded row per (prompt, chosen tail, rejected tail): input_ids, attention_mask, branch_ids (prompt
    0, chosen 1, rejected 2, padding 0) [b, seq] and score_index [b, 2], each response's last token (the prompt's
    last token for an empty tail)."""
    b = len(parts)
    ids = np.full((b, seq), pad_id, np.int32)
    mask = np.zeros((b, seq), bool)
    branch = np.zeros((b, seq), np.int32)
    index = np.zeros((b, 2), np.int32)
    for j, (prompt, chosen, rejected) in enumerate(parts):
        p, c, r = len(prompt), len(chosen), len(rejected)
        if p + c + r > seq:
            raise ValueError(f"a shared-prompt row of {p + c + r} tokens does not fit {seq}")
        ids[j, :p + c + r] = np.concatenate([prompt, chosen, rejected])
        mask[j, :p + c + r] = True
        branch[j, p:p + c] = 1
        branch[j, p + c:p + c + r] = 2
        index[j] = (p + c - 1 if c else p - 1, p + c + r - 1 if r else p - 1)
    return {"input_ids": ids, "attention_mask": mask, "branch_ids": branch, "score_index": index}


def shared_prompt_length(example: PairExample) -> int:
    """Tokens of the pair's one shared-prompt row: prompt + chosen tail + rejected tail."""
    prompt, chosen, rejected = shared_prompt_split(example)
    return len(prompt) + len(chosen) + len(rejected)


def collate_shared_prompt(examples: Sequence[PairExample], vision_cfg: Qwen2_5_VLVisionConfig, buckets: PairBuckets,
                          pad_id: int, *, micro_batches: int = 1, weights: Sequence[float] | None = None) -> dict:
    """Like `collate_pairs`, with one row per pair: [prompt | chosen tail | rejected tail | padding] (right padded).

    `branch_ids` marks the prompt 0, the chosen tail 1, the rejected tail 2 (padding 0; masked anyway);
    `score_index` [b, 2] is the last token of each response (the prompt's last token for an empty tail), where its
    reward is read; `image_grid_thw` lists each row's images once. See objectives.shared_prompt_scores for why this
    computes exactly the two-row layout's scores with the prompt run once.
    """
    weights, groups, where = split_micro_batches(examples, micro_batches, weights, "pairs")
    per = len(groups[0])
    parts = [shared_prompt_split(e) for e in examples]
    seq = fit_bucket(max(sum(map(len, p)) for p in parts), buckets.seq, "seq", where)
    images = PackedImages.of(groups, vision_cfg, buckets, where)
    out = [{**shared_prompt_rows(parts[i * per:(i + 1) * per], seq, pad_id), **images.collate(group),
            "pair_weight": weights[i * per:(i + 1) * per]} for i, group in enumerate(groups)]
    return stack_micro_batches(out, examples)


def resolve(path: str | Path, base: Path | None = None) -> Path:
    path = Path(path)
    return path if path.is_absolute() or base is None else base / path
