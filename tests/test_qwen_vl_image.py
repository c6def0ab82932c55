"""skyjax.data.qwen_vl_image against transformers' Qwen2VLImageProcessorPil: bit-exact pixels and grids.

Every expected value comes from running the reference on the same input; the few literals are either
documented facts (hub config values, the 70 -> 56 rounding case) or spot checks next to a reference run.
"""

import functools
import json
import os
import struct
import subprocess
import sys

import numpy as np
import PIL.Image
import PIL.ImageDraw
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as reference_smart_resize

from skyjax.data import qwen_vl_image as qvi

HUB = qvi.QwenVLImageConfig()
SMALL_MAX_PIXELS = 200 * 28 * 28  # keeps "scaled down to max_pixels" cases fast
FAST = settings(
    max_examples=25,
    deadline=None,
    database=None,  # no .hypothesis folder in the repo from this file
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@functools.lru_cache(maxsize=None)
def reference_processor(min_pixels: int, max_pixels: int, **flags) -> Qwen2VLImageProcessorPil:
    # min/max passed explicitly: the class default max_pixels (1003520) is not the hub's.
    return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels, **flags)


def run_reference(images, cfg: qvi.QwenVLImageConfig):
    proc = reference_processor(
        cfg.min_pixels,
        cfg.max_pixels,
        do_convert_rgb=cfg.do_convert_rgb,
        do_resize=cfg.do_resize,
        do_rescale=cfg.do_rescale,
        do_normalize=cfg.do_normalize,
    )
    out = proc(images=list(images), return_tensors="np")
    return out["pixel_values"], out["image_grid_thw"]


def assert_same_as_reference(images, cfg):
    want_pixels, want_grid = run_reference(images, cfg)
    got_pixels, got_grid = qvi.preprocess_images(images, cfg)
    assert got_pixels.dtype == np.float32 and got_pixels.shape == want_pixels.shape
    assert np.array_equal(got_grid, want_grid), (got_grid, want_grid)
    assert float(np.abs(got_pixels - want_pixels.astype(np.float32)).max()) == 0.0
    return got_pixels, got_grid


# ----------------------------------------------------------------------------------- image strategies

MODES = ("RGB", "L", "RGBA", "P", "LA")


def make_image(rng: np.random.Generator, height: int, width: int, mode: str, content: str) -> PIL.Image.Image:
    """Random-content image of a given PIL mode: noise, drawn shapes, or a smooth gradient."""
    if content == "noise":
        rgba = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    elif content == "gradient":
        y = np.linspace(0, 255, height)[:, None, None]
        x = np.linspace(0, 255, width)[None, :, None]
        phase = rng.uniform(0, 1, 4)[None, None, :]
        rgba = ((y * phase + x * (1 - phase)) % 256).astype(np.uint8)
    else:  # shapes
        canvas = PIL.Image.new("RGBA", (width, height), tuple(int(v) for v in rng.integers(0, 256, 4)))
        draw = PIL.ImageDraw.Draw(canvas)
        for _ in range(int(rng.integers(1, 8))):
            x0, x1 = sorted(int(v) for v in rng.integers(0, width + 1, 2))
            y0, y1 = sorted(int(v) for v in rng.integers(0, height + 1, 2))
            fill = tuple(int(v) for v in rng.integers(0, 256, 4))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=fill)
        rgba = np.asarray(canvas)
    if mode == "RGBA":
        return PIL.Image.fromarray(rgba, "RGBA")
    if mode == "RGB":
        return PIL.Image.fromarray(np.ascontiguousarray(rgba[..., :3]), "RGB")
    if mode == "L":
        return PIL.Image.fromarray(np.ascontiguousarray(rgba[..., 0]), "L")
    if mode == "LA":
        return PIL.Image.fromarray(np.ascontiguousarray(rgba[..., [0, 3]]), "LA")
    if mode == "P":
        image = PIL.Image.fromarray(np.ascontiguousarray(rgba[..., 0]), "P")
        image.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
        if rng.random() < 0.5:  # a transparent palette index: the reference composites it onto white
            image.info["transparency"] = int(rng.integers(0, 256))
        return image
    raise AssertionError(mode)


