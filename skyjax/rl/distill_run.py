"""The adaptive-length CoT distillation job behind `skyjax distill` (docs/distill.md).

    rows = read_rows(path)                                  records + decoded images; errors name file:line
    scores = score_rows(rows, judge, DRLCConfig(...))       clarity, S_v, S_t, S_I, normalised, penalty P
    report = self_distill(rows, scores, generate_fn, ...)   <think> chains sampled with P, verified, rewritten
    report = distill_file(rows, judge, config, out, job=...)  the two above, resumable: what `skyjax distill` runs

`generate_fn(requests, round) -> [[Completion] * G per request]` is the only model-facing part of self-distillation:
`model_generator` (skyjax.rl.generation) builds it on `skyjax.sample.decode.generate` (each request's P is its row's
repetition penalty, in one batch); tests pass a scripted one to check the keep / rewrite / drop accounting.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from skyjax.rl.distill import DRLCConfig, drlc_penalty, minmax_normalise
from skyjax.rl.generation import Completion, GenerateFn, GenRequest, model_generator  # noqa: F401
from skyjax.rl.judge import Judge, JudgeScores, Query

THINK_INSTRUCTION = ("\n\nThink step by step inside <think> and </think> before answering. The last line of your "
                     "response should follow this format: 'Answer: \\boxed{$FINAL_ANSWER}'. Avoid repeating steps "
                     "indefinitely.")
HINT_INSTRUCTION = ("\n\nThe correct final answer is {answer}. Think step by step inside <think> and </think> and "
                    "reach it by your own reasoning, without saying that it was given. The last line of your "
                    "response should be 'Answer: \\boxed{{{answer}}}'.")


@dataclass(frozen=True)
class Row:
    line: int
    obj: dict  # the input object, written back unchanged
    record: Any  # skyjax.data.records.Record
    images: tuple[Any, ...]  # decoded PIL images
    question: str

    @property
    def where(self) -> str:
        return f"{self.record.source}:{self.line}"


def question_text(record) -> str:
    """The text of the prompt's user turns (image parts dropped), what the judges read."""
    parts = []
    for m in record.prompt:
        if m.role != "user":
            continue
        if isinstance(m.content, str):
            parts.append(m.content)
        else:
            parts.extend(p.text for p in m.content if p.type == "text" and p.text)
    return "\n".join(parts).strip()


def read_rows(path: Path) -> list[Row]:
    """Every row of a generate-kind JSONL file with its images decoded. The first bad row stops the job with an
    error naming file:line: scores are normalised over the whole data set, so a silently skipped row would move
    every other row's penalty."""
    from skyjax.data.qwen_vl_image import load_image
    from skyjax.data.records import RecordError, parse_record

    rows: list[Row] = []
    base = path.resolve().parent
    with open(path, encoding="utf-8") as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise RecordError(str(path), line, None, "json", f"malformed JSON: {e.msg} (column {e.colno})")
            record = parse_record(obj, kind="generate", base_dir=base, source=str(path), line=line)
            try:
                images = tuple(load_image(p) for p in record.images)
            except Exception as e:  # noqa: BLE001 -- a missing or corrupt image, named with its row
                raise ValueError(f"{path}:{line}: {e}") from e
            question = question_text(record)
            if not question:
                raise ValueError(f"{path}:{line}: the prompt has no user text to judge")
            rows.append(Row(line, obj, record, images, question))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def judge_rows(rows: Sequence[Row], judge: Judge, batch_size: int = 8,
               tick: Callable[[int], None] = lambda n: None,
               on_batch: Callable[[Sequence[Row], list[JudgeScores]], None] | None = None) -> list[JudgeScores]:
    """The judge's raw scores of every row, in batches of `batch_size`; `on_batch(rows, scores)` after each."""
    raw: list[JudgeScores] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start: start + batch_size]
        queries = [Query(r.question, r.images, r.record.answer, tuple(r.record.conversation()), r.where)
                   for r in chunk]
        scores = list(judge.score(queries))
        if len(scores) != len(chunk):
            raise ValueError(f"{chunk[0].where}: the {judge.name} judge returned {len(scores)} scores for "
                             f"{len(chunk)} rows")
        raw.extend(scores)
        if on_batch is not None:
            on_batch(chunk, scores)
        tick(len(chunk))
    return raw


