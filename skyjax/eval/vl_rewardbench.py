"""VL-RewardBench (MMInstruction/VL-RewardBench): reading, pair construction and the exact metric.

The model is not called here directly: ``summarize`` takes the scores, and ``evaluate`` takes a scorer callable
(see ``common.PairScorer``) that maps preference records to (score_chosen, score_rejected) pairs.

Data: the benchmark's own ``data.jsonl`` (``image_path`` relative to the benchmark root, images shipped separately)
or the Hugging Face parquet layout (an ``image`` column holding ``{"bytes": ..., "path": ...}``).
Label: ``human_ranking[i]`` is the rank of ``response[i]``; rank 0 is preferred, so
``chosen = response[ranking.index(0)]`` and ``rejected = response[ranking.index(1)]``.
Metric: a pair is correct when score(chosen) > score(rejected) (ties are wrong). ``overall`` = Σcorrect/Σtotal;
``macro`` = mean of the group accuracies (general, hallucination, reasoning). All accuracies are fractions in
[0, 1]; ``format_table`` prints them as percentages (the paper reports Overall 73.1 / Macro 69.0 that way).
Note: ids are not unique in the released file (18 reasoning ids occur twice, as different pairs), so rows are
kept in file order and results are matched to items by position, never by id.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from skyjax.eval.common import (
    BenchmarkFormatError,
    PairScorer,
    accuracy,
    check_scores,
    is_correct,
    is_parquet,
    location,
    read_rows,
    require,
    require_str,
    score_in_batches,
)

GROUPS = ("general", "hallucination", "reasoning")

# id prefix -> sub-set, in match order (benchmarks.md table; the same split as the image folders in data.jsonl).
_PREFIX_SUBSET = (
    ("RLAIF", "rlaif-v"),
    ("RLHF", "rlhf-v"),
    ("hallucination", "povid"),
    ("mathverse", "reasoning_tasks"),
    ("mmmu", "reasoning_tasks"),
    ("wildvision", "wildvision-battle"),
)
_OTHER_SUBSET = "vlfeedback"  # everything else (LRVInstruction, jailbreak, politics, svit ids)

SUBSET_GROUP = {
    "rlaif-v": "hallucination",
    "rlhf-v": "hallucination",
    "povid": "hallucination",
    "reasoning_tasks": "reasoning",
    "wildvision-battle": "general",
    "vlfeedback": "general",
}


def subset_of(item_id: str) -> str:
    """The VL-RewardBench sub-set of a row, from its id prefix (case-sensitive, as in the benchmark's code)."""
    for prefix, subset in _PREFIX_SUBSET:
        if item_id.startswith(prefix):
            return subset
    return _OTHER_SUBSET


def group_of(item_id: str) -> str:
    """The metric group of a row ("general", "hallucination" or "reasoning"), from its id prefix."""
    return SUBSET_GROUP[subset_of(item_id)]


@dataclass(frozen=True)
class VLRewardBenchItem:
    """One preference pair. ``image_path`` is relative to the benchmark root (JSONL) or the parquet's stored
    name (may be None); ``image_bytes`` holds the encoded image when the source carried it (parquet).
    ``line`` is the 1-based line (JSONL) or row (parquet) in ``source``."""

    id: str
    group: str
    subset: str
    query: str
    chosen: str
    rejected: str
    image_path: str | None
    image_bytes: bytes | None = field(default=None, repr=False)
    line: int = 0
    source: str = ""
    chosen_model: str | None = None
    rejected_model: str | None = None

    @property
    def where(self) -> str:
        return location(self.source, self.line, parquet=is_parquet(self.source))


def _ranking(row: dict, where: str) -> list[int]:
    ranking = require(row, "human_ranking", where)
    # bool is an int subclass; [False, True] is not a ranking.
    if (not isinstance(ranking, (list, tuple)) or len(ranking) != 2
            or any(isinstance(r, bool) or not isinstance(r, int) for r in ranking)
            or sorted(ranking) != [0, 1]):
        raise BenchmarkFormatError(f"{where}: 'human_ranking' must be a permutation of [0, 1], got {ranking!r}")
    return list(ranking)


def _image(row: dict, where: str) -> tuple[str | None, bytes | None]:
    """(image_path, image_bytes) from ``image_path`` (benchmark JSONL) and/or ``image`` (HF: dict, path or bytes)."""
    path, data = None, None
    image = row.get("image")
    if isinstance(image, dict):
        path, data = image.get("path"), image.get("bytes")
    elif isinstance(image, str):
        path = image
    elif isinstance(image, (bytes, bytearray)):
        data = bytes(image)
    elif image is not None:
        raise BenchmarkFormatError(f"{where}: 'image' must be a dict with bytes/path, a path or bytes")
    if row.get("image_path") is not None:
        path = require_str(row, "image_path", where)  # the benchmark's own relative path wins
    if path is None and not data:
        raise BenchmarkFormatError(f"{where}: missing key 'image_path' (or an 'image' with bytes or a path)")
    return path, (bytes(data) if data else None)


def parse_row(row: dict, source: str, line: int, images_dir: str | os.PathLike | None = None,
              check_images: bool = True) -> VLRewardBenchItem:
    """Turn one benchmark row (JSONL or parquet layout) into an item; errors name ``source`` and ``line``."""
    where = location(source, line, parquet=is_parquet(source))
    item_id = str(require(row, "id", where))
    query = require_str(row, "query", where)
    response = require(row, "response", where)
    if not isinstance(response, (list, tuple)) or len(response) != 2:
        got = len(response) if isinstance(response, (list, tuple)) else type(response).__name__
        raise BenchmarkFormatError(f"{where}: 'response' must be a list of 2 responses, got {got}")
    if not all(isinstance(r, str) for r in response):
        raise BenchmarkFormatError(f"{where}: both 'response' entries must be strings")
    ranking = _ranking(row, where)
    best, other = ranking.index(0), ranking.index(1)
    image_path, image_bytes = _image(row, where)
    if images_dir is not None and check_images and image_bytes is None:
        full = Path(images_dir) / image_path
        if not full.is_file():
            raise BenchmarkFormatError(f"{where}: image {image_path!r} not found (looked for {full})")
    models = row.get("models")
    has_models = isinstance(models, (list, tuple)) and len(models) == 2
    return VLRewardBenchItem(
        id=item_id, group=group_of(item_id), subset=subset_of(item_id), query=query,
        chosen=response[best], rejected=response[other], image_path=image_path, image_bytes=image_bytes,
        line=line, source=source,
        chosen_model=models[best] if has_models else None, rejected_model=models[other] if has_models else None,
    )


def load_vl_rewardbench(path: str | os.PathLike, images_dir: str | os.PathLike | None = None, *,
                        check_images: bool = True) -> list[VLRewardBenchItem]:
    """Read VL-RewardBench from its ``data.jsonl``, a parquet file, or a folder of parquet shards (HF layout).

    ``images_dir`` is the benchmark root holding ``images/...`` (the JSONL's ``image_path`` is relative to it).
    When it is given and ``check_images`` is true, every row without embedded image bytes must have its image file
    there. Reading parquet needs pyarrow (optional; a clear ImportError says to ``pip install pyarrow``).
    """
    return [parse_row(row, source, line, images_dir, check_images) for source, line, row in read_rows(path)]


_MAGIC = ((b"\x89PNG", ".png"), (b"\xff\xd8", ".jpg"), (b"GIF8", ".gif"), (b"BM", ".bmp"))


def _image_name(item: VLRewardBenchItem) -> str:
    """Relative file name for an item's image: its own path, else one derived from id + line (ids repeat)."""
    # A stored path is used as is unless it could escape images_dir (absolute, or with "..").
    if item.image_path and not os.path.isabs(item.image_path) and ".." not in Path(item.image_path).parts:
        return item.image_path
    ext = next((e for magic, e in _MAGIC if item.image_bytes.startswith(magic)), None)
    if ext is None:
        ext = ".webp" if item.image_bytes[8:12] == b"WEBP" else ".img"
    return f"images/{item.subset}/{item.id}-{item.line}{ext}"


def to_preference_records(items: Iterable[VLRewardBenchItem],
                          images_dir: str | os.PathLike | None = None) -> list[dict]:
    """Rows in the project's preference-record format (TRL conversational style), one per item, in order.

    Each record's ``images`` is ``[images_dir / image_path]`` (or ``image_path`` unchanged when ``images_dir`` is
    None); record paths are read relative to the folder of the JSONL they are written to, so pass ``images_dir``
    relative to that folder, or absolute. Items carrying image bytes (parquet) are written under ``images_dir``
    when the file is not already there, so that the records point at real files.
    """
    records = []
    for item in items:
        rel = _image_name(item) if item.image_bytes is not None else item.image_path
        if images_dir is None:
            if item.image_bytes is not None:
                raise ValueError(f"{item.where}: image bytes need an images_dir to be written to")
            image = rel
        else:
            image = os.path.join(os.fspath(images_dir), rel)
            if item.image_bytes is not None and not os.path.exists(image):
                os.makedirs(os.path.dirname(image) or ".", exist_ok=True)
                Path(image).write_bytes(item.image_bytes)
        records.append({
            "id": item.id,
            "images": [image],
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": item.query}]}],
            "chosen": [{"role": "assistant", "content": item.chosen}],
            "rejected": [{"role": "assistant", "content": item.rejected}],
        })
    return records


def summarize(items: Sequence[VLRewardBenchItem], score_chosen: Any, score_rejected: Any) -> dict:
    """The VL-RewardBench metric from one score per response, matched to ``items`` by position.

    Returns ``{"summary": {"overall", "macro", "groups": {g: {"accuracy", "count"}}}, "rows": [...]}`` where
    accuracies are fractions in [0, 1]. All three groups are always listed; a group with no rows has
    ``accuracy`` None and count 0 and is left out of ``macro``. Raises ValueError on a NaN/inf score (naming the
    row id) or a length mismatch, and on an empty item list.
    """
    items = list(items)
    if not items:
        raise ValueError("no items to summarize")
    chosen, rejected = check_scores([it.id for it in items], score_chosen, score_rejected,
                                    [it.where for it in items])
    rows = []
    by_group: dict[str, list[bool]] = {g: [] for g in GROUPS}
    for item, c, r in zip(items, chosen, rejected):
        correct = is_correct(c, r)
        by_group[item.group].append(correct)
        rows.append({"id": item.id, "group": item.group, "score_chosen": c, "score_rejected": r,
                     "correct": correct})
    groups = {g: {"accuracy": accuracy(v), "count": len(v)} for g, v in by_group.items()}
    present = [g["accuracy"] for g in groups.values() if g["count"]]
    return {
        "summary": {
            "overall": sum(row["correct"] for row in rows) / len(rows),
            "macro": sum(present) / len(present),
            "groups": groups,
        },
        "rows": rows,
    }


def evaluate(items: Sequence[VLRewardBenchItem], scorer: PairScorer, *,
             images_dir: str | os.PathLike | None = None, batch_size: int = 16) -> dict:
    """Score every pair with ``scorer`` (records -> (chosen, rejected) pairs) and return ``summarize``'s dict."""
    items = list(items)
    records = to_preference_records(items, images_dir)
    chosen, rejected = score_in_batches(records, scorer, batch_size)
    return summarize(items, chosen, rejected)


def format_table(summary: dict) -> str:
    """A small text table of a summary (``summarize(...)["summary"]``), accuracies printed as percentages."""
    def pct(x: float | None) -> str:
        return "  n/a" if x is None else f"{100 * x:5.1f}"

    lines = [f"{'group':<14}{'acc %':>7}{'count':>7}"]
    for name, g in summary["groups"].items():
        lines.append(f"{name:<14}{pct(g['accuracy']):>7}{g['count']:>7}")
    total = sum(g["count"] for g in summary["groups"].values())
    lines.append(f"{'overall':<14}{pct(summary['overall']):>7}{total:>7}")
    lines.append(f"{'macro':<14}{pct(summary['macro']):>7}")
    return "\n".join(lines)
