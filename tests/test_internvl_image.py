"""InternVL dynamic tiling vs transformers' GotOcr2ImageProcessorPil (the bit-exact numeric reference)."""

import functools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers.models.got_ocr2 import image_processing_pil_got_ocr2 as ref_mod

from skyjax.data import internvl_image as iv

REPO = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=None)
def _ref_processor(size, min_tiles, max_tiles, crop=True):
    return ref_mod.GotOcr2ImageProcessorPil(
        crop_to_patches=crop, min_patches=min_tiles, max_patches=max_tiles,
        size={"height": size, "width": size}, image_mean=list(iv.IMAGENET_MEAN), image_std=list(iv.IMAGENET_STD))


def _reference(images, size=448, min_tiles=1, max_tiles=12, crop=True):
    out = _ref_processor(size, min_tiles, max_tiles, crop)(images)
    return np.stack(out["pixel_values"]).astype(np.float32, copy=False), list(out["num_patches"])


def _make_image(width, height, mode, seed):
    """Random-content image of the given PIL mode (noise exercises every resize filter tap)."""
    rng = np.random.default_rng(seed)
    if mode == "L":
        return Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8))
    if mode == "RGB":
        return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    if mode == "RGBA":
        return Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), mode="RGBA")
    if mode == "LA":
        return Image.fromarray(rng.integers(0, 256, (height, width, 2), dtype=np.uint8), mode="LA")
    if mode in ("P", "P_transparent"):
        img = Image.fromarray(rng.integers(0, 16, (height, width), dtype=np.uint8), mode="P")
        img.putpalette(rng.integers(0, 256, 16 * 3, dtype=np.uint8).tolist())
        if mode == "P_transparent":
            img.info["transparency"] = 3  # palette index 3 transparent -> composited onto white
        return img
    raise ValueError(mode)


def _assert_exact(ours, ref):
    assert ours.dtype == np.float32
    assert ours.shape == ref.shape
    np.testing.assert_array_equal(ours, ref)  # max abs diff 0.0


# --- bit-exact equality with the reference --------------------------------------------------------------

_modes = st.sampled_from(["RGB", "L", "RGBA", "P", "LA", "P_transparent"])


@st.composite
def _sizes(draw):
    """(width, height, tile size): moderate, very wide/tall, tiny, and much larger than max_tiles*S."""
    size = draw(st.sampled_from([28, 56, 112]))
    kind = draw(st.sampled_from(["any", "wide", "tall", "square", "tiny", "huge"]))
    if kind == "any":
        return draw(st.integers(1, 400)), draw(st.integers(1, 400)), size
    if kind == "tiny":
        return draw(st.integers(1, 6)), draw(st.integers(1, 6)), size
    if kind == "square":
        s = draw(st.integers(1, 500))
        return s, s, size
    if kind == "huge":  # larger than 4 tiles per side, so the canvas downsamples
        return draw(st.integers(4 * size + 1, 8 * size)), draw(st.integers(4 * size + 1, 8 * size)), size
    long, short = draw(st.integers(50, 700)), draw(st.integers(1, 40))
    return (long, short, size) if kind == "wide" else (short, long, size)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dims=_sizes(), mode=_modes, seed=st.integers(0, 2**16), tiles=st.sampled_from([(1, 12), (1, 6), (2, 9)]))
def test_tile_image_matches_reference_small_tiles(dims, mode, seed, tiles):
    width, height, size = dims
    cfg = iv.InternVLImageConfig(image_size=size, min_tiles=tiles[0], max_tiles=tiles[1])
    img = _make_image(width, height, mode, seed)
    ref, ref_n = _reference(img, size, *tiles)
    ours = iv.tile_image(img, cfg)
    _assert_exact(ours, ref)
    assert [ours.shape[0]] == ref_n


@pytest.mark.parametrize("width,height,mode", [
    (640, 480, "RGB"),     # 4:3 photo
    (1900, 700, "RGBA"),   # wider than 4*448: downsampled canvas, alpha onto white
    (300, 1000, "L"),      # tall greyscale
    (448, 448, "P"),       # exactly one tile
    (30, 40, "RGB"),       # tiny image upsampled onto a 3x4 grid
])
def test_tile_image_matches_reference_448(width, height, mode):
    img = _make_image(width, height, mode, seed=width * 7 + height)
    ref, _ = _reference(img)
    ours = iv.tile_image(img)  # default config is R1V's: 448, 1..12 tiles, thumbnail
    _assert_exact(ours, ref)
    assert ours.shape[1:] == (3, 448, 448)


