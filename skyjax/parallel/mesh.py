"""Device meshes from config.

The mesh has the axes ('data', 'fsdp', 'tensor'); a multi-slice run adds a leading 'slice' axis over the data-centre
network. Axes are Auto-typed: sharding is decided by the logical-axis rules (see `rules.py`) and XLA's propagation,
and `with_sharding_constraint` works inside jitted code (jax 0.10's `make_mesh` default, Explicit axes, would not).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Callable, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from skyjax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
# On a CPU-only host a -1 mesh entry resolves against this many CPU devices at most (see cpu_devices_for)
MAX_AUTO_CPU_DEVICES = 8


class MeshError(UserError, ValueError):
    """A mesh shape that is invalid or does not fit the devices there are."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape over (data, fsdp, tensor). One entry may be -1: it takes all remaining devices."""

    shape: tuple[int, ...] = (1, -1, 1)
    axes: tuple[str, ...] = MESH_AXES
    num_slices: int = 1  # > 1 adds a leading 'slice' axis (data parallel across slices)

    def __post_init__(self):
        if len(self.shape) != len(self.axes):
            raise MeshError(f"mesh.shape {list(self.shape)} has {len(self.shape)} entries for axes "
                            f"{list(self.axes)}: give one size per axis")
        if sum(1 for s in self.shape if s == -1) > 1:
            raise MeshError(f"mesh.shape {list(self.shape)}: at most one axis may be -1 (all remaining devices)")
        if any(s == 0 or s < -1 for s in self.shape):
            raise MeshError(f"mesh.shape {list(self.shape)}: sizes must be >= 1, or -1 for one axis (all remaining "
                            f"devices)")
        if self.num_slices < 1:
            raise MeshError(f"mesh.num_slices={self.num_slices} is out of range: must be >= 1")

    def resolved_shape(self, num_devices: int) -> tuple[int, ...]:
        per_slice, rem = divmod(num_devices, self.num_slices)
        if rem:
            raise MeshError(f"{num_devices} devices do not split into mesh.num_slices={self.num_slices} slices")
        known = math.prod(s for s in self.shape if s != -1)
        if -1 in self.shape:
            if per_slice % known:
                raise MeshError(
                    f"mesh.shape {list(self.shape)}: the fixed axes ({known} devices) do not divide the {per_slice} "
                    f"devices available; choose fixed sizes whose product divides {per_slice}"
                )
            shape = tuple(per_slice // known if s == -1 else s for s in self.shape)
        else:
            shape = self.shape
        if math.prod(shape) != per_slice:
            raise MeshError(
                f"mesh.shape {list(self.shape)} needs {math.prod(shape)} devices per slice but {per_slice} are "
                f"available; use sizes whose product is {per_slice}, or -1 for one axis"
            )
        return shape


def cpu_devices_for(config: MeshConfig, processes: int = 1) -> int:
    """How many CPU devices each of `processes` processes of a CPU-only run of `config` gets.

    A fully given shape: its product times the number of slices, split evenly over the processes (a MeshError if it
    does not split). With a -1 entry, on one process: the host's cores (at most MAX_AUTO_CPU_DEVICES) rounded up to a
    multiple of the fixed entries, so the -1 axis spans several devices the way it would on an accelerator host,
    times the number of slices; on several: each process's cores rounded up so that all processes' devices together
    split into the slices and the fixed entries."""
    known = math.prod(s for s in config.shape if s != -1)
    if -1 not in config.shape:
        total = known * config.num_slices
        if total % processes:
            raise MeshError(f"mesh.shape {list(config.shape)}"
                            + (f" x mesh.num_slices={config.num_slices}" if config.num_slices > 1 else "")
                            + f" = {total} devices do not split over {processes} processes: use a shape whose "
                              f"device count is a multiple of {processes}, or -1 for one axis")
        return total // processes
    cores = min(os.cpu_count() or 1, MAX_AUTO_CPU_DEVICES)
    if processes == 1:
        return known * max(1, math.ceil(cores / known)) * config.num_slices
    step = known * config.num_slices // math.gcd(known * config.num_slices, processes)  # devices * processes divide
    return step * max(1, math.ceil(cores / step))


def job_processes() -> int:
    """The number of processes of this job, known before any JAX backend starts: jax.distributed's, once it is
    initialised (skyjax.parallel.distributed.initialize_from_environment), else 1."""
    try:
        from jax._src import distributed

        return distributed.global_state.num_processes or 1
    except (ImportError, AttributeError):  # pragma: no cover  (another JAX layout)
        return 1


def expose_cpu_devices(config: MeshConfig, processes: int | None = None) -> None:
    """Before the JAX backend starts: give the CPU platform `cpu_devices_for(config, processes)` devices in this
    process (or more if already asked for: `asked_cpu_devices`), `processes` defaulting to the job's
    (`job_processes`): with two processes, mesh.shape [2, 2, 2] makes 4 devices in each. Harmless on TPU/GPU
    hosts, whose meshes use the accelerators; a no-op once a backend is up (a notebook, the tests), which keeps the
    devices that exist."""
    processes = job_processes() if processes is None else processes
    try:
        jax.config.update("jax_num_cpu_devices", max(cpu_devices_for(config, processes), asked_cpu_devices()))
    except RuntimeError:
        pass


def asked_cpu_devices() -> int:
    """The CPU device count already asked for: jax_num_cpu_devices, else XLA_FLAGS'
    --xla_force_host_platform_device_count, else 1."""
    if jax.config.jax_num_cpu_devices > 0:
        return jax.config.jax_num_cpu_devices
    found = re.search(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
    return int(found.group(1)) if found else 1


def make_mesh(config: MeshConfig | Sequence[int] = MeshConfig(), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Build an Auto-axes mesh. `config` may be a plain shape tuple such as (2, 2, 2)."""
    if not isinstance(config, MeshConfig):
        config = MeshConfig(shape=tuple(config))
    devices = list(jax.devices() if devices is None else devices)
    wanted = config.num_slices * math.prod(config.shape)
    if -1 not in config.shape and wanted < len(devices) and jax.process_count() == 1:
        devices = devices[:wanted]  # a smaller mesh on one host (tests, debugging): use the first devices
    shape = config.resolved_shape(len(devices))
    axes = tuple(config.axes)
    if config.num_slices > 1:
        shape = (config.num_slices, *shape)
        axes = ("slice", *axes)
        # Devices of one slice must be contiguous on the slice axis: group them by their slice_index.
        devices.sort(key=lambda d: (getattr(d, "slice_index", 0), d.id))
    try:
        # create_device_mesh lays the axes out over the physical topology (ICI rings on TPU).
        from jax.experimental import mesh_utils

        if config.num_slices > 1 and hasattr(devices[0], "slice_index"):
            grid = mesh_utils.create_hybrid_device_mesh(
                (1, *shape[1:]), (config.num_slices,) + (1,) * (len(shape) - 1), devices=devices
            )
        else:
            grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # CPU devices and odd shapes: plain order is as good as any.
        grid = np.asarray(devices, dtype=object).reshape(shape)
    if jax.process_count() > 1:
        grid = hosts_contiguous(grid, lambda d: d.process_index, slice_axis=config.num_slices > 1)
    return Mesh(grid, axes, axis_types=(AxisType.Auto,) * len(axes))


def hosts_contiguous(grid: np.ndarray, host_of: Callable[[jax.Device], int], slice_axis: bool = False) -> np.ndarray:
    """The device grid with every host's devices one contiguous run in row-major order, hosts in increasing order
    (within each slice when `slice_axis`: the leading axis is left as it is).

    On several hosts each host feeds the step its own rows (skyjax.train.global_batch): host h's local batch is rows
    [h*R, (h+1)*R) of the global batch, so the devices holding those rows must be host h's. `create_device_mesh`
    orders devices along ICI rings, which on a pod cut across hosts (a host is a 2x2 block of chips), so a batch
    axis would mix hosts' rows. This keeps the ring order inside each host and orders whole hosts in process order:
    a row-major run of a host's devices covers whole tensor groups whenever the tensor axis fits in one host, and
    then the batch axes ('data', 'fsdp') give each host one contiguous block of rows. A single host is unchanged."""
    subgrids = grid if slice_axis else grid[None]
    out = []
    for sub in subgrids:
        flat = list(sub.flat)
        position = {id(d): i for i, d in enumerate(flat)}
        flat.sort(key=lambda d: (host_of(d), position[id(d)]))
        out.append(np.asarray(flat, dtype=object).reshape(sub.shape))
    stacked = np.stack(out)
    return stacked if slice_axis else stacked[0]


def single_device_mesh() -> Mesh:
    return make_mesh(MeshConfig(shape=(1, 1, 1)), devices=jax.devices()[:1])
