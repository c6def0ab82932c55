"""`skyjax pairs`: the selection rule (a wrong answer is never chosen, identical texts never pair, the margin rule),
the job with a scripted generator and a scripted reward model (preference records that skyjax.data.records reads,
every score kept, dropped-reason counts, image paths relative to the output, bad rows named or skipped, nothing
written on a crash), and the command end to end on a tiny R1V policy and a tiny reward model."""

import json
import math
import os

import numpy as np
import pytest

from helpers import random_image, spread_weights, tiny_hf_internvl, tiny_hf_qwen2_5_vl
from skyjax.cli import main
from skyjax.data.records import RecordReader
from skyjax.rl.generation import Completion
from skyjax.rl.pairs import (BAD_ROW, IDENTICAL, LOW_MARGIN, NO_CORRECT, UNSCORABLE, PairsConfig, build_pairs,
                             partial_path, select_pair)


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------------------------- selection rule


def test_select_pair_rules():
    # the reward model likes a wrong answer best: it is not chosen; the worst wrong one is rejected
    s = select_pair(["A", "B", "C"], [3.0, 0.5, 2.0], [False, False, True])
    assert (s.chosen, s.rejected, s.rule, s.reason) == (2, 1, "verified", None) and s.margin == pytest.approx(1.5)
    # a wrong answer is preferred as rejected even when a correct one scores lower
    s = select_pair(["A", "B", "C"], [2.0, 1.0, 0.0], [True, False, True])
    assert (s.chosen, s.rejected, s.rule) == (0, 1, "verified")
    # no wrong answer among the others: the worst other correct one, a reward pair
    s = select_pair(["A", "B", "C"], [2.0, 1.0, 0.0], [True, True, True])
    assert (s.chosen, s.rejected, s.rule) == (0, 2, "reward")
    # the reward model prefers every wrong answer: no pair (the margin is negative), never a wrong chosen
    s = select_pair(["A", "B"], [3.0, 1.0], [False, True])
    assert s.reason == LOW_MARGIN and s.chosen == 1 and s.margin == pytest.approx(-2.0)
    assert select_pair(["A", "B"], [3.0, 1.0], [False, False]).reason == NO_CORRECT
    # identical texts (whitespace aside) never pair; a lower-scored copy of chosen is not its rejected
    assert select_pair(["x", " x\n", "x"], [1.0, 0.0, 2.0], None).reason == IDENTICAL
    s = select_pair(["x", "y", "x"], [2.0, 1.0, 0.5], None)
    assert (s.chosen, s.rejected) == (0, 1)
    # the margin: > 0 always, >= min_margin
    assert select_pair(["x", "y"], [1.0, 1.0], None).reason == LOW_MARGIN
    assert select_pair(["x", "y"], [1.2, 1.0], None, min_margin=0.5).reason == LOW_MARGIN
    assert select_pair(["x", "y"], [1.6, 1.0], None, min_margin=0.5).kept
    # responses the reward model could not score take no part
    s = select_pair(["x", "y", "z"], [math.nan, 1.0, 0.0], None)
    assert (s.chosen, s.rejected) == (1, 2)
    assert select_pair(["x", "y"], [math.nan, 1.0], None).reason == UNSCORABLE


# ------------------------------------------------------------------------------------- the job, scripted models


class ScriptedScorer:
    """A reward model whose score of a response is looked up by its text; checks what it is given."""

    name = "scripted-rm"

    def __init__(self, table, fail=False):
        self.table, self.fail, self.seen = table, fail, []

    def score_conversations(self, convs, desc="", *, on_error="raise", skipped=None, progress=None, **kw):
        if self.fail:
            raise RuntimeError("the reward model crashed")
        out = []
        for c in convs:
            assert c.messages[-1]["role"] == "assistant" and c.messages[0]["role"] == "user"
            assert all(os.path.isfile(p) for p in c.image_paths)  # it sees the images
            self.seen.append(c)
            out.append(self.table[c.messages[-1]["content"]])
        if progress is not None:
            progress.update(len(convs))
        return np.asarray(out, np.float32)


def scripted_generator(plan, calls):
    """plan: input line -> the N response texts."""
    def run(requests, rnd):
        calls.append([r.key for r in requests])
        return [[Completion(t, len(t), "stop") for t in plan[r.key]] for r in requests]
    return run


