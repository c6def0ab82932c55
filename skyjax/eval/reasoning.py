"""Reasoning-answer benchmarks of Skywork R1V: MathVista (testmini) and MMMU. Rows, prompts and the metric.

The model is not called here: ``evaluate`` takes a ``complete`` callable (items -> k completion texts per item), so
the metric can be computed from any completions. The command (model loading, batching, output) is
``skyjax.eval.reasoning_cli``.

Prompts (the R1V paper's unified test prompt): the question, for multiple choice an ``Options:`` block of lettered
lines, then the instruction (``MC_INSTRUCTION`` / ``FREE_FORM_INSTRUCTION``), which asks for a last line
``Answer: \\boxed{...}``. Images go before the text (R1V's chat convention); MMMU's ``<image k>`` references stay in
the text, where they name the k-th image shown (``image_placement="inline"`` puts each image at its reference).

Scoring: the shared verifiers (``skyjax.eval.verifiers``) extract the last ``\\boxed{}`` (or ``Answer:`` line) after
the reasoning block and compare it with the ground truth; see ``is_correct``. pass@1 = mean over rows of
(correct samples / k), which equals the mean of the k single-sample accuracies ("runs"). Groups (MathVista:
category, task, skills, grade, ...; MMMU: discipline, subject, subfield, difficulty) report the same mean over their
rows; a row counts in every skill it lists.
"""

from __future__ import annotations

import ast
import io
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from skyjax.eval.common import BenchmarkFormatError, data_shards, location, read_parquet_rows
from skyjax.eval.verifiers import LETTERS, answers_match, extract_answer, parse_number, verify

BENCHMARKS = ("mathvista", "mmmu")

# The R1V paper's prompts, word for word, except that the paper prints "FINAL_ANSWER is is your conclusion".
MC_INSTRUCTION = (
    "Answer the multiple choice preceding question. The last line of your response should follow this format: "
    "'Answer: \\boxed{$LETTER}' (without quotes), where LETTER is one of the options. If you are uncertain or the "
    "problem is too complex, make a reasoned guess based on the information provided. Avoid repeating steps "
    "indefinitely—provide your best guess even if unsure. Think step by step logically, considering all relevant "
    "information before answering.")
FREE_FORM_INSTRUCTION = (
    "Answer the preceding question. The last line of your response should follow this format: "
    "'Answer: \\boxed{$FINAL_ANSWER}' (without quotes), where FINAL_ANSWER is your conclusion. If you are uncertain "
    "or the problem is too complex, make a reasoned guess based on the information provided. Avoid repeating steps "
    "indefinitely—provide your best guess even if unsure. Think step by step logically, considering all relevant "
    "information before answering.")

MMMU_IMAGE_REF = re.compile(r"<image (\d+)>")
MMMU_MAX_IMAGES = 7

# MMMU's 30 subjects in its six disciplines (the subject is the id's middle part: validation_Art_Theory_12)
MMMU_DISCIPLINES = {
    "Art & Design": ("Art", "Art_Theory", "Design", "Music"),
    "Business": ("Accounting", "Economics", "Finance", "Manage", "Marketing"),
    "Science": ("Biology", "Chemistry", "Geography", "Math", "Physics"),
    "Health & Medicine": ("Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine",
                          "Pharmacy", "Public_Health"),
    "Humanities & Social Science": ("History", "Literature", "Sociology", "Psychology"),
    "Tech & Engineering": ("Agriculture", "Architecture_and_Engineering", "Computer_Science", "Electronics",
                           "Energy_and_Power", "Materials", "Mechanical_Engineering"),
}
_SUBJECT_DISCIPLINE = {s: d for d, subjects in MMMU_DISCIPLINES.items() for s in subjects}

# a path (resolved) or the encoded image itself (parquet)
ImageSource = str | bytes


