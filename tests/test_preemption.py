"""Preemption and hard kills with the shipped checkpoint settings (docs/preemption.md).

- Two `skyjax train` processes (localhost jax.distributed, 4 CPU devices each made from mesh.shape alone, no
  XLA_FLAGS): SIGTERM to one of them, twice, stops both at the same step, both save it and exit 143; a rerun
  resumes on both; the checkpoint restores onto one process and equals the two processes' final parameters.
- One process, async checkpointing (the default), save_every and keep_checkpoints: kill -9 between saves, kill -9
  while an async save is being written, then a SIGTERM save; every rerun resumes from the last finished step (never
  the half-written one) and the run's metrics equal an uninterrupted run's exactly.
- The stop vote on one process (no collective) and, simulated, on several.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from skyjax.config import load_config
from skyjax.errors import PREEMPTED_EXIT_STATUS
from skyjax.parallel.mesh import make_mesh
from skyjax.train.config import RunConfig
from skyjax.train.preemption import StopVote
from skyjax.train.run_dir import saved_steps
from skyjax.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
DEMO = "configs/demo/reward_model.yaml"
# the smallest reward-model run: one decoder layer, one vision block, width 32, one compiled step; only the value head
# is trained (no backward pass through the model: a quicker trace and compile) at a constant learning rate (so a run
# may be given any step budget and still take the same steps)
TINY = ["model.tiny_layers=1", "model.tiny_vision_depth=1", "model.tiny_hidden=32", "data.synthetic.train=64",
        "data.synthetic.heldout=8", "data.synthetic.image_size=56", "data.batch_size=8", "data.seq_buckets=[64]",
        "data.patch_buckets=[128]", "data.image_buckets=[8]", "trainer.log_every=1", "trainer.progress=false",
        "trainer.export=false", "trainer.eval_batch_size=8", "optimizer.warmup_steps=0",
        "trainer.freeze=[vision,projector,llm,lm_head]", "optimizer.schedule=constant", "mesh.shape=[2,2,2]"]
TIMEOUT = 300  # seconds for any one wait: a loaded 2-core CI machine compiles slowly


def config(*extra):
    return load_config(RunConfig, DEMO, [*TINY, *extra])


# --- cheap checks -----------------------------------------------------------------------------------------------------


def test_one_process_stops_on_its_own_flag_without_a_collective():
    vote = StopVote(make_mesh((2, 2, 2)))
    assert vote.processes == 1
    assert vote.poll(None) is None and vote.poll(signal.SIGTERM) is None  # the caller reads its own flag
    assert vote.agree(None) == 0 and vote.agree(signal.SIGTERM) == signal.SIGTERM
    assert vote.votes == 0  # nothing dispatched
    # several processes, simulated on this one: each poll dispatches a vote and reads the one before
    multi = StopVote(make_mesh((2, 2, 2)), processes=2)
    assert multi.poll(None) == 0 and multi.poll(signal.SIGTERM) == 0  # the first vote had no signal
    assert multi.poll(None) == signal.SIGTERM and multi.agree(None) == 0 and multi.votes == 4


# --- subprocesses -----------------------------------------------------------------------------------------------------


def train_env() -> dict:
    """The environment of a `skyjax train` subprocess: its CPU devices come from mesh.shape (no XLA_FLAGS); the
    numerics (matmul precision) and the persistent compilation cache are this process's, so a subprocess runs the
    very program an in-process Trainer of the same config runs (and compiles it only once)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "JAX_DEFAULT_MATMUL_PRECISION": "highest",
           "JAX_COMPILATION_CACHE_DIR": str(jax.config.jax_compilation_cache_dir or ""),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    env.pop("XLA_FLAGS", None)
    for key in ("SKYJAX_COORDINATOR", "SKYJAX_NUM_PROCESSES", "SKYJAX_PROCESS_ID"):
        env.pop(key, None)
    return env


class Train:
    """A `skyjax train` subprocess on the TINY config; its stderr goes to a file (`err()` reads it)."""

    def __init__(self, run_dir: Path, overrides: list[str], name: str, **env):
        self.log = run_dir.parent / f"{name}.err"
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "skyjax.cli", "train", DEMO, *TINY, *overrides,
                                          "--run-dir", str(run_dir)], cwd=REPO, env={**train_env(), **env},
                                         stdout=subprocess.DEVNULL, stderr=err)

    def err(self) -> str:
        return self.log.read_text()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float = TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"{self.log.name}: no exit within {timeout} s:\n{self.err()[-3000:]}") from None

    def kill(self):
        if self.alive():
            self.proc.kill()
        self.proc.wait()


