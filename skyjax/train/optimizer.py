"""AdamW with warmup and decay, gradient clipping, and parameter masks (frozen / no weight decay).

Frozen parameters are not differentiated and carry no optimizer state at all: the trainer splits the parameter dict
into a trainable and a frozen part by path (regexes over 'visual/blocks/attn/qkv/kernel'-style paths), so a frozen
ViT costs neither gradient memory nor Adam moments, and stays bit-identical.
"""

from __future__ import annotations

import re
from typing import Iterable

import jax
import optax

from skyjax.config import ConfigError
from skyjax.nn.functional import flatten_params as flatten, unflatten_params as unflatten
from skyjax.train.config import OptimizerConfig

# Named parts of each architecture, as regexes over parameter paths.
FREEZE_PRESETS: dict[str, dict[str, str]] = {
    "qwen2_5_vl": {
        "vision": r"visual/(patch_embed|blocks)/.*",  # the ViT; the merger (projector) is trained in the paper
        "projector": r"visual/merger/.*",
        "llm": r"model/.*",
        "lm_head": r"lm_head/.*",
        "head": r"v_head/.*",
    },
    "qwen2": {"llm": r"model/.*", "lm_head": r"lm_head/.*"},
    # Skywork R1V / InternVL (both checkpoint layouts load into one parameter tree): InternViT, the MLP projector
    # (`mlp1` in the remote layout) and the Qwen2 LLM with its head. The paper's transfer stages train the
    # projector alone: freeze [vision, llm].
    "r1v": {
        "vision": r"vision_tower/.*",
        "projector": r"projector/.*",
        "llm": r"(model|lm_head)/.*",
        "lm_head": r"lm_head/.*",
    },
}
FREEZE_PRESETS["qwen2_5_vl_reward"] = FREEZE_PRESETS["qwen2_5_vl"]
FREEZE_PRESETS["internvl"] = FREEZE_PRESETS["internvl_chat"] = FREEZE_PRESETS["r1v"]  # the registry's arch names


def frozen_predicate(arch: str, freeze: Iterable[str]):
    """A function path -> bool (frozen). Entries are preset names of `arch` or regexes (full match)."""
    presets = FREEZE_PRESETS.get(arch, {})
    patterns = []
    for item in freeze:
        if item in presets:
            patterns.append(re.compile(presets[item]))
        elif re.fullmatch(r"[A-Za-z_]+", item):
            raise ConfigError(f"trainer.freeze: {item!r} is not a preset of {arch} ({', '.join(sorted(presets))}) "
                              f"and not a path regex")
        else:
            patterns.append(re.compile(item))
    return lambda path: any(p.fullmatch(path) for p in patterns)


def split_params(params: dict, is_frozen) -> tuple[dict, dict]:
    """(trainable, frozen) nested dicts: the same tree cut in two by the `is_frozen(path)` predicate."""
    flat = flatten(params)
    trainable = unflatten({k: v for k, v in flat.items() if not is_frozen(k)})
    frozen = unflatten({k: v for k, v in flat.items() if is_frozen(k)})
    return trainable, frozen


def merge_params(trainable: dict, frozen: dict) -> dict:
    return unflatten({**flatten(trainable), **flatten(frozen)})


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    warmup = cfg.warmup_steps or int(round(cfg.warmup_ratio * total_steps))
    decay_steps = max(total_steps - warmup, 1)
    end = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        main = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio)
    else:
        main = optax.linear_schedule(cfg.lr, end, decay_steps)
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), main], [warmup])


def build_optimizer(cfg: OptimizerConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW over a nested parameter dict; no weight decay on 1-D parameters (norms, biases).

    Gradient accumulation is done inside the train step (a scan over micro-batches), not here.
    """
    schedule = learning_rate_schedule(cfg, total_steps)

    def decay_mask(params):
        return jax.tree.map(lambda v: v.ndim > 1, params)

    chain = []
    if cfg.clip_norm is not None:
        chain.append(optax.clip_by_global_norm(cfg.clip_norm))
    chain.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             mask=decay_mask))
    return optax.chain(*chain), schedule