def test_transparency_composited_on_white():
    img = Image.new("RGBA", (56, 56), (10, 20, 30, 0))  # fully transparent
    out = iv.tile_image(img, iv.InternVLImageConfig(image_size=56))
    white = (1.0 - np.asarray(iv.IMAGENET_MEAN, np.float32)) / np.asarray(iv.IMAGENET_STD, np.float32)
    np.testing.assert_allclose(out[0, :, 0, 0], white, rtol=1e-6)


def test_thumbnail_is_last_and_tiles_row_major():
    size = 28
    # A 2x1 grid image whose left half is black and right half white: tile 0 dark, tile 1 bright, thumb mixed.
    arr = np.zeros((size, 2 * size, 3), np.uint8)
    arr[:, size:] = 255
    out = iv.tile_image(Image.fromarray(arr), iv.InternVLImageConfig(image_size=size))
    assert out.shape[0] == 3
    means = out.mean(axis=(1, 2, 3))
    assert means[0] < means[2] < means[1]
    # Row-major on a 2x2 grid: quadrant intensity order TL, TR, BL, BR.
    quad = np.zeros((2 * size, 2 * size), np.uint8)
    quad[:size, size:], quad[size:, :size], quad[size:, size:] = 80, 160, 240
    out = iv.tile_image(Image.fromarray(quad).resize((4 * size, 4 * size), Image.NEAREST),
                        iv.InternVLImageConfig(image_size=size, max_tiles=4))
    assert out.shape[0] == 5
    assert np.all(np.diff(out[:4].mean(axis=(1, 2, 3))) > 0)


# --- grid choice ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("min_tiles,max_tiles", [(1, 12), (1, 6), (2, 12), (1, 1), (3, 8), (4, 4)])
def test_candidate_grids_match_reference_order(min_tiles, max_tiles):
    assert list(iv.candidate_grids(min_tiles, max_tiles)) == list(
        ref_mod.get_all_supported_aspect_ratios(min_tiles, max_tiles))


@pytest.mark.parametrize("min_tiles,max_tiles", [(1, 12), (1, 6), (2, 12), (2, 4), (1, 1)])
def test_closest_grid_exhaustive_vs_reference(min_tiles, max_tiles):
    """Every w/h with w, h <= 48 (covers all midpoints between grid ratios, i.e. the exact ties) at tile
    sizes whose area threshold falls on both sides, plus scaled-up copies so large areas hit the tie rule."""
    ties = 0
    for size in (4, 8, 16, 448):
        cfg = iv.InternVLImageConfig(image_size=size, min_tiles=min_tiles, max_tiles=max_tiles)
        grids = iv.candidate_grids(min_tiles, max_tiles)
        for w in range(1, 49):
            for h in range(1, 49):
                for k in (1, 37) if size == 448 else (1,):
                    W, H = w * k, h * k
                    ref = ref_mod.get_optimal_tiled_canvas.__wrapped__((H, W), (size, size), min_tiles, max_tiles)
                    assert iv.closest_grid(W, H, cfg) == tuple(ref), (W, H, size)
                    diffs = sorted(abs(W / H - c / r) for c, r in grids)
                    ties += len(diffs) > 1 and diffs[0] == diffs[1]
    if max_tiles > 1:
        assert ties > 0  # the exhaustive set really contains exact ties


def test_closest_grid_tie_rules():
    big = iv.InternVLImageConfig()
    # Square ties (1,1)/(2,2)/(3,3): more tiles only while area > 0.5 * 448^2 * tiles.
    assert iv.closest_grid(600, 600, big) == (1, 1)
    assert iv.closest_grid(700, 700, big) == (2, 2)
    assert iv.closest_grid(1000, 1000, big) == (3, 3)
    # Only (1,2)/(2,1) allowed: a 5:4 image ties them; (1,2) comes first and wins for small images.
    two = iv.InternVLImageConfig(min_tiles=2, max_tiles=2)
    assert iv.closest_grid(50, 40, two) == (1, 2)
    assert iv.closest_grid(500, 400, two) == (1, 2)  # 200000 <= 0.5 * 448^2 * 2
    assert iv.closest_grid(505, 404, two) == (2, 1)  # 204020 > 200704


# --- min/max tiles, dynamic off, thumbnail off -----------------------------------------------------------

