"""`skyjax aot` for run configs: compile the real train step of a `kind: reward_model` or `kind: sft` config for a TPU
topology, without a TPU and without materialising a weight.

    skyjax aot configs/reward_model/stage1_7b.yaml model.source=shape:qwen2_5_vl_7b data.batch_size=8 \\
        --topology v5e:4x4

The state (trainable and frozen parameters, AdamW moments, step counter; the reference's trainable subtree and the
objective's state when the objective keeps them) and the batch of the config's largest buckets
are ShapeDtypeStructs with the trainer's shardings (`skyjax.train.step.abstract_state`,
`skyjax.train.tasks.abstract_batch`), and the step is `build_train_step` under `jit_train_step`: the program the
Trainer runs, with the config's optimizer, freeze masks, objective options, grad_accum and mesh.

On a topology of several hosts (`skyjax.parallel.topology.device_hosts`: v5e:4x4 is 4) the batch is the multi-host
global batch (`skyjax.train.global_batch`): each host's share of data.batch_size collated at the largest buckets
(data.patch_buckets / image_buckets / tile_buckets are per host), the hosts' blocks side by side, `host_blocks`. A
mesh whose batch axes do not give every host's devices exactly its own block of rows is refused as the trainer's
`to_device` refuses it (HostBatchError, naming the mesh axes).

`model.source` takes what training takes, and two shape-only forms:
    tiny                 the kind's built-in tiny model (its config only)
    FOLDER               a Hugging Face folder or a skyjax checkpoint: only config.json / skyjax.json is read
    shape:NAME           a named shape (SHAPES: qwen2_5_vl_7b, r1v_38b)
    shape:FILE.yaml      a model-shape YAML, e.g. configs/models/r1v_38b.yaml (the model config's fields)
The run's model.dtype / param_dtype / remat / attention_impl apply to every form. A reward model built from a plain
Qwen2.5-VL gets its value head, as in training.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

from skyjax.parallel.aot import register_aot_builder

# model.source "shape:NAME": the model configs' named constructors (runtime fields are passed through)
SHAPES: dict[str, Callable[..., Any]] = {}


def _shapes() -> dict[str, Callable[..., Any]]:
    if not SHAPES:
        from skyjax.models.qwen2_5_vl import Qwen2_5_VLConfig
        from skyjax.models.r1v import R1VConfig

        SHAPES.update(qwen2_5_vl_7b=Qwen2_5_VLConfig.qwen2_5_vl_7b, r1v_38b=R1VConfig.r1v_38b)
    return SHAPES


def _runtime(model_cfg) -> dict:
    """The run's runtime fields for a model config (dtype alone also sets param_dtype, as loading does)."""
    from skyjax.train.bundle import runtime_overrides

    out = runtime_overrides(model_cfg)
    if model_cfg.dtype is not None:
        out["dtype"] = model_cfg.dtype
    if model_cfg.param_dtype is not None or model_cfg.dtype is not None:
        out["param_dtype"] = model_cfg.param_dtype or model_cfg.dtype
    return out


def _with_runtime(data: dict, runtime: dict) -> dict:
    """Set the runtime fields on a model-config dict and on every nested sub-config that has them."""
    out = {k: _with_runtime(v, runtime) if isinstance(v, dict) else v for k, v in data.items()}
    out.update({k: v for k, v in runtime.items() if k in data})
    return out


def shape_config(spec: str, kind: str, runtime: dict, where: str = "model.source"):
    """The model config of `shape:NAME` or `shape:FILE.yaml` (spec without the prefix)."""
    from skyjax.config import ConfigError, from_dict, read_yaml
    from skyjax.models.qwen2_5_vl import Qwen2_5_VLConfig
    from skyjax.models.r1v import R1VConfig

    if spec.endswith((".yaml", ".yml")):
        raw = _with_runtime(read_yaml(spec), runtime)
        # a reward model is a Qwen2.5-VL; SFT takes an R1V (InternViT + Qwen2) or a Qwen2.5-VL shape
        candidates = [Qwen2_5_VLConfig] if kind == "reward_model" else [R1VConfig, Qwen2_5_VLConfig]
        errors = []
        for cls in candidates:
            try:
                return from_dict(cls, raw)
            except ConfigError as e:
                errors.append(f"as {cls.__name__}: {e}")
        raise ConfigError(f"{where} shape file {spec} is not a model shape for kind {kind} ({'; '.join(errors)})")
    shapes = _shapes()
    if spec not in shapes:
        raise ConfigError(f"{where} 'shape:{spec}' is not a known shape (known: {', '.join(sorted(shapes))}; or "
                          f"shape:FILE.yaml with a model-shape YAML such as configs/models/r1v_38b.yaml)")
    return shapes[spec](**runtime)