def drlc_scores(rows: Sequence[Row], raw: Sequence[JudgeScores], judge_name: str,
                config: DRLCConfig = DRLCConfig()) -> list[dict]:
    """One `distill` dict per row: the raw scores, min-max normalised over `rows`, the DRLC penalty."""
    table = np.array([[s.s_v, s.s_t, s.s_i] for s in raw], np.float64).reshape(-1, 3)
    bad = np.argwhere(~np.isfinite(table))
    if bad.size:
        raise ValueError(f"{rows[bad[0][0]].where}: the {judge_name} judge gave a non-finite score")
    norm = minmax_normalise(table)
    penalty = np.atleast_1d(drlc_penalty(norm[:, 0], norm[:, 1], norm[:, 2], config.alpha, config.beta,
                                         config.gamma, config.cap))
    out = []
    for s, n, p in zip(raw, norm, penalty):
        d = {"clarity": s.clarity, "s_v": s.s_v, "s_t": s.s_t, "s_i": s.s_i, "s_v_norm": float(n[0]),
             "s_t_norm": float(n[1]), "s_i_norm": float(n[2]), "penalty": float(p), "judge": judge_name}
        d = {k: round(v, 6) if isinstance(v, float) else v for k, v in d.items()}
        if s.details:
            d["judge_details"] = dict(s.details)
        out.append(d)
    return out


def score_rows(rows: Sequence[Row], judge: Judge, config: DRLCConfig = DRLCConfig(), batch_size: int = 8,
               tick: Callable[[int], None] = lambda n: None) -> list[dict]:
    """One `distill` dict per row: raw scores from the judge, min-max normalised over `rows`, the DRLC penalty."""
    return drlc_scores(rows, judge_rows(rows, judge, batch_size, tick), judge.name, config)


def scored_row(row: Row, scores: dict) -> dict:
    """The output row of scoring only: the input row with `meta.distill` (the scores) and `meta.repetition_penalty`
    (P, where `skyjax generate` reads a row's penalty), so the file reads back as records of every kind."""
    meta = dict(row.obj.get("meta") or {})
    meta["distill"] = scores
    meta["repetition_penalty"] = scores["penalty"]
    return {**row.obj, "meta": meta}


# ------------------------------------------------------------------------------------------------ self-distillation


def with_instruction(conversation: Sequence[dict], extra: str) -> tuple[dict, ...]:
    """`extra` appended to the last user turn's text (a text part added when the turn has only images)."""
    msgs = [dict(m) for m in conversation]
    for m in reversed(msgs):
        if m["role"] != "user":
            continue
        if isinstance(m["content"], str):
            m["content"] = m["content"] + extra
        else:
            parts = [dict(p) for p in m["content"]]
            texts = [i for i, p in enumerate(parts) if p.get("type") == "text"]
            if texts:
                parts[texts[-1]]["text"] = parts[texts[-1]]["text"] + extra
            else:
                parts.append({"type": "text", "text": extra.strip()})
            m["content"] = parts
        return tuple(msgs)
    raise ValueError("the prompt has no user turn")


def full_chain(c: Completion) -> str:
    return ("<think>\n" + c.text) if c.think_opened else c.text


# A rewritten chain that mentions the hint would teach the model to expect one: such chains are not kept.
HINT_LEAKS = ("correct final answer is", "was given", "been given", "the hint", "given answer", "answer provided")


