"""The reward model's run: its model bundle (the tiny Qwen2.5-VL + value head, or a checkpoint with a value head
added) and its data pipeline of preference pairs (`PairPipeline`, see skyjax.train.pairs). What every kind shares
lives in skyjax.train.bundle, skyjax.train.pipeline and skyjax.train.batching; SFT's pieces in skyjax.train.sft."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
from jax.sharding import Mesh

from skyjax.config import ConfigError
from skyjax.convert.checkpoint import LoadedModel, load_model
from skyjax.convert.registry import ARCHITECTURES
from skyjax.data.qwen_vl_image import QwenVLImageConfig
from skyjax.data.records import Record
from skyjax.data.tokenizer import build_tiny_tokenizer, load_tokenizer, special_token_ids
from skyjax.models.qwen2_5_vl import Qwen2_5_VLConfig
from skyjax.nn.functional import Functional
from skyjax.train.batching import BadRowError
from skyjax.train.bundle import ModelBundle, image_config, require_weights, runtime_overrides
from skyjax.train.config import DataConfig, ModelConfig
from skyjax.train.pairs import (PairBuckets, PairExample, collate_pairs, collate_shared_prompt, featurize_pair,
                                shared_prompt_length)
from skyjax.train.pipeline import RecordPipeline


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


