"""The trainer: resume exactness, restore onto another mesh, frozen parts, NaN stop, SIGTERM, bad rows."""

import json
import re
import shutil
import signal
from pathlib import Path

import jax
import numpy as np
import pytest

from skyjax.config import load_config
from skyjax.data.synthetic import make_records
from skyjax.errors import Preempted
from skyjax.train import trainer as trainer_mod
from skyjax.train.config import RunConfig
from skyjax.train.optimizer import flatten
from skyjax.train.batching import BadRowError
from skyjax.train.trainer import NonFiniteError, Trainer

BASE = ["model.tiny_layers=1", "model.tiny_vision_depth=2", "data.synthetic.train=48", "data.synthetic.heldout=8",
        "data.synthetic.image_size=56",
        "data.batch_size=8", "data.seq_buckets=[128]", "data.patch_buckets=[256]", "data.image_buckets=[16]",
        "trainer.steps=4", "trainer.log_every=1", "trainer.progress=false", "trainer.export=false",
        "trainer.eval_batch_size=8", "trainer.async_checkpointing=false", "optimizer.lr=1e-3",
        "optimizer.warmup_steps=0", "mesh.shape=[2,2,2]"]


def config(*extra):
    return load_config(RunConfig, "configs/demo/reward_model.yaml", [*BASE, *extra])


def metrics(run_dir):
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if r["split"] == "train"}


def host(tree):
    return {k: np.array(v) for k, v in flatten(tree).items()}


def test_resume_is_exact_frozen_parts_stay_and_restore_onto_another_mesh(tmp_path):
    cfg = config("trainer.freeze=[vision,lm_head]")
    a = Trainer(cfg, tmp_path / "a")
    # the run's image processor bounds the patches of one image; the vision tower is told (blocked full attention)
    assert a.bundle.model.config.vision.max_image_patches == a.train_pipe.image_cfg.max_patches == 64
    before = host(a.state["frozen"])
    trainable_before = host(a.state["trainable"])
    assert before and all(k.startswith(("visual/patch_embed", "visual/blocks", "lm_head")) for k in before)
    assert all(not k.startswith("visual/blocks") for k in trainable_before)  # no optimizer state for them either
    a.fit()
    full = metrics(tmp_path / "a")
    after = host(a.state["frozen"])
    for k in before:
        np.testing.assert_array_equal(before[k], after[k], err_msg=k)  # frozen: bit-identical
    changed = host(a.state["trainable"])
    # the value head's bias cancels in r+ - r- (Bradley-Terry): its gradient is zero up to rounding, so it
    # may stay (whether Adam moves it depends on this machine's rounding); every other tensor moves
    moved = {k for k in trainable_before if not np.array_equal(trainable_before[k], changed[k])}
    assert set(trainable_before) - moved <= {"v_head/summary/bias"}, "all trainable move"
    assert "lm_head/kernel" in before  # unused by the score: frozen, so it costs no optimizer state

    b = Trainer(cfg, tmp_path / "b")
    b.fit(max_steps=2)  # stops after step 2 and saves
    del b
    b2 = Trainer(cfg, tmp_path / "b")
    assert b2.start_step == 2
    b2.fit()
    resumed = metrics(tmp_path / "b")
    for step in (3, 4):
        for key in ("loss", "accuracy", "margin", "grad_norm"):
            assert resumed[step][key] == pytest.approx(full[step][key], rel=1e-6, abs=1e-7), (step, key)
    final_a = host(a.params())

    # the same checkpoint restored onto a (1, 4, 2) mesh: same values, new shardings
    other = Trainer(config("trainer.freeze=[vision,lm_head]", "mesh.shape=[1,4,2]"), tmp_path / "b")
    assert other.start_step == 4 and dict(other.mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    kernel = other.state["trainable"]["model"]["layers"]["mlp"]["gate_proj"]["kernel"]
    assert kernel.sharding.mesh.shape["fsdp"] == 4
    for k, v in host(other.params()).items():
        np.testing.assert_allclose(v, final_a[k], rtol=0, atol=1e-6, err_msg=k)


def test_nan_stops_with_step_and_rows(tmp_path, monkeypatch):
    """A NaN in the input at step 2 (the same compiled step as the other tests: poisoned data, not a new program)."""
    calls = []
    real = trainer_mod.to_device

    def to_device(batch, mesh):
        calls.append(1)
        if len(calls) == 2:
            batch = dict(batch, pixel_values=np.full_like(batch["pixel_values"], np.nan))
        return real(batch, mesh)

    monkeypatch.setattr(trainer_mod, "to_device", to_device)
    t = Trainer(config("trainer.freeze=[vision,lm_head]"), tmp_path)
    with pytest.raises(NonFiniteError, match=r"step 2: .*loss.* NaN/inf; the batch held rows train-\d+"):
        t.fit()


def test_sigterm_saves_and_exits(tmp_path, monkeypatch):
    calls = []
    real = trainer_mod.to_device

    def to_device(batch, mesh):
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGTERM)  # as a TPU preemption would, during step 2
        return real(batch, mesh)

    monkeypatch.setattr(trainer_mod, "to_device", to_device)
    t = Trainer(config("trainer.freeze=[vision,lm_head]"), tmp_path)
    with pytest.raises(Preempted, match="SIGTERM: saved a checkpoint at step 2"):
        t.fit()
    assert int(t.state["step"]) == 2 and t.ckpt.latest_step() == 2
    assert signal.getsignal(signal.SIGTERM) is not t._on_signal  # the handlers are restored
    assert signal.getsignal(signal.SIGINT) is not t._on_signal