def train_rows(run_dir: Path) -> dict[int, dict]:
    """{step: the train row of metrics.jsonl} (a line cut short by a kill is left out)."""
    path = run_dir / "metrics.jsonl"
    rows = {}
    for line in (path.read_text().splitlines() if path.is_file() else []):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("split") == "train":
            rows[row["step"]] = row
    return rows


def writing(run_dir: Path) -> list[int]:
    """Steps whose checkpoint is being written (orbax's temporary folders, '<step>.orbax-checkpoint-tmp-...')."""
    folder = run_dir / "checkpoints"
    names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    return sorted(int(n.split(".")[0]) for n in names if not n.isdigit() and n.split(".")[0].isdigit())


def wait_until(runs: list[Train], condition, freeze: bool = False, timeout: float = TIMEOUT) -> None:
    """Wait until `condition()` holds. `freeze`: and then stop the processes (SIGSTOP: every thread, an async save
    included) with it still holding, so nothing changes on disk until they are killed or continued."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for run in runs:
            assert run.alive(), f"{run.log.name}: exited {run.proc.returncode}:\n{run.err()[-3000:]}"
        if condition():
            if not freeze:
                return
            for run in runs:
                os.kill(run.proc.pid, signal.SIGSTOP)
            if condition():
                return
            for run in runs:
                os.kill(run.proc.pid, signal.SIGCONT)
        time.sleep(0.01)
    raise AssertionError(f"not reached within {timeout} s:\n{runs[0].err()[-3000:]}")


def resumed_at(err: str) -> int | None:
    found = re.search(r"resumed from .* at step (\d+)", err)
    return int(found.group(1)) if found else None


def saved_at(err: str) -> int:
    found = re.search(r"SIGTERM: saved a checkpoint at step (\d+)", err)
    assert found, err[-3000:]
    return int(found.group(1))


def no_leftovers(run_dir: Path):
    leftovers = [p.name for p in (run_dir / "checkpoints").iterdir() if not p.name.isdigit()]
    assert not leftovers, leftovers  # no temporary (half-written) checkpoint


DETERMINISTIC = ("loss", "accuracy", "margin", "chosen_score", "rejected_score", "grad_norm", "lr")


@pytest.mark.slow
def test_hard_kills_and_a_sigterm_save_resume_to_an_uninterrupted_runs_metrics(tmp_path):
    """kill -9 between saves, kill -9 during an async save, SIGTERM; each rerun resumes from the last finished
    checkpoint, and every step's metrics equal those of a run never interrupted, bit for bit."""
    steps = 16
    shipped = ["trainer.save_every=3"]  # async checkpoints and keep_checkpoints=2: the defaults
    cfg = config(*shipped, f"trainer.steps={steps}")
    assert cfg.trainer.async_checkpointing and cfg.trainer.keep_checkpoints == 2
    Trainer(cfg, tmp_path / "uninterrupted").fit()  # first: the subprocesses find its program compiled
    shipped.append("trainer.steps=100000")  # the subprocesses never finish before they are stopped
    reference = train_rows(tmp_path / "uninterrupted")
    run = tmp_path / "run"
    started: list[Train] = []
    try:
        # 1. kill -9 during training, no save being written: the rerun resumes from the latest finished step
        started.append(first := Train(run, shipped, "killed_training"))
        wait_until([first], lambda: len(train_rows(run)) >= 3 and saved_steps(run / "checkpoints")
                   and not writing(run), freeze=True)
        finished = saved_steps(run / "checkpoints")
        first.kill()

        # 2. kill -9 while an async save is being written (after this run resumed)
        started.append(second := Train(run, shipped, "killed_saving"))
        wait_until([second], lambda: resumed_at(second.err()) is not None
                   and any(s > resumed_at(second.err()) for s in writing(run)), freeze=True)
        assert resumed_at(second.err()) == finished[-1]
        half_written = writing(run)[-1]
        finished = saved_steps(run / "checkpoints")
        second.kill()
        assert half_written > finished[-1] and len(finished) <= 2  # keep_checkpoints=2

        # 3. SIGTERM: the rerun resumes before the half-written step, saves a step and exits 143
        started.append(third := Train(run, shipped, "sigterm"))
        wait_until([third], lambda: resumed_at(third.err()) is not None
                   and max(train_rows(run), default=0) > resumed_at(third.err()))
        assert resumed_at(third.err()) == finished[-1]
        third.proc.send_signal(signal.SIGTERM)
        assert third.wait() == PREEMPTED_EXIT_STATUS, third.err()[-3000:]
        saved = saved_at(third.err())
        assert saved_steps(run / "checkpoints")[-1] == saved
        no_leftovers(run)
    finally:
        for p in started:
            p.kill()

    # 4. here: resume to the end
    trainer = Trainer(cfg, run)
    assert trainer.start_step == saved
    trainer.fit()
    resumed = train_rows(run)
    assert sorted(resumed) == sorted(reference) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert {k: resumed[step][k] for k in DETERMINISTIC} == {k: reference[step][k] for k in DETERMINISTIC}, step


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_processes(run_dir: Path, overrides: list[str], name: str) -> list[Train]:
    job = {"SKYJAX_COORDINATOR": f"127.0.0.1:{free_port()}", "SKYJAX_NUM_PROCESSES": "2"}
    return [Train(run_dir, overrides, f"{name}{i}", **job, SKYJAX_PROCESS_ID=str(i)) for i in range(2)]


