"""`skyjax pairs`: preference pairs for MPO, sampled from a policy and ranked by a reward model (docs/pairs.md).

Samples N responses per prompt with the policy (Skywork R1V / InternVL, Qwen2.5-VL or Qwen2), scores every response
with a Skywork-VL reward model (both see the row's images), checks each response against the row's `answer` when it
has one (skyjax.eval.verifiers, as GRPO's accuracy reward and distillation do) and writes one best-vs-worst pair per
prompt in the preference record format (skyjax.data.records) that `skyjax score` and MPO read.

Selection (`select_pair`): chosen = the best-scored response; with an `answer`, the best-scored CORRECT one (a
wrong answer is never chosen). rejected = the worst-scored response whose text differs from chosen's; with an
`answer`, the worst-scored WRONG one when there is one, else the worst-scored other correct one. A pair is written
only when its reward margin (score chosen - score rejected) is > 0 and >= --min-margin, for verified pairs too (the
reward model must agree with the verifier). Identical texts never make a pair.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from skyjax.errors import UserError

EXAMPLE = """example:
  skyjax pairs --policy runs/r1v_sft/hf --reward-model runs/reward/hf --data prompts.jsonl \\
      --out mpo/pairs.jsonl --num-samples 8 --min-margin 0.5 --temperature 1.0 --top-p 0.95 \\
      --max-new-tokens 1024 --seed 0

input line:  {"images": ["img/chart.png"], "prompt": "What is the largest bar?", "answer": "B",
              "meta": {"choices": ["2019", "2020"]}}
output line: {"images": ["../img/chart.png"], "prompt": "...", "chosen": "<think>...</think> B",
              "rejected": "<think>...</think> A", "answer": "B", "id": "prompts.jsonl:1",
              "meta": {"choices": [...], "pairs": {"responses": [...], "scores": [...], "correct": [...],
                       "chosen_index": 2, "rejected_index": 0, "margin": 1.7, "rule": "verified", ...}}}"""

# why a prompt gave no pair (the keys of the report's "dropped")
BAD_ROW = "bad row"
NO_CORRECT = "no correct response"
IDENTICAL = "all responses identical"
LOW_MARGIN = "margin below --min-margin"
UNSCORABLE = "responses not scorable"
REASONS = (BAD_ROW, NO_CORRECT, IDENTICAL, LOW_MARGIN, UNSCORABLE)


class PairsError(UserError, ValueError):
    """A bad flag or input for `skyjax pairs`; the message names the flag, or the file:line and key."""


@dataclass(frozen=True)
class PairsConfig:
    """Sampling (as `skyjax generate`), scoring (as `skyjax score`) and selection settings of `build_pairs`."""

    num_samples: int = 4  # responses sampled per prompt (>= 2)
    min_margin: float = 0.0  # a pair needs score(chosen) - score(rejected) > 0 and >= min_margin
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # a row's meta.repetition_penalty overrides it (as in `skyjax generate`)
    seed: int = 0  # samples are keyed by (seed, input line): independent of batch_size and mesh
    batch_size: int = 8  # prompts per generation batch
    stop_token_ids: tuple[int, ...] | None = None  # default: the policy's eos ids
    dtype: str | None = None  # compute dtype of both models (default: each checkpoint's)
    mesh_shape: tuple[int, ...] = (1, -1, 1)
    score_batch_size: int = 64  # most rows in one reward-model batch
    max_batch_tokens: int | None = None  # reward-model token budget per batch (default as `skyjax score`)
    max_length: int | None = None  # longest prompt + response the reward model scores
    on_error: str = "raise"  # a bad row stops the job naming file:line ("raise"), or is skipped and counted
    choices_key: str = "choices"  # meta key of a multiple-choice row's options (for the verifier)

    def sampling(self, stop_token_ids: Sequence[int] = ()):
        """The `skyjax.sample.decode.Sampling` of these settings (validates them)."""
        from skyjax.sample.decode import Sampling

        try:
            return Sampling(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                            top_p=self.top_p, min_p=self.min_p, repetition_penalty=self.repetition_penalty,
                            stop_token_ids=tuple(stop_token_ids), num_samples=self.num_samples)
        except ValueError as e:
            raise PairsError(f"bad sampling flag: {e}") from None

    def validate(self) -> None:
        if self.num_samples < 2:
            raise PairsError(f"--num-samples must be >= 2 (a pair needs two responses), got {self.num_samples}")
        if not math.isfinite(self.min_margin) or self.min_margin < 0:
            raise PairsError(f"--min-margin must be a number >= 0, got {self.min_margin}")
        if self.batch_size < 1 or self.score_batch_size < 1:
            raise PairsError("--batch-size and --score-batch-size must be >= 1")
        if self.on_error not in ("raise", "skip"):
            raise PairsError(f"--on-error must be 'raise' or 'skip', got {self.on_error!r}")
        self.sampling()


# ------------------------------------------------------------------------------------------------------- selection


@dataclass(frozen=True)
class Selection:
    """The pair picked from one prompt's responses (indices into them), or why there is none (`reason`)."""

    chosen: int | None = None
    rejected: int | None = None
    margin: float | None = None
    rule: str | None = None  # "verified": correct chosen vs wrong rejected; "reward": the reward model alone
    reason: str | None = None  # one of REASONS when no pair is written

    @property
    def kept(self) -> bool:
        return self.reason is None


