"""`skyjax eval mathvista` and `skyjax eval mmmu`: sample k reasoning answers per question with a policy (R1V /
InternVL, Qwen2.5-VL) and report pass@1 = mean over rows of (correct samples / k), overall and per group.

Rows, prompts and scoring are in ``skyjax.eval.reasoning``; generation reuses ``skyjax generate``'s batching
(``skyjax.sample.cli``) and the KV-cache decoder. While the job runs, each finished batch is appended to
``OUT.partial.jsonl`` (one scored row per line), so a stopped job keeps what it did; at the end ``OUT`` holds the
summary and every row, and the partial file is removed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from skyjax.eval.common import BenchmarkFormatError

# Printed after the run; the JSON has every group.
TABLE_GROUPS = {"mathvista": ("question_type", "category", "task", "skills"),
                "mmmu": ("question_type", "discipline")}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of the reasoning benchmarks (the eval parser already has --model, --data, --out, --images,
    --batch-size, --dtype and --mesh)."""
    g = p.add_argument_group("mathvista / mmmu (reasoning answers of a policy)")
    g.add_argument("--num-samples", type=int, default=5,
                   help="samples per question; pass@1 is averaged over them (default 5, the papers' 5 runs)")
    g.add_argument("--max-new-tokens", type=int, default=65536,
                   help="tokens per sample at most (default 65536, the papers' 64K generation length; the KV cache "
                        "holds batch x samples x (prompt + this) tokens: lower it or --batch-size to fit)")
    g.add_argument("--temperature", type=float, default=0.6,
                   help="sampling temperature (default 0.6: the papers do not state it; 0.6 is what DeepSeek-R1, "
                        "whose guidelines R1V's evaluation follows, uses for pass@1 over k samples)")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus mass (default 0.95, DeepSeek-R1's setting)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed; a row's draws depend only on it and the "
                                                       "row's position in the file (default 0)")
    g.add_argument("--limit", type=int, default=None, help="evaluate only the first N rows of the file")
    # --on-error comes from the eval command's common flags (a bad row: stop naming file:line, or skip and list)
    g.add_argument("--image-placement", choices=["first", "inline"], default="first",
                   help="MMMU: images before the text, the <image k> references kept as text (default; R1V's chat "
                        "convention), or each image at its <image k> reference")


def run(args) -> int:
    try:
        return _run(args)
    except BenchmarkFormatError as e:  # bad input: one line naming the file and line, not a traceback
        print(f"skyjax eval {args.benchmark}: error: {e}", file=sys.stderr)
        return 2


def _log(msg: str) -> None:
    print(f"[eval] {msg}", file=sys.stderr, flush=True)


def _check_args(args) -> None:
    if args.num_samples < 1:
        raise BenchmarkFormatError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.batch_size < 1:
        raise BenchmarkFormatError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise BenchmarkFormatError(f"--limit must be >= 1, got {args.limit}")
    if args.num_samples > 1 and args.temperature == 0:
        _log("warning: --num-samples > 1 with --temperature 0 (greedy) gives identical samples")


