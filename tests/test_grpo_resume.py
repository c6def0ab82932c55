"""kind grpo resumes exactly (docs/grpo.md): with rollout.num_iterations = 2 a checkpoint can fall inside a reused
rollout batch; the resumed run trains on that very batch (the saved samples, the same prompts re-prepared) and then
draws the same rollouts as a run never interrupted (the sampler's keys fold the rollout's index), so every step's
metrics and the completions table equal the uninterrupted run's: `skyjax train` is killed by SIGKILL after a checkpoint
inside the second rollout (step 3 of its steps 3 and 4) and rerun."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import test_grpo_qwen_vl as qv
from skyjax.config import load_config
from skyjax.train.config import RunConfig
from skyjax.train.run_dir import saved_steps
from skyjax.train.trainer import Trainer
from test_preemption import REPO, TIMEOUT, train_env, train_rows, wait_until, writing

# a constant learning rate: a run may be given any step budget and still take the same steps
RESUME = ["rollout.num_iterations=2", "optimizer.schedule=constant", "optimizer.warmup_steps=0"]
STEPS = 6
SAVES = ["trainer.save_every=3"]  # checkpoints at steps 3 (inside the second rollout's two steps) and 6


def config(setup, *extra):
    _, policy, data = setup
    return load_config(RunConfig, None, qv.overrides(policy, data, *RESUME, *SAVES, *extra))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo_resume")
    return root, qv.make_policy(root), qv.write_prompts(root)


@pytest.fixture(scope="module")
def whole(setup):
    """A run never interrupted (STEPS steps): the reference."""
    folder = setup[0] / "whole"
    Trainer(config(setup, f"trainer.steps={STEPS}"), folder, log=lambda m: None).fit()
    return folder


def same_steps(run: Path, reference: Path) -> None:
    """Every step's metrics (all but the timings) and the completions table equal the reference run's."""
    got, want = train_rows(run), train_rows(reference)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        keys = sorted(k for k in want[step] if k not in ("time",) and not k.endswith("_per_s"))
        assert keys == sorted(k for k in got[step] if k not in ("time",) and not k.endswith("_per_s"))
        assert {k: got[step][k] for k in keys} == {k: want[step][k] for k in keys}, step

    def table(folder):
        return [json.loads(x) for x in (folder / "completions.jsonl").read_text().splitlines()]

    assert table(run) == table(reference)
    # num_iterations 2: rollouts for steps 1, 3, 5, ... only (a resumed run did not draw one for its first step)
    assert sorted({x["step"] for x in table(run)}) == list(range(1, STEPS + 1, 2))


class Train:
    """A `skyjax train` subprocess of kind grpo; its stderr goes to a file."""

    def __init__(self, setup, run_dir: Path, overrides: list[str], name: str):
        _, policy, data = setup
        self.log = run_dir.parent / f"{name}.err"
        yaml = run_dir.parent / "grpo.yaml"
        yaml.write_text("kind: grpo\n")
        env = train_env()
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests")])  # the test's reward function
        args = qv.overrides(policy, data, *RESUME, *SAVES, *overrides)
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "skyjax.cli", "train", str(yaml), *args,
                                          "--run-dir", str(run_dir)], cwd=REPO, env=env,
                                         stdout=subprocess.DEVNULL, stderr=err)

    def err(self) -> str:
        return self.log.read_text()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self):
        if self.alive():
            self.proc.kill()
        self.proc.wait()


@pytest.mark.slow
def test_kill_9_after_a_checkpoint_inside_a_reused_rollout_and_rerun_resumes_exactly(setup, whole, tmp_path):
    run = tmp_path / "run"

    def inside_a_rollout():
        """The latest finished checkpoint is step 3 (the first of the second rollout's two steps: its batch is half
        used), the process has trained past it, and no save is being written."""
        done = saved_steps(run / "checkpoints")
        return (bool(done) and done[-1] == 3 and not writing(run)
                and max(train_rows(run), default=0) > done[-1])

    proc = Train(setup, run, ["trainer.steps=100000"], "killed")  # its programs are compiled (`whole`)
    try:
        wait_until([proc], inside_a_rollout, freeze=True, timeout=TIMEOUT)
        checkpoint = saved_steps(run / "checkpoints")[-1]
        proc.kill()  # SIGKILL
    finally:
        proc.kill()
    assert max(train_rows(run)) > checkpoint  # the killed run logged steps the rerun must replace
    rerun = Trainer(config(setup, f"trainer.steps={STEPS}"), run, log=lambda m: None)
    assert rerun.start_step == checkpoint == 3
    saved = rerun.batches.get_state()  # the checkpoint's: the second rollout, used by one of its two steps
    assert saved["reuse"]["used"] == 1 and saved["rollouts"] == 2
    rerun.fit()
    same_steps(run, whole)
