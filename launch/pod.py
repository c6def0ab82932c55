#!/usr/bin/env python3
"""Cloud TPU pods for skyjax: create a slice (or several), install skyjax on every worker, run one skyjax command on
all of them, read logs, watch HBM and duty cycle with tpu-info, stop, and tear down.

    python launch/pod.py create my-pod --zone us-west4-a --topology v5e:4x4            # 4 hosts x 4 chips
    python launch/pod.py setup  my-pod --zone us-west4-a                               # skyjax[tpu] on every worker
    python launch/pod.py run    my-pod --zone us-west4-a --copy run.yaml -- train run.yaml trainer.steps=1000
    python launch/pod.py logs   my-pod --zone us-west4-a
    python launch/pod.py monitor my-pod --zone us-west4-a                              # tpu-info on every worker
    python launch/pod.py delete my-pod --zone us-west4-a

Multi-slice: `--num-slices N` on every command. `create` then asks for a queued resource with N nodes named
NAME-0 .. NAME-(N-1) (Cloud TPU Multislice needs queued resources); the other commands act on all N nodes, and
`delete` removes the queued resource with its nodes. `--queued` uses a queued resource for one slice too.

Every external command goes through one Runner: `--dry-run` prints the exact command lines instead of running them
(copy-pasteable; nothing is contacted). Standard library only: it runs on a laptop with just gcloud installed.
TPU7x (Ironwood) is GKE-only: see launch/README.md for the xpk equivalent.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUN_DIR = "~/skyjax-run"  # on every worker: copied files, run.log, run.pid
VENV = "~/skyjax-venv"  # Python >= 3.11 (the TPU images ship 3.10), created with uv
SKYJAX = f"{VENV}/bin/skyjax"

# generation -> (accelerator-type prefix, count per chip in that name, runtime version) from the Cloud TPU docs
# ("TPU software versions": v6e v2-alpha-tpuv6e, v5p v2-alpha-tpuv5, v5e v2-alpha-tpuv5-lite, v4 tpu-ubuntu2204-base).
# v4 and v5p accelerator types count TensorCores (2 per chip: v5p-16 is 8 chips); v5e and v6e count chips.
ACCELERATORS = {
    "v4": ("v4", 2, "tpu-ubuntu2204-base"),
    "v5e": ("v5litepod", 1, "v2-alpha-tpuv5-lite"),
    "v5p": ("v5p", 2, "v2-alpha-tpuv5"),
    "v6e": ("v6e", 1, "v2-alpha-tpuv6e"),
}
_GEN_ALIASES = {"v5": "v5p", "v5litepod": "v5e", "v5lite": "v5e"}
_PREFIX_TO_GEN = {prefix: gen for gen, (prefix, _, _) in ACCELERATORS.items()}


class PodError(ValueError):
    """A request that cannot become a valid gcloud command (bad topology, missing zone, ...)."""


class Runner:
    """Runs argv lists, or prints them (`dry_run`): the one place where pod.py touches the outside world."""

    def __init__(self, dry_run: bool = False, out=None):
        self.dry_run = dry_run
        self.out = out if out is not None else sys.stdout

    def run(self, argv: list[str]) -> int:
        return self.run_all([argv])

    def run_all(self, argvs: list[list[str]]) -> int:
        """Run the commands concurrently (one per slice: the hosts of a multi-slice job must start together)."""
        for argv in argvs:
            print(shlex.join(argv) if self.dry_run else f"+ {shlex.join(argv)}", file=self.out, flush=True)
        if self.dry_run:
            return 0
        procs = [subprocess.Popen(argv) for argv in argvs]
        codes = [p.wait() for p in procs]
        bad = [(shlex.join(a), c) for a, c in zip(argvs, codes) if c]
        if bad:
            raise SystemExit(f"pod.py: command failed with exit code {bad[0][1]}: {bad[0][0]}")
        return 0


# --- names ------------------------------------------------------------------------------------------------------------


def accelerator_type(topology: str) -> tuple[str, str]:
    """`v5e:4x4` -> ('v5litepod-16', 'v2-alpha-tpuv5-lite'): the Cloud accelerator type and runtime version."""
    m = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)*)", topology.strip().lower())
    if not m:
        raise PodError(f"--topology {topology!r} is not of the form GENERATION:AxB[xC] such as v5e:4x4 or v5p:2x2x2")
    gen = _GEN_ALIASES.get(m.group(1), m.group(1))
    if gen in ("tpu7x", "ironwood", "v7x"):
        raise PodError("TPU7x (Ironwood) is available through GKE only: use xpk (see launch/README.md)")
    if gen not in ACCELERATORS:
        raise PodError(f"unknown TPU generation {m.group(1)!r} (known: {', '.join(ACCELERATORS)})")
    prefix, per_chip, runtime = ACCELERATORS[gen]
    chips = 1
    for d in m.group(2).split("x"):
        chips *= int(d)
    return f"{prefix}-{chips * per_chip}", runtime


def runtime_for(accel_type: str) -> str:
    prefix = accel_type.rsplit("-", 1)[0]
    if prefix not in _PREFIX_TO_GEN:
        raise PodError(f"no default runtime version for accelerator type {accel_type!r}; pass --runtime-version")
    return ACCELERATORS[_PREFIX_TO_GEN[prefix]][2]


def node_names(name: str, num_slices: int) -> list[str]:
    """The TPU VMs of a pod: NAME itself, or NAME-0 .. NAME-(N-1) for a queued resource's --node-prefix=NAME."""
    return [name] if num_slices == 1 else [f"{name}-{i}" for i in range(num_slices)]


