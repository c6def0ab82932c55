"""Compile a sharded step for a TPU topology on any machine, and tell whether it fits in HBM.

    def build(mesh):                      # the step is traced inside `use_mesh(mesh)`: `constrain` sees the mesh
        step = jax.jit(train_step, out_shardings=..., donate_argnums=(0, 1))
        return step, (abstract_params, abstract_opt_state, abstract_batch)   # ShapeDtypeStructs with shardings
        # or (step, args, description), or (step, args, description, {"hosts": H, "host_batch": "..."})

    report = compile_for_topology(build, topology="v5e:4x4", mesh_shape=(1, -1, 1), num_slices=2)
    print(report.table())                 # raises DoesNotFitError before that if the step needs more than HBM

Nothing is allocated: arguments are `jax.ShapeDtypeStruct`s, devices are libtpu's compile-only devices (see
`topology.py`). Memory figures are XLA's per-device buffer assignment for the compiled executable.

FLOPs: XLA's cost analysis counts the body of a while loop once, so a 64-layer scanned model would look like a 1-layer
one. `program_flops` counts the matmuls (dot_general, convolutions) of the traced step instead, every scan body times
its length (remat recomputation included, as traced): the whole step, all devices together. The per-device `flops` is
the larger of that split evenly over the devices and XLA's per-device figure scaled by the loops' trip counts
(`loop_flops_factor`, the ratio of the two ways of counting the traced matmuls), which also sees work that is
replicated rather than split (a batch that does not divide the batch axes). On a tiny model both equal XLA's count of
the same step with the scan unrolled; at long sequences XLA's own count of the attention matmuls is lower. A
`lax.cond` counts its costlier branch (an upper bound: the Qwen2.5-VL vision scan picks dense full attention in 4 of
its 32 blocks).

Hosts: a topology of several hosts (`TpuTopology.num_hosts`: v5e:4x4 has 4, two v5e:4x8 slices 16) feeds the step
one batch per host. The report states the count (`hosts`); a builder that lays its batch out for them (the trainer's
kinds: `skyjax.train.global_batch`, each host's share at its own largest buckets) says so in a fourth element,
{"hosts": H, "host_batch": "what one host collates"}, and H must be the topology's count.

Runs are described by YAML configs with a `kind`; `register_aot_builder(kind, fn)` connects a kind to a function
`fn(config_path, overrides, mesh) -> (step, abstract_args, description[, host info])`, and `compile_config` runs it. The
`skyjax aot` command (skyjax/parallel/cli.py) is a thin shell over `compile_config`. Builders live beside what they
build and register on import: `BUILDER_MODULES` lists the modules imported when a kind is looked up
(skyjax.parallel.cli: lm_forward_backward; skyjax.train.aot: reward_model, sft).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from skyjax.parallel.rules import DEFAULT_RULES, AxisRules, use_mesh
from skyjax.parallel.topology import GiB, TpuTopology, get_topology, topology_mesh

Builder = Callable[[Any], tuple]  # mesh -> (jitted step, abstract args) or (step, args, description[, host info])
ConfigBuilder = Callable[[Any, Sequence[str], Any], tuple]  # (config_path, overrides, mesh) -> the same


class DoesNotFitError(ValueError):
    """The compiled step needs more memory per device than the chip's HBM. `.report` has the breakdown."""

    def __init__(self, report: "AotReport"):
        self.report = report
        r = report
        if r.xla_error:
            detail = (f"XLA stopped the compile: {r.xla_error} (arguments alone are {_fmt_bytes(r.argument_bytes)} "
                      f"per device)")
        else:
            detail = (f"arguments {_fmt_bytes(r.argument_bytes)}, outputs {_fmt_bytes(r.output_bytes)} of which "
                      f"{_fmt_bytes(r.alias_bytes)} reuse donated arguments, temporaries {_fmt_bytes(r.temp_bytes)}, "
                      f"code {_fmt_bytes(r.generated_code_bytes)}")
        super().__init__(
            f"{r.description or 'the step'} does not fit on {r.topology}: it needs {_fmt_bytes(r.required_bytes)} "
            f"per device ({detail}) but a {r.device_kind} device has {_fmt_bytes(r.hbm_bytes)} of HBM; shard more "
            f"(a larger fsdp axis, more chips), remat, a smaller batch, or bf16 parameters"
        )