# line -> (row, responses, reward of each)
CASES = {
    1: ({"prompt": "What is 2 + 2?", "answer": "4", "images": ["img/a.png"], "id": 11},
        ["\\boxed{5}", "Answer: \\boxed{6}", "It is \\boxed{4}."], [3.0, 0.5, 2.0]),  # the RM likes a wrong one
    2: ({"prompt": "What is 3 + 4?", "answer": "7"}, ["\\boxed{1}", "\\boxed{2}", "\\boxed{3}"], [1.0, 2.0, 3.0]),
    3: ({"prompt": "Describe it.", "images": ["img/b.png"]}, ["same", "same", "same"], [1.0, 1.0, 1.0]),
    4: ({"prompt": "Say hi."}, ["hi", "hello", "hey"], [1.0, 1.05, 0.9]),  # margin 0.15 < 0.5
    5: ({"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}],
         "images": ["img/a.png"], "meta": {"source": "synthetic"}}, ["red", "blue", "green"], [0.0, 2.0, -1.0]),
    6: ({"prompt": "1 + 2?", "answer": "3"}, ["\\boxed{3}", "\\boxed{3}", "So \\boxed{3}."], [2.0, 2.0, 1.0]),
}


def job_files(tmp_path):
    data = tmp_path / "data" / "prompts.jsonl"
    write_jsonl(data, [CASES[k][0] for k in sorted(CASES)])
    (tmp_path / "data" / "img").mkdir()
    for name, seed in (("a.png", 0), ("b.png", 1)):
        random_image(seed, 40, 30).save(tmp_path / "data" / "img" / name)
    plan = {k: CASES[k][1] for k in CASES}
    table = {t: s for k in CASES for t, s in zip(CASES[k][1], CASES[k][2])}
    return data, plan, table


def test_pairs_job_with_scripted_models(tmp_path):
    data, plan, table = job_files(tmp_path)
    out = tmp_path / "out" / "sub" / "pairs.jsonl"
    calls = []
    scorer = ScriptedScorer(table)
    report = build_pairs("scripted-policy", scorer, data, out,
                         PairsConfig(num_samples=3, min_margin=0.5, batch_size=4),
                         progress=False, generate_fn=scripted_generator(plan, calls))
    assert calls == [[1, 2, 3, 4], [5, 6]]  # batches of --batch-size prompts, keyed by input line
    assert len(scorer.seen) == 3 * len(CASES)  # every response scored
    assert report["prompts"] == 6 and report["kept"] == 3 and report["verified"] == 1
    assert report["dropped"] == {NO_CORRECT: 1, IDENTICAL: 1, LOW_MARGIN: 1}
    assert report["mean_margin"] == pytest.approx((1.5 + 3.0 + 1.0) / 3)
    assert report["pairs"] == str(out) and not partial_path(out).exists()

    records = list(RecordReader(out, kind="preference"))  # the format the reward model and MPO read
    rows = read_jsonl(out)
    assert [r.line for r in records] == [1, 2, 3]
    by_source = {r["meta"]["pairs"]["source"].rsplit(":", 1)[1]: (r, rec) for r, rec in zip(rows, records)}
    assert sorted(by_source) == ["1", "5", "6"]
    for line, (row, rec) in by_source.items():
        src, texts, scores = CASES[int(line)]
        meta = row["meta"]["pairs"]
        assert meta["responses"] == texts and meta["scores"] == scores  # every response and its score
        assert row["chosen"] == texts[meta["chosen_index"]] and row["rejected"] == texts[meta["rejected_index"]]
        assert row["chosen"].strip() != row["rejected"].strip()
        assert meta["margin"] == pytest.approx(scores[meta["chosen_index"]] - scores[meta["rejected_index"]])
        assert meta["margin"] >= 0.5
        assert row["prompt"] == src["prompt"] and meta["policy"] == "scripted-policy"
        assert meta["reward_model"] == "scripted-rm" and meta["finish_reasons"] == ["stop"] * 3
        if "answer" in src:
            assert row["answer"] == src["answer"] and meta["correct"][meta["chosen_index"]] is True
        else:
            assert "answer" not in row and meta["correct"] is None
        # image paths relative to the output's folder, naming the same files
        for given, resolved in zip(row.get("images", []), rec.images):
            assert not os.path.isabs(given) and given.startswith("../../data/img/")
            assert os.path.samefile(out.parent / given, data.parent / "img" / os.path.basename(given))
            assert os.path.isfile(resolved)
    one = by_source["1"][0]
    assert one["chosen"] == "It is \\boxed{4}." and one["rejected"] == "Answer: \\boxed{6}"  # not the RM's favourite
    assert one["meta"]["pairs"]["correct"] == [False, False, True] and one["meta"]["pairs"]["rule"] == "verified"
    assert one["id"] == 11 and by_source["5"][0]["id"] == "prompts.jsonl:5"
    assert by_source["5"][0]["meta"]["source"] == "synthetic"  # the input meta is kept beside meta.pairs
    six = by_source["6"][0]["meta"]["pairs"]
    assert (six["chosen_index"], six["rejected_index"], six["rule"]) == (0, 2, "reward")


