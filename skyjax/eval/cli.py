"""`skyjax score` and `skyjax eval {vl-rewardbench,rewardbench}`."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from skyjax.cli import add_mesh_arg
from skyjax.eval import reasoning_cli

JOB_NOTES = """
Rows are sorted by length and batched by a token budget (--max-batch-tokens; --batch-size caps the rows), so a
job compiles one program per length bucket and long rows never run out of memory. Scores are appended to
OUT.partial.jsonl as each batch finishes; if the job stops (crash, Ctrl-C), rerun the same command to continue
where it stopped. The final output is written at the end and the partial file removed."""


def _common(p: argparse.ArgumentParser):
    from skyjax.eval.scorer import DEFAULT_BATCH_ROWS

    p.add_argument("--model", required=True, type=Path, help="reward model: Hugging Face folder or skyjax checkpoint")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="compute dtype (default: the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_ROWS,
                   help=f"most rows in one batch (default {DEFAULT_BATCH_ROWS})")
    p.add_argument("--max-batch-tokens", type=int, default=None,
                   help="token budget of one batch, rows x padded length (default 16384; 65536 on accelerators "
                        "with 64 GiB or more)")
    p.add_argument("--max-length", type=int, default=None,
                   help="longest row in tokens (default and upper bound: the model's max_position_embeddings)")
    p.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                   help="a bad row (malformed line, missing image, too long) stops the run naming its file:line "
                        "(default), or is skipped, counted and listed")
    add_mesh_arg(p)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "score", help="score JSONL rows with a reward model",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Rows carry `response` (output adds `score`) or a `chosen`/`rejected` pair (output adds "
                    "`score_chosen` and `score_rejected`); images are relative to the JSONL file's folder. Output "
                    "rows keep the input order and fields; relative image paths are rewritten relative to the "
                    "output file's folder, so they stay valid there.\n" + JOB_NOTES + "\n\n"
                    "example:\n  skyjax score --model runs/reward_demo/hf --data pairs.jsonl --out scored.jsonl "
                    "--on-error skip")
    _common(p)
    p.add_argument("--data", required=True, type=Path, help="input JSONL")
    p.add_argument("--out", required=True, type=Path, help="output JSONL (input fields + scores)")
    p.set_defaults(func=run_score)

    p = sub.add_parser(
        "eval", help="benchmarks: VL-RewardBench, RewardBench (reward models); MathVista, MMMU (policies)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Score a benchmark in its own format and report its accuracies exactly as it defines them.\n"
                    + JOB_NOTES + "\n\n"
                    "example:\n  skyjax eval vl-rewardbench --model ckpt/ --data vl_rewardbench/data.jsonl "
                    "--images vl_rewardbench/ --out vlrb.json\n"
                    "  skyjax eval rewardbench --model ckpt/ --data rewardbench/filtered.jsonl --out rb.json\n"
                    "  skyjax eval mathvista --model r1v/ --data mathvista/testmini.jsonl --out mv.json "
                    "--num-samples 5")
    p.add_argument("benchmark", choices=["vl-rewardbench", "rewardbench", "mathvista", "mmmu"])
    _common(p)
    p.add_argument("--data", required=True, type=Path, help="the benchmark's data.jsonl or parquet file/folder")
    p.add_argument("--images", type=Path, default=None,
                   help="VL-RewardBench: folder the rows' image_path are relative to (images from parquet bytes "
                        "are written here); MathVista / MMMU: folder image paths are relative to (default: the "
                        "data file's)")
    p.add_argument("--out", type=Path, default=None,
                   help="write the summary and every row's scores (JSON); also makes the job resumable")
    reasoning_cli.add_arguments(p)
    p.set_defaults(func=run_eval)


def _scorer(args):
    from skyjax.eval.scorer import RewardScorer

    return RewardScorer(args.model, mesh_shape=args.mesh, dtype=args.dtype, batch_size=args.batch_size,
                        max_batch_tokens=args.max_batch_tokens, max_length=args.max_length)


def _job(args, scorer) -> dict:
    from skyjax.eval.score_log import job_identity

    return job_identity(args.data, args.model, command=args.command, benchmark=getattr(args, "benchmark", None),
                        dtype=str(scorer.model.config.text.dtype), max_length=scorer.max_length)


def _open_log(args, scorer):
    """The job's resumable score log and the scores it already holds; a log of another job is a one-line error."""
    from skyjax.eval.score_log import ResumeError, ScoreLog
    from skyjax.eval.scorer import RowError

    log = ScoreLog(args.out, _job(args, scorer))
    try:
        done = log.open()
    except ResumeError as e:
        raise RowError(str(e)) from None
    if done:
        print(f"resuming: {len(done)} conversations already scored in {log.path}", file=sys.stderr)
    return log, done


def _report(skipped, extra_lines=()) -> str:
    """Skipped rows, one per line (file:line: reason), deduplicated (both conversations of a pair)."""
    seen = dict.fromkeys([*extra_lines, *(str(s) for s in skipped)])
    return "".join(f"  {line}\n" for line in seen)