# --- gcloud commands --------------------------------------------------------------------------------------------------


def _loc(args) -> list[str]:
    flags = [f"--zone={args.zone}"]
    if args.project:
        flags.append(f"--project={args.project}")
    return flags


def _ssh_flags(args) -> list[str]:
    flags = []
    if args.iap:
        flags.append("--tunnel-through-iap")
    if args.internal_ip:
        flags.append("--internal-ip")
    return flags


def ssh(args, node: str, command: str, worker: str = "all") -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", node, *_loc(args), f"--worker={worker}", *_ssh_flags(args),
            "--command", command]


def scp(args, node: str, local: str, remote: str, recurse: bool = False) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "scp", *(["--recurse"] if recurse else []), local,
            f"{node}:{remote}", *_loc(args), "--worker=all", *_ssh_flags(args)]


def on_every_node(runner: Runner, args, command: str, worker: str = "all") -> int:
    return runner.run_all([ssh(args, node, command, worker) for node in node_names(args.name, args.num_slices)])


def _queued(args) -> bool:
    return args.num_slices > 1 or getattr(args, "queued", False)


def cmd_create(runner: Runner, args) -> int:
    if bool(args.topology) == bool(args.accelerator_type):
        raise PodError("create needs exactly one of --topology (e.g. v5e:4x4) or --accelerator-type "
                       "(e.g. v5litepod-16)")
    if args.topology:
        accel, runtime = accelerator_type(args.topology)
    else:
        accel, runtime = args.accelerator_type, None
    runtime = args.runtime_version or runtime or runtime_for(accel)
    pricing = (["--spot"] if args.spot else []) + (["--reserved"] if args.reserved else [])
    if _queued(args):
        nodes = ([f"--node-count={args.num_slices}", f"--node-prefix={args.name}"] if args.num_slices > 1
                 else [f"--node-id={args.name}"])
        return runner.run(["gcloud", "compute", "tpus", "queued-resources", "create", args.name, *_loc(args),
                           f"--accelerator-type={accel}", f"--runtime-version={runtime}", *nodes, *pricing])
    return runner.run(["gcloud", "compute", "tpus", "tpu-vm", "create", args.name, *_loc(args),
                       f"--accelerator-type={accel}", f"--version={runtime}", *pricing])


def cmd_status(runner: Runner, args) -> int:
    kind = "queued-resources" if _queued(args) else "tpu-vm"
    return runner.run(["gcloud", "compute", "tpus", kind, "describe", args.name, *_loc(args)])


def setup_script(source: str, python: str) -> str:
    """The install script run on every worker: uv, a Python >= 3.11 venv, skyjax[tpu] (jax[tpu] + tpu-info)."""
    if "://" in source:  # a pip URL such as git+https://github.com/ORG/skyjax@main
        target = shlex.quote(f"skyjax[tpu] @ {source}")
        unpack = ""
    else:  # the tarball that setup copied over
        target = '"$HOME/skyjax[tpu]"'
        unpack = "rm -rf ~/skyjax && tar -xzf ~/skyjax-src.tar.gz -C ~ && "
    uv = "~/.local/bin/uv"
    return (f"set -e; {unpack}python3 -m pip install --user --quiet --upgrade uv && "
            f"{uv} venv --allow-existing --python {shlex.quote(python)} {VENV} && "
            f"{uv} pip install --python {VENV}/bin/python --quiet {target} && "
            f"mkdir -p {RUN_DIR} && {SKYJAX} --help > /dev/null && {VENV}/bin/tpu-info")