@dataclasses.dataclass(eq=False)
class AotReport:
    """What one compiled step costs on one device of the topology (all byte counts are per device)."""

    description: str
    topology: str  # e.g. 'v5e:4x4' or '2 x v5e:4x4'
    num_slices: int
    num_devices: int
    device_kind: str
    mesh: dict[str, int]
    hbm_bytes: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int  # outputs written into donated argument buffers (counted once, in arguments)
    temp_bytes: int
    generated_code_bytes: int
    peak_bytes: int  # XLA's own peak estimate (0 where the backend does not report it)
    flops: float  # per device and step, loops counted as often as they run (see the module docstring)
    program_flops: float  # matmul FLOPs of the whole step, all devices together
    bytes_accessed: float  # per device and step (HBM traffic estimate; XLA's figure: loop bodies counted once)
    peak_flops_per_device: float
    lower_seconds: float
    compile_seconds: float
    input_shardings: Any  # pytree of NamedSharding, one per positional argument leaf, as the executable expects
    output_shardings: Any
    compiled: Any = dataclasses.field(repr=False, default=None)
    xla_error: str = ""  # set when XLA itself refused the compile for lack of HBM (no executable then)
    xla_flops: float = 0.0  # XLA's own per-device figure (each loop body counted once)
    loop_flops_factor: float = 1.0  # the traced matmul FLOPs with loop trip counts / counted as XLA counts loops
    hosts: int = 1  # hosts (data-loading processes) of the topology: TpuTopology.num_hosts
    host_batch: str = ""  # what one host collates, when the builder lays the batch out per host (else "")

    def hosts_line(self) -> str:
        """e.g. 'hosts: 8 (per-host batch: 2 pairs (4 rows), 1024 patches, 2 image slots; the step sees ...)'."""
        if not self.host_batch:
            return f"hosts: {self.hosts}"
        what = "per-host batch" if self.hosts > 1 else "single-host batch"
        return f"hosts: {self.hosts} ({what}: {self.host_batch})"

    @property
    def total_bytes(self) -> int:
        """Arguments + outputs - aliased + temporaries + code: the usual upper estimate of what is resident."""
        return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
                + self.generated_code_bytes)

    @property
    def required_bytes(self) -> int:
        """What the step is taken to need per device: `total_bytes`, or XLA's own peak figure where that is larger
        (it is the number XLA's compile-time HBM check uses; the two are within a few percent on large steps)."""
        return max(self.total_bytes, self.peak_bytes)

    @property
    def fits(self) -> bool:
        return not self.xla_error and self.required_bytes <= self.hbm_bytes

    @property
    def min_step_seconds(self) -> float:
        """A compute-bound lower bound: this device's FLOPs at the chip's peak bf16 rate."""
        return self.flops / self.peak_flops_per_device if self.peak_flops_per_device else 0.0

    def raise_if_not_fits(self) -> "AotReport":
        if not self.fits:
            raise DoesNotFitError(self)
        return self

    def table(self) -> str:
        """A human-readable summary: memory per device against HBM, FLOPs, compile time."""
        hbm = self.hbm_bytes
        pct = lambda b: f"{100 * b / hbm:5.1f}%" if hbm else ""  # noqa: E731
        rows = [
            ("arguments", self.argument_bytes),
            ("outputs", self.output_bytes),
            ("aliased (donated)", -self.alias_bytes),
            ("temporaries", self.temp_bytes),
            ("generated code", self.generated_code_bytes),
        ]
        mesh = ", ".join(f"{k}={v}" for k, v in self.mesh.items())
        lines = [
            f"{self.description}",
            f"topology {self.topology}: {self.num_devices} x {self.device_kind}, mesh ({mesh})",
            self.hosts_line(),
            f"{'memory per device':<22}{'':>12}  of HBM {_fmt_bytes(hbm)}",
        ]
        verdict = "fits" if self.fits else f"DOES NOT FIT (over by {_fmt_bytes(self.required_bytes - hbm)})"
        if self.xla_error:
            lines.append(f"  {'arguments':<20}{_fmt_bytes(self.argument_bytes):>12}  {pct(self.argument_bytes)}")
            lines.append(f"  {'required (XLA)':<20}{_fmt_bytes(self.required_bytes):>12}  "
                         f"{pct(self.required_bytes)}  {verdict}")
            lines.append(f"XLA stopped the compile: {self.xla_error}")
            return "\n".join(lines)
        lines += [f"  {name:<20}{_fmt_bytes(b):>12}  {pct(abs(b))}" for name, b in rows]
        lines.append(f"  {'total':<20}{_fmt_bytes(self.required_bytes):>12}  {pct(self.required_bytes)}  {verdict}")
        if self.peak_bytes:
            lines.append(f"  {'(XLA peak estimate)':<20}{_fmt_bytes(self.peak_bytes):>12}")
        lines.append(
            f"FLOPs per step: {_fmt_num(self.flops)} per device, {_fmt_num(self.program_flops)} in all (matmuls); "
            f">= {_fmt_seconds(self.min_step_seconds)} per step at {self.peak_flops_per_device / 1e12:.0f} TFLOP/s "
            f"per device (bf16 peak)" + (f"; XLA's own count {_fmt_num(self.xla_flops)} sees each loop body once"
                                         if abs(self.loop_flops_factor - 1) > 0.01 else ""))
        lines.append(f"lower {self.lower_seconds:.1f} s, compile {self.compile_seconds:.1f} s")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-friendly summary (no shardings, no executable)."""
        skip = {"compiled", "input_shardings", "output_shardings"}
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        out.update(total_bytes=self.total_bytes, required_bytes=self.required_bytes, fits=self.fits,
                   min_step_seconds=self.min_step_seconds)
        return out


def _fmt_bytes(n: float) -> str:
    sign, n = ("-" if n < 0 else ""), abs(n)
    for unit, size in (("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{sign}{n / size:.2f} {unit}"
    return f"{sign}{int(n)} B"


def _fmt_num(x: float) -> str:
    for unit, size in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= size:
            return f"{x / size:.3g} {unit}"
    return f"{x:.3g}"


def _fmt_seconds(s: float) -> str:
    return f"{s * 1e3:.3g} ms" if s >= 1e-3 else f"{s * 1e6:.3g} us"


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per program
        cost = cost[0] if cost else {}
    return dict(cost or {})


_UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": GiB, "T": 1024**4}


def _xla_oom(error: Exception) -> tuple[int, int] | None:
    """(bytes required, bytes available) from XLA's out-of-HBM compile error, or None for any other error."""
    import re

    text = str(error)
    if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
        return None
    num = r"([\d.]+)\s*([KMGT]?)i?B?"
    for pattern in (rf"required for HLO temporaries \({num}\) exceeds available HBM \({num}\)",
                    rf"Used {num} of {num} hbm"):
        m = re.search(pattern, text)
        if m:
            need, need_u, have, have_u = m.groups()
            return int(float(need) * _UNITS[need_u]), int(float(have) * _UNITS[have_u])
    return (0, 0)


