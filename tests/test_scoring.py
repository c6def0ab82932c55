"""Bounded-memory, resumable scoring: chunked attention, length-grouped token-budget batches, over-long and malformed
rows, resuming a stopped job, one progress bar per job."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from helpers import random_image, tiny_hf_qwen2_5_vl
from skyjax.cli import main as cli
from skyjax.data.tokenizer import build_tiny_tokenizer
from skyjax.eval.scorer import Conversation, RewardScorer, plan_batches, rows_for
from skyjax.nn.attention import attention_mask, dot_product_attention


@pytest.fixture(scope="module")
def reward_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reward")
    tiny_hf_qwen2_5_vl(folder, build_tiny_tokenizer("qwen2_5_vl"))
    rng = np.random.RandomState(0)
    save_file({"v_head.summary.weight": rng.normal(0, 0.5, (1, 64)).astype(np.float32),
               "v_head.summary.bias": np.array([0.3], np.float32)}, str(folder / "value_head.safetensors"))
    return folder


def _qkv(b, s, h=4, k=2, d=16, seed=0):
    rng = np.random.RandomState(seed)
    return [jnp.asarray(rng.randn(b, s, n, d), jnp.float32) for n in (h, k, k)]


@pytest.mark.parametrize("causal", [False, True])
def test_chunked_attention_equals_unchunked_with_a_fraction_of_the_memory(causal):
    b, s = 2, 1100  # not a multiple of any chunk: the padded / short last chunk is exercised
    q, k, v = _qkv(b, s)
    valid = jnp.asarray(np.arange(s)[None] < np.array([[700], [s]]))
    mask = attention_mask(jnp.arange(s), jnp.arange(s), valid)
    limit = 4 * b * 4 * 128 * s  # room for 128 queries' scores

    def compiled(max_bytes, causal_hint):
        f = jax.jit(lambda q, k, v, m: dot_product_attention(q, k, v, m, max_scores_bytes=max_bytes,
                                                             causal=causal_hint))
        return f, f.lower(q, k, v, mask).compile().memory_analysis().temp_size_in_bytes

    full, full_bytes = compiled(None, False)
    chunked, chunked_bytes = compiled(limit, causal)
    assert full_bytes >= 4 * b * 4 * s * s  # the unchunked program holds every fp32 score
    assert chunked_bytes < full_bytes / 4
    np.testing.assert_allclose(np.asarray(chunked(q, k, v, mask)), np.asarray(full(q, k, v, mask)),
                               rtol=1e-5, atol=1e-6)


def test_kv_cache_layout_chunks_alike():
    q, k, v = _qkv(1, 300, seed=1)
    mask = attention_mask(jnp.arange(300), jnp.arange(300), None)
    kc, vc = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    ref = dot_product_attention(q, k, v, mask, max_scores_bytes=None)
    got = dot_product_attention(q, kc, vc, mask, kv_heads_first=True, max_scores_bytes=4 * 4 * 32 * 300)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-6)


def test_plan_batches_cover_every_row_once_within_the_budget():
    rng = np.random.RandomState(0)
    lengths = {i: int(n) for i, n in enumerate(rng.randint(10, 3000, 500))}
    buckets, budget, max_rows = (64, 128, 256, 512, 1024, 2048, 4096), 4096, 16
    batches = plan_batches(lengths, buckets, budget, max_rows)
    seen = [i for b in batches for i in b.indices]
    assert sorted(seen) == sorted(lengths)  # every row exactly once
    for b in batches:
        assert len(b.indices) <= b.rows == rows_for(b.length, budget, max_rows)
        assert b.rows * b.length <= budget or b.rows == 1
        assert max(lengths[i] for i in b.indices) <= b.length and b.length in buckets
    # one shape per length bucket, longest first (a job that cannot fit fails at once)
    assert len({(b.rows, b.length) for b in batches}) == len({b.length for b in batches})
    assert [b.length for b in batches] == sorted((b.length for b in batches), reverse=True)
    # at most one partly filled batch per length bucket
    for length in {b.length for b in batches}:
        assert sum(len(b.indices) < b.rows for b in batches if b.length == length) <= 1


def test_a_length_bucket_of_few_batches_joins_the_next_instead_of_compiling_its_own_program():
    # 10 rows of bucket 128 (a full batch, and 2 that join the first batch of 256) and 40 of bucket 256; 8 rows per
    # batch in both (budget 2048)
    lengths = {i: 100 for i in range(10)} | {i: 200 for i in range(10, 50)}
    shapes = lambda plan: sorted({(b.rows, b.length) for b in plan})
    assert shapes(plan_batches(lengths, (128, 256, 512), 2048, 8, min_batches=0)) == [(8, 128), (8, 256)]
    merged = plan_batches(lengths, (128, 256, 512), 2048, 8)
    assert shapes(merged) == [(8, 256)] and sorted(i for b in merged for i in b.indices) == list(range(50))
    # a bucket of many batches keeps its own program; one whose next bucket takes fewer rows per batch too
    many = {i: 100 for i in range(80)} | {i: 200 for i in range(80, 90)}
    assert shapes(plan_batches(many, (128, 256, 512), 2048, 8)) == [(8, 128), (8, 256)]
    assert shapes(plan_batches(lengths, (128, 256, 512), 1024, 8)) == [(4, 256), (8, 128)]


def _convs(tmp_path, n=9):
    (tmp_path / "img").mkdir(exist_ok=True)
    convs = []
    for i in range(n):
        text = "word " * (5 + 37 * i)  # lengths spread over several buckets
        images = ()
        if i % 3 == 0:
            path = tmp_path / "img" / f"{i}.png"
            random_image(i, 56 + 28 * (i % 4), 84).save(path)
            images = (str(path),)
        content = ([{"type": "image"}] if images else []) + [{"type": "text", "text": f"Question {i}?"}]
        convs.append(Conversation([{"role": "user", "content": content}, {"role": "assistant", "content": text}],
                                  images, f"rows.jsonl:{i + 1}", (i + 1, "response")))
    return convs


def test_batched_scores_equal_each_row_alone_in_input_order(reward_folder, tmp_path):
    convs = _convs(tmp_path)
    batched = RewardScorer(reward_folder, mesh_shape=(1, 1, 1), max_batch_tokens=1024, progress=False)
    seen = []
    scores = batched.score_conversations(convs, on_batch=lambda keys, s: seen.extend(keys))
    assert sorted(seen) == sorted(c.key for c in convs) and len(seen) == len(convs)  # each scored once
    lengths = [batched.measure(c) for c in convs]
    shapes = {(b.rows, b.length) for b in plan_batches(dict(enumerate(lengths)), batched.seq_buckets, 1024, 64)}
    assert len(shapes) > 1 and 0 < batched.compiles <= 2 * len(shapes)  # a program per shape (x image or not)
    alone = RewardScorer(reward_folder, mesh_shape=(1, 1, 1), batch_size=1, progress=False)
    for conv, score in zip(convs, scores):
        assert score == pytest.approx(float(alone.score_conversations([conv])[0]), abs=1e-5)


def test_shared_images_are_preprocessed_once_and_programs_compiled_ahead_agree(reward_folder, tmp_path, monkeypatch):
    convs = _convs(tmp_path)
    pairs = [c for c in convs if c.image_paths]
    twins = [Conversation(c.messages[:1] + [{"role": "assistant", "content": "no " * 90}], c.image_paths,
                          c.where, (c.key[0], "rejected")) for c in pairs]  # a pair's second answer, another length
    scorer = RewardScorer(reward_folder, mesh_shape=(1, 1, 1), max_batch_tokens=1024, progress=False)
    reference = scorer.score_conversations(convs + twins)
    calls = []
    preprocess = scorer._preprocess
    monkeypatch.setattr(scorer, "_preprocess", lambda p: calls.append(p) or preprocess(p))
    np.testing.assert_array_equal(scorer.score_conversations(convs + twins), reference)
    assert sorted(calls) == sorted({c.image_paths[0] for c in pairs})  # each image once, not once per answer
    scorer._compile_in_background = True  # as on an accelerator: every shape compiled on a thread from the start
    scorer._programs.clear()
    np.testing.assert_array_equal(scorer.score_conversations(convs + twins), reference)
    shapes = {(b.rows, b.length) for b in plan_batches(
        {i: scorer.measure(c) for i, c in enumerate(convs + twins)}, scorer.seq_buckets, 1024, 64)}
    assert scorer.compiles == len(shapes)
    assert scorer._image_cache.bytes == 0  # nothing kept after the job


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _rows(n=12):
    return [{"id": i, "prompt": f"Question {i}?", "response": "answer " * (3 + 40 * (i % 5))} for i in range(n)]


def test_score_job_draws_one_progress_bar_and_keeps_order(reward_folder, tmp_path, capsys):
    data = _write(tmp_path / "rows.jsonl", _rows())
    out = tmp_path / "out.jsonl"
    assert cli(["score", "--model", str(reward_folder), "--data", str(data), "--out", str(out), "--mesh", "1,1,1",
                "--batch-size", "2", "--max-batch-tokens", "512"]) == 0
    err = capsys.readouterr().err
    finished_bars = [line for line in err.split("\n") if "12/12" in line]
    assert len(finished_bars) == 1, err  # many batches, one bar
    assert "/12 " in err and "row/s" in err and "compiling" in err
    assert err.count("100%") == 1 and set(re.findall(r"\d+/(\d+) \[", err)) == {"12"}  # one bar, one total
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == list(range(12)) and all(np.isfinite(r["score"]) for r in rows)
    assert not (tmp_path / "out.jsonl.partial.jsonl").exists()  # the log is removed once the output is written


def test_overlong_row_is_an_error_naming_its_line_or_is_skipped(reward_folder, tmp_path, capsys):
    rows = _rows(3)
    rows[1]["response"], rows[2]["response"] = "long " * 400, "short"
    data = _write(tmp_path / "rows.jsonl", rows)
    out = tmp_path / "out.jsonl"
    args = ["score", "--model", str(reward_folder), "--data", str(data), "--out", str(out), "--mesh", "1,1,1",
            "--max-length", "256"]
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert "rows.jsonl:2" in err and "longer than the 256 of the --max-length" in err and "--on-error skip" in err
    assert cli(args + ["--on-error", "skip"]) == 0
    err = capsys.readouterr().err
    assert "skipped 1" in err and "rows.jsonl:2" in err
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [0, 2]
    # the model's own limit applies without --max-length (the tiny model allows 4096 positions)
    rows[1]["response"] = "long " * 5000
    _write(data, rows)
    assert cli(args[:-2]) == 2
    assert "max_position_embeddings" in capsys.readouterr().err


def test_malformed_and_blank_lines(reward_folder, tmp_path, capsys):
    rows = _rows(3)
    data = _write(tmp_path / "rows.jsonl", [rows[0], "", rows[1], "{not json", rows[2]])
    out = tmp_path / "out.jsonl"
    args = ["score", "--model", str(reward_folder), "--data", str(data), "--out", str(out), "--mesh", "1,1,1"]
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rows.jsonl:4" in err and "malformed JSON" in err and "--on-error skip" in err
    assert cli(args + ["--on-error", "skip"]) == 0
    err = capsys.readouterr().err
    assert "skipped 1" in err and "rows.jsonl:4" in err
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [0, 1, 2]
    _write(data, [rows[0], "", rows[1]])  # a blank line alone is not an error
    assert cli(args) == 0
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [0, 1]


def test_resume_after_a_crash_scores_only_what_is_missing(reward_folder, tmp_path, monkeypatch, capsys):
    from skyjax.eval import score_log

    data = _write(tmp_path / "rows.jsonl", _rows())
    args = ["score", "--model", str(reward_folder), "--mesh", "1,1,1", "--data", str(data), "--batch-size", "2",
            "--max-batch-tokens", "512"]
    fresh = tmp_path / "fresh.jsonl"
    assert cli(args + ["--out", str(fresh)]) == 0
    out = tmp_path / "out.jsonl"
    append = score_log.ScoreLog.append
    calls = []

    def crash_after_two_batches(self, keys, scores):
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        calls.append(list(keys))
        append(self, keys, scores)

    monkeypatch.setattr(score_log.ScoreLog, "append", crash_after_two_batches)
    with pytest.raises(RuntimeError, match="simulated crash"):
        cli(args + ["--out", str(out)])
    monkeypatch.setattr(score_log.ScoreLog, "append", append)
    partial = tmp_path / "out.jsonl.partial.jsonl"
    logged = len(partial.read_text().splitlines()) - 1
    assert not out.exists() and logged == sum(map(len, calls)) > 0
    with partial.open("a") as f:
        f.write('{"key": [1, "resp')  # the process died mid-line
    capsys.readouterr()
    scored = []
    monkeypatch.setattr(RewardScorer, "measure", _counting(RewardScorer.measure, scored))
    assert cli(args + ["--out", str(out)]) == 0
    assert f"resuming: {logged} conversations" in capsys.readouterr().err
    assert len(scored) == 12 - logged  # only the rest was scored
    assert out.read_text() == fresh.read_text()
    assert not partial.exists()
    # a log left by another job is refused with a one-line error
    partial.write_text(json.dumps({"job": {"data": "other.jsonl"}}) + "\n")
    assert cli(args + ["--out", str(out)]) == 2
    assert "another job" in capsys.readouterr().err


def _counting(fn, calls):
    def wrapped(self, conv):
        calls.append(conv.key)
        return fn(self, conv)
    return wrapped


def test_output_image_paths_stay_valid_in_another_folder(reward_folder, tmp_path):
    (tmp_path / "data" / "img").mkdir(parents=True)
    random_image(0, 56, 56).save(tmp_path / "data" / "img" / "a.png")
    data = _write(tmp_path / "data" / "rows.jsonl",
                  [{"images": ["img/a.png"], "prompt": "What?", "response": "A square."}])
    out = tmp_path / "results" / "deep" / "out.jsonl"
    assert cli(["score", "--model", str(reward_folder), "--data", str(data), "--out", str(out),
                "--mesh", "1,1,1"]) == 0
    row = json.loads(out.read_text())
    assert not row["images"][0].startswith("/")  # relative, now to the output's folder
    assert (out.parent / row["images"][0]).resolve() == (tmp_path / "data" / "img" / "a.png").resolve()