def select_pair(texts: Sequence[str], scores: Sequence[float], correct: Sequence[bool] | None,
                min_margin: float = 0.0) -> Selection:
    """The best-vs-worst pair of one prompt's responses (module docstring; docs/pairs.md).

    `correct` is None without a ground truth (no rule check). Responses with a non-finite score (not scorable,
    skipped) take no part. Ties go to the lower index. Reasons are checked in this order: not scorable, no correct
    response, all responses identical, margin."""
    if len(texts) != len(scores) or (correct is not None and len(correct) != len(texts)):
        raise ValueError("texts, scores and correct must have one entry per response")
    usable = [i for i, s in enumerate(scores) if s is not None and math.isfinite(s)]
    if len(usable) < 2:
        return Selection(reason=UNSCORABLE)
    candidates = usable if correct is None else [i for i in usable if correct[i]]
    if not candidates:
        return Selection(reason=NO_CORRECT)
    chosen = max(candidates, key=lambda i: (scores[i], -i))
    others = [i for i in usable if texts[i].strip() != texts[chosen].strip()]
    if not others:
        return Selection(reason=IDENTICAL)
    wrong = [] if correct is None else [i for i in others if not correct[i]]
    rejected = min(wrong or others, key=lambda i: (scores[i], i))
    margin = float(scores[chosen]) - float(scores[rejected])
    rule = "verified" if wrong else "reward"
    if not (margin > 0 and margin >= min_margin):
        return Selection(chosen, rejected, margin, rule, LOW_MARGIN)
    return Selection(chosen, rejected, margin, rule)


# ----------------------------------------------------------------------------------------------------------- input


@dataclass
class Prompt:
    line: int
    obj: dict  # the input object
    record: Any  # skyjax.data.records.Record (kind "generate")
    penalty: float
    choices: Any  # meta[choices_key] or None

    @property
    def where(self) -> str:
        return f"{self.record.source}:{self.line}"