def output_row(obj: dict, record, out_dir: Path) -> dict:
    """The input row with its relative image paths rewritten relative to the output's folder."""
    if not obj.get("images"):
        return obj
    images = []
    for given, resolved in zip(obj["images"], record.images):
        keep = os.path.isabs(given) or "://" in given
        images.append(given if keep else os.path.relpath(resolved, out_dir))
    return {**obj, "images": images}


def run_score(args) -> int:
    from skyjax.data.records import RecordError, RecordReader
    from skyjax.eval.scorer import RowError, score_records

    t0 = time.time()
    reader = RecordReader(args.data, kind="score", on_error=args.on_error, max_kept_errors=sys.maxsize)
    try:
        records = list(reader)
    except RecordError as e:
        raise RowError(f"{e} (fix the line, or pass --on-error skip to skip bad rows and list them)") from None
    scorer = _scorer(args)
    log, done = _open_log(args, scorer)
    skipped: list = []
    try:
        scores = score_records(scorer, records, done=done, on_batch=log.append, on_error=args.on_error,
                               skipped=skipped, desc="score")
    except RowError as e:
        raise RowError(f"{e} (pass --on-error skip to skip such rows and list them)") from None
    finally:
        log.close()
    by_line = {r.line: (r, s) for r, s in zip(records, scores) if s is not None}
    out_dir = args.out.resolve().parent
    tmp = args.out.with_name(args.out.name + ".tmp")
    with open(args.data, encoding="utf-8") as src, tmp.open("w", encoding="utf-8") as dst:
        for lineno, text in enumerate(src, start=1):  # streamed: input order, every input field
            if lineno in by_line:
                record, extra = by_line[lineno]
                dst.write(json.dumps({**output_row(json.loads(text), record, out_dir), **extra},
                                     ensure_ascii=False) + "\n")
    os.replace(tmp, args.out)
    log.finish()
    n_skip = reader.num_skipped + len({s.where for s in skipped})
    msg = f"scored {len(by_line)} rows -> {args.out} in {time.time() - t0:.1f}s ({scorer.compiles} compiles)"
    if n_skip:
        msg += f"; skipped {n_skip}:\n" + _report(skipped, [str(e) for e in reader.errors]).rstrip("\n")
    print(msg, file=sys.stderr)
    return 0


def run_eval(args) -> int:
    from skyjax.eval import rewardbench, vl_rewardbench
    from skyjax.eval.common import BenchmarkFormatError, write_json
    from skyjax.eval.scorer import Conversation, RowError
    from skyjax.data.records import parse_record

    if args.benchmark in ("mathvista", "mmmu"):
        return reasoning_cli.run(args)
    t0 = time.time()
    try:
        if args.benchmark == "vl-rewardbench":
            bench = vl_rewardbench
            items = vl_rewardbench.load_vl_rewardbench(args.data, args.images)
            records = vl_rewardbench.to_preference_records(items, args.images)
        else:
            bench = rewardbench
            items = rewardbench.load_rewardbench(args.data)
            rewardbench._check_known(items)  # before any model time is spent on a run that cannot be summarized
            records = rewardbench.to_preference_records(items)
    except BenchmarkFormatError as e:
        raise RowError(str(e)) from None
    convs = []
    for n, (item, row) in enumerate(zip(items, records)):
        record = parse_record(row, kind="preference", source=item.source, line=item.line)
        for side in ("chosen", "rejected"):  # keyed by position: benchmark ids repeat
            convs.append(Conversation(record.conversation(side), tuple(record.images), item.where, (n, side)))
    scorer = _scorer(args)
    log, done = _open_log(args, scorer) if args.out else (None, {})
    skipped: list = []
    try:
        scores = scorer.score_conversations(convs, desc=args.benchmark, done=done, on_batch=log and log.append,
                                            on_error=args.on_error, skipped=skipped)
    except RowError as e:
        raise RowError(f"{e} (pass --on-error skip to leave such rows out of the metric and list them)") from None
    finally:
        if log:
            log.close()
    bad = {s.index // 2 for s in skipped}
    keep = [i for i in range(len(items)) if i not in bad]
    pairs = scores.reshape(-1, 2)
    result = bench.summarize([items[i] for i in keep], pairs[keep, 0], pairs[keep, 1])
    if skipped:
        result["skipped"] = list(dict.fromkeys(str(s) for s in skipped))
    print(bench.format_table(result["summary"]))
    msg = f"scored {len(keep)} pairs in {time.time() - t0:.1f}s ({scorer.compiles} compiles)"
    if skipped:
        msg += f"; skipped {len(bad)} (left out of the metric):\n" + _report(skipped).rstrip("\n")
    print(msg, file=sys.stderr)
    if args.out:
        write_json(result, args.out)
        log.finish()
        print(f"wrote {args.out}", file=sys.stderr)
    return 0
