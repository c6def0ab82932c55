"""Supervised fine-tuning data: SFT records -> static-shape batches for Skywork R1V (and Qwen2.5-VL), and the models.

A record (skyjax.data.records, kind "sft") is a TRL conversation `{"images", "messages"}` or a prompt/completion row
`{"images", "prompt", "completion"}`. Each becomes one row:

    images --vision format--> pixels (R1V: tiles [n, 3, S, S]; Qwen2.5-VL: patches [N, 1176] + grids)
    conversation --chat template, images expanded--> input_ids [L] + assistant_mask [L] (trained tokens: assistant
        content + its end-of-turn token; for prompt/completion rows only the completion's)

and b rows collate into a micro-batch padded to the smallest sequence bucket (data.seq_buckets) and vision bucket
(data.tile_buckets for R1V; data.patch_buckets / image_buckets for Qwen2.5-VL), all A micro-batches of a step sharing
one shape:

    input_ids [A, b, S] int32, attention_mask / assistant_mask [A, b, S] bool, row_weight [A, b] float32 (0: a
    padding row), vision: the model's image inputs (R1V: {"pixel_values": [A, T, 3, S, S]}), row_ids (host only)

Rows are bucketed, not packed: a row is one conversation.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from skyjax.config import ConfigError
from skyjax.convert.checkpoint import LoadedModel, load_model
from skyjax.convert.registry import ARCHITECTURES
from skyjax.data.chat import FormattedConversation, SequenceTooLongError, format_conversation, pad_batch
from skyjax.data.internvl_image import InternVLImageConfig, bucket_tiles, tile_images
from skyjax.data.qwen_vl_image import ImageError, QwenVLImageConfig, load_image, num_image_tokens, preprocess_image
from skyjax.data.records import Record
from skyjax.data.tokenizer import INTERNVL_IMAGE_MARKER, build_tiny_tokenizer, load_tokenizer, special_token_ids
from skyjax.models.r1v import R1VConfig, check_image_tokens as check_r1v_tokens
from skyjax.nn.functional import Functional
from skyjax.train.config import DataConfig, ModelConfig
from skyjax.train.batching import BadRowError, abstract, fit_bucket, row_location, split_micro_batches
from skyjax.train.bundle import ModelBundle, image_config, require_weights, runtime_overrides
from skyjax.train.pipeline import RecordPipeline


@dataclasses.dataclass
class SFTExample:
    row_id: str
    where: str
    conversation: FormattedConversation
    pixels: np.ndarray  # R1V: tiles [n, 3, S, S]; Qwen2.5-VL: patches [N, 1176]
    grids: np.ndarray  # Qwen2.5-VL: [n_images, 3] (t, h, w); R1V: [n_images, 0]


def load_images(record: Record, where: str, blank: bool = False) -> list:
    """The record's images, fully decoded (a missing or corrupt file is a BadRowError naming the row)."""
    from PIL import Image

    out = []
    for path in record.images:
        try:
            image = load_image(path)
        except ImageError as e:
            raise BadRowError(f"{where}: {e}") from None
        out.append(Image.new("RGB", image.size, (128, 128, 128)) if blank else image)
    return out


# --- vision formats: how one model family sees images -----------------------------------------------------------------
# A format has: `image_token` (the chat-template placeholder to expand), `for_run(bundle, data)`, `encode(images)` ->
# (pixels, grids, LLM tokens per image), `check_fits(example)`, `sizes(groups, where)` (the vision buckets of a
# batch), `collate(group, sizes, input_ids)` -> the model's image kwargs, `largest()` and `abstract(sizes)`.


