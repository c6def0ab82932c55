"""Skywork R1V / InternVL generation vs transformers' `InternVLForConditionalGeneration.generate` (tiny random fp32
models): greedy token-exact on a left-padded batch of rows with different tile counts (several images in a row, a
text-only row), a row stopped early by a stop token taken from the reference's own output, raw log-probs equal a
fresh full forward, the (2, 2, 2) mesh, and `skyjax generate` on an R1V folder and on its skyjax checkpoint."""

import json

import jax
import numpy as np
import pytest
import torch

from helpers import random_image, spread_weights, tiny_hf_internvl
from test_sample import assert_matches_hf_with_stop, full_forward_logits, hf_generate, pick_stop
from skyjax.cli import main
from skyjax.convert.checkpoint import load_hf
from skyjax.data.qwen_vl_image import load_image
from skyjax.data.tokenizer import build_tiny_tokenizer, load_tokenizer
from skyjax.parallel import make_mesh, use_mesh
from skyjax.sample.adapters import R1VAdapter, adapter_for
from skyjax.sample.decode import Sampling, generate

NEW = 10


@pytest.fixture(scope="module")
def r1v(tmp_path_factory):
    folder = tmp_path_factory.mktemp("r1v_sample")
    hf = spread_weights(tiny_hf_internvl(folder, build_tiny_tokenizer("internvl")), folder, std=0.3)
    hf.generation_config.eos_token_id = None  # stop only where a test says so
    lm = load_hf(folder)
    return folder, hf, lm, adapter_for(lm), load_tokenizer(folder)


def user(*parts):
    """A user turn; None is an image part."""
    return [{"role": "user", "content": [{"type": "image"} if p is None else {"type": "text", "text": p}
                                         for p in parts]}]


def r1v_case(ad, tok, first_image=(3, 150, 80)):
    """Four rows: a tiled image (grid + thumbnail), text then a one-tile image, text only, two images."""
    convs = [user(None, "Describe."), user("A longer question first,", None, "then an image."), user("text only"),
             user(None, "two", None, "images")]
    specs = [[first_image], [(4, 60, 60)], [], [(5, 90, 60), (6, 60, 120)]]
    return ad.prepare(convs, [[random_image(*s) for s in row] for row in specs], tok)


def hf_pixels(inputs):
    """The reference takes the real tiles only (ours are padded to a tile bucket)."""
    return torch.as_tensor(inputs["pixel_values"][: int(np.sum(inputs["tiles_per_row"]))])


def test_greedy_matches_transformers_r1v(r1v):
    folder, hf, lm, ad, tok = r1v
    assert isinstance(ad, R1VAdapter) and lm.arch.name == "internvl"
    inputs = r1v_case(ad, tok)
    tiles = inputs["tiles_per_row"].tolist()
    assert tiles[2] == 0 and len(set(tiles)) == 4 and tiles[0] >= 3  # different tile counts, one text-only row
    assert inputs["pixel_values"].shape[0] > sum(tiles)  # padding tiles are never read
    assert len(set(inputs["attention_mask"].sum(1).tolist())) == 4  # really left-padded, all lengths differ
    assert set(ad.device_inputs(inputs)) == {"input_ids", "attention_mask", "pixel_values"}  # counts: host only
    pad = tok.pad_token_id
    free = hf_generate(hf, inputs, NEW, pad_token_id=pad, pixel_values=hf_pixels(inputs))
    out = generate(ad, lm.params, inputs, Sampling(max_new_tokens=NEW))
    np.testing.assert_array_equal(np.asarray(out.tokens), free)

    # a stop token the reference really produces: row 0 stops early, another row runs to the limit
    stop, k = pick_stop(free)
    ref = hf_generate(hf, inputs, NEW, pad_token_id=pad, eos_token_id=stop, pixel_values=hf_pixels(inputs))
    out = generate(ad, lm.params, inputs, Sampling(max_new_tokens=NEW, stop_token_ids=(stop,)))
    assert_matches_hf_with_stop(out, ref, stop, pad)
    assert int(out.lengths[0]) == k + 1 and out.finish_reasons()[0] == "stop" and "length" in out.finish_reasons()

    # raw log-probs == log_softmax of a fresh forward (no cache) over prompt + generated tokens, images included
    tokens = np.asarray(out.tokens)
    logits = full_forward_logits(lm, inputs["input_ids"], inputs["attention_mask"], tokens,
                                 pixel_values=inputs["pixel_values"])
    valid = tokens >= 0
    raw = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits, -1)), np.maximum(tokens, 0)[..., None], -1)[..., 0]
    assert np.max(np.abs(np.where(valid, raw - np.asarray(out.logprobs), 0))) <= 1e-5
    assert np.all(np.asarray(out.logprobs)[~valid] == 0)

    # guard against a silent image no-op: another picture in row 0 (same tile count) changes its continuation
    other = r1v_case(ad, tok, first_image=(9, 150, 80))
    assert other["tiles_per_row"].tolist() == tiles
    changed = generate(ad, lm.params, other, Sampling(max_new_tokens=NEW))
    assert not np.array_equal(np.asarray(changed.tokens)[0], free[0])
    np.testing.assert_array_equal(np.asarray(changed.tokens)[2], free[2])  # the text-only row does not see it