def abstract_bundle(cfg) -> "ModelBundle":  # noqa: F821
    """The run's model as a ModelBundle with no parameters (params None, no tokenizer): architecture, config,
    Functional (shapes and logical axes) and image settings — what the abstract state and batch need."""
    from skyjax.config import ConfigError
    from skyjax.convert.checkpoint import LoadedModel, read_model_config
    from skyjax.convert.registry import ARCHITECTURES
    from skyjax.data.qwen_vl_image import QwenVLImageConfig
    from skyjax.data.tokenizer import build_tiny_tokenizer, special_token_ids
    from skyjax.models.r1v import R1VConfig
    from skyjax.nn.functional import Functional
    from skyjax.train.bundle import SHAPE_PREFIX, ModelBundle
    from skyjax.train.setup import TINY_IMAGE_CFG, tiny_reward_config
    from skyjax.train.sft import SFT_FORMATS, tiny_r1v_config

    m, kind = cfg.model, cfg.kind
    folder, hf_config, image_cfg = Path("."), {}, None
    if m.source == "tiny":
        if kind == "reward_model":
            model_cfg = tiny_reward_config(m, special_token_ids(build_tiny_tokenizer("qwen2_5_vl")))
            image_cfg = TINY_IMAGE_CFG
        else:
            model_cfg = tiny_r1v_config(m, special_token_ids(build_tiny_tokenizer("internvl")))
        arch_name = "qwen2_5_vl" if kind == "reward_model" else "internvl"
    elif m.source.startswith(SHAPE_PREFIX):
        model_cfg = shape_config(m.source[len(SHAPE_PREFIX):], kind, _runtime(m))
        arch_name = "internvl" if isinstance(model_cfg, R1VConfig) else "qwen2_5_vl"
    else:
        folder = Path(m.source)
        if not folder.is_dir():
            raise ConfigError(
                f"model.source {m.source!r} is not a folder here; to compile without a checkpoint, give the model's "
                f"shape: model.source=shape:{'qwen2_5_vl_7b' if kind == 'reward_model' else 'r1v_38b'} "
                f"(known: {', '.join(sorted(_shapes()))}) or model.source=shape:configs/models/NAME.yaml")
        arch, model_cfg, hf_config = read_model_config(folder, m.dtype, m.param_dtype,
                                                       **{k: v for k, v in _runtime(m).items()
                                                          if k not in ("dtype", "param_dtype")})
        arch_name = arch.name
        if arch_name in ("qwen2_5_vl", "qwen2_5_vl_reward"):
            image_cfg = QwenVLImageConfig.from_folder(folder)
    if kind == "reward_model":
        if arch_name not in ("qwen2_5_vl", "qwen2_5_vl_reward"):
            raise ConfigError(f"model.source {m.source!r}: a reward model needs a Qwen2.5-VL backbone, got "
                              f"architecture {arch_name!r}")
        arch_name = "qwen2_5_vl_reward"  # a plain backbone gets its value head (skyjax.train.setup.reward_model_from)
    elif arch_name not in SFT_FORMATS:
        raise ConfigError(f"model.source {m.source!r}: SFT supports the architectures {', '.join(SFT_FORMATS)}, "
                          f"not {arch_name!r}")
    if image_cfg is None:
        image_cfg = model_cfg.image_config() if isinstance(model_cfg, R1VConfig) else QwenVLImageConfig()
    arch = ARCHITECTURES[arch_name]
    fn = Functional.create(lambda r: arch.build(model_cfg, r))  # traced only: shapes and logical axes
    return ModelBundle(LoadedModel(arch, model_cfg, fn, None, folder, hf_config), None, image_cfg)


def _count(shapes) -> int:
    import jax

    return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


def _size(n: float) -> str:
    return f"{n / 1e9:.3g}B" if n >= 1e9 else f"{n / 1e6:.3g}M"


def describe(cfg, bundle, trainable: int, total: int, batch: dict, mesh) -> str:
    """One line on what was compiled, and a note when the batch rows cannot be split over the batch axes."""
    from skyjax.parallel.rules import DEFAULT_RULES
    from skyjax.train.tasks import TASKS

    mc = bundle.model.config
    text = mc.text
    a, rows, seq = batch["input_ids"].shape
    unit = TASKS[cfg.kind].row_unit
    per_micro = cfg.data.batch_size // cfg.optimizer.grad_accum
    if "pixel_values" in batch and batch["pixel_values"].ndim == 3:
        vision = f"{batch['pixel_values'].shape[1]} patches"
    elif "vision" in batch and "pixel_values" in batch["vision"]:
        pv = batch["vision"]["pixel_values"]
        vision = f"{pv.shape[1]} {'tiles' if pv.ndim == 5 else 'patches'}"
    else:
        vision = "no images"
    line = (f"{cfg.kind} '{cfg.name}': {bundle.model.arch.name} {_size(total)} params ({_size(trainable)} trained; "
            f"freeze [{', '.join(cfg.trainer.freeze)}]), {text.param_dtype} params, {text.dtype} compute, remat "
            f"{text.remat}; batch {cfg.data.batch_size} {unit} = {a} x {per_micro} ({rows} rows of {seq} tokens, "
            f"{vision} per micro-batch)")
    batch_axes = [ax for ax in DEFAULT_RULES["batch"] if ax in mesh.shape]
    ways = math.prod(mesh.shape[ax] for ax in batch_axes)
    if ways > 1 and rows % ways:
        line += (f"\nnote: {rows} rows per micro-batch do not divide the batch axes {tuple(batch_axes)} ({ways} "
                 f"ways): every device runs all of them (the trainer replicates such a batch too)")
    return line


