"""`skyjax generate`: complete the prompts of a JSONL file with a Qwen2, Qwen2.5-VL or Skywork R1V / InternVL model
(Hugging Face folder or skyjax checkpoint).

Input rows are skyjax records (skyjax.data.records: `prompt` string or messages, optional `images` relative to
the JSONL's folder, optional `answer`, `id`, `meta`). Each output row is the input object plus

    text, token_ids (the stop token included when one ended the row), num_tokens, finish_reason ('stop'|'length')

or, with --num-samples G, `samples`: a list of G such objects. A row's `meta.repetition_penalty` (a number)
overrides --repetition-penalty for that row (AL-CoTD's per-prompt penalty). Rows that cannot be used (bad JSON,
missing image, unknown key, too long) are reported on stderr with their line number and skipped
(--on-error raise stops instead). Sampling is keyed by seed and input line, so the output does not depend on
--batch-size or --mesh.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

EXAMPLE = """example:
  skyjax generate --model ckpt/qwen2_5_vl_7b --data prompts.jsonl --out completions.jsonl \\
      --max-new-tokens 512 --temperature 1.0 --top-p 0.95 --num-samples 8 --seed 0

input line:  {"images": ["img/cat.png"], "prompt": "What animal is this?", "id": 7}
output line: {"images": [...], "prompt": "...", "id": 7, "text": "A cat.", "token_ids": [...],
              "num_tokens": 5, "finish_reason": "stop"}"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    from skyjax.cli import add_mesh_arg

    p = subparsers.add_parser(
        "generate", help="complete JSONL prompts (text or images) with a KV-cache decoder",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[0] + "\n\n" + EXAMPLE)
    p.add_argument("--model", required=True, type=Path, help="Hugging Face model folder or skyjax checkpoint")
    p.add_argument("--data", required=True, type=Path, help="input JSONL (one record per line)")
    p.add_argument("--out", required=True, type=Path, help="output JSONL")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens to generate at most per row (256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); 1.0 samples the model")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability (0 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="HF repetition penalty (1 = off); a row's meta.repetition_penalty overrides it")
    p.add_argument("--num-samples", type=int, default=1, help="completions per prompt (prefilled once)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--stop-token-ids", type=lambda s: [int(x) for x in s.split(",") if x.strip()], default=None,
                   help="comma-separated stop ids (default: the checkpoint's eos ids and the tokenizer's eos)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="compute dtype (default: the checkpoint's dtype)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per compiled batch (default 8)")
    p.add_argument("--logprobs", action="store_true", help="also write each token's raw model log-probability")
    p.add_argument("--on-error", choices=["skip", "raise"], default="skip",
                   help="bad rows: report and skip (default), or stop with the error")
    add_mesh_arg(p)
    p.set_defaults(func=_cmd_generate)
    return p


def _cmd_generate(args) -> int:
    try:
        return run(args)
    except ValueError as e:  # bad input with --on-error raise, bad flags: one line, not a traceback
        print(f"skyjax generate: error: {e}", file=sys.stderr)
        return 2


def _log(msg: str) -> None:
    print(f"[generate] {msg}", file=sys.stderr, flush=True)


def default_stop_ids(model, tokenizer) -> list[int]:
    """eos ids of generation_config.json (what HF generate stops on), config.json and the tokenizer."""
    ids: list[int] = []

    def add(value):
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, int) and v not in ids:
                ids.append(v)

    gen = Path(model.folder) / "generation_config.json"
    if gen.is_file():
        try:
            add(json.loads(gen.read_text()).get("eos_token_id"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{gen}: invalid JSON ({e})") from e
    text = getattr(model.config, "text", model.config)
    add(text.eos_token_id)
    add(tokenizer.eos_token_id)
    return ids


class _Row:
    __slots__ = ("line", "obj", "record", "images", "penalty")

    def __init__(self, line, obj, record, images, penalty):
        self.line, self.obj, self.record, self.images, self.penalty = line, obj, record, images, penalty


def _read_rows(path: Path, adapter, default_penalty: float, on_error: str, bad: list):
    """Yield usable rows; bad ones go to `bad` as (line, message) (or raise with --on-error raise)."""
    from skyjax.data.qwen_vl_image import load_image
    from skyjax.data.records import RecordError, parse_record

    base = path.resolve().parent
    with open(path, encoding="utf-8") as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as e:
                    raise RecordError(str(path), line, None, "json", f"malformed JSON: {e.msg} (column {e.colno})")
                record = parse_record(obj, kind="generate", base_dir=base, source=str(path), line=line)
                if record.images and not adapter.supports_images:
                    raise ValueError(f"{len(record.images)} image(s), but {adapter.name} is a text-only model")
                penalty = default_penalty
                meta_penalty = (record.meta or {}).get("repetition_penalty")
                if meta_penalty is not None:
                    if isinstance(meta_penalty, bool) or not isinstance(meta_penalty, (int, float)) \
                            or not meta_penalty > 0:
                        raise ValueError(f"meta.repetition_penalty must be a number > 0, got {meta_penalty!r}")
                    penalty = float(meta_penalty)
                images = [load_image(p) for p in record.images]
            except Exception as e:  # noqa: BLE001 -- every row error is reported with its line
                if on_error == "raise":
                    raise
                msg = str(e) if isinstance(e, RecordError) else f"{path}:{line}: {e}"
                bad.append((line, msg))
                _log(f"skipping line {line}: {msg}")
                continue
            yield _Row(line, obj, record, images, penalty)


def _prepare(adapter, rows, tokenizer, on_error: str, bad: list):
    """Model inputs for `rows`; a row that breaks the batch is found by preparing rows one by one."""
    try:
        inputs = adapter.prepare([r.record.conversation() for r in rows], [r.images for r in rows], tokenizer)
        adapter.check(inputs)
        return rows, inputs
    except ValueError:
        pass  # find the culprit(s) row by row
    good = []
    for r in rows:
        try:
            adapter.check(adapter.prepare([r.record.conversation()], [r.images], tokenizer))
            good.append(r)
        except ValueError as e:
            if on_error == "raise":
                raise ValueError(f"{r.record.source}:{r.line}: {e}") from e
            msg = f"{r.record.source}:{r.line}: {e}"
            bad.append((r.line, msg))
            _log(f"skipping line {r.line}: {msg}")
    if not good:
        return [], None
    inputs = adapter.prepare([r.record.conversation() for r in good], [r.images for r in good], tokenizer)
    adapter.check(inputs)
    return good, inputs


def _pad_batch(inputs: dict, batch_size: int) -> dict:
    """Append empty rows (all padding, no real token) up to the static batch size; their outputs are dropped."""
    import numpy as np

    n, width = inputs["input_ids"].shape
    if n == batch_size:
        return inputs
    extra = batch_size - n
    return {**inputs,
            "input_ids": np.concatenate([inputs["input_ids"], np.zeros((extra, width), np.int32)]),
            "attention_mask": np.concatenate([inputs["attention_mask"], np.zeros((extra, width), bool)])}


def _completion(tokenizer, ids: list[int], stopped: bool, logprobs=None) -> dict:
    text_ids = ids[:-1] if stopped else ids
    out = {"text": tokenizer.decode(text_ids, skip_special_tokens=True), "token_ids": ids, "num_tokens": len(ids),
           "finish_reason": "stop" if stopped else "length"}
    if logprobs is not None:
        out["logprobs"] = [round(float(x), 6) for x in logprobs]
    return out


def run(args) -> int:
    import jax
    import numpy as np

    from skyjax.convert.checkpoint import load_model
    from skyjax.data.tokenizer import load_tokenizer
    from skyjax.parallel import make_mesh, use_mesh
    from skyjax.sample.adapters import adapter_for
    from skyjax.sample.decode import Sampling, generate
    from skyjax.sample.processors import ProcessorFlags
    from skyjax.progress import JobProgress

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    t0 = time.time()
    mesh = make_mesh(args.mesh)
    with use_mesh(mesh):
        model = load_model(args.model, mesh=mesh, dtype=args.dtype)
    adapter = adapter_for(model)
    tokenizer = load_tokenizer(model.folder)
    stop_ids = args.stop_token_ids if args.stop_token_ids is not None else default_stop_ids(model, tokenizer)
    base = Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                    stop_token_ids=tuple(stop_ids), num_samples=args.num_samples)  # validates the flags
    if args.num_samples > 1 and args.temperature == 0:
        _log("warning: --num-samples > 1 with --temperature 0 (greedy) gives identical samples")
    _log(f"{model.arch.name} from {args.model} on mesh {dict(mesh.shape)} ({model.config.param_dtype} params), "
         f"stop ids {stop_ids}, loaded in {time.time() - t0:.1f}s")

    # one program for every batch: the penalty is compiled in whatever a batch's rows ask for (meta overrides)
    rows0 = base.rows(1)
    flags = ProcessorFlags.from_rows(rows0["temperature"], rows0["top_k"], rows0["top_p"], rows0["min_p"],
                                     rows0["repetition_penalty"], adapter.vocab_size)
    flags = flags.union(ProcessorFlags(penalty=True))
    root = jax.random.key(args.seed)
    bad: list = []
    n_rows = n_tokens = 0
    t_gen = time.time()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows_iter = _read_rows(args.data, adapter, args.repetition_penalty, args.on_error, bad)
    with open(args.data, encoding="utf-8") as f:
        total = sum(1 for text in f if text.strip())  # the bar's total: every non-blank line (bad ones included)
    bar = JobProgress(total, "generate")
    with open(args.out, "w", encoding="utf-8") as out_file, use_mesh(mesh), bar:
        while True:
            n_bad = len(bad)
            chunk = [r for _, r in zip(range(args.batch_size), rows_iter)]
            consumed = len(chunk) + len(bad) - n_bad  # lines this batch took: its rows and the bad lines read
            if not chunk:
                bar.update(consumed)
                break
            rows, inputs = _prepare(adapter, chunk, tokenizer, args.on_error, bad)
            if not rows:
                bar.update(consumed)
                continue
            n = len(rows)
            inputs = _pad_batch(inputs, args.batch_size)
            penalties = [r.penalty for r in rows] + [1.0] * (args.batch_size - n)
            sampling = dataclasses.replace(base, repetition_penalty=tuple(penalties))
            lines = [r.line for r in rows] + [0] * (args.batch_size - n)
            keys = jax.vmap(lambda i: jax.random.fold_in(root, i))(np.asarray(lines, np.int32))
            with bar.step(tuple(np.shape(v) for v in jax.tree_util.tree_leaves(inputs))):
                out = generate(adapter, model.params, inputs, sampling, prompt_keys=keys, flags=flags, check=False)
                tokens = np.asarray(out.tokens)  # wait for the batch inside the step: compiling shows until then
            lengths, stopped = np.asarray(out.lengths), np.asarray(out.stopped)
            logprobs = np.asarray(out.logprobs) if args.logprobs else None
            g = args.num_samples
            for i, r in enumerate(rows):
                comps = []
                for j in range(i * g, i * g + g):
                    ids = tokens[j, : lengths[j]].tolist()
                    comps.append(_completion(tokenizer, ids, bool(stopped[j]),
                                             None if logprobs is None else logprobs[j, : lengths[j]]))
                    n_tokens += len(ids)
                row = dict(r.obj)
                row.update(comps[0] if g == 1 else {"samples": comps})
                out_file.write(json.dumps(row, ensure_ascii=False) + "\n")
            out_file.flush()
            n_rows += n
            bar.update(consumed)
    dt = time.time() - t_gen
    _log(f"wrote {n_rows} rows to {args.out} in {time.time() - t0:.1f}s ({n_tokens} tokens, "
         f"{n_tokens / max(dt, 1e-9):.1f} tokens/s, {bar.compiles} batch shapes)" +
         (f"; skipped {len(bad)} bad row(s) at line(s) {[b[0] for b in bad]}" if bad else ""))
    return 0