def test_crash_leaves_no_output(tmp_path):
    data, plan, table = job_files(tmp_path)
    out = tmp_path / "pairs.jsonl"
    with pytest.raises(RuntimeError, match="crashed"):
        build_pairs("p", ScriptedScorer(table, fail=True), data, out, PairsConfig(num_samples=3),
                    progress=False, generate_fn=scripted_generator(plan, []))
    assert not out.exists() and not partial_path(out).exists()


BAD_ROWS = [
    ('{"prompt": "ok"}\n{"prompt": "x"', 2, "malformed JSON"),
    ('{"prompt": "ok"}\n\n{"prompt": "x", "images": ["nope.png"]}', 3, "key 'images': image file not found"),
    ('{"prompt": "ok", "answr": "1"}', 1, "'answr'"),
    ('{"prompt": "Pick.", "answer": "Z", "meta": {"choices": ["red", "blue"]}}', 1, "key 'answer'"),
]


@pytest.mark.parametrize("bad, where, what", BAD_ROWS)
def test_bad_input_names_file_line_and_key(tmp_path, capsys, bad, where, what):
    (tmp_path / "in.jsonl").write_text(bad + "\n")
    code = main(["pairs", "--policy", str(tmp_path / "no_policy"), "--reward-model", str(tmp_path / "no_rm"),
                 "--data", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "o.jsonl"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err  # one line, before any model is loaded
    assert err.startswith("skyjax pairs: error: ") and f"in.jsonl:{where}:" in err and what in err, err
    assert not (tmp_path / "o.jsonl").exists()


def test_bad_flags_are_one_line_errors(tmp_path, capsys):
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "ok"}])
    common = ["pairs", "--policy", "p", "--reward-model", "r", "--data", str(tmp_path / "in.jsonl"), "--out",
              str(tmp_path / "o.jsonl")]
    for flags, what in ((["--num-samples", "1"], "--num-samples must be >= 2"),
                        (["--min-margin", "-1"], "--min-margin"), (["--top-p", "2"], "top_p")):
        assert main(common + flags) == 2
        assert what in capsys.readouterr().err


def test_on_error_skip_counts_bad_rows(tmp_path):
    data, plan, table = job_files(tmp_path)
    lines = data.read_text().splitlines()
    lines.insert(1, '{"prompt": "x", "answr": "1"}')  # line 2
    lines.insert(3, '{"prompt": "y", "images": ["img/missing.png"]}')  # line 4
    data.write_text("\n".join(lines) + "\n")
    shifted = {1: plan[1], 3: plan[2], 5: plan[3], 6: plan[4], 7: plan[5], 8: plan[6]}
    report = build_pairs("p", ScriptedScorer(table), data, tmp_path / "o.jsonl",
                         PairsConfig(num_samples=3, min_margin=0.5, on_error="skip"), progress=False,
                         generate_fn=scripted_generator(shifted, []))
    assert report["prompts"] == 8 and report["kept"] == 3
    assert report["dropped"] == {BAD_ROW: 2, NO_CORRECT: 1, IDENTICAL: 1, LOW_MARGIN: 1}
    assert [m.split(":")[1] for m in report["bad_rows"]] == ["2", "4"]