def read_prompts(path: Path, config: PairsConfig, bad: list[str]) -> tuple[list[Prompt], int]:
    """Usable rows of a generate-kind JSONL file and the number of non-blank lines. A bad row (malformed JSON, an
    unknown key, a missing image file, an answer naming none of the choices, a bad meta.repetition_penalty) raises
    an error naming file:line and key, or with on_error="skip" goes to `bad` as that message."""
    from skyjax.data.records import RecordError, parse_record
    from skyjax.eval.verifiers import verify

    if not path.is_file():
        raise PairsError(f"--data {path}: no such file")
    prompts, lines = [], 0
    base = path.resolve().parent
    with open(path, encoding="utf-8") as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            lines += 1
            try:
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as e:
                    raise RecordError(str(path), line, None, "json", f"malformed JSON: {e.msg} (column {e.colno})")
                record = parse_record(obj, kind="generate", base_dir=base, source=str(path), line=line)
                for p in record.images:
                    if "://" not in p and not os.path.isfile(p):
                        raise RecordError(str(path), line, "images", "image", f"image file not found: {p}")
                penalty = config.repetition_penalty
                meta = record.meta or {}
                if meta.get("repetition_penalty") is not None:
                    value = meta["repetition_penalty"]
                    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                        raise RecordError(str(path), line, "meta", "type",
                                          f"meta.repetition_penalty must be a number > 0, got {value!r}")
                    penalty = float(value)
                choices = meta.get(config.choices_key)
                if record.answer is not None:
                    try:
                        verify("", record.answer, choices=choices)  # an answer naming no option is a data error
                    except ValueError as e:
                        raise RecordError(str(path), line, "answer", "type", str(e)) from None
            except RecordError as e:
                if config.on_error == "raise":
                    raise RecordError(e.source, e.line, e.key, e.reason,
                                      e.detail + " (fix the line, or pass --on-error skip to skip bad rows)") from None
                bad.append(str(e))
                continue
            prompts.append(Prompt(line, obj, record, penalty, choices))
    return prompts, lines


# -------------------------------------------------------------------------------------------------------- sampling


@dataclass
class _Policy:
    generate: Callable  # skyjax.rl.generation.GenerateFn
    check_row: Callable[[Prompt, tuple], None] | None  # raises ValueError when one row cannot be prepared
    name: str
    mesh: Any = None


def _load_policy(policy, config: PairsConfig, step) -> _Policy:
    """The policy's generator: `policy` is a model folder (Hugging Face or skyjax checkpoint) or a LoadedModel."""
    from skyjax.convert.checkpoint import LoadedModel, load_model
    from skyjax.data.tokenizer import load_tokenizer
    from skyjax.parallel import make_mesh, use_mesh
    from skyjax.rl.generation import model_generator
    from skyjax.sample.adapters import adapter_for
    from skyjax.sample.cli import default_stop_ids

    if isinstance(policy, LoadedModel):
        loaded, mesh, name = policy, _mesh_of(policy, config.mesh_shape), str(policy.folder)
    else:
        mesh, name = make_mesh(config.mesh_shape), str(policy)
        with use_mesh(mesh):
            loaded = load_model(policy, mesh=mesh, dtype=config.dtype)
    adapter = adapter_for(loaded)
    tokenizer = load_tokenizer(loaded.folder)
    stop = config.stop_token_ids if config.stop_token_ids is not None else default_stop_ids(loaded, tokenizer)
    gen = model_generator(loaded, tokenizer, adapter, config.sampling(stop), batch_size=config.batch_size,
                          seed=config.seed, step=step)

    def check_row(prompt: Prompt, images: tuple) -> None:
        adapter.check(adapter.prepare([prompt.record.conversation()], [list(images)], tokenizer))

    if not adapter.supports_images:
        inner = check_row

        def check_row(prompt, images):  # noqa: F811 -- text-only models: an image row is a bad row
            if images:
                raise ValueError(f"{len(images)} image(s), but {adapter.name} is a text-only model")
            inner(prompt, images)

    return _Policy(gen, check_row, name, mesh)


def _mesh_of(loaded, shape):
    import jax

    from skyjax.parallel import make_mesh

    for leaf in jax.tree_util.tree_leaves(loaded.params):
        mesh = getattr(getattr(leaf, "sharding", None), "mesh", None)
        if mesh is not None and hasattr(mesh, "axis_names"):
            return mesh
    return make_mesh(shape)


