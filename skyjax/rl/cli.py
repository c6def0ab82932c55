"""`skyjax distill`: adaptive-length chain-of-thought distillation (AL-CoTD) over a JSONL file of questions.

Scores every row (image clarity, S_v, S_t, S_I from a judge), min-max normalises them over the file and computes the
row's sampling repetition penalty P = min(2, exp(alpha * (1 - (S_v + beta*S_t + gamma*S_I) / (1 + beta + gamma)))).
Without --self-distill each output row is the input row with the scores in meta.distill and P in
meta.repetition_penalty (what `skyjax generate` reads). With --self-distill the model samples <think> chains with each
row's P, keeps the verified ones, resamples wrong rows with the answer hinted (up to --max-rewrites times) and writes
SFT records, plus OUT's report (.report.json beside it). A stopped job resumes: rerun the same command (finished rows
are kept in OUT.partial.jsonl). See docs/distill.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

from skyjax.rl.distill import DRLCConfig

EXAMPLE = """example:
  skyjax distill --data questions.jsonl --out scored.jsonl --judge heuristic
  skyjax distill --model ckpt/r1v --data questions.jsonl --out sft.jsonl --self-distill \\
      --max-new-tokens 4096 --temperature 0.6 --top-p 0.95 --num-samples 4 --max-rewrites 2
  OPENAI_API_KEY=... skyjax distill --data q.jsonl --out scored.jsonl --judge endpoint \\
      --judge-url https://api.openai.com/v1/chat/completions --judge-model gpt-4o

input line:  {"images": ["img/incline.png"], "prompt": "Why does the block slide?", "answer": "B",
              "meta": {"choices": ["...", "..."]}}
output line: the input with "meta": {..., "distill": {"clarity", "s_v", "s_t", "s_i", "s_v_norm", "s_t_norm",
              "s_i_norm", "penalty", "judge"}, "repetition_penalty": P} (scoring only), or an SFT record
              {"prompt", "completion", ...} (--self-distill)"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    from skyjax.cli import add_mesh_arg

    p = subparsers.add_parser(
        "distill", help="AL-CoTD: score questions, per-row repetition penalty, self-distilled <think> SFT data",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[0] + "\n\n" + EXAMPLE)
    p.add_argument("--model", type=Path, default=None,
                   help="Hugging Face folder or skyjax checkpoint (needed by --self-distill and --judge model)")
    p.add_argument("--data", required=True, type=Path, help="input JSONL (prompt, optional images / answer / meta)")
    p.add_argument("--out", required=True, type=Path, help="output JSONL")
    p.add_argument("--judge", default="heuristic",
                   help="who scores the queries: heuristic (default; local, no model), model (the --model policy), "
                        "endpoint (an OpenAI-compatible service), or package.module:MyJudge")
    p.add_argument("--judge-url", default=None, help="endpoint judge: full chat-completions URL")
    p.add_argument("--judge-model", default=None, help="endpoint judge: model name sent in the request")
    p.add_argument("--judge-api-key-env", default="OPENAI_API_KEY",
                   help="endpoint judge: environment variable holding the API key (default OPENAI_API_KEY)")
    p.add_argument("--judge-timeout", type=float, default=60.0, help="endpoint judge: seconds per request (60)")
    p.add_argument("--judge-retries", type=int, default=3, help="endpoint judge: retries after a failure (3)")
    p.add_argument("--judge-workers", type=int, default=4, help="endpoint judge: requests in flight at once (4)")
    p.add_argument("--judge-rate", action="store_true",
                   help="model judge: also ask the policy for 0..10 ratings (S_t, S_I, image relevance) instead of "
                        "the text heuristics")
    p.add_argument("--judge-max-new-tokens", type=int, default=1024,
                   help="model judge with --judge-rate: tokens for the rating answer (1024)")
    d = DRLCConfig()
    p.add_argument("--alpha", type=float, default=d.alpha, help=f"DRLC alpha (default ln 2 = {d.alpha:.4f})")
    p.add_argument("--beta", type=float, default=d.beta, help="weight of the text score (default 1)")
    p.add_argument("--gamma", type=float, default=d.gamma, help="weight of the integration score (default 1)")
    p.add_argument("--self-distill", action="store_true", help="sample, verify and rewrite chains; write SFT records")
    p.add_argument("--max-new-tokens", type=int, default=4096, help="tokens per chain at most (4096)")
    p.add_argument("--temperature", type=float, default=0.6, help="sampling temperature (0.6; 0 = greedy)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus mass (0.95)")
    p.add_argument("--top-k", type=int, default=0, help="top-k (0 = off)")
    p.add_argument("--num-samples", type=int, default=1, help="chains sampled per row and round (1)")
    p.add_argument("--max-rewrites", type=int, default=2,
                   help="rounds of hinted resampling for rows without a verified chain (2)")
    p.add_argument("--choices-key", default="choices", help="meta key with multiple-choice options (choices)")
    p.add_argument("--quantiles", type=int, default=4, help="penalty bins of the report (4)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (0)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per judged / generated batch (8)")
    p.add_argument("--stop-token-ids", type=lambda s: [int(x) for x in s.split(",") if x.strip()], default=None,
                   help="comma-separated stop ids (default: the checkpoint's eos ids)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="compute dtype")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_mesh_arg(p)
    p.set_defaults(func=_cmd_distill)
    return p


def _cmd_distill(args) -> int:
    from skyjax.rl.judge import JudgeError

    try:
        return run(args)
    except (ValueError, JudgeError) as e:  # bad rows, bad flags, judge failures: one line naming the row
        print(f"skyjax distill: error: {e}", file=sys.stderr)
        return 2


def _log(msg: str) -> None:
    print(f"[distill] {msg}", file=sys.stderr, flush=True)


def report_path(out: Path) -> Path:
    return out.with_name(out.stem + ".report.json")


def _model_generate_fn(args, loaded, tokenizer, adapter):
    from skyjax.rl.distill_run import model_generator
    from skyjax.sample.cli import default_stop_ids
    from skyjax.sample.decode import Sampling

    stop = args.stop_token_ids if args.stop_token_ids is not None else default_stop_ids(loaded, tokenizer)
    sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, stop_token_ids=tuple(stop), num_samples=args.num_samples)
    if args.temperature == 0 and (args.num_samples > 1 or args.max_rewrites > 0):
        _log("warning: greedy decoding repeats the same chain; hinted rewrites differ only by the hint")
    return model_generator(loaded, tokenizer, adapter, sampling, batch_size=args.batch_size, seed=args.seed)


