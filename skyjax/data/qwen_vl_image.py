"""Qwen2-VL / Qwen2.5-VL image preprocessing in numpy + PIL, bit-exact with transformers.

The reference is ``transformers.models.qwen2_vl.image_processing_pil_qwen2_vl.Qwen2VLImageProcessorPil``
(transformers 5.24). For the same PIL image and the same settings, :func:`preprocess_image` returns the
same ``pixel_values`` (difference 0.0) and ``image_grid_thw``. The steps, in the reference's order:

1. RGB conversion: images with an alpha band (or a ``transparency`` entry in ``image.info``, e.g. palette
   images with a transparent index) are composited onto opaque white; everything else is
   ``image.convert("RGB")`` (so ``I;16``/``I``/``F`` are clipped to 0..255 by PIL, CMYK uses PIL's formula).
2. ``smart_resize`` picks (h', w'), multiples of ``patch_size * merge_size`` with h'*w' in [min, max] pixels;
   PIL bicubic resize of the uint8 RGB image (reducing_gap None).
3. Rescale in float64 (``x * rescale_factor``), cast to float32, then ``(x - mean) / std`` in float32.
4. Patchify into rows in merge-block order (block_row, block_col, in_row, in_col) and features
   (C, T, ph, pw); the single frame is repeated ``temporal_patch_size`` times. ``grid_thw = (1, h'/p, w'/p)``.

Only numpy and PIL are imported, so data-loading workers stay light (no torch, no jax).
Video input is not supported yet: the video entry points raise ``NotImplementedError``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import PIL.Image

__all__ = [
    "CONFIG_FILENAME",
    "ImageError",
    "QwenVLImageConfig",
    "image_grid_thw",
    "load_image",
    "num_image_tokens",
    "preprocess_image",
    "preprocess_images",
    "preprocess_video",
    "smart_resize",
    "to_rgb",
]

CONFIG_FILENAME = "preprocessor_config.json"
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VIDEO_NOT_SUPPORTED = "video input is not supported yet: only single still images can be preprocessed"


class ImageError(ValueError):
    """An image file that cannot be used: missing, unreadable, corrupt or empty."""


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = 56 * 56,
    max_pixels: int = 14 * 14 * 4 * 1280,
) -> tuple[int, int]:
    """Target (height, width): multiples of ``factor``, area within [min_pixels, max_pixels], aspect kept.

    Same arithmetic and defaults as transformers' ``smart_resize`` (note: the defaults are the function's,
    max 1003520, not the hub's 12845056; pass the config's values). Python ``round`` is half-to-even, so
    70 -> 56 (70/28 = 2.5 rounds to 2). The only addition is a clear error for non-positive sizes, which
    the reference turns into a ZeroDivisionError.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image height and width must be positive, got height={height}, width={width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


# ---------------------------------------------------------------------------------------------- config


def _check_int(key: str, value: Any) -> int:
    # bool is an int subclass; `"patch_size": true` is a broken file, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"preprocessor config key {key!r} must be an integer, got {value!r}")
    return value


def _check_positive_int(key: str, value: Any) -> int:
    value = _check_int(key, value)
    if value < 1:
        raise ValueError(f"preprocessor config key {key!r} must be positive, got {value}")
    return value


def _check_float(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"preprocessor config key {key!r} must be a number, got {value!r}")
    return float(value)


def _check_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"preprocessor config key {key!r} must be true or false, got {value!r}")
    return value


