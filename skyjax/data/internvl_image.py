"""InternVL dynamic-tiling image preprocessing (the Skywork R1V image path), in numpy + PIL only.

Skywork R1V feeds InternViT a variable number of 448x448 tiles per image: the image is resized onto the
(columns x rows) tile grid whose aspect ratio is closest to the image's, cut into tiles row-major, and, when
there is more than one tile, a 448x448 thumbnail of the whole image is appended as the LAST tile.

The numeric reference is transformers' ``GotOcr2ImageProcessorPil(crop_to_patches=True, min_patches=1,
max_patches=12, size={"height": 448, "width": 448}, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)``;
``tile_image`` matches it bit for bit (max abs diff 0.0).  Doing so requires mirroring its quirks:

* RGB conversion composites any transparency (an ``A`` band, or a ``transparency`` entry in ``image.info``)
  onto a WHITE background; the original InternVL ``image.convert("RGB")`` simply drops alpha.
* Grid choice (``closest_grid``) uses Python-float ``|w/h - cols/rows|``; on an exact float tie the later
  candidate wins iff ``w*h > 0.5 * S*S * cols*rows``.  Candidates are enumerated columns-major and stably
  sorted by tile count, so e.g. (1, 2) is tried before (2, 1) — with ``min_tiles=max_tiles=2`` a small
  5:4 landscape image therefore gets a 1x2 (portrait) grid.  Tiny images are upsampled onto many tiles (a 30x40 image
  takes a 3x4 grid, 13 tiles with the thumbnail).
* Both resizes (grid canvas and thumbnail) start from the full RGB image with PIL's resize
  (``reducing_gap=None``), on uint8 data.
* Rescale is ``(uint8 -> float64) * (1/255) -> float32``; normalise is ``(x - mean) / std`` in float32 with
  mean/std rounded to float32.  Each op is elementwise and correctly rounded, so mirroring the dtype at each
  step reproduces the reference exactly.

This module deliberately imports neither torch nor jax: it runs inside data-loading workers.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# Tile-axis buckets for ``bucket_tiles``.  One image yields 1 tile or (2..12 grid tiles + thumbnail) = 3..13,
# so 1/5/9/13 cover single images in a few shapes and multiples of 13 cover several full images.  Few
# buckets keep the number of jit compilations small.
DEFAULT_TILE_BUCKETS: tuple[int, ...] = (1, 5, 9, 13, 26, 39, 52)

_RESCALE = 1 / 255  # the reference's rescale_factor, applied in float64 before the float32 cast
_VALID_RESAMPLE = frozenset(int(r) for r in Image.Resampling)


# --------------------------------------------------------------------------------------------- validation
def _is_int(value: Any) -> bool:
    # bool is an int subclass; a JSON ``true`` where a count belongs is a config error, not 1.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _want_int(key: str, value: Any) -> int:
    if not _is_int(value):
        raise TypeError(f"config key {key!r} must be an int, got {type(value).__name__} {value!r}")
    return int(value)


def _want_bool(key: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"config key {key!r} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def _want_triple(key: str, value: Any) -> tuple[float, float, float]:
    # transformers also accepts one scalar for all channels.
    if _is_real(value):
        return (float(value),) * 3
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not all(_is_real(v) for v in value):
        raise TypeError(f"config key {key!r} must be 3 numbers (or one number), got {value!r}")
    if len(value) != 3:
        raise ValueError(f"config key {key!r} must have 3 entries (one per RGB channel), got {len(value)}")
    return tuple(float(v) for v in value)  # type: ignore[return-value]


def _want_mapping(key: str, value: Any) -> Mapping:
    if not isinstance(value, Mapping):
        raise TypeError(f"config key {key!r} must be a mapping, got {type(value).__name__} {value!r}")
    return value


# ------------------------------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class InternVLImageConfig:
    """Dynamic-tiling settings.  Defaults are Skywork R1V's (448px tiles, 1..12 tiles, thumbnail on).

    ``min_tiles == max_tiles == 1`` is "dynamic tiling off": one plain resize, never a thumbnail.
    """

    image_size: int = 448
    min_tiles: int = 1
    max_tiles: int = 12
    use_thumbnail: bool = True
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resample: int = int(Image.Resampling.BICUBIC)

    def __post_init__(self) -> None:
        # Validate eagerly: the reference silently falls back to a 1x1 grid when min > max.
        for key in ("image_size", "min_tiles", "max_tiles", "resample"):
            _want_int(key, getattr(self, key))
        _want_bool("use_thumbnail", self.use_thumbnail)
        if self.image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {self.image_size}")
        if not 1 <= self.min_tiles <= self.max_tiles:
            raise ValueError(f"need 1 <= min_tiles <= max_tiles, got min_tiles={self.min_tiles}, "
                             f"max_tiles={self.max_tiles}")
        if int(self.resample) not in _VALID_RESAMPLE:
            raise ValueError(f"resample must be a PIL.Image.Resampling value, got {self.resample!r}")
        mean, std = _want_triple("mean", self.mean), _want_triple("std", self.std)
        if any(s <= 0 for s in std):
            raise ValueError(f"std entries must be > 0, got {std}")
        # Normalise field types so equal configs compare and hash equal.
        for key, value in (("image_size", int(self.image_size)), ("min_tiles", int(self.min_tiles)),
                           ("max_tiles", int(self.max_tiles)), ("resample", int(self.resample)),
                           ("use_thumbnail", bool(self.use_thumbnail)), ("mean", mean), ("std", std)):
            object.__setattr__(self, key, value)

    @classmethod
    def from_chat_config(cls, config: Mapping[str, Any]) -> InternVLImageConfig:
        """From an InternVL-chat / Skywork-R1V ``config.json`` dict (remote-code layout).

        Tile size: ``force_image_size``, else ``vision_config.image_size``.  ``dynamic_image_size: false``
        means a single tile.  Missing keys keep this class's defaults (the values R1V's own inference code
        passes), and mean/std are always ImageNet since the chat config does not carry them.
        """
        config = _want_mapping("config", config)
        kw: dict[str, Any] = {}
        size = config.get("force_image_size")
        if size is None:
            vision = config.get("vision_config")
            if vision is not None:
                size = _want_mapping("vision_config", vision).get("image_size")
                if size is not None:
                    kw["image_size"] = _want_int("vision_config.image_size", size)
        else:
            kw["image_size"] = _want_int("force_image_size", size)
        for src, dst in (("min_dynamic_patch", "min_tiles"), ("max_dynamic_patch", "max_tiles")):
            if config.get(src) is not None:
                kw[dst] = _want_int(src, config[src])
        if config.get("use_thumbnail") is not None:
            kw["use_thumbnail"] = _want_bool("use_thumbnail", config["use_thumbnail"])
        dynamic = config.get("dynamic_image_size")
        if dynamic is not None and not _want_bool("dynamic_image_size", dynamic):
            kw["min_tiles"] = kw["max_tiles"] = 1
        return cls(**kw)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> InternVLImageConfig:
        """From a transformers-native ``preprocessor_config.json`` dict (GotOcr2 / InternVL-hf layout).

        Reads ``crop_to_patches`` (false means a single tile), ``min_patches``, ``max_patches``, ``size``
        (``{"height": S, "width": S}`` or an int; must be square), ``image_mean``, ``image_std`` and
        ``resample``.  Switches this module cannot honour (``do_normalize: false``, a non-1/255
        ``rescale_factor``, ...) raise instead of silently producing different pixels.
        """
        config = _want_mapping("config", config)
        for key in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
            if config.get(key) is not None and not _want_bool(key, config[key]):
                raise ValueError(f"config key {key!r} is false; InternVL tiling always applies it")
        factor = config.get("rescale_factor")
        if factor is not None:
            if not _is_real(factor):
                raise TypeError(f"config key 'rescale_factor' must be a number, got {factor!r}")
            if abs(float(factor) - _RESCALE) > 1e-12:
                raise ValueError(f"config key 'rescale_factor' must be 1/255, got {factor!r}")
        kw: dict[str, Any] = {}
        size = config.get("size")
        if size is not None:
            if _is_int(size):
                kw["image_size"] = int(size)
            else:
                size = _want_mapping("size", size)
                if "height" not in size or "width" not in size:
                    raise ValueError(f"config key 'size' must have 'height' and 'width', got {dict(size)}")
                h, w = _want_int("size.height", size["height"]), _want_int("size.width", size["width"])
                if h != w:
                    raise ValueError(f"config key 'size' must be square for InternViT tiles, got {h}x{w}")
                kw["image_size"] = h
        for src, dst in (("min_patches", "min_tiles"), ("max_patches", "max_tiles"), ("resample", "resample")):
            if config.get(src) is not None:
                kw[dst] = _want_int(src, config[src])
        for src, dst in (("image_mean", "mean"), ("image_std", "std")):
            if config.get(src) is not None:
                kw[dst] = _want_triple(src, config[src])
        crop = config.get("crop_to_patches")
        # Reference: tiling only when crop_to_patches and max_patches > 1; otherwise one plain resize.
        if (crop is not None and not _want_bool("crop_to_patches", crop)) or kw.get("max_tiles", 2) <= 1:
            kw["min_tiles"] = kw["max_tiles"] = 1
        return cls(**kw)


# ------------------------------------------------------------------------------------------- grid choice
@functools.lru_cache(maxsize=64)
def candidate_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    """All (columns, rows) grids with ``min_tiles <= columns*rows <= max_tiles``, in the reference's order.

    Enumerated columns-major then stably sorted by tile count: the order decides exact ties in
    ``closest_grid``, so it must not be changed (e.g. to a set, as the original InternVL code uses).
    """
    grids = [(c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1)
             if min_tiles <= c * r <= max_tiles]
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def closest_grid(width: int, height: int, cfg: InternVLImageConfig | None = None) -> tuple[int, int]:
    """The (columns, rows) tile grid for a ``width`` x ``height`` image: smallest |aspect difference|.

    On an exact (float) tie the later candidate wins iff the image area exceeds half the grid's pixel area,
    i.e. more tiles are preferred until they would upsample the image more than 2x in area.  The expression
    order mirrors the reference so float rounding, and hence tie detection, is identical.
    """
    cfg = cfg if cfg is not None else InternVLImageConfig()
    if width < 1 or height < 1:
        raise ValueError(f"image must be at least 1x1, got {width}x{height}")
    aspect_ratio = width / height
    area = width * height
    size = cfg.image_size
    best_diff, best = float("inf"), (1, 1)
    for grid in candidate_grids(cfg.min_tiles, cfg.max_tiles):
        diff = abs(aspect_ratio - grid[0] / grid[1])
        if diff < best_diff:
            best_diff, best = diff, grid
        elif diff == best_diff and area > 0.5 * size * size * grid[0] * grid[1]:
            best = grid  # best_diff unchanged, as in the reference
    return best


# --------------------------------------------------------------------------------------------------- tiling
def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB conversion exactly as transformers' ``convert_to_rgb``: transparency goes onto white."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _crop_tiles(image: Image.Image, cfg: InternVLImageConfig) -> list[np.ndarray]:
    """uint8 (S, S, 3) tiles: grid tiles row-major, then the optional thumbnail."""
    rgb = _to_rgb(image)
    size = cfg.image_size
    cols, rows = closest_grid(rgb.width, rgb.height, cfg)
    canvas = np.asarray(rgb.resize((size * cols, size * rows), resample=cfg.resample))
    tiles = [canvas[r * size:(r + 1) * size, c * size:(c + 1) * size]
             for r in range(rows) for c in range(cols)]
    if cfg.use_thumbnail and len(tiles) != 1:
        # Thumbnail is resized from the full image, not from the canvas, as in the reference.
        tiles.append(np.asarray(rgb.resize((size, size), resample=cfg.resample)))
    return tiles


def _normalise(tiles: Sequence[np.ndarray], cfg: InternVLImageConfig) -> np.ndarray:
    size = cfg.image_size
    out = np.empty((len(tiles), 3, size, size), dtype=np.float32)
    mean = np.asarray(cfg.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(cfg.std, dtype=np.float32)[:, None, None]
    for i, tile in enumerate(tiles):
        # Same dtype at every step as the reference: float64 rescale, float32 cast, float32 normalise.
        x = (tile.transpose(2, 0, 1).astype(np.float64) * _RESCALE).astype(np.float32)
        out[i] = (x - mean) / std
    return out


def tile_image(image: Image.Image, cfg: InternVLImageConfig | None = None) -> np.ndarray:
    """One image -> float32 ``(n_tiles, 3, S, S)`` normalised tiles (thumbnail last when n_tiles > 1)."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"tile_image expects a PIL.Image.Image, got {type(image).__name__}")
    cfg = cfg if cfg is not None else InternVLImageConfig()
    return _normalise(_crop_tiles(image, cfg), cfg)


