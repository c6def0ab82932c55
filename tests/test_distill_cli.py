"""`skyjax distill`: heuristic scores end to end on PIL-drawn rows (fields in range, penalty = the formula on the
norms), bad input naming file:line, self-distillation accounting (kept / rewritten / dropped) with a scripted
generator, the real generator (per-row penalty P token-identical to transformers on a tiny Qwen2 and on a tiny R1V
with an image; rows a tiny model cannot answer dropped after hinted rewrites), and the model judge (teacher-forced
log-probs against transformers, image necessity on a tiny Qwen2.5-VL)."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from helpers import random_image, spread_weights, tiny_hf_internvl, tiny_hf_qwen2, tiny_hf_qwen2_5_vl
from skyjax.cli import build_parser, main
from skyjax.data.records import parse_record
from skyjax.rl.distill import drlc_penalty
from skyjax.rl.distill_run import (THINK_INSTRUCTION, Completion, GenRequest, model_generator,
                                   read_rows, score_rows, self_distill)
from skyjax.rl.judge import HeuristicQueryJudge, ModelJudge


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def drawn_image(size, blur=0.0):
    """Shapes and lines on white, optionally Gaussian-blurred."""
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)
    w, h = size
    for k in range(6):
        d.rectangle([k * w // 7, k * h // 9, k * w // 7 + w // 8, k * h // 9 + h // 6], outline="black", width=2)
        d.line([0, k * h // 6, w, h - k * h // 6], fill=(200, 30, 30), width=1)
    return im.filter(ImageFilter.GaussianBlur(blur)) if blur else im


QUESTIONS = [
    ("sharp.png", (640, 480), 0.0, "Why does the block on the left of the incline slide faster than the block to the "
                                   "right, given friction 0.2 and mass 3 kg? Explain the force balance.", "3"),
    ("blurry.png", (640, 480), 6.0, "What is shown in the picture?", "a box"),
    ("tiny.png", (40, 30), 0.0, "Which shape is above the line?", "B"),
    (None, None, None, "Compute 17 * 3 if each of the 3 boxes holds 17 apples, then add 2.", "53"),
]


def make_rows(folder):
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (name, size, blur, q, a) in enumerate(QUESTIONS):
        row = {"prompt": q, "answer": a, "id": i}
        if name:
            drawn_image(size, blur).save(folder / "img" / name)
            row["images"] = [f"img/{name}"]
        rows.append(row)
    rows[2]["meta"] = {"choices": ["the square", "the circle"], "source": "synthetic"}
    return rows


def test_heuristic_scores_end_to_end(tmp_path):
    rows = make_rows(tmp_path)
    write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out" / "scored.jsonl"
    assert main(["distill", "--data", str(tmp_path / "in.jsonl"), "--out", str(out), "--no-progress"]) == 0
    got = read_jsonl(out)
    assert len(got) == len(rows)
    for g, src in zip(got, rows):
        assert {k: g[k] for k in src if k != "meta"} == {k: v for k, v in src.items() if k != "meta"}
        assert set(g) == set(src) | {"meta"}  # the scores go under meta: no key the record reader rejects
        assert {k: v for k, v in g["meta"].items() if k not in ("distill", "repetition_penalty")} == \
            src.get("meta", {})  # the input's own meta kept
        parse_record(g, kind="generate")  # reads back as a record (skyjax generate's input)
        d = g["meta"]["distill"]
        assert g["meta"]["repetition_penalty"] == d["penalty"]  # where `skyjax generate` reads a row's P
        assert set(d) == {"clarity", "s_v", "s_t", "s_i", "s_v_norm", "s_t_norm", "s_i_norm", "penalty", "judge"}
        assert d["judge"] == "heuristic"
        assert all(0 <= d[k] <= 1 for k in ("clarity", "s_v", "s_t", "s_i", "s_v_norm", "s_t_norm", "s_i_norm"))
        assert 1 <= d["penalty"] <= 2
        assert d["penalty"] == pytest.approx(drlc_penalty(d["s_v_norm"], d["s_t_norm"], d["s_i_norm"]), abs=1e-5)
    norms = np.array([[g["meta"]["distill"][k] for k in ("s_v_norm", "s_t_norm", "s_i_norm")] for g in got])
    np.testing.assert_allclose(norms.min(0), 0, atol=1e-6)  # min-max over the data set
    np.testing.assert_allclose(norms.max(0), 1, atol=1e-6)
    clar = [g["meta"]["distill"]["clarity"] for g in got]
    assert clar[0] > clar[1] > 0 and clar[0] > clar[2] and clar[3] == 0  # sharp > blurred, small; no image: 0
    p = [g["meta"]["distill"]["penalty"] for g in got]
    assert p[0] == min(p) and p[0] < p[1]  # the hard causal question on a sharp image: the longest chains
    # --alpha 0 turns the penalty off: every row 1
    assert main(["distill", "--data", str(tmp_path / "in.jsonl"), "--out", str(out), "--alpha", "0",
                 "--no-progress"]) == 0
    assert [g["meta"]["distill"]["penalty"] for g in read_jsonl(out)] == [1.0] * len(rows)


@pytest.mark.parametrize("bad, where, what", [
    ('{"prompt": "ok", "answer": "1"}\n{"prompt": "x"', 2, "malformed JSON"),
    ('{"prompt": "ok"}\n\n{"prompt": "x", "images": ["nope.png"]}', 3, "nope.png"),
    ('{"prompt": "ok", "answr": "1"}', 1, "answr"),
    ('{"prompt": [{"role": "user", "content": [{"type": "image"}]}], "images": []}', 1, "placeholder"),
])
def test_bad_input_names_file_and_line(tmp_path, capsys, bad, where, what):
    (tmp_path / "in.jsonl").write_text(bad + "\n")
    code = main(["distill", "--data", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "o.jsonl"),
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and f"in.jsonl:{where}:" in err and what in err, err


def test_self_distill_needs_answers_and_a_model(tmp_path, capsys):
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "What is 2 + 2?", "answer": "4"}, {"prompt": "Why is it so?"}])
    common = ["distill", "--data", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "o.jsonl"), "--no-progress"]
    assert main(common + ["--self-distill"]) == 2
    assert "--model is needed" in capsys.readouterr().err
    rows = read_rows(tmp_path / "in.jsonl")
    scores = score_rows(rows, HeuristicQueryJudge())
    with pytest.raises(ValueError, match=r"in\.jsonl:2: self-distillation needs each row's 'answer'"):
        self_distill(rows, scores, lambda reqs, rnd: [], open(tmp_path / "x.jsonl", "w"))
    # a multiple-choice answer that names none of the options is a data error naming the row, not a dropped row
    write_jsonl(tmp_path / "mc.jsonl", [{"prompt": "Pick one of these.", "answer": "Z",
                                         "meta": {"choices": ["red", "blue"]}}])
    rows = read_rows(tmp_path / "mc.jsonl")
    chain = Completion("<think>hm</think>\nAnswer: \\boxed{A}", 8, "stop")
    with pytest.raises(ValueError, match=r"mc\.jsonl:1: ground truth 'Z' names none of the options"):
        self_distill(rows, score_rows(rows, HeuristicQueryJudge()), lambda reqs, rnd: [[chain] for _ in reqs],
                     open(tmp_path / "x.jsonl", "w"))


def test_accepted_chains():
    from skyjax.rl.distill_run import accepted

    good = Completion("<think>3 + 4 = 7</think>\nAnswer: \\boxed{7}", 12, "stop")
    assert accepted(good, "7", None) and accepted(good, "7", None, hinted=True)
    assert not accepted(good, "8", None)  # wrong answer
    assert not accepted(Completion(good.text, 12, "length"), "7", None)  # cut off by the budget
    assert not accepted(Completion("Answer: \\boxed{7}", 5, "stop"), "7", None)  # no think block
    assert accepted(Completion("3 + 4 = 7</think>\n\\boxed{7}", 9, "stop", think_opened=True), "7", None)
    leak = Completion("<think>The correct final answer is 7, so 3 + 4 = 7.</think>\nAnswer: \\boxed{7}", 20, "stop")
    assert accepted(leak, "7", None) and not accepted(leak, "7", None, hinted=True)  # mentions the hint
    mc = Completion("<think>red it is</think>\nAnswer: \\boxed{A}", 9, "stop")
    assert accepted(mc, "red", ["red", "blue"]) and not accepted(mc, "B", ["red", "blue"])


def scripted_generator(plan, calls):
    """A GenerateFn: plan[id] = the rounds (0 = first pass, 1.. = hinted) whose first sample is correct."""
    def run(requests, rnd):
        calls.append((rnd, requests))
        out = []
        for r in requests:
            text = r.conversation[-1]["content"]
            text = text if isinstance(text, str) else " ".join(p.get("text") or "" for p in text)
            rid = next(k for k in plan if plan[k]["q"] in text)
            truth = plan[rid]["a"]
            good = rnd in plan[rid]["ok_rounds"]
            body = "step " * (3 + 4 * rid)  # chain length grows with the id
            wrong = Completion(f"<think>{body}</think>\nAnswer: \\boxed{{wrong}}", 9 + 4 * rid, "stop")
            right = Completion(f"<think>{body}</think>\nAnswer: \\boxed{{{truth}}}", 10 + 4 * rid, "stop")
            cut = Completion(f"<think>{body}</think>\nAnswer: \\boxed{{{truth}}}", 10 + 4 * rid, "length")
            # sample 0 cut off by the budget (never kept even if right), sample 1 decides
            out.append([cut, right if good else wrong])
        return out
    return run


def test_self_distill_keep_rewrite_drop_accounting(tmp_path):
    rows = make_rows(tmp_path)
    write_jsonl(tmp_path / "in.jsonl", rows)
    plan = {i: {"q": q[:20], "a": a, "ok_rounds": ok} for i, ((_, _, _, q, a), ok)
            in enumerate(zip(QUESTIONS, [{0}, {2}, set(), {1, 2}]))}
    calls = []
    out = tmp_path / "sft.jsonl"
    args = build_parser().parse_args(["distill", "--data", str(tmp_path / "in.jsonl"), "--out", str(out),
                                      "--self-distill", "--max-rewrites", "2", "--quantiles", "2", "--batch-size",
                                      "3", "--no-progress"])
    from skyjax.rl.cli import run

    assert run(args, generate_fn=scripted_generator(plan, calls)) == 0
    report = json.loads((tmp_path / "sft.report.json").read_text())
    # row 0 right at once; row 1 right at the 2nd hinted round; row 2 (multiple choice) never;
    # row 3 right at the 1st hinted round
    assert (report["kept"], report["rewritten"], report["dropped"], report["rows"]) == (1, 2, 1, 4)
    # rounds per batch (batch size 3): rows 0-2 then row 3; only unresolved rows are resampled; bounded by K + 1
    assert [(rnd, len(reqs)) for rnd, reqs in calls] == [(0, 3), (1, 2), (2, 2), (0, 1), (1, 1)]
    assert report["samples_generated"] == 2 * (3 + 2 + 2 + 1 + 1)
    for rnd, reqs in calls:
        for r in reqs:
            last = r.conversation[-1]["content"]
            text = last if isinstance(last, str) else last[-1]["text"]
            assert text.endswith(THINK_INSTRUCTION) == (rnd == 0)
            assert ("The correct final answer is" in text) == (rnd > 0)
    scored = {r.key: r.penalty for _, reqs in calls for r in reqs}
    sft = read_jsonl(out)
    assert [s["id"] for s in sft] == [0, 1, 3]
    for s in sft:
        src = rows[s["id"]]
        rec = parse_record(s, kind="sft", source="sft.jsonl", line=1)  # a valid SFT record of the repo's format
        assert rec.completion[0].content.startswith("<think>") and s["prompt"] == src["prompt"]  # no hint kept
        d = s["meta"]["distill"]
        assert d["source"] == ("kept" if s["id"] == 0 else "rewritten")
        assert d["attempts"] == {0: 1, 1: 3, 3: 2}[s["id"]] and d["num_tokens"] == 10 + 4 * s["id"]
        assert 1 <= d["penalty"] <= 2 and scored[src["id"] + 1] == d["penalty"]  # the penalty the generator got
        assert s["answer"] == src["answer"] and all(p.startswith(str(tmp_path)) for p in s.get("images", []))
    bins = report["chain_length_by_penalty_quantile"]
    assert [b["rows"] for b in bins] == [2, 2] and sum(b["dropped"] for b in bins) == 1
    lengths = {s["id"]: s["meta"]["distill"]["num_tokens"] for s in sft}
    pen = {s["id"]: s["meta"]["distill"]["penalty"] for s in sft}
    low = [i for i in lengths if pen[i] <= report["penalty_quantile_edges"][1]]
    assert bins[0]["mean_tokens"] == pytest.approx(np.mean([lengths[i] for i in low]))


class Stop(Exception):
    """Stands for a kill in the middle of a job."""


def test_scoring_resumes_after_a_kill(tmp_path, monkeypatch):
    """A scoring job killed after its first judged batch keeps that batch in OUT.partial.jsonl; the rerun judges only
    the rest and writes what one uninterrupted run writes; a partial file of another job is refused."""
    from skyjax.rl.judge import ProtocolJudge

    rows = make_rows(tmp_path)
    write_jsonl(tmp_path / "in.jsonl", rows)
    once, out = tmp_path / "once.jsonl", tmp_path / "out.jsonl"
    common = ["--data", str(tmp_path / "in.jsonl"), "--batch-size", "2", "--no-progress"]
    assert main(["distill", "--out", str(once), *common]) == 0
    judged, score = [], ProtocolJudge.score

    def judging(die: bool):
        def run(self, queries):
            if die and judged:
                raise Stop
            judged.append([int(q.where.rsplit(":", 1)[1]) for q in queries])
            return score(self, queries)
        return run

    monkeypatch.setattr(ProtocolJudge, "score", judging(die=True))
    with pytest.raises(Stop):
        main(["distill", "--out", str(out), *common])
    partial = tmp_path / "out.jsonl.partial.jsonl"
    assert not out.exists() and len(read_jsonl(partial)) == 1 + 2  # the header, the first batch's two rows
    judged.clear()
    monkeypatch.setattr(ProtocolJudge, "score", judging(die=False))
    assert main(["distill", "--out", str(out), *common]) == 0
    assert judged == [[3, 4]]  # only the rows the killed job had not judged
    assert out.read_text() == once.read_text() and not partial.exists()
    # a partial file of another job (other alpha) is refused with one line
    write_jsonl(partial, [{"job": {"data": "elsewhere"}}])
    assert main(["distill", "--out", str(out), *common, "--alpha", "0.5"]) == 2


def test_self_distill_resumes_after_a_kill(tmp_path):
    """Killed during the second batch of chains, the rerun generates only the rows not logged, and OUT and the report
    equal an uninterrupted run's."""
    rows = make_rows(tmp_path)
    write_jsonl(tmp_path / "in.jsonl", rows)
    plan = {i: {"q": q[:20], "a": a, "ok_rounds": ok} for i, ((_, _, _, q, a), ok)
            in enumerate(zip(QUESTIONS, [{0}, {2}, set(), {1, 2}]))}
    from skyjax.rl.cli import run

    def job(out):
        return build_parser().parse_args(["distill", "--data", str(tmp_path / "in.jsonl"), "--out", str(out),
                                          "--self-distill", "--batch-size", "2", "--no-progress"])

    calls = []
    assert run(job(tmp_path / "once.jsonl"), generate_fn=scripted_generator(plan, calls)) == 0
    first, script = [], scripted_generator(plan, [])

    def dying(requests, rnd):
        if any(r.key > 2 for r in requests):  # the second batch (input lines 3, 4)
            raise Stop
        first.append([r.key for r in requests])
        return script(requests, rnd)

    out = tmp_path / "sft.jsonl"
    with pytest.raises(Stop):
        run(job(out), generate_fn=dying)
    assert not out.exists() and first[0] == [1, 2]
    calls = []
    assert run(job(out), generate_fn=scripted_generator(plan, calls)) == 0
    assert {r.key for _, reqs in calls for r in reqs} == {3, 4}  # the first batch's rows were not redone
    assert out.read_text() == (tmp_path / "once.jsonl").read_text()
    assert (tmp_path / "sft.report.json").read_text().replace("sft.jsonl", "once.jsonl") == \
        (tmp_path / "once.report.json").read_text()
    assert not (tmp_path / "sft.jsonl.partial.jsonl").exists()


