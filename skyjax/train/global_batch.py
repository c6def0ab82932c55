"""Multi-host training batches: the global batch the step sees, from every host's local batch.

On H hosts each data pipeline reads only its share of the records (`RecordPipeline`: records host::H) and collates
its own local batch, with its own buckets and its own packed images. The global batch is HOST-MAJOR: host 0's local
batch, then host 1's, ... along the axis after the micro-batch axis A (every array keeps A in front):

    token rows      input_ids / attention_mask / assistant_mask [A, H*R, S]: host h's R rows at rows [h*R, (h+1)*R).
                    Reward model: each host's block is [its b_l chosen rows, its b_l rejected rows], so
                    `pair_scores` splits the scores per host block (scores.reshape(H, 2, b_l)). Sharded over the
                    batch axes: each host supplies only its own rows (`jax.make_array_from_process_local_data`), so its
                    devices must hold exactly its block (checked; an error names the mesh axes otherwise).
    weights         pair_weight / row_weight [A, H*b_l]: host-major, in the order the objectives return the scores
                    (also the shared-prompt layout's branch_ids [A, H*b_l, S] and score_index [A, H*b_l, 2]: per
                    row, no offsets).
    packed images   pixel_values [A, H*N, ...] (Qwen2.5-VL patches or R1V tiles): the hosts' packed arrays side by
                    side, host h's at offset h*N (its real patches first, then its padding). Replicated (P()) as on
                    one host, so every host gathers every host's copy (`process_allgather`).
    vision_meta     (Qwen2.5-VL, see `vision_inputs`) the same concatenation with host h's indices moved into its
                    block: window_index / reverse_index + h*U (U = N / merge unit merge units), window_segment /
                    image_segment + h*N (padding stays -1), so that the vision tower computes each host's images
                    exactly as alone: no attention crosses two hosts' images (segment ids are distinct), and the
                    merged features come back as H blocks of U rows, each with its host's real rows first.
    image_grid_thw  [A, H*M, 3]: host h's slots after host h-1's (reward model: [chosen slots, rejected slots] per
                    host, or one list with data.share_prompt). That lists the images in row-major order of the global
                    rows, the order M-RoPE (`skyjax.nn.mrope.mrope_positions`) consumes them; the all-zero rows of
                    unused slots in between own no tokens and advance no position, so they are skipped (as a single
                    host's chosen / rejected halves already are).
    host_blocks     [A, H] int32 = 0..H-1, only when H > 1: its static length H tells the objectives (`host_blocks`)
                    and `merge_image_features(..., feature_blocks=H)` that host h's rows read host h's image
                    features. A single-host batch has no such key: the single-host program is unchanged.

`skyjax aot` compiles this layout for a topology of H hosts (`abstract_global_batch`, used by tasks.abstract_batch):
every host with its share of data.batch_size (`host_share`) collated at the largest buckets, so pixel_values has
H * max(data.patch_buckets) rows; on one host it compiles the single-host batch.

Buckets: the hosts' static shapes must agree for a step, but each pipeline picks the smallest buckets its own rows
fit. So every local batch is first padded to the largest bucket any host chose (sequence length, patches or tiles,
image slots), exactly as if it had been collated with that bucket (padding tokens masked, padding patches in segment
-1, zero grid slots). A disagreement no bucket explains (rows or pairs per host, micro-batches, keys, dtypes) is an
error naming every host's shape.

`assemble_global_batch(local_batches)` is the pure part (numpy in, numpy out; testable in one process);
`place_global_batch(local_batch, mesh)` is what `skyjax.train.batching.to_device` runs when there is more than one
process, every process in step: two small all-gathers agree on the shapes, the local batch is padded, the token rows
are placed from the local rows only, one all-gather (one packed byte buffer) brings every host's replicated arrays,
and they are assembled as above. Errors are computed from gathered data, so every host raises the same one (none is
left waiting in a collective).
"""