def cmd_setup(runner: Runner, args) -> int:
    source = args.source or str(REPO)
    if "://" not in source:
        # Ship the committed tree (git archive: no build outputs, no venv); uncommitted edits are not included.
        tarball = str(Path(tempfile.gettempdir()) / f"skyjax-src-{args.name}.tar.gz")
        runner.run(["git", "-C", source, "archive", "--format=tar.gz", "--prefix=skyjax/", "-o", tarball, "HEAD"])
        runner.run_all([scp(args, node, tarball, "skyjax-src.tar.gz")
                        for node in node_names(args.name, args.num_slices)])
    return on_every_node(runner, args, setup_script(source, args.python))


def _env_exports(pairs: list[str]) -> str:
    out = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise PodError(f"--env {pair!r} is not of the form NAME=VALUE")
        out.append(f"export {key}={shlex.quote(value)}; ")
    return "".join(out)


def run_script(skyjax_args: list[str], env: list[str], foreground: bool) -> str:
    """The command each worker runs: the same skyjax command on every host (JAX finds its peers by itself)."""
    command = f"{SKYJAX} {shlex.join(skyjax_args)}"  # SKYJAX unquoted: the remote shell expands its ~
    head = f"mkdir -p {RUN_DIR}; cd {RUN_DIR} || exit 1; {_env_exports(env)}"
    if foreground:
        return f"{head}{command} 2>&1 | tee {RUN_DIR}/run.log"
    # Detached, so the job outlives the ssh session; run.pid lets `stop` send SIGTERM (the trainer saves and exits).
    return f"{head}nohup {command} > {RUN_DIR}/run.log 2>&1 < /dev/null & echo $! > {RUN_DIR}/run.pid"


def cmd_run(runner: Runner, args) -> int:
    skyjax_args = list(args.skyjax_args)
    if not skyjax_args:
        raise PodError("run needs the skyjax command after `--`, e.g. -- train run.yaml trainer.steps=100")
    nodes = node_names(args.name, args.num_slices)
    local = [c for c in args.copy if not c.startswith("gs://")]
    remote = [c for c in args.copy if c.startswith("gs://")]
    for path in local:
        if not runner.dry_run and not Path(path).exists():
            raise PodError(f"--copy {path}: no such file or directory")
    if args.copy:
        on_every_node(runner, args, f"mkdir -p {RUN_DIR}")
    for path in local:  # every worker gets its own copy: the job reads it from RUN_DIR on each host
        # scp's remote path is relative to the home directory: skyjax-run/ is RUN_DIR
        runner.run_all([scp(args, node, path, "skyjax-run/", recurse=Path(path).is_dir()) for node in nodes])
    if remote:
        fetch = "; ".join(f"gcloud storage cp --recursive {shlex.quote(p)} {RUN_DIR}/" for p in remote)
        on_every_node(runner, args, f"set -e; {fetch}")
    return on_every_node(runner, args, run_script(skyjax_args, args.env, args.foreground))


def cmd_logs(runner: Runner, args) -> int:
    follow = " -F" if args.follow else ""
    return on_every_node(runner, args, f"tail -n {args.lines}{follow} {RUN_DIR}/run.log", worker=args.worker)


def cmd_monitor(runner: Runner, args) -> int:
    # tpu-info reads the chips' runtime metrics: HBM used / total and TensorCore duty cycle per chip.
    return on_every_node(runner, args, f"{VENV}/bin/tpu-info")


def cmd_stop(runner: Runner, args) -> int:
    return on_every_node(runner, args, f"test -f {RUN_DIR}/run.pid && kill -TERM $(cat {RUN_DIR}/run.pid) || true")


def cmd_delete(runner: Runner, args) -> int:
    if _queued(args):  # --force also deletes the queued resource's TPU VMs
        return runner.run(["gcloud", "compute", "tpus", "queued-resources", "delete", args.name, *_loc(args),
                           "--force", "--quiet"])
    return runner.run(["gcloud", "compute", "tpus", "tpu-vm", "delete", args.name, *_loc(args), "--quiet"])


