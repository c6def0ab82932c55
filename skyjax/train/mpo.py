"""MPO data: preference pairs -> one shared-prompt row per pair for a generative policy (Skywork R1V or Qwen2.5-VL),
and the batch source that adds precomputed reference log-probs (`reference.precompute`).

A preference record (skyjax.data.records, kind "preference": prompt, images, chosen, rejected) is rendered twice
with the policy's chat template (prompt + chosen, prompt + rejected; images expanded as SFT does, skyjax.train.sft)
and packed into one row:

    [prompt | chosen tail | rejected tail | padding]      branch_ids 0 / 1 / 2 / 0

The prompt is the two renderings' common prefix, cut before the first assistant token, so a response that starts
like the other one (e.g. "The answer is ...") still has all its tokens in its own branch. Every tail token attends to
the prompt and its own branch only, and the rejected tail's positions are moved back by the chosen tail's length, so
each token sees exactly what it sees in its own (prompt + response) row; the prompt and its images run once
(skyjax.train.objectives.mpo). A token is predicted by the hidden state of the token before it in its own row:
`predict_from` [b, S] holds that position (the prompt's last token for the first token of either tail), and
`completion` [b, S] marks the tokens that count (the assistant tokens of each tail: content + end-of-turn token,
as SFT trains). Per micro-batch:

    input_ids [A, b, S] int32, attention_mask / completion [A, b, S] bool, branch_ids / predict_from [A, b, S]
    int32, pair_weight [A, b] float32 (0: a padding row), vision: the policy's image inputs (as SFT's), and with
    reference.precompute ref_logps [A, b, 2] float32 (the reference's chosen / rejected sequence log-probs)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from skyjax.data.chat import FormattedConversation, SequenceTooLongError, format_conversation
from skyjax.data.records import Record
from skyjax.train.batch_source import PipelineSource
from skyjax.train.batching import BadRowError, abstract, fit_bucket, host_batch, row_location, split_micro_batches
from skyjax.train.bundle import ModelBundle
from skyjax.train.config import DataConfig
from skyjax.train.losses.preference import identical_pair
from skyjax.train.pipeline import RecordPipeline, read_records
from skyjax.train.sft import load_images, vision_format


@dataclasses.dataclass
class MPOExample:
    row_id: str  # file:line (the precomputed reference log-probs are keyed by it)
    where: str
    prompt: np.ndarray  # token ids [p]
    chosen: np.ndarray  # tail ids [c]
    rejected: np.ndarray  # tail ids [r]
    chosen_mask: np.ndarray  # bool [c]: completion tokens of the chosen tail
    rejected_mask: np.ndarray  # bool [r]
    pixels: np.ndarray  # as SFTExample
    grids: np.ndarray

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.chosen) + len(self.rejected)


def split_pair(chosen: FormattedConversation, rejected: FormattedConversation, where: str):
    """(prompt, chosen tail, rejected tail, chosen tail mask, rejected tail mask) of a pair's two renderings (see
    the module docstring); a BadRowError naming the row when the responses are identical or hold image tokens."""
    c, r = chosen.input_ids, rejected.input_ids
    n = min(len(c), len(r))
    diff = np.nonzero(c[:n] != r[:n])[0]
    if not diff.size and len(c) == len(r):
        raise BadRowError(f"{where}: chosen and rejected render to the same tokens: the pair carries no preference "
                          f"(fix or drop the row)")
    common = int(diff[0]) if diff.size else n
    first = [int(np.argmax(m)) if m.any() else len(m) for m in (chosen.assistant_mask, rejected.assistant_mask)]
    p = min(common, *first)
    for name, conv in (("chosen", chosen), ("rejected", rejected)):
        if np.any(conv.mm_token_type_ids[p:] != 0):
            raise BadRowError(f"{where}: the {name} response holds image tokens; images belong in the prompt")
        if not conv.assistant_mask[p:].any():
            raise BadRowError(f"{where}: the {name} response has no tokens to score")
    if p == 0:
        raise BadRowError(f"{where}: the rendered prompt is empty (no chat template prefix before the responses)")
    return (c[:p], c[p:], r[p:], chosen.assistant_mask[p:].astype(bool), rejected.assistant_mask[p:].astype(bool))


def featurize_mpo(record: Record, tokenizer, fmt, *, max_length: int | None = None,
                  blank_images: bool = False) -> MPOExample:
    """Load the images, render prompt + chosen and prompt + rejected, split them into one shared-prompt row."""
    where = row_location(record)
    if identical_pair(record):
        raise BadRowError(f"{where}: chosen and rejected are the same response: the pair carries no preference (fix "
                          f"or drop the row)")
    pixels, grids, counts = fmt.encode(load_images(record, where, blank_images))
    convs = []
    for key in ("chosen", "rejected"):
        messages = record.conversation(key)
        trained = tuple(range(len(record.prompt), len(messages)))
        try:
            convs.append(format_conversation(tokenizer, messages, num_image_tokens=counts,
                                             image_token=fmt.image_token, loss_messages=trained))
        except ValueError as e:
            raise BadRowError(f"{where}: {key}: {e}") from None
    example = MPOExample(where, where, *split_pair(*convs, where), pixels=pixels, grids=grids)
    if max_length is not None and example.length > max_length:
        raise BadRowError(f"{where}: prompt + chosen + rejected is {example.length} tokens, more than "
                          f"{max_length} (data.max_length / the largest of data.seq_buckets)")
    fmt.check_fits(example)
    return example


def pair_rows(examples: Sequence[MPOExample], seq: int, pad_id: int) -> dict:
    """input_ids, attention_mask, branch_ids, completion, predict_from [b, seq] of one micro-batch (right padded)."""
    b = len(examples)
    ids = np.full((b, seq), pad_id, np.int32)
    mask = np.zeros((b, seq), bool)
    branch = np.zeros((b, seq), np.int32)
    completion = np.zeros((b, seq), bool)
    source = np.zeros((b, seq), np.int32)
    for j, e in enumerate(examples):
        p, c, r = len(e.prompt), len(e.chosen), len(e.rejected)
        ids[j, :p + c + r] = np.concatenate([e.prompt, e.chosen, e.rejected])
        mask[j, :p + c + r] = True
        branch[j, p:p + c] = 1
        branch[j, p + c:p + c + r] = 2
        completion[j, p:p + c] = e.chosen_mask
        completion[j, p + c:p + c + r] = e.rejected_mask
        # the token before each tail token in its own row: the previous tail token, or the prompt's last one
        source[j, p:p + c] = np.arange(p - 1, p + c - 1)
        source[j, p + c:p + c + r] = np.concatenate([[p - 1], np.arange(p + c, p + c + r - 1)])
    return {"input_ids": ids, "attention_mask": mask, "branch_ids": branch, "completion": completion,
            "predict_from": source}


def collate_mpo(examples: Sequence[MPOExample], fmt, seq_buckets: Sequence[int], pad_id: int, *,
                micro_batches: int = 1, weights: Sequence[float] | None = None) -> dict:
    """Stack pairs into arrays with a leading micro-batch axis [A, ...]; every micro-batch has the same shapes."""
    weights, groups, where = split_micro_batches(examples, micro_batches, weights, "pairs")
    per = len(groups[0])
    seq = fit_bucket(max(e.length for e in examples), seq_buckets, "seq", where)
    sizes = fmt.sizes(groups, where)
    out = []
    for i, group in enumerate(groups):
        rows = pair_rows(group, seq, pad_id)
        out.append({**rows, "pair_weight": weights[i * per:(i + 1) * per],
                    "vision": fmt.collate(group, sizes, rows["input_ids"])})
    batch = jax.tree.map(lambda *xs: np.stack(xs), *out)
    batch["row_ids"] = [e.row_id for e in examples]
    return batch


class MPOPipeline(RecordPipeline):
    """Preference records -> shared-prompt policy batches (see the module docstring)."""

    example_type = MPOExample

    def __init__(self, records: list[Record], bundle: ModelBundle, data: DataConfig, **kw):
        self.fmt = vision_format(bundle, data)
        self.seq_buckets = tuple(data.seq_buckets)
        self.max_length = min(data.max_length or max(self.seq_buckets), max(self.seq_buckets))
        self.records = records
        super().__init__(records, bundle, data, **kw)

    def featurize(self, record: Record) -> MPOExample:
        return featurize_mpo(record, self.bundle.tokenizer, self.fmt, max_length=self.max_length,
                             blank_images=self.blank)

    def collate(self, examples, weights) -> dict:
        return collate_mpo(examples, self.fmt, self.seq_buckets, self.bundle.tokenizer.pad_token_id,
                           micro_batches=self.micro, weights=weights)


def abstract_mpo_batch(bundle: ModelBundle, data: DataConfig, micro_batches: int, mesh: Mesh, hosts: int = 1, *,
                       precomputed: bool = False) -> dict:
    """ShapeDtypeStructs (with `to_device`'s shardings) of the largest-bucket MPO batch (for `skyjax aot`); with
    `precomputed` it carries the reference's log-probs instead of the step computing them."""
    from skyjax.train.global_batch import abstract_global_batch, host_share

    fmt = vision_format(bundle, data)
    b = host_share(data.batch_size, hosts, micro_batches, "pairs")
    a, s = micro_batches, max(data.seq_buckets)

    def struct(shape, dtype):
        return jax.ShapeDtypeStruct((a, *shape), dtype)

    batch = {"input_ids": struct((b, s), np.int32), "attention_mask": struct((b, s), np.bool_),
             "branch_ids": struct((b, s), np.int32), "completion": struct((b, s), np.bool_),
             "predict_from": struct((b, s), np.int32), "pair_weight": struct((b,), np.float32),
             "vision": jax.tree.map(lambda x: struct(x.shape, x.dtype), fmt.abstract(fmt.largest()))}
    if precomputed:
        batch["ref_logps"] = struct((b, 2), np.float32)
    return abstract(abstract_global_batch(batch, hosts), mesh)


# --- reference.precompute ---------------------------------------------------------------------------------------------


class ReferenceLogpsSource(PipelineSource):
    """The MPO pipeline's batches with the reference's sequence log-probs added (`ref_logps`), computed in one
    ordered pass over the training and held-out pairs before the first step, so the reference is never resident
    during training. The table ({file:line: [chosen, rejected]}) is part of the source's state, so it is saved in
    every checkpoint and a resumed run never recomputes it (the policy it was computed from is gone by then).

    `compute(state, files_or_records) -> {row_id: (chosen, rejected)}` runs the pass (skyjax.train.tasks builds
    it: the reference is the policy of the step-0 state, or reference.source)."""

    def __init__(self, pipeline: MPOPipeline, compute, eval_files: Sequence = ()):
        super().__init__(pipeline)
        self.compute, self.eval_files = compute, list(eval_files)
        self.table: dict[str, list[float]] | None = None

    def ensure_table(self, state: dict) -> dict:
        if self.table is None:
            if int(state["step"]) != 0:
                raise BadRowError("reference.precompute: the checkpoint holds no reference log-probs and the policy "
                                  "has moved since step 0; rerun with --no-resume")
            self.table = self.compute(state, self.pipeline.records, self.eval_files)
        return self.table

    def augment(self, batch: dict, row_ids: Sequence[str]) -> dict:
        """`batch` with `ref_logps` [A, b, 2] looked up for its rows (the table must exist)."""
        a, b = batch["pair_weight"].shape
        missing = [r for r in row_ids if r not in self.table]
        if missing:
            raise BadRowError(f"{missing[0]}: no precomputed reference log-probs for this row (the data changed "
                              f"since they were computed? rerun with --no-resume)")
        values = np.asarray([self.table[r] for r in row_ids], np.float32).reshape(a, b, 2)
        return {**batch, "ref_logps": values}

    def next(self, state: dict) -> tuple[dict, list[str]]:
        self.ensure_table(state)
        batch, row_ids = host_batch(next(self.iterator))
        return self.augment(batch, row_ids), row_ids

    def get_state(self) -> Any:
        return {"pipeline": self.iterator.get_state(), "reference_logps": self.table}

    def set_state(self, saved: Any) -> None:
        self.iterator.set_state(saved["pipeline"])
        self.table = saved.get("reference_logps")


def precompute_files(records: Sequence[Record], eval_files: Sequence, on_error: str) -> list[Record]:
    """The records the precompute pass covers: the training records and every held-out file's."""
    extra, _ = read_records(eval_files, on_error, kind="preference") if eval_files else ([], None)
    return list(records) + list(extra)
