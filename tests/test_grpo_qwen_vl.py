"""kind: grpo on a tiny Qwen2.5-VL policy (a local transformers checkpoint): pi_old (the sampler's raw log-probs)
equals a fresh forward of the objective on the completion rows (left padding, several images per row, a prompt's
patches repeated for each completion, M-RoPE over the whole row), a sampled image placeholder cannot shift the other
rows' images, the first update's importance ratio is exactly 1, and what a run logs: the step's metrics, the
rollouts' host metrics and the completions table."""

import json

import jax
import numpy as np
import pytest

from helpers import random_image, tiny_hf_qwen2_5_vl
from skyjax.config import load_config
from skyjax.train.config import RunConfig

G = 3
QUESTIONS = [("Colour?", [(0, 60, 60)]), ("Which one is larger, left or right? Say why.", [(1, 90, 50), (2, 50, 70)]),
             ("Count.", [(3, 56, 56)]), ("What is it?", [(4, 70, 40), (5, 40, 70)])]


def parity_reward(rows):
    """A test reward: the fraction of even token ids in the completion (so the group's samples differ)."""
    return [float(np.mean([t % 2 == 0 for t in r.completion_ids])) if r.completion_ids else 0.0 for r in rows]


def write_prompts(root):
    """Four prompts (one or two images each, questions of different lengths) -> prompts.jsonl under root."""
    rows = []
    for i, (q, specs) in enumerate(QUESTIONS):
        names = []
        for seed, w, h in specs:
            random_image(seed, w, h).save(root / f"{i}_{seed}.png")
            names.append(f"{i}_{seed}.png")
        content = [{"type": "image"} for _ in names] + [{"type": "text", "text": q}]
        rows.append({"images": names, "prompt": [{"role": "user", "content": content}], "answer": "Red."})
    data = root / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


def make_policy(root):
    """A tiny random Qwen2.5-VL checkpoint folder (transformers layout, 2 LLM layers, 4 vision blocks)."""
    from skyjax.data.tokenizer import build_tiny_tokenizer

    folder = root / "policy"
    tiny_hf_qwen2_5_vl(folder, build_tiny_tokenizer("qwen2_5_vl"))
    return folder


def overrides(policy, data, *extra):
    return ["kind=grpo", f"model.source={policy}", f"data.train=[{data}]", "data.batch_size=4",
            "data.patch_buckets=[512]", "data.image_buckets=[16]", "optimizer.grad_accum=2", "trainer.steps=3",
            "trainer.progress=false", "trainer.export=false", "trainer.async_checkpointing=false",
            "trainer.log_every=1", "mesh.shape=[2,2,2]", f"rollout.num_generations={G}", "rollout.max_new_tokens=6",
            "rollout.temperature=1.0", "rollout.log_completions_every=1",
            f"rollout.rewards=[{{name: '{__name__}:parity_reward', weight: 0.5}}]", *extra]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo_qwen")
    return root, make_policy(root), write_prompts(root)


@pytest.fixture(scope="module")
def trainer(setup):
    from skyjax.train.trainer import Trainer

    root, policy, data = setup
    cfg = load_config(RunConfig, None, overrides(policy, data))
    return Trainer(cfg, root / "run", resume=False, log=lambda m: None)


def fresh_logps(trainer, batch):
    """The objective's log-probs of every micro-batch of `batch` with the trainer's parameters: [A, b, S]."""
    from skyjax.train.objectives.grpo import completion_logps
    from skyjax.train.optimizer import merge_params

    model = trainer.fn.bind(merge_params(trainer.state["trainable"], trainer.state["frozen"]))
    forward = jax.jit(completion_logps)
    return np.stack([np.asarray(forward(model, jax.tree.map(lambda x: x[i], batch)))
                     for i in range(batch["input_ids"].shape[0])])


def test_pi_old_equals_a_fresh_forward_on_qwen_rows_with_images(trainer):
    from skyjax.train.losses.advantages import group_advantages

    assert trainer.arch.name == "qwen2_5_vl"
    batch, row_ids = trainer.batches.next(trainer.state)
    a, b, s = batch["input_ids"].shape
    assert a * b == 4 * G and len(row_ids) == 4 * G
    pads = np.argmax(batch["attention_mask"], axis=-1).reshape(-1)  # left padding before each prompt
    assert len(set(pads.tolist())) > 1  # prompts of different lengths in one batch
    vision = batch["vision"]
    assert vision["pixel_values"].shape[:2] == (a, 512) and vision["image_grid_thw"].shape == (a, 16, 3)
    # every completion row carries its prompt's images: 6 images, each G times
    used = (np.prod(vision["image_grid_thw"], axis=-1) > 0).sum(axis=1)
    assert used.sum() == 6 * G and np.all(used % G == 0)
    cfg = trainer.bundle.model.config
    ids = batch["input_ids"].reshape(a * b, s)
    per_row = (ids == cfg.image_token_id).sum(axis=1)
    assert len(set(per_row.tolist())) > 1 and np.all(per_row.reshape(4, G) == per_row.reshape(4, G)[:, :1])
    assert batch["completion"].sum() > 0
    fresh = fresh_logps(trainer, batch)
    mask = batch["completion"]
    worst = float(np.max(np.abs(fresh[mask] - batch["old_logps"][mask])))
    assert worst <= 1e-5, worst
    # the weighted rewards (0.5 x parity) and their group advantages are what the batch carries
    rewards = batch["rewards"].reshape(-1)
    want, _ = group_advantages(jax.numpy.asarray(rewards), G, "group")
    np.testing.assert_allclose(batch["advantages"].reshape(-1), np.asarray(want), atol=1e-6)
    assert np.ptp(rewards) > 0  # the advantages are not all 0: the update below has a signal


