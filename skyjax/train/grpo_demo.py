"""The built-in GRPO demo (configs/demo/grpo.yaml): R1V's stage 3 in miniature, a tiny VL policy trained with GRPO
on its own samples of a synthetic visual question task, on the CPU mesh, with nothing downloaded.

    skyjax train configs/demo/grpo.yaml --run-dir runs/grpo_demo

A run config of kind grpo with `data.synthetic` and a `demo` section (DemoConfig) runs, in its run folder:

    1. data/      the task (skyjax.data.synthetic: one shape per image, "Colour?" -> "Red." / "Green." / ...): SFT rows
                  to warm-start the policy (a `demo.reasoning` fraction of them answer R1-style, "<think>...</think>
                  Answer: Red."), prompts with their answers for the rollouts, held-out prompts
    2. warmup/    a short SFT of the tiny R1V policy: it answers in one of the two forms, often with the wrong colour
                  (held-out greedy accuracy below 60%: `accuracy_before`)
    3. grpo/      GRPO (the run config itself) from the warm-started policy: rollout.num_generations samples per
                  prompt, rewarded by rollout.rewards (accuracy against the answer, the R1 format), group advantages,
                  the clipped surrogate -> `accuracy_after`

Each stage is an ordinary run (its own summary.json, metrics.jsonl, checkpoints, resume); a rerun skips the
finished stages. summary.json holds both accuracies, the reward curve (per step: the weighted reward and each
component), the effective-sample fraction (completions whose group's rewards differ, so their advantage is not 0)
and every path.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from skyjax.train.config import RunConfig
from skyjax.train.mpo_demo import _log, _stage, demo_data, greedy_accuracy, warmup_config


def reward_curve(metrics: Path) -> dict[str, list]:
    """Per logged step of a GRPO run's metrics.jsonl: the step, the weighted reward, each reward component and the
    effective-sample fraction (1 - frac_reward_zero_std)."""
    curve: dict[str, list] = {"step": [], "reward": [], "effective_fraction": []}
    for line in metrics.read_text().splitlines():
        row = json.loads(line)
        if "reward" not in row:
            continue
        curve["step"].append(int(row["step"]))
        curve["reward"].append(float(row["reward"]))
        curve["effective_fraction"].append(1.0 - float(row.get("frac_reward_zero_std", 0.0)))
        for key, value in row.items():
            if key.startswith("rewards/") and not key.endswith("/std"):  # each function's mean
                curve.setdefault(key, []).append(float(value))
    return curve


def run_demo(cfg: RunConfig, run_dir: Path, *, resume: bool = True) -> dict:
    """The whole demo (see the module docstring); returns the summary written to run_dir/summary.json. A rerun
    resumes: finished stages are skipped, an interrupted one resumes from its checkpoint."""
    t0 = time.time()
    run_dir, data, sft_rows, prompts, heldout, _ = demo_data(cfg, run_dir, resume=resume,
                                                             reasoning=cfg.demo.reasoning)
    # one tile bucket for a batch of SFT rows (the run's buckets are sized for prompts x completions)
    warm_cfg = warmup_config(cfg, sft_rows, tile_buckets=(cfg.data.batch_size * (cfg.data.max_tiles or 1),))
    warm = _stage("warmup", warm_cfg, run_dir / "warmup")
    policy = Path(warm["paths"]["checkpoint"])
    budget = cfg.rollout.max_new_tokens
    before = greedy_accuracy(policy, heldout, max_new_tokens=budget)
    _log(f"[warmup] held-out greedy accuracy {before['accuracy']:.3f}")

    grpo_cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, source=str(policy)), demo=None,
        data=dataclasses.replace(cfg.data, train=(str(prompts),), eval=(), synthetic=None),
        trainer=dataclasses.replace(cfg.trainer, export=True))
    grpo = _stage("grpo", grpo_cfg, run_dir / "grpo")
    after = greedy_accuracy(Path(grpo["paths"]["checkpoint"]), heldout, max_new_tokens=budget)
    _log(f"[grpo] held-out greedy accuracy {after['accuracy']:.3f}")
    curve = reward_curve(Path(grpo["paths"]["metrics"]))

    summary: dict[str, Any] = {
        "kind": "grpo_demo", "name": cfg.name, "steps": grpo["steps"],
        "accuracy_before": before["accuracy"], "accuracy_after": after["accuracy"], "heldout_rows": before["rows"],
        "rewards": [{"name": r.name, "weight": r.weight} for r in cfg.rollout.rewards],
        "reward_curve": curve,
        "effective_fraction": float(np.mean(curve["effective_fraction"])) if curve["effective_fraction"] else None,
        "answers": {"before": before["answers"], "after": after["answers"]},
        "train": grpo.get("train", {}), "seconds": round(time.time() - t0, 1), "complete": True,
        "paths": {"run_dir": str(run_dir), "summary": str(run_dir / "summary.json"), "data": str(data),
                  "heldout": str(heldout), "prompts": str(prompts), "warmup": str(run_dir / "warmup"),
                  "grpo": str(run_dir / "grpo"), "checkpoint": grpo["paths"]["checkpoint"],
                  "hf_export": grpo["paths"].get("hf_export"), "metrics": grpo["paths"]["metrics"]},
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def format_demo(summary: dict) -> str:
    curve = summary["reward_curve"]
    first, last = (curve["reward"][0], curve["reward"][-1]) if curve["reward"] else (float("nan"),) * 2
    rewards = ", ".join(f"{r['name']} x {r['weight']:g}" for r in summary["rewards"])
    lines = [f"{summary['name']} (GRPO demo): {summary['seconds']:.0f} s",
             f"  accuracy_before      {summary['accuracy_before']:.3f}   held-out greedy accuracy of the warm-started "
             f"policy",
             f"  accuracy_after       {summary['accuracy_after']:.3f}   after {summary['steps']} GRPO steps ({rewards})",
             f"  reward               {first:.3f} -> {last:.3f}   (first and last logged step)",
             f"  effective samples    {summary['effective_fraction']:.3f}   completions whose group's rewards differ",
             f"wrote {summary['paths']['summary']} (every number and path)"]
    return "\n".join(lines)
