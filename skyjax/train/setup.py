"""What a run needs before its first step: the model on the mesh with its tokenizer and image settings (a
`ModelBundle`), and the data as a deterministic, checkpointable grain pipeline (`RecordPipeline`: shuffled, repeated,
host-sliced records -> featurized examples -> static-shape batches, bad rows raised or skipped and counted).

The reward model's pieces live here (`PairPipeline`, `load_reward_bundle`); SFT's in skyjax.train.sft; the task
registry (skyjax.train.tasks) picks them by the run's kind."""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
from jax.sharding import Mesh

from skyjax.config import ConfigError
from skyjax.convert.checkpoint import LoadedModel, load_model
from skyjax.convert.registry import ARCHITECTURES
from skyjax.data.qwen_vl_image import QwenVLImageConfig
from skyjax.data.records import Record, RecordReader
from skyjax.data.tokenizer import build_tiny_tokenizer, load_tokenizer, special_token_ids
from skyjax.models.qwen2_5_vl import Qwen2_5_VLConfig
from skyjax.nn.functional import Functional
from skyjax.train.config import DataConfig, ModelConfig
from skyjax.train.global_batch import ROW_KEYS  # [A, B, S] token rows: split over the batch axes
from skyjax.train.pairs import (BadRowError, PairBuckets, PairExample, collate_pairs, collate_shared_prompt,
                                featurize_pair, shared_prompt_length)


@dataclasses.dataclass
class ModelBundle:
    model: LoadedModel
    tokenizer: Any
    image_cfg: Any  # QwenVLImageConfig (Qwen2.5-VL) or InternVLImageConfig (R1V)


def runtime_overrides(cfg: ModelConfig) -> dict:
    """The model config fields a run may override (remat, attention_impl), when set."""
    out = {}
    for key in ("remat", "attention_impl"):
        if getattr(cfg, key) is not None:
            out[key] = getattr(cfg, key)
    return out


def tiny_reward_config(cfg: ModelConfig, ids: dict) -> Qwen2_5_VLConfig:
    """The built-in tiny Qwen2.5-VL's config (shaped by cfg.tiny_*), given the tiny tokenizer's special-token ids."""
    runtime = {"dtype": cfg.dtype or "float32", "param_dtype": cfg.param_dtype or cfg.dtype or "float32",
               **runtime_overrides(cfg)}
    mcfg = Qwen2_5_VLConfig.tiny(image_token_id=ids["image_pad"], video_token_id=ids["video_pad"],
                                 vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"],
                                 **runtime)
    text = dataclasses.replace(mcfg.text, num_hidden_layers=cfg.tiny_layers, eos_token_id=ids["eos"],
                               pad_token_id=ids["pad"], hidden_size=cfg.tiny_hidden,
                               intermediate_size=2 * cfg.tiny_hidden, initializer_range=cfg.tiny_init_std)
    vision = dataclasses.replace(mcfg.vision, depth=cfg.tiny_vision_depth, out_hidden_size=cfg.tiny_hidden,
                                 initializer_range=cfg.tiny_init_std,
                                 fullatt_block_indexes=tuple(i for i in mcfg.vision.fullatt_block_indexes
                                                             if i < cfg.tiny_vision_depth))
    return dataclasses.replace(mcfg, text=text, vision=vision)


TINY_IMAGE_CFG = QwenVLImageConfig(min_pixels=56 * 56, max_pixels=112 * 112)  # the tiny reward model's images


def tiny_reward_model(cfg: ModelConfig, mesh: Mesh, folder: Path) -> ModelBundle:
    """The built-in tiny Qwen2.5-VL reward model with a local byte-level tokenizer (saved under `folder`)."""
    tok = build_tiny_tokenizer("qwen2_5_vl", out_dir=folder)
    mcfg = tiny_reward_config(cfg, special_token_ids(tok))
    arch = ARCHITECTURES["qwen2_5_vl_reward"]
    fn = Functional.create(lambda r: arch.build(mcfg, r))
    params = fn.init(seed=cfg.seed, mesh=mesh)
    image_cfg = TINY_IMAGE_CFG
    image_cfg.save(folder)
    return ModelBundle(LoadedModel(arch, mcfg, fn, params, folder, {}), tok, image_cfg)


def reward_model_from(loaded: LoadedModel, mesh: Mesh, seed: int) -> LoadedModel:
    """A Qwen2.5-VL model without a value head gets a freshly initialised one (the start of stage 1)."""
    if loaded.arch.name == "qwen2_5_vl_reward":
        return loaded
    if loaded.arch.name != "qwen2_5_vl":
        raise ConfigError(f"a reward model needs a Qwen2.5-VL backbone, got architecture {loaded.arch.name!r}")
    arch = ARCHITECTURES["qwen2_5_vl_reward"]
    fn = Functional.create(lambda r: arch.build(loaded.config, r))
    head_shapes = {"v_head": fn.shapes["v_head"]}
    head = jax.jit(lambda: {"v_head": {"summary": {
        "kernel": jax.random.normal(jax.random.key(seed), head_shapes["v_head"]["summary"]["kernel"].shape,
                                    jax.numpy.float32) * loaded.config.text.initializer_range,
        "bias": jax.numpy.zeros((1,), jax.numpy.float32)}}},
        out_shardings={"v_head": fn.shardings(mesh)["v_head"]})()
    return LoadedModel(arch, loaded.config, fn, {**loaded.params, **head}, loaded.folder, loaded.hf_config)