class R1VTiles:
    """Skywork R1V / InternVL: dynamic tiles (thumbnail last); the k-th `<image>` of the text becomes `<img>` +
    `<IMG_CONTEXT>` x (tokens_per_tile x tiles) + `</img>`; a micro-batch's tiles are padded to a tile bucket."""

    image_token = INTERNVL_IMAGE_MARKER

    def __init__(self, model_cfg: R1VConfig, image_cfg: InternVLImageConfig, data: DataConfig):
        if image_cfg.image_size != model_cfg.tile_size:
            raise ConfigError(f"image tiles are {image_cfg.image_size} px but the model expects "
                              f"{model_cfg.tile_size} px tiles")
        if model_cfg.image_token_id is None:
            raise ConfigError("the model's <IMG_CONTEXT> id is unknown: use a checkpoint with an InternVL tokenizer")
        self.cfg, self.image_cfg, self.buckets = model_cfg, image_cfg, tuple(data.tile_buckets)

    @classmethod
    def for_run(cls, bundle: ModelBundle, data: DataConfig) -> "R1VTiles":
        image_cfg = bundle.image_cfg
        if data.max_tiles is not None:  # data.max_tiles overrides the checkpoint's max_dynamic_patch
            image_cfg = dataclasses.replace(image_cfg, max_tiles=data.max_tiles,
                                            min_tiles=min(image_cfg.min_tiles, data.max_tiles))
        return cls(bundle.model.config, image_cfg, data)

    def encode(self, images) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """-> (tiles [n, 3, S, S] float32, grids [n_images, 0], LLM tokens per image)."""
        tiles, per_image = tile_images(images, self.image_cfg)
        return tiles, np.zeros((len(images), 0), np.int32), [self.cfg.tokens_per_tile * n for n in per_image]

    def check_fits(self, example: SFTExample) -> None:
        fit_bucket(example.pixels.shape[0], self.buckets, "tile", example.where)

    def sizes(self, groups: Sequence[Sequence[SFTExample]], where: str) -> int:
        most = max(sum(e.pixels.shape[0] for e in g) for g in groups)
        return fit_bucket(max(most, 1), self.buckets, "tile", where)  # >= 1 tile: text-only batches share the program

    def collate(self, group: Sequence[SFTExample], tiles: int, input_ids: np.ndarray) -> dict:
        real = np.concatenate([e.pixels for e in group])  # every row's tiles in order (text-only rows: none)
        per_row = [e.pixels.shape[0] for e in group]
        check_r1v_tokens(input_ids, per_row, self.cfg.image_token_id, self.cfg.tokens_per_tile, tiles)
        return {"pixel_values": bucket_tiles(real.astype(np.float32), real.shape[0], [tiles])[0]}

    def abstract(self, tiles: int) -> dict:
        s = self.cfg.tile_size
        return {"pixel_values": jax.ShapeDtypeStruct((tiles, 3, s, s), np.float32)}

    def largest(self) -> int:
        return max(self.buckets)


class QwenPatches:
    """Qwen2.5-VL: each image becomes grid_t*grid_h*grid_w patches and that / merge^2 `<|image_pad|>` tokens; a
    micro-batch's patches are padded to a patch bucket and its grids to an image-slot bucket (M-RoPE reads them)."""

    image_token = "<|image_pad|>"

    def __init__(self, model_cfg, image_cfg: QwenVLImageConfig, data: DataConfig):
        self.cfg, self.image_cfg = model_cfg, image_cfg
        self.patch_buckets, self.image_buckets = tuple(data.patch_buckets), tuple(data.image_buckets)

    @classmethod
    def for_run(cls, bundle: ModelBundle, data: DataConfig) -> "QwenPatches":
        return cls(bundle.model.config, image_config(bundle, data), data)  # data.min_pixels / max_pixels apply

    def encode(self, images) -> tuple[np.ndarray, np.ndarray, list[int]]:
        c = self.image_cfg
        patches, grids = [], []
        for image in images:
            pv, grid = preprocess_image(image, c)
            patches.append(pv)
            grids.append(grid)
        dim = 3 * c.temporal_patch_size * c.patch_size**2
        pixels = np.concatenate(patches) if patches else np.zeros((0, dim), np.float32)
        grids = np.stack(grids).astype(np.int32) if grids else np.zeros((0, 3), np.int32)
        return pixels, grids, [int(num_image_tokens(g, c.merge_size)) for g in grids]

    def check_fits(self, example: SFTExample) -> None:
        fit_bucket(example.pixels.shape[0], self.patch_buckets, "patch", example.where)
        fit_bucket(example.grids.shape[0], self.image_buckets, "image", example.where)

    def sizes(self, groups, where: str) -> tuple[int, int]:
        patches = max(sum(e.pixels.shape[0] for e in g) for g in groups)
        images = max(sum(e.grids.shape[0] for e in g) for g in groups)
        return (fit_bucket(max(patches, self.cfg.vision.merge_unit), self.patch_buckets, "patch", where),
                fit_bucket(max(images, 1), self.image_buckets, "image", where))

    def collate(self, group, sizes: tuple[int, int], input_ids: np.ndarray) -> dict:
        from skyjax.models.qwen2_5_vl import check_image_tokens
        from skyjax.models.qwen2_5_vl_vision import pad_pixel_values, vision_inputs

        patches, slots = sizes
        grids = np.concatenate([e.grids for e in group])
        grid_slots = np.zeros((slots, 3), np.int32)
        grid_slots[: len(grids)] = grids
        check_image_tokens(input_ids, grid_slots, self.cfg.image_token_id, self.cfg.vision.spatial_merge_size,
                           images_per_row=[e.grids.shape[0] for e in group])
        pixels = np.concatenate([e.pixels for e in group]).astype(np.float32)
        return {"pixel_values": pad_pixel_values(pixels, patches),
                "vision_meta": vision_inputs(grids, self.cfg.vision, pad_to=patches), "image_grid_thw": grid_slots}

    def abstract(self, sizes: tuple[int, int]) -> dict:
        from skyjax.models.qwen2_5_vl_vision import vision_inputs

        patches, slots = sizes
        dim = 3 * self.image_cfg.temporal_patch_size * self.image_cfg.patch_size**2
        meta = vision_inputs(np.zeros((0, 3), np.int32), self.cfg.vision, pad_to=patches)
        return {"pixel_values": jax.ShapeDtypeStruct((patches, dim), np.float32),
                "vision_meta": {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in meta.items()},
                "image_grid_thw": jax.ShapeDtypeStruct((slots, 3), np.int32)}

    def largest(self) -> tuple[int, int]:
        return max(self.patch_buckets), max(self.image_buckets)


