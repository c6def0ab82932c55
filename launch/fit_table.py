"""The fit table (docs/fit.md): how large a micro-batch of the Qwen2.5-VL-7B reward model and of the Skywork R1V-38B SFT
step fits on TPU slices, found with `skyjax aot` compiles on any machine (libtpu's compile-only client, no TPU).

    python launch/fit_table.py                          # every row (each compile takes minutes on a small machine)
    python launch/fit_table.py --only rm_v5e_4x4 --budget-min 20
    python launch/fit_table.py --markdown-only          # rewrite docs/fit.md from the results in docs/fit.json

For each row the micro-batch (pairs or conversations per optimizer step with grad_accum=1, per slice) is doubled from
the smallest size that splits over the mesh's batch axes until it does not fit, then bisected. Every compile is the
command shown in the table (`skyjax aot CONFIG OVERRIDES --topology T`); its report is kept in docs/fit.json, keyed by
the command, so an interrupted run resumes where it stopped and a finished one only rewrites the markdown. A larger
batch per step at the same memory is data.batch_size=k*b with optimizer.grad_accum=k (the step scans the micro-batches).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GiB = 1024**3

# What one row of each run holds (stated in docs/fit.md):
RM_SEQ = 4096  # reward model: 4096-token rows (configs/reward_model/stage1_7b.yaml max_length)
RM_PATCHES_PER_PAIR = 4096  # one image of 1024 LLM tokens per pair (4096 patches of 14 px, ~0.8 MP): a quarter of a row
RM_WORST_PATCHES_PER_PAIR = 16384  # the most a 4096-token row can hold: 4096 image tokens = 16384 patches
SFT_TILES_PER_ROW = 13  # R1V: one image at the checkpoint's max_dynamic_patch 12 + the thumbnail = 3328 tokens


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    title: str
    config: str
    topology: str
    mesh: tuple[int, int, int]
    fixed: tuple[str, ...]  # overrides besides the batch
    per_row: str  # "rm": 2 token rows + patches per pair; "sft": 1 row + tiles per conversation
    patches_per_item: int = RM_PATCHES_PER_PAIR  # rm: patches per pair; sft: tiles per conversation
    num_slices: int = 1
    max_batch: int = 4096
    sizes: tuple[int, ...] = ()  # explicit micro-batch sizes to try instead of the search

    @property
    def hosts(self) -> int:
        """Hosts of the topology: each collates its share of the batch with its own (per-host) vision buckets."""
        from skyjax.parallel.topology import get_topology

        return get_topology(self.topology, self.num_slices).num_hosts

    def batch_step(self) -> int:
        """The smallest micro-batch whose token rows divide the batch axes (slice x data x fsdp) and whose items
        divide over the hosts."""
        ways = self.num_slices * self.mesh[0] * self.mesh[1]
        rows_per_item = 2 if self.per_row == "rm" else 1
        step = ways // math.gcd(ways, rows_per_item)
        return step * self.hosts // math.gcd(step, self.hosts)

    def overrides(self, b: int, legacy: bool = False) -> list[str]:
        """The buckets are per host: host h's share b / H at the row's patches (tiles) per item. legacy: as compiled
        before `skyjax aot` built the multi-host batch (the whole micro-batch's images in one bucket), how
        docs/fit.json keys the results of that time."""
        out = [f"data.batch_size={b}", "optimizer.grad_accum=1", f"mesh.shape=[{','.join(map(str, self.mesh))}]"]
        share = b if legacy else b // self.hosts
        if self.per_row == "rm":
            out += [f"data.patch_buckets=[{self.patches_per_item * share}]", f"data.image_buckets=[{share}]"]
        else:
            out += [f"data.tile_buckets=[{self.patches_per_item * share}]"]
        return out + list(self.fixed)

    def command(self, b: int, legacy: bool = False) -> str:
        slices = f" --num-slices {self.num_slices}" if self.num_slices > 1 else ""
        return f"skyjax aot {self.config} {' '.join(self.overrides(b, legacy))} --topology {self.topology}{slices}"


RM = "configs/reward_model/stage1_7b.yaml"
RM_FIXED = ("model.source=shape:qwen2_5_vl_7b", f"data.seq_buckets=[{RM_SEQ}]", "model.remat=full")
R1V_PROJ = "configs/sft/r1v_38b_projector.yaml"
R1V_FULL = "configs/sft/r1v_38b_full.yaml"
R1V_MPO = "configs/mpo/r1v_38b.yaml"


def mpo_fixed(seq: int, precompute: bool = False) -> tuple[str, ...]:
    return ("model.source=shape:r1v_38b", f"data.seq_buckets=[{seq}]", f"data.max_length={seq}",
            f"objective.mpo.logits_chunk={min(seq, 2048)}", f"reference.precompute={str(precompute).lower()}")


def r1v_fixed(seq: int) -> tuple[str, ...]:
    return ("model.source=shape:r1v_38b", f"data.seq_buckets=[{seq}]", f"data.max_length={seq}",
            f"objective.sft.logits_chunk={min(seq, 2048)}")


ROWS = [
    # Qwen2.5-VL-7B reward model, ViT (and the unused LM head) frozen as in stage1_7b.yaml, 4096-token rows
    Row("rm_v5e_4x4", "RM 7B", RM, "v5e:4x4", (1, 4, 4), RM_FIXED, "rm"),
    Row("rm_v5e_4x8", "RM 7B", RM, "v5e:4x8", (1, 8, 4), RM_FIXED, "rm"),
    Row("rm_v5e_4x8_x2", "RM 7B", RM, "v5e:4x8", (1, 8, 4), RM_FIXED, "rm", num_slices=2),
    Row("rm_v5p_2x2x2", "RM 7B", RM, "v5p:2x2x2", (1, 8, 1), RM_FIXED, "rm"),
    Row("rm_v5p_2x2x4", "RM 7B", RM, "v5p:2x2x4", (1, 16, 1), RM_FIXED, "rm"),
    Row("rm_v5p_2x2x2_worst", "RM 7B, 16384 patches per pair", RM, "v5p:2x2x2", (1, 8, 1), RM_FIXED, "rm",
        patches_per_item=RM_WORST_PATCHES_PER_PAIR),
    # Skywork R1V-38B SFT: projector only (the paper's recipe) and projector + LLM, ViT frozen. One 16384-token row per
    # chip over a pure-FSDP mesh (the shipped configs' mesh), or one row per 4 chips with the heads split 4 ways.
    Row("r1v_proj_v5p_4x4x4_16k", "R1V 38B projector-only", R1V_PROJ, "v5p:4x4x4", (1, 64, 1), r1v_fixed(16384),
        "sft", patches_per_item=SFT_TILES_PER_ROW, sizes=(64,)),
    Row("r1v_proj_v5p_4x4x4_16k_tp", "R1V 38B projector-only", R1V_PROJ, "v5p:4x4x4", (1, 16, 4), r1v_fixed(16384),
        "sft", patches_per_item=SFT_TILES_PER_ROW, sizes=(16,)),
    Row("r1v_full_v5p_4x4x4_16k_tp", "R1V 38B projector+LLM", R1V_FULL, "v5p:4x4x4", (1, 16, 4), r1v_fixed(16384),
        "sft", patches_per_item=SFT_TILES_PER_ROW, sizes=(16,)),
    Row("r1v_full_v5p_4x4x8_16k_tp", "R1V 38B projector+LLM", R1V_FULL, "v5p:4x4x8", (1, 32, 4), r1v_fixed(16384),
        "sft", patches_per_item=SFT_TILES_PER_ROW, sizes=(32,)),
    Row("r1v_full_v5p_4x4x4_8k", "R1V 38B projector+LLM", R1V_FULL, "v5p:4x4x4", (1, 64, 1), r1v_fixed(8192), "sft",
        patches_per_item=SFT_TILES_PER_ROW, sizes=(64,)),
    # Skywork R1V-38B MPO (projector + LLM, ViT frozen): one 8192-token row per pair (prompt with a 13-tile image,
    # chosen, rejected), the reference resident in the state or its log-probs precomputed (no reference in memory)
    Row("r1v_mpo_v5p_4x4x4_8k_tp", "R1V 38B MPO, reference resident", R1V_MPO, "v5p:4x4x4", (1, 16, 4),
        mpo_fixed(8192), "sft", patches_per_item=SFT_TILES_PER_ROW, sizes=(16,)),
    Row("r1v_mpo_pre_v5p_4x4x4_8k_tp", "R1V 38B MPO, reference precomputed", R1V_MPO, "v5p:4x4x4", (1, 16, 4),
        mpo_fixed(8192, precompute=True), "sft", patches_per_item=SFT_TILES_PER_ROW, sizes=(16,)),
]


# --- compiles ---------------------------------------------------------------------------------------------------------


def compile_one(row: Row, b: int, cache: dict, path: Path) -> dict:
    """The report of one compile (from the cache when this exact command ran before)."""
    key = row.command(b)
    if key in cache:
        return cache[key]
    from skyjax.parallel.aot import DoesNotFitError, compile_config

    t0 = time.perf_counter()
    try:
        report = compile_config(ROOT / row.config, row.overrides(b), topology=row.topology,
                                num_slices=row.num_slices if row.num_slices > 1 else None, check_fits=False)
        result = report.to_dict()
    except DoesNotFitError as e:  # XLA itself refused: only the arguments and XLA's figure are known
        result = e.report.to_dict()
    except ValueError as e:  # a mesh / sharding / config error: recorded, the row stops
        result = {"error": str(e)}
    result.update(batch=b, wall_seconds=round(time.perf_counter() - t0, 1),
                  date=datetime.date.today().isoformat(), code=_code_version())
    cache[key] = result
    path.write_text(json.dumps(cache, indent=1) + "\n")
    status = "error" if "error" in result else ("fits" if result["fits"] else "does not fit")
    need = f"{result.get('required_bytes', 0) / GiB:.2f} GiB" if "error" not in result else result["error"][:200]
    print(f"[{row.name}] b={b}: {status} ({need}) in {result['wall_seconds']} s", flush=True)
    return result


def _code_version() -> str:
    """The commit compiled (with '+dirty' when the working tree had changes)."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def search(row: Row, cache: dict, path: Path, deadline: float) -> None:
    """Doubling from the smallest batch that splits over the batch axes, then bisection (in those units)."""
    fits = lambda r: "error" not in r and r["fits"]  # noqa: E731
    if row.sizes:
        for b in row.sizes:
            if time.time() > deadline:
                return
            compile_one(row, b, cache, path)
        return
    step = row.batch_step()
    good, bad = 0, None
    b = step
    while b <= row.max_batch:
        if time.time() > deadline:
            return
        r = compile_one(row, b, cache, path)
        if "error" in r:
            return
        if not fits(r):
            bad = b
            break
        good, b = b, 2 * b
    while bad is not None and good and bad - good > step:
        if time.time() > deadline:
            return
        mid = good + (bad - good) // (2 * step) * step
        if fits(compile_one(row, mid, cache, path)):
            good = mid
        else:
            bad = mid


# --- the markdown -----------------------------------------------------------------------------------------------------


def _gib(n: float) -> str:
    return f"{n / GiB:.2f}"


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in ("jax", "jaxlib", "libtpu", "flax", "optax"):
        try:
            out.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            pass
    return ", ".join(out)


def row_results(row: Row, cache: dict, legacy: bool = False) -> list[tuple[int, dict]]:
    prefix = f"skyjax aot {row.config} "
    out = [(r["batch"], r) for key, r in cache.items()
           if key.startswith(prefix) and (legacy or r["batch"] % row.hosts == 0)
           and key == row.command(r["batch"], legacy)]
    return sorted(out, key=lambda x: x[0])


def markdown(cache: dict) -> str:
    lines = ["| run | topology (chips) | mesh (data, fsdp, tensor) | seq | vision per micro-batch | "
             "largest micro-batch that fits | memory per chip: total / HBM | FLOPs per chip per step | "
             ">= step time at peak | next size needs |", "|" + "---|" * 10]
    details = []
    for row in ROWS:
        results, legacy = row_results(row, cache), False
        if not results and row.hosts > 1:  # not recompiled since AOT builds the multi-host batch
            results, legacy = row_results(row, cache, legacy=True), True
        if not results:
            continue
        seq = next(o.split("=")[1].strip("[]") for o in row.fixed if o.startswith("data.seq_buckets="))
        chips = math.prod(int(x) for x in row.topology.split(":")[1].split("x")) * row.num_slices
        topo = f"{row.num_slices} x {row.topology}" if row.num_slices > 1 else row.topology
        ok = [(b, r) for b, r in results if "error" not in r and r["fits"]]
        no = [(b, r) for b, r in results if "error" not in r and not r["fits"]]
        errors = [(b, r) for b, r in results if "error" in r]
        unit = "pairs" if row.per_row == "rm" else "rows"
        vision_unit = "patches" if row.per_row == "rm" else "tiles"
        if ok:
            b, r = ok[-1]
            first_bad = next(((bb, rr) for bb, rr in no if bb > b), None)
            best = f"**{b} {unit}**"
            step = row.batch_step()
            if row.sizes:
                best += " (the size compiled)"
            elif first_bad and first_bad[0] - b > step:  # the bisection did not run to the end
                lo, hi = b + step, first_bad[0] - step
                best += f" ({lo}{'' if lo == hi else f'-{hi}'} not tried)"
            mem = f"{_gib(r['required_bytes'])} / {_gib(r['hbm_bytes'])} GiB"
            flops = f"{r['flops'] / 1e12:.1f} T"
            step_time = f"{r['min_step_seconds']:.2f} s"
        else:
            b, r = (no[0] if no else errors[0])
            first_bad = None
            best = "nothing" + (f" (at {b} {unit}: error)" if "error" in r else "")
            mem = flops = step_time = "-"
        if ok and first_bad:
            nxt = f"{first_bad[0]}: {_gib(first_bad[1]['required_bytes'])} GiB"
        elif not ok and no:
            nxt = f"{no[0][0]}: {_gib(no[0][1]['required_bytes'])} GiB"
        else:
            nxt = "-"
        vision = f"{row.patches_per_item * b} {vision_unit} ({row.patches_per_item} per {unit[:-1]}"
        vision += ("; one bucket: single-host layout)" if legacy else
                   f"; {row.hosts} hosts x {row.patches_per_item * b // row.hosts})" if row.hosts > 1 else ")")
        lines.append(f"| {row.title} | {topo} ({chips}) | {', '.join(map(str, row.mesh))}"
                     f"{' per slice' if row.num_slices > 1 else ''} | {seq} | {vision} | {best} | {mem} | {flops} | "
                     f"{step_time} | {nxt} |")
        details.append(f"#### {row.title}, {topo}, seq {seq} (`{row.name}`)\n")
        for bb, rr in results:
            details.append(f"- batch {bb}: `{row.command(bb, legacy)}`")
            if "error" in rr:
                details.append(f"  - error: {rr['error']}")
                continue
            verdict = "fits" if rr["fits"] else "**does not fit**"
            if rr.get("xla_error"):
                details.append(f"  - {verdict}: XLA refused the compile, needing {_gib(rr['required_bytes'])} GiB "
                               f"(arguments {_gib(rr['argument_bytes'])} GiB); compile {rr['wall_seconds']} s"
                               + (f"; code {rr['code']}" if rr.get("code") else ""))
                continue
            details.append(
                f"  - {verdict}: arguments {_gib(rr['argument_bytes'])} GiB, outputs {_gib(rr['output_bytes'])} GiB "
                f"(of which {_gib(rr['alias_bytes'])} GiB reuse donated arguments), temporaries "
                f"{_gib(rr['temp_bytes'])} GiB, code {_gib(rr['generated_code_bytes'])} GiB; total "
                f"{_gib(rr['required_bytes'])} of {_gib(rr['hbm_bytes'])} GiB HBM (XLA's peak estimate "
                f"{_gib(rr['peak_bytes'])} GiB); {rr['flops'] / 1e12:.2f} TFLOPs per chip per step "
                f"({rr.get('program_flops', 0) / 1e15:.2f} PFLOPs of matmuls in all; >= {rr['min_step_seconds']:.3f} "
                f"s at peak); compile {rr['wall_seconds']} s" + (f"; code {rr['code']}" if rr.get("code") else ""))
        details.append("")
    return "\n".join(lines) + "\n\n" + "\n".join(details)


def write_markdown(cache: dict, template: Path, out: Path) -> None:
    """Fill the generated block of docs/fit.md (between the markers), keeping the hand-written text around it."""
    begin, end = "<!-- fit_table.py: begin -->", "<!-- fit_table.py: end -->"
    dates = sorted({r.get("date", "") for r in cache.values()})
    generated = (f"{begin}\nGenerated by `python launch/fit_table.py` on {dates[-1] if dates else '?'} with "
                 f"{_versions()}.\n\n{markdown(cache)}{end}")
    text = template.read_text() if template.exists() else f"# Fit table\n\n{begin}\n{end}\n"
    head, _, rest = text.partition(begin)
    _, _, tail = rest.partition(end)
    out.write_text(head + generated + tail)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", default=None, help="row names (default: every row)")
    p.add_argument("--json", type=Path, default=ROOT / "docs" / "fit.json", help="the results, by command")
    p.add_argument("--markdown", type=Path, default=ROOT / "docs" / "fit.md", help="the doc to fill (docs/fit.md)")
    p.add_argument("--budget-min", type=float, default=600.0, help="stop starting compiles after this many minutes")
    p.add_argument("--markdown-only", action="store_true", help="only rewrite the markdown from the JSON")
    p.add_argument("--list", action="store_true", help="list the rows and their first command")
    args = p.parse_args(argv)
    if args.list:
        for row in ROWS:
            print(f"{row.name:28s} {row.command(row.sizes[0] if row.sizes else row.batch_step())}")
        return 0
    cache = json.loads(args.json.read_text()) if args.json.exists() else {}
    if not args.markdown_only:
        import jax

        jax.config.update("jax_platforms", "cpu")  # compile-only TPU devices; never initialise a real backend
        deadline = time.time() + 60 * args.budget_min
        unknown = set(args.only or ()) - {r.name for r in ROWS}
        if unknown:
            p.error(f"unknown rows {sorted(unknown)} (see --list)")
        by_name = {r.name: r for r in ROWS}
        for name in args.only if args.only is not None else by_name:  # in the order given
            search(by_name[name], cache, args.json, deadline)
    write_markdown(cache, args.markdown, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