@pytest.mark.parametrize("aspect", [0.05, 0.3, 0.75, 1.0, 1.5, 2.5, 7.0, 30.0])
def test_max_tiles_honoured(aspect):
    cfg = iv.InternVLImageConfig(image_size=28, max_tiles=6)
    w, h = max(1, round(300 * aspect ** 0.5)), max(1, round(300 / aspect ** 0.5))
    img = _make_image(w, h, "RGB", seed=1)
    c, r = iv.closest_grid(w, h, cfg)
    assert 1 <= c * r <= 6
    out = iv.tile_image(img, cfg)
    assert out.shape[0] == (1 if c * r == 1 else c * r + 1) <= 7
    _assert_exact(out, _reference(img, 28, 1, 6)[0])


def test_min_tiles_honoured():
    cfg = iv.InternVLImageConfig(image_size=28, min_tiles=3, max_tiles=8)
    for w, h in [(28, 28), (1, 500), (500, 1), (100, 90)]:
        c, r = iv.closest_grid(w, h, cfg)
        assert 3 <= c * r <= 8
        assert iv.tile_image(_make_image(w, h, "L", 0), cfg).shape[0] == c * r + 1


def test_dynamic_off_single_tile_no_thumbnail():
    cfg = iv.InternVLImageConfig.from_chat_config(
        {"force_image_size": 56, "dynamic_image_size": False, "use_thumbnail": True, "max_dynamic_patch": 12})
    assert (cfg.min_tiles, cfg.max_tiles) == (1, 1)
    img = _make_image(400, 90, "RGB", 5)
    out = iv.tile_image(img, cfg)
    assert out.shape == (1, 3, 56, 56)
    _assert_exact(out, _reference(img, 56, 1, 12, crop=False)[0])  # reference plain resize


def test_use_thumbnail_false_drops_last_tile():
    img = _make_image(300, 100, "RGB", 9)
    ref, _ = _reference(img, 56)
    out = iv.tile_image(img, iv.InternVLImageConfig(image_size=56, use_thumbnail=False))
    assert ref.shape[0] > 2
    _assert_exact(out, ref[:-1])


# --- several images per sample ----------------------------------------------------------------------------

def test_tile_images_concatenates_and_counts():
    cfg = iv.InternVLImageConfig(image_size=28)
    imgs = [_make_image(200, 50, "RGB", 1), _make_image(28, 28, "L", 2), _make_image(90, 300, "RGBA", 3)]
    pv, n = iv.tile_images(imgs, cfg)
    ref, ref_n = _reference(imgs, 28)
    assert n == ref_n and len(n) == 3 and n[1] == 1
    assert pv.shape == (sum(n), 3, 28, 28)
    _assert_exact(pv, ref)
    starts = np.cumsum([0] + n)
    for k, img in enumerate(imgs):
        _assert_exact(pv[starts[k]:starts[k + 1]], iv.tile_image(img, cfg))
    empty, n0 = iv.tile_images([], cfg)
    assert empty.shape == (0, 3, 28, 28) and n0 == []
    with pytest.raises(TypeError):
        iv.tile_images(imgs[0], cfg)


# --- bucketing --------------------------------------------------------------------------------------------

def test_bucket_tiles_pads_to_smallest_fitting_bucket():
    rng = np.random.default_rng(0)
    pv = rng.standard_normal((7, 3, 4, 4)).astype(np.float32)
    padded, valid = iv.bucket_tiles(pv, [5, 2], buckets=(13, 4, 9))
    assert padded.shape == (9, 3, 4, 4) and padded.dtype == np.float32
    assert valid.dtype == bool and valid.tolist() == [True] * 7 + [False] * 2
    np.testing.assert_array_equal(padded[:7], pv)
    assert not padded[7:].any()
    padded, valid = iv.bucket_tiles(pv, 7, buckets=(7, 8))  # exact fit: no padding
    assert padded.shape[0] == 7 and valid.all()
    padded, valid = iv.bucket_tiles(pv[:0], [], buckets=(1, 5))
    assert padded.shape == (1, 3, 4, 4) and not valid.any()


def test_bucket_tiles_errors():
    pv = np.zeros((14, 3, 2, 2), np.float32)
    with pytest.raises(ValueError, match=r"14 tiles.*largest tile bucket 13"):
        iv.bucket_tiles(pv, [13, 1], buckets=(1, 5, 9, 13))
    with pytest.raises(ValueError, match="num_tiles sums to 13"):
        iv.bucket_tiles(pv, [13], buckets=(26,))
    with pytest.raises(ValueError, match="buckets"):
        iv.bucket_tiles(pv, [14], buckets=())


# --- config readers ---------------------------------------------------------------------------------------

