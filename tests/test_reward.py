"""Reward model: scores vs transformers + the Skywork card's value head, the Bradley-Terry loss and its gradient,
release-layout conversion and export, scoring from the command line, and bad rows."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from helpers import random_image, rel_error, tiny_hf_qwen2_5_vl
from skyjax.cli import main as cli
from skyjax.convert.checkpoint import export_hf, load_hf, save_checkpoint
from skyjax.data.qwen_vl_image import QwenVLImageConfig
from skyjax.data.tokenizer import build_tiny_tokenizer, load_tokenizer
from skyjax.models.qwen2_5_vl_inputs import prepare_vl_batch
from skyjax.models.reward import last_token_index
from skyjax.train.config import RewardModelObjectiveConfig
from skyjax.train.objectives import bradley_terry


@pytest.fixture(scope="module")
def reward_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reward")
    tok = build_tiny_tokenizer("qwen2_5_vl")
    hf = tiny_hf_qwen2_5_vl(folder, tok)
    rng = np.random.RandomState(0)
    head = {"v_head.summary.weight": rng.normal(0, 0.5, (1, 64)).astype(np.float32),
            "v_head.summary.bias": np.array([0.3], np.float32)}
    save_file(head, str(folder / "value_head.safetensors"))
    return folder, hf, head


def conv(question, answer, image=True):
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": question}]
    return [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]


def reference_scores(hf, head, batch):
    """The Skywork card's computation on the transformers model: value head on the final post-norm hidden state of
    the last real token, in fp32 (gathered at the rightmost real token, which is right for either padding side)."""
    import torch

    kw = dict(input_ids=torch.as_tensor(batch.input_ids, dtype=torch.long),
              attention_mask=torch.as_tensor(batch.attention_mask.astype(np.int64)),
              mm_token_type_ids=torch.as_tensor(batch.mm_token_type_ids, dtype=torch.long),
              pixel_values=torch.as_tensor(batch.real_pixel_values),
              image_grid_thw=torch.as_tensor(batch.real_grid_thw, dtype=torch.long))
    with torch.no_grad():
        hidden = hf.model(**kw).last_hidden_state.float().numpy()  # post-norm
    last = np.array([np.nonzero(m)[0].max() for m in batch.attention_mask])
    picked = hidden[np.arange(len(last)), last]
    return picked @ head["v_head.summary.weight"][0] + head["v_head.summary.bias"][0]


@pytest.mark.parametrize("side", ["right", "left"])
def test_scores_match_reference(reward_folder, side):
    folder, hf, head = reward_folder
    model = load_hf(folder)
    assert model.arch.name == "qwen2_5_vl_reward"  # detected from value_head.safetensors
    convs = [conv("What colour?", "Red."), conv("And this much longer question about the picture?", "Blue, I think.")]
    images = [[random_image(0, 84, 112)], [random_image(1, 140, 84)]]
    batch = prepare_vl_batch(convs, images, load_tokenizer(folder), QwenVLImageConfig.from_folder(folder),
                             model.config.vision, pad_side=side)
    assert len(np.unique(batch.attention_mask.sum(1))) == 2  # really padded
    ours = np.asarray(jax.jit(lambda p, i, kw: model.fn.bind(p).score(i, **kw))(
        model.params, jnp.asarray(batch.input_ids), batch.model_kwargs()))
    ref = reference_scores(hf, head, batch)
    assert rel_error(ours, ref) <= 1e-5
    assert ours.dtype == np.float32


def test_last_token_index_either_side():
    mask = jnp.array([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], bool)
    assert last_token_index(mask).tolist() == [2, 4, 4]


def test_bradley_terry_loss_and_gradient_match_torch():
    import torch

    rng = np.random.RandomState(0)
    c, r = rng.normal(size=16).astype(np.float32) * 3, rng.normal(size=16).astype(np.float32) * 3
    w = (rng.rand(16) > 0.2).astype(np.float32)
    for cfg in (RewardModelObjectiveConfig(), RewardModelObjectiveConfig(margin=0.5, center_coef=0.01)):
        loss, grads = jax.value_and_grad(lambda a, b: bradley_terry(a, b, jnp.asarray(w), cfg)[0], argnums=(0, 1))(
            jnp.asarray(c), jnp.asarray(r))
        tc, tr = torch.tensor(c, requires_grad=True), torch.tensor(r, requires_grad=True)
        tw = torch.tensor(w)
        per = -torch.nn.functional.logsigmoid(tc - tr - cfg.margin) + cfg.center_coef * (tc + tr) ** 2
        ref = (per * tw).sum() / tw.sum()
        ref.backward()
        assert abs(float(loss) - ref.item()) <= 1e-6
        np.testing.assert_allclose(np.asarray(grads[0]), tc.grad.numpy(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(np.asarray(grads[1]), tr.grad.numpy(), rtol=1e-5, atol=1e-7)
    _, sums = bradley_terry(jnp.array([1.0, 2.0, 0.5]), jnp.array([1.0, 1.0, 1.0]), jnp.ones(3), RewardModelObjectiveConfig())
    assert float(sums["accuracy"]) == 1.0  # the tie (1 vs 1) and the loss (0.5 vs 1) count as wrong


def test_release_layout_round_trip_and_score_cli(reward_folder, tmp_path):
    folder, _, head = reward_folder
    model = load_hf(folder)
    save_checkpoint(tmp_path / "ckpt", model)
    out = export_hf(model, tmp_path / "hf")
    assert (out / "value_head.safetensors").is_file()
    from safetensors.numpy import load_file

    exported = load_file(str(out / "value_head.safetensors"))
    assert set(exported) == set(head)
    for k in head:
        np.testing.assert_array_equal(exported[k], head[k])
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "np") as f:
        assert not any(k.startswith("v_head") for k in f.keys())  # the head lives in its own file, as released

    data = tmp_path / "rows.jsonl"
    (tmp_path / "img").mkdir()
    random_image(3, 84, 84).save(tmp_path / "img" / "a.png")
    rows = [{"id": 1, "images": ["img/a.png"], "prompt": "Describe.", "chosen": "A red square.",
             "rejected": "A blue circle."},
            {"id": 2, "images": ["img/a.png"], "prompt": "Describe.", "response": "A red square."},
            {"id": 3, "prompt": "Text only?", "response": "Yes."}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    scored = {}
    for name, src in (("hf", out), ("ckpt", tmp_path / "ckpt")):
        dst = tmp_path / f"scored_{name}.jsonl"
        assert cli(["score", "--model", str(src), "--data", str(data), "--out", str(dst), "--batch-size", "2",
                    "--mesh", "1,1,1"]) == 0
        scored[name] = [json.loads(line) for line in dst.read_text().splitlines()]
    a, b = scored["hf"], scored["ckpt"]
    assert [r["id"] for r in a] == [1, 2, 3] and a[0]["prompt"] == "Describe."
    assert a[0]["score_chosen"] == pytest.approx(a[1]["score"], rel=1e-5)  # same conversation, same score
    for ra, rb in zip(a, b):
        for k in ("score", "score_chosen", "score_rejected"):
            if k in ra:
                assert ra[k] == pytest.approx(rb[k], rel=1e-5)


def test_score_cli_bad_rows(reward_folder, tmp_path, capsys):
    folder, _, _ = reward_folder
    (tmp_path / "bad.png").write_bytes(b"not a png")
    rows = [{"prompt": "ok", "response": "fine"},
            {"images": ["missing.png"], "prompt": "x", "response": "y"},
            {"images": ["bad.png"], "prompt": "x", "response": "y"},
            {"prompt": "x", "response": "y", "bogus": 1}]
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out.jsonl"
    assert cli(["score", "--model", str(folder), "--data", str(data), "--out", str(out), "--mesh", "1,1,1"]) == 2
    err = capsys.readouterr().err
    assert "rows.jsonl:4" in err and "bogus" in err  # unknown record field, named with its line
    assert cli(["score", "--model", str(folder), "--data", str(data), "--out", str(out), "--mesh", "1,1,1",
                "--on-error", "skip"]) == 0
    err = capsys.readouterr().err
    assert "rows.jsonl:2" in err and "missing.png" in err
    assert "rows.jsonl:3" in err and "bad.png" in err
    assert "skipped 3" in err
    assert len(out.read_text().splitlines()) == 1


def test_shared_prompt_layout_scores_equal_the_two_row_layout_and_transformers(reward_folder, tmp_path):
    """data.share_prompt: one row per pair [prompt | chosen tail | rejected tail] gives the scores of the two-row
    layout (pair_scores) and of transformers on each (prompt + response) row alone, for pairs with one and two
    images of different sizes, tails of different lengths, a text-only pair and a response that extends the other."""
    from skyjax.data.qwen_vl_image import load_image
    from skyjax.data.records import read_jsonl_records
    from skyjax.train.objectives import pair_scores, shared_prompt_scores
    from skyjax.train.pairs import PairBuckets, collate_pairs, collate_shared_prompt, featurize_pair

    folder, hf, head = reward_folder
    model = load_hf(folder)
    tok, image_cfg = load_tokenizer(folder), QwenVLImageConfig.from_folder(folder)
    (tmp_path / "images").mkdir()
    for i, (w, h) in enumerate([(84, 112), (140, 84), (56, 56)]):
        random_image(i, h, w).save(tmp_path / "images" / f"{i}.png")

    def record(i, images, question, chosen, rejected):
        content = [{"type": "image"}] * len(images) + [{"type": "text", "text": question}]
        return {"id": f"p{i}", "images": [f"images/{k}.png" for k in images],
                "prompt": [{"role": "user", "content": content}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}]}

    rows = [record(0, [0], "What colour?", "Red, with a small blue square in the corner.", "Green."),
            record(1, [1, 2], "Which is larger?", "Left.", "The right one, clearly."),
            record(2, [], "Say hi.", "Hi", "Hi there, nice to meet you."),
            record(3, [2], "Count?", "Three.", "Three.")]  # identical responses: equal scores
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = list(read_jsonl_records(path, kind="preference"))
    examples = [featurize_pair(r, tok, image_cfg) for r in records]
    buckets = PairBuckets(seq=(128, 256), patches=(512,), images=(4,))
    shared = collate_shared_prompt(examples, model.config.vision, buckets, tok.pad_token_id)
    two_rows = collate_pairs(examples, model.config.vision, buckets, tok.pad_token_id)
    assert shared["input_ids"].shape[1] == 4 and shared["score_index"].shape == (1, 4, 2)  # one row per pair
    first = lambda b: jax.tree.map(lambda x: jnp.asarray(x[0]), {k: v for k, v in b.items() if k != "row_ids"})  # noqa: E731
    run = lambda f: jax.jit(lambda p, b: f(model.fn.bind(p), b))  # noqa: E731
    c1, r1 = map(np.asarray, run(shared_prompt_scores)(model.params, first(shared)))
    c2, r2 = map(np.asarray, run(pair_scores)(model.params, first(two_rows)))
    assert rel_error(c1, c2) <= 1e-5 and rel_error(r1, r2) <= 1e-5
    assert c1[3] == pytest.approx(r1[3], rel=1e-6)

    # transformers on every (prompt + response) row alone
    for key, ours in (("chosen", c1), ("rejected", r1)):
        convs = [r.conversation(key) for r in records]
        images = [[load_image(p) for p in r.images] for r in records]
        batch = prepare_vl_batch(convs, images, tok, image_cfg, model.config.vision)
        assert rel_error(ours, reference_scores(hf, head, batch)) <= 1e-5, key

    # the shared row is shorter than the two rows it replaces
    assert shared["attention_mask"].sum() < two_rows["attention_mask"].sum()
