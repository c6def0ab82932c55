"""kind: grpo on a tiny Skywork R1V policy: rollouts drawn with the train state's own parameters, pi_old (the
sampler's raw log-probs) equal to a fresh forward of the objective on the same rows (left padding, several images
per row, tiles repeated per completion), rewards by dotted path and group advantages wired into the batch, and the
first update's importance ratio exactly 1."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from helpers import random_image
from skyjax.config import load_config
from skyjax.train.config import RunConfig

G = 3


def length_reward(rows, *, scale=1.0):
    """A test reward: the completion's length in tokens (so the group's samples differ)."""
    return [scale * len(r.completion_ids) for r in rows]


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    from skyjax.train.trainer import Trainer

    root = tmp_path_factory.mktemp("grpo")
    rows = []
    questions = [("Colour?", [(0, 60, 60)]), ("Which one is larger, left or right? Say why.", [(1, 90, 50), (2, 50, 70)]),
                 ("Count.", [(3, 56, 56)]), ("What is it?", [(4, 70, 40), (5, 40, 70)])]
    for i, (q, specs) in enumerate(questions):
        names = []
        for seed, w, h in specs:
            random_image(seed, w, h).save(root / f"{i}_{seed}.png")
            names.append(f"{i}_{seed}.png")
        content = [{"type": "image"} for _ in names] + [{"type": "text", "text": q}]
        rows.append({"images": names, "prompt": [{"role": "user", "content": content}], "answer": "Red."})
    data = root / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(RunConfig, None, [
        "kind=grpo", "model.source=tiny", "model.tiny_layers=2", "model.tiny_vision_depth=2",
        "model.tiny_init_std=0.2", f"data.train=[{data}]", "data.batch_size=4", "data.max_tiles=1",
        "data.tile_buckets=[16]", "optimizer.grad_accum=2", "trainer.steps=2", "trainer.progress=false",
        "trainer.export=false", "trainer.async_checkpointing=false", "mesh.shape=[2,2,2]",
        f"rollout.num_generations={G}", "rollout.max_new_tokens=6", "rollout.temperature=1.0",
        f"rollout.rewards=[{{name: '{__name__}:length_reward', weight: 0.5, options: {{scale: 2.0}}}}]"])
    return Trainer(cfg, root / "run", resume=False, log=lambda m: None)


def test_pi_old_equals_a_fresh_forward_and_advantages_are_the_groups(trainer):
    from skyjax.train.losses.advantages import group_advantages
    from skyjax.train.objectives.grpo import completion_logps
    from skyjax.train.optimizer import merge_params

    batch, row_ids = trainer.batches.next(trainer.state)
    a, b, s = batch["input_ids"].shape
    assert a * b == 4 * G and len(row_ids) == 4 * G
    pads = np.argmax(batch["attention_mask"], axis=-1).reshape(-1)  # left padding before each prompt
    assert len(set(pads.tolist())) > 1  # prompts of different lengths in one batch
    assert batch["vision"]["pixel_values"].shape[:2] == (a, 16)
    assert batch["completion"].sum() > 0
    model = trainer.fn.bind(merge_params(trainer.state["trainable"], trainer.state["frozen"]))
    worst = 0.0
    forward = jax.jit(completion_logps)
    for i in range(a):
        mb = jax.tree.map(lambda x: x[i], batch)
        fresh = np.asarray(forward(model, mb))
        mask = mb["completion"]
        worst = max(worst, float(np.max(np.abs(fresh[mask] - mb["old_logps"][mask]))))
    assert worst <= 1e-5, worst
    # the weighted rewards (0.5 * 2 * tokens) and their group advantages are what the batch carries
    lengths = batch["lengths"].reshape(-1)
    np.testing.assert_allclose(batch["rewards"].reshape(-1), 0.5 * 2.0 * lengths)
    want, _ = group_advantages(jax.numpy.asarray(batch["rewards"].reshape(-1)), G, "group")
    np.testing.assert_allclose(batch["advantages"].reshape(-1), np.asarray(want), atol=1e-6)


def test_first_update_has_ratio_one_and_the_policy_moves(trainer):
    from skyjax.train.optimizer import flatten

    before = {k: np.array(v) for k, v in flatten(trainer.state["trainable"]).items()}
    last = trainer.fit()
    assert last["ratio_max_dev"] <= 1e-5
    assert np.isfinite(last["loss"]) and last["completion_length"] > 0
    after = flatten(trainer.state["trainable"])
    assert any(not np.array_equal(before[k], np.asarray(after[k])) for k in before)


def test_dr_grpo_divides_by_the_completion_budget_not_the_row_width(monkeypatch):
    """TRL's dr_grpo: sum of the token losses / (rows x max_completion_length); here rollout.max_new_tokens, however
    wide the prompt part of the row is."""
    import jax.numpy as jnp

    from skyjax.train.objectives import grpo as objective

    cfg = load_config(RunConfig, None, ["kind=grpo", "model.source=tiny", "data.train=[x.jsonl]",
                                        "rollout.max_new_tokens=6", "objective.grpo.loss_type=dr_grpo"])
    assert cfg.objective.grpo.max_completion_length == 6
    rng = np.random.RandomState(0)
    b, s = 4, 20  # 14 prompt columns + 6 completion columns
    logps = jnp.asarray(-rng.rand(b, s), jnp.float32)
    completion = np.zeros((b, s), bool)
    completion[:, 14:] = rng.rand(b, 6) < 0.8
    batch = {"input_ids": jnp.zeros((b, s), jnp.int32), "completion": jnp.asarray(completion),
             "old_logps": logps, "advantages": jnp.asarray(rng.randn(b), jnp.float32),
             "row_weight": jnp.ones(b, jnp.float32)}
    monkeypatch.setattr(objective, "completion_logps", lambda model, batch, chunk=0: logps)
    loss, _, _ = objective.grpo_objective(None, batch, cfg.objective.grpo)
    # ratio 1: each counted token's loss is -A
    expected = float(np.sum(-np.asarray(batch["advantages"])[:, None] * completion)) / (b * 6)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
