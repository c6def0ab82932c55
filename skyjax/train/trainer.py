"""The one training loop. The run's kind picks a task (skyjax.train.tasks: reward_model, sft; MPO and GRPO plug in
the same way): its objective, model loader, data pipeline and evaluation. Nothing here depends on the kind.

It owns: the mesh; the sharded train state (trainable params, frozen params, optimizer state) created under jit with
explicit shardings; the jitted step (skyjax.train.step: gradient accumulation by a scan over micro-batches, AdamW,
clipping); metrics (TensorBoard + JSONL + progress bar on the lead host); NaN/inf detection that stops with the step
and the batch's row ids; SIGTERM (TPU preemption) that saves and exits cleanly; orbax checkpoints (async, keep N) holding the data
iterator's state too, restorable onto another mesh shape; and at the end, held-out evaluation, a skyjax checkpoint
and a Hugging Face export.
"""

from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from skyjax.config import to_dict
from skyjax.convert.checkpoint import LoadedModel, export_hf, save_checkpoint
from skyjax.parallel.mesh import make_mesh
from skyjax.parallel.rules import use_mesh
from skyjax.train.config import RunConfig
from skyjax.train.metrics import MetricsWriter
from skyjax.train.optimizer import build_optimizer, flatten, frozen_predicate, merge_params, split_params
from skyjax.train.pairs import host_batch
from skyjax.train.setup import read_records, to_device
from skyjax.train.step import build_train_step, jit_train_step, report, state_shardings
from skyjax.train.tasks import TASKS, prepare_bundle, score_pairs


