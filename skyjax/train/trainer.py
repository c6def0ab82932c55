"""The one training loop. Reward-model training today; SFT, MPO and GRPO are further objectives for the same loop.

It owns: the mesh; the sharded train state (trainable params, frozen params, optimizer state) created under jit with
explicit shardings; the jitted step (gradient accumulation by a scan over micro-batches, AdamW, clipping); metrics
(TensorBoard + JSONL + progress bar on the lead host); NaN/inf detection that stops with the step and the batch's
row ids; SIGTERM (TPU preemption) that saves and exits cleanly; orbax checkpoints (async, keep N) holding the data
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
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

from skyjax.config import to_dict
from skyjax.convert.checkpoint import LoadedModel, export_hf, save_checkpoint
from skyjax.parallel.mesh import make_mesh
from skyjax.parallel.rules import use_mesh
from skyjax.train.config import RunConfig
from skyjax.train.metrics import MetricsWriter
from skyjax.train.objectives import OBJECTIVES, finalize, pair_scores
from skyjax.train.optimizer import build_optimizer, flatten, frozen_predicate, merge_params, split_params
from skyjax.train.pairs import host_batch
from skyjax.train.setup import PairPipeline, load_bundle, read_records, to_device


class NonFiniteError(FloatingPointError):
    """The loss or the gradient became NaN/inf."""


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: str | Path, *, resume: bool = True, log=print):
        self.cfg, self.run_dir, self.log = cfg, Path(run_dir).resolve(), log
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
        self.mesh = make_mesh(cfg.mesh)
        self.bundle = load_bundle(cfg.model, self.mesh, self.run_dir)
        model = self.bundle.model
        self.fn, self.arch = model.fn, model.arch
        self.objective = OBJECTIVES[cfg.kind]

        self.train_files, self.eval_files = self._data_files()
        records, self.read_skipped = read_records(self.train_files, cfg.data.on_error)
        self.train_pipe = PairPipeline(records, self.bundle, cfg.data, micro_batches=cfg.optimizer.grad_accum)
        per_epoch = max(len(records) // cfg.data.batch_size, 1)
        self.total_steps = cfg.trainer.steps or max(int(math.ceil(cfg.trainer.epochs * per_epoch)), 1)

        self.is_frozen = frozen_predicate(self.arch.name, cfg.trainer.freeze)
        self.optimizer, self.schedule = build_optimizer(cfg.optimizer, self.total_steps)
        self.state_shardings = self._state_shardings()
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
        self._step = jax.jit(self._train_step, donate_argnums=0,
                             out_shardings=(self.state_shardings, NamedSharding(self.mesh, P())))
        self._eval = jax.jit(self._eval_scores)
        self._stop_signal = None

    # --- setup -------------------------------------------------------------------------------------------------

    def _data_files(self) -> tuple[list[Path], list[Path]]:
        data = self.cfg.data
        if data.synthetic is None:
            return [Path(p) for p in data.train], [Path(p) for p in data.eval]
        from skyjax.data.synthetic import make_records

        syn, folder = data.synthetic, self.run_dir / "data"
        kw = dict(seed=syn.seed, image_size=syn.image_size, tasks=tuple(syn.tasks))
        train = make_records(folder, "train", syn.train, **kw)
        heldout = make_records(folder, "heldout", syn.heldout, **{**kw, "seed": syn.seed + 1})
        return [train, *map(Path, data.train)], [heldout, *map(Path, data.eval)]

    def _state_shardings(self) -> dict:
        param_sh = self.fn.shardings(self.mesh)
        trainable_sh, frozen_sh = split_params(param_sh, self.is_frozen)
        trainable_shapes, _ = split_params(self.fn.shapes, self.is_frozen)
        replicated = NamedSharding(self.mesh, P())
        opt_sh = optax.tree_map_params(self.optimizer, lambda _, s: s, jax.eval_shape(self.optimizer.init,
                                                                                  trainable_shapes),
                                       trainable_sh, transform_non_params=lambda _: replicated)
        return {"step": replicated, "trainable": trainable_sh, "frozen": frozen_sh, "opt": opt_sh}

    # --- the step ----------------------------------------------------------------------------------------------

    def _train_step(self, state: dict, batch: dict):
        frozen, ocfg = state["frozen"], self.cfg.objective

        def micro(carry, mb):
            grads_acc, sums_acc = carry

            def loss_fn(trainable):
                return self.objective(self.fn.bind(merge_params(trainable, frozen)), mb, ocfg)

            (_, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["trainable"])
            # loss_fn is a weighted mean over this micro-batch: scale back to a weighted sum before accumulating
            grads_acc = jax.tree.map(lambda a, g: a + g * sums["weight"], grads_acc, grads)
            return (grads_acc, jax.tree.map(jnp.add, sums_acc, sums)), None

        zeros = jax.tree.map(jnp.zeros_like, state["trainable"])
        sums0 = {k: jnp.zeros((), jnp.float32) for k in
                 ("loss", "accuracy", "margin", "chosen_score", "rejected_score", "weight")}
        (grads, sums), _ = jax.lax.scan(micro, (zeros, sums0), batch)
        grads = jax.tree.map(lambda g: g / jnp.maximum(sums["weight"], 1.0), grads)
        updates, opt = self.optimizer.update(grads, state["opt"], state["trainable"])
        trainable = optax.apply_updates(state["trainable"], updates)
        sums = dict(sums, grad_norm=optax.global_norm(grads) * sums["weight"],
                    lr=self.schedule(state["step"]) * sums["weight"])
        new = {"step": state["step"] + 1, "trainable": trainable, "frozen": frozen, "opt": opt}
        return new, sums

    def _eval_scores(self, trainable, frozen, batch):
        model = self.fn.bind(merge_params(trainable, frozen))
        mb = jax.tree.map(lambda x: x[0], batch)
        return pair_scores(model, mb)

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
        t0, pairs, tokens = time.time(), 0, 0
        try:
            with use_mesh(self.mesh):
                for step in range(self.start_step, end):
                    batch, row_ids = host_batch(next(self.data_iter))
                    pairs += len(row_ids)
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
                        metrics.update(pairs_per_s=pairs / elapsed, tokens_per_s=tokens / elapsed)
                        writer.write(step + 1, metrics)
                        history.append({"step": step + 1, **metrics})
                        window, t0, pairs, tokens = [], time.time(), 0, 0
                    writer.advance(1, {"loss": history[-1]["loss"], "acc": history[-1]["accuracy"]}
                                   if history else None)
                    if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 != end:
                        for name, acc in self.evaluate().items():
                            writer.write(step + 1, {"accuracy": acc}, prefix=f"eval/{name}")
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
            raise NonFiniteError(f"step {step}: {', '.join(bad)} became NaN/inf; the batch held rows "
                                 f"{', '.join(row_ids)}")
        return finalize(host)

    # --- evaluation and outputs --------------------------------------------------------------------------------

    def score_pairs(self, files, *, blank_images: bool = False) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Scores of every (chosen, rejected) pair in the JSONL files with the current parameters."""
        records, _ = read_records(files, self.cfg.data.on_error)
        pipe = PairPipeline(records, self.bundle, self.cfg.data, epochs=1, shuffle=False, blank_images=blank_images,
                            batch_size=self.cfg.trainer.eval_batch_size, drop_remainder=False, pad_last=True)
        chosen, rejected, ids = [], [], []
        with use_mesh(self.mesh):
            for batch in pipe.dataset:
                batch, row_ids = host_batch(batch)
                c, r = self._eval(self.state["trainable"], self.state["frozen"], to_device(batch, self.mesh))
                keep = np.asarray(batch["pair_weight"][0]) > 0
                chosen.append(np.asarray(c)[keep])
                rejected.append(np.asarray(r)[keep])
                ids.extend(i for i, k in zip(row_ids, keep) if k)
        return np.concatenate(chosen), np.concatenate(rejected), ids

    def evaluate(self, *, blank_images: bool = False) -> dict[str, float]:
        out = {}
        for path in self.eval_files:
            c, r, _ = self.score_pairs([path], blank_images=blank_images)
            out[Path(path).stem] = float(np.mean(c > r))  # ties count as wrong
        return out

    def params(self) -> dict:
        return merge_params(self.state["trainable"], self.state["frozen"])

    def finish(self) -> dict:
        """Held-out accuracy (and with images blanked), a skyjax checkpoint, a Hugging Face export."""
        model = self.bundle.model
        final = LoadedModel(self.arch, model.config, self.fn, self.params(), model.folder, model.hf_config)
        outputs = {"checkpoint": str(save_checkpoint(self.run_dir / "checkpoint", final))}
        if self.cfg.trainer.export:
            outputs["hf_export"] = str(export_hf(final, self.run_dir / "hf"))
        return outputs


def _mean(rows: list[dict]) -> dict:
    keys = rows[0].keys()
    return {k: float(np.mean([r[k] for r in rows])) for k in keys}
