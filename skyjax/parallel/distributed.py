"""Multi-host start-up: one process per host, all joined by `jax.distributed.initialize` before any JAX work.

    spec = initialize_from_environment()     # first thing in a command that may run on a pod; no-op on one host
    rows = host_shard(global_batch)          # the rows of each global batch that this host reads
    lead_only_print(f"step {i} loss {loss}") # once per pod, not once per host

Where the process learns about its peers, in order:
1. `SKYJAX_COORDINATOR` (host:port of process 0), `SKYJAX_NUM_PROCESSES`, `SKYJAX_PROCESS_ID`: any cluster.
2. TPU worker variables, as GKE (and xpk) set them: `TPU_WORKER_HOSTNAMES` (or `TPU_PROCESS_ADDRESSES`, comma
   separated, in process order) and `TPU_WORKER_ID`; for multi-slice also `MEGASCALE_NUM_SLICES`, `MEGASCALE_SLICE_ID`
   and `MEGASCALE_COORDINATOR_ADDRESS`. Process ids run slice-major (slice_id * hosts_per_slice + worker_id) and the
   coordinator is process 0, as in JAX's own TPU cluster detection (jax/_src/clusters/cloud_tpu_cluster.py).
3. A TPU VM created with gcloud keeps these in its metadata server, not the environment: when TPU chips are
   attached and nothing above is set, `jax.distributed.initialize()` is called without arguments and JAX reads the
   metadata itself (a single-host VM then gets one process, which is harmless).
Otherwise the process is alone and nothing is initialised. `SKYJAX_DISTRIBUTED=0` turns all of this off.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Callable, Mapping

# JAX's choice for TPU pods (cloud_tpu_cluster.coordinator_port): every host derives the same address without talking.
DEFAULT_COORDINATOR_PORT = 8482


class DistributedConfigError(ValueError):
    """The environment describes a cluster inconsistently (a missing or malformed variable, an id out of range)."""


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """This process's place in the job, as read from the environment."""

    source: str  # 'single', 'skyjax' (SKYJAX_* variables), 'tpu-env' (TPU_*/MEGASCALE_*), 'tpu-metadata'
    num_processes: int = 1
    process_id: int = 0
    coordinator_address: str | None = None
    num_slices: int = 1
    slice_id: int = 0
    workers: tuple[str, ...] = ()  # hostnames of one slice's workers, in worker-id order (tpu-env only)

    @property
    def multi_host(self) -> bool:
        return self.source == "tpu-metadata" or self.num_processes > 1

    @property
    def is_lead(self) -> bool:
        return self.process_id == 0


def _int(env: Mapping[str, str], key: str, default: int | None = None) -> int:
    raw = env.get(key)
    if raw is None or raw.strip() == "":
        if default is None:
            raise DistributedConfigError(f"environment variable {key} is not set")
        return default
    try:
        return int(raw)
    except ValueError:
        raise DistributedConfigError(f"environment variable {key}={raw!r} is not an integer") from None


def _tpu_chips_attached() -> bool:
    import glob

    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def detect_cluster(env: Mapping[str, str] | None = None, tpu_chips: bool | None = None) -> ClusterSpec:
    """Read the job layout from `env` (default os.environ); raises DistributedConfigError on an inconsistent one."""
    env = os.environ if env is None else env
    if env.get("SKYJAX_DISTRIBUTED", "").strip().lower() in ("0", "false", "no", "off"):
        return ClusterSpec("single")

    if env.get("SKYJAX_COORDINATOR"):
        n = _int(env, "SKYJAX_NUM_PROCESSES")
        pid = _int(env, "SKYJAX_PROCESS_ID")
        if n < 1 or not 0 <= pid < n:
            raise DistributedConfigError(f"SKYJAX_PROCESS_ID={pid} is not in [0, SKYJAX_NUM_PROCESSES={n})")
        address = env["SKYJAX_COORDINATOR"]
        if address.count(":") != 1 or not address.rsplit(":", 1)[1].isdigit():
            raise DistributedConfigError(f"SKYJAX_COORDINATOR={address!r} must be host:port of process 0")
        return ClusterSpec("skyjax", n, pid, address)

    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES")
    if hosts:
        workers = tuple(h.strip() for h in hosts.split(",") if h.strip())
        worker_id = _int(env, "TPU_WORKER_ID", 0 if len(workers) == 1 else None)
        num_slices = _int(env, "MEGASCALE_NUM_SLICES", 1)
        slice_id = _int(env, "MEGASCALE_SLICE_ID", 0)
        if not 0 <= worker_id < len(workers):
            raise DistributedConfigError(f"TPU_WORKER_ID={worker_id} is not in [0, {len(workers)}) for "
                                         f"TPU_WORKER_HOSTNAMES={hosts!r}")
        if num_slices < 1 or not 0 <= slice_id < num_slices:
            raise DistributedConfigError(f"MEGASCALE_SLICE_ID={slice_id} is not in [0, MEGASCALE_NUM_SLICES="
                                         f"{num_slices})")
        n = len(workers) * num_slices
        if n == 1:
            return ClusterSpec("single")
        # Process 0 (worker 0 of slice 0) coordinates. Multi-slice names it in MEGASCALE_COORDINATOR_ADDRESS, since a
        # host of slice 1 cannot know slice 0's worker names; within one slice it is the first worker.
        coordinator = env.get("MEGASCALE_COORDINATOR_ADDRESS") or workers[0]
        if num_slices > 1 and not env.get("MEGASCALE_COORDINATOR_ADDRESS"):
            raise DistributedConfigError("MEGASCALE_NUM_SLICES > 1 but MEGASCALE_COORDINATOR_ADDRESS is not set")
        port = _int(env, "SKYJAX_COORDINATOR_PORT", DEFAULT_COORDINATOR_PORT)
        # An address given as host:port is for the megascale runtime; JAX's coordinator gets its own port.
        host = coordinator.strip().split(":")[0]
        return ClusterSpec("tpu-env", n, slice_id * len(workers) + worker_id, f"{host}:{port}", num_slices,
                           slice_id, workers)

    if tpu_chips if tpu_chips is not None else _tpu_chips_attached():
        return ClusterSpec("tpu-metadata")
    return ClusterSpec("single")


