"""The train-step seam post-training objectives stand on: a frozen reference of the trainable subtree and objective
state in the train state (created, threaded through the micro-batch scan, checkpointed, resumed, restored onto
another mesh, compiled ahead of time), the batch source the trainer loops over, and the per-objective config keys.

The objective under test is registered here (nothing in skyjax uses it): Bradley-Terry on the policy's reward scores
relative to the reference's (DPO's shape on a reward model), keeping a running mean of the reference's margin as
MPO keeps BCO's delta (`BCODeltaState`), updated once per micro-batch."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from skyjax.config import ConfigError, load_config
from skyjax.convert.checkpoint import save_checkpoint
from skyjax.parallel.mesh import make_mesh
from skyjax.train import tasks as tasks_mod
from skyjax.train.batch_source import PipelineSource
from skyjax.train.config import ModelConfig, RunConfig
from skyjax.train.losses.preference import BCODeltaState
from skyjax.train.objectives import Objective, bradley_terry, pair_scores
from skyjax.train.optimizer import flatten, merge_params
from skyjax.train.setup import tiny_reward_model
from skyjax.train.trainer import Trainer

BASE = ["model.tiny_layers=1", "model.tiny_vision_depth=2", "data.synthetic.train=48", "data.synthetic.heldout=8",
        "data.synthetic.image_size=56", "data.batch_size=8", "optimizer.grad_accum=2", "data.seq_buckets=[128]",
        "data.patch_buckets=[256]", "data.image_buckets=[16]", "trainer.steps=4", "trainer.log_every=1",
        "trainer.progress=false", "trainer.export=false", "trainer.eval_batch_size=8",
        "trainer.async_checkpointing=false", "optimizer.lr=1e-3", "optimizer.warmup_steps=0", "mesh.shape=[2,2,2]",
        "trainer.freeze=[vision,lm_head]"]


def config(*extra):
    return load_config(RunConfig, "configs/demo/reward_model.yaml", [*BASE, *extra])


def host(tree):
    return {k: np.array(v) for k, v in flatten(tree).items()}


def reference_margin(model, batch):
    """Weighted mean over the micro-batch's pairs of the model's chosen - rejected score (fp32)."""
    chosen, rejected = pair_scores(model, batch)
    w = batch["pair_weight"].astype(jnp.float32)
    return jnp.sum((chosen - rejected).astype(jnp.float32) * w) / jnp.maximum(jnp.sum(w), 1.0)


def relative_loss(model, batch, settings, *, reference, state):
    chosen, rejected = pair_scores(model, batch)
    ref_chosen, ref_rejected = pair_scores(reference, batch)
    loss, sums = bradley_terry(chosen - ref_chosen, rejected - ref_rejected, batch["pair_weight"], settings)
    margin = reference_margin(reference, batch)
    sums["delta_used"] = state.total / jnp.maximum(state.batches, 1.0) * sums["weight"]  # the state it was given
    return loss, sums, BCODeltaState(state.total + margin, state.batches + 1.0)


PROBE = Objective("relative_probe", relative_loss, needs_reference=lambda settings: True,
                  init_state=lambda settings: BCODeltaState(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)),
                  section="reward_model")


class RecordingSource(PipelineSource):
    """The pipeline's batches, noting the step of the state each call is given."""

    def __init__(self, pipeline):
        super().__init__(pipeline)
        self.steps_seen = []

    def next(self, state):
        self.steps_seen.append(int(state["step"]))
        return super().next(state)


@pytest.fixture
def probe_task(monkeypatch):
    """kind reward_model runs the probe objective (and a recording batch source) for this test."""
    task = dataclasses.replace(tasks_mod.TASKS["reward_model"], objective=PROBE,
                               batch_source=lambda pipe, bundle, cfg, trainer=None: RecordingSource(pipe))
    monkeypatch.setitem(tasks_mod.TASKS, "reward_model", task)
    return task


def independent_state(cfg, run_dir, steps):
    """The probe's state after `steps` steps, computed outside the train step: a fresh trainer's step-0 parameters
    (the reference) scored on the same batches, one micro-batch at a time."""
    t = Trainer(cfg, run_dir)
    fn = t.fn
    params = merge_params(t.state["trainable"], t.state["frozen"])
    margin = jax.jit(lambda p, mb: reference_margin(fn.bind(p), mb))
    total, batches = 0.0, 0
    for _ in range(steps):
        batch, _ = t.batches.next(t.state)
        for a in range(cfg.optimizer.grad_accum):
            mb = jax.tree.map(lambda x: jnp.asarray(x[a]), batch)
            total += float(margin(params, mb))
            batches += 1
    return total, batches


