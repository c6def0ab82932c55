"""The one training loop. The run's kind picks a task (skyjax.train.tasks: reward_model, sft; MPO and GRPO plug in
the same way): its objective, model loader, data pipeline and evaluation. Nothing here depends on the kind.

It owns: the mesh; the sharded train state (trainable params, frozen params, optimizer state, and when the
objective asks for them a frozen reference of the trainable subtree and the objective's state) created under jit with
explicit shardings; the loop over the task's batch source (skyjax.train.batch_source: next(state) -> host batch);
the jitted step (skyjax.train.step: gradient accumulation by a scan over micro-batches, AdamW, clipping); metrics
(TensorBoard + JSONL + progress bar on the lead host); NaN/inf detection that stops with the step and the batch's row
ids; SIGTERM (a TPU preemption) and SIGINT (Ctrl-C), which save a checkpoint and raise
`Preempted` (the CLI exits with PREEMPTED_EXIT_STATUS, writing no final outputs), at the same step on every process
when one of several gets the signal (skyjax.train.preemption, docs/preemption.md); orbax checkpoints (async, keep N)
holding the batch source's state too, restorable onto another mesh shape; and at the end, held-out evaluation, a
skyjax checkpoint and a Hugging Face export. The run folder is the run's own (skyjax.train.run_dir).
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from skyjax.config import ConfigError, from_dict, to_dict
from skyjax.convert.checkpoint import LoadedModel, export_hf, save_checkpoint, short_error
from skyjax.convert.safetensors_io import CheckpointError
from skyjax.errors import PREEMPTED_EXIT_STATUS, Preempted, UserError  # noqa: F401  (re-exported)
from skyjax.parallel.mesh import make_mesh
from skyjax.parallel.rules import use_mesh
from skyjax.train.batching import to_device
from skyjax.train.config import RunConfig
from skyjax.train.metrics import MetricsWriter
from skyjax.train.optimizer import build_optimizer, flatten, frozen_predicate, merge_params, split_params
from skyjax.train.pipeline import read_records
from skyjax.train.preemption import StopVote
from skyjax.train.reference import copy_of, load_reference
from skyjax.train.run_dir import check_resume, claim_run_dir, saved_steps
from skyjax.train.step import build_train_step, jit_train_step, objective_extras, report, state_shardings
from skyjax.train.tasks import TASKS, prepare_bundle


class NonFiniteError(UserError, FloatingPointError):
    """The loss or the gradient became NaN/inf."""


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # a preemption, Ctrl-C: save, then stop (Preempted)


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: str | Path, *, resume: bool = True, log=print):
        self.cfg, self.run_dir, self.log = cfg, Path(run_dir).resolve(), log
        self.lead = jax.process_index() == 0
        # first what can be checked at once: a wrong mesh shape or file changes nothing on disk
        self.mesh = make_mesh(cfg.mesh)
        for key in ("train", "eval"):  # not after hours of training
            missing = [p for p in getattr(cfg.data, key) if not Path(p).is_file()]
            if missing:
                raise ConfigError(f"data.{key}: {', '.join(map(str, missing))} does not exist")
        source = cfg.reference.source
        if source is not None and source != "tiny" and not Path(source).exists():
            raise ConfigError(f"reference.source {source} does not exist (a Hugging Face folder, a skyjax checkpoint "
                              f"or 'tiny')")
        # the run folder is this run's (skyjax.train.run_dir): every host checks, the lead host moves and writes
        normalize = lambda saved: to_dict(from_dict(RunConfig, saved))  # noqa: E731  (today's defaults filled in)
        check_resume(self.run_dir, to_dict(cfg), resume=resume, normalize=normalize)
        _sync_hosts("skyjax run dir checked")
        if self.lead:
            claim_run_dir(self.run_dir, to_dict(cfg), resume=resume, log=log, normalize=normalize)
        _sync_hosts("skyjax run dir claimed")
        self.run_dir.mkdir(parents=True, exist_ok=True)  # hosts that do not share the lead host's disk
        self.task = TASKS[cfg.kind]
        self.bundle = prepare_bundle(self.task, self.task.load_bundle(cfg.model, self.mesh, self.run_dir), cfg.data)
        model = self.bundle.model
        self.fn, self.arch = model.fn, model.arch
        self.objective = self.task.objective

        self.train_files, self.eval_files = self._data_files()
        self.read_errors: list = []  # RecordErrors of the rows skipped while reading (data.on_error: skip)
        records, self.read_skipped = read_records(self.train_files, cfg.data.on_error, kind=self.task.record_kind,
                                                  errors=self.read_errors)
        self.train_pipe = self.task.pipeline(records, self.bundle, cfg.data, micro_batches=cfg.optimizer.grad_accum)
        per_epoch = max(len(records) // cfg.data.batch_size, 1)
        self.total_steps = cfg.trainer.steps or max(int(math.ceil(cfg.trainer.epochs * per_epoch)), 1)

        resuming = resume and (cfg.trainer.resume_step is not None or bool(saved_steps(self.run_dir / "checkpoints")))
        self.is_frozen = frozen_predicate(self.arch.name, cfg.trainer.freeze)
        self.optimizer, self.schedule = build_optimizer(cfg.optimizer, self.total_steps)
        needs_reference, objective_state = objective_extras(self.objective, cfg.objective, cfg.reference)
        if not self.objective.needs_reference(self.objective.settings(cfg.objective)) and (
                cfg.reference.source is not None or cfg.reference.precompute):
            log(f"reference: the {self.objective.name} objective keeps no reference; reference.source / precompute "
                f"are ignored")
        self.state_shardings = state_shardings(self.fn, self.optimizer, self.is_frozen, self.mesh, needs_reference,
                                               objective_state)
        trainable, frozen = split_params(model.params, self.is_frozen)
        if not flatten(trainable):
            raise ConfigError(f"trainer.freeze {cfg.trainer.freeze} freezes every parameter: nothing to train")
        opt_state = jax.jit(self.optimizer.init, out_shardings=self.state_shardings["opt"])(trainable)
        state = {"step": jnp.zeros((), jnp.int32), "trainable": trainable, "frozen": frozen, "opt": opt_state}
        if needs_reference:  # the trainable subtree only: the frozen parameters are the policy's own
            # resuming, the checkpoint's reference replaces it: a copy of the right shapes is all that is needed
            state["reference"] = self._reference(trainable, load=not resuming)
        if objective_state is not None:
            state["objective"] = objective_state
        # exactly the shardings the step returns, so the first and every later step share one compiled program
        self.state = jax.device_put(state, self.state_shardings)
        model.params = None  # the state owns the parameters now (they are donated to each step)

        resume_from = self._resume_step() if resuming else None
        self.ckpt = ocp.CheckpointManager(
            self.run_dir / "checkpoints",
            # cleanup_tmp_directories: a save cut short by a hard kill leaves a temporary folder, never a step folder
            options=ocp.CheckpointManagerOptions(max_to_keep=cfg.trainer.keep_checkpoints,
                                                 enable_async_checkpointing=cfg.trainer.async_checkpointing,
                                                 cleanup_tmp_directories=True),
            item_names=("state", "data"))
        self.batches = self.task.batch_source(self.train_pipe, self.bundle, cfg, trainer=self)
        self.start_step = 0
        if resume_from is not None:
            self.restore(resume_from)
            if self.start_step > self.total_steps:
                raise ConfigError(f"trainer.steps={self.total_steps} is below the step {self.start_step} resumed from "
                                  f"{self.run_dir / 'checkpoints'}: raise trainer.steps, or rerun with --no-resume")
        if self.lead:
            self._truncate_metrics(self.start_step)
        self.train_step = build_train_step(self.fn, self.objective, self.optimizer, self.schedule, cfg.objective)
        self._step = jit_train_step(self.train_step, self.state_shardings, self.mesh)
        self._compiled: dict[str, object] = {}  # jitted evaluation functions of the task, by name
        self._stop_signal = None  # the signal this process got, or that the processes agreed on
        self._handling_signals = False
        self._vote = StopVote(self.mesh)  # on several processes the stop signal is agreed on (a collective)

    # --- setup -------------------------------------------------------------------------------------------------

    def _data_files(self) -> tuple[list[Path], list[Path]]:
        data = self.cfg.data
        if data.synthetic is None:
            return [Path(p) for p in data.train], [Path(p) for p in data.eval]
        # every process writes the (seeded, identical) synthetic data, each into its own folder: processes sharing a
        # disk would otherwise rewrite the file another one is reading
        folder = self.run_dir / ("data" if self.lead else f"data-process{jax.process_index()}")
        syn, make = data.synthetic, self.task.make_synthetic
        kw = dict(seed=syn.seed, image_size=syn.image_size, tasks=tuple(syn.tasks))
        train = make(folder, "train", syn.train, **kw)
        heldout = make(folder, "heldout", syn.heldout, **{**kw, "seed": syn.seed + 1})
        return [train, *map(Path, data.train)], [heldout, *map(Path, data.eval)]

    def _reference(self, trainable: dict, load: bool = True) -> dict:
        """The reference's trainable subtree: a copy of the policy's at step 0, or loaded from reference.source
        (unless not `load`)."""
        source, shardings = self.cfg.reference.source, self.state_shardings["reference"]
        if source is None or not load:
            return copy_of(trainable, shardings)
        return load_reference(source, self.task.load_bundle, self.cfg.model, self.mesh, self.run_dir / "reference",
                              self.is_frozen, trainable, shardings)

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
                                                     data=ocp.args.JsonSave(self.batches.get_state())),
                       force=True)
        if wait:
            self.ckpt.wait_until_finished()
        return step

    def _resume_step(self) -> int:
        steps = saved_steps(self.run_dir / "checkpoints")
        wanted = self.cfg.trainer.resume_step
        if wanted is None:
            return steps[-1]
        if wanted not in steps:
            raise ConfigError(f"trainer.resume_step={wanted}: no such checkpoint in {self.run_dir / 'checkpoints'} "
                              f"(saved steps: {', '.join(map(str, steps)) or 'none'})")
        later = [s for s in steps if s > wanted]
        if later and self.lead:  # set aside (not deleted): the run continues from `wanted` and saves those steps anew
            aside = self.run_dir / f"checkpoints.after-{wanted}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
            aside.mkdir(parents=True, exist_ok=True)
            for s in later:
                (self.run_dir / "checkpoints" / str(s)).rename(aside / str(s))
            self.log(f"trainer.resume_step={wanted}: moved the later checkpoints ({', '.join(map(str, later))}) to "
                     f"{aside}")
        return wanted

    def restore(self, step: int):
        target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), self.state,
                              self.state_shardings)
        try:
            restored = self.ckpt.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                       data=ocp.args.JsonRestore()))
            self.batches.set_state(restored["data"])
        except Exception as e:  # orbax / tensorstore errors have no common type: name the step and what to do
            raise self._unreadable(step, e) from e
        self.state = restored["state"]
        self.start_step = int(self.state["step"])
        self.log(f"resumed from {self.run_dir / 'checkpoints'} at step {self.start_step}")

    def _unreadable(self, step: int, error: Exception) -> CheckpointError:
        folder = self.run_dir / "checkpoints"
        earlier = [s for s in saved_steps(folder) if s < step]
        reason = short_error(error)
        todo = (f"rerun with trainer.resume_step={earlier[-1]} (an earlier checkpoint) or remove {folder / str(step)}"
                if earlier else f"remove {folder / str(step)} to start afresh, or rerun with --no-resume")
        return CheckpointError(f"checkpoint step {step} in {folder} is unreadable ({type(error).__name__}: "
                               f"{reason}); {todo}")

    def _truncate_metrics(self, step: int) -> None:
        """metrics.jsonl without the rows past `step` (written before a restart that resumes at `step`)."""
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
        path.write_text("".join(line + "\n" for line in keep))

    # --- the loop ----------------------------------------------------------------------------------------------

    def _on_signal(self, signum, frame):
        if self._stop_signal is None:
            self._stop_signal = signum
            when = "this step" if self._vote.processes == 1 else "a step every process agrees on"
            self.log(f"{signal.Signals(signum).name}: stopping after {when}: saving a checkpoint first (exit status "
                     f"{PREEMPTED_EXIT_STATUS})")
        else:  # a second signal: the save must still finish (a half-written checkpoint would be lost)
            self.log(f"{signal.Signals(signum).name}: already stopping; waiting for the checkpoint to be written")

    _on_sigterm = _on_signal  # the name of earlier versions

    @contextlib.contextmanager
    def handling_signals(self):
        """SIGTERM and SIGINT only set a flag while inside (the loop then saves and raises `Preempted`); the
        previous handlers come back after. Nested uses install the handlers once."""
        if self._handling_signals:
            yield
            return
        previous = {}
        try:
            for signum in STOP_SIGNALS:
                previous[signum] = signal.signal(signum, self._on_signal)
        except ValueError:  # not the main thread: signals cannot be caught here
            pass
        self._handling_signals = True
        try:
            yield
        finally:
            self._handling_signals = False
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _agreed(self, signum: int | None) -> bool:
        """Whether the processes stop, from an agreed signal (0: no); a process that got none takes it on."""
        if signum and self._stop_signal is None:
            self._stop_signal = signum
            self.log(f"{signal.Signals(signum).name} on another process: stopping after this step: saving a "
                     f"checkpoint first (exit status {PREEMPTED_EXIT_STATUS})")
        return bool(signum)

    def stop_if_signalled(self) -> None:
        """After a stop signal: wait for the checkpoint being written, then raise `Preempted`. On several processes
        this is a vote (skyjax.train.preemption): every process calls it at the same point and all stop, or none."""
        if self._agreed(self._vote.agree(self._stop_signal)):
            self.ckpt.wait_until_finished()
            steps = saved_steps(self.run_dir / "checkpoints")
            raise Preempted(self._stop_signal, steps[-1] if steps else 0, self.run_dir / "checkpoints")

    def fit(self, max_steps: int | None = None) -> dict:
        """Train to `trainer.steps` (or stop early after `max_steps` more steps); returns the last metrics. A stop
        signal saves a checkpoint and raises `Preempted`."""
        cfg = self.cfg.trainer
        end = self.total_steps if max_steps is None else min(self.total_steps, self.start_step + max_steps)
        writer = MetricsWriter(self.run_dir, self.total_steps, cfg.progress, self.start_step)
        pending, window, history = None, [], []
        t0, rows, tokens = time.time(), 0, 0
        try:
            with self.handling_signals(), use_mesh(self.mesh):
                for step in range(self.start_step, end):
                    batch, row_ids = self.batches.next(self.state)
                    rows += len(row_ids)
                    tokens += int(np.sum(batch["attention_mask"]))
                    if step == self.start_step:
                        writer.compiling()
                    self.state, sums = self._step(self.state, to_device(batch, self.mesh))
                    vote = self._vote.poll(self._stop_signal)  # several processes: the previous step's vote
                    if step == self.start_step:  # the call returns once compiled (the step itself runs async)
                        writer.compiled()
                        t0 = time.time()
                    if pending is not None:  # check the previous step while this one runs
                        window.append(self._check(*pending))
                    pending = (step + 1, sums, row_ids)
                    if (step + 1) % cfg.log_every == 0 or step + 1 == end:
                        window.append(self._check(*pending))
                        pending = None
                        metrics = _mean(window)
                        for k, v in getattr(self.batches, "stats", {}).items():  # the source's last batch (grpo)
                            metrics.setdefault(k, v)
                        elapsed = max(time.time() - t0, 1e-9)
                        rows_all, tokens_all = _over_hosts(rows, tokens)  # every host's share counted
                        metrics[f"{self.task.row_unit}_per_s"] = rows_all / elapsed  # pairs_per_s, rows_per_s
                        metrics["tokens_per_s"] = tokens_all / elapsed
                        writer.write(step + 1, metrics)
                        history.append({"step": step + 1, **metrics})
                        window, t0, rows, tokens = [], time.time(), 0, 0
                    writer.advance(1, {k: history[-1][k] for k in ("loss", "accuracy") if k in history[-1]}
                                   if history else None)
                    if self._stop_signal is not None if vote is None else self._agreed(vote):
                        break
                    if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 != end:
                        try:
                            evals = self.evaluate()
                        except Preempted:  # a signal during the evaluation: save this step, then stop
                            break
                        for name, result in evals.items():
                            writer.write(step + 1, result if isinstance(result, dict) else {"accuracy": result},
                                         prefix=f"eval/{name}")
                    if cfg.save_every and (step + 1) % cfg.save_every == 0:
                        self.save()
                    if vote is None and self._stop_signal is not None:  # several processes: the next poll tells
                        break
                if pending is not None:
                    self._check(*pending)
                saved = self.save(wait=True)
                if self._agreed(self._vote.agree(self._stop_signal)):
                    writer.message(f"{signal.Signals(self._stop_signal).name}: saved a checkpoint at step {saved}")
                    self.stop_if_signalled()
        finally:
            self.write_skipped()
            writer.close()
        self.start_step = int(self.state["step"])
        return history[-1] if history else {}

    def skipped_rows(self) -> list[dict]:
        """Every skipped training row: file, line, reason and the stage that found it (read / prepare)."""
        rows = [{"file": e.source, "line": e.line, "stage": "read", "reason": e.reason, "detail": e.detail}
                for e in self.read_errors]
        for where, detail in sorted(self.train_pipe.bad_rows.items()):
            file, _, line = where.rpartition(":")
            rows.append({"file": file or where, "line": int(line) if line.isdigit() else None, "stage": "prepare",
                         "reason": "bad_row", "detail": detail})
        return rows

    def write_skipped(self) -> None:
        """run_dir/skipped.jsonl: one line per skipped training row (none written when nothing was skipped)."""
        rows = self.skipped_rows() if self.lead else []
        if rows:
            (self.run_dir / "skipped.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def _check(self, step: int, sums, row_ids) -> dict:
        host = {k: float(v) for k, v in jax.device_get(sums).items()}
        if not all(math.isfinite(v) for v in host.values()):
            bad = [k for k, v in host.items() if not math.isfinite(v)]
            where = f" (host {jax.process_index()}'s share)" if jax.process_count() > 1 else ""
            raise NonFiniteError(f"step {step}: {', '.join(bad)} became NaN/inf; the batch held rows{where} "
                                 f"{', '.join(row_ids)}")
        return report(self.objective, host)

    # --- evaluation and outputs --------------------------------------------------------------------------------

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


def _sync_hosts(name: str) -> None:
    """All hosts wait here for each other (nothing on one host)."""
    if jax.process_count() > 1:
        from jax.experimental.multihost_utils import sync_global_devices

        sync_global_devices(name)


def _over_hosts(*counts: int) -> tuple[int, ...]:
    """Per-host counts summed over every host (one small all-gather; the counts themselves on one host)."""
    if jax.process_count() == 1:
        return counts
    from jax.experimental.multihost_utils import process_allgather

    return tuple(int(x) for x in np.asarray(process_allgather(np.asarray(counts, np.int64))).sum(axis=0))


def _mean(rows: list[dict]) -> dict:
    keys = rows[0].keys()
    return {k: float(np.mean([r[k] for r in rows])) for k in keys}
