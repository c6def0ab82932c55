"""Load Hugging Face safetensors into sharded skyjax parameters, and write them back, one tensor at a time.

Loading builds every parameter with `jax.make_array_from_callback`: each device's shard is cut from the tensor as it
is read, and a host only ever asks for the shards of its own devices, so a multi-host mesh reads in parallel and no
host holds the whole model. Before any tensor is read, the folder is checked against the key map and every missing
key, unexpected key and shape mismatch is reported in one error.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding

from skyjax.convert.keymap import KeyRule
from skyjax.convert.safetensors_io import CheckpointError, SafetensorsReader, SafetensorsWriter
from skyjax.nn.functional import flatten_params as _flat_paths, unflatten_params as _unflatten

# Tensors some checkpoints carry that are recomputed, never loaded.
IGNORED_HF_KEYS = (re.compile(r".*rotary_emb\.inv_freq$"),)


class CheckpointMismatchError(CheckpointError):
    """The checkpoint's tensors do not match the model: lists every problem at once."""


def _resolve(reader: SafetensorsReader, rule: KeyRule, layer: int | None) -> str | None:
    for name in rule.hf_names(layer):
        if name in reader:
            return name
    return None


def check_keys(
    reader: SafetensorsReader, rules: Sequence[KeyRule], shapes: dict, ignore: Iterable[str] = ()
) -> dict[tuple[str, int | None], str]:
    """Map every (param path, layer) to its tensor name; raise one error listing all problems."""
    flat = _flat_paths(shapes)
    by_path = {r.path: r for r in rules}
    problems: list[str] = []
    unmapped = sorted(set(flat) - set(by_path))
    if unmapped:
        problems.append("parameters with no key rule (a bug in skyjax's key map): " + ", ".join(unmapped))
    resolved: dict[tuple[str, int | None], str] = {}
    missing, mismatched = [], []
    for path, shape in flat.items():
        rule = by_path.get(path)
        if rule is None:
            continue
        our_shape = tuple(shape.shape)
        layers = range(our_shape[0]) if rule.stacked else [None]
        slice_shape = our_shape[1:] if rule.stacked else our_shape
        for layer in layers:
            name = _resolve(reader, rule, layer)
            if name is None:
                missing.append(rule.hf_names(layer)[0])
                continue
            found = reader.shape(name)
            if not rule.transform.matches(found, slice_shape):
                mismatched.append(f"{name}: expected {rule.transform.expected_hf(slice_shape)}, found {found}")
            resolved[(path, layer)] = name
    used = set(resolved.values())
    ignore_res = [re.compile(p) for p in ignore] + list(IGNORED_HF_KEYS)
    unexpected = sorted(k for k in reader.keys() if k not in used and not any(p.fullmatch(k) for p in ignore_res))
    if missing:
        problems.append(f"missing keys ({len(missing)}): " + ", ".join(missing))
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): " + ", ".join(unexpected))
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): " + "; ".join(mismatched))
    if problems:
        raise CheckpointMismatchError(f"{reader.folder} does not match the model:\n  " + "\n  ".join(problems))
    return resolved


def load_params(
    reader: SafetensorsReader,
    rules: Sequence[KeyRule],
    shapes: dict,
    shardings: dict | None = None,
    ignore: Iterable[str] = (),
) -> dict:
    """Sharded parameters (dtype from `shapes`) read from `reader`; `shardings=None` puts them on the default device."""
    resolved = check_keys(reader, rules, shapes, ignore)
    by_path = {r.path: r for r in rules}
    flat_shapes = _flat_paths(shapes)
    flat_shardings = _flat_paths(shardings) if shardings is not None else {}
    out = {}
    for path, sds in flat_shapes.items():
        rule = by_path[path]
        sharding = flat_shardings.get(path) or NamedSharding(
            jax.sharding.Mesh(np.array(jax.devices()[:1]), ("d",)), jax.sharding.PartitionSpec())
        out[path] = _load_one(reader, rule, resolved, path, tuple(sds.shape), sds.dtype, sharding)
    return _unflatten(out)


def _load_one(reader, rule: KeyRule, resolved, path, shape, dtype, sharding) -> jax.Array:
    def tensor(layer):
        name = resolved[(path, layer)]
        slice_shape = shape[1:] if rule.stacked else shape
        return rule.transform.to_ours(reader.read(name), slice_shape)

    def shard(index: tuple[slice, ...]) -> np.ndarray:
        if rule.stacked:
            layers = range(*index[0].indices(shape[0]))
            return np.stack([tensor(layer)[index[1:]] for layer in layers]).astype(dtype)
        return np.asarray(tensor(None)[index]).astype(dtype)

    return jax.make_array_from_callback(shape, sharding, shard)


def export_params(
    params: dict, rules: Sequence[KeyRule], writer: SafetensorsWriter, dtype=None, hf_shapes: dict | None = None
) -> list[str]:
    """Write every parameter under its (primary) Hugging Face name, gathering one tensor (one layer) at a time."""
    flat = _flat_paths(params)
    by_path = {r.path: r for r in rules}
    missing = sorted(set(by_path) - set(flat))
    if missing:
        raise CheckpointMismatchError("parameters missing for export: " + ", ".join(missing))
    written = []
    for path, arr in flat.items():
        if path not in by_path:
            raise CheckpointMismatchError(f"parameter {path} has no key rule for export")
        rule = by_path[path]
        layers = range(arr.shape[0]) if rule.stacked else [None]
        for layer in layers:
            part = arr[layer] if layer is not None else arr
            host = np.asarray(jax.device_get(part))
            if dtype is not None:
                host = host.astype(dtype)
            name = rule.hf.format(i=layer) if layer is not None else rule.hf
            hf_shape = (hf_shapes or {}).get(name)
            writer.add(name, rule.transform.to_hf(host, hf_shape))
            written.append(name)
    return written