@st.composite
def sized_images(draw, min_side: int, max_side: int):
    """An image whose aspect ratio stays within the reference's limit of 200."""
    height = draw(st.integers(min_side, max_side))
    low, high = max(min_side, -(-height // 200)), min(max_side, height * 200)
    width = draw(st.integers(low, high))
    mode = draw(st.sampled_from(MODES))
    content = draw(st.sampled_from(("noise", "shapes", "gradient")))
    seed = draw(st.integers(0, 2**32 - 1))
    return make_image(np.random.default_rng(seed), height, width, mode, content)


# ----------------------------------------------------------------------------------- smart_resize


@st.composite
def resize_cases(draw):
    height = draw(st.integers(1, 20000))
    width = draw(st.integers(max(1, -(-height // 200)), min(20000, height * 200)))
    factor = draw(st.sampled_from((14, 28, 32)))
    min_pixels = draw(st.sampled_from((56 * 56, 3136, 4 * 32 * 32, 100 * 28 * 28)))
    max_pixels = draw(st.sampled_from((SMALL_MAX_PIXELS, 28 * 28 * 1280, HUB.max_pixels)))
    return height, width, factor, min_pixels, max_pixels


@FAST
@given(resize_cases())
def test_smart_resize_matches_reference(case):
    height, width, factor, min_pixels, max_pixels = case
    want = reference_smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    assert qvi.smart_resize(height, width, factor, min_pixels, max_pixels) == want


@pytest.mark.parametrize(
    "height,width",
    [(70, 70), (42, 42), (14, 14), (1, 1), (1, 200), (200, 1), (27, 29), (5000, 5000), (3584, 3584),
     (3585, 3585), (28 * 200, 28), (4000, 3000), (1080, 1920), (98, 126), (1, 2)],
)
@pytest.mark.parametrize("bounds", [(HUB.min_pixels, HUB.max_pixels), (3136, SMALL_MAX_PIXELS), None])
def test_smart_resize_matches_reference_on_edge_sizes(height, width, bounds):
    if bounds is None:  # the functions' own defaults must agree too
        assert qvi.smart_resize(height, width) == reference_smart_resize(height, width)
    else:
        kwargs = dict(factor=28, min_pixels=bounds[0], max_pixels=bounds[1])
        assert qvi.smart_resize(height, width, **kwargs) == reference_smart_resize(height, width, **kwargs)


def test_smart_resize_rounds_half_to_even():
    # 70 / 28 = 2.5 -> Python round() gives 2, so 56, not 84.
    assert reference_smart_resize(70, 70) == (56, 56)
    assert qvi.smart_resize(70, 70, 28, HUB.min_pixels, HUB.max_pixels) == (56, 56)


@pytest.mark.parametrize("height,width", [(1, 201), (300, 1), (2, 1000), (10000, 49)])
def test_smart_resize_aspect_ratio_error_matches_reference(height, width):
    with pytest.raises(ValueError) as want:
        reference_smart_resize(height, width)
    with pytest.raises(ValueError, match="absolute aspect ratio must be smaller than 200") as got:
        qvi.smart_resize(height, width)
    assert str(got.value) == str(want.value)


def test_smart_resize_rejects_empty_size():
    with pytest.raises(ValueError, match="positive"):
        qvi.smart_resize(0, 10)


def test_preprocess_rejects_extreme_aspect_ratio_like_reference():
    image = PIL.Image.new("RGB", (402, 2))
    with pytest.raises(ValueError) as want:
        run_reference([image], HUB)
    with pytest.raises(ValueError) as got:
        qvi.preprocess_image(image, HUB)
    assert str(got.value) == str(want.value)


# ----------------------------------------------------------------------------------- pixels


@FAST
@given(sized_images(1, 60))
def test_tiny_images_scaled_up_to_min_pixels(image):
    assert_same_as_reference([image], HUB)


@FAST
@given(sized_images(20, 300))
def test_medium_images_with_hub_bounds(image):
    assert_same_as_reference([image], HUB)


@FAST
@given(sized_images(300, 900))
def test_large_images_scaled_down_to_max_pixels(image):
    cfg = qvi.QwenVLImageConfig(max_pixels=SMALL_MAX_PIXELS)
    _, grid = assert_same_as_reference([image], cfg)
    assert grid[0, 1] * grid[0, 2] * 14 * 14 <= SMALL_MAX_PIXELS


@FAST
@given(
    short=st.integers(1, 30),
    ratio=st.floats(20, 200),
    tall=st.booleans(),
    mode=st.sampled_from(MODES),
    seed=st.integers(0, 2**32 - 1),
)
def test_thin_images(short, ratio, tall, mode, seed):
    long = max(short, min(int(short * ratio), short * 200))
    height, width = (long, short) if tall else (short, long)
    image = make_image(np.random.default_rng(seed), height, width, mode, "noise")
    assert_same_as_reference([image], qvi.QwenVLImageConfig(max_pixels=SMALL_MAX_PIXELS))


def test_hub_max_pixels_downscale_of_a_12_megapixel_photo():
    rng = np.random.default_rng(1)
    tile = rng.integers(0, 256, (400, 362, 3), dtype=np.uint8)
    image = PIL.Image.fromarray(np.tile(tile, (9, 10, 1)))  # 3600 x 3620 = 13.0M pixels > 12845056
    _, grid = assert_same_as_reference([image], HUB)
    assert grid[0, 1] * grid[0, 2] * 14 * 14 <= HUB.max_pixels


@pytest.mark.parametrize("mode", ["1", "CMYK", "I;16", "I", "F", "RGBX", "PA", "YCbCr", "RGBa", "HSV"])
def test_other_pil_modes_match_reference(mode):
    rng = np.random.default_rng(7)
    rgb = make_image(rng, 45, 61, "RGB", "noise")
    if mode == "I;16":
        image = PIL.Image.fromarray(rng.integers(0, 65536, (45, 61), dtype=np.uint16))
    elif mode == "I":
        image = PIL.Image.fromarray(rng.integers(-300, 600, (45, 61), dtype=np.int32))
    elif mode == "F":
        image = PIL.Image.fromarray(rng.uniform(-50, 400, (45, 61)).astype(np.float32))
    elif mode == "PA":
        image = make_image(rng, 45, 61, "RGBA", "noise").convert("PA")
    else:
        image = rgb.convert(mode)
    assert image.mode == mode
    assert_same_as_reference([image], HUB)


def test_rgb_image_with_transparency_info_is_composited_like_reference():
    rng = np.random.default_rng(3)
    image = make_image(rng, 40, 50, "RGB", "shapes")
    image.info["transparency"] = tuple(int(v) for v in np.asarray(image)[0, 0])
    pixels, _ = assert_same_as_reference([image], HUB)
    plain, _ = qvi.preprocess_images([PIL.Image.fromarray(np.asarray(image))], HUB)  # same pixels, no info
    assert not np.array_equal(pixels, plain)  # the composite really changed something


@FAST
@given(st.lists(sized_images(1, 200), min_size=1, max_size=4))
def test_multi_image_concatenation_matches_reference(images):
    pixels, grids = assert_same_as_reference(images, HUB)
    assert grids.shape == (len(images), 3)
    assert pixels.shape == (int(grids.prod(axis=1).sum()), HUB.patch_dim)
    # Each image's rows are the next prod(grid) rows, in input order.
    start = 0
    for image, grid in zip(images, grids):
        single, single_grid = qvi.preprocess_image(image, HUB)
        assert np.array_equal(single_grid, grid)
        assert np.array_equal(pixels[start : start + len(single)], single)
        start += len(single)


@pytest.mark.parametrize(
    "flags",
    [dict(do_rescale=False), dict(do_normalize=False), dict(do_rescale=False, do_normalize=False),
     dict(do_convert_rgb=False)],
)
def test_processing_flags_match_reference(flags):
    rng = np.random.default_rng(11)
    cfg = qvi.QwenVLImageConfig(**flags)
    images = [make_image(rng, 33, 90, "RGB", "noise"), make_image(rng, 120, 64, "RGB", "shapes")]
    assert_same_as_reference(images, cfg)


def test_no_resize_matches_reference_on_multiples_of_28_and_errors_otherwise():
    rng = np.random.default_rng(12)
    cfg = qvi.QwenVLImageConfig(do_resize=False)
    assert_same_as_reference([make_image(rng, 56, 84, "RGBA", "noise")], cfg)
    with pytest.raises(ValueError, match="multiple of 28"):
        qvi.preprocess_image(make_image(rng, 50, 84, "RGB", "noise"), cfg)


def test_non_rgb_without_conversion_raises():
    with pytest.raises(ValueError, match="'L'"):
        qvi.preprocess_image(PIL.Image.new("L", (30, 30)), qvi.QwenVLImageConfig(do_convert_rgb=False))


def test_zero_size_image_raises():
    with pytest.raises(qvi.ImageError, match="zero size"):
        qvi.preprocess_image(PIL.Image.new("RGB", (0, 5)), HUB)


# ----------------------------------------------------------------------------------- token counts


@FAST
@given(resize_cases())
def test_grid_and_token_count_match_reference_without_pixels(case):
    height, width, _, min_pixels, max_pixels = case
    cfg = qvi.QwenVLImageConfig(min_pixels=min_pixels, max_pixels=max(min_pixels, max_pixels))
    proc = reference_processor(cfg.min_pixels, cfg.max_pixels)
    grid = qvi.image_grid_thw(height, width, cfg)
    assert int(grid.prod()) == proc.get_number_of_image_patches(height, width)
    assert qvi.num_image_tokens(grid, cfg.merge_size) == proc.get_number_of_image_patches(height, width) // 4


def test_num_image_tokens_counts_rows_of_real_output():
    rng = np.random.default_rng(5)
    images = [make_image(rng, h, w, "RGB", "noise") for h, w in [(70, 70), (200, 31), (10, 300)]]
    pixels, grids = qvi.preprocess_images(images, HUB)
    counts = qvi.num_image_tokens(grids, HUB.merge_size)
    assert counts.shape == (3,)
    assert int(counts.sum()) * HUB.merge_size**2 == pixels.shape[0]
    assert qvi.num_image_tokens(grids[0], 2) == int(counts[0])


# ----------------------------------------------------------------------------------- config


def test_default_config_is_the_hub_preprocessor_config():
    assert (HUB.patch_size, HUB.temporal_patch_size, HUB.merge_size) == (14, 2, 2)
    assert (HUB.min_pixels, HUB.max_pixels) == (3136, 12845056)
    assert HUB.image_mean == tuple(OPENAI_CLIP_MEAN) and HUB.image_std == tuple(OPENAI_CLIP_STD)
    assert HUB.rescale_factor == 1 / 255 and HUB.resample == int(PIL.Image.Resampling.BICUBIC)
    assert HUB.do_convert_rgb and HUB.patch_dim == 1176 and HUB.factor == 28


HUB_FILE = {  # Qwen/Qwen2.5-VL-7B-Instruct preprocessor_config.json
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
}


@pytest.mark.parametrize(
    "config",
    [
        HUB_FILE,
        {"size": {"shortest_edge": 6272, "longest_edge": 401408}, "merge_size": 2},
        {"size": {"shortest_edge": 6272, "longest_edge": 401408}, "min_pixels": 3136, "max_pixels": 802816},
        {**HUB_FILE, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "some_future_key": {"x": 1}},
        {**HUB_FILE, "do_normalize": False, "rescale_factor": 0.5 / 255, "resample": 2},
    ],
)
def test_from_dict_reads_what_the_reference_reads(config):
    cfg = qvi.QwenVLImageConfig.from_dict(config)
    ref = Qwen2VLImageProcessorPil.from_dict(config)
    assert (cfg.min_pixels, cfg.max_pixels) == (ref.size.shortest_edge, ref.size.longest_edge)
    assert (cfg.patch_size, cfg.temporal_patch_size, cfg.merge_size) == (
        ref.patch_size, ref.temporal_patch_size, ref.merge_size)
    assert cfg.image_mean == tuple(ref.image_mean) and cfg.image_std == tuple(ref.image_std)
    assert (cfg.rescale_factor, cfg.resample, cfg.do_normalize) == (
        ref.rescale_factor, int(ref.resample), ref.do_normalize)
    image = make_image(np.random.default_rng(2), 400, 300, "RGBA", "shapes")
    out = ref(images=[image], return_tensors="np")
    pixels, grid = qvi.preprocess_image(image, cfg)
    assert np.array_equal(grid, out["image_grid_thw"][0]) and np.array_equal(pixels, out["pixel_values"])


@pytest.mark.parametrize(
    "config,key",
    [
        ({"patch_size": "14"}, "patch_size"),
        ({"merge_size": True}, "merge_size"),
        ({"max_pixels": 1.5e6}, "max_pixels"),
        ({"size": {"longest_edge": "big"}}, "size.longest_edge"),
        ({"size": [3136, 12845056]}, "size"),
        ({"image_mean": [0.5, 0.5]}, "image_mean"),
        ({"image_std": "0.5"}, "image_std"),
        ({"do_convert_rgb": "yes"}, "do_convert_rgb"),
        ({"rescale_factor": None, "resample": "bicubic"}, "resample"),
    ],
)
def test_from_dict_wrong_types_name_the_key(config, key):
    with pytest.raises(TypeError, match=f"'{key}'"):
        qvi.QwenVLImageConfig.from_dict(config)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="patch_size"):
        qvi.QwenVLImageConfig(patch_size=0)
    with pytest.raises(ValueError, match="min_pixels"):
        qvi.QwenVLImageConfig(min_pixels=10_000, max_pixels=5_000)


def test_config_round_trip_through_reference(tmp_path):
    cfg = qvi.QwenVLImageConfig(min_pixels=8 * 28 * 28, max_pixels=300 * 28 * 28,
                                image_mean=(0.4, 0.5, 0.6), image_std=(0.2, 0.25, 0.3))
    cfg.save(tmp_path)
    assert json.loads((tmp_path / qvi.CONFIG_FILENAME).read_text()) == cfg.to_dict()
    assert qvi.QwenVLImageConfig.from_folder(tmp_path) == cfg
    ref = Qwen2VLImageProcessorPil.from_pretrained(str(tmp_path))
    assert (ref.size.shortest_edge, ref.size.longest_edge) == (cfg.min_pixels, cfg.max_pixels)
    assert tuple(ref.image_mean) == cfg.image_mean and tuple(ref.image_std) == cfg.image_std
    assert (ref.patch_size, ref.temporal_patch_size, ref.merge_size) == (14, 2, 2)
    assert (ref.rescale_factor, int(ref.resample), ref.do_convert_rgb) == (
        cfg.rescale_factor, cfg.resample, cfg.do_convert_rgb)
    rng = np.random.default_rng(4)
    images = [make_image(rng, 700, 500, "RGB", "noise"), make_image(rng, 20, 30, "P", "shapes")]
    out = ref(images=images, return_tensors="np")
    pixels, grids = qvi.preprocess_images(images, cfg)
    assert np.array_equal(pixels, out["pixel_values"]) and np.array_equal(grids, out["image_grid_thw"])


def test_from_folder_without_file_gives_hub_defaults(tmp_path):
    assert qvi.QwenVLImageConfig.from_folder(tmp_path) == qvi.QwenVLImageConfig()


def test_from_folder_with_broken_json_names_the_file(tmp_path):
    (tmp_path / qvi.CONFIG_FILENAME).write_text("{not json")
    with pytest.raises(ValueError, match=qvi.CONFIG_FILENAME):
        qvi.QwenVLImageConfig.from_folder(tmp_path)


# ----------------------------------------------------------------------------------- load_image


def test_load_image_round_trips_a_png_and_closes_the_file(tmp_path):
    image = make_image(np.random.default_rng(8), 37, 53, "RGBA", "shapes")
    path = tmp_path / "picture.png"
    image.save(path)
    loaded = qvi.load_image(path)
    assert loaded.mode == "RGBA" and np.array_equal(np.asarray(loaded), np.asarray(image))
    os.remove(path)  # still usable after the file is gone: fully decoded
    assert_same_as_reference([loaded], HUB)


def test_load_image_keeps_palette_transparency(tmp_path):
    image = make_image(np.random.default_rng(9), 30, 30, "P", "noise")
    image.info["transparency"] = 5
    path = tmp_path / "palette.png"
    image.save(path, transparency=5)
    loaded = qvi.load_image(path)
    assert loaded.mode == "P" and loaded.info.get("transparency") == 5
    assert_same_as_reference([loaded], HUB)


def test_load_image_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope" / "missing.jpg"
    with pytest.raises(qvi.ImageError, match="not found") as err:
        qvi.load_image(path)
    assert str(path) in str(err.value)


def test_load_image_directory_names_the_path(tmp_path):
    with pytest.raises(qvi.ImageError) as err:
        qvi.load_image(tmp_path)
    assert str(tmp_path) in str(err.value)


@pytest.mark.parametrize(
    "name,payload",
    [
        ("empty.png", b""),
        ("garbage.jpg", bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8))),
        ("zero_width.bmp", b"BM" + struct.pack("<IHHI", 54, 0, 0, 54)
         + struct.pack("<IiiHHIIiiII", 40, 0, 5, 1, 24, 0, 0, 0, 0, 0, 0)),
        ("zero_size.ppm", b"P6\n0 0\n255\n"),
    ],
)
def test_load_image_unreadable_files_name_the_path(tmp_path, name, payload):
    path = tmp_path / name
    path.write_bytes(payload)
    with pytest.raises(qvi.ImageError) as err:
        qvi.load_image(path)
    assert str(path) in str(err.value)
    assert isinstance(err.value, ValueError)


def test_load_image_truncated_png_names_the_path(tmp_path):
    full = tmp_path / "full.png"
    make_image(np.random.default_rng(10), 64, 64, "RGB", "noise").save(full)
    cut = tmp_path / "cut.png"
    cut.write_bytes(full.read_bytes()[:300])  # header intact, pixel data cut short
    with pytest.raises(qvi.ImageError) as err:
        qvi.load_image(cut)
    assert str(cut) in str(err.value)


# ----------------------------------------------------------------------------------- video and imports


def test_video_input_is_not_supported_yet():
    frame = PIL.Image.new("RGB", (56, 56))
    with pytest.raises(NotImplementedError, match="video input is not supported yet"):
        qvi.preprocess_video([frame, frame], HUB)
    with pytest.raises(NotImplementedError, match="video input is not supported yet"):
        qvi.preprocess_images([[frame, frame]], HUB)  # nested frames = a video clip
    clip = np.zeros((4, 56, 56, 3), dtype=np.uint8)
    with pytest.raises(NotImplementedError, match="video input is not supported yet"):
        qvi.preprocess_images(clip, HUB)
    with pytest.raises(NotImplementedError, match="video input is not supported yet"):
        qvi.preprocess_image(clip, HUB)


def test_module_imports_neither_torch_nor_jax():
    code = (
        "import sys, skyjax.data.qwen_vl_image\n"
        "bad = [m for m in ('torch', 'jax', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