def test_reference_and_objective_state_through_training_resume_and_another_mesh(tmp_path, probe_task):
    cfg = config()
    a = Trainer(cfg, tmp_path / "a")
    assert set(a.state) == {"step", "trainable", "frozen", "opt", "reference", "objective"}
    trainable0, frozen0 = host(a.state["trainable"]), host(a.state["frozen"])
    reference0 = host(a.state["reference"])
    # the reference is the trainable subtree only: frozen parameters are shared with the policy, never copied
    assert sorted(reference0) == sorted(trainable0) and not set(reference0) & set(frozen0)
    assert any(k.startswith("visual/") for k in frozen0) and "lm_head/kernel" in frozen0
    for k in trainable0:
        np.testing.assert_array_equal(reference0[k], trainable0[k], err_msg=k)
    # sharded like the trainable parameters, in buffers of its own (the step donates the policy's)
    for ref, own in zip(jax.tree.leaves(a.state["reference"]), jax.tree.leaves(a.state["trainable"])):
        assert ref.sharding == own.sharding
        pointer = lambda x: x.addressable_shards[0].data.unsafe_buffer_pointer()  # noqa: E731
        assert pointer(ref) != pointer(own)

    a.fit(max_steps=2)
    a.save(wait=True)
    other_mesh = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, shape=(1, 4, 2)))
    b = Trainer(other_mesh, tmp_path / "a")  # the same run folder, resumed onto another mesh shape
    assert b.start_step == 2 and b.mesh.devices.shape != a.mesh.devices.shape
    resumed_state = jax.tree.map(np.asarray, b.state["objective"])
    np.testing.assert_array_equal(resumed_state.total, np.asarray(a.state["objective"].total))
    assert float(resumed_state.batches) == 4.0  # 2 steps of 2 micro-batches
    b.fit()
    assert b.batches.steps_seen == [2, 3]  # the source is given the state of the step about to run

    c = Trainer(cfg, tmp_path / "c")  # uninterrupted
    c.fit()
    assert c.batches.steps_seen == [0, 1, 2, 3]
    rows = lambda d: {r["step"]: r for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())  # noqa
                      if r["split"] == "train"}
    ra, rc = rows(tmp_path / "a"), rows(tmp_path / "c")
    for step in (1, 2, 3, 4):
        for key in ("loss", "accuracy", "grad_norm", "delta_used"):
            np.testing.assert_allclose(ra[step][key], rc[step][key], rtol=2e-5, atol=1e-7, err_msg=(step, key))
    assert rc[1]["delta_used"] != rc[4]["delta_used"]  # the state moves and the loss sees it

    # after training: the reference is still the step-0 policy, while the policy moved
    for t in (b, c):
        after, ref = host(t.state["trainable"]), host(t.state["reference"])
        for k in reference0:
            np.testing.assert_array_equal(ref[k], reference0[k], err_msg=k)
        assert sum(not np.array_equal(after[k], trainable0[k]) for k in trainable0) >= len(trainable0) - 1
    np.testing.assert_allclose(np.asarray(b.state["objective"].total), np.asarray(c.state["objective"].total),
                               rtol=1e-5)

    # the objective state after 4 steps is the running sum over every micro-batch of the reference's margin
    total, batches = independent_state(cfg, tmp_path / "independent", 4)
    assert batches == 8 and float(c.state["objective"].batches) == 8.0
    np.testing.assert_allclose(float(c.state["objective"].total), total, rtol=1e-4, atol=1e-6)
    assert abs(total) > 1e-4  # not trivially zero


def test_reference_free_objectives_keep_no_reference(tmp_path):
    t = Trainer(config("trainer.steps=1"), tmp_path / "rm")
    assert set(t.state) == {"step", "trainable", "frozen", "opt"}
    assert set(t.state_shardings) == set(t.state)


