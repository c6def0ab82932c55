"""`skyjax iterate CONFIG.yaml [dotted.key=value ...] --run-dir DIR`: Skywork R1V's iterative SFT
(docs/iterative_sft.md).

    stage 1   M0 = SFT on every training row
    round t   every row gets a score level 0..5; D_rm(tau_t) = rows scoring at least tau_t; E_{t-1} = rows whose
              question M_{t-1} answers wrongly (greedy generation + skyjax.eval.verifiers against the row's answer);
              M_t = SFT from M_{t-1}'s checkpoint on D_rm(tau_t) | E_{t-1} with round t's learning rate

Each step writes its output into the run folder as it finishes (through a temporary file, or an append-only log
for the long ones), and a rerun skips what is there: a killed job resumes at the round and the stage where it
stopped, and inside a round's training at the trainer's last checkpoint. Optional self-distillation
(skyjax.rl.distill_run) rebuilds the training rows with the current model before stage 1 and before every round.

The job is `iterate(cfg, run_dir)`; SFT runs through `skyjax.train.cli.train`, generation through
`skyjax.rl.generation.model_generator`, reward-model scores through `skyjax.eval.scorer.RewardScorer`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from skyjax.config import ConfigError, from_dict, load_config, to_dict
from skyjax.errors import PREEMPTED_EXIT_STATUS, Preempted, UserError
from skyjax.train.config import RunConfig
from skyjax.train.iterate_config import (LEVELS, RESUMABLE_KEYS, DistillConfig, GenerationConfig,  # noqa: F401
                                         IterateConfig, JudgeConfig, ScoreConfig)


class IterateError(UserError):
    """A data or setting problem found while the job runs (a row without an answer, a judge failure, ...)."""


class Stopped(Preempted):
    """SIGTERM / Ctrl-C outside a round's training: the finished stages are kept; rerun to resume (status 143)."""

    def __init__(self, signum: int, where: str, run_dir: Path):
        self.signum, self.step, self.checkpoints = signum, None, None
        Exception.__init__(self, f"{signal.Signals(signum).name}: stopped during {where}; what finished is kept in "
                                 f"{run_dir}: rerun the same command to resume (exit status {PREEMPTED_EXIT_STATUS})")


# ------------------------------------------------------------------------------------------------------------ rows


@dataclasses.dataclass(frozen=True)
class Sample:
    """One training or held-out row: the question (the turns before the first answer), its ground truth (the row's
    `answer`, else the final answer of its first assistant turn), and the row as a round's data file holds it."""

    key: str
    obj: dict  # the row, image paths absolute
    record: Any  # skyjax.data.records.Record
    question: tuple[dict, ...]
    truth: str
    where: str

    def question_text(self) -> str:
        parts = []
        for m in self.question:
            if m["role"] != "user":
                continue
            content = m["content"]
            parts.extend([content] if isinstance(content, str) else
                         [p.get("text") or "" for p in content if p.get("type") == "text"])
        return "\n".join(p for p in parts if p).strip()


def _text(content) -> str:
    if isinstance(content, str):
        return content
    return "".join(p.get("text") or "" for p in content if p.get("type") == "text")


def truth_of(record) -> str | None:
    """The row's `answer`; else the final answer of its first assistant turn (the text after a think block, a
    `\\boxed{}` or `Answer:` line), else that turn's whole text."""
    from skyjax.eval.verifiers import extract_answer

    if record.answer is not None and str(record.answer).strip():
        return str(record.answer).strip()
    conv, _ = record.sft_conversation()
    first = next((m for m in conv if m["role"] == "assistant"), None)
    if first is None:
        return None
    text = _text(first["content"]).strip()
    return (extract_answer(text) or text).strip() or None


def read_samples(paths: Sequence[str | Path], kind: str = "sft") -> list[Sample]:
    """Every row of the JSONL files (SFT rows: `messages`, or `prompt` + `completion`), keyed by its `id` (else
    file name:line); a row without a ground truth, or a key seen twice, is an error naming file:line."""
    from skyjax.data.records import RecordReader

    samples: list[Sample] = []
    seen: dict[str, str] = {}
    for path in paths:
        path = Path(path)
        for record in RecordReader(path, kind=kind, on_error="raise"):
            where = f"{path}:{record.line}"
            key = str(record.id) if record.id is not None else f"{path.name}:{record.line}"
            if key in seen:
                raise IterateError(f"{where}: row key {key!r} also names {seen[key]}: give rows unique ids")
            seen[key] = where
            truth = truth_of(record)
            if not truth:
                raise IterateError(f"{where}: no ground truth: give the row an 'answer' or an assistant answer")
            if record.messages is not None:
                conv = [m.to_dict() for m in record.messages]
                question = conv[: next(i for i, m in enumerate(conv) if m["role"] == "assistant")]
            else:
                question = record.conversation()
            if not any(m["role"] == "user" for m in question):
                raise IterateError(f"{where}: the question (the turns before the first answer) has no user turn")
            samples.append(Sample(key, _row_object(record), record, tuple(question), truth, where))
    return samples