def initialize_from_environment(
    env: Mapping[str, str] | None = None,
    *,
    initialize: Callable[..., None] | None = None,
    tpu_chips: bool | None = None,
) -> ClusterSpec:
    """Join the job's other processes if the environment says there are any; a no-op on a single host.

    Call it before anything touches a JAX backend (jax.devices(), the first jit). Calling it again after a
    successful initialisation is a no-op. `initialize` defaults to `jax.distributed.initialize` (tests pass a fake).
    """
    spec = detect_cluster(env, tpu_chips)
    if not spec.multi_host:
        return spec
    import jax

    real = initialize is None
    if real:
        if jax.distributed.is_initialized():
            return spec
        initialize = jax.distributed.initialize
    if spec.source == "tpu-metadata":
        initialize()  # JAX reads worker endpoints, worker number and MEGASCALE_* from the TPU metadata server
        if real:  # only now is this process's place known
            spec = dataclasses.replace(spec, num_processes=jax.process_count(), process_id=jax.process_index())
    else:
        initialize(coordinator_address=spec.coordinator_address, num_processes=spec.num_processes,
                   process_id=spec.process_id)
    logging.getLogger(__name__).info(
        "joined %s: process %d of %d, coordinator %s", spec.source, spec.process_id, spec.num_processes,
        spec.coordinator_address or "from TPU metadata")
    return spec


# --- per-host helpers ---------------------------------------------------------------------------------------------


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    import jax

    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"process index {index} is not in [0, {count})")
    return index, count


def is_lead_host(process_index: int | None = None) -> bool:
    """True on process 0: the host that prints, writes summaries and saves non-sharded files."""
    import jax

    return (jax.process_index() if process_index is None else process_index) == 0


def host_shard(num_rows: int, process_index: int | None = None, process_count: int | None = None, *,
               even: bool = False) -> slice:
    """The contiguous rows [start, stop) of `num_rows` that this host reads; the hosts' slices partition them.

    Rows are split as evenly as possible (the first `num_rows % hosts` hosts get one more). With `even=True` (a
    global batch, whose rows must be spread equally across hosts) a `num_rows` that does not divide is an error.
    Contiguous blocks in process order match how a batch sharded over ('slice', 'data', 'fsdp') is laid out when
    devices are ordered by process, so `jax.make_array_from_process_local_data` can assemble the global array.
    """
    index, count = _process(process_index, process_count)
    if num_rows < 0:
        raise ValueError(f"num_rows must be >= 0, got {num_rows}")
    base, extra = divmod(num_rows, count)
    if even and extra:
        raise ValueError(f"{num_rows} rows do not split evenly over {count} hosts; make the global batch a "
                         f"multiple of {count}")
    start = index * base + min(index, extra)
    return slice(start, start + base + (1 if index < extra else 0))


def lead_only_print(*args, process_index: int | None = None, **kwargs) -> None:
    """`print` on the lead host only, so a 64-host pod logs each line once."""
    if is_lead_host(process_index):
        print(*args, **kwargs)


class LeadHostFilter(logging.Filter):
    """Passes every record on the lead host; elsewhere only records at `min_level` (default WARNING) or above,
    prefixed with the host's index, because a warning from host 37 is news but its progress lines are noise."""

    def __init__(self, min_level: int = logging.WARNING, process_index: int | None = None):
        super().__init__()
        self.min_level = min_level
        self._index = process_index

    @property
    def index(self) -> int:
        if self._index is None:
            import jax

            self._index = jax.process_index()
        return self._index

    def filter(self, record: logging.LogRecord) -> bool:
        if self.index == 0:
            return True
        if record.levelno < self.min_level:
            return False
        if not getattr(record, "_skyjax_host_tagged", False):
            record.msg = f"[host {self.index}] {record.msg}"
            record._skyjax_host_tagged = True
        return True


def install_lead_host_logging(logger: logging.Logger | None = None, min_level: int = logging.WARNING) -> None:
    """Add a LeadHostFilter to every handler of `logger` (default: the root logger)."""
    logger = logging.getLogger() if logger is None else logger
    for handler in logger.handlers:
        if not any(isinstance(f, LeadHostFilter) for f in handler.filters):
            handler.addFilter(LeadHostFilter(min_level))
