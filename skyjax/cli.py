"""The `skyjax` command. Each subcommand has `--help` with an example."""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import sys
import time
from pathlib import Path


# Modules that add their own subcommands (kept light: heavy imports happen inside the command functions).
COMMAND_MODULES: list[str] = ["skyjax.train.cli", "skyjax.convert.internvl", "skyjax.parallel.cli", "skyjax.sample.cli",
                               "skyjax.eval.cli", "skyjax.bench", "skyjax.rl.cli", "skyjax.rl.pairs",
                               "skyjax.train.iterate"]


def _mesh_arg(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(x) for x in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--mesh {text!r}: expected data,fsdp,tensor sizes such as 1,-1,1")
    if len(shape) != 3:
        raise argparse.ArgumentTypeError(f"--mesh {text!r}: expected 3 sizes (data,fsdp,tensor)")
    return shape


def add_mesh_arg(p: argparse.ArgumentParser):
    p.add_argument("--mesh", type=_mesh_arg, default=(1, -1, 1),
                   help="mesh shape data,fsdp,tensor; one entry may be -1 (all remaining devices). Default 1,-1,1")


def _cmd_convert(args) -> int:
    from skyjax.convert.checkpoint import load_hf, save_checkpoint
    from skyjax.parallel import make_mesh

    t0 = time.time()
    mesh = make_mesh(args.mesh)
    print(f"reading {args.src} onto mesh {dict(mesh.shape)}", flush=True)
    model = load_hf(args.src, mesh=mesh, dtype=args.dtype, param_dtype=args.param_dtype)
    print(f"architecture {model.arch.name}: {model.fn.num_params() / 1e6:.2f}M parameters, "
          f"stored as {model.config.param_dtype}", flush=True)
    dst = save_checkpoint(args.dst, model)
    print(f"wrote skyjax checkpoint {dst} in {time.time() - t0:.1f}s")
    return 0


def _cmd_export(args) -> int:
    from skyjax.convert.checkpoint import export_hf, load_model
    from skyjax.parallel import make_mesh

    t0 = time.time()
    model = load_model(args.src, mesh=make_mesh(args.mesh))
    dst = export_hf(model, args.dst, dtype=args.dtype, max_shard_bytes=int(args.max_shard_gb * 1024**3),
                    layout=args.layout)
    extra = [name for _, name in model.arch.separate_files]
    missing = [name for name in extra if not (Path(dst) / name).is_file()]
    if missing:  # e.g. a reward model's value head: never drop it silently
        from skyjax.convert.safetensors_io import CheckpointError

        raise CheckpointError(f"{dst}: the export lacks {', '.join(missing)} of architecture {model.arch.name}")
    with_files = f" with {', '.join(extra)}" if extra else ""
    print(f"wrote Hugging Face folder {dst} ({model.arch.name}{with_files}) in {time.time() - t0:.1f}s")
    return 0


def _cmd_demo(args) -> int:
    from skyjax.demo import run_demo

    run_demo(args.run_dir, mesh_shape=args.mesh)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="skyjax", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "convert", help="Hugging Face folder -> skyjax checkpoint",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Convert a Hugging Face model folder (safetensors, sharded or not, fp32 or bf16) into a skyjax "
                    "checkpoint, streaming tensor by tensor straight onto the mesh.\n\n"
                    "example:\n  skyjax convert ~/hf/Qwen2.5-7B-Instruct ckpt/qwen2_5_7b --mesh 1,-1,1")
    p.add_argument("src", type=Path, help="Hugging Face model folder (config.json + *.safetensors)")
    p.add_argument("dst", type=Path, help="skyjax checkpoint folder to write")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="compute dtype recorded in the checkpoint (default: the source's dtype)")
    p.add_argument("--param-dtype", choices=["float32", "bfloat16"], default=None,
                   help="storage dtype of the parameters (default: same as --dtype)")
    add_mesh_arg(p)
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser(
        "export", help="skyjax checkpoint -> Hugging Face folder",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write a Hugging Face folder that transformers loads with from_pretrained, carrying the "
                    "tokenizer and processor files along.\n\nexample:\n  skyjax export ckpt/qwen2_5_7b hf_out/")
    p.add_argument("src", type=Path, help="skyjax checkpoint folder (or a Hugging Face folder, to re-shard it)")
    p.add_argument("dst", type=Path, help="Hugging Face folder to write")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="dtype of the written tensors (default: the checkpoint's parameter dtype)")
    p.add_argument("--max-shard-gb", type=float, default=2.0, help="largest safetensors shard file, in GiB")
    p.add_argument("--layout", default=None,
                   help="Hugging Face layout, for architectures with several (InternVL / R1V: 'native' = "
                        "transformers' InternVLForConditionalGeneration, the default; 'remote' = InternVL-chat / "
                        "Skywork-R1V remote code)")
    add_mesh_arg(p)
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser(
        "demo", help="built-in end-to-end run on a tiny local model (no downloads)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Build a tiny Qwen2 model and tokenizer locally, write them as a Hugging Face folder, convert "
                    "it onto the device mesh, check the round trip, and decode a few tokens with the KV cache.\n\n"
                    "example:\n  skyjax demo --run-dir runs/demo")
    p.add_argument("--run-dir", type=Path, default=Path("runs/demo"), help="where outputs go (default runs/demo)")
    add_mesh_arg(p)
    p.set_defaults(func=_cmd_demo)

    # Subcommands that live beside their subsystem: each module has `add_parser(subparsers)`.
    import importlib

    for module in COMMAND_MODULES:
        importlib.import_module(module).add_parser(sub)
    return parser