class ModelCompleter:
    """k completions per item from a model folder or checkpoint, one compiled program for every batch. Rows that
    cannot be run (an unreadable image, a prompt too long) raise, or with on_error "skip" come back as None and
    their messages go to ``bad``."""

    def __init__(self, args):
        import jax

        from skyjax.convert.checkpoint import load_model
        from skyjax.data.tokenizer import load_tokenizer
        from skyjax.parallel import make_mesh, use_mesh
        from skyjax.sample.adapters import adapter_for
        from skyjax.sample.cli import default_stop_ids
        from skyjax.sample.decode import Sampling

        t0 = time.time()
        self.mesh = make_mesh(args.mesh)
        with use_mesh(self.mesh):
            model = load_model(args.model, mesh=self.mesh, dtype=args.dtype)
        self.model, self.adapter = model, adapter_for(model)
        if not self.adapter.supports_images:
            raise BenchmarkFormatError(f"{args.model} is a text-only model ({self.adapter.name}); "
                                       f"{args.benchmark} questions have images")
        self.tokenizer = load_tokenizer(model.folder)
        stop_ids = default_stop_ids(model, self.tokenizer)
        try:
            self.sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                     top_p=args.top_p, stop_token_ids=tuple(stop_ids), num_samples=args.num_samples)
        except ValueError as e:
            raise BenchmarkFormatError(f"bad sampling option: {e}") from None
        self.root = jax.random.key(args.seed)
        self.batch_size, self.on_error = args.batch_size, args.on_error
        self.bad: list[str] = []
        _log(f"{model.arch.name} from {args.model} on mesh {dict(self.mesh.shape)}, stop ids {stop_ids}, "
             f"loaded in {time.time() - t0:.1f}s")

    def _skip(self, message: str) -> None:
        if self.on_error == "raise":
            raise BenchmarkFormatError(message)
        self.bad.append(message)

    def __call__(self, items):
        import jax
        import numpy as np

        from skyjax.eval.reasoning import open_image
        from skyjax.parallel import use_mesh
        from skyjax.sample.cli import _completion, _pad_batch, _prepare, _Row
        from skyjax.sample.decode import generate

        rows = []
        for item in items:
            try:
                images = [open_image(src, item.where) for src in item.image_sequence()]
            except BenchmarkFormatError as e:
                self._skip(str(e))
                continue
            rows.append(_Row(item.line, None, item, images, 1.0))  # the item serves as the record
        by_index: dict[int, list[dict]] = {}
        if rows:
            bad: list = []
            try:
                rows, inputs = _prepare(self.adapter, rows, self.tokenizer, self.on_error, bad)
            except ValueError as e:  # on_error "raise": the prompt does not fit, or the template fails
                raise BenchmarkFormatError(str(e)) from None
            self.bad.extend(msg for _, msg in bad)
        if rows:
            n = len(rows)
            inputs = _pad_batch(inputs, self.batch_size)
            index = [r.record.index for r in rows] + [0] * (self.batch_size - n)
            keys = jax.vmap(lambda i: jax.random.fold_in(self.root, i))(np.asarray(index, np.int32))
            with use_mesh(self.mesh):
                out = generate(self.adapter, self.model.params, inputs, self.sampling, prompt_keys=keys, check=False)
            tokens, lengths, stopped = (np.asarray(x) for x in (out.tokens, out.lengths, out.stopped))
            g = self.sampling.num_samples
            for i, r in enumerate(rows):
                comps = []
                for j in range(i * g, (i + 1) * g):
                    c = _completion(self.tokenizer, tokens[j, : lengths[j]].tolist(), bool(stopped[j]))
                    del c["token_ids"]  # the text is what is scored; ids would dominate the output's size
                    comps.append(c)
                by_index[r.record.index] = comps
        return [by_index.get(item.index) for item in items]


def _run(args) -> int:
    import jax
    from tqdm import tqdm

    from skyjax.eval import reasoning
    from skyjax.eval.common import write_json

    _check_args(args)
    t0 = time.time()
    items, skipped = reasoning.load_items(args.benchmark, args.data, images_dir=args.images,
                                          on_error=args.on_error, limit=args.limit,
                                          image_placement=args.image_placement)
    for msg in skipped:
        _log(f"skipping {msg}")
    if not items:
        raise BenchmarkFormatError(f"{args.data}: no usable rows")
    completer = ModelCompleter(args)
    lead = jax.process_index() == 0  # every host runs the model; one writes
    partial = None
    if args.out is not None and lead:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        partial = args.out.with_name(args.out.stem + ".partial.jsonl")
        partial.write_text("")
    bar = tqdm(total=len(items), desc=args.benchmark, unit="row", file=sys.stderr, disable=not lead)
    state = {"rows": 0, "sum": 0.0}

    def on_batch(done: list[dict], n_items: int) -> None:
        if partial is not None:
            with partial.open("a", encoding="utf-8") as f:
                f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in done)
        state["rows"] += len(done)
        state["sum"] += sum(row["pass@1"] for row in done)
        bar.update(n_items)
        if state["rows"]:
            bar.set_postfix({"pass@1": f"{100 * state['sum'] / state['rows']:.1f}%"})

    result = reasoning.evaluate(items, completer, args.num_samples, batch_size=args.batch_size,
                                on_batch=on_batch)
    bar.close()
    skipped += completer.bad
    summary = result["summary"]
    summary["benchmark"] = args.benchmark
    summary["skipped"] = {"count": len(skipped), "rows": skipped}
    summary["settings"] = {"model": str(args.model), "data": str(args.data), "num_samples": args.num_samples,
                           "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                           "top_p": args.top_p, "seed": args.seed, "limit": args.limit,
                           "image_placement": args.image_placement}
    summary["seconds"] = round(time.time() - t0, 1)
    if lead:
        print(reasoning.format_table(summary, TABLE_GROUPS[args.benchmark]))
        if skipped:
            _log(f"skipped {len(skipped)} row(s)")
        if args.out is not None:
            write_json({"summary": summary, "rows": result["rows"]}, args.out)
            partial.unlink(missing_ok=True)
            _log(f"wrote {args.out}")
    return 0