SFT_FORMATS = {"internvl": R1VTiles, "internvl_chat": R1VTiles, "qwen2_5_vl": QwenPatches}


def vision_format(bundle: ModelBundle, data: DataConfig):
    """The vision format of the bundle's architecture, with the run's tiling / pixel overrides applied."""
    arch = bundle.model.arch.name
    if arch not in SFT_FORMATS:
        raise ConfigError(f"SFT supports the architectures {', '.join(SFT_FORMATS)}, not {arch!r}")
    return SFT_FORMATS[arch].for_run(bundle, data)


# --- records -> examples -> batches -----------------------------------------------------------------------------------


def featurize_sft(record: Record, tokenizer, fmt, *, max_length: int | None = None,
                  blank_images: bool = False) -> SFTExample:
    """Load and preprocess the images, render the conversation with its trained-token mask; errors name the row."""
    where = row_location(record)
    pixels, grids, counts = fmt.encode(load_images(record, where, blank_images))
    messages, trained = record.sft_conversation()
    try:
        conv = format_conversation(tokenizer, messages, num_image_tokens=counts, image_token=fmt.image_token,
                                   max_length=max_length, loss_messages=trained)
    except SequenceTooLongError as e:
        raise BadRowError(f"{where}: the conversation is too long: {e}") from None
    except ValueError as e:
        raise BadRowError(f"{where}: {e}") from None
    if not conv.assistant_mask.any():
        raise BadRowError(f"{where}: no assistant tokens to train on")
    example = SFTExample(row_id=str(record.id if record.id is not None else where), where=where, conversation=conv,
                         pixels=pixels, grids=grids)
    fmt.check_fits(example)
    return example


def collate_sft(examples: Sequence[SFTExample], fmt, seq_buckets: Sequence[int], pad_id: int, *,
                micro_batches: int = 1, weights: Sequence[float] | None = None) -> dict:
    """Stack rows into arrays with a leading micro-batch axis [A, ...]; every micro-batch has the same shapes."""
    weights, groups, where = split_micro_batches(examples, micro_batches, weights, "rows")
    per = len(groups[0])
    seq = fit_bucket(max(e.conversation.length for e in examples), seq_buckets, "seq", where)
    sizes = fmt.sizes(groups, where)
    out = []
    for i, group in enumerate(groups):
        padded = pad_batch([e.conversation for e in group], pad_id, side="right", bucket_sizes=[seq])
        out.append({
            "input_ids": padded["input_ids"].astype(np.int32),
            "attention_mask": padded["attention_mask"].astype(bool),
            "assistant_mask": padded["assistant_mask"].astype(bool),
            "row_weight": weights[i * per:(i + 1) * per],
            "vision": fmt.collate(group, sizes, padded["input_ids"]),
        })
    batch = jax.tree.map(lambda *xs: np.stack(xs), *out)
    batch["row_ids"] = [e.row_id for e in examples]  # host-side only (named in errors)
    return batch


class SFTPipeline(RecordPipeline):
    """SFT conversations -> bucketed batches (see the module docstring)."""

    example_type = SFTExample

    def __init__(self, records: list[Record], bundle: ModelBundle, data: DataConfig, **kw):
        self.fmt = vision_format(bundle, data)
        self.seq_buckets = tuple(data.seq_buckets)
        # a row longer than the largest bucket is a bad row (skippable), not a failed batch
        self.max_length = min(data.max_length or max(self.seq_buckets), max(self.seq_buckets))
        super().__init__(records, bundle, data, **kw)

    def featurize(self, record: Record) -> SFTExample:
        return featurize_sft(record, self.bundle.tokenizer, self.fmt, max_length=self.max_length,
                             blank_images=self.blank)

    def collate(self, examples, weights) -> dict:
        return collate_sft(examples, self.fmt, self.seq_buckets, self.bundle.tokenizer.pad_token_id,
                           micro_batches=self.micro, weights=weights)


