"""`skyjax aot CONFIG.yaml [dotted.key=value ...] --topology v5e:4x4 [--num-slices N]`, and the built-in
`lm_forward_backward` kind: one Qwen2 causal-LM training step (next-token cross entropy, gradients, AdamW update).

The lm step lives here rather than in aot.py because it needs a model, and `skyjax.parallel` must not import
`skyjax.models` (docs/architecture.md: imports point one way). The trainer registers its own kinds (reward_model,
sft) the same way, in skyjax/train/aot.py.

    kind: lm_forward_backward
    model: {vocab_size: 152064, hidden_size: 3584, ..., dtype: bfloat16, remat: full}   # Qwen2Config fields
    batch_size: 32
    seq_len: 4096
    mesh: {shape: [1, -1, 1]}     # per slice over (data, fsdp, tensor); num_slices: N for multi-slice
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Literal

from skyjax.parallel.aot import register_aot_builder
from skyjax.parallel.mesh import MeshConfig


@dataclasses.dataclass(frozen=True)
class LMStepConfig:
    """A plain causal-LM training step, enough to size a model on a topology before a trainer config exists."""

    kind: Literal["lm_forward_backward"]
    model: "Qwen2Config"  # noqa: F821  (resolved lazily below: skyjax.models is imported only when used)
    batch_size: int
    seq_len: int
    mesh: MeshConfig = MeshConfig()
    learning_rate: float = 1e-5
    weight_decay: float = 0.0


def lm_step_config(config_path, overrides=()) -> LMStepConfig:
    from skyjax.config import load_config
    from skyjax.models.qwen2 import Qwen2Config

    # get_type_hints resolves the 'Qwen2Config' annotation from this module's globals.
    globals()["Qwen2Config"] = Qwen2Config
    return load_config(LMStepConfig, config_path, overrides)


@register_aot_builder("lm_forward_backward")
def build_lm_step(config_path, overrides, mesh):
    """(jitted step, abstract (params, opt_state, batch), description) — no weights are materialised."""
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from skyjax.models.qwen2 import Qwen2ForCausalLM
    from skyjax.nn.functional import Functional
    from skyjax.parallel.rules import DEFAULT_RULES, logical_to_spec

    cfg = lm_step_config(config_path, overrides)
    rules = DEFAULT_RULES  # the trainer's kinds will take theirs from the config's sharding rules
    fn = Functional.create(lambda r: Qwen2ForCausalLM(cfg.model, rngs=r))  # traced only: shapes and axes
    param_sh = fn.shardings(mesh, rules)  # a dimension that does not divide the mesh raises, naming the parameter
    opt = optax.adamw(cfg.learning_rate, weight_decay=cfg.weight_decay)
    opt_shapes = jax.eval_shape(opt.init, fn.shapes)
    replicated = NamedSharding(mesh, P())
    # optimizer moments shard like their parameters; the step counter is replicated (created
    # unsharded it would land on device 0 and the next jitted step would fail with incompatible devices)
    opt_sh = optax.tree_map_params(opt, lambda _, s: s, opt_shapes, param_sh, transform_non_params=lambda _: replicated)
    batch_shape = (cfg.batch_size, cfg.seq_len)
    batch_spec = logical_to_spec(("batch", "seq"), mesh, rules, shape=batch_shape, name="batch/input_ids")
    batch_sh = NamedSharding(mesh, batch_spec)

    def abstract(shapes, shardings):
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)

    params = abstract(fn.shapes, param_sh)
    opt_state = abstract(opt_shapes, opt_sh)
    batch = {"input_ids": jax.ShapeDtypeStruct(batch_shape, jnp.int32, sharding=batch_sh),
             "attention_mask": jax.ShapeDtypeStruct(batch_shape, jnp.bool_, sharding=batch_sh)}

    def train_step(params, opt_state, batch):
        ids, mask = batch["input_ids"], batch["attention_mask"]

        def loss_fn(p):
            logits, _ = fn.bind(p)(ids, attention_mask=mask)  # [B, S, V]
            logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
            nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]  # [B, S-1]
            weight = (mask[:, 1:] & mask[:, :-1]).astype(jnp.float32)
            return jnp.sum(nll * weight) / jnp.maximum(jnp.sum(weight), 1.0)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    step = jax.jit(train_step, out_shardings=(param_sh, opt_sh, replicated), donate_argnums=(0, 1))
    m = cfg.model
    n = fn.num_params()
    size = f"{n / 1e9:.3g}B" if n >= 1e9 else f"{n / 1e6:.3g}M"
    description = (f"lm_forward_backward: Qwen2 {m.num_hidden_layers} layers, {size} params "
                   f"({m.param_dtype} params, {m.dtype} compute, remat {m.remat}), AdamW, "
                   f"batch {cfg.batch_size} x seq {cfg.seq_len}")
    return step, (params, opt_state, batch), description


# --- the command ------------------------------------------------------------------------------------------------------


def _cmd_aot(args) -> int:
    # Only CPU devices plus libtpu's compile-only client are needed: never initialise a real accelerator backend
    # (with libtpu installed, JAX would otherwise try the TPU backend and take /tmp/libtpu_lockfile).
    if not os.environ.get("JAX_PLATFORMS"):
        import jax

        try:
            jax.config.update("jax_platforms", "cpu")
        except RuntimeError:  # a backend is already up (an interactive session): leave it
            pass
    from skyjax.config import ConfigError
    from skyjax.parallel.aot import DoesNotFitError, compile_config
    from skyjax.parallel.rules import ShardingError
    from skyjax.parallel.topology import TopologyError

    hbm = int(args.hbm_gib * 1024**3) if args.hbm_gib is not None else None
    try:
        report = compile_config(args.config, args.overrides, topology=args.topology, num_slices=args.num_slices,
                                hbm_bytes=hbm)
    except DoesNotFitError as e:
        print(e.report.table())
        _write_json(args.json, e.report)
        print(f"skyjax aot: error: {e}", file=sys.stderr)
        return 1
    except (TopologyError, ShardingError, ConfigError, ValueError, FileNotFoundError) as e:
        # a mesh that cannot be laid out, a dimension that does not divide it, a bad config or model source
        print(f"skyjax aot: error: {e}", file=sys.stderr)
        return 2
    print(report.table())
    _write_json(args.json, report)
    return 0


def _write_json(path: Path | None, report) -> None:
    if path is not None:
        import json

        Path(path).write_text(json.dumps(report.to_dict(), indent=2) + "\n")


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "aot", help="compile a run's step for a TPU topology on any machine; memory per chip and FLOPs",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compile the run's step ahead of time for a TPU topology (libtpu's compile-only client: no TPU "
                    "needed), print memory per device against the chip's HBM, FLOPs per step and compile time, and "
                    "exit 1 if it does not fit (2 if the mesh or config is invalid).\n\n"
                    "topologies: v5e:AxB, v6e:AxB, v4:AxBxC, v5p:AxBxC, tpu7x:AxBxC (chips; v5litepod-16 is v5e:4x4)"
                    "\n\nkinds: reward_model and sft (the trainer's real step; model.source may be a shape without "
                    "weights: shape:qwen2_5_vl_7b, shape:r1v_38b, shape:configs/models/NAME.yaml), lm_forward_backward"
                    "\n\nexample:\n  skyjax aot configs/reward_model/stage1_7b.yaml model.source=shape:qwen2_5_vl_7b "
                    "data.batch_size=4 mesh.shape=[1,8,1] --topology v5p:2x2x2\n"
                    "  skyjax aot launch/lm_step_7b.yaml batch_size=64 mesh.shape=[1,-1,1] --topology v5e:4x4 "
                    "--num-slices 2\n\nlaunch/fit_table.py searches the largest batch that fits; see docs/fit.md")
    p.add_argument("config", type=Path, help="run config YAML (its `kind` picks the step; `mesh` the mesh)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides of the config")
    p.add_argument("--topology", required=True, help="TPU topology per slice, e.g. v5e:4x4, v5p:2x2x2")
    p.add_argument("--num-slices", type=int, default=None, help="slices joined over DCN (default: the config's "
                                                                  "mesh.num_slices, else 1)")
    p.add_argument("--hbm-gib", type=float, default=None, help="HBM per device to check against (default: the chip's)")
    p.add_argument("--json", type=Path, default=None, help="also write the report as JSON here (also when it "
                                                             "does not fit)")
    p.set_defaults(func=_cmd_aot)
    return p


def main(argv: list[str] | None = None) -> int:
    """`python -m skyjax.parallel.cli CONFIG --topology ...` (the same as `skyjax aot`)."""
    parser = argparse.ArgumentParser(prog="skyjax")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(["aot", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