def test_defaults_and_validation():
    cfg = iv.InternVLImageConfig()
    assert (cfg.image_size, cfg.min_tiles, cfg.max_tiles, cfg.use_thumbnail) == (448, 1, 12, True)
    assert cfg.mean == iv.IMAGENET_MEAN and cfg.std == iv.IMAGENET_STD and cfg.resample == Image.BICUBIC
    with pytest.raises(ValueError, match="min_tiles"):
        iv.InternVLImageConfig(min_tiles=5, max_tiles=4)
    with pytest.raises(TypeError, match="image_size"):
        iv.InternVLImageConfig(image_size=448.0)
    with pytest.raises(ValueError, match="std"):
        iv.InternVLImageConfig(std=(0.2, 0.0, 0.2))


def test_from_chat_config():
    skywork = {"force_image_size": 448, "vision_config": {"image_size": 448}, "min_dynamic_patch": 1,
               "max_dynamic_patch": 12, "use_thumbnail": True, "dynamic_image_size": True, "ps_version": "v2"}
    assert iv.InternVLImageConfig.from_chat_config(skywork) == iv.InternVLImageConfig()
    cfg = iv.InternVLImageConfig.from_chat_config(
        {"force_image_size": None, "vision_config": {"image_size": 224}, "max_dynamic_patch": 6,
         "use_thumbnail": False})
    assert (cfg.image_size, cfg.min_tiles, cfg.max_tiles, cfg.use_thumbnail) == (224, 1, 6, False)
    for key, bad in [("max_dynamic_patch", "12"), ("min_dynamic_patch", True), ("use_thumbnail", 1),
                     ("force_image_size", 448.0), ("dynamic_image_size", "no")]:
        with pytest.raises(TypeError, match=key):
            iv.InternVLImageConfig.from_chat_config({**skywork, key: bad})
    with pytest.raises(TypeError, match="vision_config.image_size"):
        iv.InternVLImageConfig.from_chat_config({"vision_config": {"image_size": [448]}})


def test_from_dict_preprocessor_config():
    hf = {"crop_to_patches": True, "min_patches": 1, "max_patches": 12, "size": {"height": 448, "width": 448},
          "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "resample": 3,
          "do_normalize": True, "do_rescale": True, "rescale_factor": 0.00392156862745098,
          "image_processor_type": "GotOcr2ImageProcessor"}
    assert iv.InternVLImageConfig.from_dict(hf) == iv.InternVLImageConfig()
    cfg = iv.InternVLImageConfig.from_dict({**hf, "crop_to_patches": False, "size": 56})
    assert (cfg.image_size, cfg.min_tiles, cfg.max_tiles) == (56, 1, 1)
    cfg = iv.InternVLImageConfig.from_dict({**hf, "image_mean": [0.5, 0.5, 0.5], "max_patches": 6})
    assert cfg.mean == (0.5, 0.5, 0.5) and cfg.max_tiles == 6
    for key, bad in [("max_patches", 6.0), ("crop_to_patches", "yes"), ("image_mean", "imagenet"),
                     ("image_std", [0.2, None, 0.2]), ("size", [448, 448])]:
        with pytest.raises(TypeError, match=key):
            iv.InternVLImageConfig.from_dict({**hf, key: bad})
    with pytest.raises(ValueError, match="square"):
        iv.InternVLImageConfig.from_dict({**hf, "size": {"height": 448, "width": 224}})
    with pytest.raises(ValueError, match="do_normalize"):
        iv.InternVLImageConfig.from_dict({**hf, "do_normalize": False})
    with pytest.raises(ValueError, match="image_mean"):
        iv.InternVLImageConfig.from_dict({**hf, "image_mean": [0.5, 0.5]})


def test_config_from_dict_drives_tiling_like_reference():
    """A config read from a preprocessor dict reproduces the reference built from the same dict."""
    hf = {"crop_to_patches": True, "min_patches": 2, "max_patches": 5, "size": {"height": 28, "width": 28},
          "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.3, 0.25]}
    img = _make_image(170, 60, "RGB", 11)
    ref = ref_mod.GotOcr2ImageProcessorPil(**hf)(img)["pixel_values"]
    _assert_exact(iv.tile_image(img, iv.InternVLImageConfig.from_dict(hf)), np.stack(ref))


def test_module_imports_neither_torch_nor_jax():
    code = ("import importlib.util, sys; "
            f"spec = importlib.util.spec_from_file_location('m', {str(REPO / 'skyjax/data/internvl_image.py')!r}); "
            "m = importlib.util.module_from_spec(spec); sys.modules['m'] = m; spec.loader.exec_module(m); "
            "bad = [k for k in ('torch', 'jax', 'transformers') if k in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
