"""`skyjax generate` end to end on tiny local models: JSONL in (images relative to the file, bad rows reported by
line), JSONL out; greedy equals transformers, and seeded samples do not depend on batch size, mesh or on whether
the model is a Hugging Face folder or a skyjax checkpoint."""

import json

import numpy as np
import torch

from helpers import random_image, spread_weights, tiny_hf_qwen2, tiny_hf_qwen2_5_vl
from skyjax.cli import main
from skyjax.convert.checkpoint import load_hf
from skyjax.data.tokenizer import build_tiny_tokenizer
from skyjax.sample.adapters import adapter_for


def write_jsonl(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generate_qwen2_5_vl_greedy_matches_transformers(tmp_path, capsys):
    model_dir, data_dir = tmp_path / "model", tmp_path / "data"
    (data_dir / "img").mkdir(parents=True)
    tok = build_tiny_tokenizer("qwen2_5_vl")
    hf = spread_weights(tiny_hf_qwen2_5_vl(model_dir, tok), model_dir, std=0.3)
    random_image(1, 56, 56).save(data_dir / "img" / "a.png")
    random_image(2, 84, 70).save(data_dir / "img" / "b.png")
    rows = [
        {"images": ["img/a.png"], "prompt": "What is this?", "id": 1},
        {"prompt": "Only text here.", "answer": "42"},
        {"images": ["img/missing.png"], "prompt": "Broken."},
        "{not json",
        {"images": ["img/b.png"], "prompt": [{"role": "user", "content": [{"type": "text", "text": "Compare"},
                                                                         {"type": "image"}]}],
         "meta": {"repetition_penalty": 1.5}},
        {"prompt": "Typo.", "choosen": "x"},
    ]
    write_jsonl(data_dir / "in.jsonl", rows)
    out_path = tmp_path / "out" / "out.jsonl"
    code = main(["generate", "--model", str(model_dir), "--data", str(data_dir / "in.jsonl"), "--out", str(out_path),
                 "--max-new-tokens", "8", "--batch-size", "2", "--mesh", "1,1,1"])
    assert code == 0
    err = capsys.readouterr().err
    for line, what in ((3, "missing.png"), (4, "malformed JSON"), (6, "choosen")):
        assert f"skipping line {line}:" in err and what in err, err
    assert "skipped 3 bad row(s) at line(s) [3, 4, 6]" in err
    got = read_jsonl(out_path)
    assert len(got) == 3
    kept = [rows[0], rows[1], rows[4]]
    lm = load_hf(model_dir)
    ad = adapter_for(lm)
    stop = sorted({tok.eos_token_id, lm.config.text.eos_token_id})
    from skyjax.data.qwen_vl_image import load_image

    for row, src in zip(got, kept):
        assert {k: row[k] for k in src} == src  # input fields kept as they were
        assert row["num_tokens"] == len(row["token_ids"]) and row["finish_reason"] in ("stop", "length")
        ids = row["token_ids"]
        text_ids = ids[:-1] if row["finish_reason"] == "stop" else ids
        assert row["text"] == tok.decode(text_ids, skip_special_tokens=True)
        # the reference: transformers generate on this row alone (no padding), with the same stop ids and penalty
        images = [load_image(data_dir / p) for p in src.get("images", [])]
        prompt = src["prompt"] if isinstance(src["prompt"], list) else [
            {"role": "user", "content": [{"type": "image"}] * len(images) + [{"type": "text", "text": src["prompt"]}]}]
        inputs = ad.prepare([prompt], [images], tok)
        real = inputs["attention_mask"][0]
        kw = {"input_ids": torch.as_tensor(inputs["input_ids"][:, real], dtype=torch.long)}
        kw["mm_token_type_ids"] = (kw["input_ids"] == lm.config.image_token_id).long()
        if images:
            grid = inputs["image_grid_thw"][:1]
            kw.update(pixel_values=torch.as_tensor(inputs["pixel_values"][: int(np.prod(grid))]),
                      image_grid_thw=torch.as_tensor(grid, dtype=torch.long))
        penalty = (src.get("meta") or {}).get("repetition_penalty", 1.0)
        with torch.no_grad():
            ref = hf.generate(**kw, max_new_tokens=8, do_sample=False, eos_token_id=stop,
                              pad_token_id=tok.pad_token_id, repetition_penalty=penalty)
        ref = ref[0, kw["input_ids"].shape[1]:].tolist()
        if row["finish_reason"] == "stop":
            assert ids[-1] in stop
        assert ids == ref[: len(ids)] and all(t == tok.pad_token_id for t in ref[len(ids):]), (ids, ref)


def test_generate_samples_independent_of_batch_mesh_and_format(tmp_path):
    hf_dir, ckpt_dir = tmp_path / "hf", tmp_path / "ckpt"
    tok = build_tiny_tokenizer("qwen2", out_dir=hf_dir)
    spread_weights(tiny_hf_qwen2(hf_dir), hf_dir, std=0.3)
    assert main(["convert", str(hf_dir), str(ckpt_dir), "--mesh", "1,1,1"]) == 0
    rows = [{"prompt": p, "id": i} for i, p in enumerate(["Hi.", "Count to three, slowly.", "Why?", "Name a colour.",
                                                          "Say something long about the sea and the sky."])]
    rows[2]["meta"] = {"repetition_penalty": 1.7}
    write_jsonl(tmp_path / "in.jsonl", rows)
    common = ["--data", str(tmp_path / "in.jsonl"), "--max-new-tokens", "6", "--num-samples", "3",
              "--temperature", "1.0", "--top-p", "0.95", "--seed", "7", "--logprobs"]
    assert main(["generate", "--model", str(ckpt_dir), "--out", str(tmp_path / "a.jsonl"), "--batch-size", "4",
                 "--mesh", "2,2,2", *common]) == 0
    assert main(["generate", "--model", str(hf_dir), "--out", str(tmp_path / "b.jsonl"), "--batch-size", "2",
                 "--mesh", "1,1,1", *common]) == 0
    a, b = read_jsonl(tmp_path / "a.jsonl"), read_jsonl(tmp_path / "b.jsonl")
    assert len(a) == len(rows) and [r["id"] for r in a] == list(range(len(rows)))
    for ra, rb in zip(a, b):
        assert "text" not in ra and len(ra["samples"]) == 3
        assert [s["token_ids"] for s in ra["samples"]] == [s["token_ids"] for s in rb["samples"]]
        for sa, sb in zip(ra["samples"], rb["samples"]):
            assert set(sa) == {"text", "token_ids", "num_tokens", "finish_reason", "logprobs"}
            assert len(sa["logprobs"]) == sa["num_tokens"] == len(sa["token_ids"]) and max(sa["logprobs"]) <= 0
            np.testing.assert_allclose(sa["logprobs"], sb["logprobs"], atol=1e-4)
    # three samples of one prompt differ (sampled, not copies of one draw)
    assert any(len({tuple(s["token_ids"]) for s in r["samples"]}) > 1 for r in a)