def test_reference_source_loads_the_trainable_subtree_and_checks_shapes(tmp_path, probe_task):
    mesh = make_mesh((1, 1, 1))
    other = tiny_reward_model(ModelConfig(tiny_layers=1, tiny_vision_depth=2, tiny_init_std=0.1, seed=7), mesh,
                              tmp_path / "tok")
    ckpt = save_checkpoint(tmp_path / "other", other.model)
    t = Trainer(config("trainer.steps=1", f"reference.source={ckpt}"), tmp_path / "run")
    want = {k: np.asarray(v) for k, v in flatten(other.model.params).items()}
    ref, policy = host(t.state["reference"]), host(t.state["trainable"])
    assert sorted(ref) == sorted(policy)
    for k in ref:
        np.testing.assert_array_equal(ref[k], want[k], err_msg=k)
    assert not np.array_equal(ref["v_head/summary/kernel"], policy["v_head/summary/kernel"])  # not the policy's

    narrow = tiny_reward_model(ModelConfig(tiny_layers=1, tiny_vision_depth=2, tiny_hidden=32), mesh,
                               tmp_path / "tok2")
    bad = save_checkpoint(tmp_path / "narrow", narrow.model)
    with pytest.raises(ConfigError, match=r"reference\.source .*narrow: parameter [\w/]+ has shape \(\d+(, \d+)*\), "
                                          r"the policy's is"):
        Trainer(config("trainer.steps=1", f"reference.source={bad}"), tmp_path / "run2")


def test_aot_state_holds_the_reference_and_the_step_lowers(probe_task):
    from skyjax.train.aot import build_run_step

    jitted, (state, batch), _, _ = build_run_step("configs/demo/reward_model.yaml", [*BASE, "mesh.shape=[1,4,2]"],
                                                  make_mesh((1, 4, 2)))
    assert set(state) == {"step", "trainable", "frozen", "opt", "reference", "objective"}
    assert sorted(flatten(state["reference"])) == sorted(flatten(state["trainable"]))
    for ref, own in zip(jax.tree.leaves(state["reference"]), jax.tree.leaves(state["trainable"])):
        assert (ref.shape, ref.dtype, ref.sharding) == (own.shape, own.dtype, own.sharding)
    assert isinstance(state["objective"], BCODeltaState)
    lowered = jitted.lower(state, batch)
    new_state = lowered.out_info[0]
    assert set(new_state) == set(state) and isinstance(new_state["objective"], BCODeltaState)


@pytest.mark.parametrize("old, new", [("objective.margin=0.5", "objective.reward_model.margin"),
                                      ("objective.center_coef=0.1", "objective.reward_model.center_coef"),
                                      ("objective.sft_average=sequence", "objective.sft.average"),
                                      ("objective.logits_chunk=64", "objective.sft.logits_chunk")])
def test_flat_objective_keys_name_their_new_key(old, new):
    with pytest.raises(ConfigError, match=rf"^[^\n]*{old.split('=')[0]} was renamed: use {new}$"):
        load_config(RunConfig, "configs/demo/reward_model.yaml", [old])
    key, value = new, old.split("=")[1]
    cfg = load_config(RunConfig, "configs/demo/reward_model.yaml", [f"{key}={value}"])
    section, name = key.split(".")[1:]
    assert str(getattr(getattr(cfg.objective, section), name)) == value


def test_reference_and_objective_sections_are_checked(tmp_path):
    yaml = tmp_path / "old.yaml"
    yaml.write_text("kind: sft\ndata:\n  synthetic: {}\nobjective:\n  sft_average: token\n")
    with pytest.raises(ConfigError, match=r"objective\.sft_average was renamed: use objective\.sft\.average"):
        load_config(RunConfig, yaml)
    with pytest.raises(ConfigError, match=r"objective\.sft\.logits_chunk=-1 is out of range"):
        load_config(RunConfig, "configs/sft/r1v_tiny.yaml", ["objective.sft.logits_chunk=-1"])
    with pytest.raises(ConfigError, match=r"objective\.sft\.average: 'mean' is not one of"):
        load_config(RunConfig, "configs/sft/r1v_tiny.yaml", ["objective.sft.average=mean"])
    with pytest.raises(ConfigError, match=r"reference\.source=' ' is out of range"):
        load_config(RunConfig, "configs/sft/r1v_tiny.yaml", ["reference.source=' '"])
    cfg = load_config(RunConfig, "configs/sft/r1v_tiny.yaml", ["reference.precompute=true"])
    assert cfg.reference.precompute is True and cfg.reference.source is None