def accepted(c: Completion, answer: str, choices, hinted: bool = False) -> bool:
    """A kept chain: it ended (not cut off by the token budget), has a closed think block followed by an answer,
    the verifier accepts the answer, and (for a chain sampled with the answer hinted) it does not mention the
    hint."""
    from skyjax.eval.verifiers import check_format, verify

    if c.finish_reason != "stop":
        return False
    if hinted and any(p in c.text.lower() for p in HINT_LEAKS):
        return False
    if not check_format(c.text, mode="lenient", think_opened=c.think_opened):
        return False
    return verify(c.text, answer, choices=choices).correct


def _choices(row: Row, choices_key: str):
    meta = row.record.meta or {}
    return meta.get(choices_key)


def sft_record(row: Row, scores: dict, c: Completion, source: str, attempts: int) -> dict:
    """An SFT prompt/completion record (skyjax.data.records kind "sft"): the ORIGINAL prompt (no instruction, no
    hint: the chain must stand without them), the chain as completion; images as absolute paths, since the output
    may live in another folder than the input."""
    meta = dict(row.record.meta or {})
    meta["distill"] = {**scores, "source": source, "attempts": attempts, "num_tokens": c.num_tokens}
    meta["repetition_penalty"] = scores["penalty"]  # the P the chain was sampled with, where `generate` reads it
    out: dict[str, Any] = {}
    if row.record.images:
        out["images"] = list(row.record.images)
    out.update(prompt=row.obj["prompt"], completion=full_chain(c), answer=row.record.answer)
    if row.record.id is not None:
        out["id"] = row.record.id
    out["meta"] = meta
    return out


@dataclass(frozen=True)
class RowResult:
    """What self-distillation made of one row: `outcome` kept / rewritten / dropped, the chain's tokens (NaN when
    dropped), the samples generated for the row, and the SFT record written (None when dropped)."""

    line: int
    outcome: str
    num_tokens: float
    samples: int
    record: dict | None

    def to_json(self) -> dict:
        return {"line": self.line, "outcome": self.outcome,
                "num_tokens": None if not np.isfinite(self.num_tokens) else self.num_tokens,
                "samples": self.samples, "record": self.record}

    @classmethod
    def from_json(cls, d: dict) -> "RowResult":
        tokens = d.get("num_tokens")
        return cls(int(d["line"]), str(d["outcome"]), float("nan") if tokens is None else float(tokens),
                   int(d["samples"]), d.get("record"))


def distill_chains(rows: Sequence[Row], scores: Sequence[dict], generate_fn: GenerateFn, *, max_rewrites: int = 2,
                   batch_size: int = 8, choices_key: str = "choices", tick: Callable[[int], None] = lambda n: None,
                   on_batch: Callable[[list[RowResult]], None] = lambda results: None) -> list[RowResult]:
    """Sample chains with each row's penalty, keep verified ones, resample wrong rows with the answer hinted up to
    `max_rewrites` times; `on_batch(results)` after each batch of `batch_size` rows. Returns every row's result."""
    if max_rewrites < 0:
        raise ValueError(f"--max-rewrites must be >= 0, got {max_rewrites}")
    missing = [r.where for r in rows if not r.record.answer]
    if missing:
        raise ValueError(f"{missing[0]}: self-distillation needs each row's 'answer' ({len(missing)} row(s) lack one)")
    results: list[RowResult] = []
    for start in range(0, len(rows), batch_size):
        chunk, chunk_scores = rows[start: start + batch_size], scores[start: start + batch_size]
        convs = [r.record.conversation() for r in chunk]
        chosen: list[tuple[Completion, str, int] | None] = [None] * len(chunk)
        samples = [0] * len(chunk)
        for rnd in range(max_rewrites + 1):
            todo = [i for i in range(len(chunk)) if chosen[i] is None]
            if not todo:
                break
            reqs = [GenRequest(with_instruction(convs[i], THINK_INSTRUCTION if rnd == 0 else
                                                HINT_INSTRUCTION.format(answer=chunk[i].record.answer)),
                               chunk[i].images, chunk_scores[i]["penalty"], chunk[i].line) for i in todo]
            generated = generate_fn(reqs, rnd)
            if len(generated) != len(reqs):
                raise RuntimeError(f"the generator returned {len(generated)} results for {len(reqs)} prompts")
            for i, comps in zip(todo, generated):
                samples[i] += len(comps)
                row = chunk[i]
                for c in comps:  # the first verified sample; sample order is the generator's (seeded) order
                    try:
                        ok = accepted(c, row.record.answer, _choices(row, choices_key), hinted=rnd > 0)
                    except ValueError as e:  # a data error (an answer naming no option), not a wrong chain
                        raise ValueError(f"{row.where}: {e}") from e
                    if ok:
                        chosen[i] = (c, "kept" if rnd == 0 else "rewritten", rnd + 1)
                        break
        batch = []
        for row, sc, pick, n in zip(chunk, chunk_scores, chosen, samples):
            if pick is None:
                batch.append(RowResult(row.line, "dropped", float("nan"), n, None))
                continue
            c, source, attempts = pick
            batch.append(RowResult(row.line, source, float(c.num_tokens), n,
                                   sft_record(row, sc, c, source, attempts)))
        on_batch(batch)
        results.extend(batch)
        tick(len(chunk))
    return results


