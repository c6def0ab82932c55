"""Metrics on the lead host: TensorBoard event files, a JSONL log, and a progress bar with throughput."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax


class MetricsWriter:
    def __init__(self, run_dir: Path, total_steps: int, progress: bool = True, start_step: int = 0):
        self.lead = jax.process_index() == 0
        self.jsonl = None
        self.tb = None
        self.bar = None
        if not self.lead:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = (run_dir / "metrics.jsonl").open("a")
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", file=sys.stderr,
                            dynamic_ncols=True, mininterval=1.0)
        self._t = time.time()

    def write(self, step: int, metrics: dict, prefix: str = "train"):
        if not self.lead:
            return
        row = {"step": step, "split": prefix, "time": round(time.time(), 3), **metrics}
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        for k, v in metrics.items():
            if isinstance(v, (int, float)):
                self.tb.add_scalar(f"{prefix}/{k}", v, step)
        self.tb.flush()

    def compiling(self):
        """Before the first step: say it compiles (minutes for a large model), instead of an ETA from nothing."""
        if not self.lead:
            return
        if self.bar is not None:
            self.bar.set_description("compiling (first step)", refresh=True)
        else:
            print("compiling (first step)", file=sys.stderr, flush=True)

    def compiled(self):
        """After the first step's compile: rate and ETA count from now (the compile time is left out)."""
        if self.bar is not None:
            self.bar.set_description("train", refresh=False)
            self.bar.unpause()

    def advance(self, n: int, postfix: dict | None = None):
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                                     refresh=False)

    def message(self, text: str):
        if not self.lead:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