# --- command line -----------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pod.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="see launch/README.md for the whole workflow and the xpk (GKE) variant")
    parser.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, func, help_text):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("name", help="TPU VM name (or queued-resource id / node prefix with --num-slices)")
        p.add_argument("--zone", default=os.environ.get("SKYJAX_ZONE"), help="zone (default $SKYJAX_ZONE)")
        p.add_argument("--project", default=os.environ.get("SKYJAX_PROJECT"),
                       help="project (default $SKYJAX_PROJECT, else gcloud's configured project)")
        p.add_argument("--num-slices", type=int, default=1, help="slices (multi-slice via queued resources)")
        p.add_argument("--iap", action="store_true", help="ssh/scp through IAP (no external IPs)")
        p.add_argument("--internal-ip", action="store_true", help="ssh/scp to internal IPs")
        p.add_argument("--dry-run", action="store_true", default=argparse.SUPPRESS,
                       help="print the commands instead of running them")
        p.set_defaults(func=func)
        return p

    p = add("create", cmd_create, "create a TPU slice (or a queued resource with --num-slices N)")
    p.add_argument("--topology", help="chips per slice, as in `skyjax aot`: v5e:4x4, v5p:2x2x2, v6e:4x4, v4:2x2x2")
    p.add_argument("--accelerator-type", help="or the Cloud name directly: v5litepod-16, v5p-16, v6e-16")
    p.add_argument("--runtime-version", help="TPU software version (default: the one for the generation)")
    p.add_argument("--queued", action="store_true", help="use a queued resource even for one slice")
    p.add_argument("--spot", action="store_true", help="Spot capacity (preemptible: the trainer saves on SIGTERM)")
    p.add_argument("--reserved", action="store_true", help="use the project's reservation")
    p = add("status", cmd_status, "describe the TPU VM or queued resource (state: WAITING_FOR_RESOURCES, ACTIVE...)")
    p.add_argument("--queued", action="store_true", help="it was created as a queued resource")
    p = add("setup", cmd_setup, "install skyjax[tpu] (jax[tpu], tpu-info) in a Python 3.11 venv on every worker")
    p.add_argument("--source", default=None, help="skyjax git checkout to ship (default: this repository) or a pip "
                                                  "URL such as git+https://github.com/ORG/skyjax@main")
    p.add_argument("--python", default="3.11", help="Python version for the venv (uv fetches it)")
    p = add("run", cmd_run, "run one skyjax command on every worker of every slice (detached; see logs)")
    p.add_argument("--copy", action="append", default=[], help="file/folder (or gs:// path) to place in "
                                                                f"{RUN_DIR} on every worker first (repeatable)")
    p.add_argument("--env", action="append", default=[], help="NAME=VALUE exported for the run (repeatable)")
    p.add_argument("--foreground", action="store_true", help="stream the output instead of detaching")
    p.epilog = "the skyjax command follows `--`, e.g.: run my-pod --zone Z --copy x.yaml -- train x.yaml"
    p = add("logs", cmd_logs, f"show the end of {RUN_DIR}/run.log")
    p.add_argument("--lines", type=int, default=100)
    p.add_argument("--worker", default="0", help="worker index or 'all' (default 0: the lead host logs)")
    p.add_argument("--follow", action="store_true", help="keep following (tail -F)")
    add("monitor", cmd_monitor, "run tpu-info on every worker: HBM use and duty cycle per chip")
    add("stop", cmd_stop, "send SIGTERM to the run on every worker (the trainer checkpoints and exits)")
    p = add("delete", cmd_delete, "delete the TPU VM (or the queued resource and its nodes)")
    p.add_argument("--queued", action="store_true", help="it was created as a queued resource")
    return parser


def main(argv: list[str] | None = None, out=None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after the first `--` is the skyjax command of `run` (split here: argparse's REMAINDER would also
    # swallow the options written between the pod name and `--`).
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.skyjax_args = argv[split + 1:]
    if args.skyjax_args and args.command != "run":
        parser.error(f"only `run` takes a command after `--` (got {shlex.join(args.skyjax_args)!r})")
    if not args.zone:
        parser.error("--zone is required (or set SKYJAX_ZONE)")
    if args.num_slices < 1:
        parser.error("--num-slices must be >= 1")
    runner = Runner(dry_run=args.dry_run, out=out)
    try:
        return args.func(runner, args)
    except PodError as e:
        print(f"pod.py {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
