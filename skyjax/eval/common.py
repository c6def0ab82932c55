"""Shared pieces of the pairwise reward-model benchmarks (VL-RewardBench, RewardBench).

Reading rows with errors that name the file and line (JSONL) or row (parquet), the accuracy rule (a pair is correct
only when score(chosen) > score(rejected); a tie is wrong), score validation, batching a model's scorer, JSON output.
The benchmark modules hold only what differs between benchmarks: fields, grouping and the weighting of the metric.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# A model's scorer: given a batch of preference records (the project's record format), return one
# (score_chosen, score_rejected) pair per record, as a list of pairs or an array of shape (n, 2).
PairScorer = Callable[[list[dict]], Any]


class BenchmarkFormatError(ValueError):
    """A benchmark file is malformed; the message names the file and the line (JSONL) or row (parquet)."""


def location(path: str | os.PathLike, line: int, *, parquet: bool = False) -> str:
    """Where a row came from, for error messages: ``"data.jsonl, line 3"`` or ``"x.parquet, row 3"`` (1-based)."""
    return f"{os.fspath(path)}, {'row' if parquet else 'line'} {line}"


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` for each non-blank line of a JSONL file (1-based line numbers)."""
    with open(path, encoding="utf-8") as f:
        for lineno, text in enumerate(f, start=1):
            if not text.strip():
                continue  # a trailing blank line is common and harmless
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise BenchmarkFormatError(
                    f"{location(path, lineno)}: invalid JSON ({e.msg} at column {e.colno})"
                ) from None
            if not isinstance(row, dict):
                raise BenchmarkFormatError(
                    f"{location(path, lineno)}: expected a JSON object, got {type(row).__name__}"
                )
            yield lineno, row


def read_parquet_rows(path: str | os.PathLike) -> list[dict]:
    """All rows of a parquet file as dicts. pyarrow is optional: only this reader needs it."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(
            f"reading the parquet file {os.fspath(path)} needs pyarrow, which is not installed; "
            "run `pip install pyarrow`, or pass the benchmark's JSONL file instead"
        ) from None
    return pq.read_table(path).to_pylist()


def data_shards(path: str | os.PathLike) -> list[Path]:
    """The files a benchmark path stands for: itself, or a folder's parquet shards in sorted order."""
    path = Path(path)
    if path.is_dir():
        shards = sorted(path.rglob("*.parquet"))
        if not shards:
            raise FileNotFoundError(f"{path}: folder holds no .parquet files")
        return shards
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    return [path]


def read_rows(path: str | os.PathLike) -> Iterator[tuple[str, int, dict]]:
    """Yield ``(source_file, line_or_row, row)`` from a JSONL file, a parquet file, or a folder of parquet shards.

    The kind is chosen by suffix: ``.parquet`` is parquet, anything else is JSONL. A folder (the Hugging Face
    dataset layout, e.g. ``data/test-00000-of-00001.parquet``) is read shard by shard in sorted order.
    """
    for shard in data_shards(path):
        if shard.suffix == ".parquet":
            # Rows are numbered from 1 like lines, so "row 1" is the first row of the shard.
            for n, row in enumerate(read_parquet_rows(shard), start=1):
                yield str(shard), n, row
        else:
            for n, row in read_jsonl(shard):
                yield str(shard), n, row


def is_parquet(source: str) -> bool:
    return source.endswith(".parquet")


def require(row: dict, key: str, where: str) -> Any:
    """``row[key]``, or a BenchmarkFormatError naming the key and the row's location."""
    if key not in row:
        raise BenchmarkFormatError(f"{where}: missing key {key!r} (present: {sorted(row)})")
    return row[key]


def require_str(row: dict, key: str, where: str) -> str:
    value = require(row, key, where)
    if not isinstance(value, str):
        raise BenchmarkFormatError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    return value


def is_correct(score_chosen: float, score_rejected: float) -> bool:
    """The benchmarks' rule: strictly greater; a tie counts as wrong (a constant scorer gets 0, not 50%)."""
    return score_chosen > score_rejected


def check_scores(ids: Sequence[str], score_chosen: Any, score_rejected: Any,
                 wheres: Sequence[str] | None = None) -> tuple[list[float], list[float]]:
    """Validate one (chosen, rejected) score per item and return them as Python floats.

    Accepts lists, numpy or jax arrays. Raises ValueError on a length mismatch or a non-finite score (NaN or
    infinity), naming the row's id (and where it came from), since a NaN would silently compare as "wrong".
    """
    chosen = np.asarray(score_chosen, dtype=np.float64).reshape(-1)
    rejected = np.asarray(score_rejected, dtype=np.float64).reshape(-1)
    if not (len(chosen) == len(rejected) == len(ids)):
        raise ValueError(
            f"got {len(ids)} items but {len(chosen)} chosen scores and {len(rejected)} rejected scores"
        )
    for i, (c, r) in enumerate(zip(chosen, rejected)):
        if not (math.isfinite(c) and math.isfinite(r)):
            at = f" ({wheres[i]})" if wheres is not None else ""
            raise ValueError(
                f"row id {ids[i]!r}{at}: non-finite score (chosen={c}, rejected={r}); the model produced NaN/inf"
            )
    return chosen.tolist(), rejected.tolist()


def accuracy(correct: Sequence[bool]) -> float | None:
    """Fraction correct in [0, 1], or None for an empty group (so absent groups are not averaged as 0)."""
    return sum(correct) / len(correct) if correct else None


def score_in_batches(records: Sequence[dict], scorer: PairScorer, batch_size: int = 16) -> tuple[list[float], list[float]]:
    """Run ``scorer`` over ``records`` in batches and split its (chosen, rejected) pairs into two lists."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    chosen: list[float] = []
    rejected: list[float] = []
    for start in range(0, len(records), batch_size):
        batch = list(records[start:start + batch_size])
        pairs = np.asarray(scorer(batch), dtype=np.float64)
        if pairs.shape != (len(batch), 2):
            raise ValueError(
                f"scorer returned shape {pairs.shape} for a batch of {len(batch)}; expected ({len(batch)}, 2) "
                "(one (score_chosen, score_rejected) pair per record)"
            )
        chosen.extend(pairs[:, 0].tolist())
        rejected.extend(pairs[:, 1].tolist())
    return chosen, rejected


def write_json(result: dict, path: str | os.PathLike) -> None:
    """Write a summary/result dict as indented JSON (strict: NaN is rejected earlier, so never written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n", encoding="utf-8")