def abstract_sft_batch(bundle: ModelBundle, data: DataConfig, micro_batches: int, mesh: Mesh,
                       batch_size: int | None = None, hosts: int = 1) -> dict:
    """ShapeDtypeStructs (with the shardings `to_device` gives) of the largest-bucket SFT batch: for AOT compiles. On
    `hosts` > 1 the multi-host global batch (skyjax.train.global_batch): each host's share of the batch with its own
    largest vision buckets, the hosts' blocks side by side, `host_blocks` [A, H]."""
    from skyjax.train.global_batch import abstract_global_batch, host_share

    fmt = vision_format(bundle, data)
    rows = host_share(batch_size or data.batch_size, hosts, micro_batches, "rows")  # one host's micro-batch
    a, s = micro_batches, max(data.seq_buckets)

    def stacked(x):
        return jax.ShapeDtypeStruct((a, *x.shape), x.dtype)

    batch = {"input_ids": jax.ShapeDtypeStruct((rows, s), np.int32),
             "attention_mask": jax.ShapeDtypeStruct((rows, s), np.bool_),
             "assistant_mask": jax.ShapeDtypeStruct((rows, s), np.bool_),
             "row_weight": jax.ShapeDtypeStruct((rows,), np.float32),
             "vision": fmt.abstract(fmt.largest())}
    return abstract(abstract_global_batch(jax.tree.map(stacked, batch), hosts), mesh)


# --- models -----------------------------------------------------------------------------------------------------------


def tiny_r1v_config(cfg: ModelConfig, ids: dict) -> R1VConfig:
    """The built-in tiny R1V's config (shaped by cfg.tiny_*), given the tiny InternVL tokenizer's special-token ids."""
    runtime = {"dtype": cfg.dtype or "float32", "param_dtype": cfg.param_dtype or cfg.dtype or "float32",
               **runtime_overrides(cfg)}
    base = R1VConfig.tiny(image_token_id=ids["img_context"], **runtime)
    text = dataclasses.replace(base.text, num_hidden_layers=cfg.tiny_layers, hidden_size=cfg.tiny_hidden,
                               intermediate_size=2 * cfg.tiny_hidden, initializer_range=cfg.tiny_init_std,
                               eos_token_id=ids["eos"], pad_token_id=ids["pad"])
    vision = dataclasses.replace(base.vision, num_hidden_layers=cfg.tiny_vision_depth,
                                 initializer_range=cfg.tiny_init_std)
    return dataclasses.replace(base, text=text, vision=vision)


def tiny_r1v(cfg: ModelConfig, mesh: Mesh, folder: Path) -> ModelBundle:
    """A tiny random Skywork R1V (InternViT -> pixel shuffle -> projector -> Qwen2; 56 px tiles, 4 tokens per
    tile) with a local byte-level InternVL tokenizer (<img>, </img>, <IMG_CONTEXT>), saved under `folder`."""
    tok = build_tiny_tokenizer("internvl", out_dir=folder)
    mcfg = tiny_r1v_config(cfg, special_token_ids(tok))
    arch = ARCHITECTURES["internvl"]  # exports in the transformers-native InternVL layout
    fn = Functional.create(lambda r: arch.build(mcfg, r))
    params = fn.init(seed=cfg.seed, mesh=mesh)
    return ModelBundle(LoadedModel(arch, mcfg, fn, params, folder, {}), tok, mcfg.image_config())


def load_sft_bundle(cfg: ModelConfig, mesh: Mesh, run_dir: Path) -> ModelBundle:
    """The model of an SFT run: the tiny R1V, or an R1V / InternVL (either layout) or Qwen2.5-VL Hugging Face
    folder or skyjax checkpoint, with its own tokenizer and image settings."""
    if cfg.source == "tiny":
        return tiny_r1v(cfg, mesh, run_dir / "tokenizer")
    require_weights(cfg)
    loaded = load_model(cfg.source, mesh=mesh, dtype=cfg.dtype, param_dtype=cfg.param_dtype, **runtime_overrides(cfg))
    if loaded.arch.name not in SFT_FORMATS:
        raise ConfigError(f"{cfg.source}: SFT supports the architectures {', '.join(SFT_FORMATS)}, not "
                          f"{loaded.arch.name!r}")
    tok = load_tokenizer(cfg.tokenizer or loaded.folder)
    if isinstance(loaded.config, R1VConfig):
        from skyjax.models.r1v_inputs import image_token_id_of

        image_token_id_of(tok, loaded.config)  # the tokenizer's <IMG_CONTEXT> must be the model's
        image_cfg: Any = loaded.config.image_config()
    else:
        image_cfg = QwenVLImageConfig.from_folder(loaded.folder)
    return ModelBundle(loaded, tok, image_cfg)
