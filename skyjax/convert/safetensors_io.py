"""Streaming safetensors: read one tensor (or slice) at a time, write in bounded shards.

Neither direction holds a whole model in host memory: the reader memory-maps the files and keeps at most a couple of
decoded tensors cached; the writer flushes a shard file whenever its buffer passes `max_shard_bytes`.
Only safetensors is read: no pickle, so loading a checkpoint never executes code.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Iterable

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy so bf16 tensors read as numpy arrays)
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from skyjax.errors import UserError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class CheckpointError(UserError, ValueError):
    """A checkpoint folder or file is missing, unreadable, or does not match the model."""


class SafetensorsReader:
    """All tensors of a Hugging Face folder: `model.safetensors`, or shards listed in `model.safetensors.index.json`
    (plus any extra `*.safetensors` named in `extra_files`, e.g. `value_head.safetensors`)."""

    def __init__(self, folder: str | Path, extra_files: Iterable[str] = (), cache_size: int = 2):
        self.folder = Path(folder)
        index = self.folder / INDEX_NAME
        files: dict[str, Path] = {}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
            for key, fname in weight_map.items():
                files[key] = self.folder / fname
            missing = sorted({str(p) for p in files.values() if not p.is_file()})
            if missing:
                raise CheckpointError(f"{index} names shard files that do not exist: {', '.join(missing)}")
        elif (self.folder / SINGLE_NAME).is_file():
            files.update({k: self.folder / SINGLE_NAME for k in self._keys_of(self.folder / SINGLE_NAME)})
        else:
            found = sorted(p.name for p in self.folder.glob("*.safetensors"))
            if not found:
                raise CheckpointError(
                    f"{self.folder}: no {SINGLE_NAME} or {INDEX_NAME} (only safetensors checkpoints are read; "
                    f"convert .bin/.pt files with transformers first)"
                )
            for name in found:
                files.update({k: self.folder / name for k in self._keys_of(self.folder / name)})
        for name in extra_files:
            path = self.folder / name
            if path.is_file():
                files.update({k: path for k in self._keys_of(path)})
        self._files = files
        self._handles: dict[Path, object] = {}
        self._cache: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self._cache_size = cache_size

    @staticmethod
    def _keys_of(path: Path) -> list[str]:
        try:
            with safe_open(str(path), framework="np") as f:
                return list(f.keys())
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{path}: cannot read safetensors header ({e})") from e

    def _handle(self, path: Path):
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="np")
        return self._handles[path]

    def keys(self) -> list[str]:
        return list(self._files)

    def __contains__(self, key: str) -> bool:
        return key in self._files

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle(self._files[key]).get_slice(key).get_shape())

    def dtype(self, key: str) -> str:
        return self._handle(self._files[key]).get_slice(key).get_dtype()

    def read(self, key: str) -> np.ndarray:
        """The whole tensor (cached: shards of one tensor for many devices read the file once)."""
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        if key not in self._files:
            raise CheckpointError(f"{self.folder}: tensor {key!r} not found")
        try:
            value = self._handle(self._files[key]).get_tensor(key)
        except Exception as e:
            raise CheckpointError(f"{self._files[key]}: cannot read tensor {key!r} ({e})") from e
        self._cache[key] = value
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return value

    def close(self):
        self._handles.clear()
        self._cache.clear()


class SafetensorsWriter:
    """Writes tensors one at a time into `model-0000k-of-0000n.safetensors` shards plus an index.

    Use as a context manager; `add` may be called with tensors gathered one by one from a sharded model.
    """

    def __init__(self, folder: str | Path, max_shard_bytes: int = 2 * 1024**3, metadata: dict | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self._buffer: dict[str, np.ndarray] = {}
        self._buffer_bytes = 0
        self._shards: list[dict[str, np.ndarray] | list[str]] = []
        self._weight_map: dict[str, str] = {}
        self._total = 0

    def add(self, key: str, value: np.ndarray):
        if key in self._weight_map or key in self._buffer:
            raise CheckpointError(f"tensor {key!r} written twice")
        value = np.ascontiguousarray(value)
        if self._buffer and self._buffer_bytes + value.nbytes > self.max_shard_bytes:
            self._flush()
        self._buffer[key] = value
        self._buffer_bytes += value.nbytes
        self._total += value.nbytes

    def _flush(self):
        if not self._buffer:
            return
        name = f"model-{len(self._shards) + 1:05d}.safetensors.tmp"
        save_file(self._buffer, str(self.folder / name), metadata=self.metadata)
        self._shards.append(list(self._buffer))
        self._buffer = {}
        self._buffer_bytes = 0

    def close(self):
        self._flush()
        n = len(self._shards)
        if n == 1:
            (self.folder / "model-00001.safetensors.tmp").rename(self.folder / SINGLE_NAME)
            return
        for i, keys in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.folder / f"model-{i + 1:05d}.safetensors.tmp").rename(self.folder / final)
            self._weight_map.update({k: final for k in keys})
        index = {"metadata": {"total_size": self._total}, "weight_map": dict(sorted(self._weight_map.items()))}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2))

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
