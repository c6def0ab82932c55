"""One training run as a function: `train(cfg, run_dir)` trains, evaluates, exports and writes summary.json
(what `skyjax train` runs; the MPO demo and `skyjax iterate` run their stages through it)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def format_summary(summary: dict) -> str:
    """A few lines for the terminal; summary.json holds everything."""
    lines = [f"{summary['name']} ({summary['kind']}): {summary['steps']} steps in {summary['seconds']:.0f} s"]
    notes = {"heldout_accuracy": "held-out pairs, with the images",
             "blind_accuracy": "the same pairs with the images blanked (chance is 0.5)"}
    if summary["kind"] == "grpo":
        notes = {"heldout_accuracy": "held-out greedy accuracy (the answer verified)"}
    for key, value in summary.items():
        if isinstance(value, float) and key != "seconds":
            lines.append(f"  {key:<20} {value:.3f}" + (f"   {notes[key]}" if key in notes else ""))
    # the user's own held-out files (data.eval), one line each: reward model {stem: accuracy}, SFT {stem: {...}}
    evals = summary.get("eval_accuracy") or summary.get("eval") or {}
    for stem, result in evals.items():
        if stem == "heldout" and "heldout_accuracy" in summary:
            continue  # the synthetic held-out split, printed above
        if isinstance(result, dict):
            text = ", ".join(f"{k} {v:.3f}" for k, v in result.items() if k in ("loss", "accuracy"))
        else:
            text = f"accuracy {result:.3f}"
        lines.append(f"  eval {stem:<15} {text}")
    train_last = {k: v for k, v in summary.get("train", {}).items() if k in ("loss", "accuracy", "token_accuracy")}
    if train_last:
        lines.append("  last train window    " + ", ".join(f"{k} {v:.3f}" for k, v in train_last.items()))
    if summary.get("skipped_rows"):
        lines.append(f"  skipped rows         {summary['skipped_rows']}   (each one: {summary['paths']['skipped']})")
    paths = summary["paths"]
    lines.append(f"wrote {paths['summary']} (every number and path)")
    for key in ("checkpoint", "hf_export", "metrics", "tensorboard"):
        if key in paths:
            lines.append(f"      {paths[key]}")
    return "\n".join(lines)


def _rows_per_step(cfg) -> str:
    if cfg.kind == "grpo":  # data.batch_size prompts, each with num_generations completions
        g = cfg.rollout.num_generations
        return f"{cfg.data.batch_size * g} ({cfg.data.batch_size} prompts x {g})"
    return str(cfg.data.batch_size)


def train(cfg, run_dir: Path, *, resume: bool = True) -> dict:
    """Train, evaluate, export, and write run_dir/summary.json; returns the summary. A stop signal (SIGTERM,
    Ctrl-C) during training or evaluation raises skyjax.errors.Preempted once the checkpoint is saved, before any
    final output is written."""
    from skyjax.train.trainer import Trainer

    t0 = time.time()
    run_dir = Path(run_dir).resolve()
    trainer = Trainer(cfg, run_dir, resume=resume, log=lambda m: print(m, file=sys.stderr))
    print(f"{cfg.kind} run '{cfg.name}': {trainer.fn.num_params() / 1e6:.2f}M parameters on mesh "
          f"{dict(trainer.mesh.shape)}, {trainer.total_steps} steps of {_rows_per_step(cfg)} "
          f"{trainer.task.row_unit} -> {run_dir}", file=sys.stderr)
    if trainer.lead and (run_dir / "summary.json").exists() and trainer.start_step < trainer.total_steps:
        (run_dir / "summary.json").unlink()  # an earlier, shorter run's: this one trains further
    with trainer.handling_signals():
        last = trainer.fit()
        summary = {"kind": cfg.kind, "name": cfg.name, "steps": int(trainer.state["step"]), "train": last,
                   **trainer.task.summarize(trainer, trainer.evaluate())}
        trainer.stop_if_signalled()
        skipped = sum(trainer.train_pipe.skipped.values()) + sum(trainer.read_skipped.values())
        summary["skipped_rows"] = int(skipped)
        paths = trainer.finish()  # a signal from here on lets the run finish: its outputs take seconds
    summary["seconds"] = round(time.time() - t0, 1)
    summary["complete"] = True
    summary["paths"] = {"run_dir": str(run_dir), "summary": str(run_dir / "summary.json"),
                        "metrics": str(run_dir / "metrics.jsonl"), "tensorboard": str(run_dir / "tensorboard"),
                        "train_checkpoints": str(run_dir / "checkpoints"), "skipped": str(run_dir / "skipped.jsonl"),
                        **paths}
    if trainer.lead:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
