"""Run-folder ownership, resume safety, preemption signals, config value checks and one-line CLI errors."""

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from skyjax import cli
from skyjax.config import ConfigError, from_dict, load_config, to_dict
from skyjax.convert.safetensors_io import CheckpointError
from skyjax.data.synthetic import make_records
from skyjax.errors import PREEMPTED_EXIT_STATUS
from skyjax.parallel.mesh import MeshConfig, MeshError, cpu_devices_for, make_mesh
from skyjax.train.config import RunConfig
from skyjax.train.batching import BadRowError
from skyjax.train.run_dir import check_resume, claim_run_dir, config_changes, saved_steps
from skyjax.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
DEMO = "configs/demo/reward_model.yaml"
BASE = ["model.tiny_layers=1", "model.tiny_vision_depth=2", "data.synthetic.train=48", "data.synthetic.heldout=8",
        "data.synthetic.image_size=56",
        "data.batch_size=8", "data.seq_buckets=[128]", "data.patch_buckets=[256]", "data.image_buckets=[16]",
        "trainer.steps=4", "trainer.log_every=1", "trainer.progress=false", "trainer.export=false",
        "trainer.eval_batch_size=8", "trainer.async_checkpointing=false", "optimizer.lr=1e-3",
        "optimizer.warmup_steps=0", "mesh.shape=[2,2,2]", "trainer.freeze=[vision,lm_head]"]


def config(*extra):
    return load_config(RunConfig, DEMO, [*BASE, *extra])


def metric_steps(run_dir):
    return [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if r["split"] == "train"]


def damage(folder: Path):
    """Truncate the largest file under `folder` (as a full disk or a killed copy would)."""
    biggest = max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    with open(biggest, "r+b") as f:
        f.truncate(64)


def test_run_folder_resume_refusal_damaged_checkpoint_and_fresh_start(tmp_path):
    run = tmp_path / "run"
    Trainer(config("trainer.save_every=2"), run).fit()
    assert saved_steps(run / "checkpoints") == [2, 4]

    # a resume with another learning rate is refused before anything in the folder changes
    saved_config = (run / "config.json").read_text()
    with pytest.raises(ConfigError, match=r"optimizer\.lr: 0\.001 -> 0\.01.*--no-resume.*--run-dir"):
        Trainer(config("trainer.save_every=2", "optimizer.lr=1e-2"), run)
    assert (run / "config.json").read_text() == saved_config

    # an unreadable latest checkpoint: one error naming the step and offering the previous one
    damage(run / "checkpoints" / "4")
    with pytest.raises(CheckpointError, match=r"checkpoint step 4 in .* is unreadable \(.*\); rerun with "
                                              r"trainer\.resume_step=2") as err:
        Trainer(config("trainer.save_every=2"), run)
    assert "\n" not in str(err.value)
    # ... taken: resumed at 2 (a longer step budget is allowed), the damaged step set aside, metrics cut to step 2
    b = Trainer(config("trainer.save_every=2", "trainer.resume_step=2", "trainer.steps=5"), run)
    assert b.start_step == 2 and saved_steps(run / "checkpoints") == [2]
    assert metric_steps(run) == [1, 2]
    b.fit()
    assert metric_steps(run) == [1, 2, 3, 4, 5]  # no step twice
    assert json.loads((run / "config.json").read_text())["trainer"]["steps"] == 5

    # --no-resume: the old run's files go to previous-<timestamp>/; the new run owns checkpoints/
    with pytest.raises(ConfigError, match=r"trainer\.steps=3 is below the step 5 resumed from"):
        Trainer(config("trainer.steps=3"), run)
    with pytest.raises(ConfigError, match=r"data\.eval: .*absent\.jsonl does not exist"):
        Trainer(config(f"data.eval=[{tmp_path / 'absent.jsonl'}]"), run)
    c = Trainer(config(), run, resume=False)
    assert c.start_step == 0 and saved_steps(run / "checkpoints") == []
    (previous,) = run.glob("previous-*")
    assert saved_steps(previous / "checkpoints") == [4, 5] and (previous / "metrics.jsonl").is_file()
    assert not (run / "metrics.jsonl").exists()
    c.fit(max_steps=1)
    del c
    assert Trainer(config(), run).start_step == 1  # the new run's checkpoint, never the old run's step 5