def test_mesh_gives_the_same_greedy_tokens_r1v(r1v):
    """(2, 2, 2) mesh with the scanned step vs one device with the unrolled CPU step: the same tokens."""
    folder, _, lm, ad, tok = r1v
    inputs = r1v_case(ad, tok)
    sampling = Sampling(max_new_tokens=NEW)  # the program of the single-device greedy test, already compiled
    one = generate(ad, lm.params, inputs, sampling)
    mesh = make_mesh((2, 2, 2))
    sharded = load_hf(folder, mesh=mesh)
    with use_mesh(mesh):
        many = generate(adapter_for(sharded, unstack_layers=False), sharded.params, inputs, sampling)
    assert ad.unstack_layers  # the default on CPU
    assert many.tokens.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_array_equal(np.asarray(one.tokens), np.asarray(many.tokens))
    # fp32 noise of two different programs (sharded scanned step vs unrolled [out, in] step): 1e-5 relative
    np.testing.assert_allclose(np.asarray(one.logprobs), np.asarray(many.logprobs), rtol=1e-5, atol=1e-5)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_generate_cli_r1v_folder_and_checkpoint(r1v, tmp_path):
    """`skyjax generate` on the R1V Hugging Face folder (greedy, a stop id the reference produces) equals
    transformers generate on each row alone; on the converted skyjax checkpoint, --num-samples 2 with top-k 1
    (sampling that can only pick the argmax) writes `samples` equal to those greedy completions."""
    folder, hf, lm, ad, tok = r1v
    (tmp_path / "img").mkdir()
    for name, spec in (("a", (11, 150, 80)), ("b", (12, 60, 60)), ("c", (13, 90, 60))):
        random_image(*spec).save(tmp_path / "img" / f"{name}.png")
    rows = [
        {"images": ["img/a.png"], "prompt": "What is this?", "id": 0},
        {"images": ["img/b.png", "img/c.png"], "prompt": [{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": "versus"}, {"type": "image"}]}], "id": 1},
        {"prompt": "Only text here.", "answer": "42", "id": 2},
        {"images": ["img/missing.png"], "prompt": "Broken.", "id": 3},
    ]
    _write_jsonl(tmp_path / "in.jsonl", rows)

    # the reference: each good row alone (no padding), real tiles only
    refs = []
    for src in rows[:3]:
        images = [load_image(tmp_path / p) for p in src.get("images", [])]
        prompt = src["prompt"] if isinstance(src["prompt"], list) else user(*[None] * len(images), src["prompt"])
        one = ad.prepare([prompt], [images], tok)
        real = one["attention_mask"][0]
        kw = {"input_ids": torch.as_tensor(one["input_ids"][:, real], dtype=torch.long)}
        if images:
            kw["pixel_values"] = hf_pixels(one)
        refs.append(kw)
    with torch.no_grad():
        free = [hf.generate(**kw, max_new_tokens=NEW, do_sample=False, pad_token_id=tok.pad_token_id)
                [0, kw["input_ids"].shape[1]:].numpy() for kw in refs]
    stop, _ = pick_stop(np.stack(free))

    out = tmp_path / "greedy.jsonl"
    assert main(["generate", "--model", str(folder), "--data", str(tmp_path / "in.jsonl"), "--out", str(out),
                 "--max-new-tokens", str(NEW), "--batch-size", "3", "--stop-token-ids", str(stop),
                 "--mesh", "1,1,1"]) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in got] == [0, 1, 2]  # the row with a missing image is skipped
    for row, src, ref in zip(got, rows, free):
        assert {k: row[k] for k in src} == src  # input fields kept as they were
        hits = np.flatnonzero(ref == stop)
        want = ref[: hits[0] + 1] if hits.size else ref
        assert row["token_ids"] == want.tolist(), (row["id"], row["token_ids"], ref)
        assert row["num_tokens"] == len(want) and row["finish_reason"] == ("stop" if hits.size else "length")
        text_ids = row["token_ids"][:-1] if hits.size else row["token_ids"]
        assert row["text"] == tok.decode(text_ids, skip_special_tokens=True)
    assert got[0]["finish_reason"] == "stop" and "length" in [r["finish_reason"] for r in got]

    ckpt = tmp_path / "ckpt"
    assert main(["convert", str(folder), str(ckpt), "--mesh", "1,1,1"]) == 0
    out2 = tmp_path / "samples.jsonl"
    assert main(["generate", "--model", str(ckpt), "--data", str(tmp_path / "in.jsonl"), "--out", str(out2),
                 "--max-new-tokens", str(NEW), "--batch-size", "2", "--stop-token-ids", str(stop),
                 "--num-samples", "2", "--temperature", "1.0", "--top-k", "1", "--mesh", "1,1,1"]) == 0
    sampled = [json.loads(line) for line in out2.read_text().splitlines()]
    assert [r["id"] for r in sampled] == [0, 1, 2]
    for row, greedy in zip(sampled, got):
        assert "text" not in row and len(row["samples"]) == 2
        for s in row["samples"]:
            assert set(s) == {"text", "token_ids", "num_tokens", "finish_reason"}
            assert {k: s[k] for k in s} == {k: greedy[k] for k in s}
