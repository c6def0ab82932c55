"""TPU topologies without TPUs: parse a name such as `v5e:4x4`, describe its chips, and lay a mesh over it.

    topo = get_topology("v5e:4x4", num_slices=2)
    mesh = topology_mesh(topo, (1, -1, 4))        # Mesh('slice': 2, 'data': 1, 'fsdp': 4, 'tensor': 4) of TPU devices

The devices come from libtpu's compile-only client (`jax.experimental.topologies`), so this works on a CPU machine
with `jax[tpu]` installed; `jax.devices()` keeps returning the CPU devices. `skyjax.parallel.aot` compiles for them.

Names follow libtpu: GENERATION:AxB (2-D torus chips: v5e, v6e) or GENERATION:AxBxC (3-D: v4, v5p, tpu7x), counted in
chips. `v5litepod-16`-style accelerator types are Cloud API names, not topologies, and are rejected with a hint.

Hosts: a slice is served by several hosts (processes), each with its own data pipeline; `device_hosts` says which
host drives each device (libtpu's compile-only devices carry the `process_index` a pod would give them) and
`TpuTopology.num_hosts` counts them: v5e:4x4 is 4 hosts, v5p:2x2x4 4, two v5e:4x8 slices 16; v5e:2x2 and v5e:2x4 are
one host each.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import glob
import itertools
import math
import os
import re
from typing import Sequence

GiB = 1024**3


class TopologyError(ValueError):
    """An unknown or malformed topology name, or a mesh shape that cannot be laid out on the topology."""


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    """What one TPU generation looks like to JAX and to the memory budget."""

    generation: str  # our canonical name: v4, v5e, v5p, v6e, tpu7x
    libtpu_name: str  # the prefix libtpu's topology parser wants
    chip_config: str  # libtpu chip config: 'megacore' fuses the two TensorCores of a v4/v5p chip into one device
    dims: int  # 2 for a 2-D torus (v5e, v6e), 3 otherwise
    hbm_gib: float  # HBM per chip
    devices_per_chip: int  # JAX devices per chip (TPU7x exposes each of its two TensorCores as a device)
    peak_bf16_tflops: float  # per chip, for a compute-bound lower bound on step time

    @property
    def hbm_bytes_per_device(self) -> int:
        return int(self.hbm_gib * GiB) // self.devices_per_chip


# HBM and bf16 peak per chip, from Google Cloud's TPU system-architecture pages (cloud.google.com/tpu/docs/v4, /v5e,
# /v5p, /v6e, /tpu7x): v4 32 GiB / 275 TFLOPs; v5e 16 GiB / 197; v5p 95 GiB / 459; v6e (Trillium) 32 GiB / 918;
# TPU7x (Ironwood) 192 GiB / 2307 with two TensorCores per chip that JAX sees as two devices (96 GiB each).
# The runtime keeps a little for itself: XLA's own compile-time check allows 15.75 GiB of a v5e's 16.
CHIPS: dict[str, ChipSpec] = {
    "v4": ChipSpec("v4", "v4", "megacore", 3, 32, 1, 275),
    "v5e": ChipSpec("v5e", "v5e", "default", 2, 16, 1, 197),
    "v5p": ChipSpec("v5p", "v5", "megacore", 3, 95, 1, 459),
    "v6e": ChipSpec("v6e", "v6e", "default", 2, 32, 1, 918),
    "tpu7x": ChipSpec("tpu7x", "tpu7x", "default", 3, 192, 2, 2307),
}
_ALIASES = {"v5": "v5p", "v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "trillium": "v6e", "v6lite": "v6e",
            "ironwood": "tpu7x", "v7x": "tpu7x", "tpu7": "tpu7x"}


@dataclasses.dataclass(frozen=True)
class TpuTopology:
    """One or more identical TPU slices, e.g. two v5e:4x4 slices joined over the data-centre network."""

    chip: ChipSpec
    shape: tuple[int, ...]  # chips per slice along each torus axis
    num_slices: int = 1

    @property
    def name(self) -> str:
        return f"{self.chip.generation}:{'x'.join(map(str, self.shape))}"

    def __str__(self) -> str:
        return self.name if self.num_slices == 1 else f"{self.num_slices} x {self.name}"

    @property
    def chips_per_slice(self) -> int:
        return math.prod(self.shape)

    @property
    def devices_per_slice(self) -> int:
        return self.chips_per_slice * self.chip.devices_per_chip

    @property
    def num_devices(self) -> int:
        return self.devices_per_slice * self.num_slices

    @property
    def physical_axes(self) -> tuple[int, ...]:
        """The axis sizes a mesh axis may be a product of: the torus axes (and the cores of a TPU7x chip)."""
        cores = (self.chip.devices_per_chip,) if self.chip.devices_per_chip > 1 else ()
        return tuple(s for s in (*self.shape, *cores) if s > 1)

    def devices(self) -> list:
        """Compile-only TPU devices of every slice (needs libtpu; no TPU)."""
        return list(_topology_devices(self.chip.libtpu_name, self.shape, self.chip.chip_config, self.num_slices))

    @property
    def num_hosts(self) -> int:
        """Hosts (processes, each reading and collating its share of every batch) of all slices together."""
        return len(set(device_hosts(self.devices()).values()))


# The largest slice that is ONE host, by device kind: Cloud's 8-chip single-host machine types (v5litepod-8 =
# ct5lp-hightpu-8t, v6e-8 = ct6e-standard-8t). libtpu's compile-only topologies give every slice hosts of at most 2x2
# chips (their default chips_per_host_bounds), which is what larger v5e / v6e slices and v4 / v5p slices are (4 chips
# per host), but would split a v5e:2x4 into two processes.
SINGLE_HOST_DEVICES = {"TPU v5 lite": 8, "TPU v6 lite": 8}


def device_hosts(devices) -> dict[int, int]:
    """{device id: host} for a topology's devices (or a mesh's: `mesh.devices.flat`), hosts numbered 0..H-1 in
    process order. A host is a distinct `process_index`, except that a v5e / v6e slice of at most 8 chips is one host
    (`SINGLE_HOST_DEVICES`); with several slices every slice has its own hosts. CPU devices: one host."""
    devices = list(devices)
    slices = collections.defaultdict(list)
    for d in devices:
        slices[getattr(d, "slice_index", 0)].append(d)
    key = {}
    for s, members in slices.items():
        one_host = len(members) <= SINGLE_HOST_DEVICES.get(members[0].device_kind, 0)
        for d in members:
            key[d.id] = (s, 0) if one_host else (0, d.process_index)  # a slice's own host, or its process
    order = {k: i for i, k in enumerate(sorted(set(key.values()), key=lambda k: (k[1], k[0])))}
    return {i: order[k] for i, k in key.items()}


def parse_topology(name: str, num_slices: int = 1) -> TpuTopology:
    """`v5e:4x4`, `v5p:2x2x2` (or libtpu's `v5:2x2x2`), `v4:2x2x1`, `v6e:2x2`, `tpu7x:2x2x1` -> TpuTopology."""
    if num_slices < 1:
        raise TopologyError(f"num_slices must be >= 1, got {num_slices}")
    m = re.fullmatch(r"\s*([A-Za-z0-9_]+)\s*[:=]\s*(\d+(?:x\d+)*)\s*", name)
    if not m:
        hint = ""
        acc = re.fullmatch(r"(v\d+[a-z]*|tpu\d+x?)-(\d+)", name.strip())
        if acc:
            hint = (f" ({name!r} is a Cloud accelerator type; AOT needs the chip layout, e.g. v5litepod-16 is "
                    f"v5e:4x4, v5p-16 is v5p:2x2x2, v6e-16 is v6e:4x4)")
        raise TopologyError(f"topology {name!r} is not of the form GENERATION:AxB[xC] such as v5e:4x4{hint}")
    gen = m.group(1).lower()
    gen = _ALIASES.get(gen, gen)
    if gen not in CHIPS:
        raise TopologyError(f"unknown TPU generation {m.group(1)!r} in {name!r} (known: {', '.join(CHIPS)})")
    chip = CHIPS[gen]
    shape = tuple(int(x) for x in m.group(2).split("x"))
    if chip.dims == 3 and len(shape) == 2:
        shape = (*shape, 1)
    if len(shape) != chip.dims or any(s < 1 for s in shape):
        want = "AxB" if chip.dims == 2 else "AxBxC"
        raise TopologyError(f"topology {name!r}: {gen} chips form a {chip.dims}-D torus, write it as {gen}:{want}")
    return TpuTopology(chip, shape, num_slices)


def get_topology(topology: "str | TpuTopology", num_slices: int | None = None) -> TpuTopology:
    """A TpuTopology from a name or an existing one (num_slices, when given, replaces its slice count)."""
    if isinstance(topology, TpuTopology):
        return topology if num_slices is None else dataclasses.replace(topology, num_slices=num_slices)
    return parse_topology(topology, 1 if num_slices is None else num_slices)


def _local_tpu_present() -> bool:
    # TPU VMs expose the chips as /dev/accel* (v4, v5p) or /dev/vfio/N (v5e, v6e and later).
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


@contextlib.contextmanager
def _quiet_libtpu_env():
    """Give libtpu a harmless single-host identity while it loads on a machine without TPUs.

    Without the first two libtpu prints warnings about missing TPU metadata. ALLOW_MULTIPLE_LIBTPU_LOAD lets this
    process load libtpu while another one holds /tmp/libtpu_lockfile (any JAX process in a venv with libtpu takes
    it, even on a CPU machine); the lock guards chips, and a compile-only client uses none. The variables are set
    only for the load and removed again, so `skyjax.parallel.distributed` never mistakes this machine for a TPU worker.
    """
    added = {}
    if not _local_tpu_present():
        for key, value in (("TPU_ACCELERATOR_TYPE", "v5litepod-4"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                           ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
            if key not in os.environ:
                os.environ[key] = added[key] = value
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


@functools.lru_cache(maxsize=32)
def _topology_devices(libtpu_name: str, shape: tuple[int, ...], chip_config: str, num_slices: int) -> tuple:
    try:
        import libtpu  # noqa: F401  (only to give a clear error when it is missing)
    except ImportError:
        raise TopologyError(
            "TPU AOT compiles need libtpu: pip install 'jax[tpu]==0.10.2' (it is in skyjax's `tpu` and `test` extras)"
        ) from None
    from jax.experimental import topologies

    name = f"{libtpu_name}:{'x'.join(map(str, shape))}"
    with _quiet_libtpu_env():
        try:
            desc = topologies.get_topology_desc(topology_name=name, platform="tpu", chip_config_name=chip_config,
                                                num_slices=num_slices)
        except Exception as e:  # libtpu's JaxRuntimeError: an impossible layout such as v5e:3x3
            hint = (" (another process holds libtpu; for a compile-only run set ALLOW_MULTIPLE_LIBTPU_LOAD=1)"
                    if "lockfile" in str(e) else "")
            raise TopologyError(f"libtpu rejects topology {name!r} x {num_slices} slice(s): {e}{hint}") from e
    return tuple(desc.devices)


# --- meshes over a topology -------------------------------------------------------------------------------------------


def _factorisations(physical: Sequence[int], sizes: Sequence[int]) -> bool:
    """Whether each of `sizes` is the product of its own subset of the `physical` axes (all used exactly once)."""
    need = [s for s in sizes if s > 1]
    for owner in itertools.product(range(len(need)), repeat=len(physical)):
        prods = [1] * len(need)
        for axis, who in zip(physical, owner):
            prods[who] *= axis
        if prods == need:
            return True
    return not physical and not need


def _explain_layout(topo: TpuTopology, shape: Sequence[int], axes: Sequence[str]) -> str:
    physical = topo.physical_axes
    allowed = sorted({math.prod(c) for r in range(len(physical) + 1) for c in itertools.combinations(physical, r)})
    bad = [f"'{a}' (size {s})" for a, s in zip(axes, shape) if s not in allowed]
    if len(bad) == 1:
        what = f"mesh axis {bad[0]} is not a product of physical axes"
    elif bad:
        what = f"mesh axes {', '.join(bad)} are not products of physical axes"
    else:
        what = "the mesh axes cannot each take their own physical axes"
    cores = " with 2 cores per chip" if topo.chip.devices_per_chip > 1 else ""
    return (f"mesh {dict(zip(axes, shape))} cannot be laid out on {topo.name} (physical axes "
            f"{'x'.join(map(str, physical)) or '1'}{cores}): {what}; each mesh axis must be the product of its own "
            f"physical axes (sizes possible here: {', '.join(map(str, allowed))}) so that its collectives run over "
            f"whole ICI rings")


def topology_mesh(topology: "str | TpuTopology", shape: Sequence[int], axes: Sequence[str] | None = None,
                  num_slices: int | None = None):
    """A Mesh of compile-only TPU devices over (slice?, data, fsdp, tensor), Auto-typed like `make_mesh`.

    `shape` is the per-slice mesh (one entry may be -1); with several slices a leading 'slice' axis spans them
    (data parallel over the data-centre network). Each per-slice axis must be a product of physical torus axes.
    """
    from jax.experimental import mesh_utils
    from jax.sharding import AxisType, Mesh

    from skyjax.parallel.mesh import MESH_AXES, MeshConfig, hosts_contiguous

    topo = get_topology(topology, num_slices)
    axes = tuple(MESH_AXES if axes is None else axes)
    try:
        per_slice = MeshConfig(shape=tuple(shape), axes=axes).resolved_shape(topo.devices_per_slice)
    except ValueError as e:
        raise TopologyError(f"{topo}: one slice has {topo.devices_per_slice} devices; {e}") from None
    if not _factorisations(topo.physical_axes, per_slice):
        raise TopologyError(_explain_layout(topo, per_slice, axes))
    devices = topo.devices()
    try:
        if topo.num_slices > 1:
            grid = mesh_utils.create_hybrid_device_mesh(
                (1, *per_slice), (topo.num_slices,) + (1,) * len(per_slice), devices=devices)
            axes = ("slice", *axes)
        else:
            grid = mesh_utils.create_device_mesh(per_slice, devices=devices)
    except (NotImplementedError, ValueError, AssertionError) as e:  # defensive: the check above should catch these
        raise TopologyError(f"{_explain_layout(topo, per_slice, axes)} ({e})") from e
    hosts = device_hosts(devices)  # each host's devices one block of the batch axes, as make_mesh does on a pod
    grid = hosts_contiguous(grid, lambda d: hosts[d.id], slice_axis=topo.num_slices > 1)
    return Mesh(grid, axes, axis_types=(AxisType.Auto,) * len(axes))