def test_resume_allows_only_the_step_budget_and_bookkeeping(tmp_path):
    old = {"optimizer": {"lr": 0.003}, "trainer": {"steps": 60, "log_every": 10}, "mesh": {"shape": [2, 2, 2]},
           "data": {"train": ["a.jsonl"], "eval": []}}
    same_run = {"optimizer": {"lr": 0.003}, "trainer": {"steps": 80, "log_every": 1}, "mesh": {"shape": [1, 8, 1]},
                "data": {"train": ["a.jsonl"], "eval": ["b.jsonl"]}}
    assert config_changes(old, same_run) == []
    other = {**same_run, "optimizer": {"lr": 0.01}, "data": {"train": ["c.jsonl"], "eval": []}}
    assert config_changes(old, other) == ['data.train: ["a.jsonl"] -> ["c.jsonl"]', "optimizer.lr: 0.003 -> 0.01"]
    # without a checkpoint there is nothing to resume: any config may start there
    claim_run_dir(tmp_path, old, resume=True, log=lambda m: None)
    claim_run_dir(tmp_path, other, resume=True, log=lambda m: None)
    (tmp_path / "checkpoints" / "20").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"optimizer\.lr: 0\.01 -> 0\.003"):
        claim_run_dir(tmp_path, old, resume=True, log=lambda m: None)
    check_resume(tmp_path, same_run, resume=False)  # a fresh start takes any config (the old run is moved aside)
    # a config.json written before a key existed: the key's default is no change
    full = json.loads(json.dumps(to_dict(config())))
    (tmp_path / "config.json").write_text(json.dumps({**full, "data": {k: v for k, v in full["data"].items()
                                                                      if k != "share_prompt"}}))
    normalize = lambda saved: to_dict(from_dict(RunConfig, saved))  # noqa: E731
    check_resume(tmp_path, full, resume=True, normalize=normalize)
    with pytest.raises(ConfigError, match=r"data\.share_prompt: \(absent\) -> false"):
        check_resume(tmp_path, full, resume=True)


def test_over_long_rows_are_named_by_their_line_and_skipped_and_listed(tmp_path):
    folder = tmp_path / "data"
    path = make_records(folder, "train", 13, seed=0)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[11]["chosen"] = [{"role": "assistant", "content": "a very long answer " * 60}]  # line 12
    rows[1]["rating"] = 5  # line 2: an unknown field
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    common = ("trainer.steps=1", f"data.train=[{path}]", "data.synthetic=null", "data.max_length=null",
              "data.batch_size=4")
    rows_ok = [r for i, r in enumerate(rows) if i != 1]
    clean = folder / "clean.jsonl"
    clean.write_text("\n".join(json.dumps(r) for r in rows_ok) + "\n")  # the long row is line 11 here
    t = Trainer(config(*common[:1], f"data.train=[{clean}]", *common[2:]), tmp_path / "raise")
    with pytest.raises(BadRowError, match=r"clean\.jsonl:11: \d+ tokens, more than the largest seq bucket 128"):
        [t.batches.next(t.state)[0] for _ in range(3)]

    t = Trainer(config(*common, "data.on_error=skip"), tmp_path / "skip")
    batches = [t.batches.next(t.state)[0] for _ in range(3)]  # the 12 records read, once each
    assert sum(float(np.sum(b["pair_weight"])) for b in batches) == 11
    assert dict(t.read_skipped) == {"unknown_key": 1} and sum(t.train_pipe.skipped.values()) == 1
    t.write_skipped()
    listed = [json.loads(line) for line in (tmp_path / "skip" / "skipped.jsonl").read_text().splitlines()]
    assert [(Path(r["file"]).name, r["line"], r["stage"]) for r in listed] == [("train.jsonl", 2, "read"),
                                                                              ("train.jsonl", 12, "prepare")]
    assert "rating" in listed[0]["detail"] and "more than the largest seq bucket" in listed[1]["detail"]


