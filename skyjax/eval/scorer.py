"""Scoring with a reward model: batched, sharded, bucketed; used by `skyjax score` and `skyjax eval`.

Each conversation (prompt + one response) is one row of a padded batch; its images are preprocessed exactly as the
reference processor does. Shapes come from buckets, so a long scoring job compiles a handful of programs.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from skyjax.convert.checkpoint import load_model
from skyjax.data.qwen_vl_image import ImageError, QwenVLImageConfig, load_image
from skyjax.data.records import Record, parse_record
from skyjax.data.tokenizer import load_tokenizer
from skyjax.models.qwen2_5_vl_inputs import Buckets, prepare_vl_batch
from skyjax.parallel.mesh import make_mesh
from skyjax.parallel.rules import use_mesh


class RowError(ValueError):
    """A row that cannot be scored; names its file and line."""


@dataclasses.dataclass
class Conversation:
    messages: list[dict]
    image_paths: tuple[str, ...]
    where: str


def conversations_of(record: Record) -> list[Conversation]:
    """One conversation for a `response` row, two (chosen, rejected) for a pair."""
    where = f"{record.source}:{record.line}"
    keys = ("response",) if record.response is not None else ("chosen", "rejected")
    return [Conversation(record.conversation(k), tuple(record.images), where) for k in keys]


class RewardScorer:
    """Scalar rewards for conversations, from a Hugging Face reward folder or a skyjax checkpoint."""

    def __init__(self, model: str | Path, *, mesh_shape=(1, -1, 1), dtype: str | None = None, batch_size: int = 8,
                 buckets: Buckets = Buckets(), progress: bool = True):
        self.mesh = make_mesh(mesh_shape)
        self.model = load_model(model, mesh=self.mesh, dtype=dtype)
        if not hasattr(self.model.fn.bind(self.model.params), "score"):
            raise ValueError(f"{model}: architecture {self.model.arch.name!r} has no value head (expected a reward "
                             f"model: a Qwen2.5-VL folder with value_head.safetensors, or a trained checkpoint)")
        self.tokenizer = load_tokenizer(self.model.folder)
        self.image_cfg = QwenVLImageConfig.from_folder(self.model.folder)
        self.batch_size, self.buckets, self.progress = batch_size, buckets, progress
        fn = self.model.fn
        self._score = jax.jit(lambda p, ids, kw: fn.bind(p).score(ids, **kw))

    def _images(self, conv: Conversation):
        try:
            return [load_image(p) for p in conv.image_paths]
        except ImageError as e:
            raise RowError(f"{conv.where}: {e}") from None

    def score_conversations(self, convs: Sequence[Conversation], desc: str = "score") -> np.ndarray:
        out = np.zeros(len(convs), np.float32)
        bar = None
        if self.progress and len(convs) > self.batch_size:
            from tqdm import tqdm

            bar = tqdm(total=len(convs), desc=desc, unit="row", file=sys.stderr, mininterval=1.0)
        for start in range(0, len(convs), self.batch_size):
            chunk = list(convs[start:start + self.batch_size])
            real = len(chunk)
            chunk += [chunk[-1]] * (self.batch_size - real)  # one batch shape: pad with copies, drop their scores
            try:
                batch = prepare_vl_batch([c.messages for c in chunk], [self._images(c) for c in chunk],
                                         self.tokenizer, self.image_cfg, self.model.config.vision,
                                         buckets=self.buckets, pad_side="right")
            except RowError:
                raise
            except ValueError as e:
                raise RowError(f"{chunk[0].where} (batch starting there): {e}") from None
            with use_mesh(self.mesh):
                scores = self._score(self.model.params, jnp.asarray(batch.input_ids), batch.model_kwargs())
            out[start:start + real] = np.asarray(scores)[:real]
            if bar is not None:
                bar.update(real)
        if bar is not None:
            bar.close()
        return out

    def __call__(self, rows: Sequence[dict]) -> np.ndarray:
        """The `PairScorer` protocol of skyjax.eval: records (dicts) -> (n, 2) [score_chosen, score_rejected]."""
        convs = []
        for i, row in enumerate(rows):
            record = parse_record(row, kind="preference", source="<benchmark>", line=i + 1)
            convs.extend(conversations_of(record))
        return self.score_conversations(convs).reshape(-1, 2)


def score_records(scorer: RewardScorer, records: Sequence[Record]) -> list[dict[str, Any]]:
    """Output fields for each record: `score`, or `score_chosen` and `score_rejected`."""
    convs, owners = [], []
    for i, record in enumerate(records):
        for c in conversations_of(record):
            convs.append(c)
            owners.append(i)
    scores = scorer.score_conversations(convs)
    out: list[dict[str, Any]] = [{} for _ in records]
    for i, record in enumerate(records):
        mine = [float(s) for s, o in zip(scores, owners) if o == i]
        out[i] = {"score": mine[0]} if record.response is not None else {
            "score_chosen": mine[0], "score_rejected": mine[1]}
    return out