def host_batch_text(cfg, batch: dict, hosts: int) -> str:
    """What one host collates per micro-batch (rows and its own vision buckets), for the report's hosts line."""
    from skyjax.train.tasks import TASKS

    a, rows, _ = batch["input_ids"].shape
    unit = TASKS[cfg.kind].row_unit
    per_micro = cfg.data.batch_size // hosts // a
    vision = batch.get("vision", batch)
    parts = [f"{per_micro} {unit}" + (f" ({rows // hosts} rows)" if rows // hosts != per_micro else "")]
    if "pixel_values" in vision:
        pv = vision["pixel_values"]
        parts.append(f"{pv.shape[1] // hosts} {'tiles' if pv.ndim == 5 else 'patches'}")
    if "image_grid_thw" in vision:
        parts.append(f"{vision['image_grid_thw'].shape[1] // hosts} image slots")
    text = ", ".join(parts) + (" per micro-batch" if a > 1 else "")
    if hosts > 1:
        text += f"; the step sees the {hosts} hosts' blocks side by side (multi-host layout, per-host buckets)"
    return text


def build_run_step(config_path, overrides, mesh):
    """(jitted train step, (abstract state, abstract batch), description, {hosts, host_batch}) of a reward_model /
    sft / mpo run config. The batch is the one the topology's hosts feed the step (one host: the single-host batch)."""
    from skyjax.config import ConfigError, load_config
    from skyjax.parallel.topology import device_hosts
    from skyjax.train.config import RunConfig
    from skyjax.train.global_batch import HostBatchError, check_host_rows
    from skyjax.train.optimizer import build_optimizer, flatten, frozen_predicate, split_params
    from skyjax.train.step import (abstract_state, build_train_step, jit_train_step, objective_extras,
                                   state_shardings)
    from skyjax.train.tasks import TASKS, abstract_batch, prepare_bundle

    cfg = load_config(RunConfig, config_path, overrides)
    bundle = prepare_bundle(TASKS[cfg.kind], abstract_bundle(cfg), cfg.data)
    fn, arch = bundle.model.fn, bundle.model.arch
    try:
        is_frozen = frozen_predicate(arch.name, cfg.trainer.freeze)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    trainable, _ = split_params(fn.shapes, is_frozen)
    if not flatten(trainable):
        raise ConfigError(f"trainer.freeze {list(cfg.trainer.freeze)} freezes every parameter: nothing to train")
    # the schedule's length changes constants of the program, never its shapes or memory
    optimizer, schedule = build_optimizer(cfg.optimizer, cfg.trainer.steps or 1000)
    objective = TASKS[cfg.kind].objective
    step = build_train_step(fn, objective, optimizer, schedule, cfg.objective)
    # a reference (when the objective needs one) is resident in the state: its memory is part of the compile
    extras = objective_extras(objective, cfg.objective, cfg.reference)  # reference.precompute: none resident
    jitted = jit_train_step(step, state_shardings(fn, optimizer, is_frozen, mesh, *extras), mesh)
    state = abstract_state(fn, optimizer, is_frozen, mesh, *extras)  # dims that do not divide raise ShardingError
    host_of = device_hosts(mesh.devices.flat)
    hosts = len(set(host_of.values()))
    try:
        batch = abstract_batch(cfg, bundle, mesh, hosts=hosts)
    except ValueError as e:  # data.batch_size does not divide over the hosts (or their micro-batches)
        raise ConfigError(str(e)) from None
    if hosts > 1:  # as skyjax.train.global_batch.place_global_batch checks it before placing the rows
        try:
            check_host_rows(batch["input_ids"].sharding, batch["input_ids"].shape, hosts,
                            host_of=lambda d: host_of[d.id])
        except HostBatchError as e:
            raise HostBatchError(f"the {hosts} hosts of this topology each feed their own rows, and the trainer "
                                 f"(to_device) would refuse this mesh: {e}") from None
    description = describe(cfg, bundle, _count(trainable), fn.num_params(), batch, mesh)
    return jitted, (state, batch), description, {"hosts": hosts, "host_batch": host_batch_text(cfg, batch, hosts)}


register_aot_builder("reward_model", build_run_step)
register_aot_builder("sft", build_run_step)
register_aot_builder("mpo", build_run_step)
