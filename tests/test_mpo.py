"""kind: mpo end to end on a tiny Skywork R1V policy: the step's logged MPO terms against an independent transformers
computation (two rows per pair, HF InternVL models for the policy and a DIFFERENT reference), the shared-prompt row
layout, the precomputed reference, BCO's running delta across steps and resume, and bad pairs named by file and line.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from helpers import random_image, tiny_hf_internvl
from skyjax.config import load_config
from skyjax.data.chat import format_conversation
from skyjax.data.internvl_image import tile_images
from skyjax.data.tokenizer import build_tiny_tokenizer
from skyjax.train.batching import BadRowError
from skyjax.train.config import RunConfig

BETA = 0.1
PAIRS = [  # (question, images, chosen, rejected): shared response prefixes, two images, text only, unequal lengths
    ("What colour is the shape?", [(0, 60, 60)], "The answer is red.", "The answer is blue, I think."),
    ("Which one is larger?", [(1, 70, 50), (2, 50, 70)], "The first.", "Neither of them."),
    ("What is 2 + 3?", [], "5", "It is 6."),
    ("Describe the image.", [(3, 64, 64)], "A square on grey.", "A cat."),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("mpo")
    tok = build_tiny_tokenizer("internvl")
    policy, reference = root / "policy", root / "reference"
    hf_policy = tiny_hf_internvl(policy, tok, seed=0)
    hf_reference = tiny_hf_internvl(reference, tok, seed=1)
    rows = []
    for i, (question, specs, chosen, rejected) in enumerate(PAIRS):
        images = []
        for seed, w, h in specs:
            name = f"img{i}_{seed}.png"
            random_image(seed, w, h).save(root / name)
            images.append(name)
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
        rows.append({"id": i, "images": images, "prompt": [{"role": "user", "content": content}],
                     "chosen": chosen, "rejected": rejected})
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"root": root, "tok": tok, "policy": policy, "reference": reference, "hf_policy": hf_policy,
            "hf_reference": hf_reference, "data": data, "rows": rows}


def run_config(setup, *extra):
    overrides = [f"model.source={setup['policy']}", f"reference.source={setup['reference']}",
                 f"data.train=[{setup['data']}]", "data.batch_size=4", "data.seq_buckets=[128]",
                 "data.tile_buckets=[8]", "data.max_tiles=1", "model.dtype=float32", "model.param_dtype=float32",
                 "trainer.steps=2", "trainer.log_every=1", "trainer.progress=false", "trainer.export=false",
                 "trainer.async_checkpointing=false", "trainer.freeze=[]", "trainer.eval_batch_size=4",
                 "optimizer.lr=1e-3", "optimizer.warmup_steps=0", "optimizer.schedule=constant",
                 "mesh.shape=[2,2,2]", f"objective.mpo.beta={BETA}", *extra]
    return load_config(RunConfig, None, ["kind=mpo", *overrides])


def train(setup, run_dir, *extra, resume=False):
    from skyjax.train.cli import train as run_train

    run_train(run_config(setup, *extra), run_dir, resume=resume)
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
            if json.loads(line).get("split") == "train"]


def hf_sequence_logps(setup, model):
    """Per pair: (chosen, rejected) summed completion log-probs and the chosen tokens' log-probs, each response in
    its own (prompt + response) row through transformers (fp32)."""
    import torch

    from skyjax.data.internvl_image import InternVLImageConfig

    tok, image_cfg = setup["tok"], InternVLImageConfig(image_size=56, min_tiles=1, max_tiles=1)
    out = []
    for row in setup["rows"]:
        from PIL import Image

        images = [Image.open(setup["root"] / p).convert("RGB") for p in row["images"]]
        tiles, per_image = tile_images(images, image_cfg) if images else (None, [])
        prompt = row["prompt"]
        pair = []
        for key in ("chosen", "rejected"):
            messages = prompt + [{"role": "assistant", "content": row[key]}]
            conv = format_conversation(tok, messages, num_image_tokens=[4 * n for n in per_image],
                                       image_token="<image>", loss_messages=[len(prompt)])
            ids = torch.as_tensor(conv.input_ids[None], dtype=torch.long)
            kw = {} if tiles is None else {"pixel_values": torch.as_tensor(tiles)}
            with torch.no_grad():
                logits = model(input_ids=ids, **kw).logits[0].double()
            logp = torch.log_softmax(logits, -1)[:-1].gather(1, ids[0, 1:, None])[:, 0].numpy()
            mask = conv.assistant_mask[1:].astype(bool)
            pair.append((logp[mask].sum(), logp[mask]))
        out.append(pair)
    return out


def expected_step_one(setup):
    policy = hf_sequence_logps(setup, setup["hf_policy"])
    reference = hf_sequence_logps(setup, setup["hf_reference"])
    pc = np.array([p[0][0] for p in policy])
    pr = np.array([p[1][0] for p in policy])
    rc = np.array([r[0][0] for r in reference])
    rr = np.array([r[1][0] for r in reference])
    chosen_r, rejected_r = BETA * (pc - rc), BETA * (pr - rr)
    logsig = lambda x: -np.logaddexp(0.0, -x)  # noqa: E731
    delta = np.mean(np.concatenate([chosen_r, rejected_r]))  # the first batch's running delta is its own mean
    tokens = np.concatenate([p[0][1] for p in policy])
    terms = {"dpo_loss": np.mean(-logsig(chosen_r - rejected_r)),
             "bco_loss": np.mean(-logsig(chosen_r - delta) - logsig(-(rejected_r - delta))),
             "sft_loss": -tokens.mean(), "rewards/chosen": chosen_r.mean(), "rewards/rejected": rejected_r.mean(),
             "rewards/margins": (chosen_r - rejected_r).mean(),
             "rewards/accuracies": np.mean(chosen_r > rejected_r), "bco_delta": delta,
             "logps/chosen": pc.mean(), "logps/rejected": pr.mean()}
    terms["loss"] = 0.8 * terms["dpo_loss"] + 0.2 * terms["bco_loss"] + 1.0 * terms["sft_loss"]
    return terms


@pytest.fixture(scope="module")
def resident_run(setup):
    return train(setup, setup["root"] / "resident")


def test_step_one_terms_equal_transformers_with_a_different_reference(setup, resident_run):
    step1 = resident_run[0]
    want = expected_step_one(setup)
    assert abs(want["rewards/margins"]) > 1e-3 and abs(want["rewards/chosen"]) > 1e-3  # the reference differs
    for key, value in want.items():
        assert step1[key] == pytest.approx(value, abs=1e-5, rel=1e-5), key


def test_precomputed_reference_gives_the_same_steps_and_keeps_no_reference(setup, resident_run):
    run_dir = setup["root"] / "precomputed"
    runs = train(setup, run_dir, "reference.precompute=true")
    for a, b in zip(resident_run, runs):
        for key in ("loss", "dpo_loss", "bco_loss", "sft_loss", "rewards/margins", "bco_delta"):
            assert b[key] == pytest.approx(a[key], abs=1e-5, rel=1e-5), (b["step"], key)
    from skyjax.train.trainer import Trainer

    trainer = Trainer(run_config(setup, "reference.precompute=true", "trainer.steps=3"), run_dir, resume=True,
                      log=lambda m: None)
    assert "reference" not in trainer.state and "objective" in trainer.state
    assert trainer.start_step == 2 and len(trainer.batches.table) == len(PAIRS)  # restored, not recomputed


def test_bco_delta_runs_over_steps_and_resumes_exactly(setup, resident_run, tmp_path):
    """delta at step 2 = mean of the two batches' mean rewards; a run stopped after step 1 and resumed logs the
    same step 2."""
    s1, s2 = resident_run
    m1 = (s1["rewards/chosen"] + s1["rewards/rejected"]) / 2
    m2 = (s2["rewards/chosen"] + s2["rewards/rejected"]) / 2
    assert s2["bco_delta"] == pytest.approx((m1 + m2) / 2, abs=1e-6)
    train(setup, tmp_path / "r", "trainer.steps=1")
    resumed = train(setup, tmp_path / "r", resume=True)
    for key in ("loss", "bco_delta", "rewards/margins"):
        assert resumed[-1][key] == pytest.approx(s2[key], abs=1e-6), key


def test_shared_prompt_rows_score_each_response_from_its_own_context(setup):
    from skyjax.data.records import parse_record
    from skyjax.train.mpo import featurize_mpo, pair_rows

    class Fmt:  # text only
        image_token = "<image>"

        def encode(self, images):
            return np.zeros((0, 3, 56, 56), np.float32), np.zeros((0, 0), np.int32), []

        def check_fits(self, example):
            pass

    rec = parse_record({"prompt": "What is 2 + 3?", "chosen": "The answer is 5.", "rejected": "The answer is 6!"},
                       source="p.jsonl", line=3)
    e = featurize_mpo(rec, setup["tok"], Fmt())
    full = format_conversation(setup["tok"], rec.conversation("rejected"), num_image_tokens=[],
                               image_token="<image>", loss_messages=[1])
    # the shared words "The answer is" are in both tails, not in the prompt
    assert len(e.chosen) > 4 and len(e.rejected) > 4 and e.chosen_mask[0] and e.rejected_mask[0]
    rows = pair_rows([e], 64, 0)
    p, c = len(e.prompt), len(e.chosen)
    # every rejected token is predicted from the token before it in prompt + rejected
    rebuilt = np.concatenate([e.prompt, e.rejected])
    src = rows["predict_from"][0, p + c:p + c + len(e.rejected)]
    assert np.array_equal(rows["input_ids"][0, src], rebuilt[p - 1:-1])
    assert np.array_equal(rebuilt, full.input_ids)


def test_bad_pairs_are_named_by_file_and_line(setup, tmp_path):
    from skyjax.data.records import parse_record
    from skyjax.train.mpo import featurize_mpo
    from skyjax.train.sft import R1VTiles  # noqa: F401  (the same formats as SFT)

    class Fmt:
        image_token = "<image>"

        def encode(self, images):
            return np.zeros((0, 3, 56, 56), np.float32), np.zeros((0, 0), np.int32), []

        def check_fits(self, example):
            pass

    same = parse_record({"prompt": "Q?", "chosen": "Yes.", "rejected": " Yes. "}, source="d.jsonl", line=7)
    with pytest.raises(BadRowError, match=r"d\.jsonl:7: chosen and rejected are the same response"):
        featurize_mpo(same, setup["tok"], Fmt())
    long = parse_record({"prompt": "Q?", "chosen": "a" * 200, "rejected": "b"}, source="d.jsonl", line=9)
    with pytest.raises(BadRowError, match=r"d\.jsonl:9: prompt \+ chosen \+ rejected is \d+ tokens"):
        featurize_mpo(long, setup["tok"], Fmt(), max_length=128)


def test_missing_reference_is_a_one_line_error(setup, tmp_path):
    from skyjax.config import ConfigError
    from skyjax.train.cli import train as run_train

    cfg = run_config(setup, f"reference.source={tmp_path / 'nowhere'}")
    with pytest.raises(ConfigError, match=r"^reference\.source \S+nowhere does not exist") as err:
        run_train(cfg, tmp_path / "run", resume=False)
    assert "\n" not in str(err.value) and not (tmp_path / "run").exists()  # checked before anything is written