def skip_absent_tpu() -> bool:
    """On a host with no TPU chips, keep jax from initialising libtpu (the `tpu` and `test` extras install it): it
    would only print errors about missing TPU metadata before falling back to the CPU. Compiling for a TPU topology
    (`skyjax aot`) does not need the TPU backend. Nothing changes when JAX_PLATFORMS is set, on TPU VMs (/dev/accel*,
    /dev/vfio) or on GPU hosts. Returns whether it set JAX_PLATFORMS=cpu."""
    if "JAX_PLATFORMS" in os.environ or importlib.util.find_spec("libtpu") is None:
        return False
    if any(glob.glob(p) for p in ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*")):
        return False
    os.environ["JAX_PLATFORMS"] = "cpu"
    return True


# Commands that run the same way on every host of a pod, each process joining the others (jax.distributed) from the
# environment first (skyjax.parallel.distributed.initialize_from_environment; a no-op on one host). `aot`, `bench`
# and `demo` run on one machine.
MULTI_HOST_COMMANDS = frozenset({"train", "score", "eval", "generate", "convert", "export"})
# Commands whose --model must be a reward model (a value head): checked from the folder's config files first.
REWARD_MODEL_COMMANDS = frozenset({"score", "eval"})


class _DropAdvice:
    """Drops transformers' import-time advice that PyTorch is absent (skyjax never needs it): one line on every
    command otherwise. Every other transformers message passes."""

    def filter(self, record) -> bool:
        return not str(record.msg).startswith("PyTorch was not found")


def quiet_transformers() -> None:
    """Install `_DropAdvice` on the `transformers` logger (before transformers is imported, so it sees the line)."""
    import logging

    logger = logging.getLogger("transformers")
    if not any(isinstance(f, _DropAdvice) for f in logger.filters):
        logger.addFilter(_DropAdvice())


def debug_enabled() -> bool:
    """SKYJAX_DEBUG=1: errors show their traceback too."""
    return os.environ.get("SKYJAX_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def one_line(error: BaseException) -> str:
    """An error's message on one line (a multi-line message's lines joined)."""
    text = " ".join(part.strip() for part in str(error).splitlines() if part.strip())
    return text or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    skip_absent_tpu()
    quiet_transformers()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # dotted overrides may come after options (`train cfg.yaml --run-dir d a.b=1`): give them to the command
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from skyjax.errors import (INTERRUPTED_EXIT_STATUS, PREEMPTED_EXIT_STATUS, USER_ERROR_EXIT_STATUS, Preempted,
                               UserError)

    expected: tuple[type[BaseException], ...] = (UserError, FileNotFoundError)
    try:
        from skyjax.eval.scorer import RowError

        expected += (RowError,)
    except ImportError:  # pragma: no cover
        pass
    from skyjax.parallel.distributed import DistributedConfigError, initialize_from_environment

    try:
        if args.command in MULTI_HOST_COMMANDS:  # before any JAX backend work: join the pod's other processes
            initialize_from_environment()
        policy_eval = getattr(args, "benchmark", None) in ("mathvista", "mmmu")  # these evaluate a policy, no head
        if args.command in REWARD_MODEL_COMMANDS and getattr(args, "model", None) is not None and not policy_eval:
            from skyjax.convert.checkpoint import require_reward_model

            require_reward_model(args.model)  # before any weight is read: one line if it is not a reward model
        return args.func(args) or 0
    except Preempted as e:
        print(f"skyjax {args.command}: {e}", file=sys.stderr)
        return PREEMPTED_EXIT_STATUS
    except KeyboardInterrupt:
        print(f"skyjax {args.command}: interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT_STATUS
    except (*expected, DistributedConfigError) as e:
        if debug_enabled():
            import traceback

            traceback.print_exc()
        name = " ".join(filter(None, (args.command, getattr(args, "benchmark", None))))  # "eval mathvista"
        print(f"skyjax {name}: error: {one_line(e)}", file=sys.stderr)
        return USER_ERROR_EXIT_STATUS


if __name__ == "__main__":
    sys.exit(main())