from __future__ import annotations

import zlib
from typing import Callable, Mapping, Sequence

import numpy as np

HOSTS_KEY = "host_blocks"  # [A, H] int32 in a multi-host global batch (absent on one host)
HOST_AXIS = 1  # host blocks run along the axis after the micro-batch axis
ROW_KEYS = ("input_ids", "attention_mask", "assistant_mask")  # token rows [A, R, S] (skyjax.train.setup uses these)
SEQ_KEYS = ROW_KEYS + ("branch_ids", "completion", "predict_from")  # per-token arrays [A, R, S]: a larger sequence bucket pads them
SEQ_AXIS = 2

# vision_meta (skyjax.models.qwen2_5_vl_vision.vision_inputs) by key: (padding value, how host h's copy is offset).
# "units": padding merge units map to themselves (arange), so the permutation stays one; offset + h * U.
# "segment": padding patches are segment -1 (PAD_SEGMENT); real ids are offset by h * N (distinct across hosts).
PAD_SEGMENT = -1
META_RULES = {
    "window_index": ("units", "units"),
    "reverse_index": ("units", "units"),
    "rope_ids": (0, None),
    "window_segment": (PAD_SEGMENT, "segment"),
    "image_segment": (PAD_SEGMENT, "segment"),
    "valid": (False, None),
    "valid_merged": (False, None),
}

Path = tuple  # a key path in a nested dict batch, e.g. ("vision", "vision_meta", "window_index")


class HostBatchError(ValueError):
    """The hosts' local batches cannot form one global batch (names the host, key and shapes)."""


def host_blocks(batch: Mapping) -> int:
    """H, the number of host blocks of a (micro-)batch: 1 for a single-host batch. A static Python int (the
    length of `host_blocks`), so objectives can branch on it under jit."""
    x = batch.get(HOSTS_KEY)
    return 1 if x is None else int(x.shape[-1])


def batch_kind(batch: Mapping) -> str:
    """'reward_model' (preference pairs, two rows each: pair_weight), 'reward_model_shared_prompt' (one row per pair:
    branch_ids, see skyjax.train.pairs.collate_shared_prompt) or 'sft' (rows: row_weight)."""
    if "pair_weight" in batch:
        return "reward_model_shared_prompt" if "branch_ids" in batch else "reward_model"
    if "row_weight" in batch:
        return "sft"
    raise HostBatchError(f"a batch with keys {sorted(batch)} is neither a preference batch (pair_weight) nor an SFT "
                         f"batch (row_weight)")


# --- nested dicts <-> {path: array} -------------------------------------------------------------------------------