# ------------------------------------------------------------------------------------------------ with a real model


@pytest.fixture(scope="module")
def qwen2_folder(tmp_path_factory):
    from skyjax.data.tokenizer import build_tiny_tokenizer

    folder = tmp_path_factory.mktemp("distill_qwen2")
    build_tiny_tokenizer("qwen2", out_dir=folder)
    hf = spread_weights(tiny_hf_qwen2(folder), folder, std=0.3)
    return folder, hf


def prompt_ids(adapter, tok, conv):
    """The chat-templated prompt of one conversation, without padding."""
    inputs = adapter.prepare([list(conv)], [[]], tok)
    return inputs["input_ids"][0][inputs["attention_mask"][0]]


def test_row_penalty_matches_transformers(qwen2_folder):
    """Rows with different P in one batch (greedy; one prompt twice) == transformers generate(repetition_penalty=P)
    on each row alone, token for token."""
    from skyjax.convert.checkpoint import load_hf
    from skyjax.data.tokenizer import load_tokenizer
    from skyjax.sample.adapters import adapter_for
    from skyjax.sample.decode import Sampling

    folder, hf = qwen2_folder
    lm = load_hf(folder)
    tok, ad = load_tokenizer(folder), adapter_for(lm)
    count = ({"role": "user", "content": "Count: one two three"},)
    convs = [count, count, ({"role": "user", "content": "Say it again and again: la la la."},)]
    penalties = (1.0, 1.8, 1.5)  # one prompt under two penalties, in one batch with a third row
    new = 12
    sampling = Sampling(max_new_tokens=new, temperature=0.0)  # no stop ids: every row runs the full budget
    gen = model_generator(lm, tok, ad, sampling, batch_size=4)
    got = gen([GenRequest(c, (), p, i) for i, (c, p) in enumerate(zip(convs, penalties))], 0)
    for conv, p, comps in zip(convs, penalties, got):
        ids = torch.as_tensor(prompt_ids(ad, tok, conv), dtype=torch.long)[None]
        with torch.no_grad():
            ref = hf.generate(ids, max_new_tokens=new, do_sample=False, repetition_penalty=p, eos_token_id=None,
                              pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
        [c] = comps
        assert c.num_tokens == new and c.finish_reason == "length"
        assert list(c.token_ids) == ref.tolist()
        assert c.text == tok.decode(ref.tolist(), skip_special_tokens=True)
    assert got[0][0].token_ids != got[1][0].token_ids  # the same prompt, changed by its row's penalty


def test_self_distill_tiny_model_drops_what_it_cannot_answer(qwen2_folder, tmp_path):
    folder, _ = qwen2_folder
    rows = [{"prompt": "What is the 40th prime number times 7?", "answer": "1211", "id": "a"},
            {"prompt": "Why does ice float on water? Give the density ratio.", "answer": "0.917", "id": "b"},
            {"prompt": "Name the capital.", "answer": "Ouagadougou", "id": "c"}]
    write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "sft.jsonl"
    assert main(["distill", "--model", str(folder), "--data", str(tmp_path / "in.jsonl"), "--out", str(out),
                 "--self-distill", "--max-new-tokens", "6", "--temperature", "1.0", "--num-samples", "2",
                 "--max-rewrites", "1", "--batch-size", "2", "--mesh", "1,1,1", "--no-progress"]) == 0
    report = json.loads((tmp_path / "sft.report.json").read_text())
    assert (report["kept"], report["rewritten"], report["dropped"]) == (0, 0, 3)
    assert report["samples_generated"] == 3 * 2 * 2  # every row: the first pass and one hinted round, 2 samples
    assert out.read_text() == ""


def test_model_judge_answer_logprob_matches_transformers(qwen2_folder):
    """Teacher-forced mean log-prob of each reference answer, two rows of different prompt and answer lengths in
    one batch (left- and right-padded), == a transformers forward on each row alone."""
    from skyjax.convert.checkpoint import load_hf
    from skyjax.data.tokenizer import load_tokenizer

    folder, hf = qwen2_folder
    lm = load_hf(folder)
    tok = load_tokenizer(folder)
    judge = ModelJudge(lm, tok)
    convs = [[{"role": "user", "content": "What is two plus two?"}],
             [{"role": "user", "content": "Name the largest planet of the solar system, please, in one word."}]]
    answers = ["four, of course", "Jupiter"]
    got = judge.answer_logprobs(convs, [[], []], answers)
    for conv, answer, value in zip(convs, answers, got):
        prompt = prompt_ids(judge.adapter, tok, conv).tolist()
        target = tok.encode(answer, add_special_tokens=False)
        with torch.no_grad():
            logits = hf(torch.as_tensor([prompt + target])).logits[0].float()
        lp = torch.log_softmax(logits, -1)[len(prompt) - 1: len(prompt) - 1 + len(target)]
        ref = lp[torch.arange(len(target)), torch.as_tensor(target)].mean().item()
        assert value == pytest.approx(ref, abs=1e-4)
    assert judge.answer_logprob(convs[1], [], answers[1]) == pytest.approx(got[1], abs=1e-5)


def test_model_judge_image_necessity_on_qwen2_5_vl(tmp_path):
    """`--judge model` on a vision model: necessity = log-prob with the image - without, both from the judge's own
    teacher forcing; a text-only row gets 0; the output rows carry it."""
    from skyjax.data.tokenizer import build_tiny_tokenizer

    folder = tmp_path / "vl"
    spread_weights(tiny_hf_qwen2_5_vl(folder, build_tiny_tokenizer("qwen2_5_vl")), folder, std=0.3)
    (tmp_path / "img").mkdir()
    random_image(5, 56, 56).save(tmp_path / "img" / "a.png")
    rows = [{"images": ["img/a.png"], "prompt": "Which colour dominates?", "answer": "red"},
            {"prompt": "How many sides has a square?", "answer": "4"}]
    write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    assert main(["distill", "--model", str(folder), "--data", str(tmp_path / "in.jsonl"), "--out", str(out),
                 "--judge", "model", "--mesh", "1,1,1", "--no-progress"]) == 0
    got = read_jsonl(out)
    nec = [g["meta"]["distill"]["judge_details"]["image_necessity"] for g in got]
    assert nec[1] == 0.0 and nec[0] != 0.0 and all(g["meta"]["distill"]["judge"] == "model" for g in got)
    s_v = got[0]["meta"]["distill"]["s_v"]
    assert s_v == pytest.approx(0.5 * (got[0]["meta"]["distill"]["clarity"] + 1 / (1 + math.exp(-nec[0]))), abs=1e-5)


def test_row_penalty_r1v_image_rows_and_opened_think(tmp_path):
    """A tiny Skywork R1V (R1-distill chat template, which opens <think> itself): an image row and a text row with
    different P in one batch == transformers generate(repetition_penalty=P) on each row alone; the completions
    know that they start inside the think block, and the SFT chain gets the opening tag back."""
    from skyjax.convert.checkpoint import load_hf
    from skyjax.data.tokenizer import build_tiny_tokenizer, load_tokenizer
    from skyjax.rl.distill_run import full_chain
    from skyjax.sample.adapters import adapter_for
    from skyjax.sample.decode import Sampling

    folder = tmp_path / "r1v"
    hf = spread_weights(tiny_hf_internvl(folder, build_tiny_tokenizer("r1v")), folder, std=0.3)
    lm = load_hf(folder)
    tok, ad = load_tokenizer(folder), adapter_for(lm)
    img = random_image(3, 90, 60)
    convs = [({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]},),
             ({"role": "user", "content": "Count: one two three"},)]
    images, penalties, new = [(img,), ()], (1.5, 1.3), 8
    gen = model_generator(lm, tok, ad, Sampling(max_new_tokens=new), batch_size=2)
    got = gen([GenRequest(c, i, p, k) for k, (c, i, p) in enumerate(zip(convs, images, penalties))], 0)
    for conv, imgs, p, [c] in zip(convs, images, penalties, got):
        one = ad.prepare([list(conv)], [list(imgs)], tok)
        kw = {"input_ids": torch.as_tensor(one["input_ids"][:, one["attention_mask"][0]], dtype=torch.long)}
        if imgs:
            kw["pixel_values"] = torch.as_tensor(one["pixel_values"][: int(np.sum(one["tiles_per_row"]))])
        with torch.no_grad():
            ref = hf.generate(**kw, max_new_tokens=new, do_sample=False, repetition_penalty=p, eos_token_id=None,
                              pad_token_id=tok.pad_token_id)[0, kw["input_ids"].shape[1]:]
        assert list(c.token_ids) == ref.tolist()
        assert c.think_opened and full_chain(c) == "<think>\n" + c.text


