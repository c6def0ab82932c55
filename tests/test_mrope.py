"""skyjax.nn.mrope against transformers 5.24 Qwen2.5-VL: get_rope_index, generate's decode positions, rotary embedding.

Every expected value comes from the reference run on the same layout (a tiny random Qwen2.5-VL, built in memory).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import rotary_tolerance
from skyjax.nn.mrope import (_section_axes, check_mrope_inputs, decode_positions, mm_token_types, mrope_cos_sin,
                              mrope_positions)
from skyjax.nn.rotary import apply_rotary, inverse_frequencies, rope_cos_sin, rotate_half

PAD, VISION_START, VISION_END, IMAGE, VIDEO = 0, 58, 59, 60, 61
MERGE = 2
FAST = settings(max_examples=20, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@functools.lru_cache(maxsize=None)
def reference_model():
    """A tiny random Qwen2_5_VLForConditionalGeneration (head_dim 16, mrope_section [2, 3, 3])."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, bos_token_id=1, eos_token_id=2, pad_token_id=PAD,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           patch_size=14, spatial_merge_size=MERGE, temporal_patch_size=2, fullatt_block_indexes=[0],
                           window_size=56),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def build_batch(rows, side, seq=None, seed=0):
    """rows: per row a list of segments, an int (that many text tokens) or a (t, h, w) image grid (in patches).

    Returns input_ids, attention_mask [B, S] and the grids in row-major order of appearance.
    """
    rng = np.random.default_rng(seed)
    seqs, grids = [], []
    for row in rows:
        ids = []
        for seg in row:
            if isinstance(seg, int):
                ids += rng.integers(3, 50, seg).tolist()
            else:
                t, h, w = seg
                ids += [VISION_START] + [IMAGE] * (t * (h // MERGE) * (w // MERGE)) + [VISION_END]
                grids.append(seg)
        seqs.append(ids)
    seq = seq or max(len(s) for s in seqs)
    input_ids = np.full((len(rows), seq), PAD, np.int64)
    mask = np.zeros((len(rows), seq), np.int64)
    for b, ids in enumerate(seqs):
        sl = slice(seq - len(ids), seq) if side == "left" else slice(0, len(ids))
        input_ids[b, sl], mask[b, sl] = ids, 1
    return input_ids, mask, np.array(grids, np.int64).reshape(-1, 3)


def padded_grids(grids, max_images):
    out = np.zeros((max_images, 3), np.int32)
    out[: len(grids)] = grids
    return out


def reference_rope_index(input_ids, mask, grids):
    types = (input_ids == IMAGE).astype(np.int64)  # what the 5.24 processor returns as mm_token_type_ids
    pos, deltas = reference_model().model.get_rope_index(
        torch.as_tensor(input_ids), mm_token_type_ids=torch.as_tensor(types),
        image_grid_thw=torch.as_tensor(grids) if len(grids) else None, attention_mask=torch.as_tensor(mask))
    return pos.numpy(), deltas.numpy()


@functools.partial(jax.jit, static_argnames="spatial_merge_size")
def jitted_positions(types, mask, grids, spatial_merge_size=MERGE):
    return mrope_positions(types, mask, grids, spatial_merge_size=spatial_merge_size)


def assert_like_reference(rows, side, batch=3, seq=140, max_images=9):
    """Ours (eager and jitted) equals get_rope_index; every case has the same shapes, so the whole file compiles twice.

    Rows beyond the layout's are all padding (the reference cannot take them): they get positions 0 and delta 0.
    """
    input_ids, mask, grids = build_batch(rows, side, seq)
    want_pos, want_deltas = reference_rope_index(input_ids, mask, grids)
    extra = batch - len(rows)
    input_ids = np.concatenate([input_ids, np.full((extra, seq), PAD)])
    mask = np.concatenate([mask, np.zeros((extra, seq), mask.dtype)])
    types = mm_token_types(input_ids, IMAGE, VIDEO)
    for pos, deltas in (mrope_positions(types, mask, padded_grids(grids, max_images)),  # eager: validated
                        jitted_positions(types, mask, padded_grids(grids, max_images))):
        assert pos.dtype == jnp.int32 and pos.shape == (3, batch, seq) and deltas.shape == (batch, 1)
        np.testing.assert_array_equal(np.asarray(pos)[:, : len(rows)], want_pos)
        np.testing.assert_array_equal(np.asarray(deltas)[: len(rows)], want_deltas)
        assert not np.any(np.asarray(pos)[:, len(rows):]) and not np.any(np.asarray(deltas)[len(rows):])
    return want_pos, want_deltas


def test_text_only_is_1d():
    pos, deltas = assert_like_reference([[7], [4]], "left")
    assert np.all(deltas == 0) and np.array_equal(pos[:, 1, -4:], np.tile(np.arange(4), (3, 1)))


def test_one_image():
    pos, deltas = assert_like_reference([[3, (1, 4, 6), 2]], "left")
    assert deltas[0, 0] == 3 - 6  # the image advances max(h', w') = 3 positions for its 6 tokens


def test_two_images_of_different_sizes_in_one_row():
    assert_like_reference([[2, (1, 6, 4), 1, (1, 2, 8), 3]], "right")


def test_image_with_two_temporal_frames():
    assert_like_reference([[2, (2, 4, 4), 3]], "left")


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_with_different_images(side):
    pos, _ = assert_like_reference([[1, (1, 4, 4), 2, (1, 6, 2), 1], [5, (1, 8, 10), 4]], side)
    assert pos[:, 0][:, (0 if side == "left" else -1)].tolist() == [0, 0, 0]  # a pad slot gets 0 on every axis (5.24)


@pytest.mark.parametrize("side", ["left", "right"])
def test_row_without_images_beside_rows_with_images(side):
    assert_like_reference([[(1, 4, 4), 3], [9], [2, (1, 2, 2), (1, 4, 2)]], side)


layouts = st.lists(  # a batch of 3 rows: text lengths and images (t=1, even h, w in [2, 12]) alternating
    st.tuples(st.integers(1, 4), st.lists(st.tuples(st.just(1), st.sampled_from(range(2, 13, 2)),
                                                    st.sampled_from(range(2, 13, 2)), st.integers(0, 4)),
                                          max_size=3)),
    min_size=3, max_size=3)


@FAST
@given(layouts, st.sampled_from(["left", "right"]))
def test_random_layouts_match_reference(rows, side):
    segments = [[lead] + [seg for t, h, w, tail in images for seg in ((t, h, w), tail)] for lead, images in rows]
    assert_like_reference(segments, side)


def test_jit_compiles_once_for_different_grids():
    traces = []

    @jax.jit
    def positions(types, mask, grids):
        traces.append(1)
        return mrope_positions(types, mask, grids)

    for rows in ([[2, (1, 4, 4), 3], [1, (1, 2, 6), 1, (1, 2, 2)]], [[(1, 8, 4), 1], [6]]):
        input_ids, mask, grids = build_batch(rows, "left", seq=24)
        pos, deltas = positions(mm_token_types(input_ids, IMAGE), mask, padded_grids(grids, 4))
        want_pos, want_deltas = reference_rope_index(input_ids, mask, grids)
        np.testing.assert_array_equal(np.asarray(pos), want_pos)
        np.testing.assert_array_equal(np.asarray(deltas), want_deltas)
    assert len(traces) == 1


def test_bad_inputs_raise():
    input_ids, mask, grids = build_batch([[2, (1, 4, 4), 3]], "left")
    types = np.asarray(mm_token_types(input_ids, IMAGE))
    video = np.where(input_ids == IMAGE, 2, types)
    with pytest.raises(NotImplementedError, match="video"):
        mrope_positions(video, mask, grids)
    with pytest.raises(ValueError, match="needs 8"):  # image-token count does not fit its grid
        mrope_positions(types, mask, np.array([[1, 4, 8]]))
    with pytest.raises(ValueError, match="1 image runs"):  # a second grid with no image for it
        mrope_positions(types, mask, np.array([[1, 4, 4], [1, 2, 2]]))
    with pytest.raises(ValueError, match="divisible"):
        check_mrope_inputs(types, mask, np.array([[1, 4, 3]]))


def test_decode_positions_match_generate_with_left_padding():
    """Record the position_ids HF generate feeds the rotary embedding at each step and compare with ours."""
    model = reference_model()
    input_ids, mask, grids = build_batch([[2, (1, 4, 4), 3], [1, (1, 4, 6), 1, (1, 2, 2), 5]], "left")
    seq, new = input_ids.shape[1], 3
    types = (input_ids == IMAGE).astype(np.int64)
    n_patches = int(np.sum(np.prod(grids, axis=1)))
    torch.manual_seed(1)
    pixels = torch.randn(n_patches, 3 * 2 * 14 * 14)
    seen = []
    hook = model.model.language_model.rotary_emb.register_forward_hook(lambda m, a, out: seen.append(a[1].clone()))
    try:
        with torch.no_grad():
            model.generate(input_ids=torch.as_tensor(input_ids), attention_mask=torch.as_tensor(mask),
                           pixel_values=pixels, image_grid_thw=torch.as_tensor(grids),
                           mm_token_type_ids=torch.as_tensor(types), max_new_tokens=new, do_sample=False,
                           pad_token_id=PAD)
    finally:
        hook.remove()
    assert len(seen) == new
    prompt_pos, deltas = mrope_positions(mm_token_types(input_ids, IMAGE), mask, padded_grids(grids, 4))
    np.testing.assert_array_equal(np.asarray(prompt_pos), seen[0].numpy())
    num_pad = seq - mask.sum(1)
    assert num_pad.tolist() == [seq - 2 - 6 - 3, 0] and deltas[0, 0] != 0
    for step in range(1, new):
        ours = decode_positions(np.full((2,), seq + step - 1), deltas, num_pad=num_pad)
        np.testing.assert_array_equal(np.asarray(ours), seen[step].numpy())
    # [B, T] form: both decode steps at once
    both = decode_positions(np.array([[seq, seq + 1]] * 2), deltas, num_pad=num_pad)
    np.testing.assert_array_equal(np.asarray(both), torch.cat(seen[1:], dim=-1).numpy())


def reference_rotary(head_dim, section, theta):
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding

    config = Qwen2_5_VLTextConfig(hidden_size=2 * head_dim, num_attention_heads=2, num_key_value_heads=1,
                                  intermediate_size=8, num_hidden_layers=1, vocab_size=8,
                                  rope_parameters={"rope_type": "default", "rope_theta": theta,
                                                   "mrope_section": section})
    return Qwen2_5_VLRotaryEmbedding(config)


@pytest.mark.parametrize("head_dim,section,theta",
                         [(16, [2, 3, 3], 1e6), (128, [16, 24, 24], 1e6), (32, [4, 4, 8], 1e4)])
def test_cos_sin_rotate_like_reference(head_dim, section, theta):
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb

    input_ids, mask, grids = build_batch([[3, (1, 8, 12), 2, (1, 4, 4), 1], [2, (1, 6, 2), 4]], "left")
    positions, _ = reference_rope_index(input_ids, mask, grids)
    positions[:, 1] += 3000  # also far positions, where an fp32 angle error would show
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 4, positions.shape[2], head_dim)).astype(np.float32)  # [B, H, S, D] as the reference
    k = rng.standard_normal((2, 1, positions.shape[2], head_dim)).astype(np.float32)
    cos_ref, sin_ref = reference_rotary(head_dim, section, theta)(torch.as_tensor(q), torch.as_tensor(positions))
    q_ref, k_ref = apply_rotary_pos_emb(torch.as_tensor(q), torch.as_tensor(k), cos_ref, sin_ref)

    cos, sin = mrope_cos_sin(jnp.asarray(positions), head_dim, theta, section)
    assert cos.dtype == jnp.float32 and cos.shape == (2, positions.shape[2], head_dim)
    # each frequency's angle: its section's position times its inverse frequency; the bound grows with it
    per_freq = positions[_section_axes(head_dim, section)].transpose(1, 2, 0) * inverse_frequencies(head_dim, theta)
    tol = rotary_tolerance(np.concatenate([per_freq, per_freq], axis=-1))  # [B, S, head_dim]
    assert np.all(np.abs(np.asarray(cos, np.float64) - cos_ref.numpy()) <= tol)
    assert np.all(np.abs(np.asarray(sin, np.float64) - sin_ref.numpy()) <= tol)
    for x, want in ((q, q_ref), (k, k_ref)):
        got = apply_rotary(jnp.asarray(x.transpose(0, 2, 1, 3)), cos, sin)  # ours: [B, S, H, D]
        xs = x.transpose(0, 2, 1, 3)
        bound = (np.abs(xs) + np.abs(np.asarray(rotate_half(jnp.asarray(xs))))) * tol[:, :, None] + 1e-6
        assert np.all(np.abs(np.asarray(got) - want.numpy().transpose(0, 2, 1, 3)) <= bound)


