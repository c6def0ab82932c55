"""`skyjax train CONFIG.yaml [dotted.key=value ...] --run-dir DIR` (the run itself: skyjax.train.run)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from skyjax.train.run import format_summary, train  # noqa: F401  (skyjax.train.cli.train: the public entry)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train", help="train a model from a run config (reward model, SFT; MPO/GRPO plug into the same loop)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train from a YAML run config with dotted overrides. The run directory receives checkpoints "
                    "(resumed automatically), metrics (TensorBoard + metrics.jsonl), the final skyjax checkpoint, "
                    "a Hugging Face export and summary.json. SIGTERM or Ctrl-C saves a checkpoint and exits with "
                    "status 143 without final outputs (rerun to resume); a user error exits with status 2."
                    "\n\nexample:\n"
                    "  skyjax train configs/demo/reward_model.yaml --run-dir runs/reward_demo\n"
                    "  skyjax train configs/sft/r1v_tiny.yaml --run-dir runs/sft_tiny\n"
                    "  skyjax train configs/demo/mpo.yaml --run-dir runs/mpo_demo\n"
                    "  skyjax train configs/demo/grpo.yaml --run-dir runs/grpo_demo\n"
                    "  skyjax train configs/reward_model/stage1_7b.yaml optimizer.lr=5e-6 trainer.steps=1000")
    p.add_argument("config", type=Path, help="run config (YAML)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. optimizer.lr=1e-5")
    p.add_argument("--run-dir", type=Path, default=None, help="output folder (default: runs/<name>)")
    p.add_argument("--no-resume", action="store_true",
                   help="start afresh: an earlier run's checkpoints and outputs in the run dir are moved into "
                        "previous-<timestamp>/ inside it (a resume, the default, refuses a changed config)")
    p.set_defaults(func=run)


def run(args) -> int:
    from skyjax.config import load_config
    from skyjax.parallel.mesh import expose_cpu_devices
    from skyjax.train.config import RunConfig

    cfg = load_config(RunConfig, args.config, args.overrides)
    run_dir = args.run_dir or Path("runs") / cfg.name
    if args.run_dir is None:
        print(f"--run-dir not given: writing to {run_dir}", file=sys.stderr)
    expose_cpu_devices(cfg.mesh)
    if cfg.demo is not None:  # a built-in demo: MPO (warm start, reward model, pairs, MPO, control) or GRPO
        if cfg.kind == "grpo":
            from skyjax.train.grpo_demo import format_demo, run_demo
        else:
            from skyjax.train.mpo_demo import format_demo, run_demo

        print(format_demo(run_demo(cfg, run_dir, resume=not args.no_resume)))
        return 0
    summary = train(cfg, run_dir, resume=not args.no_resume)
    print(format_summary(summary))
    return 0