@dataclass(frozen=True)
class ReasoningItem:
    """One benchmark question, ready to prompt and to score.

    ``parts``: the user turn in order; a string is text, an int indexes ``images``. ``answer``: an option letter for
    multiple choice, else the accepted answers (MMMU open questions may list several). ``groups``: group name ->
    the values this row belongs to (e.g. ``{"skills": ["arithmetic reasoning", "statistical reasoning"]}``).
    Shaped like a record for the generation code: ``conversation()``, ``source``, ``line``."""

    benchmark: str
    id: str
    question_type: str  # "multiple_choice" | "free_form"
    parts: tuple[str | int, ...]
    images: tuple[ImageSource, ...] = field(repr=False)
    answer: str | tuple[str, ...]
    choices: tuple[str, ...] | None = None
    answer_type: str | None = None  # MathVista: integer | float | text | list
    precision: int | None = None  # MathVista floats: decimals the answer is compared at
    unit: str = ""
    groups: dict[str, list[str]] = field(default_factory=dict, hash=False)
    source: str = ""
    line: int = 0
    index: int = 0  # position in the benchmark file(s): keys the sampling, so results do not depend on batching

    @property
    def where(self) -> str:
        return location(self.source, self.line, parquet=self.source.endswith(".parquet"))

    @property
    def prompt_text(self) -> str:
        return "".join(p for p in self.parts if isinstance(p, str))

    def conversation(self) -> list[dict]:
        content = [{"type": "image"} if isinstance(p, int) else {"type": "text", "text": p} for p in self.parts]
        return [{"role": "user", "content": content}]

    def image_sequence(self) -> list[ImageSource]:
        """The images in the order the conversation's image parts take them."""
        return [self.images[p] for p in self.parts if isinstance(p, int)]


# ---------------------------------------------------------------------------------------------------------- prompts


def build_prompt(question: str, choices: Sequence[str] | None) -> str:
    """The question, lettered options for multiple choice, and the paper's instruction."""
    text = question.strip()
    if choices:
        text += "\nOptions:\n" + "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return text + "\n\n" + (MC_INSTRUCTION if choices else FREE_FORM_INSTRUCTION)


# ------------------------------------------------------------------------------------------------------ reading rows


def _require(row: dict, key: str, where: str) -> Any:
    value = row.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):  # parquet has every column, null or ""
        present = sorted(k for k, v in row.items() if v is not None and v != "")
        raise BenchmarkFormatError(f"{where}: missing key {key!r} (present: {present})")
    return value


def _text(row: dict, key: str, where: str) -> str:
    value = _require(row, key, where)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise BenchmarkFormatError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    return str(value)