def _row_object(record) -> dict:
    """The record as a JSONL row of its own kind, image paths absolute (a round's data file lives elsewhere)."""
    obj: dict[str, Any] = {}
    if record.images:
        obj["images"] = [str(Path(p).resolve()) if "://" not in p else p for p in record.images]
    if record.messages is not None:
        obj["messages"] = [m.to_dict() for m in record.messages]
    else:
        obj["prompt"] = [m.to_dict() for m in record.prompt]
        obj["completion"] = [m.to_dict() for m in record.completion]
    for key in ("answer", "id", "meta"):
        value = getattr(record, key)
        if value is not None:
            obj[key] = value
    return obj


def _choices(sample: Sample, key: str):
    return (sample.record.meta or {}).get(key)


def _images(sample: Sample) -> tuple:
    from skyjax.data.qwen_vl_image import load_image

    try:
        return tuple(load_image(p) for p in sample.record.images)
    except Exception as e:  # noqa: BLE001 -- a missing or corrupt image, named with its row
        raise IterateError(f"{sample.where}: {e}") from e


# ------------------------------------------------------------------------------------------------------ score levels


def score_levels(raw: Sequence[float], levels: str = "quantiles", thresholds: Sequence[float] = (),
                 groups: Sequence | None = None) -> np.ndarray:
    """Levels 0..5 of raw scores: `thresholds` = how many of the five ascending cut points a score reaches;
    `quantiles` = floor(6 * (scores strictly below it) / n), six equal-count bins in which equal scores share the
    lower bin, over all scores or, with `groups` (one label per score), within each group."""
    x = np.asarray(raw, np.float64).reshape(-1)
    if not np.all(np.isfinite(x)):
        raise IterateError("a score is NaN or infinite")
    if levels == "thresholds":
        return np.sum(x[:, None] >= np.asarray(thresholds, np.float64)[None, :], axis=1).astype(np.int64)
    out = np.zeros(len(x), np.int64)
    labels = np.zeros(len(x), np.int64) if groups is None else np.unique(np.asarray(groups, object).astype(str),
                                                                          return_inverse=True)[1]
    for g in np.unique(labels):
        sel = np.flatnonzero(labels == g)
        below = np.searchsorted(np.sort(x[sel]), x[sel], side="left")
        out[sel] = np.minimum(LEVELS - 1, (LEVELS * below) // len(sel))
    return out


# -------------------------------------------------------------------------------------------------------- the files


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _write_jsonl(path: Path, rows) -> None:
    _write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


class _AboveBar(io.TextIOBase):
    """stderr while the trainer runs: its lines are printed above the job's bar instead of through it."""

    def __init__(self, bar):
        self.bar, self.buf = bar, ""

    def write(self, s: str) -> int:
        self.buf += s
        while "\n" in self.buf:
            line, self.buf = self.buf.split("\n", 1)
            if line.strip():
                self.bar.write(line)
        return len(s)


# ---------------------------------------------------------------------------------------------------------- the job


class IterativeSFT:
    """The job over one run folder (module docstring); `run()` returns the summary."""

    def __init__(self, cfg: IterateConfig, run_dir: str | Path, *, resume: bool = True,
                 log: Callable[[str], None] | None = None):
        self.cfg, self.run_dir = cfg, Path(run_dir).resolve()
        self._log = log
        self.where = "set-up"
        self.bar = None
        self._claim(resume)

    # --- the run folder ---------------------------------------------------------------------------------------

    def _claim(self, resume: bool) -> None:
        """Make the folder this job's: a fresh start moves an earlier job aside; a resume refuses a changed config
        (RESUMABLE_KEYS may change; the schedule of a round that started may not)."""
        from skyjax.train.run_dir import flat_config

        self.run_dir.mkdir(parents=True, exist_ok=True)
        saved_path = self.run_dir / "iterate.json"
        current = to_dict(self.cfg)
        if resume and saved_path.is_file():
            try:
                saved = to_dict(from_dict(IterateConfig, json.loads(saved_path.read_text())))
            except (ConfigError, json.JSONDecodeError, TypeError, ValueError):
                saved = json.loads(saved_path.read_text())
            old, new = flat_config(saved), flat_config(current)
            missing = object()
            changes = [f"{k}: {json.dumps(old.get(k))} -> {json.dumps(new.get(k))}"
                       for k in sorted(set(old) | set(new)) if old.get(k, missing) != new.get(k, missing)
                       and not any(k == r or (r.endswith(".") and k.startswith(r)) for r in RESUMABLE_KEYS)]
            # a round that started keeps its threshold and learning rate
            started = sorted(int(p.name.split("_")[1]) for p in self.run_dir.glob("round_*")
                             if p.name.split("_")[1].isdigit() and int(p.name.split("_")[1]) > 0)
            for t in started:
                if t > min(self.cfg.rounds, saved.get("rounds", 0), len(saved.get("taus", ()))):
                    continue
                was_tau, was_lr = saved["taus"][t - 1], saved["lrs"][min(t, len(saved["lrs"])) - 1]
                if (was_tau, was_lr) != (self.cfg.tau(t), self.cfg.lr(t)):
                    changes.append(f"round {t} (started): tau {was_tau} -> {self.cfg.tau(t)}, lr {was_lr} -> "
                                   f"{self.cfg.lr(t)}")
            if changes:
                raise ConfigError(f"{self.run_dir} holds an iterate job with another config ({'; '.join(changes)}); "
                                  f"a resume may change the number of rounds, the schedule of rounds not started "
                                  f"and bookkeeping: rerun with --no-resume to start afresh (the old job is moved "
                                  f"aside) or choose another --run-dir")
        elif not resume:
            found = [p for p in sorted(self.run_dir.iterdir()) if not p.name.startswith("previous-")]
            if found:
                stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
                dest, n = self.run_dir / f"previous-{stamp}", 1
                while dest.exists():
                    n += 1
                    dest = self.run_dir / f"previous-{stamp}-{n}"
                dest.mkdir()
                for p in found:
                    shutil.move(str(p), str(dest / p.name))
                self.log(f"--no-resume: moved the previous job's files ({', '.join(p.name for p in found)}) to {dest}")
        _write_atomic(saved_path, json.dumps(current, indent=2) + "\n")

    def round_dir(self, t: int) -> Path:
        return self.run_dir / f"round_{t}"

    def log(self, message: str) -> None:
        if self._log is not None:
            self._log(message)
        elif self.bar is not None:
            self.bar.write(message)
        else:
            print(message, file=sys.stderr, flush=True)

    # --- signals ------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _stopping(self):
        """SIGTERM and SIGINT stop the job at once outside training (every finished stage is on disk; a stage in
        flight keeps its log of finished batches); the trainer handles them itself while it trains."""
        def stop(signum, frame):
            raise Stopped(signum, self.where, self.run_dir)

        previous = {}
        try:
            for signum in (signal.SIGTERM, signal.SIGINT):
                previous[signum] = signal.signal(signum, stop)
        except ValueError:  # not the main thread
            pass
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    # --- stages -------------------------------------------------------------------------------------------------

    def _plan(self) -> list[tuple[int, str]]:
        """Every (round, stage) of the job, in order: what the progress bar counts."""
        cfg, plan = self.cfg, []
        for t in range(cfg.rounds + 1):
            if cfg.distill.enabled and (t > 0 or cfg.distill.before_stage1):
                plan.append((t, "distill"))
            if t > 0 and (t == 1 or cfg.distill.enabled):
                plan.append((t, "score"))
            if t > 0:
                plan.append((t, "select"))
            plan += [(t, "train"), (t, "evaluate")]
        return plan

    def _stage(self, t: int, name: str):
        """Context of one stage: the bar's label, the stage's seconds in round t's timings.json."""
        job = self

        class Stage:
            def __enter__(self):
                job.where = f"round {t}: {name}"
                if job.bar is not None:
                    job.bar.set_description(f"iterate round {t}/{job.cfg.rounds}: {name}")
                self.t0 = time.time()
                return self

            def __exit__(self, kind, *rest):
                if kind is None:
                    path = job.round_dir(t) / "timings.json"
                    timings = _read_json(path) or {}
                    timings[name] = round(timings.get(name, 0.0) + time.time() - self.t0, 1)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    _write_atomic(path, json.dumps(timings, indent=2) + "\n")
                    if job.bar is not None:
                        job.bar.update(1)
                        job.bar.set_postfix_str("", refresh=False)
                return False

        return Stage()

    def run(self) -> dict:
        from skyjax.progress import JobProgress

        t0 = time.time()
        cfg = self.cfg
        plan = self._plan()
        self.bar = JobProgress(len(plan), "iterate", unit="stage", enabled=cfg.progress)
        try:
            with self._stopping(), self.bar:
                self.train_files, self.heldout_files = self._data_files()
                self.questions = read_samples(self.train_files)
                self.heldout = read_samples(self.heldout_files) if self.heldout_files else []
                self.log(f"iterate '{cfg.name}': {len(self.questions)} training rows, {len(self.heldout)} held-out "
                         f"rows, stage 1 + {cfg.rounds} rounds -> {self.run_dir}")
                entries = []
                for t in range(cfg.rounds + 1):
                    entries.append(self._round(t))
                    e = entries[-1]
                    acc = e["heldout_accuracy"]
                    self.log(f"round {t}: tau {e['tau']}, |D_rm| {e['d_rm']}, |E| {e['errors']}, overlap "
                             f"{e['overlap']}, {e['train_rows']} rows -> held-out accuracy "
                             f"{'-' if acc is None else f'{acc:.3f}'}")
        finally:
            self.bar = None
        summary = {"kind": "iterate", "name": cfg.name, "rounds": entries,
                   "seconds": round(sum(e["seconds"] for e in entries), 1),  # every round's, over resumed runs too
                   "seconds_this_run": round(time.time() - t0, 1), "complete": True,
                   "paths": {"run_dir": str(self.run_dir), "summary": str(self.run_dir / "summary.json"),
                             "model": entries[-1]["model"], "config": str(self.run_dir / "iterate.json")}}
        _write_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        return summary

    def _data_files(self) -> tuple[list[Path], list[Path]]:
        """The training and held-out files: data.synthetic's, generated once into run_dir/data, then the listed ones."""
        data = self.cfg.sft.data
        train, heldout = [Path(p) for p in data.train], [Path(p) for p in self.cfg.heldout]
        for p in train + heldout:
            if not p.is_file():
                raise ConfigError(f"{p} does not exist (sft.data.train / heldout)")
        syn = data.synthetic
        if syn is None:
            return train, heldout
        folder = self.run_dir / "data"
        if not (folder / "done").is_file():
            from skyjax.data.synthetic_sft import make_sft_records

            tmp = self.run_dir / "data.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            kw = dict(seed=syn.seed, image_size=syn.image_size, tasks=tuple(syn.tasks), blur=self.cfg.synthetic_blur)
            make_sft_records(tmp, "train", syn.train, **kw)
            make_sft_records(tmp, "heldout", syn.heldout, **{**kw, "seed": syn.seed + 1})
            (tmp / "done").write_text("")
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
        return [folder / "train.jsonl", *train], [folder / "heldout.jsonl", *heldout]

    # --- one round ----------------------------------------------------------------------------------------------

    def _round(self, t: int) -> dict:
        cfg, rdir = self.cfg, self.round_dir(t)
        self.where = f"round {t}"
        done = _read_json(rdir / "round.json")
        if done is not None:
            if self.bar is not None:
                self.bar.update(sum(1 for r, _ in self._plan() if r == t))
            return done
        rdir.mkdir(parents=True, exist_ok=True)
        previous = None if t == 0 else _read_json(self.round_dir(t - 1) / "round.json")
        pool = self._pool(t, previous)
        if t == 0:
            if not pool:
                raise IterateError(f"no training rows for stage 1 ({self.round_dir(0) / 'distill.jsonl'} is empty: "
                                   f"distillation kept no row)")
            selection = {"round": 0, "tau": None, "pool": len(pool), "d_rm": len(pool), "errors": 0, "overlap": 0,
                         "train_rows": len(pool), "wrong_before": None, "lr": cfg.lr(0)}
            if not (rdir / "data.jsonl").is_file():
                _write_jsonl(rdir / "data.jsonl", [s.obj for s in pool])
        else:
            levels = self._levels(t, pool)
            selection = self._select(t, pool, levels, previous)
        model, steps, trained = self._train(t, selection, previous)
        accuracy = self._evaluate(t, model)
        timings = _read_json(rdir / "timings.json") or {}
        entry = {"round": t, "tau": selection["tau"], "d_rm": selection["d_rm"], "errors": selection["errors"],
                 "overlap": selection["overlap"], "train_rows": selection["train_rows"],
                 "heldout_accuracy": accuracy["heldout"], "train_accuracy": accuracy.get("train"),
                 "wrong_before": selection["wrong_before"], "pool": selection["pool"], "lr": selection["lr"],
                 "steps": steps, "trained": trained, "seconds": round(sum(timings.values()), 1),
                 "timings": timings, "model": str(model), "data": str(rdir / "data.jsonl")}
        _write_atomic(rdir / "round.json", json.dumps(entry, indent=2) + "\n")
        return entry

    def _pool(self, t: int, previous: dict | None) -> list[Sample]:
        """The rows round t chooses from: the training rows, or their self-distilled versions."""
        cfg = self.cfg
        if not cfg.distill.enabled or (t == 0 and not cfg.distill.before_stage1):
            return self.questions
        out = self.round_dir(t) / "distill.jsonl"
        if not out.is_file():
            with self._stage(t, "distill"):
                model = (cfg.distill.model or cfg.sft.model.source) if t == 0 else previous["model"]
                self._distill(t, Path(model), out)
        elif self.bar is not None:
            self.bar.update(1)
        return read_samples([out]) if out.stat().st_size else []

    def _distill(self, t: int, model: Path, out: Path) -> None:
        from skyjax.rl.distill import DRLCConfig
        from skyjax.rl.distill_run import distill_file, read_rows
        from skyjax.sample.decode import Sampling

        d = self.cfg.distill
        self.round_dir(t).mkdir(parents=True, exist_ok=True)
        questions = self.round_dir(t) / "questions.jsonl"
        _write_jsonl(questions, [{**({"images": s.obj["images"]} if s.record.images else {}),
                                  "prompt": list(s.question), "answer": s.truth, "id": s.key,
                                  **({"meta": s.record.meta} if s.record.meta else {})} for s in self.questions])
        rows = read_rows(questions)
        loaded, tokenizer, adapter, mesh = self._load(model)
        from skyjax.parallel import use_mesh
        from skyjax.rl.generation import model_generator
        from skyjax.sample.cli import default_stop_ids

        stop = self.cfg.generation.stop_token_ids or tuple(default_stop_ids(loaded, tokenizer))
        sampling = Sampling(max_new_tokens=d.max_new_tokens, temperature=d.temperature, top_k=d.top_k,
                            top_p=d.top_p, stop_token_ids=tuple(stop), num_samples=d.num_samples)
        generate = model_generator(loaded, tokenizer, adapter, sampling, batch_size=d.batch_size, seed=d.seed)
        job = {"model": str(model.resolve()), "judge": d.judge.name, "judge_url": d.judge.url,
               "judge_model": d.judge.model, "rows": len(rows),
               **{k: getattr(d, k) for k in ("alpha", "beta", "gamma", "max_new_tokens", "temperature", "top_p",
                                             "top_k", "num_samples", "max_rewrites", "seed")}}
        total, done = 2 * len(rows), [0]

        def tick(n):
            done[0] += n
            if self.bar is not None:
                self.bar.set_postfix_str(f"{done[0]}/{total} rows", refresh=False)

        with use_mesh(mesh):
            report = distill_file(rows, d.judge.make(), DRLCConfig(alpha=d.alpha, beta=d.beta, gamma=d.gamma), out,
                                  job=job, generate_fn=generate, max_rewrites=d.max_rewrites,
                                  batch_size=d.batch_size, choices_key=self.cfg.generation.choices_key, tick=tick)
        _write_atomic(out.with_name("distill.report.json"), json.dumps(report, indent=2) + "\n")
        self.log(f"round {t}: distilled with {model}: kept {report['kept']}, rewritten {report['rewritten']}, "
                 f"dropped {report['dropped']}")

    def _levels(self, t: int, pool: list[Sample]) -> dict[str, int]:
        """Score level of every pool row (computed once without distillation: the rows do not change)."""
        cfg = self.cfg
        path = (self.round_dir(t) if cfg.distill.enabled else self.run_dir) / "scores.jsonl"
        if not path.is_file():
            with self._stage(t, "score"):
                raw, parts = self._raw_scores(pool, path)
                levels = score_levels(raw, cfg.score.levels, cfg.score.thresholds, self._groups(pool))
                _write_jsonl(path, [{"key": s.key, "raw": round(float(r), 6), "level": int(v), **p}
                                    for s, r, v, p in zip(pool, raw, levels, parts)])
        elif (t == 1 or cfg.distill.enabled) and self.bar is not None:
            self.bar.update(1)
        return {row["key"]: int(row["level"]) for row in _read_jsonl(path)}

    def _groups(self, pool: list[Sample]) -> list | None:
        key = self.cfg.score.group_by
        if key is None:
            return None
        if key == "answer":
            from skyjax.eval.verifiers import normalize_answer

            return [normalize_answer(s.truth) for s in pool]
        groups = []
        for s in pool:
            value = (s.record.meta or {}).get(key)
            if value is None:
                raise IterateError(f"{s.where}: no meta.{key} (score.group_by)")
            groups.append(json.dumps(value, sort_keys=True))
        return groups

    def _raw_scores(self, pool: list[Sample], path: Path) -> tuple[list[float], list[dict]]:
        sc = self.cfg.score
        if sc.source == "meta":
            raw = []
            for s in pool:
                value = (s.record.meta or {}).get(sc.meta_key)
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise IterateError(f"{s.where}: meta.{sc.meta_key} must be a number (score.source is meta), "
                                       f"got {value!r}")
                raw.append(float(value))
            return raw, [{} for _ in pool]
        from skyjax.eval.score_log import JobLog, partial_path

        job = {"source": sc.source, "judge": sc.judge.name, "judge_url": sc.judge.url, "judge_model": sc.judge.model,
               "reward_model": sc.reward_model, "rows": len(pool)}  # what changes a raw score (not batch sizes)
        log = JobLog(partial_path(path), job)
        try:
            done = {e["key"]: e for e in log.open()}
            todo = [s for s in pool if s.key not in done]
            if sc.source == "judge":
                self._judge(todo, log, done)
            else:
                self._reward_model(todo, log, done)
        finally:
            log.close()
        if sc.source == "judge":
            from skyjax.rl.distill import DRLCConfig
            from skyjax.rl.distill_run import Row, drlc_scores
            from skyjax.rl.judge import JudgeScores

            rows = [Row(s.record.line, {}, s.record, (), "") for s in pool]
            name = done[pool[0].key]["judge"] if pool else sc.judge.name
            scores = drlc_scores(rows, [JudgeScores(**done[s.key]["raw"]) for s in pool], name,
                                 DRLCConfig(beta=sc.beta, gamma=sc.gamma))
            raw = [(d["s_v_norm"] + sc.beta * d["s_t_norm"] + sc.gamma * d["s_i_norm"]) / (1 + sc.beta + sc.gamma)
                   for d in scores]
            parts = [{k: d[k] for k in ("s_v_norm", "s_t_norm", "s_i_norm")} for d in scores]
        else:
            raw, parts = [done[s.key]["score"] for s in pool], [{} for _ in pool]
        log.finish()
        return raw, parts

    def _judge(self, todo: list[Sample], log, done: dict) -> None:
        from skyjax.rl.judge import Query

        judge, n = self.cfg.score.judge.make(), self.cfg.score.batch_size
        for start in range(0, len(todo), n):
            chunk = todo[start: start + n]
            queries = [Query(s.question_text(), _images(s), s.truth, s.question, s.where) for s in chunk]
            scores = judge.score(queries)
            entries = [{"key": s.key, "judge": judge.name, "raw": dataclasses.asdict(x)} for s, x in zip(chunk, scores)]
            log.write(entries)
            done.update({e["key"]: e for e in entries})
            if self.bar is not None:
                self.bar.set_postfix_str(f"{len(done)} rows judged", refresh=False)

    def _reward_model(self, todo: list[Sample], log, done: dict) -> None:
        from skyjax.eval.scorer import Conversation, RewardScorer

        sc = self.cfg.score
        scorer = RewardScorer(sc.reward_model, mesh_shape=tuple(self.cfg.sft.mesh.shape),
                              batch_size=sc.reward_batch_size, max_batch_tokens=sc.reward_max_batch_tokens,
                              progress=False)
        convs = [Conversation(s.record.sft_conversation()[0], tuple(s.record.images), s.where, s.key) for s in todo]

        def logged(keys, scores):
            entries = [{"key": k, "score": float(v)} for k, v in zip(keys, scores)]
            log.write(entries)
            done.update({e["key"]: e for e in entries})
            if self.bar is not None:
                self.bar.set_postfix_str(f"{len(done)} rows scored", refresh=False)

        scorer.score_conversations(convs, on_batch=logged)

    def _select(self, t: int, pool: list[Sample], levels: dict[str, int], previous: dict) -> dict:
        """Round t's rows: D_rm(tau_t) | E_{t-1} in pool order, written to round_t/data.jsonl with the counts."""
        rdir = self.round_dir(t)
        done = _read_json(rdir / "selection.json")
        if done is not None and (rdir / "data.jsonl").is_file():
            if self.bar is not None:
                self.bar.update(1)
            return done
        wrong = self._wrong(t - 1, previous)
        with self._stage(t, "select"):
            tau = self.cfg.tau(t)
            rows, d_rm, errors, overlap = [], 0, 0, 0
            for s in pool:
                good, error = levels[s.key] >= tau, s.key in wrong
                d_rm, errors, overlap = d_rm + good, errors + error, overlap + (good and error)
                if good or error:
                    meta = {**(s.obj.get("meta") or {}), "iterate": {"key": s.key, "score": levels[s.key],
                                                                    "error": error}}
                    rows.append({**s.obj, "meta": meta})
            _write_jsonl(rdir / "data.jsonl", rows)
            selection = {"round": t, "tau": tau, "pool": len(pool), "d_rm": d_rm, "errors": errors,
                         "overlap": overlap, "train_rows": len(rows), "wrong_before": len(wrong), "lr": self.cfg.lr(t)}
            _write_atomic(rdir / "selection.json", json.dumps(selection, indent=2) + "\n")
        return selection

    def _wrong(self, t: int, entry: dict) -> set[str]:
        """The training questions M_t answers wrongly (its predictions.jsonl, made now if missing)."""
        path = self.round_dir(t) / "predictions.jsonl"
        if not path.is_file():  # rounds were added after the job had finished its last one
            self.where = f"round {t}: answers to the training questions"
            self._predict(Path(entry["model"]), [(self.questions, path)])
        return {row["key"] for row in _read_jsonl(path) if not row["correct"]}

    def round_config(self, t: int, selection: dict, previous: dict | None) -> RunConfig:
        """The SFT run config of round t: stage 1's for t = 0, else from M_{t-1}'s checkpoint on round t's rows with
        round t's learning rate and step budget. Always without the trainer's own bar (the job draws one)."""
        cfg, sft = self.cfg, self.cfg.sft
        data = dataclasses.replace(sft.data, train=(str(self.round_dir(t) / "data.jsonl"),), synthetic=None)
        trainer = dataclasses.replace(sft.trainer, progress=False)
        model = sft.model
        if t > 0:
            trainer = dataclasses.replace(trainer, steps=cfg.round_steps, epochs=cfg.round_epochs)
            model = dataclasses.replace(sft.model, source=previous["model"])
        return dataclasses.replace(sft, name=f"{cfg.name}_round{t}", model=model, data=data, trainer=trainer,
                                   optimizer=dataclasses.replace(sft.optimizer, lr=cfg.lr(t)))

    def _train(self, t: int, selection: dict, previous: dict | None) -> tuple[Path, int, bool]:
        """M_t's model folder, its steps and whether round t trained (a round without rows keeps M_{t-1})."""
        sft_dir = self.round_dir(t) / "sft"
        summary = _read_json(sft_dir / "summary.json")
        if summary is not None and summary.get("complete"):
            if self.bar is not None:
                self.bar.update(1)
            return Path(summary["paths"]["checkpoint"]), int(summary["steps"]), True
        if selection["train_rows"] == 0:
            with self._stage(t, "train"):
                self.log(f"round {t}: no rows scored >= {selection['tau']} and no errors: M_{t} = M_{t - 1}")
            return Path(previous["model"]), 0, False
        from skyjax.train.cli import train

        cfg = self.round_config(t, selection, previous)
        with self._stage(t, "train"), self._watching(sft_dir, cfg, selection["train_rows"]):
            self.where = f"round {t}: training"
            with contextlib.redirect_stderr(_AboveBar(self.bar)) if self.bar is not None else \
                    contextlib.nullcontext():
                summary = train(cfg, sft_dir, resume=True)
        return Path(summary["paths"]["checkpoint"]), int(summary["steps"]), True

    @contextlib.contextmanager
    def _watching(self, sft_dir: Path, cfg: RunConfig, rows: int):
        """The bar's postfix follows the trainer's metrics.jsonl (step, loss) while a round trains."""
        total = cfg.trainer.steps or max(int(math.ceil(cfg.trainer.epochs * max(rows // cfg.data.batch_size, 1))), 1)
        stop = threading.Event()

        def watch():
            path = sft_dir / "metrics.jsonl"
            while not stop.wait(1.0):
                try:
                    lines = path.read_text().splitlines() if path.is_file() else []
                    last = json.loads(lines[-1]) if lines else None
                except (OSError, json.JSONDecodeError, IndexError):
                    continue
                if last is not None and self.bar is not None:
                    self.bar.set_postfix_str(f"step {last.get('step')}/{total}, loss {last.get('loss', 0.0):.3f}")

        thread = threading.Thread(target=watch, daemon=True)
        if self.bar is not None and self.cfg.progress:
            thread.start()
        try:
            yield
        finally:
            stop.set()
            if thread.is_alive():
                thread.join(timeout=2.0)

    def _evaluate(self, t: int, model: Path) -> dict:
        """M_t's held-out accuracy, and (before a later round) its answers to every training question."""
        rdir = self.round_dir(t)
        jobs = []
        if self.heldout:
            jobs.append((self.heldout, rdir / "heldout.jsonl"))
        if t < self.cfg.rounds:
            jobs.append((self.questions, rdir / "predictions.jsonl"))
        if all(path.is_file() for _, path in jobs):
            if self.bar is not None:
                self.bar.update(1)
        else:
            with self._stage(t, "evaluate"):
                self._predict(model, jobs)
        out = {"heldout": None}
        for name, path in (("heldout", rdir / "heldout.jsonl"), ("train", rdir / "predictions.jsonl")):
            if path.is_file():
                rows = _read_jsonl(path)
                out[name] = round(sum(r["correct"] for r in rows) / max(len(rows), 1), 6)
        return out

    # --- the model -------------------------------------------------------------------------------------------

    def _load(self, model: Path):
        from skyjax.convert.checkpoint import load_model
        from skyjax.data.tokenizer import load_tokenizer
        from skyjax.parallel import make_mesh, use_mesh
        from skyjax.sample.adapters import adapter_for

        mesh = make_mesh(self.cfg.sft.mesh)
        with use_mesh(mesh):
            loaded = load_model(model, mesh=mesh, dtype=self.cfg.sft.model.dtype)
        return loaded, load_tokenizer(loaded.folder), adapter_for(loaded), mesh

    def _predict(self, model: Path, jobs: list[tuple[list[Sample], Path]]) -> None:
        """Greedy answers of `model` to the questions of each (samples, output file) job, verified against each
        row's truth. Each batch's answers are appended to OUTPUT.partial.jsonl as they finish (a rerun continues);
        the output is written at the end."""
        from skyjax.eval.score_log import JobLog, partial_path
        from skyjax.eval.verifiers import verify
        from skyjax.parallel import use_mesh
        from skyjax.rl.generation import GenRequest, model_generator
        from skyjax.sample.cli import default_stop_ids
        from skyjax.sample.decode import Sampling

        todo = [(samples, path) for samples, path in jobs if not path.is_file()]
        if not todo:
            return
        g = self.cfg.generation
        loaded, tokenizer, adapter, mesh = self._load(model)
        stop = g.stop_token_ids or tuple(default_stop_ids(loaded, tokenizer))
        generate = model_generator(loaded, tokenizer, adapter,
                                   Sampling(max_new_tokens=g.max_new_tokens, temperature=0.0,
                                            stop_token_ids=tuple(stop)), batch_size=g.batch_size)
        total = sum(len(samples) for samples, _ in todo)
        count = 0
        for samples, path in todo:
            job = {"model": str(model.resolve()), "rows": len(samples), "max_new_tokens": g.max_new_tokens,
                   "stop_token_ids": list(stop)}
            log = JobLog(partial_path(path), job)
            try:
                done = {e["key"]: e for e in log.open()}
                count += len(done)
                rest = [(i, s) for i, s in enumerate(samples) if s.key not in done]
                for start in range(0, len(rest), g.batch_size):
                    chunk = rest[start: start + g.batch_size]
                    requests = [GenRequest(s.question, _images(s), 1.0, i) for i, s in chunk]
                    try:
                        with use_mesh(mesh):
                            answers = generate(requests, 0)
                    except ValueError as e:  # e.g. a batch's images need more tiles than the largest bucket
                        raise IterateError(f"{self.where}: generating answers for the rows from {chunk[0][1].where} "
                                           f"in batches of generation.batch_size={g.batch_size}: {e}") from e
                    entries = []
                    for (_, s), (c,) in zip(chunk, answers):
                        try:
                            result = verify(("<think>\n" + c.text) if c.think_opened else c.text, s.truth,
                                            choices=_choices(s, g.choices_key))
                        except ValueError as e:  # a truth naming no option: a data error
                            raise IterateError(f"{s.where}: {e}") from e
                        entries.append({"key": s.key, "correct": bool(result.correct), "extracted": result.extracted,
                                        "truth": s.truth, "text": c.text, "finish_reason": c.finish_reason,
                                        "num_tokens": c.num_tokens})
                    log.write(entries)
                    done.update({e["key"]: e for e in entries})
                    count += len(chunk)
                    if self.bar is not None:
                        self.bar.set_postfix_str(f"{count}/{total} answers", refresh=False)
                _write_jsonl(path, [done[s.key] for s in samples])
                log.finish()
            finally:
                log.close()


def iterate(cfg: IterateConfig, run_dir: str | Path, *, resume: bool = True,
            log: Callable[[str], None] | None = None) -> dict:
    """Run (or resume) the iterative SFT job in `run_dir`; returns the summary (also run_dir/summary.json). A stop
    signal raises skyjax.errors.Preempted (status 143): during training once the trainer saved its checkpoint,
    elsewhere at once; no summary is written then."""
    return IterativeSFT(cfg, run_dir, resume=resume, log=log).run()


# ------------------------------------------------------------------------------------------------------ the command


EXAMPLE = """example:
  skyjax iterate configs/demo/iterative_sft.yaml --run-dir runs/iterative_sft
  skyjax iterate configs/demo/iterative_sft.yaml rounds=2 sft.trainer.steps=20 --run-dir runs/short"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "iterate", help="iterative SFT (Skywork R1V): stage 1, then rounds on D_rm(tau_t) | E_{t-1}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Stage 1 SFT on every row gives M0; round t trains M_{t-1} on the rows whose score level is at "
                    "least tau_t plus the rows M_{t-1} answers wrongly. Every round's data file, counts and held-out "
                    "accuracy go to the run folder, the rounds' table to summary.json. A stopped job resumes where "
                    "it stopped (rerun the same command); SIGTERM or Ctrl-C exits with status 143. See "
                    "docs/iterative_sft.md.\n\n" + EXAMPLE)
    p.add_argument("config", type=Path, help="iterate config (YAML): an `sft` run section, rounds, taus, lrs, score")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. rounds=2 sft.trainer.steps=50")
    p.add_argument("--run-dir", type=Path, default=None, help="output folder (default: runs/<name>)")
    p.add_argument("--no-resume", action="store_true",
                   help="start afresh: an earlier job's files in the run dir are moved into previous-<timestamp>/")
    p.set_defaults(func=run)


def run(args) -> int:
    from skyjax.parallel.mesh import expose_cpu_devices

    cfg = load_config(IterateConfig, args.config, args.overrides)
    run_dir = args.run_dir or Path("runs") / cfg.name
    if args.run_dir is None:
        print(f"--run-dir not given: writing to {run_dir}", file=sys.stderr)
    expose_cpu_devices(cfg.sft.mesh)
    try:
        summary = iterate(cfg, run_dir, resume=not args.no_resume)
    except ValueError as e:  # a judge failure, a bad multiple-choice truth, another job's partial file: one line
        if isinstance(e, UserError):
            raise
        raise IterateError(str(e)) from e
    print(format_summary(summary))
    return 0


def format_summary(summary: dict) -> str:
    lines = [f"{summary['name']} (iterate): {len(summary['rounds']) - 1} rounds in {summary['seconds']:.0f} s",
             f"  {'round':>5} {'tau':>4} {'d_rm':>6} {'errors':>6} {'overlap':>7} {'rows':>6} {'steps':>6} "
             f"{'held-out':>8} {'seconds':>8}"]
    for e in summary["rounds"]:
        acc = "-" if e["heldout_accuracy"] is None else f"{e['heldout_accuracy']:.3f}"
        lines.append(f"  {e['round']:>5} {'-' if e['tau'] is None else e['tau']:>4} {e['d_rm']:>6} {e['errors']:>6} "
                     f"{e['overlap']:>7} {e['train_rows']:>6} {e['steps']:>6} {acc:>8} {e['seconds']:>8.0f}")
    lines.append(f"wrote {summary['paths']['summary']}; the last model: {summary['paths']['model']}")
    return "\n".join(lines)