def self_distill(rows: Sequence[Row], scores: Sequence[dict], generate_fn: GenerateFn, out_file: TextIO, *,
                 max_rewrites: int = 2, batch_size: int = 8, choices_key: str = "choices", quantiles: int = 4,
                 tick: Callable[[int], None] = lambda n: None) -> dict:
    """`distill_chains`, appending the SFT records to `out_file` batch by batch. Returns the report dict."""
    def write(results: list[RowResult]) -> None:
        for r in results:
            if r.record is not None:
                out_file.write(json.dumps(r.record, ensure_ascii=False) + "\n")
        out_file.flush()

    results = distill_chains(rows, scores, generate_fn, max_rewrites=max_rewrites, batch_size=batch_size,
                             choices_key=choices_key, tick=tick, on_batch=write)
    return report_of(results, scores, quantiles, max_rewrites)


def report_of(results: Sequence[RowResult], scores: Sequence[dict], quantiles: int, max_rewrites: int) -> dict:
    return build_report([r.outcome for r in results], [s["penalty"] for s in scores],
                        [r.num_tokens for r in results], sum(r.samples for r in results), quantiles, max_rewrites)


# --------------------------------------------------------------------------------------------- the resumable job


def distill_file(rows: Sequence[Row], judge: Judge, config: DRLCConfig, out: Path, *, job: dict,
                 generate_fn: GenerateFn | None = None, max_rewrites: int = 2, batch_size: int = 8,
                 choices_key: str = "choices", quantiles: int = 4,
                 tick: Callable[[int], None] = lambda n: None) -> dict:
    """Score `rows` and (with a `generate_fn`) self-distill them into `out`, resumably: every judged batch's raw
    scores and every distilled batch's results are appended to `OUT.partial.jsonl` (header: `job`, what must match
    to resume) as they finish; a rerun skips the rows found there (by input line) and continues. Sampling is keyed
    by (seed, round, line), so a resumed job writes what an uninterrupted one would. At the end `out` is written in
    input order (scored rows, or the SFT records of kept and rewritten rows) and the log is removed.

    Returns {"rows": n} after scoring only, else the self-distillation report."""
    from skyjax.eval.score_log import JobLog, partial_path

    log = JobLog(partial_path(out), job)
    raw: dict[int, JudgeScores] = {}
    chains: dict[int, RowResult] = {}
    try:
        for entry in log.open():
            if "raw" in entry:
                raw[int(entry["line"])] = JudgeScores(**entry["raw"])
            elif "chain" in entry:
                chains[int(entry["line"])] = RowResult.from_json(entry["chain"])
        tick(len(raw))

        def judged(chunk: Sequence[Row], scores: list[JudgeScores]) -> None:
            raw.update({r.line: s for r, s in zip(chunk, scores)})
            log.write({"line": r.line, "raw": dataclasses.asdict(s)} for r, s in zip(chunk, scores))

        # the judges score each row on its own, so rows judged in a resumed job score as in one pass; the
        # normalisation runs over every row at the end
        judge_rows([r for r in rows if r.line not in raw], judge, batch_size, tick, on_batch=judged)
        scores = drlc_scores(rows, [raw[r.line] for r in rows], judge.name, config)
        tmp = out.with_name(out.name + ".tmp")
        if generate_fn is None:
            with open(tmp, "w", encoding="utf-8") as f:
                for r, s in zip(rows, scores):
                    f.write(json.dumps(scored_row(r, s), ensure_ascii=False) + "\n")
            os.replace(tmp, out)
            log.finish()
            return {"rows": len(rows)}
        tick(sum(1 for r in rows if r.line in chains))

        def distilled(results: list[RowResult]) -> None:
            chains.update({x.line: x for x in results})
            log.write({"line": x.line, "chain": x.to_json()} for x in results)

        todo = [i for i, r in enumerate(rows) if r.line not in chains]
        distill_chains([rows[i] for i in todo], [scores[i] for i in todo], generate_fn, max_rewrites=max_rewrites,
                       batch_size=batch_size, choices_key=choices_key, tick=tick, on_batch=distilled)
        results = [chains[r.line] for r in rows]
        with open(tmp, "w", encoding="utf-8") as f:
            for x in results:
                if x.record is not None:
                    f.write(json.dumps(x.record, ensure_ascii=False) + "\n")
        os.replace(tmp, out)
        report = report_of(results, scores, quantiles, max_rewrites)
        log.finish()
        return report
    finally:
        log.close()