def test_model_judge_ratings(qwen2_folder, tmp_path, capsys):
    """--judge-rate: the policy's answer to the fixed rating prompt sets S_t and S_I (thinking first and prose
    around the JSON are fine); an answer cut off by the token budget stops the job naming the row."""
    from skyjax.convert.checkpoint import load_hf
    from skyjax.data.tokenizer import load_tokenizer
    from skyjax.rl.judge import ENDPOINT_PROMPT, JudgeError, Query

    folder, _ = qwen2_folder
    lm = load_hf(folder)
    tok = load_tokenizer(folder)
    answers = ['<think>It asks for a sum.</think>\n{"image_necessity": 0, "image_relevance": 0, '
               '"question_quality": 9, "difficulty": 3, "reasoning_demand": 6, "integration": 2}',
               'Here you go: {"image_necessity": 1, "image_relevance": 2, "question_quality": 4, "difficulty": 5, '
               '"reasoning_demand": 6, "integration": 10} Hope it helps.',
               "I would rate it highly."]
    seen = []

    def fake(requests, rnd):
        seen.extend(requests)
        return [[Completion(answers[r.key], 30, "stop")] for r in requests]

    judge = ModelJudge(lm, tok, rate=True, generate_fn=fake)
    queries = [Query("What is 2 + 2?", where="a:1"), Query("Why is the sky blue?", where="a:2")]
    s = judge.score(queries)
    assert [r.conversation[0]["content"][-1]["text"] for r in seen] == [ENDPOINT_PROMPT + q.question
                                                                       for q in queries]
    assert s[0].s_t == pytest.approx(18 / 30) and s[0].s_i == pytest.approx(0.2)
    assert s[1].s_t == pytest.approx(15 / 30) and s[1].s_i == pytest.approx(1.0)
    assert s[1].s_v == pytest.approx((0 + 0.5 + 0.2) / 3) and s[1].details["rated_integration"] == 10.0
    with pytest.raises(JudgeError, match=r"^a:5: judge answer is not JSON"):  # the third answer is prose
        judge.score([Query("Explain.", where=f"a:{i}") for i in (3, 4, 5)])

    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "What is 2 + 2?", "answer": "4"}])
    assert main(["distill", "--model", str(folder), "--data", str(tmp_path / "in.jsonl"), "--out",
                 str(tmp_path / "o.jsonl"), "--judge", "model", "--judge-rate", "--judge-max-new-tokens", "3",
                 "--mesh", "1,1,1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "in.jsonl:1: the model's rating was cut off after 3 tokens" in err, err