def test_a_sampled_image_placeholder_cannot_shift_the_other_rows_images(trainer):
    """A completion that samples <|image_pad|> is cut there (its later tokens untrained, the placeholder fed as
    padding): every other row's log-probs still equal pi_old. Left in, the image-token check refuses the batch."""
    from skyjax.models.qwen2_5_vl import ImageTokenMismatchError
    from skyjax.train.grpo_rows import completion_vision, prompt_images

    src = trainer.batches
    examples = next(iter(src.pipeline.dataset))["prompts"]
    inputs, tokens, logps, lengths, stopped = src.generate(trainer.state, examples)
    image_id = trainer.bundle.model.config.image_token_id
    assert lengths[1] >= 3
    tokens = tokens.copy()
    tokens[1, 1] = image_id  # row 1 (prompt 0, sample 1) drew the placeholder as its second token
    rows = tokens.shape[0]
    batch = src.build_batch(examples, inputs, tokens, logps, lengths, stopped, np.ones(rows), np.zeros(rows))
    a, b, s = batch["input_ids"].shape
    ids = batch["input_ids"].reshape(a * b, s)
    completion = batch["completion"].reshape(a * b, s)
    start = s - tokens.shape[1]  # the completion's first column
    assert ids[1, start + 1] != image_id and ids[1, start] == tokens[1, 0]
    assert completion[1, start] and not completion[1, start + 1:].any()
    fresh = fresh_logps(trainer, batch)
    mask = batch["completion"]
    worst = float(np.max(np.abs(fresh[mask] - batch["old_logps"][mask])))
    assert worst <= 1e-5, worst
    raw = ids.copy()
    raw[1, start + 1] = image_id
    with pytest.raises(ImageTokenMismatchError, match="row 1"):
        completion_vision(src.fmt, prompt_images(inputs, [len(e.images) for e in examples]), raw, G, a, "test")


def test_first_update_has_ratio_one_and_the_run_logs_rollouts(setup):
    from skyjax.train.losses.advantages import group_advantages
    from skyjax.train.optimizer import flatten
    from skyjax.train.trainer import Trainer

    root, policy, data = setup
    trainer = Trainer(load_config(RunConfig, None, overrides(policy, data)), root / "logged", resume=False,
                      log=lambda m: None)
    before = {k: np.array(v) for k, v in flatten(trainer.state["trainable"]).items()}
    last = trainer.fit()
    assert last["ratio_max_dev"] <= 1e-5  # num_iterations 1: every step's ratio is exactly 1
    after = flatten(trainer.state["trainable"])
    assert any(not np.array_equal(before[k], np.asarray(after[k])) for k in before)
    vocab = trainer.bundle.model.config.text.vocab_size
    assert 0 < last["entropy"] <= np.log(vocab) + 1e-4
    for key in ("loss", "policy_loss", "clip_ratio/low_mean", "clip_ratio/high_mean", "reward", "frac_reward_zero_std",
                "completion_length", "truncated_fraction", "reward_std", "completion_length_max",
                "rewards/parity_reward/mean", "rewards/parity_reward/std", "rollout_tokens_per_s",
                "update_tokens_per_s", "placeholder_cut_fraction"):
        assert key in last and np.isfinite(last[key]), key
    assert last["rollout_tokens_per_s"] > 0 and last["update_tokens_per_s"] > 0
    assert 1 <= last["completion_length"] <= last["completion_length_max"] <= 6
    assert last["reward"] == pytest.approx(0.5 * last["rewards/parity_reward/mean"], rel=1e-5)

    # the completions table: every completion of every step's rollout, its rewards and group advantage
    lines = [json.loads(x) for x in (trainer.run_dir / "completions.jsonl").read_text().splitlines()]
    assert sorted({x["step"] for x in lines}) == [1, 2, 3] and len(lines) == 3 * 4 * G
    for step in (1, 2, 3):
        rows = [x for x in lines if x["step"] == step]
        assert len(rows) == 4 * G
        for k in range(4):  # a prompt's G completions together, with its text and its images
            group = rows[k * G:(k + 1) * G]
            assert len({x["row"] for x in group}) == 1 and len({x["prompt"] for x in group}) == 1
            (i,) = [n for n, (q, _) in enumerate(QUESTIONS) if q in group[0]["prompt"]]
            assert [p.split("/")[-1] for p in group[0]["images"]] == [f"{i}_{seed}.png" for seed, _, _ in
                                                                       QUESTIONS[i][1]]
        rewards = np.asarray([x["reward"] for x in rows])
        np.testing.assert_allclose(rewards, [0.5 * x["rewards"]["parity_reward"] for x in rows], rtol=1e-6)
        want, _ = group_advantages(jax.numpy.asarray(rewards), G, "group")
        np.testing.assert_allclose([x["advantage"] for x in rows], np.asarray(want), atol=1e-5)
        assert all(isinstance(x["completion"], str) and 1 <= x["length"] <= 6 for x in rows)
