"""What kind grpo logs besides the step's own metrics (skyjax.train.objectives.grpo): the host-side description of
the rollout, the time split between sampling and updating, and the completions table.

`rollout_stats` is part of the rollout source's `stats` (skyjax.train.grpo.RolloutSource; the trainer logs the last
batch's with the step's metrics, keys the objective already reports left to it):

    rewards/<name>/mean, rewards/<name>/std   each reward function over the completions (None rows left out; std
                                              with Bessel's correction, as TRL's nanstd)
    completion_length_max                      the longest completion (tokens, the stop token included)
    placeholder_cut_fraction                   completions cut at a sampled image placeholder (skyjax.train.grpo_rows)

With rollout.num_iterations > 1 the steps that reuse a rollout log its values again. `RolloutLog.metrics()` (the
source's `metrics()`, added to each logged row) is the time split since the last row:

    rollout_tokens_per_s                       completion tokens sampled per second of sampling (the first rollout,
                                              which compiles the sampler, left out)
    update_tokens_per_s                        row tokens (prompt + completion) per second of optimizer steps (the
                                              first step, which compiles, left out)

The completions table: with `rollout.log_completions_every` N > 0, the rollouts drawn for a step s with a multiple
of N in (s - num_iterations, s] (so about every N steps whatever num_iterations; step 1 always) are appended to
run_dir/completions.jsonl, one line per completion: step (the first step trained on it), rollout (its index), row
(prompt file:line), prompt (text, chat template applied), images (paths), completion (text), reward (weighted),
rewards ({name: value or null}), advantage, length (tokens), stopped (false: cut at rollout.max_new_tokens). A
resumed run first drops the lines of steps after the one it resumes from (the killed run's), as metrics.jsonl.
On several hosts each logs its own rollouts' metrics and only the lead host writes the table (its share).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np


def nanstd(x: np.ndarray) -> float:
    """Std over the finite values with Bessel's correction; NaN with fewer than two."""
    x = np.asarray(x, np.float64)
    x = x[np.isfinite(x)]
    return float(np.std(x, ddof=1)) if x.size > 1 else float("nan")


def rollout_stats(names: Sequence[str], table: np.ndarray, lengths: np.ndarray, cut: np.ndarray) -> dict:
    """The host metrics of one rollout batch (see the module docstring): `table` [R, K] (NaN: no reward),
    `lengths` [R], `cut` [R] bool."""
    out: dict[str, float] = {}
    for k, name in enumerate(names):
        col = np.asarray(table[:, k], np.float64)
        finite = col[np.isfinite(col)]
        out[f"rewards/{name}/mean"] = float(finite.mean()) if finite.size else float("nan")
        out[f"rewards/{name}/std"] = nanstd(col)
    out["completion_length_max"] = float(np.max(lengths)) if len(lengths) else 0.0
    out["placeholder_cut_fraction"] = float(np.mean(cut)) if len(cut) else 0.0
    return out


class RolloutLog:
    def __init__(self, run_dir: Path | None, every: int, num_iterations: int, lead: bool = True):
        self.path = None if run_dir is None or not every or not lead else Path(run_dir) / "completions.jsonl"
        self.every, self.num_iterations = int(every), int(num_iterations)
        self.rollout_s = self.update_s = 0.0
        self.rollout_tokens = self.update_tokens = 0
        self.rollouts_timed = 0
        self.served_at: float | None = None  # when the last batch was handed to the trainer
        self.served_tokens = 0
        self.updates_seen = 0
        self.truncated = False

    # --- time -------------------------------------------------------------------------------------------------

    def ready(self) -> None:
        """The previous step has finished (the source waited for the state it is given): its update time counts
        from when its batch was handed over (the trainer's first step, which compiles, is left out)."""
        now = time.perf_counter()
        if self.served_at is not None:
            self.updates_seen += 1
            if self.updates_seen > 1:
                self.update_s += now - self.served_at
                self.update_tokens += self.served_tokens
        self.served_at = None

    def sampled(self, seconds: float, tokens: int) -> None:
        self.rollouts_timed += 1
        if self.rollouts_timed > 1:  # the first rollout compiles the sampler
            self.rollout_s += seconds
            self.rollout_tokens += int(tokens)

    def served(self, tokens: int) -> None:
        """A batch ([A, b, S] with `tokens` real) goes to the trainer."""
        self.served_at, self.served_tokens = time.perf_counter(), int(tokens)

    def metrics(self) -> dict:
        """The rates since the last call (see the module docstring)."""
        out: dict[str, float] = {}
        if self.rollout_s > 0:
            out["rollout_tokens_per_s"] = self.rollout_tokens / self.rollout_s
        if self.update_s > 0:
            out["update_tokens_per_s"] = self.update_tokens / self.update_s
        self.rollout_s = self.update_s = 0.0
        self.rollout_tokens = self.update_tokens = 0
        return out

    # --- the completions table --------------------------------------------------------------------------------

    def wants(self, step: int) -> bool:
        """Whether the rollout drawn for `step` (1-based: the first step trained on it) is written."""
        if self.path is None:
            return False
        return (step // self.every) > ((step - self.num_iterations) // self.every) or step == 1

    def truncate(self, step: int) -> None:
        """Drop the table's lines of steps after `step` (a resumed run's first rollout; once)."""
        if self.truncated or self.path is None:
            return
        self.truncated = True
        if not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
        self.path.write_text("".join(line + "\n" for line in keep))

    def write(self, rows: list[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
