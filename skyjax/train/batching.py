"""Batches as every kind of run shapes and places them: bucketing, micro-batch splitting and stacking, bad rows,
and putting a collated host batch on the mesh (one host: device_put; several: skyjax.train.global_batch).

A collated batch is a dict of arrays with a leading micro-batch axis [A, ...] plus `row_ids` (host side only, named in
errors); `host_batch` splits the two.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from skyjax.data.records import Record
from skyjax.errors import UserError
from skyjax.models.qwen2_5_vl_vision import bucket_size
from skyjax.train.global_batch import batch_shardings, place_global_batch


class BadRowError(UserError, ValueError):
    """A row that cannot be used (missing or corrupt image, too long, ...); names the file and line."""


def row_location(record: Record) -> str:
    return f"{record.source}:{record.line}" if record.source else f"row {record.line}"


def fit_bucket(n: int, buckets: Sequence[int], what: str, where: str) -> int:
    try:
        return bucket_size(n, buckets)
    except ValueError:
        raise BadRowError(f"{where}: {n} {what} do not fit the largest bucket {max(buckets)} (data.{what}_buckets)")


def split_micro_batches(examples: Sequence, micro_batches: int, weights: Sequence[float] | None, what: str):
    """(weights [n] float32, the examples cut into `micro_batches` equal groups, "file:line, ..." of the first rows
    for error messages). Shared by the pair and SFT collators."""
    if len(examples) % micro_batches:
        raise ValueError(f"{len(examples)} {what} do not split into {micro_batches} micro-batches")
    weights = np.ones(len(examples), np.float32) if weights is None else np.asarray(weights, np.float32)
    per = len(examples) // micro_batches
    groups = [examples[i * per:(i + 1) * per] for i in range(micro_batches)]
    where = ", ".join(e.where for e in examples[:3]) + (" ..." if len(examples) > 3 else "")
    return weights, groups, where


def stack_micro_batches(out: list[dict], examples) -> dict:
    """Micro-batches stacked along a leading axis, plus the host-side row ids."""
    batch = jax.tree.map(lambda *xs: np.stack(xs), *out)
    batch["row_ids"] = [e.row_id for e in examples]  # host-side only (named in errors)
    return batch


def host_batch(batch: dict) -> tuple[dict, list[str]]:
    """Split the host-only fields off a collated batch."""
    batch = dict(batch)
    return batch, batch.pop("row_ids")


def to_device(batch: dict, mesh: Mesh) -> dict:
    """Place a collated batch on the mesh with `batch_shardings`.

    On one host the batch is the global batch. On several hosts (jax.process_count() > 1) `batch` is this host's
    local batch, and every process calls this in step: the global batch is assembled host-major from all of them
    (skyjax.train.global_batch: rows in host blocks, the hosts' packed images side by side, buckets made to agree).
    """
    if jax.process_count() > 1:
        return place_global_batch(batch, mesh)
    return jax.tree.map(lambda x, s: jax.device_put(np.asarray(x), s), batch, batch_shardings(batch, mesh))


def abstract(batch: dict, mesh: Mesh) -> dict:
    """ShapeDtypeStructs (with `batch_shardings`) of a batch given as arrays or shape structs: for AOT compiles."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), batch,
                        batch_shardings(batch, mesh))
