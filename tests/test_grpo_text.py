"""kind: grpo on a text-only Qwen2 policy (a Hugging Face Qwen2ForCausalLM folder, skyjax.train.grpo_text): the
rollout samples it with the Qwen2 decode adapter, pi_old (the sampler's raw log-probs) equals the objective's fresh
forward on left-padded rows of different lengths, the first update's ratio is 1 and the policy moves; a prompt row
with an image is an error naming the row."""

import json

import jax
import numpy as np
import pytest

from helpers import random_image
from skyjax.config import load_config
from skyjax.train.config import RunConfig

G = 3
SHAPES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=512)


def token_count_reward(rows):
    """A test reward: how many completion tokens are odd ids (so the group's samples differ)."""
    return [float(sum(t % 2 for t in r.completion_ids)) for r in rows]


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    from skyjax.data.tokenizer import build_tiny_tokenizer
    from skyjax.train.mpo_bench import save_policy
    from skyjax.train.trainer import Trainer

    root = tmp_path_factory.mktemp("grpo_text")
    folder = root / "policy"
    tok = build_tiny_tokenizer("qwen2", out_dir=folder)
    assert len(tok) <= SHAPES["vocab_size"]
    save_policy(folder, SHAPES, 0, tok.pad_token_id)
    questions = ["Two plus two?", "Name a colour that is neither red nor blue, and say why it is not.", "Hi.",
                 "Which is larger: seven or three?"]
    data = root / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": q}], "answer": "4"}) + "\n"
                            for q in questions))
    cfg = load_config(RunConfig, None, [
        "kind=grpo", f"model.source={folder}", f"data.train=[{data}]", "data.batch_size=4", "optimizer.lr=1e-3",
        "optimizer.grad_accum=2", "trainer.steps=1", "trainer.freeze=[]", "trainer.progress=false",
        "trainer.export=false", "trainer.async_checkpointing=false", "mesh.shape=[2,1,1]",
        f"rollout.num_generations={G}", "rollout.max_new_tokens=6", "rollout.temperature=1.0",
        f"rollout.rewards=[{{name: '{__name__}:token_count_reward'}}]"])
    return Trainer(cfg, root / "run", resume=False, log=lambda m: None)


def test_text_policy_pi_old_equals_a_fresh_forward(trainer):
    from skyjax.train.objectives.grpo import completion_logps
    from skyjax.train.optimizer import merge_params

    assert trainer.arch.name == "qwen2" and trainer.batches.adapter.name == "qwen2"
    batch, row_ids = trainer.batches.next(trainer.state)
    a, b, s = batch["input_ids"].shape
    assert a * b == 4 * G and len(row_ids) == 4 * G and "vision" not in batch
    pads = np.argmax(batch["attention_mask"], axis=-1).reshape(-1)
    assert len(set(pads.tolist())) > 1  # prompts of different lengths, left padded
    assert batch["completion"].sum() > 0
    model = trainer.fn.bind(merge_params(trainer.state["trainable"], trainer.state["frozen"]))
    forward = jax.jit(completion_logps)
    worst = 0.0
    for i in range(a):
        mb = jax.tree.map(lambda x: x[i], batch)
        fresh = np.asarray(forward(model, mb))
        mask = mb["completion"]
        worst = max(worst, float(np.max(np.abs(fresh[mask] - mb["old_logps"][mask]))))
    assert worst <= 1e-5, worst
    odd = [sum(t % 2 for t in row) for row in np.where(batch["completion"][..., -6:], batch["input_ids"][..., -6:],
                                                        0).reshape(-1, 6).tolist()]
    np.testing.assert_allclose(batch["rewards"].reshape(-1), odd)  # the reward saw the completion's tokens


def test_text_policy_trains(trainer):
    from skyjax.train.optimizer import flatten

    before = {k: np.array(v) for k, v in flatten(trainer.state["trainable"]).items()}
    last = trainer.fit()
    assert last["ratio_max_dev"] <= 1e-5 and np.isfinite(last["loss"]) and last["completion_length"] > 0
    after = flatten(trainer.state["trainable"])
    assert any(not np.array_equal(before[k], np.asarray(after[k])) for k in before)


def test_text_policy_refuses_a_row_with_an_image(trainer, tmp_path):
    from skyjax.data.records import parse_record
    from skyjax.train.batching import BadRowError
    from skyjax.train.grpo import PromptExample

    random_image(0, 32, 32).save(tmp_path / "a.png")
    record = parse_record({"images": ["a.png"], "prompt": [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "What?"}]}]}, kind="generate", base_dir=tmp_path,
        source="p.jsonl", line=7)
    example = PromptExample("p.jsonl:7", "p.jsonl:7", record, [random_image(0, 32, 32)])
    with pytest.raises(BadRowError, match=r"p\.jsonl:7: 1 image\(s\), but the policy is a text-only qwen2 model"):
        trainer.batches.generate(trainer.state, [example])