def sample_responses(prompts: Sequence[Prompt], policy: _Policy, config: PairsConfig, bar, bad: list[str]
                     ) -> dict[int, list]:
    """Input line -> the N `Completion`s sampled for it. Images are decoded one generation batch at a time; a row
    that breaks its batch (an unreadable image, a prompt too long for the policy, an image for a text-only model)
    is named by file:line, or skipped into `bad`."""
    from skyjax.data.qwen_vl_image import load_image
    from skyjax.parallel import use_mesh
    from skyjax.rl.generation import GenRequest

    out: dict[int, list] = {}
    per_row = 2 * config.num_samples  # a row's share of the bar: its samples, then their scores

    def drop(p: Prompt, e: Exception) -> None:
        msg = f"{p.where}: {e}"
        if config.on_error == "raise":
            raise PairsError(msg + " (pass --on-error skip to skip bad rows)") from None
        bad.append(msg)
        if bar is not None:
            bar.write(f"skipping {msg}")
            bar.update(per_row)

    with use_mesh(policy.mesh) if policy.mesh is not None else contextlib.nullcontext():
        for start in range(0, len(prompts), config.batch_size):
            chunk, images = [], []
            for p in prompts[start: start + config.batch_size]:
                try:
                    imgs = tuple(load_image(path) for path in p.record.images)
                except Exception as e:  # noqa: BLE001 -- a corrupt image, named with its row
                    drop(p, e)
                    continue
                chunk.append(p)
                images.append(imgs)
            if not chunk:
                continue
            requests = [GenRequest(tuple(p.record.conversation()), imgs, p.penalty, p.line)
                        for p, imgs in zip(chunk, images)]
            try:
                results = policy.generate(requests, 0)
            except ValueError as e:
                if policy.check_row is None:
                    raise PairsError(f"{chunk[0].where} (batch starting there): {e}") from None
                keep = []
                for k, (p, imgs) in enumerate(zip(chunk, images)):  # find the row(s) that broke the batch
                    try:
                        policy.check_row(p, imgs)
                        keep.append(k)
                    except ValueError as row_error:
                        drop(p, row_error)
                if len(keep) == len(chunk):
                    raise
                chunk = [chunk[k] for k in keep]
                requests = [requests[k] for k in keep]
                results = policy.generate(requests, 0) if requests else []
            if len(results) != len(chunk):
                raise RuntimeError(f"the generator returned {len(results)} results for {len(chunk)} prompts")
            for p, comps in zip(chunk, results):
                if len(comps) != config.num_samples:
                    raise RuntimeError(f"{p.where}: the generator returned {len(comps)} samples, not "
                                       f"{config.num_samples}")
                out[p.line] = list(comps)
            if bar is not None:
                bar.update(len(chunk) * config.num_samples)
    return out


# --------------------------------------------------------------------------------------------------------- scoring


def _load_scorer(reward_model, config: PairsConfig, num_conversations: int):
    """A RewardScorer (or any object with its `score_conversations`) and a name for the provenance. A small job's
    batches hold no more rows than it has responses (a power of two): no batch padded with dozens of empty rows."""
    if hasattr(reward_model, "score_conversations"):
        return reward_model, str(getattr(reward_model, "name", None) or getattr(
            getattr(reward_model, "model", None), "folder", type(reward_model).__name__))
    from skyjax.eval.scorer import RewardScorer

    rows = min(config.score_batch_size, 1 << max(num_conversations - 1, 0).bit_length())
    scorer = RewardScorer(reward_model, mesh_shape=config.mesh_shape, dtype=config.dtype, batch_size=rows,
                          max_batch_tokens=config.max_batch_tokens, max_length=config.max_length, progress=False)
    return scorer, str(reward_model)


def response_text(c) -> str:
    """The response as written and scored: the opening <think> tag put back when the prompt held it."""
    from skyjax.rl.distill_run import full_chain

    return full_chain(c)