def _flatten(tree: Mapping, prefix: Path = ()) -> dict[Path, np.ndarray]:
    out = {}
    for key in sorted(tree):
        value = tree[key]
        if isinstance(value, Mapping):
            out.update(_flatten(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out


def _unflatten(flat: Mapping[Path, object]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


def _name(path: Path) -> str:
    return "/".join(path)


def _is_meta(path: Path) -> bool:
    return len(path) >= 2 and path[-2] == "vision_meta"


def padded_axis(path: Path) -> int | None:
    """The axis of a batch array that a larger bucket lengthens (None: no bucket, hosts must agree)."""
    if len(path) == 1 and path[0] in SEQ_KEYS:
        return SEQ_AXIS  # seq_buckets
    if path[-1] in ("pixel_values", "image_grid_thw") or _is_meta(path):
        return HOST_AXIS  # patch / tile buckets, image-slot buckets
    return None


# --- one host's batch: pad to the common buckets --------------------------------------------------------------------


def common_shapes(shapes: Sequence[Mapping[Path, tuple]], kind: str) -> dict[Path, tuple]:
    """The shapes every host's batch is padded to: per array the largest over hosts, where only the bucketed axis
    (`padded_axis`) may differ. Raises HostBatchError naming every host's shape otherwise."""
    keys = [set(s) for s in shapes]
    if any(k != keys[0] for k in keys[1:]):
        listing = "; ".join(f"host {h}: {sorted(map(_name, k))}" for h, k in enumerate(keys))
        raise HostBatchError(f"the hosts collated batches with different keys ({listing})")
    target = {}
    for path in sorted(keys[0]):
        per_host = [tuple(s[path]) for s in shapes]
        listing = ", ".join(f"host {h}: {s}" for h, s in enumerate(per_host))
        if any(len(s) != len(per_host[0]) for s in per_host):
            raise HostBatchError(f"{_name(path)} has different ranks on the hosts ({listing})")
        want = tuple(max(dims) for dims in zip(*per_host))
        axis = padded_axis(path)
        for s in per_host:
            bad = [i for i, (a, b) in enumerate(zip(s, want)) if a != b and i != axis]
            if bad:
                what = {0: "micro-batches (optimizer.grad_accum)", 1: "rows (data.batch_size / hosts)"}.get(
                    bad[0], f"axis {bad[0]}")
                raise HostBatchError(f"the hosts' local batches disagree on {_name(path)} {what}, which no bucket "
                                     f"pads: {listing} ({kind} batch)")
        if kind == "reward_model" and path[-1] == "image_grid_thw" and want[HOST_AXIS] % 2:
            raise HostBatchError(f"{_name(path)} must hold [chosen slots, rejected slots] ({listing})")
        target[path] = want
    return target


def pad_token(batch: Mapping) -> int:
    """The token that fills padded sequence positions: the batch's own padding token (input_ids where
    attention_mask is 0), or, when no row is padded, the last token of the first row (real, and never an image
    placeholder: an image always ends with its end-of-image token). Masked positions are never attended to nor
    trained on; only an image placeholder there would matter (features are assigned by counting them)."""
    ids, mask = np.asarray(batch["input_ids"]), np.asarray(batch["attention_mask"]).astype(bool)
    padded = ids[~mask]
    return int(padded[0]) if padded.size else int(ids.reshape(-1, ids.shape[-1])[0, -1])


def _pad_leaf(path: Path, x: np.ndarray, want: tuple, kind: str, fill_token: int) -> np.ndarray:
    axis = padded_axis(path)
    extra = want[axis] - x.shape[axis]
    name = path[-1]
    if _is_meta(path):
        if name not in META_RULES:
            raise HostBatchError(f"vision_meta key {name!r} has no padding rule (skyjax.train.global_batch.META_RULES)")
        fill = META_RULES[name][0]
        if fill == "units":  # padding merge units are fixed points of the window permutation
            pad = np.broadcast_to(np.arange(x.shape[axis], want[axis], dtype=x.dtype), (x.shape[0], extra))
            return np.concatenate([x, pad], axis=axis)
    elif name == "image_grid_thw" and kind == "reward_model":  # [chosen slots, rejected slots]: pad each half
        a, slots = x.shape[0], x.shape[axis] // 2
        halves = x.reshape(a, 2, slots, 3)
        halves = np.pad(halves, [(0, 0), (0, 0), (0, want[axis] // 2 - slots), (0, 0)])
        return halves.reshape(a, want[axis], 3)
    elif name == "input_ids":
        fill = fill_token
    else:  # masks False, branch ids 0 (as padding), pixels / tiles 0, unused grid slots 0
        fill = 0
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return np.pad(x, widths, constant_values=fill)


def pad_local_batch(batch: Mapping, target: Mapping[Path, tuple], kind: str) -> dict:
    """`batch` padded to the `target` shapes (from `common_shapes`), as if collated with those buckets."""
    flat = _flatten(batch)
    fill = pad_token(batch)
    out = {}
    for path, x in flat.items():
        x = np.asarray(x)
        out[path] = x if x.shape == target[path] else _pad_leaf(path, x, target[path], kind, fill)
    return _unflatten(out)


# --- H padded batches -> the global batch ---------------------------------------------------------------------------


def _offset(path: Path, x: np.ndarray, host: int) -> np.ndarray:
    """Host `host`'s copy of a vision_meta array moved into its block of the global arrays."""
    if not _is_meta(path) or host == 0:
        return x
    rule = META_RULES.get(path[-1])
    if rule is None:
        raise HostBatchError(f"vision_meta key {path[-1]!r} has no offset rule (skyjax.train.global_batch.META_RULES)")
    if rule[1] == "units":
        return x + host * x.shape[HOST_AXIS]  # U merge units per host
    if rule[1] == "segment":
        return np.where(x >= 0, x + host * x.shape[HOST_AXIS], x)  # N patches per host: ids stay distinct
    return x


def concat_host_batches(batches: Sequence[Mapping]) -> dict:
    """The host-major concatenation of H batches of equal shapes (vision_meta offset per host) + `host_blocks`."""
    flats = [_flatten(b) for b in batches]
    out = {}
    for path in flats[0]:
        parts = [np.asarray(f[path]) for f in flats]
        if any(p.shape != parts[0].shape for p in parts):
            listing = ", ".join(f"host {h}: {p.shape}" for h, p in enumerate(parts))
            raise HostBatchError(f"{_name(path)} has different shapes on the hosts ({listing}): pad first")
        out[path] = np.concatenate([_offset(path, p, h) for h, p in enumerate(parts)], axis=HOST_AXIS)
    hosts = len(batches)
    if hosts > 1:
        a = next(iter(out.values())).shape[0]
        out[(HOSTS_KEY,)] = np.broadcast_to(np.arange(hosts, dtype=np.int32), (a, hosts)).copy()
    return _unflatten(out)


def batch_shapes(batch: Mapping) -> dict[Path, tuple]:
    """{key path: shape} of a (nested) batch."""
    return {p: tuple(np.shape(x)) for p, x in _flatten(batch).items()}


def pad_to_common(local_batches: Sequence[Mapping], kind: str | None = None) -> list[dict]:
    """Every local batch padded to the largest buckets among them (`common_shapes`, `pad_local_batch`)."""
    kind = kind or batch_kind(local_batches[0])
    target = common_shapes([batch_shapes(b) for b in local_batches], kind)
    return [pad_local_batch(b, target, kind) for b in local_batches]


def assemble_global_batch(local_batches: Sequence[Mapping], kind: str | None = None) -> dict:
    """The host-major global batch (numpy) of H hosts' local batches (numpy, as the pipelines collate them, in
    process order): each padded to the largest buckets among them, then concatenated with host h's vision indices
    offset into its block (see the module docstring). `row_ids` lists, if present, are concatenated too.
    `kind` (see `batch_kind`) defaults to what the batch's keys say."""
    if not local_batches:
        raise HostBatchError("no local batches to assemble")
    local = [dict(b) for b in local_batches]
    row_ids = [b.pop("row_ids", None) for b in local]
    out = concat_host_batches(pad_to_common(local, kind))
    if all(r is not None for r in row_ids):
        out["row_ids"] = [i for r in row_ids for i in r]
    return out


# --- the global batch's shapes, for AOT compiles ----------------------------------------------------------------------


def host_share(batch_size: int, hosts: int, micro_batches: int = 1, unit: str = "rows") -> int:
    """Rows (pairs / conversations) of one host's micro-batch: data.batch_size is split over the hosts
    (`skyjax.train.pipeline.RecordPipeline`: each host collates batch_size / H), then over the micro-batches. Raises
    ValueError naming data.batch_size and the host count (or optimizer.grad_accum) when it does not divide."""
    if batch_size % hosts:
        raise ValueError(f"data.batch_size {batch_size} does not divide over the {hosts} hosts of the topology: each "
                         f"host reads and collates data.batch_size / {hosts} {unit} (use a multiple of {hosts})")
    per_host = batch_size // hosts
    if per_host % micro_batches:
        where = f"each of the {hosts} hosts' {per_host}" if hosts > 1 else f"the {per_host}"
        raise ValueError(f"data.batch_size {batch_size}: {where} {unit} do not split into optimizer.grad_accum="
                         f"{micro_batches} micro-batches")
    return per_host // micro_batches


def abstract_global_batch(local: Mapping, hosts: int) -> dict:
    """The global batch's jax.ShapeDtypeStructs (no shardings) of H hosts that each collated a batch of the shapes
    `local` ([A, ...] arrays or shape structs, nested dicts): what `concat_host_batches` builds from them (every array
    H times longer along the axis after A, plus `host_blocks` [A, H] int32). With one host, `local` itself."""
    import jax

    if hosts == 1:
        return dict(local)
    widen = lambda x: jax.ShapeDtypeStruct((x.shape[0], hosts * x.shape[HOST_AXIS], *x.shape[2:]), x.dtype)  # noqa
    out = jax.tree.map(widen, dict(local))
    a = jax.tree.leaves(local)[0].shape[0]
    out[HOSTS_KEY] = jax.ShapeDtypeStruct((a, hosts), np.int32)
    return out


# --- which devices hold which rows -----------------------------------------------------------------------------------


def check_host_rows(sharding, global_shape: tuple, hosts: int, key: str = "input_ids",
                    host_of: Callable = lambda d: d.process_index) -> None:
    """Every host's devices must hold exactly its own block of the host-major rows (axis 1): rows
    [h*R, (h+1)*R) for host h, R = global rows / H. Checked for all hosts at once (every host raises alike, rather
    than one raising while the others wait in a collective); raises HostBatchError naming the mesh axes."""
    rows = global_shape[HOST_AXIS]
    per_host = rows // hosts
    held: dict[int, set[tuple[int, int]]] = {h: set() for h in range(hosts)}
    for device, index in sharding.devices_indices_map(tuple(global_shape)).items():
        start, stop, _ = index[HOST_AXIS].indices(rows)
        held.setdefault(host_of(device), set()).add((start, stop))
    for host, ranges in sorted(held.items()):
        want = (host * per_host, (host + 1) * per_host)
        end, exact = want[0], bool(ranges) and rows % hosts == 0
        for start, stop in sorted(ranges):  # inside the block, and covering it without a gap
            exact &= want[0] <= start <= end and stop <= want[1]
            end = max(end, stop)
        if exact and end == want[1]:
            continue
        spec = getattr(sharding, "spec", None)
        axes = spec[HOST_AXIS] if spec is not None and len(spec) > HOST_AXIS else None
        mesh = dict(sharding.mesh.shape) if hasattr(sharding, "mesh") else "?"
        holds = ", ".join(f"[{a}, {b})" for a, b in sorted(ranges)) or "nothing"
        how = (f"split over mesh axes {axes!r}" if axes else
               "replicated (they do not divide the batch axes, or the mesh has none)")
        raise HostBatchError(
            f"host {host}'s devices hold rows {holds} of {key} {tuple(global_shape)} but its local batch is rows "
            f"[{want[0]}, {want[1]}) of the host-major global batch: the rows are {how} on mesh {mesh}. On several "
            f"hosts the batch axes ('slice', 'data', 'fsdp') must lay the hosts out in process order, each host's "
            f"devices one contiguous block of rows (no axis that splits the rows may mix hosts, and a tensor axis "
            f"must not span hosts), and the global rows must divide over them")


# --- the multi-process path ------------------------------------------------------------------------------------------


def _allgather(x: np.ndarray) -> np.ndarray:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x))  # [H, ...]: stacked in process order


def gather_shapes(flat: Mapping[Path, np.ndarray]) -> list[dict[Path, tuple]]:
    """Every host's {path: shape} (all hosts must have the same keys and dtypes: else an error on every host)."""
    import jax

    paths = sorted(flat)
    structure = repr([(p, str(np.asarray(flat[p]).dtype)) for p in paths]).encode()
    vector = np.array([v for p in paths for v in (np.ndim(flat[p]), *np.shape(flat[p]))], np.int32)
    header = _allgather(np.array([vector.size, zlib.crc32(structure) & 0x7FFFFFFF], np.int32))
    if np.any(header != header[0]):
        me = jax.process_index()
        raise HostBatchError(
            f"the hosts collated batches of different structure (keys or dtypes): host {me} has "
            f"{[(_name(p), str(np.asarray(flat[p]).dtype)) for p in paths]}; hosts "
            f"{[h for h in range(len(header)) if np.any(header[h] != header[me])]} differ from it")
    out = []
    for row in _allgather(vector):
        shapes, i = {}, 0
        for p in paths:
            n = int(row[i])
            shapes[p] = tuple(int(v) for v in row[i + 1:i + 1 + n])
            i += 1 + n
        out.append(shapes)
    return out


def gather_batches(batch: Mapping) -> list[dict]:
    """Every host's copy of `batch` (equal shapes and dtypes on all hosts), in process order: one all-gather of
    the arrays packed into one byte buffer."""
    flat = {p: np.ascontiguousarray(x) for p, x in _flatten(batch).items()}
    buffer = np.concatenate([x.reshape(-1).view(np.uint8) for x in flat.values()]) if flat else np.zeros(0, np.uint8)
    out = []
    for row in _allgather(buffer):
        parts, i = {}, 0
        for p, x in flat.items():
            parts[p] = row[i:i + x.nbytes].view(x.dtype).reshape(x.shape)
            i += x.nbytes
        out.append(_unflatten(parts))
    return out


def place_global_batch(batch: Mapping, mesh) -> dict:
    """This host's local batch -> the global batch on the mesh (jax.Arrays), on every one of the H processes
    (each calls it with its own local batch, in step): agree on the buckets, pad, place the token rows from the
    local rows (checked: this host's devices hold exactly its block), gather every host's replicated arrays
    (patches, vision metadata, grids, weights) and assemble them host-major."""
    import jax

    hosts = jax.process_count()
    batch = {k: v for k, v in batch.items() if k != "row_ids"}
    kind = batch_kind(batch)
    target = common_shapes(gather_shapes(_flatten(batch)), kind)
    local = pad_local_batch(batch, target, kind)
    rows = {k: local.pop(k) for k in ROW_KEYS if k in local}
    replicated = concat_host_batches(gather_batches(local))
    global_rows = {k: jax.ShapeDtypeStruct((x.shape[0], hosts * x.shape[HOST_AXIS], *x.shape[2:]), x.dtype)
                   for k, x in rows.items()}
    shardings = batch_shardings({**replicated, **global_rows}, mesh)
    out = {}
    for key, x in rows.items():
        shape = global_rows[key].shape
        check_host_rows(shardings[key], shape, hosts, key)
        out[key] = jax.make_array_from_process_local_data(shardings[key], x, shape)
    for key, value in replicated.items():
        out[key] = jax.tree.map(lambda x, s: jax.make_array_from_process_local_data(s, x, x.shape), value,
                                shardings[key])
    return out


def batch_shardings(batch: dict, mesh) -> dict:
    """NamedShardings of a collated batch (arrays or ShapeDtypeStructs): token rows over the batch axes (when they
    divide), everything else (the packed vision input, weights) replicated."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from skyjax.parallel.rules import logical_to_spec

    row_spec = logical_to_spec((None, "batch", "seq"), mesh, shape=batch["input_ids"].shape, strict=False)

    def spec(key, x):
        return NamedSharding(mesh, row_spec if key in ROW_KEYS else P())

    return {k: (jax.tree.map(lambda x: spec(k, x), v) if isinstance(v, dict) else spec(k, v))
            for k, v in batch.items()}