def test_bad_rows_are_named_or_skipped_and_counted(tmp_path):
    folder = tmp_path / "data"
    path = make_records(folder, "train", 12, seed=0)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[2]["images"] = ["images/missing.png"]
    (folder / "images" / "corrupt.png").write_bytes(b"\x89PNG garbage")
    rows[4]["images"] = ["images/corrupt.png"]
    rows[6]["chosen"] = [{"role": "assistant", "content": "very long answer " * 40}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = config("trainer.steps=1", f"data.train=[{path}]", "data.synthetic=null", "data.max_length=120",
                 "data.batch_size=4")
    with pytest.raises(BadRowError, match=r"train.jsonl:(3|5|7): .*(missing.png|corrupt.png|too long)"):
        t = Trainer(cfg, tmp_path / "raise")
        [t.batches.next(t.state)[0] for _ in range(3)]
    t = Trainer(config("trainer.steps=1", f"data.train=[{path}]", "data.synthetic=null", "data.max_length=120",
                       "data.batch_size=4", "data.on_error=skip"), tmp_path / "skip")
    batches = [t.batches.next(t.state)[0] for _ in range(3)]  # 12 rows
    weights = np.concatenate([b["pair_weight"].reshape(-1) for b in batches])
    assert weights.sum() == 9 and sum(t.train_pipe.skipped.values()) == 3
    reasons = " ".join(t.train_pipe.skipped)
    assert "missing.png" in reasons and "corrupt.png" in reasons and "too long" in reasons
    rows[1]["rating"] = 5  # an unknown record field
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(ValueError, match=r"train.jsonl:2: .*rating"):
        Trainer(cfg, tmp_path / "unknown")


def test_share_prompt_layout_trains_like_two_rows(tmp_path):
    """data.share_prompt=true (one row per pair, the prompt computed once) gives the same losses, accuracies and
    gradient norms step by step as the two-row layout: the same computation, laid out differently."""
    a = Trainer(config("trainer.steps=2", "trainer.freeze=[vision,lm_head]"), tmp_path / "a")
    a.fit()
    b = Trainer(config("trainer.steps=2", "trainer.freeze=[vision,lm_head]", "data.share_prompt=true"), tmp_path / "b")
    batch = next(iter(b.train_pipe.dataset))
    assert batch["input_ids"].shape[1] == 8 and "branch_ids" in batch  # 8 pairs in 8 rows, not 16
    b.fit()
    ma, mb = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    # the run's per-image patch bound is a run setting: the saved model config does not keep it
    assert b.bundle.model.config.vision.max_image_patches == 64
    meta = json.loads((Path(b.finish()["checkpoint"]) / "skyjax.json").read_text())
    assert meta["model"]["vision"]["max_image_patches"] is None
    for step in (1, 2):
        for key in ("loss", "accuracy", "margin", "grad_norm"):
            assert mb[step][key] == pytest.approx(ma[step][key], rel=1e-4, abs=1e-6), (step, key)


def test_cpu_train_step_uses_xlas_own_dot_emitter(monkeypatch):
    """On a CPU mesh the train step is compiled with XLA's own dot emitter (skyjax.nn.runtime.train_compiler_options):
    the plain jit of the same step has YNNPACK fusions, the trainer's has none; a TPU target or a user's own YNN
    setting in XLA_FLAGS gets no override."""
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from skyjax.nn.runtime import train_compiler_options
    from skyjax.train.step import jit_train_step

    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    state, batch = {"w": jnp.ones((256, 256))}, jnp.ones((256, 256))

    def step(s, b):
        return {"w": s["w"] - 0.1 * jnp.tanh(s["w"] @ b) @ b}, jnp.sum(s["w"])

    plain = jax.jit(step).lower(state, batch).compile().as_text()
    ours = jit_train_step(step, {"w": NamedSharding(mesh, P())}, mesh).lower(state, batch).compile().as_text()
    ynn = re.compile(r"^\s*ROOT %ynn_fusion|^\s*%ynn_fusion[.\d]* = ", re.M)  # an instruction, not a name in metadata
    assert ynn.search(plain) and not ynn.search(ours)
    assert train_compiler_options("cpu") == {"xla_cpu_experimental_ynn_fusion_type": ""}
    assert train_compiler_options("tpu") is None
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=individual_dot")
    assert train_compiler_options("cpu") is None