# ---------------------------------------------------------------------------- end to end, tiny real models


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from safetensors.numpy import save_file

    from skyjax.data.tokenizer import build_tiny_tokenizer

    root = tmp_path_factory.mktemp("pairs_models")
    policy = root / "r1v"
    spread_weights(tiny_hf_internvl(policy, build_tiny_tokenizer("r1v")), policy, std=0.3)
    rm = root / "rm"
    tiny_hf_qwen2_5_vl(rm, build_tiny_tokenizer("qwen2_5_vl"))
    rng = np.random.RandomState(0)
    save_file({"v_head.summary.weight": rng.normal(0, 0.5, (1, 64)).astype(np.float32),
               "v_head.summary.bias": np.array([0.3], np.float32)}, str(rm / "value_head.safetensors"))
    return policy, rm


def test_pairs_command_end_to_end_on_tiny_models(tiny_models, tmp_path, capsys):
    policy, rm = tiny_models
    (tmp_path / "data" / "img").mkdir(parents=True)
    random_image(0, 60, 45).save(tmp_path / "data" / "img" / "a.png")
    data = tmp_path / "data" / "prompts.jsonl"
    write_jsonl(data, [{"prompt": "Describe the picture.", "images": ["img/a.png"], "id": "a"},
                       {"prompt": "Count: one two three"},
                       {"prompt": "What is shown?", "images": ["img/a.png"], "answer": "a purple giraffe 9876"}])
    out = tmp_path / "out" / "pairs.jsonl"
    assert main(["pairs", "--policy", str(policy), "--reward-model", str(rm), "--data", str(data), "--out", str(out),
                 "--num-samples", "3", "--max-new-tokens", "6", "--temperature", "1.0", "--batch-size", "4",
                 "--seed", "0", "--score-batch-size", "4", "--mesh", "1,1,1"]) == 0
    err = capsys.readouterr().err
    assert "kept 2 of 3 prompts" in err and f"dropped: {NO_CORRECT} 1" in err, err
    assert "pairs: sample (compiling" in err and "pairs: score (compiling" in err  # one bar, says when it compiles
    rows = read_jsonl(out)
    records = list(RecordReader(out, kind="preference"))
    assert len(rows) == len(records) == 2
    for row in rows:
        meta = row["meta"]["pairs"]
        assert len(meta["responses"]) == len(meta["scores"]) == 3 and all(math.isfinite(s) for s in meta["scores"])
        assert row["chosen"] != row["rejected"] and meta["margin"] > 0
        assert meta["scores"][meta["chosen_index"]] == max(meta["scores"])
        assert meta["rule"] == "reward" and meta["correct"] is None
        assert all(r.startswith("<think>\n") for r in meta["responses"])  # R1V's template opens the think block
    assert rows[0]["images"] == ["../data/img/a.png"] and rows[0]["id"] == "a"
    # the Python API with already-loaded models writes the same pairs
    from skyjax.convert.checkpoint import load_model
    from skyjax.eval.scorer import RewardScorer
    from skyjax.parallel import make_mesh

    again = tmp_path / "out" / "again.jsonl"
    report = build_pairs(load_model(policy, mesh=make_mesh((1, 1, 1))),
                         RewardScorer(rm, mesh_shape=(1, 1, 1), batch_size=4, progress=False), data, again,
                         PairsConfig(num_samples=3, max_new_tokens=6, batch_size=4, mesh_shape=(1, 1, 1)),
                         progress=False)
    assert report["kept"] == 2 and report["dropped"] == {NO_CORRECT: 1}
    for a, b in zip(read_jsonl(out), read_jsonl(again)):
        ma, mb = a["meta"].pop("pairs"), b["meta"].pop("pairs")
        assert a == b and ma["responses"] == mb["responses"]
        np.testing.assert_allclose(ma["scores"], mb["scores"], atol=1e-4)
    # `skyjax score` reads the pairs (images resolve from the output's folder) and gives the same scores
    scored = tmp_path / "scored.jsonl"
    assert main(["score", "--model", str(rm), "--data", str(out), "--out", str(scored), "--batch-size", "4",
                 "--mesh", "1,1,1"]) == 0
    for row, s in zip(rows, read_jsonl(scored)):
        meta = row["meta"]["pairs"]
        assert s["score_chosen"] == pytest.approx(meta["scores"][meta["chosen_index"]], abs=1e-4)
        assert s["score_rejected"] == pytest.approx(meta["scores"][meta["rejected_index"]], abs=1e-4)