def test_config_values_are_checked_with_the_key_and_range(tmp_path, monkeypatch):
    for override, message in [("trainer.steps=-5", r"trainer\.steps=-5 is out of range: must be >= 1"),
                              ("data.batch_size=0", r"data\.batch_size=0 is out of range: must be > 0"),
                              ("optimizer.lr=0", r"optimizer\.lr=0\.0 is out of range: must be > 0"),
                              ("trainer.log_every=0", r"trainer\.log_every=0 is out of range"),
                              ("mesh.shape=[0,-1,1]", r"mesh\.shape \[0, -1, 1\]: sizes must be >= 1")]:
        with pytest.raises(ConfigError, match=message):
            config(override)
    with pytest.raises(MeshError, match=r"mesh\.shape \[3, -1, 1\]: the fixed axes \(3 devices\) do not divide the "
                                        r"8 devices"):
        make_mesh(MeshConfig((3, -1, 1)))
    # CPU-only: a -1 axis spans the host's cores (at most 8), rounded up to a multiple of the fixed axes
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert cpu_devices_for(MeshConfig((1, -1, 1))) == 8 and cpu_devices_for(MeshConfig((3, -1, 1))) == 9
    assert cpu_devices_for(MeshConfig((2, 2, 1))) == 4
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert cpu_devices_for(MeshConfig((1, -1, 1))) == 1

    # the command: one line, status 2; SKYJAX_DEBUG=1 adds the traceback
    code = cli.main(["train", DEMO, "trainer.steps=-5", "--run-dir", str(tmp_path / "r")])
    assert code == 2 and not (tmp_path / "r").exists()