def _image_source(value: Any, base_dir: Path, where: str, key: str) -> ImageSource:
    """A path (checked to exist) or image bytes, from a path string or a ``{"bytes", "path"}`` dict (parquet)."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)) and value:
        return bytes(value)
    if not isinstance(value, str) or not value:
        raise BenchmarkFormatError(f"{where}: {key!r} must be an image path or image bytes, got {value!r}")
    path = value if os.path.isabs(value) else os.path.normpath(base_dir / value)
    if not os.path.isfile(path):
        raise BenchmarkFormatError(f"{where}: image {value!r} not found (looked for {path})")
    return path


def _check_choice_answer(answer: str, choices: Sequence[str], where: str) -> str:
    """The letter of the option equal to ``answer`` (exactly, else the one option it matches)."""
    if answer in choices:
        return LETTERS[list(choices).index(answer)]
    hits = [i for i, c in enumerate(choices) if answers_match(answer, c)[0]]
    if len(hits) != 1:
        raise BenchmarkFormatError(f"{where}: answer {answer!r} is not among the choices {list(choices)}")
    return LETTERS[hits[0]]


def _metadata(row: dict, where: str) -> dict:
    meta = row.get("metadata") or {}
    if isinstance(meta, str):  # some exports stringify nested fields
        try:
            meta = json.loads(meta)
        except json.JSONDecodeError:
            raise BenchmarkFormatError(f"{where}: 'metadata' is not a JSON object") from None
    if not isinstance(meta, dict):
        raise BenchmarkFormatError(f"{where}: 'metadata' must be an object, got {type(meta).__name__}")
    return meta


def parse_mathvista_row(row: dict, base_dir: Path, source: str, line: int, index: int = 0) -> ReasoningItem:
    """A MathVista testmini row: pid, question, image (path) or decoded_image (bytes), choices, unit, precision,
    answer, question_type (multi_choice | free_form), answer_type (integer | float | text | list), metadata."""
    where = location(source, line, parquet=source.endswith(".parquet"))
    pid = _text(row, "pid", where)
    question = _text(row, "question", where)
    answer = _text(row, "answer", where)
    qtype = _text(row, "question_type", where)
    if qtype not in ("multi_choice", "free_form"):
        raise BenchmarkFormatError(f"{where}: question_type must be 'multi_choice' or 'free_form', got {qtype!r}")
    decoded = row.get("decoded_image")
    if decoded is not None and (isinstance(decoded, (bytes, bytearray)) or (decoded or {}).get("bytes")):
        image = _image_source(decoded, base_dir, where, "decoded_image")
    else:
        image = _image_source(_require(row, "image", where), base_dir, where, "image")
    unit = str(row.get("unit") or "").strip()
    text = question + (f" (Unit: {unit})" if unit else "")  # MathVista's own query names the unit this way
    answer_type = row.get("answer_type") or "text"
    precision = row.get("precision")
    if isinstance(precision, float) and math.isnan(precision):  # parquet stores a missing precision as NaN
        precision = None
    meta = _metadata(row, where)
    groups = {"question_type": [qtype], "answer_type": [str(answer_type)]}
    for key in ("category", "task", "grade", "context"):
        if meta.get(key):
            groups[key] = [str(meta[key])]
    if meta.get("skills"):
        groups["skills"] = [str(s) for s in meta["skills"]]
    common = dict(benchmark="mathvista", id=pid, images=(image,), unit=unit, groups=groups, source=source,
                  line=line, index=index, answer_type=str(answer_type),
                  precision=None if precision is None else int(precision))
    if qtype == "multi_choice":
        choices = _require(row, "choices", where)
        if not isinstance(choices, (list, tuple)) or not choices or len(choices) > len(LETTERS):
            raise BenchmarkFormatError(f"{where}: 'choices' must be a non-empty list, got {choices!r}")
        choices = tuple(str(c) for c in choices)
        letter = _check_choice_answer(answer, choices, where)
        return ReasoningItem(question_type="multiple_choice", parts=(0, build_prompt(text, choices)),
                             answer=letter, choices=choices, **common)
    return ReasoningItem(question_type="free_form", parts=(0, build_prompt(text, None)), answer=(answer,), **common)


def mmmu_subject(item_id: str) -> str:
    """``validation_Art_Theory_12`` -> ``Art_Theory``; an id of another shape is its own subject."""
    m = re.match(r"^(?:dev|validation|test)_(.+)_\d+$", item_id)
    return m.group(1) if m else item_id


def _mmmu_options(row: dict, where: str) -> list[str]:
    raw = row.get("options")
    if raw is None or raw == "":
        return []
    if isinstance(raw, str):
        try:
            raw = ast.literal_eval(raw)  # the dataset stores the list as its Python repr
        except (ValueError, SyntaxError):
            raise BenchmarkFormatError(f"{where}: 'options' is not a list literal: {raw[:60]!r}") from None
    if not isinstance(raw, (list, tuple)) or len(raw) > len(LETTERS):
        raise BenchmarkFormatError(f"{where}: 'options' must be a list of at most {len(LETTERS)} options")
    return [str(o) for o in raw]


def _mmmu_open_answers(answer: str) -> tuple[str, ...]:
    """An open answer, or the accepted answers when it is written as a list literal ("['24', '24.0']")."""
    if answer.startswith("[") and answer.endswith("]"):
        try:
            value = ast.literal_eval(answer)
        except (ValueError, SyntaxError):
            return (answer,)
        if isinstance(value, list) and value and all(isinstance(v, (str, int, float)) for v in value):
            return tuple(str(v) for v in value)
    return (answer,)


def _inline_parts(text: str, present: dict[int, int]) -> tuple[str | int, ...]:
    """Text split at each ``<image k>``; the reference becomes image part ``present[k]``. Images the text never
    references go first."""
    referenced = {int(k) for k in MMMU_IMAGE_REF.findall(text)}
    parts: list[str | int] = [present[k] for k in sorted(present) if k not in referenced]
    pos = 0
    for m in MMMU_IMAGE_REF.finditer(text):
        if m.start() > pos:
            parts.append(text[pos:m.start()])
        parts.append(present[int(m.group(1))])
        pos = m.end()
    if pos < len(text):
        parts.append(text[pos:])
    return tuple(parts)


def parse_mmmu_row(row: dict, base_dir: Path, source: str, line: int, index: int = 0,
                   image_placement: str = "first") -> ReasoningItem:
    """An MMMU row: id, question (with ``<image k>`` references), options (a Python list literal), answer (a letter
    for multiple choice), image_1 .. image_7 (paths, or ``{"bytes", "path"}`` in parquet), question_type
    (multiple-choice | open), subfield, topic_difficulty."""
    where = location(source, line, parquet=source.endswith(".parquet"))
    item_id = _text(row, "id", where)
    question = _text(row, "question", where)
    answer = _text(row, "answer", where).strip()
    qtype = _text(row, "question_type", where)
    if qtype not in ("multiple-choice", "open"):
        raise BenchmarkFormatError(f"{where}: question_type must be 'multiple-choice' or 'open', got {qtype!r}")
    options = _mmmu_options(row, where)
    if qtype == "multiple-choice":
        if not options:
            raise BenchmarkFormatError(f"{where}: a multiple-choice row needs 'options'")
        letter = answer.strip("()").upper()
        if len(letter) != 1 or letter not in LETTERS[:len(options)]:
            raise BenchmarkFormatError(
                f"{where}: answer {answer!r} is not among the choices {list(LETTERS[:len(options)])}")
    text = build_prompt(question, options if qtype == "multiple-choice" else None)
    present: dict[int, int] = {}
    images: list[ImageSource] = []
    for k in range(1, MMMU_MAX_IMAGES + 1):
        value = row.get(f"image_{k}")
        if value is None or value == "" or (isinstance(value, dict) and not value.get("bytes")
                                            and not value.get("path")):
            continue
        present[k] = len(images)
        images.append(_image_source(value, base_dir, where, f"image_{k}"))
    missing = sorted({int(k) for k in MMMU_IMAGE_REF.findall(text)} - set(present))
    if missing:
        raise BenchmarkFormatError(f"{where}: the question refers to <image {missing[0]}> but 'image_{missing[0]}' "
                                   "is missing")
    if image_placement == "inline":
        parts = _inline_parts(text, present)
    elif image_placement == "first":
        parts = (*range(len(images)), text)
    else:
        raise ValueError(f"image_placement must be 'first' or 'inline', got {image_placement!r}")
    subject = mmmu_subject(item_id)
    groups = {"question_type": [qtype], "discipline": [_SUBJECT_DISCIPLINE.get(subject, "other")],
              "subject": [subject]}
    for key in ("subfield", "topic_difficulty"):
        if row.get(key):
            groups[key] = [str(row[key])]
    common = dict(benchmark="mmmu", id=item_id, parts=parts, images=tuple(images), groups=groups, source=source,
                  line=line, index=index)
    if qtype == "multiple-choice":
        return ReasoningItem(question_type="multiple_choice", answer=letter, choices=tuple(options), **common)
    return ReasoningItem(question_type="free_form", answer=_mmmu_open_answers(answer), **common)


def _raw_rows(path: Path) -> Iterator[tuple[str, int, dict | BenchmarkFormatError]]:
    """(source, line or row, row) from JSONL, parquet or a folder of parquet shards; a line that is not a JSON object
    comes as an error in place of the row, so that it can be skipped like any other bad row."""
    for shard in data_shards(path):
        if shard.suffix == ".parquet":
            for n, row in enumerate(read_parquet_rows(shard), start=1):
                yield str(shard), n, row
            continue
        with open(shard, encoding="utf-8") as f:
            for n, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as e:
                    yield str(shard), n, BenchmarkFormatError(
                        f"{location(shard, n)}: invalid JSON ({e.msg} at column {e.colno})")
                    continue
                if not isinstance(row, dict):
                    row = BenchmarkFormatError(f"{location(shard, n)}: expected a JSON object")
                yield str(shard), n, row


def load_items(benchmark: str, path: str | os.PathLike, *, images_dir: str | os.PathLike | None = None,
               on_error: str = "raise", limit: int | None = None, image_placement: str = "first"
               ) -> tuple[list[ReasoningItem], list[str]]:
    """(items, skipped errors). Image paths are relative to ``images_dir`` (default: the data file's folder).
    on_error "raise" stops at the first bad row with a BenchmarkFormatError naming the file and line; "skip" keeps
    each error message instead. ``limit``: read only the first rows (bad ones included in the count)."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f"benchmark must be one of {BENCHMARKS}, got {benchmark!r}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    path = Path(path)
    base = Path(images_dir) if images_dir is not None else (path if path.is_dir() else path.resolve().parent)
    items: list[ReasoningItem] = []
    skipped: list[str] = []
    for index, (source, line, row) in enumerate(_raw_rows(path)):
        if limit is not None and index >= limit:
            break
        try:
            if isinstance(row, BenchmarkFormatError):
                raise row
            if benchmark == "mathvista":
                items.append(parse_mathvista_row(row, base, source, line, index))
            else:
                items.append(parse_mmmu_row(row, base, source, line, index, image_placement))
        except BenchmarkFormatError as e:
            if on_error == "raise":
                raise
            skipped.append(str(e))
    return items, skipped


def open_image(source: ImageSource, where: str):
    """The decoded PIL image; a bad file or bad bytes is a BenchmarkFormatError naming the row."""
    from PIL import Image

    from skyjax.data.qwen_vl_image import ImageError, load_image

    try:
        if isinstance(source, bytes):
            with Image.open(io.BytesIO(source)) as opened:
                opened.load()
                return opened.copy()
        return load_image(source)
    except (ImageError, OSError, Image.DecompressionBombError) as e:
        raise BenchmarkFormatError(f"{where}: {e}") from None


# ----------------------------------------------------------------------------------------------------------- scoring


def _float_at_precision(extracted: str, truth: str, precision: int) -> bool:
    """MathVista's float rule: the predicted number rounded to the row's precision equals the answer."""
    p, t = parse_number(extracted), parse_number(truth)
    if p is None or t is None:
        return False
    values = [p.value] + ([p.value / 100.0] if p.percent else [])
    return any(round(v, precision) == round(t.value, precision) for v in values)


def is_correct(item: ReasoningItem, completion: str) -> tuple[bool, str | None, str]:
    """(correct, extracted answer, reason) for one completion.

    Multiple choice: the extracted option letter (a letter, "(B)", or an option's text) equals the answer's letter.
    MathVista free form: integers exactly; floats after rounding to ``precision`` decimals (else the verifiers'
    tolerance); text and lists by normalised string; a number may carry the row's unit. MMMU open: any accepted
    answer matches (numbers within the verifiers' relative tolerance, 1e-4).
    """
    if item.question_type == "multiple_choice":
        result = verify(completion, item.answer, choices=item.choices)
        return result.correct, result.extracted, result.reason
    extracted = None
    reason = "no answer found"
    for truth in item.answer:
        kwargs = {"rel_tol": 0.0, "abs_tol": 1e-9} if item.answer_type == "integer" else {}
        if item.unit and parse_number(f"{truth} {item.unit}") is not None:
            truth = f"{truth} {item.unit}"  # "5 m" must not pass for "5" cm; a bare "5" still does
        result = verify(completion, truth, **kwargs)
        if result.correct:
            return True, result.extracted, result.reason
        extracted, reason = result.extracted, result.reason
        if extracted is not None and item.answer_type == "float" and item.precision is not None \
                and _float_at_precision(extracted, truth, item.precision):
            return True, extracted, f"numeric match at precision {item.precision}"
    return False, extracted if extracted is not None else extract_answer(completion), reason


def score_item(item: ReasoningItem, completions: Sequence[str | dict]) -> dict:
    """One output row: the item's identity, ground truth, groups, and each sample with its extracted answer and
    correctness. A completion is its text, or a dict with ``text`` (other keys, e.g. num_tokens, are kept)."""
    samples = []
    for c in completions:
        sample = dict(c) if isinstance(c, dict) else {"text": c}
        ok, extracted, reason = is_correct(item, sample["text"])
        sample.update(extracted=extracted, correct=ok, reason=reason)
        samples.append(sample)
    n_ok = sum(s["correct"] for s in samples)
    answer = item.answer if isinstance(item.answer, str) else (
        item.answer[0] if len(item.answer) == 1 else list(item.answer))
    return {"id": item.id, "where": item.where, "question_type": item.question_type, "answer": answer,
            "choices": list(item.choices) if item.choices else None,
            "groups": item.groups, "num_correct": n_ok, "pass@1": n_ok / len(samples) if samples else 0.0,
            "samples": samples}


def summarize(rows: Sequence[dict], k: int) -> dict:
    """pass@1 overall and per group value from scored rows (``score_item``'s output); ``runs`` are the k
    single-sample accuracies, whose mean is pass@1."""
    if not rows:
        return {"pass@1": None, "num_rows": 0, "num_samples": k, "runs": [], "groups": {}}
    for row in rows:
        if len(row["samples"]) != k:
            raise ValueError(f"{row['where']}: {len(row['samples'])} samples, expected {k}")
    groups: dict[str, dict[str, list[float]]] = {}
    for row in rows:
        for name, values in row["groups"].items():
            for value in values:
                groups.setdefault(name, {}).setdefault(value, []).append(row["pass@1"])
    return {
        "pass@1": sum(r["pass@1"] for r in rows) / len(rows),
        "num_rows": len(rows),
        "num_samples": k,
        "runs": [sum(r["samples"][j]["correct"] for r in rows) / len(rows) for j in range(k)],
        "groups": {name: {value: {"pass@1": sum(v) / len(v), "count": len(v)} for value, v in sorted(by.items())}
                   for name, by in groups.items()},
    }


# Completions for a batch of items: k texts (or dicts with "text") per item, in item order; None for an item that
# could not be run (the completer reports it), which is then left out.
Completer = Callable[[list[ReasoningItem]], Sequence[Sequence[str | dict]]]


def evaluate(items: Sequence[ReasoningItem], complete: Completer, k: int, *, batch_size: int = 8,
             on_batch: Callable[[list[dict], int], None] | None = None) -> dict:
    """Complete ``items`` in batches, score every sample, and return ``{"summary", "rows"}``. ``on_batch`` gets
    each batch's scored rows and the batch's number of items as they are done (the command appends the rows to a
    file and moves its progress bar)."""
    if k < 1 or batch_size < 1:
        raise ValueError(f"k and batch_size must be >= 1, got {k} and {batch_size}")
    rows: list[dict] = []
    for start in range(0, len(items), batch_size):
        batch = list(items[start:start + batch_size])
        completions = complete(batch)
        if len(completions) != len(batch):
            raise ValueError(f"complete returned {len(completions)} rows for a batch of {len(batch)}")
        done = [score_item(item, comps) for item, comps in zip(batch, completions) if comps is not None]
        rows.extend(done)
        if on_batch is not None:
            on_batch(done, len(batch))
    return {"summary": summarize(rows, k), "rows": rows}


def format_table(summary: dict, group_names: Sequence[str] = ()) -> str:
    """pass@1 (in %) overall and for the named groups, one line each."""
    def pct(x):
        return "  n/a" if x is None else f"{100 * x:5.1f}"

    lines = [f"{'pass@1 %':<40}{pct(summary['pass@1']):>7}{summary['num_rows']:>7} rows x "
             f"{summary['num_samples']} samples"]
    for name in group_names:
        for value, g in summary["groups"].get(name, {}).items():
            lines.append(f"  {name}: {value}"[:40].ljust(40) + f"{pct(g['pass@1']):>7}{g['count']:>7}")
    return "\n".join(lines)