def load_reward_bundle(cfg: ModelConfig, mesh: Mesh, run_dir: Path) -> ModelBundle:
    """The reward model of a run: the tiny one, or a Qwen2.5-VL (+ value head) folder or checkpoint."""
    if cfg.source == "tiny":
        return tiny_reward_model(cfg, mesh, run_dir / "tokenizer")
    require_weights(cfg)
    loaded = load_model(cfg.source, mesh=mesh, dtype=cfg.dtype, param_dtype=cfg.param_dtype, **runtime_overrides(cfg))
    loaded = reward_model_from(loaded, mesh, cfg.seed)
    tok = load_tokenizer(cfg.tokenizer or loaded.folder)
    return ModelBundle(loaded, tok, QwenVLImageConfig.from_folder(loaded.folder))


SHAPE_PREFIX = "shape:"  # model.source "shape:NAME" / "shape:FILE.yaml": a model shape, no weights (skyjax aot)


def require_weights(cfg: ModelConfig) -> None:
    """Training needs weights: a shape-only model.source (for `skyjax aot`) is an error naming the field."""
    if cfg.source.startswith(SHAPE_PREFIX):
        raise ConfigError(f"model.source {cfg.source!r} is a model shape without weights, for `skyjax aot` only; "
                          f"training needs a Hugging Face folder, a skyjax checkpoint or 'tiny'")


def image_config(bundle: ModelBundle, data: DataConfig) -> QwenVLImageConfig:
    changes = {k: getattr(data, k) for k in ("min_pixels", "max_pixels") if getattr(data, k) is not None}
    return dataclasses.replace(bundle.image_cfg, **changes) if changes else bundle.image_cfg


def read_records(paths, on_error: str = "raise", kind: str = "preference", errors: list | None = None
                 ) -> tuple[list[Record], collections.Counter]:
    """Every record of the JSONL files, checked as `kind` (skyjax.data.records); skipped rows counted by reason,
    and every skipped row's `RecordError` (file, line, reason) appended to `errors` when given."""
    records, skipped = [], collections.Counter()
    for path in paths:
        reader = RecordReader(path, kind=kind, on_error=on_error, max_kept_errors=None if errors is not None else 20)
        records.extend(reader)
        skipped.update(reader.skipped)
        if errors is not None:
            errors.extend(reader.errors)
    return records, skipped


class RecordPipeline:
    """Shuffled (by seed), repeated, host-sliced records -> featurized -> collated batches (grain MapDataset).

    Subclasses say how one record becomes an example (`featurize`, raising `BadRowError`) and how examples become
    a batch (`collate(examples, weights)`, with a leading micro-batch axis). Bad rows raise `BadRowError` (naming
    file and line), or with on_error='skip' are counted in `skipped` and replaced in their batch by a zero-weight
    copy of a good example, so the batch shape never changes.
    """

    example_type: type = object

    def __init__(self, records: list[Record], bundle: ModelBundle, data: DataConfig, *, micro_batches: int = 1,
                 epochs: int | None = None, shuffle: bool = True, blank_images: bool = False,
                 batch_size: int | None = None, drop_remainder: bool = True, pad_last: bool = False):
        if not records:
            raise ConfigError("no records to read")
        self.bundle, self.data, self.micro = bundle, data, micro_batches
        self.blank = blank_images
        self.bad_rows: dict[str, str] = {}  # "file:line" -> reason (unique: read-ahead may featurize a row twice)
        self.batch_size = batch_size or data.batch_size
        n_hosts, host = jax.process_count(), jax.process_index()
        if self.batch_size % n_hosts:
            raise ConfigError(f"batch size {self.batch_size} does not divide over {n_hosts} hosts")
        ds = grain.MapDataset.source(records)
        if shuffle:
            ds = ds.shuffle(seed=data.shuffle_seed)
        ds = ds.repeat(epochs)
        ds = ds[host::n_hosts]  # each host reads only its share
        ds = ds.map(self._featurize)
        self.per_host = self.batch_size // n_hosts
        self.pad_last = pad_last  # a short last batch is filled with zero-weight examples (one shape for jit)
        self.dataset = ds.batch(self.per_host, drop_remainder=drop_remainder, batch_fn=self._collate)
        self.num_records = len(records)

    def featurize(self, record: Record):
        raise NotImplementedError

    def collate(self, examples: list, weights: list[float]) -> dict:
        raise NotImplementedError

    def _featurize(self, record: Record):
        try:
            return self.featurize(record)
        except BadRowError as e:
            if self.data.on_error == "raise":
                raise
            return e

    def _collate(self, items):
        good = [x for x in items if isinstance(x, self.example_type)]
        for bad in (x for x in items if not isinstance(x, self.example_type)):
            where, _, reason = str(bad).partition(": ")
            self.bad_rows[where] = reason
        if not good:
            raise BadRowError(f"every row of a batch was bad, e.g. {items[0]}")
        size = max(len(items), self.per_host) if self.pad_last else len(items)
        weights = [1.0] * len(good) + [0.0] * (size - len(good))
        return self.collate(good + [good[0]] * (size - len(good)), weights)

    @property
    def skipped(self) -> collections.Counter:
        """Skipped rows by reason."""
        return collections.Counter(self.bad_rows.values())

    def __len__(self) -> int:
        return len(self.dataset)