def wait_all(runs: list[Train], timeout: float = TIMEOUT) -> list[int]:
    """Exit statuses; one process failing leaves the other in a collective: it is killed after a grace period."""
    deadline = time.time() + timeout
    while any(r.alive() for r in runs) and time.time() < deadline:
        if any(not r.alive() and r.proc.returncode not in (0, PREEMPTED_EXIT_STATUS) for r in runs):
            time.sleep(5)
            break
        time.sleep(0.1)
    for r in runs:
        r.kill()
    return [r.proc.returncode for r in runs]


@pytest.mark.slow
def test_two_processes_stop_at_one_step_on_one_sigterm_resume_and_restore_on_one(tmp_path):
    """Two processes (mesh [2, 2, 2], 4 CPU devices each without XLA_FLAGS), SIGTERM twice to process 1 only: both
    stop at the same step, save it and exit 143. Rerun: both resume there and finish. The checkpoint restored onto
    one process equals the parameters the two processes ended with (their final skyjax checkpoint)."""
    from skyjax.convert.checkpoint import load_model
    from skyjax.train.optimizer import flatten

    run = tmp_path / "run"
    started: list[Train] = []
    try:
        started += (job := two_processes(run, ["trainer.steps=100000", "trainer.save_every=2"], "first"))
        wait_until(job, lambda: len(train_rows(run)) >= 3)
        job[1].proc.send_signal(signal.SIGTERM)
        wait_until(job, lambda: "SIGTERM: stopping after" in job[1].err())
        # a second one while stopping: process 0 frozen, process 1 cannot finish its save (a barrier with 0) before
        os.kill(job[0].proc.pid, signal.SIGSTOP)
        job[1].proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        os.kill(job[0].proc.pid, signal.SIGCONT)
        codes = wait_all(job)
        errs = [r.err() for r in job]
        assert codes == [PREEMPTED_EXIT_STATUS] * 2, "\n".join(e[-3000:] for e in errs)
        step = saved_at(errs[0])
        assert saved_at(errs[1]) == step and saved_steps(run / "checkpoints")[-1] == step
        assert "SIGTERM on another process" in errs[0] and "already stopping" in errs[1]
        assert not any((run / name).exists() for name in ("checkpoint", "summary.json"))
        no_leftovers(run)
        # each process wrote the same synthetic rows into its own folder (none read a file another was writing)
        assert (run / "data-process1" / "train.jsonl").read_text() == (run / "data" / "train.jsonl").read_text()

        started += (job := two_processes(run, [f"trainer.steps={step + 1}", "trainer.save_every=2"], "rerun"))
        codes = wait_all(job)
        errs = [r.err() for r in job]
        assert codes == [0, 0], "\n".join(e[-3000:] for e in errs)
        assert [resumed_at(e) for e in errs] == [step, step]
        assert sorted(train_rows(run)) == list(range(1, step + 2))  # no step twice
    finally:
        for r in started:
            r.kill()

    # onto one process (8 devices here): the same state as the two processes' last step
    trainer = Trainer(config(f"trainer.steps={step + 1}"), run)
    assert trainer.start_step == step + 1
    final = flatten(load_model(run / "checkpoint", mesh=trainer.mesh).params)
    restored = flatten(trainer.params())
    assert sorted(final) == sorted(restored)
    for key, value in final.items():
        np.testing.assert_array_equal(np.asarray(restored[key]), np.asarray(value), err_msg=str(key))
