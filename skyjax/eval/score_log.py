"""Resumable logs of finished work: `skyjax score` and `skyjax eval` append each batch's scores as they are
computed (flushed), so a crash or an interrupt loses at most the batch in flight, and rerunning the same command
continues where it stopped; `skyjax distill` and `skyjax iterate` log their per-row results the same way (`JobLog`).

The log is JSONL beside the output (`<out>.partial.jsonl`): a header naming the job, then one line per finished
item; a score log's lines are `{"key": [line, "chosen"], "score": 0.25}`. When the job ends, its final output is
written and the log is deleted. A log of another job (other data file, model, dtype or limits) is refused, not mixed
in; a torn last line (the process died while writing it) is ignored.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Hashable, Iterable


class ResumeError(ValueError):
    """A log that does not belong to this job."""


def partial_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".partial.jsonl")


def job_identity(data: str | os.PathLike, model: str | os.PathLike, **settings: Any) -> dict:
    """What must match for a log to be resumed: the data file (path, size, mtime), the model folder, settings."""
    return {**file_identity(data), "model": str(Path(model).resolve()), **settings}


def file_identity(data: str | os.PathLike) -> dict:
    """A data file as a log's header names it: its absolute path, size and modification time (an edited file is
    another job's)."""
    data = Path(data).resolve()
    st = data.stat() if data.is_file() else None
    return {"data": str(data), "data_bytes": st.st_size if st else None,
            "data_mtime": int(st.st_mtime) if st else None}


def _key(value: Any) -> Hashable:
    return tuple(value) if isinstance(value, list) else value


class JobLog:
    """A header `{"job": ...}` then one JSON object per finished item, appended and flushed batch by batch."""

    what = "partial results"  # how errors name the log's contents

    def __init__(self, path: str | os.PathLike, job: dict):
        self.path = Path(path)
        self.job = json.loads(json.dumps(job))  # as it reads back
        self._file = None

    def open(self) -> list[dict]:
        """The entries already logged (none for a new job); then the log is open for appending."""
        entries: list[dict] = []
        if self.path.is_file():
            with self.path.open(encoding="utf-8") as f:
                lines = f.read().split("\n")
            try:
                header = json.loads(lines[0])["job"]
            except (json.JSONDecodeError, KeyError, TypeError):
                header = None
            if header != self.job:
                raise ResumeError(
                    f"{self.path} holds {self.what} of another job ({_differs(header, self.job)}); delete it to "
                    f"start over, or rerun the command that wrote it to finish that job")
            for text in lines[1:]:
                try:
                    entry = json.loads(text)
                except json.JSONDecodeError:
                    continue  # a torn last line
                if isinstance(entry, dict):
                    entries.append(entry)
            self._file = self.path.open("a", encoding="utf-8")
            if lines[-1]:  # the torn line ends without a newline: start clean
                self._file.write("\n")
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("w", encoding="utf-8")
            self._file.write(json.dumps({"job": self.job}) + "\n")
        self._file.flush()
        return entries

    def write(self, entries: Iterable[dict]) -> None:
        self._file.write("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def finish(self) -> None:
        """The job's output is written: the log is no longer needed."""
        self.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> "JobLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ScoreLog(JobLog):
    what = "partial scores"

    def __init__(self, out: str | os.PathLike, job: dict):
        super().__init__(partial_path(out), job)

    def open(self) -> dict[Hashable, float]:  # type: ignore[override]
        """Scores already logged (empty for a new job); then the log is open for appending."""
        done: dict[Hashable, float] = {}
        for entry in super().open():
            try:
                done[_key(entry["key"])] = float(entry["score"])
            except (KeyError, TypeError, ValueError):
                continue
        return done

    def append(self, keys: Iterable[Hashable], scores: Iterable[float]) -> None:
        self.write({"key": list(k) if isinstance(k, tuple) else k, "score": s} for k, s in zip(keys, scores))


def _differs(old: dict | None, new: dict) -> str:
    if not isinstance(old, dict):
        return "unreadable header"
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return ", ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in keys[:3])