def test_each_process_makes_its_share_of_the_mesh_devices(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert cpu_devices_for(MeshConfig((2, 2, 2))) == 8
    assert cpu_devices_for(MeshConfig((2, 2, 2)), processes=2) == 4  # was 16 each: "16 are available"
    assert cpu_devices_for(MeshConfig((2, 2, 2), num_slices=2), processes=4) == 4
    assert cpu_devices_for(MeshConfig((-1, 2, 2)), processes=2) == 2  # 2 cores each, 4 in all: [1, 2, 2]
    assert cpu_devices_for(MeshConfig((-1, 3, 1)), processes=2) == 3  # rounded up so that 3 divides the 6
    with pytest.raises(MeshError, match=r"mesh\.shape \[1, 3, 1\] = 3 devices do not split over 2 processes"):
        cpu_devices_for(MeshConfig((1, 3, 1)), processes=2)


def test_cli_errors_are_one_line(tmp_path, capsys, monkeypatch):
    from skyjax.convert.checkpoint import load_model, save_checkpoint
    from skyjax.train.config import ModelConfig
    from skyjax.train.setup import tiny_reward_model

    bundle = tiny_reward_model(ModelConfig(tiny_layers=1, tiny_vision_depth=1, tiny_hidden=32), make_mesh((1, 1, 1)),
                               tmp_path / "tok")
    ckpt = save_checkpoint(tmp_path / "ckpt", bundle.model)

    def run(*argv):
        capsys.readouterr()
        code = cli.main(list(map(str, argv)))
        return code, capsys.readouterr().err.strip().splitlines()

    # export keeps the value head of a reward checkpoint, and says so
    code, _ = run("export", ckpt, tmp_path / "hf", "--mesh", "1,1,1")
    assert code == 0 and (tmp_path / "hf" / "value_head.safetensors").is_file()
    again = load_model(tmp_path / "hf", mesh=make_mesh((1, 1, 1)))
    assert again.arch.name == "qwen2_5_vl_reward"
    np.testing.assert_array_equal(np.asarray(again.params["v_head"]["summary"]["kernel"]),
                                  np.asarray(bundle.model.params["v_head"]["summary"]["kernel"]))

    (tmp_path / "rows.jsonl").write_text('{"prompt": "hi", "response": "there"}\n')
    (tmp_path / "hf" / "value_head.safetensors").unlink()
    cases = [
        (("score", "--model", tmp_path / "hf", "--data", tmp_path / "rows.jsonl", "--out", tmp_path / "s.jsonl"),
         r"skyjax score: error: .*hf: no value_head\.safetensors: a qwen2_5_vl model without a value head"),
        (("export", tmp_path / "tok", tmp_path / "o", "--mesh", "1,1,1"),
         r"skyjax export: error: .*tok: not a model folder \(no skyjax\.json, no config\.json\): a skyjax checkpoint "
         r"needs skyjax\.json and params/, a Hugging Face folder needs config\.json"),
        (("export", tmp_path / "absent", tmp_path / "o", "--mesh", "1,1,1"), r"absent does not exist"),
    ]
    (ckpt / "skyjax.json").rename(tmp_path / "meta.json")
    cases.append((("export", ckpt, tmp_path / "o", "--mesh", "1,1,1"), r"ckpt: has params/ but no skyjax\.json"))
    for argv, message in cases:
        code, err = run(*argv)
        assert code == 2 and len(err) == 1, err
        assert re.search(message, err[0]), err
    (tmp_path / "meta.json").rename(ckpt / "skyjax.json")
    damage(ckpt / "params")
    code, err = run("export", ckpt, tmp_path / "o", "--mesh", "1,1,1")
    assert code == 2 and len(err) == 1 and "params: the parameters are unreadable" in err[0], err
    monkeypatch.setenv("SKYJAX_DEBUG", "1")
    code, err = run("export", ckpt, tmp_path / "o", "--mesh", "1,1,1")
    assert code == 2 and err[0].startswith("Traceback") and err[-1].startswith("skyjax export: error:")


def test_transformers_torch_advice_is_dropped_and_nothing_else():
    cli.quiet_transformers()
    logger = logging.getLogger("transformers")
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        logger.warning("PyTorch was not found. Models won't be available and only tokenizers, configuration and "
                       "file/data utilities can be used.")
        logger.warning("another warning")
    finally:
        logger.removeHandler(handler)
    assert seen == ["another warning"]


def test_first_step_says_compiling_and_its_time_is_not_in_the_rate(tmp_path):
    from skyjax.train.metrics import MetricsWriter

    writer = MetricsWriter(tmp_path, total_steps=1000, progress=True)
    writer.compiling()
    assert writer.bar.desc.startswith("compiling (first step)")
    time.sleep(1.0)  # the compile
    writer.compiled()
    writer.advance(1)
    assert writer.bar.desc.startswith("train") and writer.bar.format_dict["elapsed"] < 0.5
    writer.close()


def test_summary_prints_the_users_eval_files():
    from skyjax.train.cli import format_summary

    summary = {"name": "r", "kind": "reward_model", "steps": 3, "seconds": 1.0, "eval_accuracy": {"mine": 0.75},
               "train": {}, "skipped_rows": 2, "paths": {"summary": "s.json", "skipped": "run/skipped.jsonl"}}
    text = format_summary(summary)
    assert "eval mine" in text and "accuracy 0.750" in text and "run/skipped.jsonl" in text
    sft = format_summary({**summary, "kind": "sft", "eval_accuracy": None,
                          "eval": {"mine": {"loss": 1.5, "accuracy": 0.25, "tokens": 10.0}}})
    assert "eval mine" in sft and "loss 1.500, accuracy 0.250" in sft


# --- signals: a real `skyjax train` process -------------------------------------------------------------------------


def _spawn(run_dir: Path, *extra: str) -> subprocess.Popen:
    overrides = [o for o in BASE if not o.startswith(("trainer.steps", "mesh.shape", "trainer.async"))]
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen([sys.executable, "-m", "skyjax.cli", "train", DEMO, *overrides, "trainer.steps=100000",
                             "mesh.shape=[1,-1,1]", *extra, "--run-dir", str(run_dir)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_steps(proc: subprocess.Popen, run_dir: Path, steps: int, timeout: float = 240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        path = run_dir / "metrics.jsonl"
        if path.is_file() and len(path.read_text().splitlines()) >= steps:
            return
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"no step {steps} within {timeout} s")


def _assert_preempted(proc, run_dir):
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_STATUS == 143, err
    assert "saved a checkpoint at step" in err and "Traceback" not in err
    assert saved_steps(run_dir / "checkpoints")
    assert not any((run_dir / name).exists() for name in ("checkpoint", "hf", "summary.json"))
    leftovers = [p.name for p in (run_dir / "checkpoints").iterdir() if not p.name.isdigit()]
    assert not leftovers, leftovers  # no half-written (tmp) checkpoint
    return err


@pytest.mark.slow
def test_sigterm_and_double_ctrl_c_save_and_exit_143_without_final_outputs(tmp_path):
    term = _spawn(tmp_path / "term")
    _wait_for_steps(term, tmp_path / "term", 2)
    term.send_signal(signal.SIGTERM)
    _assert_preempted(term, tmp_path / "term")

    # Ctrl-C twice while an async save is being written: one wait, no spam, the same status
    ctrl_c = _spawn(tmp_path / "int", "trainer.async_checkpointing=true", "trainer.save_every=1")
    _wait_for_steps(ctrl_c, tmp_path / "int", 2)
    ctrl_c.send_signal(signal.SIGINT)
    time.sleep(0.05)
    ctrl_c.send_signal(signal.SIGINT)
    err = _assert_preempted(ctrl_c, tmp_path / "int")
    assert "cannot schedule new futures" not in err and len(err.splitlines()) < 20, err