class NonFiniteError(FloatingPointError):
    """The loss or the gradient became NaN/inf."""


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: str | Path, *, resume: bool = True, log=print):
        self.cfg, self.run_dir, self.log = cfg, Path(run_dir).resolve(), log
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
        self.mesh = make_mesh(cfg.mesh)
        self.task = TASKS[cfg.kind]
        self.bundle = prepare_bundle(self.task, self.task.load_bundle(cfg.model, self.mesh, self.run_dir), cfg.data)
        model = self.bundle.model
        self.fn, self.arch = model.fn, model.arch
        self.objective = self.task.objective

        self.train_files, self.eval_files = self._data_files()
        records, self.read_skipped = read_records(self.train_files, cfg.data.on_error, kind=self.task.record_kind)
        self.train_pipe = self.task.pipeline(records, self.bundle, cfg.data, micro_batches=cfg.optimizer.grad_accum)
        per_epoch = max(len(records) // cfg.data.batch_size, 1)
        self.total_steps = cfg.trainer.steps or max(int(math.ceil(cfg.trainer.epochs * per_epoch)), 1)

        self.is_frozen = frozen_predicate(self.arch.name, cfg.trainer.freeze)
        self.optimizer, self.schedule = build_optimizer(cfg.optimizer, self.total_steps)
        self.state_shardings = state_shardings(self.fn, self.optimizer, self.is_frozen, self.mesh)
        trainable, frozen = split_params(model.params, self.is_frozen)
        if not flatten(trainable):
            raise ValueError(f"trainer.freeze {cfg.trainer.freeze} freezes every parameter: nothing to train")
        opt_state = jax.jit(self.optimizer.init, out_shardings=self.state_shardings["opt"])(trainable)
        state = {"step": jnp.zeros((), jnp.int32), "trainable": trainable, "frozen": frozen, "opt": opt_state}
        # exactly the shardings the step returns, so the first and every later step share one compiled program
        self.state = jax.device_put(state, self.state_shardings)
        model.params = None  # the state owns the parameters now (they are donated to each step)

        self.ckpt = ocp.CheckpointManager(
            self.run_dir / "checkpoints",
            options=ocp.CheckpointManagerOptions(max_to_keep=cfg.trainer.keep_checkpoints,
                                                 enable_async_checkpointing=cfg.trainer.async_checkpointing),
            item_names=("state", "data"))
        self.data_iter = iter(self.train_pipe.dataset)
        self.start_step = 0
        if resume and self.ckpt.latest_step() is not None:
            self.restore(self.ckpt.latest_step())
        self.train_step = build_train_step(self.fn, self.objective, self.optimizer, self.schedule, cfg.objective)
        self._step = jit_train_step(self.train_step, self.state_shardings, self.mesh)
        self._compiled: dict[str, object] = {}  # jitted evaluation functions of the task, by name
        self._stop_signal = None

    # --- setup -------------------------------------------------------------------------------------------------

    def _data_files(self) -> tuple[list[Path], list[Path]]:
        data = self.cfg.data
        if data.synthetic is None:
            return [Path(p) for p in data.train], [Path(p) for p in data.eval]
        syn, folder, make = data.synthetic, self.run_dir / "data", self.task.make_synthetic
        kw = dict(seed=syn.seed, image_size=syn.image_size, tasks=tuple(syn.tasks))
        train = make(folder, "train", syn.train, **kw)
        heldout = make(folder, "heldout", syn.heldout, **{**kw, "seed": syn.seed + 1})
        return [train, *map(Path, data.train)], [heldout, *map(Path, data.eval)]

    def compiled(self, name: str, make):
        """`jax.jit(make())`, built once per trainer (evaluation functions of the task)."""
        if name not in self._compiled:
            self._compiled[name] = jax.jit(make())
        return self._compiled[name]

    # --- checkpoints -------------------------------------------------------------------------------------------

    def save(self, wait: bool = False):
        step = int(self.state["step"])
        if step in self.ckpt.all_steps():  # already saved (e.g. by save_every, or on SIGTERM)
            if wait:
                self.ckpt.wait_until_finished()
            return step
        self.ckpt.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(self.state),
                                                     data=ocp.args.JsonSave(self.data_iter.get_state())),
                       force=True)
        if wait:
            self.ckpt.wait_until_finished()
        return step

    def restore(self, step: int):
        target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), self.state,
                              self.state_shardings)
        restored = self.ckpt.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                   data=ocp.args.JsonRestore()))
        self.state = restored["state"]
        self.data_iter.set_state(restored["data"])
        self.start_step = int(self.state["step"])
        self.log(f"resumed from {self.run_dir / 'checkpoints'} at step {self.start_step}")

    # --- the loop ----------------------------------------------------------------------------------------------

    def _on_sigterm(self, signum, frame):
        self._stop_signal = signum

    def fit(self, max_steps: int | None = None) -> dict:
        """Train to `trainer.steps` (or stop early after `max_steps` more steps); returns the last metrics."""
        cfg = self.cfg.trainer
        end = self.total_steps if max_steps is None else min(self.total_steps, self.start_step + max_steps)
        writer = MetricsWriter(self.run_dir, self.total_steps, cfg.progress, self.start_step)
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        pending, window, history = None, [], []
        t0, rows, tokens = time.time(), 0, 0
        try:
            with use_mesh(self.mesh):
                for step in range(self.start_step, end):
                    batch, row_ids = host_batch(next(self.data_iter))
                    rows += len(row_ids)
                    tokens += int(np.sum(batch["attention_mask"]))
                    self.state, sums = self._step(self.state, to_device(batch, self.mesh))
                    if pending is not None:  # check the previous step while this one runs
                        window.append(self._check(*pending))
                    pending = (step + 1, sums, row_ids)
                    if (step + 1) % cfg.log_every == 0 or step + 1 == end:
                        window.append(self._check(*pending))
                        pending = None
                        metrics = _mean(window)
                        elapsed = max(time.time() - t0, 1e-9)
                        rows_all, tokens_all = _over_hosts(rows, tokens)  # every host's share counted
                        metrics[f"{self.task.row_unit}_per_s"] = rows_all / elapsed  # pairs_per_s, rows_per_s
                        metrics["tokens_per_s"] = tokens_all / elapsed
                        writer.write(step + 1, metrics)
                        history.append({"step": step + 1, **metrics})
                        window, t0, rows, tokens = [], time.time(), 0, 0
                    writer.advance(1, {k: history[-1][k] for k in ("loss", "accuracy") if k in history[-1]}
                                   if history else None)
                    if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 != end:
                        for name, result in self.evaluate().items():
                            writer.write(step + 1, result if isinstance(result, dict) else {"accuracy": result},
                                         prefix=f"eval/{name}")
                    if cfg.save_every and (step + 1) % cfg.save_every == 0:
                        self.save()
                    if self._stop_signal is not None:
                        if pending is not None:
                            self._check(*pending)
                        saved = self.save(wait=True)
                        writer.message(f"SIGTERM: saved a checkpoint at step {saved}; exiting")
                        break
                if pending is not None:
                    self._check(*pending)
            self.save(wait=True)
        finally:
            signal.signal(signal.SIGTERM, previous)
            writer.close()
        self.start_step = int(self.state["step"])
        return history[-1] if history else {}

    def _check(self, step: int, sums, row_ids) -> dict:
        host = {k: float(v) for k, v in jax.device_get(sums).items()}
        if not all(math.isfinite(v) for v in host.values()):
            bad = [k for k, v in host.items() if not math.isfinite(v)]
            where = f" (host {jax.process_index()}'s share)" if jax.process_count() > 1 else ""
            raise NonFiniteError(f"step {step}: {', '.join(bad)} became NaN/inf; the batch held rows{where} "
                                 f"{', '.join(row_ids)}")
        return report(self.objective, host)

    # --- evaluation and outputs --------------------------------------------------------------------------------

    def score_pairs(self, files, *, blank_images: bool = False) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Reward-model runs: scores of every (chosen, rejected) pair in the JSONL files (skyjax.train.tasks)."""
        return score_pairs(self, files, blank_images=blank_images)

    def evaluate(self, **options) -> dict:
        """The task's held-out result for every eval file, by file stem (reward model: pair accuracy, `options`
        blank_images=True blanks the images; SFT: {loss, accuracy, tokens, sequences}).

        On several hosts the held-out pass is skipped with a warning (training itself is multi-host; evaluation is
        not yet: the hosts' shares of a file may differ by a batch): evaluate the checkpoint on one host."""
        if jax.process_count() > 1 and self.eval_files:
            if not getattr(self, "_warned_eval", False):
                self.log(f"held-out evaluation skipped: not supported on {jax.process_count()} hosts yet; run "
                         f"`skyjax eval` / `skyjax score` on the checkpoint from one host")
                self._warned_eval = True
            return {}
        return {Path(path).stem: self.task.evaluate(self, path, **options) for path in self.eval_files}

    def params(self) -> dict:
        return merge_params(self.state["trainable"], self.state["frozen"])

    def finish(self) -> dict:
        """A skyjax checkpoint and a Hugging Face export of the current parameters."""
        model = self.bundle.model
        final = LoadedModel(self.arch, model.config, self.fn, self.params(), model.folder, model.hf_config)
        outputs = {"checkpoint": str(save_checkpoint(self.run_dir / "checkpoint", final))}
        if self.cfg.trainer.export:
            outputs["hf_export"] = str(export_hf(final, self.run_dir / "hf"))
        return outputs


def _over_hosts(*counts: int) -> tuple[int, ...]:
    """Per-host counts summed over every host (one small all-gather; the counts themselves on one host)."""
    if jax.process_count() == 1:
        return counts
    from jax.experimental.multihost_utils import process_allgather

    return tuple(int(x) for x in np.asarray(process_allgather(np.asarray(counts, np.int64))).sum(axis=0))


def _mean(rows: list[dict]) -> dict:
    keys = rows[0].keys()
    return {k: float(np.mean([r[k] for r in rows])) for k in keys}