def tile_images(images: Sequence[Image.Image], cfg: InternVLImageConfig | None = None
                ) -> tuple[np.ndarray, list[int]]:
    """Several images of one sample -> (``(sum n_tiles, 3, S, S)`` float32, per-image tile counts).

    Tiles are concatenated in image order, so image k owns rows ``sum(num_tiles[:k]) : sum(num_tiles[:k+1])``.
    """
    if isinstance(images, Image.Image):
        raise TypeError("tile_images expects a sequence of images; use tile_image for one image")
    cfg = cfg if cfg is not None else InternVLImageConfig()
    per_image = [tile_image(im, cfg) for im in images]
    num_tiles = [t.shape[0] for t in per_image]
    if not per_image:
        return np.zeros((0, 3, cfg.image_size, cfg.image_size), np.float32), num_tiles
    return np.concatenate(per_image, axis=0), num_tiles


# ------------------------------------------------------------------------------------------------ bucketing
def bucket_tiles(pixel_values: np.ndarray, num_tiles: Sequence[int] | int,
                 buckets: Sequence[int] = DEFAULT_TILE_BUCKETS) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pad the tile axis up to the smallest bucket >= the tile count, for static shapes under jit.

    Returns ``(padded (bucket, ...) array, valid (bucket,) bool mask)``; the first ``sum(num_tiles)`` rows
    are the real tiles.  Raises ValueError when the count exceeds the largest bucket.
    """
    pixel_values = np.asarray(pixel_values)
    counts = [num_tiles] if _is_int(num_tiles) else list(num_tiles)
    if not all(_is_int(c) and c >= 0 for c in counts):
        raise TypeError(f"num_tiles must be non-negative ints, got {num_tiles!r}")
    count = int(sum(counts))
    if pixel_values.ndim < 1 or pixel_values.shape[0] != count:
        raise ValueError(f"pixel_values has {pixel_values.shape[:1]} tiles but num_tiles sums to {count}")
    if not buckets or not all(_is_int(b) and b >= 1 for b in buckets):
        raise ValueError(f"buckets must be a non-empty sequence of positive ints, got {buckets!r}")
    fitting = [int(b) for b in buckets if b >= count]
    if not fitting:
        raise ValueError(f"{count} tiles do not fit the largest tile bucket {max(buckets)}; "
                         "add a larger bucket or lower max_tiles / images per sample")
    bucket = min(fitting)
    padded = np.zeros((bucket,) + pixel_values.shape[1:], dtype=pixel_values.dtype)
    padded[:count] = pixel_values
    valid = np.zeros((bucket,), dtype=bool)
    valid[:count] = True
    return padded, valid


__all__ = [
    "DEFAULT_TILE_BUCKETS", "IMAGENET_MEAN", "IMAGENET_STD", "InternVLImageConfig", "bucket_tiles",
    "candidate_grids", "closest_grid", "tile_image", "tile_images",
]