def run(args, generate_fn=None) -> int:
    """The command; `generate_fn` replaces the model's generator (tests script the chains with it)."""
    from skyjax.rl.distill_run import distill_file, read_rows
    from skyjax.rl.judge import make_judge

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    config = DRLCConfig(alpha=args.alpha, beta=args.beta, gamma=args.gamma)
    if config.alpha < 0 or config.beta < 0 or config.gamma < 0:
        raise ValueError("--alpha, --beta and --gamma must be >= 0")
    needs_model = args.judge == "model" or (args.self_distill and generate_fn is None)
    if needs_model and args.model is None:
        raise ValueError("--model is needed by --self-distill and --judge model")
    t0 = time.time()
    rows = read_rows(args.data)
    _log(f"{len(rows)} rows from {args.data}")

    loaded = tokenizer = adapter = mesh = None
    if needs_model:
        from skyjax.convert.checkpoint import load_model
        from skyjax.data.tokenizer import load_tokenizer
        from skyjax.parallel import make_mesh, use_mesh
        from skyjax.sample.adapters import adapter_for

        mesh = make_mesh(args.mesh)
        with use_mesh(mesh):
            loaded = load_model(args.model, mesh=mesh, dtype=args.dtype)
        adapter = adapter_for(loaded)
        tokenizer = load_tokenizer(loaded.folder)
        image_rows = [r.where for r in rows if r.images]
        if image_rows and not adapter.supports_images:
            raise ValueError(f"{image_rows[0]}: the row has images, but {adapter.name} is a text-only model")
        _log(f"{loaded.arch.name} from {args.model} on mesh {dict(mesh.shape)}")
    judge = make_judge(args.judge, loaded=loaded, tokenizer=tokenizer, adapter=adapter, url=args.judge_url,
                       model=args.judge_model, api_key_env=args.judge_api_key_env, timeout=args.judge_timeout,
                       max_retries=args.judge_retries, workers=args.judge_workers, rate=args.judge_rate,
                       rate_tokens=args.judge_max_new_tokens)

    total = len(rows) * (2 if args.self_distill else 1)  # one bar for the job: scoring, then generation
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="distill", unit="row", file=sys.stderr, mininterval=1.0)
    tick = bar.update if bar is not None else (lambda n: None)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with contextlib.ExitStack() as stack:
            if mesh is not None:  # the model's programs (judge forward, generation) run on the model's mesh
                from skyjax.parallel import use_mesh

                stack.enter_context(use_mesh(mesh))
            if args.self_distill and generate_fn is None:
                generate_fn = _model_generate_fn(args, loaded, tokenizer, adapter)
            report = distill_file(rows, judge, config, args.out, job=job_of(args, judge.name),
                                  generate_fn=generate_fn if args.self_distill else None,
                                  max_rewrites=args.max_rewrites, batch_size=args.batch_size,
                                  choices_key=args.choices_key, quantiles=args.quantiles, tick=tick)
    finally:
        if bar is not None:
            bar.close()
    if not args.self_distill:
        _log(f"wrote {len(rows)} scored rows to {args.out} in {time.time() - t0:.1f}s")
        return 0
    report = {"data": str(args.data), "out": str(args.out), "judge": judge.name,
              "alpha": config.alpha, "beta": config.beta, "gamma": config.gamma, **report}
    report_path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    _log(f"kept {report['kept']}, rewritten {report['rewritten']}, dropped {report['dropped']} of {len(rows)} rows; "
         f"wrote {report['kept'] + report['rewritten']} SFT records to {args.out} and {report_path(args.out)} "
         f"in {time.time() - t0:.1f}s")
    return 0


def job_of(args, judge_name: str) -> dict:
    """What a resumed job must share with the one that wrote OUT.partial.jsonl: the input file, the judge and the
    DRLC weights, and with --self-distill the model and every setting that changes a chain (not --batch-size, not
    --quantiles: sampling is keyed by input line, the report is computed at the end)."""
    from skyjax.eval.score_log import file_identity

    job = {**file_identity(args.data), "judge": judge_name, "judge_url": args.judge_url,
           "judge_model": args.judge_model, "judge_rate": args.judge_rate,
           "alpha": args.alpha, "beta": args.beta, "gamma": args.gamma, "self_distill": args.self_distill}
    if args.self_distill:
        job.update(model=None if args.model is None else str(Path(args.model).resolve()),
                   max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   top_k=args.top_k, num_samples=args.num_samples, max_rewrites=args.max_rewrites, seed=args.seed,
                   choices_key=args.choices_key, stop_token_ids=args.stop_token_ids, dtype=args.dtype)
    return job