def _check_rgb_triple(key: str, value: Any) -> tuple[float, float, float]:
    # The reference broadcasts a single number to every channel.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (float(value),) * 3
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 3:
        raise TypeError(f"preprocessor config key {key!r} must be a number or a list of 3 numbers, got {value!r}")
    return tuple(_check_float(key, v) for v in value)  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class QwenVLImageConfig:
    """Image preprocessing settings; the defaults are the Qwen2.5-VL hub ``preprocessor_config.json``.

    ``Qwen2VLImageProcessorPil()`` itself defaults to max_pixels 1003520 (28*28*1280); the hub file says
    12845056 (16384*28*28), which is what the released models were run with.
    """

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 4 * 28 * 28  # 3136
    max_pixels: int = 16384 * 28 * 28  # 12845056
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = int(PIL.Image.Resampling.BICUBIC)
    do_convert_rgb: bool = True
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True

    def __post_init__(self) -> None:
        # Validate here too so hand-built configs fail as early as ones read from a file.
        for key in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels"):
            _check_positive_int(key, getattr(self, key))
        for key in ("image_mean", "image_std"):
            object.__setattr__(self, key, _check_rgb_triple(key, getattr(self, key)))
        object.__setattr__(self, "rescale_factor", _check_float("rescale_factor", self.rescale_factor))
        object.__setattr__(self, "resample", _check_int("resample", self.resample))
        if isinstance(self.resample, PIL.Image.Resampling):  # store the plain int that JSON holds
            object.__setattr__(self, "resample", int(self.resample))
        for key in ("do_convert_rgb", "do_resize", "do_rescale", "do_normalize"):
            _check_bool(key, getattr(self, key))
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) must not exceed max_pixels ({self.max_pixels})")

    @property
    def factor(self) -> int:
        """Resized sides are multiples of this: one merged token covers factor x factor pixels."""
        return self.patch_size * self.merge_size

    @property
    def max_patches(self) -> int:
        """The patches of an image resized to max_pixels (max_pixels / patch_size^2): the bound a run gives the vision
        tower (Qwen2_5_VLVisionConfig.max_image_patches). smart_resize stays within max_pixels except for extreme
        aspect ratios (a side clamped up to one factor), which the data pipeline reports as a bad row."""
        return self.max_pixels // (self.patch_size * self.patch_size)

    @property
    def patch_dim(self) -> int:
        """Length of one row of ``pixel_values``: 3 * temporal_patch_size * patch_size**2 (1176)."""
        return 3 * self.temporal_patch_size * self.patch_size * self.patch_size

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> QwenVLImageConfig:
        """Read a ``preprocessor_config.json`` dict. Unknown keys are ignored; missing or null keys keep
        the hub defaults. Pixel bounds come from ``min_pixels``/``max_pixels`` or from
        ``size: {shortest_edge, longest_edge}``; like the reference, ``min_pixels``/``max_pixels`` win.

        Caveat: the reference class fills a *missing* max bound with its class default 1003520, we fill
        it with the hub's 12845056; released configs always carry the bound, so both agree there.
        """
        if not isinstance(config, Mapping):
            raise TypeError(f"preprocessor config must be a JSON object, got {type(config).__name__}")
        values: dict[str, Any] = {}
        size = config.get("size")
        if size is not None:
            if not isinstance(size, Mapping):
                raise TypeError(f"preprocessor config key 'size' must be an object, got {size!r}")
            for size_key, field in (("shortest_edge", "min_pixels"), ("longest_edge", "max_pixels")):
                if size.get(size_key) is not None:
                    values[field] = _check_int(f"size.{size_key}", size[size_key])
        simple = {
            "patch_size": _check_int,
            "temporal_patch_size": _check_int,
            "merge_size": _check_int,
            "min_pixels": _check_int,
            "max_pixels": _check_int,
            "image_mean": _check_rgb_triple,
            "image_std": _check_rgb_triple,
            "rescale_factor": _check_float,
            "resample": _check_int,
            "do_convert_rgb": _check_bool,
            "do_resize": _check_bool,
            "do_rescale": _check_bool,
            "do_normalize": _check_bool,
        }
        for key, check in simple.items():
            # null means "use the default" in the reference too.
            if config.get(key) is not None:
                values[key] = check(key, config[key])
        return cls(**values)

    @classmethod
    def from_folder(cls, path: str | os.PathLike) -> QwenVLImageConfig:
        """Read ``<path>/preprocessor_config.json``; hub defaults when the folder has no such file."""
        file = os.path.join(os.fspath(path), CONFIG_FILENAME)
        if not os.path.isfile(file):
            return cls()
        try:
            with open(file, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read image preprocessor config {file}: {e}") from e
        return cls.from_dict(config)

    def to_dict(self) -> dict[str, Any]:
        """A ``preprocessor_config.json`` dict that ``Qwen2VLImageProcessorPil`` reads back unchanged.

        Both pixel-bound spellings are written so old and new readers agree.
        """
        return {
            "image_processor_type": "Qwen2VLImageProcessor",
            "min_pixels": self.min_pixels,
            "max_pixels": self.max_pixels,
            "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
            "patch_size": self.patch_size,
            "temporal_patch_size": self.temporal_patch_size,
            "merge_size": self.merge_size,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "rescale_factor": self.rescale_factor,
            "resample": self.resample,
            "do_convert_rgb": self.do_convert_rgb,
            "do_resize": self.do_resize,
            "do_rescale": self.do_rescale,
            "do_normalize": self.do_normalize,
        }

    def save(self, path: str | os.PathLike) -> str:
        """Write ``<path>/preprocessor_config.json`` (folder created if needed); returns the file path."""
        os.makedirs(path, exist_ok=True)
        file = os.path.join(os.fspath(path), CONFIG_FILENAME)
        with open(file, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")
        return file


# ---------------------------------------------------------------------------------------------- images


def load_image(path: str | os.PathLike) -> PIL.Image.Image:
    """Open and fully decode an image file (lazy PIL decoding would defer corruption errors).

    Returns the image in its stored mode (conversion happens in :func:`preprocess_image`, as in the
    reference). No EXIF rotation is applied: the reference does not apply one either.
    Raises :class:`ImageError` naming the file when it is missing, unreadable, corrupt or zero-sized.
    """
    name = os.fspath(path)
    if not os.path.exists(name):
        raise ImageError(f"image file not found: {name}")
    if not os.path.isfile(name):
        raise ImageError(f"image path is not a file: {name}")
    try:
        with PIL.Image.open(name) as opened:
            opened.load()
            # copy() detaches from the file handle (multi-frame files keep it open otherwise);
            # it keeps mode, palette and info (transparency).
            image = opened.copy()
    except PIL.UnidentifiedImageError as e:
        raise ImageError(f"not a readable image file (unknown format, empty or corrupt): {name}") from e
    except Exception as e:  # PIL reports truncation/corruption with many exception types.
        raise ImageError(f"cannot decode image file {name}: {type(e).__name__}: {e}") from e
    if image.width == 0 or image.height == 0:
        raise ImageError(f"image file has zero size ({image.width}x{image.height}): {name}")
    return image


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """RGB exactly as transformers' ``convert_to_rgb``: transparency goes onto opaque white.

    Note the check is ``"A" in getbands()``: premultiplied modes (``RGBa``, ``La``) have a lowercase ``a``
    and go through plain ``convert("RGB")`` like the reference does.
    """
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _is_video_like(item: Any) -> bool:
    # A list/tuple of frames or a (T, H, W, C) array is how video reaches image APIs by mistake.
    return isinstance(item, (list, tuple)) or (isinstance(item, np.ndarray) and item.ndim == 4)


def image_grid_thw(height: int, width: int, cfg: QwenVLImageConfig) -> np.ndarray:
    """``(1, h'/patch, w'/patch)`` for an image of the given size, without touching pixels.

    Lets callers count placeholder tokens (``num_image_tokens``) before decoding the image.
    """
    if cfg.do_resize:
        height, width = smart_resize(height, width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    elif height % cfg.factor or width % cfg.factor:
        # The reference's reshape would fail here; say why instead.
        raise ValueError(
            f"do_resize is false but the image size {height}x{width} is not a multiple of {cfg.factor}"
        )
    return np.array([1, height // cfg.patch_size, width // cfg.patch_size], dtype=np.int64)


def _value_table(cfg: QwenVLImageConfig) -> np.ndarray:
    """(3, 256) float32: the rescale+normalise result for every uint8 value of every channel.

    The reference's steps are elementwise on uint8 input, so computing them once per possible value with
    the same dtypes (float64 multiply, float32 cast, float32 subtract/divide) and looking pixels up is
    bit-identical and avoids full-image float64 temporaries on 12-megapixel inputs.
    """
    values = np.arange(256, dtype=np.uint8)
    if cfg.do_rescale:
        scaled = (values.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    else:
        scaled = values.astype(np.float32)
    table = np.broadcast_to(scaled, (3, 256))
    if cfg.do_normalize:
        mean = np.array(cfg.image_mean, dtype=np.float32)[:, None]
        std = np.array(cfg.image_std, dtype=np.float32)[:, None]
        table = (table - mean) / std
    return np.ascontiguousarray(table, dtype=np.float32)


def _patchify(chw: np.ndarray, cfg: QwenVLImageConfig) -> np.ndarray:
    """(C, H, W) float32 -> (gh*gw, C*T*p*p) rows in merge-block order, frame repeated T times.

    Merge-block order puts the merge_size x merge_size patches that the vision tower later fuses into one
    token next to each other.
    """
    channels, height, width = chw.shape
    p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    grid_h, grid_w = height // p, width // p
    blocks = chw.reshape(channels, grid_h // m, m, p, grid_w // m, m, p)
    blocks = blocks.transpose(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, C, p, p)
    frames = np.broadcast_to(blocks[:, :, :, :, :, None], (*blocks.shape[:5], t, p, p))
    return frames.reshape(grid_h * grid_w, channels * t * p * p)


def preprocess_image(image: PIL.Image.Image, cfg: QwenVLImageConfig) -> tuple[np.ndarray, np.ndarray]:
    """One still image -> ``(patches float32 (gh*gw, patch_dim), grid_thw int64 (3,) = (1, gh, gw))``.

    Equal to ``Qwen2VLImageProcessorPil(**settings)(images=[image], return_tensors="np")``.
    """
    if _is_video_like(image):
        raise NotImplementedError(VIDEO_NOT_SUPPORTED)
    if not isinstance(image, PIL.Image.Image):
        raise TypeError(f"expected a PIL.Image.Image, got {type(image).__name__}")
    if image.width == 0 or image.height == 0:
        raise ImageError(f"image has zero size ({image.width}x{image.height})")
    if cfg.do_convert_rgb:
        try:
            rgb = to_rgb(image)
        except ValueError as e:  # PIL: "conversion from X to Y not supported"
            raise ImageError(f"cannot convert a {image.mode!r} image to RGB: {e}") from e
    elif image.mode == "RGB":
        rgb = image
    else:
        # The reference would carry 1, 2 or 4 channels into a 3-channel normalise and fail there.
        raise ValueError(f"do_convert_rgb is false but the image mode is {image.mode!r}, not 'RGB'")

    grid_thw = image_grid_thw(rgb.height, rgb.width, cfg)
    if cfg.do_resize:
        new_h, new_w = int(grid_thw[1]) * cfg.patch_size, int(grid_thw[2]) * cfg.patch_size
        rgb = rgb.resize((new_w, new_h), resample=cfg.resample)  # PIL sizes are (width, height)
    hwc = np.asarray(rgb, dtype=np.uint8)
    table = _value_table(cfg)
    chw = np.stack([table[c][hwc[:, :, c]] for c in range(3)])
    return _patchify(chw, cfg), grid_thw


def preprocess_images(
    images: Sequence[PIL.Image.Image], cfg: QwenVLImageConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Several images -> ``(pixel_values (sum gh*gw, patch_dim), image_grid_thw (n, 3))``.

    Rows of all images are concatenated in input order, as the reference does; each image's rows are
    the next ``prod(grid_thw[i])`` rows.
    """
    if isinstance(images, PIL.Image.Image):
        images = [images]
    if isinstance(images, np.ndarray) and images.ndim == 4:
        raise NotImplementedError(VIDEO_NOT_SUPPORTED)
    if len(images) == 0:
        raise ValueError("preprocess_images needs at least one image")
    patches, grids = zip(*(preprocess_image(image, cfg) for image in images))
    return np.concatenate(patches, axis=0), np.stack(grids).astype(np.int64)


def preprocess_video(frames: Any, cfg: QwenVLImageConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Placeholder for video: raises rather than treating frames as unrelated still images."""
    raise NotImplementedError(VIDEO_NOT_SUPPORTED)


def num_image_tokens(grid_thw: Any, merge_size: int) -> int | np.ndarray:
    """Placeholder tokens per image: ``t*h*w // merge_size**2``.

    ``grid_thw`` of shape (3,) gives an int; shape (n, 3) gives an int64 array of n counts.
    """
    grid = np.asarray(grid_thw, dtype=np.int64)
    if grid.shape[-1:] != (3,):
        raise ValueError(f"grid_thw must have shape (3,) or (n, 3), got {grid.shape}")
    counts = grid.prod(axis=-1) // (merge_size * merge_size)
    return int(counts) if counts.ndim == 0 else counts