def score_responses(prompts: Sequence[Prompt], texts: dict[int, list[str]], scorer, config: PairsConfig, bar,
                    skipped: list) -> dict[int, list[float]]:
    """Input line -> the reward of each of its responses (NaN for a response skipped with on_error="skip")."""
    from skyjax.eval.scorer import Conversation

    convs, owners = [], []
    for p in prompts:
        if p.line not in texts:
            continue
        for j, text in enumerate(texts[p.line]):
            convs.append(Conversation(p.record.conversation() + [{"role": "assistant", "content": text}],
                                      tuple(p.record.images), f"{p.where} (sample {j + 1})", (p.line, j)))
            owners.append(p.line)
    scores = scorer.score_conversations(convs, desc="pairs", on_error=config.on_error, skipped=skipped,
                                        progress=bar) if convs else []
    out: dict[int, list[float]] = {}
    for line, s in zip(owners, scores):
        out.setdefault(line, []).append(float(s))
    return out


# ------------------------------------------------------------------------------------------------------------- job


def output_images(p: Prompt, out_dir: Path) -> list[str]:
    """The row's image paths relative to the output's folder (absolute paths and URLs kept), as `skyjax score`."""
    from skyjax.eval.cli import output_row

    return output_row({"images": p.obj["images"]}, p.record, out_dir)["images"]


def pair_record(p: Prompt, texts: Sequence[str], scores: Sequence[float], correct: Sequence[bool] | None,
                sel: Selection, comps: Sequence, out_dir: Path, provenance: dict) -> dict:
    """A preference record (skyjax.data.records kind "preference"): the input prompt, chosen / rejected as one
    assistant turn each, the answer and meta passed through, meta.pairs holding every response and score."""
    row: dict[str, Any] = {}
    if p.obj.get("images"):
        row["images"] = output_images(p, out_dir)
    row["prompt"] = p.obj["prompt"]
    row["chosen"], row["rejected"] = texts[sel.chosen], texts[sel.rejected]
    if p.record.answer is not None:
        row["answer"] = p.obj["answer"]
    row["id"] = p.record.id if p.record.id is not None else f"{Path(p.record.source).name}:{p.line}"
    meta = dict(p.record.meta or {})
    meta["pairs"] = {
        "responses": list(texts),
        "scores": [round(s, 6) if math.isfinite(s) else None for s in scores],
        "correct": None if correct is None else list(correct),
        "finish_reasons": [c.finish_reason for c in comps],
        "num_tokens": [c.num_tokens for c in comps],
        "chosen_index": sel.chosen,
        "rejected_index": sel.rejected,
        "margin": round(sel.margin, 6),
        "rule": sel.rule,
        "source": p.where,
        **provenance,
    }
    row["meta"] = meta
    return row


def partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def build_pairs(policy, reward_model, data: str | os.PathLike, out: str | os.PathLike,
                config: PairsConfig = PairsConfig(), *, progress: bool = True,
                generate_fn: Callable | None = None) -> dict:
    """Sample, score, verify and select; write the pairs to `out` (through OUT.partial, renamed at the end).

    policy: a model folder (Hugging Face or skyjax checkpoint; R1V / InternVL, Qwen2.5-VL, Qwen2) or a loaded
        `skyjax.convert.checkpoint.LoadedModel`; ignored when `generate_fn` (a skyjax.rl.generation.GenerateFn)
        is given. reward_model: a reward-model folder or a loaded `skyjax.eval.scorer.RewardScorer` (any object
        with its `score_conversations`).
    Returns the report: prompts (non-blank input lines), kept, dropped {reason: count}, pairs (the path),
    mean_margin, verified (kept pairs decided by the verifier), with_answer, samples, bad_rows (messages), seconds.
    The models are loaded one after the other: the policy's generator is released before the reward model loads.
    """
    from skyjax.eval.verifiers import verify
    from skyjax.progress import JobProgress

    t0 = time.time()
    config.validate()
    data, out = Path(data), Path(out)
    if config.temperature == 0:
        print("[pairs] warning: --temperature 0 (greedy) samples one response N times: every prompt will be "
              "dropped as 'all responses identical'", file=sys.stderr)
    bad: list[str] = []
    prompts, lines = read_prompts(data, config, bad)
    if isinstance(reward_model, (str, os.PathLike)):  # before hours of sampling: fail now if it has no value head
        from skyjax.convert.checkpoint import require_reward_model

        require_reward_model(reward_model)
    n = config.num_samples
    bar = JobProgress(2 * n * lines, "pairs: sample", unit="response", enabled=progress)
    try:
        bar.update(2 * n * len(bad))
        for msg in bad:
            bar.write(f"skipping {msg}")
        if generate_fn is not None:
            pol = _Policy(generate_fn, None, str(policy))
        else:
            pol = _load_policy(policy, config, bar.step)
        policy_name = pol.name
        comps = sample_responses(prompts, pol, config, bar, bad)
        del pol  # the policy's weights can go before the reward model's arrive (unless the caller holds them)
        texts = {line: [response_text(c) for c in cs] for line, cs in comps.items()}

        bar.phase("pairs: score")
        scorer, rm_name = _load_scorer(reward_model, config, sum(len(t) for t in texts.values()))
        skipped: list = []
        scores = score_responses(prompts, texts, scorer, config, bar, skipped)
        del scorer

        provenance = {"policy": policy_name, "reward_model": rm_name}
        dropped: Counter[str] = Counter({BAD_ROW: len(bad)} if bad else {})
        margins, verified, with_answer = [], 0, 0
        out.parent.mkdir(parents=True, exist_ok=True)
        out_dir = out.resolve().parent
        tmp = partial_path(out)
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                for p in prompts:
                    if p.line not in texts:
                        continue  # a bad row, counted already
                    t, s = texts[p.line], scores[p.line]
                    correct = None
                    if p.record.answer is not None:
                        with_answer += 1
                        correct = [verify(x, p.record.answer, choices=p.choices).correct for x in t]
                    sel = select_pair(t, s, correct, config.min_margin)
                    if not sel.kept:
                        dropped[sel.reason] += 1
                        continue
                    margins.append(sel.margin)
                    verified += sel.rule == "verified"
                    f.write(json.dumps(pair_record(p, t, s, correct, sel, comps[p.line], out_dir, provenance),
                                       ensure_ascii=False) + "\n")
            os.replace(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    finally:
        bar.close()
    skipped_where = sorted({s.where.split(" (sample")[0] for s in skipped})
    return {
        "prompts": lines, "kept": len(margins), "dropped": {r: dropped[r] for r in REASONS if dropped[r]},
        "pairs": str(out), "mean_margin": round(sum(margins) / len(margins), 6) if margins else None,
        "verified": verified, "with_answer": with_answer, "samples": n * len(comps), "bad_rows": bad,
        "skipped_responses": [str(s) for s in skipped], "rows_with_skipped_responses": skipped_where,
        "seconds": round(time.time() - t0, 3), "config": asdict(config),
    }


def format_report(report: dict) -> str:
    """The job's summary for stderr: kept, and per reason the prompts dropped."""
    lines = [f"kept {report['kept']} of {report['prompts']} prompts -> {report['pairs']} "
             f"({report['verified']} verified by the answer; mean margin {report['mean_margin']}) "
             f"in {report['seconds']:.1f}s"]
    if report["dropped"]:
        lines.append("dropped: " + ", ".join(f"{k} {v}" for k, v in report["dropped"].items()))
    for msg in report["bad_rows"][:20]:
        lines.append(f"  bad row: {msg}")
    if len(report["bad_rows"]) > 20:
        lines.append(f"  ... and {len(report['bad_rows']) - 20} more bad rows")
    if report["skipped_responses"]:
        lines.append(f"{len(report['skipped_responses'])} response(s) could not be scored (left out of their "
                     f"prompt's selection), e.g. {report['skipped_responses'][0]}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------- CLI


_paragraphs = (__doc__ or "").split("\n\n")  # the summary and the selection rule go into --help


def add_parser(subparsers) -> argparse.ArgumentParser:
    from skyjax.cli import add_mesh_arg

    d = PairsConfig()
    p = subparsers.add_parser(
        "pairs", help="preference pairs for MPO: sample N responses, score them with a reward model, best vs worst",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_paragraphs[0] + "\n\n" + _paragraphs[2] + "\n\n" + EXAMPLE)
    p.add_argument("--policy", required=True, type=Path,
                   help="the policy that samples: Hugging Face folder or skyjax checkpoint (R1V / InternVL, "
                        "Qwen2.5-VL, Qwen2), as `skyjax generate --model`")
    p.add_argument("--reward-model", required=True, type=Path,
                   help="the reward model that scores: folder or checkpoint with a value head, as `skyjax score`")
    p.add_argument("--data", required=True, type=Path,
                   help="input JSONL of prompts (prompt, optional images / answer / id / meta)")
    p.add_argument("--out", required=True, type=Path, help="output JSONL of preference records")
    p.add_argument("--num-samples", type=int, default=d.num_samples, help=f"responses per prompt ({d.num_samples})")
    p.add_argument("--min-margin", type=float, default=d.min_margin,
                   help="smallest reward margin of a written pair; a margin must also be > 0 (default 0)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens,
                   help=f"tokens per response at most ({d.max_new_tokens})")
    p.add_argument("--temperature", type=float, default=d.temperature, help="sampling temperature (1.0)")
    p.add_argument("--top-p", type=float, default=d.top_p, help="nucleus sampling mass (1 = off)")
    p.add_argument("--top-k", type=int, default=d.top_k, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--min-p", type=float, default=d.min_p, help="drop tokens below min_p x the top probability")
    p.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty,
                   help="HF repetition penalty (1 = off); a row's meta.repetition_penalty overrides it")
    p.add_argument("--seed", type=int, default=d.seed, help="sampling seed (0)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"prompts per generation batch "
                                                                        f"({d.batch_size})")
    p.add_argument("--stop-token-ids", type=lambda s: tuple(int(x) for x in s.split(",") if x.strip()),
                   default=None, help="comma-separated stop ids (default: the policy's eos ids)")
    p.add_argument("--score-batch-size", type=int, default=d.score_batch_size,
                   help=f"most rows in one reward-model batch ({d.score_batch_size})")
    p.add_argument("--max-batch-tokens", type=int, default=None,
                   help="reward-model token budget per batch (default as `skyjax score`)")
    p.add_argument("--max-length", type=int, default=None,
                   help="longest prompt + response the reward model scores (default: its max_position_embeddings)")
    p.add_argument("--choices-key", default=d.choices_key,
                   help="meta key with a multiple-choice row's options, for the answer check (choices)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="compute dtype of both models (default: each checkpoint's)")
    p.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                   help="a bad row stops the job naming its file:line (default), or is skipped and counted")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_mesh_arg(p)
    p.set_defaults(func=_cmd_pairs)
    return p


def _cmd_pairs(args) -> int:
    config = PairsConfig(
        num_samples=args.num_samples, min_margin=args.min_margin, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
        repetition_penalty=args.repetition_penalty, seed=args.seed, batch_size=args.batch_size,
        stop_token_ids=args.stop_token_ids, dtype=args.dtype, mesh_shape=tuple(args.mesh),
        score_batch_size=args.score_batch_size, max_batch_tokens=args.max_batch_tokens, max_length=args.max_length,
        on_error=args.on_error, choices_key=args.choices_key)
    report = build_pairs(args.policy, args.reward_model, args.data, args.out, config, progress=not args.no_progress)
    print(f"[pairs] {format_report(report)}", file=sys.stderr, flush=True)
    return 0


__all__ = ["PairsConfig", "PairsError", "Selection", "build_pairs", "format_report", "select_pair", "REASONS"]
