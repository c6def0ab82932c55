"""`skyjax score` and `skyjax eval {vl-rewardbench,rewardbench}`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from skyjax.cli import add_mesh_arg
from skyjax.eval import reasoning_cli


def _common(p: argparse.ArgumentParser):
    p.add_argument("--model", required=True, type=Path, help="reward model: Hugging Face folder or skyjax checkpoint")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="compute dtype (default: the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per batch (default 8)")
    add_mesh_arg(p)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "score", help="score JSONL rows with a reward model",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Rows carry `response` (output adds `score`) or a `chosen`/`rejected` pair (output adds "
                    "`score_chosen` and `score_rejected`); images are relative to the JSONL file's folder.\n\n"
                    "example:\n  skyjax score --model runs/reward_demo/hf --data pairs.jsonl --out scored.jsonl")
    _common(p)
    p.add_argument("--data", required=True, type=Path, help="input JSONL")
    p.add_argument("--out", required=True, type=Path, help="output JSONL (input fields + scores)")
    p.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                   help="a bad row (missing image, malformed record, too long) stops the run, or is skipped and "
                        "counted (default raise)")
    p.set_defaults(func=run_score)

    p = sub.add_parser(
        "eval", help="benchmarks: VL-RewardBench, RewardBench (reward models); MathVista, MMMU (policies)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Score a benchmark in its own format and report its accuracies exactly as it defines them.\n\n"
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
    p.add_argument("--out", type=Path, default=None, help="write the summary and every row's scores (JSON)")
    reasoning_cli.add_arguments(p)
    p.set_defaults(func=run_eval)


def run_score(args) -> int:
    from skyjax.data.records import read_jsonl_records
    from skyjax.eval.scorer import RewardScorer, RowError, conversations_of, score_records

    reader = read_jsonl_records(args.data, kind="score", on_error=args.on_error)
    records = list(reader)
    raw = [json.loads(line) for line in args.data.read_text().splitlines()]
    skipped = dict(reader.skipped)
    scorer = RewardScorer(args.model, mesh_shape=args.mesh, dtype=args.dtype, batch_size=args.batch_size)
    kept = []
    for record in records:  # images are opened per row first, so one bad file is reported by its line
        try:
            for conv in conversations_of(record):
                scorer._images(conv)
            kept.append(record)
        except RowError as e:
            if args.on_error == "raise":
                raise
            print(f"skipped: {e}", file=sys.stderr)
            skipped["image"] = skipped.get("image", 0) + 1
    scores = score_records(scorer, kept)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w") as f:
        for record, extra in zip(kept, scores):
            f.write(json.dumps({**raw_row(raw, record), **extra}) + "\n")
    n_skip = sum(skipped.values())
    print(f"scored {len(kept)} rows -> {args.out}" + (f"; skipped {n_skip} ({skipped})" if n_skip else ""),
          file=sys.stderr)
    return 0


def raw_row(raw: list[dict], record) -> dict:
    """The input row as it was written (the output keeps every input field)."""
    return raw[record.line - 1] if 0 < record.line <= len(raw) else {}


def run_eval(args) -> int:
    from skyjax.eval import rewardbench, vl_rewardbench
    from skyjax.eval.common import write_json
    from skyjax.eval.scorer import RewardScorer

    if args.benchmark in ("mathvista", "mmmu"):
        return reasoning_cli.run(args)
    scorer = RewardScorer(args.model, mesh_shape=args.mesh, dtype=args.dtype, batch_size=args.batch_size)
    if args.benchmark == "vl-rewardbench":
        items = vl_rewardbench.load_vl_rewardbench(args.data, args.images)
        result = vl_rewardbench.evaluate(items, scorer, images_dir=args.images, batch_size=max(args.batch_size, 16))
        print(vl_rewardbench.format_table(result["summary"]))
    else:
        items = rewardbench.load_rewardbench(args.data)
        result = rewardbench.evaluate(items, scorer, batch_size=max(args.batch_size, 16))
        print(rewardbench.format_table(result["summary"]))
    if args.out:
        write_json(result, args.out)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0
