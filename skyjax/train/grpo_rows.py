"""The image side of GRPO's completion rows (skyjax.train.grpo), for both policy families, and what keeps a
completion's tokens aligned with its prompt's images.

The sampler (skyjax.sample.adapters: `prepare`) packs a PROMPT batch: B left-padded prompts and their images, one
after another (R1V: InternVL tiles, `tiles_per_row`; Qwen2.5-VL: patches [N, 1176] and one (t, h, w) grid per
image, in row-major order). A training micro-batch holds COMPLETION rows: row r = b * G + k is sample k of prompt b,
`[left-padded prompt | completion | padding]`. Each row carries its prompt's images again (a prompt's images are
repeated for each of its G completions), cut from the sampler's own arrays, so the policy sees exactly the pixels the
sampler saw; each micro-batch's images are then packed by the run's vision format (skyjax.train.sft: R1VTiles /
QwenPatches: a tile bucket, or a patch bucket with the vision tower's window metadata and an image-slot bucket), so
the jitted step sees a handful of shapes.

Positions need nothing extra: R1V's are the count of real tokens before each token, Qwen2.5-VL's M-RoPE positions
over the whole row give a completion token (prompt's largest position) + 1 + (its index in the completion), which is
what the sampler's decode step used (skyjax.nn.mrope.decode_positions: real tokens before it + rope delta).

A sampled image placeholder (`<IMG_CONTEXT>`, `<|image_pad|>`, `<|video_pad|>`: a policy can draw any token of its
vocabulary) would be read as an image slot by the training forward, take the next row's image features and shift
every later image of the micro-batch. `placeholder_cut` finds them: the completion's tokens from the first one on are
left out of the loss, and the placeholder itself is fed as padding (the tokens before it are unchanged: causal).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


@dataclasses.dataclass
class PromptImages:
    """One prompt's images as the vision format packs them (the `pixels` / `grids` of skyjax.train.sft.SFTExample)."""

    pixels: np.ndarray  # R1V: tiles [n, 3, s, s]; Qwen2.5-VL: patches [N, patch_dim]
    grids: np.ndarray  # Qwen2.5-VL: [images, 3] (t, h, w); R1V: [images, 0]


def prompt_images(inputs: dict, images_per_prompt: Sequence[int]) -> list[PromptImages] | None:
    """Each prompt's images cut from the sampler's prompt batch (`adapter.prepare`'s dict); None when the batch
    holds no image. `images_per_prompt[b]`: how many images prompt b has (its record's)."""
    pixels = inputs.get("pixel_values")
    if pixels is None:
        return None
    pixels = np.asarray(pixels)
    counts = [int(n) for n in images_per_prompt]
    if "tiles_per_row" in inputs:  # R1V: tiles row after row
        tiles = np.asarray(inputs["tiles_per_row"]).astype(int)
        starts = np.concatenate([[0], np.cumsum(tiles)])
        return [PromptImages(pixels[starts[b]:starts[b + 1]], np.zeros((counts[b], 0), np.int32))
                for b in range(len(tiles))]
    grid = np.asarray(inputs["image_grid_thw"]).astype(np.int32)  # Qwen2.5-VL: [M_pad, 3], used rows first
    used = grid[: sum(counts)]
    if len(used) != sum(counts) or np.any(np.prod(used, axis=1) == 0):
        raise ValueError(f"the prompt batch has {int(np.count_nonzero(np.prod(grid, axis=1)))} image grids but its "
                         f"rows have {sum(counts)} images")
    patches = np.prod(used, axis=1)
    image_start = np.concatenate([[0], np.cumsum(counts)])
    patch_start = np.concatenate([[0], np.cumsum(patches)])
    out = []
    for b in range(len(counts)):
        i, j = image_start[b], image_start[b + 1]
        out.append(PromptImages(pixels[patch_start[i]:patch_start[j]], used[i:j]))
    return out


def completion_vision(fmt, images: list[PromptImages] | None, input_ids: np.ndarray, g: int, micro_batches: int,
                      where: str) -> dict | None:
    """The vision inputs [A, ...] of the completion rows `input_ids` [A * per, S] (row r: prompt r // g), each
    micro-batch packed by `fmt` (R1VTiles / QwenPatches) at one bucket for all of them; None without images. The
    packing checks each row's image tokens against its images (an ImageTokenMismatchError names the row)."""
    if images is None:
        return None
    return rows_vision(fmt, [images[r // g] for r in range(input_ids.shape[0])], input_ids, micro_batches, where)


def rows_vision(fmt, per_row: list[PromptImages | None], input_ids: np.ndarray, micro_batches: int,
                where: str) -> dict:
    """`completion_vision` with each row's images given (None: a row without images)."""
    rows = input_ids.shape[0]
    per = rows // micro_batches
    empty = next(p for p in per_row if p is not None)
    none = PromptImages(empty.pixels[:0], empty.grids[:0])
    per_row = [none if p is None else p for p in per_row]
    groups = [per_row[i * per:(i + 1) * per] for i in range(micro_batches)]
    sizes = fmt.sizes(groups, where)
    packed = [fmt.collate(group, sizes, input_ids[i * per:(i + 1) * per]) for i, group in enumerate(groups)]
    return {k: _stack([p[k] for p in packed]) for k in packed[0]}


def _stack(values):
    if isinstance(values[0], dict):
        return {k: _stack([v[k] for v in values]) for k in values[0]}
    return np.stack(values)


def placeholder_ids(model_cfg) -> tuple[int, ...]:
    """The token ids the training forward reads as image (or video) slots: R1V's <IMG_CONTEXT>, Qwen2.5-VL's
    <|image_pad|> and <|video_pad|>."""
    ids = [getattr(model_cfg, name, None) for name in ("image_token_id", "video_token_id")]
    return tuple(int(i) for i in ids if i is not None)


def placeholder_cut(tokens: np.ndarray, lengths: np.ndarray, ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(keep [R, N]: the completion tokens before the first sampled placeholder, placeholder [R, N]: the sampled
    placeholder tokens themselves) of the sampler's tokens [R, N] with `lengths` [R]."""
    live = np.arange(tokens.shape[1])[None] < np.asarray(lengths)[:, None]
    hit = live & np.isin(tokens, np.asarray(ids, tokens.dtype)) if ids else np.zeros(tokens.shape, bool)
    keep = live & (np.cumsum(hit, axis=1) == 0)
    return keep, hit