def build_report(outcome: Sequence[str], penalties: Sequence[float], tokens: Sequence[float], samples: int,
                 quantiles: int = 4, max_rewrites: int = 2) -> dict:
    """Counts, and chain length against difficulty: rows binned by penalty quantile (bin 1 = lowest P = hardest,
    highest-scoring queries, where long chains are allowed); mean tokens over the rows that produced a chain."""
    p = np.asarray(penalties, np.float64)
    t = np.asarray(tokens, np.float64)
    q = max(1, min(int(quantiles), len(p)))
    edges = np.quantile(p, np.linspace(0, 1, q + 1))
    # bin by rank, not by value: equal penalties would otherwise all fall into one bin
    order = np.argsort(p, kind="stable")
    bins = np.empty(len(p), np.int64)
    bins[order] = np.arange(len(p)) * q // max(len(p), 1)
    per_bin = []
    for b in range(q):
        sel = bins == b
        lengths = t[sel & np.isfinite(t)]
        per_bin.append({
            "quantile": b + 1, "penalty_min": round(float(p[sel].min()), 6),
            "penalty_max": round(float(p[sel].max()), 6),
            "rows": int(sel.sum()),
            **{k: int(sum(1 for o, s in zip(outcome, sel) if s and o == k)) for k in ("kept", "rewritten", "dropped")},
            "mean_tokens": round(float(lengths.mean()), 3) if lengths.size else None,
        })
    have = np.isfinite(t)
    corr = None
    if have.sum() >= 2 and np.ptp(p[have]) > 0 and np.ptp(t[have]) > 0:
        corr = round(float(np.corrcoef(p[have], t[have])[0, 1]), 6)
    return {"rows": len(outcome), "kept": outcome.count("kept"), "rewritten": outcome.count("rewritten"),
            "dropped": outcome.count("dropped"), "samples_generated": int(samples), "max_rewrites": max_rewrites,
            "penalty_quantile_edges": [round(float(e), 6) for e in edges],
            "chain_length_by_penalty_quantile": per_bin, "pearson_penalty_tokens": corr}


# --------------------------------------------------------------------------------------------- the model generator