class PairPipeline(RecordPipeline):
    """Preference pairs for the reward model (Qwen2.5-VL): see skyjax.train.pairs."""

    example_type = PairExample

    def __init__(self, records: list[Record], bundle: ModelBundle, data: DataConfig, **kw):
        self.image_cfg = image_config(bundle, data)
        self.buckets = PairBuckets(tuple(data.seq_buckets), tuple(data.patch_buckets), tuple(data.image_buckets))
        super().__init__(records, bundle, data, **kw)

    def featurize(self, record: Record) -> PairExample:
        example = featurize_pair(record, self.bundle.tokenizer, self.image_cfg, max_length=self.data.max_length,
                                 blank_images=self.blank,
                                 max_image_patches=self.bundle.model.config.vision.max_image_patches)
        # a row longer than the largest bucket, or with more patches / images than one batch holds, is a bad row
        # (named by its file:line, skippable) here, not a failed batch naming other rows
        longest = max(example.chosen.length, example.rejected.length)
        if not self.data.share_prompt and longest > max(self.buckets.seq):
            raise BadRowError(f"{example.where}: {longest} tokens, more than the largest seq bucket "
                              f"{max(self.buckets.seq)} (data.seq_buckets; set data.max_length to cut rows earlier)")
        if example.patches.shape[0] > max(self.buckets.patches):
            raise BadRowError(f"{example.where}: its images have {example.patches.shape[0]} patches, more than the "
                              f"largest patch bucket {max(self.buckets.patches)} (data.patch_buckets)")
        if example.grids.shape[0] > max(self.buckets.images):
            raise BadRowError(f"{example.where}: {example.grids.shape[0]} images, more than the largest image "
                              f"bucket {max(self.buckets.images)} (data.image_buckets)")
        if self.data.share_prompt:  # one row holds prompt + both responses: it must fit a bucket (a bad row if not)
            n = shared_prompt_length(example)
            if n > max(self.buckets.seq):
                raise BadRowError(f"{example.where}: prompt + chosen + rejected is {n} tokens, more than the largest "
                                  f"seq bucket {max(self.buckets.seq)} (data.share_prompt)")
        return example

    def collate(self, examples, weights) -> dict:
        collate = collate_shared_prompt if self.data.share_prompt else collate_pairs
        return collate(examples, self.bundle.model.config.vision, self.buckets, self.bundle.tokenizer.pad_token_id,
                       micro_batches=self.micro, weights=weights)


def total_pairs_skipped(pipelines) -> int:
    return int(sum(sum(p.skipped.values()) for p in pipelines))


def batch_shardings(batch: dict, mesh: Mesh) -> dict:
    """NamedShardings of a collated batch (arrays or ShapeDtypeStructs): token rows over the batch axes (when they
    divide), everything else (the packed vision input, weights) replicated."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from skyjax.parallel.rules import logical_to_spec

    row_spec = logical_to_spec((None, "batch", "seq"), mesh, shape=batch["input_ids"].shape, strict=False)

    def spec(key, x):
        return NamedSharding(mesh, row_spec if key in ROW_KEYS else P())

    return {k: (jax.tree.map(lambda x: spec(k, x), v) if isinstance(v, dict) else spec(k, v))
            for k, v in batch.items()}


def to_device(batch: dict, mesh: Mesh) -> dict:
    """Place a collated batch on the mesh with `batch_shardings`.

    On one host the batch is the global batch. On several hosts (jax.process_count() > 1) `batch` is this host's
    local batch, and every process calls this in step: the global batch is assembled host-major from all of them
    (skyjax.train.global_batch: rows in host blocks, the hosts' packed images side by side, buckets made to agree).
    """
    if jax.process_count() > 1:
        from skyjax.train.global_batch import place_global_batch

        return place_global_batch(batch, mesh)
    return jax.tree.map(lambda x, s: jax.device_put(np.asarray(x), s), batch, batch_shardings(batch, mesh))


def abstract(batch: dict, mesh: Mesh) -> dict:
    """ShapeDtypeStructs (with `batch_shardings`) of a batch given as arrays or shape structs: for AOT compiles."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), batch,
                        batch_shardings(batch, mesh))