def _argument_bytes(args) -> int:
    """Bytes per device of the (abstract, sharded) arguments: each leaf's shard shape times its item size."""
    import jax
    import numpy as np

    total = 0
    for leaf in jax.tree.leaves(args):
        shape = tuple(leaf.shape)
        sharding = getattr(leaf, "sharding", None)
        if sharding is not None:
            shape = sharding.shard_shape(shape)
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total


def _sub_jaxprs(eqn) -> list:
    from jax.extend import core as jcore

    out = []
    for value in eqn.params.values():
        for x in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(x, jcore.ClosedJaxpr):
                out.append(x.jaxpr)
            elif isinstance(x, jcore.Jaxpr):
                out.append(x)
    return out


def count_flops(fn: Callable, *args, **kwargs) -> float:
    """FLOPs of `fn(*args, **kwargs)` from its jaxpr: 2*M*N*K for every dot_general and the equivalent for every
    convolution, inside every nested jaxpr (jit, remat, custom derivatives), scan bodies times their length, the
    largest branch of a cond, a while loop's body once (its trip count is not static). Element-wise work is not
    counted, so this is the matmul work the step does, the figure to compare with a matmul peak. Only traced, never
    run: arguments may be arrays or jax.ShapeDtypeStructs."""
    import jax

    return matmul_flops(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr, loops=True)


