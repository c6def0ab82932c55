"""The data of a run as a deterministic, checkpointable grain pipeline, whatever the kind: records read and checked
(`read_records`), then shuffled, repeated, host-sliced, featurized and collated into static-shape batches
(`RecordPipeline`; a kind says how one record becomes an example and how examples become a batch)."""

from __future__ import annotations

import collections

import grain
import jax

from skyjax.config import ConfigError
from skyjax.data.records import Record, RecordReader
from skyjax.train.batching import BadRowError
from skyjax.train.bundle import ModelBundle
from skyjax.train.config import DataConfig


def read_records(paths, on_error: str = "raise", kind: str = "preference", errors: list | None = None
                 ) -> tuple[list[Record], collections.Counter]:
    """Every record of the JSONL files, checked as `kind` (skyjax.data.records); skipped rows counted by reason,
    and every skipped row's `RecordError` (file, line, reason) appended to `errors` when given."""
    records, skipped = [], collections.Counter()
    for path in paths:
        reader = RecordReader(path, kind=kind, on_error=on_error, max_kept_errors=None if errors is not None else 20)
        records.extend(reader)
        skipped.update(reader.skipped)
        if errors is not None:
            errors.extend(reader.errors)
    return records, skipped


class RecordPipeline:
    """Shuffled (by seed), repeated, host-sliced records -> featurized -> collated batches (grain MapDataset).

    Subclasses say how one record becomes an example (`featurize`, raising `BadRowError`) and how examples become
    a batch (`collate(examples, weights)`, with a leading micro-batch axis). Bad rows raise `BadRowError` (naming
    file and line), or with on_error='skip' are counted in `skipped` and replaced in their batch by a zero-weight
    copy of a good example, so the batch shape never changes.
    """

    example_type: type = object

    def __init__(self, records: list[Record], bundle: ModelBundle, data: DataConfig, *, micro_batches: int = 1,
                 epochs: int | None = None, shuffle: bool = True, blank_images: bool = False,
                 batch_size: int | None = None, drop_remainder: bool = True, pad_last: bool = False):
        if not records:
            raise ConfigError("no records to read")
        self.bundle, self.data, self.micro = bundle, data, micro_batches
        self.blank = blank_images
        self.bad_rows: dict[str, str] = {}  # "file:line" -> reason (unique: read-ahead may featurize a row twice)
        self.batch_size = batch_size or data.batch_size
        n_hosts, host = jax.process_count(), jax.process_index()
        if self.batch_size % n_hosts:
            raise ConfigError(f"batch size {self.batch_size} does not divide over {n_hosts} hosts")
        ds = grain.MapDataset.source(records)
        if shuffle:
            ds = ds.shuffle(seed=data.shuffle_seed)
        ds = ds.repeat(epochs)
        ds = ds[host::n_hosts]  # each host reads only its share
        ds = ds.map(self._featurize)
        self.per_host = self.batch_size // n_hosts
        self.pad_last = pad_last  # a short last batch is filled with zero-weight examples (one shape for jit)
        self.dataset = ds.batch(self.per_host, drop_remainder=drop_remainder, batch_fn=self._collate)
        self.num_records = len(records)

    def featurize(self, record: Record):
        raise NotImplementedError

    def collate(self, examples: list, weights: list[float]) -> dict:
        raise NotImplementedError

    def _featurize(self, record: Record):
        try:
            return self.featurize(record)
        except BadRowError as e:
            if self.data.on_error == "raise":
                raise
            return e

    def _collate(self, items):
        good = [x for x in items if isinstance(x, self.example_type)]
        for bad in (x for x in items if not isinstance(x, self.example_type)):
            where, _, reason = str(bad).partition(": ")
            self.bad_rows[where] = reason
        if not good:
            raise BadRowError(f"every row of a batch was bad, e.g. {items[0]}")
        size = max(len(items), self.per_host) if self.pad_last else len(items)
        weights = [1.0] * len(good) + [0.0] * (size - len(good))
        return self.collate(good + [good[0]] * (size - len(good)), weights)

    @property
    def skipped(self) -> collections.Counter:
        """Skipped rows by reason."""
        return collections.Counter(self.bad_rows.values())

    def __len__(self) -> int:
        return len(self.dataset)
