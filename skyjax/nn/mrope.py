"""Multimodal rotary position embedding (M-RoPE) of Qwen2.5-VL: 3-D (temporal, height, width) positions and cos/sin.

Positions follow `Qwen2_5_VLModel.get_rope_index` of transformers 5.24. Walk the non-pad tokens of a row with a counter
c = 0: a text token gets (c, c, c) and c += 1; an image with LLM grid (t, h', w') = (t, h/m, w/m) (m = spatial merge
size) gives its tokens, in (t, y, x) row-major order, (c + t_i, c + y, c + x), then c += max(h', w'). Pad tokens get 0
on all axes (5.24 fills a zero tensor; 4.x used 1 -- masked either way). rope_deltas[b] = max(positions of row b) + 1 -
(non-pad tokens of row b), the shift a text token generated after the prompt gets on top of its 1-D position.

Here the walk is done per token with static shapes (one compile for every image size, image count and layout):
a token's image is found from the cumulative count of image-pad tokens before it against the cumulative token counts of
the images; its counter value is (text tokens before it in the row) + sum of max(h', w') over the row's earlier images.

cos/sin use the CHUNKED section layout of Qwen2.5-VL (not Qwen3-VL's interleaved one): frequency j < s0 rotates by the
temporal position, s0 <= j < s0 + s1 by the height, the rest by the width; emb = concat(F, F) as in `rotate_half`, so
the result feeds `skyjax.nn.rotary.apply_rotary` unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from skyjax.nn.rotary import inverse_frequencies

TEXT, IMAGE, VIDEO = 0, 1, 2  # mm_token_type_ids values (transformers 5.x)


def mm_token_types(input_ids, image_token_id: int, video_token_id: int | None = None) -> jax.Array:
    """input_ids [B, S] -> mm_token_type_ids [B, S] int32: 0 text, 1 image pad, 2 video pad (as the HF processor)."""
    ids = jnp.asarray(input_ids)
    types = jnp.where(ids == image_token_id, IMAGE, TEXT)
    if video_token_id is not None:
        types = jnp.where(ids == video_token_id, VIDEO, types)
    return types.astype(jnp.int32)


def _is_concrete(*xs) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def check_mrope_inputs(token_types, attention_mask, image_grid_thw, *, spatial_merge_size: int = 2) -> None:
    """Host-side validation of the `mrope_positions` contract; raises on a mismatch that jit would silently accept.

    Called automatically by `mrope_positions` when its inputs are concrete (not traced); call it in the data pipeline
    when the positions are computed inside jit.
    """
    types = np.asarray(token_types)
    mask = np.ones(types.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    if types.ndim != 2 or mask.shape != types.shape:
        raise ValueError(f"token_types {types.shape} and attention_mask {mask.shape} must both be [batch, seq]")
    if np.any((types == VIDEO) & mask):
        raise NotImplementedError("video tokens (mm_token_type_ids == 2) are not supported by mrope_positions: only "
                                  "text and images are (video needs tokens_per_second * second_per_grid_t)")
    bad = np.setdiff1d(np.unique(types[mask]), [TEXT, IMAGE])
    if bad.size:
        raise ValueError(f"token types must be 0 (text) or 1 (image), got {bad.tolist()}")
    grid = np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw).reshape(-1, 3)
    if np.any(grid < 0) or np.any(grid[:, 1:] % spatial_merge_size):
        raise ValueError(f"image_grid_thw rows must be >= 0 with h, w divisible by spatial_merge_size "
                         f"{spatial_merge_size}, got {grid.tolist()}")
    n_tokens = grid[:, 0] * (grid[:, 1] // spatial_merge_size) * (grid[:, 2] // spatial_merge_size)
    # image runs of the compacted (pad-free) rows, in row-major order: the order the reference consumes the grids
    runs = []
    for b in range(types.shape[0]):
        row = types[b][mask[b]] == IMAGE
        edges = np.flatnonzero(np.diff(np.concatenate([[0], row.astype(np.int8), [0]])))
        runs += [(b, int(e - s)) for s, e in zip(edges[::2], edges[1::2])]
    used = int(np.count_nonzero(n_tokens))
    if np.any(n_tokens[:used] == 0) or len(runs) != used:
        raise ValueError(f"{len(runs)} image runs in the batch but image_grid_thw has {used} non-empty rows "
                         f"(used rows must come first, unused rows all zero): {grid.tolist()}")
    for i, ((b, length), n) in enumerate(zip(runs, n_tokens)):
        if length != n:
            raise ValueError(f"image {i} (batch row {b}) has {length} image tokens but its grid {grid[i].tolist()} "
                             f"needs {int(n)} (t * h/{spatial_merge_size} * w/{spatial_merge_size})")


def mrope_positions(token_types, attention_mask, image_grid_thw, *, spatial_merge_size: int = 2,
                    validate: bool = True) -> tuple[jax.Array, jax.Array]:
    """3-D M-RoPE positions of a prompt batch, equal to transformers 5.24 `get_rope_index` (text and images).

    Args:
      token_types: [B, S] int, `mm_token_type_ids`: 0 text, 1 image pad token, 2 video pad token (build it from
        input_ids with `mm_token_types`). Video is out of scope: NotImplementedError when the input is concrete;
        under jit type 2 cannot be checked and is treated as text.
      attention_mask: [B, S] (1 real, 0 pad; left, right or anywhere) or None (no padding). Pad tokens are skipped by
        the counter and get position 0.
      image_grid_thw: [M, 3] int (t, h, w in vision patches, as the image processor returns), or None. Row i describes
        the i-th image of the BATCH in row-major order of appearance (row 0's images left to right, then row 1's,
        ...) -- the order the reference consumes them. M is a static bucket: rows after the last image must be all zero.
        Image i owns t*(h/m)*(w/m) consecutive image tokens; two images must be separated by at least one text token
        (as <|vision_end|><|vision_start|> always does: the reference merges adjacent runs).
      spatial_merge_size: m (2 for Qwen2.5-VL).
      validate: run `check_mrope_inputs` when the inputs are concrete (skipped automatically under jit).

    Returns:
      positions [3, B, S] int32 (t, h, w) and rope_deltas [B, 1] int32 (0 for a row without any real token).
    """
    if validate and _is_concrete(token_types, attention_mask, image_grid_thw):
        check_mrope_inputs(token_types, attention_mask, image_grid_thw, spatial_merge_size=spatial_merge_size)
    types = jnp.asarray(token_types)
    mask = jnp.ones(types.shape, bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
    grid = jnp.zeros((0, 3), jnp.int32) if image_grid_thw is None else jnp.asarray(image_grid_thw, jnp.int32)
    grid = grid.reshape(-1, 3)
    if grid.shape[0] == 0:  # no image slot at all: one empty one keeps the indexing below valid
        grid = jnp.zeros((1, 3), jnp.int32)
    return _mrope_positions(types, mask, grid, spatial_merge_size)


def _exclusive_prefix_sum(x: jax.Array) -> jax.Array:
    """Exclusive prefix sum of a SHORT vector as one masked reduction (XLA CPU compiles a scan slowly)."""
    n = x.shape[0]
    before = jnp.arange(n)[None, :] < jnp.arange(n)[:, None]  # [n, n]: j < i
    return jnp.sum(jnp.where(before, x[None, :], 0), axis=1)


@functools.partial(jax.jit, static_argnums=3)  # one program, also when called eagerly (op-by-op is ~30 dispatches)
def _mrope_positions(types, mask, grid, spatial_merge_size):
    # per image (M of them): LLM grid, token count, first global image-token index, counter advance
    grid_t, grid_h, grid_w = grid[:, 0], grid[:, 1] // spatial_merge_size, grid[:, 2] // spatial_merge_size
    n_tokens = grid_t * grid_h * grid_w  # [M]
    starts = _exclusive_prefix_sum(n_tokens)  # image i owns global image tokens [starts[i], starts[i] + n[i])
    ends = starts + n_tokens
    advance = _exclusive_prefix_sum(jnp.concatenate([jnp.maximum(grid_h, grid_w), jnp.zeros((1,), jnp.int32)]))  # [M+1]

    is_image = (types == IMAGE) & mask
    is_text = mask & ~is_image
    kinds = jnp.stack([is_image, is_text], axis=-1).astype(jnp.int32)  # [B, S, 2]
    before = jnp.cumsum(kinds, axis=1) - kinds  # image / text tokens before this one in its row (the only long scan)
    row_images = before[:, -1, 0] + kinds[:, -1, 0]  # [B]
    images_before = before[..., 0] + _exclusive_prefix_sum(row_images)[:, None]  # global, batch row-major [B, S]
    text_before = before[..., 1]
    # images completed before this token: ends is sorted and M is small, so one [B, S, M] comparison
    done = jnp.searchsorted(ends, images_before, side="right", method="compare_all").astype(jnp.int32)
    counter = text_before + advance[done] - advance[done[:, :1]]  # done[:, 0]: images of the earlier rows

    image = jnp.minimum(done, grid.shape[0] - 1)  # for an image token: the image it belongs to
    local = images_before - starts[image]
    width = jnp.maximum(grid_w[image], 1)
    plane = jnp.maximum(grid_h[image] * grid_w[image], 1)
    local = jnp.maximum(local, 0)  # only image tokens use it; non-negative, so lax.div/rem equal // and %
    in_plane = lax.rem(local, plane)
    offsets = jnp.stack([lax.div(local, plane), lax.div(in_plane, width), lax.rem(in_plane, width)])  # [3, B, S]
    positions = counter[None] + jnp.where(is_image[None], offsets, 0)
    positions = jnp.where(mask[None], positions, 0).astype(jnp.int32)

    last = jnp.max(jnp.where(mask[None], positions, -1), axis=(0, 2))  # [B]
    rope_deltas = (last + 1 - jnp.sum(mask, axis=1, dtype=jnp.int32))[:, None].astype(jnp.int32)
    return positions, rope_deltas


def decode_positions(cache_index, rope_deltas, *, num_pad=None) -> jax.Array:
    """M-RoPE positions [3, B, T] of generated (text) tokens: (cache_index - num_pad) + rope_delta on all three axes.

    cache_index: scalar, [B] (one new token per row) or [B, T]; the slot the token is written to in a KV cache that
    holds the whole padded prompt. num_pad: [B] or scalar, pad slots before the token -- for a LEFT-padded prompt the
    row's pad count (S - sum(mask)); None means 0 (no padding, or a per-row cache index that skips pads). So a token
    gets (real tokens before it) + delta, which is what transformers 5.24 `generate` gives: it builds the prompt's
    position_ids once (get_rope_index) and then adds 1 to the last column per step, and the prompt's last real token
    sits at n_real - 1 + delta (the forward-only path, `compute_3d_position_ids`, likewise uses
    cumsum(attention_mask) - 1 + delta). Plain k + delta would be off by the pad count on left-padded rows.
    (Not covered: a prompt that ENDS with an image token, where generate continues each axis from that token's own
    position instead.)
    """
    index = jnp.asarray(cache_index, jnp.int32)
    deltas = jnp.asarray(rope_deltas, jnp.int32).reshape(-1, 1)  # [B, 1]
    if index.ndim == 0:
        index = jnp.broadcast_to(index, (deltas.shape[0], 1))
    elif index.ndim == 1:
        index = index[:, None]
    if num_pad is not None:
        index = index - jnp.asarray(num_pad, jnp.int32).reshape(-1, 1)
    positions = index + deltas  # [B, T]
    return jnp.broadcast_to(positions[None], (3,) + positions.shape)


def _section_axes(head_dim: int, mrope_section: Sequence[int]) -> np.ndarray:
    """The position axis (0 t, 1 h, 2 w) of each of the head_dim/2 frequencies, chunked as the reference splits them."""
    section = [int(s) for s in mrope_section]
    if head_dim % 2 or any(s <= 0 for s in section) or sum(section) != head_dim // 2:
        raise ValueError(f"mrope_section {list(mrope_section)} must be positive and sum to head_dim / 2 = "
                         f"{head_dim / 2:g} (head_dim {head_dim}); Qwen2.5-VL uses [16, 24, 24] for head_dim 128")
    return np.concatenate([np.full(s, i % 3) for i, s in enumerate(section)])  # i % 3 as in the reference's split


def mrope_cos_sin(positions, head_dim: int, theta: float,
                  mrope_section: Sequence[int] = (16, 24, 24)) -> tuple[jax.Array, jax.Array]:
    """positions [3, B, S] (or [B, S], the same on all axes) -> cos, sin [B, S, head_dim] fp32 for `apply_rotary`."""
    axes = _section_axes(head_dim, mrope_section)
    positions = jnp.asarray(positions)
    if positions.ndim == 2:
        positions = jnp.broadcast_to(positions[None], (3,) + positions.shape)
    if positions.ndim != 3 or positions.shape[0] != 3:
        raise ValueError(f"positions must be [3, batch, seq] (t, h, w), got {positions.shape}")
    chosen = jnp.moveaxis(positions.astype(jnp.float32)[axes], 0, -1)  # [B, S, head_dim/2]: each frequency's axis
    freqs = chosen * inverse_frequencies(head_dim, theta)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)