def matmul_flops(jaxpr, loops: bool = True) -> float:
    """FLOPs of the matmuls (dot_general, convolutions) of a jaxpr, 2 per multiply-add. With `loops`, a scan body
    counts `length` times; without, as XLA's cost analysis counts the while loop it becomes (once, or `unroll`
    times when unrolled). A while loop of unknown trip count counts once; a cond counts its largest branch."""
    import math

    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
            continue
        if name == "conv_general_dilated":  # every output element contracts the kernel minus its output features
            rhs = eqn.invars[1].aval.shape
            out_dim = eqn.params["dimension_numbers"].rhs_spec[0]
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs) / rhs[out_dim]
            continue
        subs = [matmul_flops(j, loops) for j in _sub_jaxprs(eqn)]
        if not subs:
            continue
        inner = max(subs) if name == "cond" else sum(subs)
        if name == "scan":
            length = eqn.params["length"]
            unroll = eqn.params.get("unroll", 1)
            unroll = length if unroll is True else max(min(int(unroll), length), 1)
            inner *= length if loops else unroll
        total += inner
    return total


def compile_for_topology(
    build: Builder,
    *,
    topology: "str | TpuTopology",
    mesh_shape: Sequence[int] = (1, -1, 1),
    num_slices: int | None = None,
    axes: Sequence[str] | None = None,
    rules: AxisRules = DEFAULT_RULES,
    hbm_bytes: int | None = None,
    check_fits: bool = True,
) -> AotReport:
    """Lay a mesh over `topology`, let `build(mesh)` make the step, lower and compile it, and report.

    `mesh_shape` is per slice over `axes` (default data, fsdp, tensor; one entry may be -1); `num_slices` > 1
    adds a leading 'slice' axis. `hbm_bytes` overrides the chip's HBM per device. With `check_fits`, a step that
    needs more than that raises DoesNotFitError (its `.report` still has every number). A step so large that XLA
    itself refuses to compile it always raises DoesNotFitError, with XLA's figure as `required_bytes` (XLA checks
    against the usable HBM, e.g. 15.75 GiB of a v5e's 16). Errors from `build` (a ShardingError naming a parameter
    that does not divide the mesh) propagate unchanged. The report's `hosts` is the topology's host count
    (`TpuTopology.num_hosts`); a builder returning host info must have laid its batch out for that many.
    """
    topo = get_topology(topology, num_slices)
    mesh = topology_mesh(topo, mesh_shape, axes)
    # Built outside the mesh context: a builder may run small eager ops (optax's tree_map_params does), which must
    # not be placed on the compile-only TPU devices. Tracing (where `constrain` reads the context) happens below.
    built = build(mesh)
    if not isinstance(built, tuple) or len(built) not in (2, 3, 4):
        raise TypeError("an AOT builder returns (jitted step, abstract args), (step, args, description) or (step, "
                        "args, description, {'hosts': H, 'host_batch': text})")
    step, args = built[0], tuple(built[1])
    description = built[2] if len(built) >= 3 else getattr(step, "__name__", "step")
    host_info = dict(built[3]) if len(built) == 4 else {}
    hosts = topo.num_hosts
    if host_info.get("hosts", hosts) != hosts:
        raise ValueError(f"the builder laid the batch out for {host_info['hosts']} hosts but {topo} has {hosts}")
    with use_mesh(mesh, rules):
        t0 = time.perf_counter()
        traced = step.trace(*args)
        lowered = traced.lower()
        t1 = time.perf_counter()
        try:
            compiled = lowered.compile()
        except Exception as e:  # XLA refuses a step that overflows HBM: report it as DoesNotFit, with its numbers
            oom = _xla_oom(e)
            if oom is None:
                raise
            compiled = None
            xla_error = str(e).strip().splitlines()[0]
        t2 = time.perf_counter()
    program_flops = matmul_flops(traced.jaxpr.jaxpr)
    chip = topo.chip
    common = dict(
        description=description,
        topology=str(topo),
        num_slices=topo.num_slices,
        num_devices=mesh.devices.size,
        device_kind=mesh.devices.flat[0].device_kind,
        mesh=dict(mesh.shape),
        hbm_bytes=int(hbm_bytes) if hbm_bytes is not None else chip.hbm_bytes_per_device,
        peak_flops_per_device=chip.peak_bf16_tflops * 1e12 / chip.devices_per_chip,
        lower_seconds=t1 - t0,
        compile_seconds=t2 - t1,
        hosts=hosts,
        host_batch=str(host_info.get("host_batch", "")),
    )
    if compiled is None:
        report = AotReport(**common, argument_bytes=_argument_bytes(args), output_bytes=0, alias_bytes=0,
                           temp_bytes=0, generated_code_bytes=0, peak_bytes=oom[0],
                           flops=program_flops / mesh.devices.size, program_flops=program_flops, bytes_accessed=0.0,
                           input_shardings=None, output_shardings=None, xla_error=xla_error)
        raise DoesNotFitError(report)
    mem = compiled.memory_analysis()
    cost = _cost(compiled)
    xla_flops = float(cost.get("flops", 0.0))
    as_xla = matmul_flops(traced.jaxpr.jaxpr, loops=False)
    factor = program_flops / as_xla if as_xla else 1.0
    report = AotReport(
        **common,
        argument_bytes=int(mem.argument_size_in_bytes),
        output_bytes=int(mem.output_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes),
        temp_bytes=int(mem.temp_size_in_bytes),
        generated_code_bytes=int(mem.generated_code_size_in_bytes),
        peak_bytes=int(getattr(mem, "peak_memory_in_bytes", 0) or 0),
        flops=max(program_flops / mesh.devices.size, xla_flops * factor),
        program_flops=program_flops,
        xla_flops=xla_flops,
        loop_flops_factor=factor,
        bytes_accessed=float(cost.get("bytes accessed", 0.0)),
        input_shardings=compiled.input_shardings[0],
        output_shardings=compiled.output_shardings,
        compiled=compiled,
    )
    if check_fits:
        report.raise_if_not_fits()
    return report