def test_text_positions_reduce_to_1d_rope():
    pos = jnp.arange(40)[None].repeat(2, 0)
    cos, sin = mrope_cos_sin(jnp.stack([pos] * 3), 32, 1e4, (4, 6, 6))
    cos1, sin1 = rope_cos_sin(pos, 32, 1e4)
    np.testing.assert_allclose(np.asarray(cos), np.asarray(cos1), atol=1e-6)
    np.testing.assert_allclose(np.asarray(sin), np.asarray(sin1), atol=1e-6)
    # and the sections are chunked: a height-only position moves frequencies 4..9 (and their copies) only
    only_h = jnp.zeros((3, 1, 1), jnp.int32).at[1].set(5)
    moved = np.flatnonzero(np.asarray(mrope_cos_sin(only_h, 32, 1e4, (4, 6, 6))[1])[0, 0])
    assert moved.tolist() == list(range(4, 10)) + list(range(20, 26))


@pytest.mark.parametrize("section", [(16, 24, 23), (16, 24, 25), (0, 32, 32), (8, 8, 8)])
def test_mrope_section_must_fill_half_the_head(section):
    with pytest.raises(ValueError, match="sum to head_dim / 2 = 64"):
        mrope_cos_sin(jnp.zeros((3, 1, 4), jnp.int32), 128, 1e6, section)
