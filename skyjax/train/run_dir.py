"""Who owns a run folder: a fresh start moves the previous run aside, a resume refuses a changed config.

A run folder holds one run: `checkpoints/` (the training checkpoints, resumed automatically), `config.json`,
`metrics.jsonl`, `skipped.jsonl`, `completions.jsonl` (kind grpo), `tensorboard/` and, once it finished,
`checkpoint/`, `hf/` and `summary.json`.

- `--no-resume` (a fresh start) moves everything an earlier run left into `previous-<UTC timestamp>/` inside the
  folder, and says so: no old checkpoint can later be resumed by mistake, no old output passes for the new run's, and
  nothing is deleted.
- A resume (the default, when `checkpoints/` holds a step) compares the config with the saved `config.json`. Only
  the step budget (`trainer.steps`, `trainer.epochs`) and settings that do not change what is trained may differ
  (`RESUMABLE_KEYS`: logging, evaluation and checkpoint cadence, the export switch, held-out files, the mesh shape:
  checkpoints restore onto any mesh). Any other difference (a learning rate, a data file, a model setting) is a
  `ConfigError` listing the keys, old -> new: rerun with `--no-resume` or choose another `--run-dir`.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from skyjax.config import ConfigError

# What an earlier run leaves in its folder (moved aside by a fresh start).
RUN_OUTPUTS = ("checkpoints", "checkpoint", "hf", "summary.json", "metrics.jsonl", "skipped.jsonl", "tensorboard",
               "config.json", "completions.jsonl")
# Keys a resumed run may change: its step budget, and what does not change the trained weights (a key ending in '.'
# covers its whole section).
RESUMABLE_KEYS = ("trainer.steps", "trainer.epochs", "trainer.resume_step", "trainer.log_every", "trainer.eval_every",
                  "trainer.save_every", "trainer.keep_checkpoints", "trainer.async_checkpointing", "trainer.export",
                  "trainer.progress", "trainer.eval_batch_size", "data.eval", "mesh.",
                  "rollout.log_completions_every")


def saved_steps(checkpoints: Path) -> list[int]:
    """Steps of the finished training checkpoints in `checkpoints/` (orbax folders named by step; an unfinished
    save is a temporary folder with another name)."""
    if not checkpoints.is_dir():
        return []
    return sorted(int(p.name) for p in checkpoints.iterdir() if p.is_dir() and p.name.isdigit())


def flat_config(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted.key: value} of a config dict (lists are values)."""
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flat_config(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def _resumable(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_KEYS)


def config_changes(saved: dict, current: dict) -> list[str]:
    """'key: old -> new' for every key that differs between two config dicts and may not change on resume."""
    old, new = flat_config(saved), flat_config(current)
    missing = object()
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, missing), new.get(key, missing)
        if a != b and not _resumable(key):
            show = lambda v: "(absent)" if v is missing else json.dumps(v)  # noqa: E731
            changes.append(f"{key}: {show(a)} -> {show(b)}")
    return changes


def move_previous_run(run_dir: Path) -> Path | None:
    """Move what an earlier run left in `run_dir` into run_dir/previous-<UTC timestamp>/; returns that folder."""
    found = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if not found:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    dest, n = run_dir / f"previous-{stamp}", 1
    while dest.exists():
        n += 1
        dest = run_dir / f"previous-{stamp}-{n}"
    dest.mkdir()
    for name in found:
        shutil.move(str(run_dir / name), str(dest / name))
    return dest


def check_resume(run_dir: Path, config: dict, *, resume: bool, normalize: Callable[[dict], dict] | None = None
                 ) -> None:
    """A `ConfigError` when a resume would continue checkpoints saved with another config (module docstring).
    `normalize` rebuilds the saved config with today's defaults (a key added since it was written is no change)."""
    if not resume or not saved_steps(run_dir / "checkpoints"):
        return
    saved = run_dir / "config.json"
    if not saved.is_file():
        return
    try:
        previous = json.loads(saved.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{saved}: unreadable ({e}); rerun with --no-resume (the old run is moved aside) or "
                          f"choose another --run-dir") from None
    if normalize is not None:
        try:
            previous = normalize(previous)
        except (ConfigError, TypeError, ValueError):  # a key since removed: compare as written
            pass
    changes = config_changes(previous, config)
    if changes:
        raise ConfigError(
            f"{run_dir} holds checkpoints of a run with another config ({'; '.join(changes)}); a resume may change "
            f"only the step budget (trainer.steps) and bookkeeping: rerun with --no-resume to start afresh (the old "
            f"run is moved aside) or choose another --run-dir")


def claim_run_dir(run_dir: Path, config: dict, *, resume: bool, log: Callable[[str], None] = print,
                  normalize: Callable[[dict], dict] | None = None) -> None:
    """Make `run_dir` this run's (module docstring) and write its config.json. On several hosts every host calls
    `check_resume` first and the lead host alone this."""
    run_dir.mkdir(parents=True, exist_ok=True)
    check_resume(run_dir, config, resume=resume, normalize=normalize)
    if not resume:
        moved = move_previous_run(run_dir)
        if moved is not None:
            log(f"--no-resume: moved the previous run's files ({', '.join(p.name for p in sorted(moved.iterdir()))}) "
                f"to {moved}")
    (run_dir / "config.json").write_text(json.dumps(config, indent=2))