# --- configs -> builders ----------------------------------------------------------------------------------------------

_BUILDERS: dict[str, ConfigBuilder] = {}
# Modules that register builders on import (imported the first time a kind is looked up). skyjax.parallel imports
# none of them directly: the trainer's kinds need skyjax.train, which depends on skyjax.parallel, not the reverse.
BUILDER_MODULES: list[str] = ["skyjax.parallel.cli", "skyjax.train.aot"]


def _load_builder_modules() -> None:
    import importlib

    for module in BUILDER_MODULES:
        importlib.import_module(module)


def register_aot_builder(kind: str, fn: ConfigBuilder | None = None):
    """Connect a config `kind` to `fn(config_path, overrides, mesh) -> (step, abstract_args, description)`.

    Usable as a decorator (`@register_aot_builder("sft")`). Registering a kind twice replaces the builder.
    """
    if fn is None:
        return lambda f: register_aot_builder(kind, f)
    _BUILDERS[kind] = fn
    return fn


def aot_builder(kind: str) -> ConfigBuilder:
    from skyjax.config import ConfigError

    _load_builder_modules()
    if kind not in _BUILDERS:
        raise ConfigError(f"kind {kind!r} has no AOT builder (known kinds: {', '.join(sorted(_BUILDERS)) or 'none'})")
    return _BUILDERS[kind]


def aot_kinds() -> list[str]:
    _load_builder_modules()
    return sorted(_BUILDERS)


def compile_config(
    config_path: str | Path,
    overrides: Sequence[str] = (),
    *,
    topology: "str | TpuTopology",
    num_slices: int | None = None,
    hbm_bytes: int | None = None,
    check_fits: bool = True,
) -> AotReport:
    """Compile the step of the run described by a YAML config (its `kind` picks the builder, its `mesh` the mesh).

    The builder sees the topology's devices in its mesh, so the trainer's kinds lay the batch out for the topology's
    hosts (`skyjax.parallel.topology.device_hosts`): on several hosts the multi-host global batch, each host's share
    at its own largest buckets (see skyjax.train.aot); the report's `hosts` / `host_batch` say which.

    `num_slices`, when given, becomes the override `mesh.num_slices=N`, so the builder sees the same mesh.
    """
    from skyjax.config import ConfigError, apply_overrides, from_dict, read_yaml
    from skyjax.parallel.mesh import MeshConfig

    overrides = list(overrides) + ([f"mesh.num_slices={num_slices}"] if num_slices is not None else [])
    raw = apply_overrides(read_yaml(config_path), overrides)
    kind = raw.get("kind")
    if not isinstance(kind, str):
        raise ConfigError(f"{config_path}: missing 'kind' (one of: {', '.join(aot_kinds())})")
    builder = aot_builder(kind)
    try:
        mesh_cfg = from_dict(MeshConfig, raw.get("mesh") or {}, prefix="mesh.")
    except ConfigError as e:
        raise ConfigError(f"{config_path}: {e}") from None
    return compile_for_topology(
        lambda mesh: builder(config_path, overrides, mesh),
        topology=topology,
        mesh_shape=mesh_cfg.shape,
        axes=mesh_cfg.axes,
        num_slices=mesh_cfg.num_slices,
        hbm_bytes=hbm_bytes,
        check_fits=check_fits,
    )
