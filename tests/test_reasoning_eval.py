"""`skyjax eval mathvista|mmmu`: hand-written rows in each benchmark's published schema (images drawn with PIL),
the papers' prompts, `<image k>` placement, scoring rules, pass@1 over k samples and per-group means against a hand
computation from injected completions, bad-input errors (file and line), parquet input, and the command end to end
on a tiny random R1V."""

import io
import json

import pytest

from helpers import random_image
from skyjax.cli import main
from skyjax.eval.common import BenchmarkFormatError
from skyjax.eval.reasoning import (FREE_FORM_INSTRUCTION, MC_INSTRUCTION, evaluate, is_correct, load_items,
                                   open_image, summarize, score_item)

MATHVISTA = [
    {"pid": "1", "question": "What is the measure of angle ABC?", "image": "images/1.png",
     "choices": ["135°", "140°", "145°", "150°"], "unit": None, "precision": None, "answer": "145°",
     "question_type": "multi_choice", "answer_type": "text",
     "metadata": {"category": "math-targeted-vqa", "task": "geometry problem solving", "grade": "high school",
                  "skills": ["geometry reasoning", "algebraic reasoning"], "context": "geometry diagram"}},
    {"pid": "2", "question": "How many bars are above 10?", "image": "images/2.png", "choices": None, "unit": None,
     "precision": None, "answer": "3", "question_type": "free_form", "answer_type": "integer",
     "metadata": {"category": "general-vqa", "task": "figure question answering", "skills": ["statistical reasoning"]}},
    {"pid": "3", "question": "What is the slope of the line?", "image": "images/3.png", "choices": None, "unit": "",
     "precision": 1.0, "answer": "1.2", "question_type": "free_form", "answer_type": "float",
     "metadata": {"category": "math-targeted-vqa", "task": "textbook question answering",
                  "skills": ["algebraic reasoning"]}},
    {"pid": "4", "question": "How long is side AB?", "image": "images/4.png", "choices": None, "unit": "cm",
     "precision": None, "answer": "5", "question_type": "free_form", "answer_type": "integer",
     "metadata": {"category": "math-targeted-vqa", "task": "geometry problem solving",
                  "skills": ["geometry reasoning"]}},
]

MMMU = [
    {"id": "validation_Math_1", "question": "In <image 1>, which option shows the same shape?",
     "options": "['4 cm', '<image 2>', '6 cm', '7 cm']", "answer": "B", "image_1": "images/m1.png",
     "image_2": "images/m2.png", "image_3": None, "question_type": "multiple-choice", "subfield": "Geometry",
     "topic_difficulty": "Medium"},
    {"id": "validation_Physics_3", "question": "<image 1> What is the speed in m/s?", "options": "[]",
     "answer": "2.5", "image_1": "images/m3.png", "question_type": "open", "subfield": "Mechanics",
     "topic_difficulty": "Hard"},
    {"id": "validation_Art_Theory_2", "question": "Which period is the painting <image 1> from?",
     "options": "['Baroque', 'Rococo', 'Gothic']", "answer": "A", "image_1": "images/m4.png",
     "question_type": "multiple-choice", "subfield": "Art History", "topic_difficulty": "Easy"},
]


def write_rows(folder, name, rows, images):
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        random_image(i + 1, 56, 56).save(folder / image)
    path = folder / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows))
    return path


@pytest.fixture
def mathvista(tmp_path):
    return write_rows(tmp_path, "testmini.jsonl", MATHVISTA, [r["image"] for r in MATHVISTA])


@pytest.fixture
def mmmu(tmp_path):
    return write_rows(tmp_path, "validation.jsonl", MMMU, [f"images/m{i}.png" for i in range(1, 5)])


def test_prompts_multiple_choice_and_free_form(mathvista):
    items, skipped = load_items("mathvista", mathvista)
    assert skipped == [] and [it.id for it in items] == ["1", "2", "3", "4"]
    mc, free, _, unit = items
    assert mc.question_type == "multiple_choice" and mc.answer == "C"
    assert mc.choices == ("135°", "140°", "145°", "150°")
    assert mc.prompt_text == ("What is the measure of angle ABC?\nOptions:\nA. 135°\nB. 140°\nC. 145°\nD. 150°\n\n"
                              + MC_INSTRUCTION)
    assert "The last line of your response should follow this format: 'Answer: \\boxed{$LETTER}' (without quotes)" \
        in MC_INSTRUCTION and "Avoid repeating steps indefinitely—provide your best guess even if unsure." \
        in MC_INSTRUCTION and MC_INSTRUCTION.startswith("Answer the multiple choice preceding question.")
    assert free.prompt_text == "How many bars are above 10?\n\n" + FREE_FORM_INSTRUCTION
    assert "'Answer: \\boxed{$FINAL_ANSWER}' (without quotes), where FINAL_ANSWER is your conclusion." \
        in FREE_FORM_INSTRUCTION and "Avoid repeating steps indefinitely" in FREE_FORM_INSTRUCTION
    assert unit.prompt_text.startswith("How long is side AB? (Unit: cm)\n\n")
    # R1V's convention: the image part before the text
    assert mc.conversation() == [{"role": "user", "content": [{"type": "image"},
                                                              {"type": "text", "text": mc.prompt_text}]}]
    assert mc.image_sequence() == [str(mathvista.parent / "images" / "1.png")]
    assert mc.groups["skills"] == ["geometry reasoning", "algebraic reasoning"]
    assert mc.groups["category"] == ["math-targeted-vqa"] and mc.groups["question_type"] == ["multi_choice"]


def test_mmmu_image_references_first_and_inline(mmmu):
    first, _ = load_items("mmmu", mmmu)
    item = first[0]
    assert item.answer == "B" and item.choices == ("4 cm", "<image 2>", "6 cm", "7 cm")
    # default: both images first in index order, the references kept as text naming them
    assert item.parts[:2] == (0, 1) and len(item.parts) == 3
    assert item.parts[2].startswith("In <image 1>, which option") and "B. <image 2>\n" in item.parts[2]
    assert item.image_sequence() == [str(mmmu.parent / "images" / f"m{k}.png") for k in (1, 2)]
    assert item.groups["subject"] == ["Math"] and item.groups["discipline"] == ["Science"]
    assert first[2].groups["subject"] == ["Art_Theory"] and first[2].groups["discipline"] == ["Art & Design"]

    inline, _ = load_items("mmmu", mmmu, image_placement="inline")
    parts = inline[0].parts
    assert parts[0] == "In " and parts[1] == 0 and parts[2].startswith(", which option shows")
    assert parts[2].endswith("A. 4 cm\nB. ") and parts[3] == 1 and parts[4].startswith("\nC. 6 cm")
    assert "<image" not in "".join(p for p in parts if isinstance(p, str))
    content = inline[0].conversation()[0]["content"]
    assert [c["type"] for c in content] == ["text", "image", "text", "image", "text"]
    # an image the text never names goes first
    row = dict(MMMU[1], question="What is the speed in m/s?")
    path = write_rows(mmmu.parent, "unreferenced.jsonl", [row], [])
    (item,), _ = load_items("mmmu", path, image_placement="inline")
    assert item.parts[0] == 0 and isinstance(item.parts[1], str)


def completion(answer: str) -> str:
    return f"<think>\nreasoning about it\n</think>\nSo the result follows.\nAnswer: \\boxed{{{answer}}}"


def test_scoring_rules(mathvista, mmmu):
    mc, integer, flt, unit = load_items("mathvista", mathvista)[0]
    assert is_correct(mc, completion("C"))[:2] == (True, "C")
    assert is_correct(mc, completion("145°"))[:2] == (True, "C")  # the option's text names its letter
    assert is_correct(mc, completion("B"))[0] is False
    assert is_correct(mc, "<think>\nAnswer: \\boxed{C}")[0] is False  # never closed: the answer is reasoning
    assert is_correct(integer, completion("3"))[0] and is_correct(integer, completion("3.0"))[0]
    assert not is_correct(integer, completion("3.0001"))[0]  # integers exactly
    assert is_correct(flt, completion("1.23"))[0]  # rounded to precision 1
    assert is_correct(flt, completion("1.2"))[0] and not is_correct(flt, completion("1.26"))[0]
    assert is_correct(unit, completion("5"))[0] and is_correct(unit, completion("5 cm"))[0]
    assert not is_correct(unit, completion("5 m"))[0]
    assert is_correct(integer, "Counting the bars\nis hard.") == (False, None, "no answer found")

    mc2, open_q, _ = load_items("mmmu", mmmu)[0]
    assert is_correct(mc2, completion("B"))[0] and not is_correct(mc2, completion("A"))[0]
    assert is_correct(open_q, completion("2.50"))[0] and is_correct(open_q, completion("2.5 m/s"))[0]
    assert not is_correct(open_q, completion("25"))[0]
    listed = dict(MMMU[1], answer="['24', '24.5']")
    path = write_rows(mmmu.parent, "listed.jsonl", [listed], [])
    (item,), _ = load_items("mmmu", path)
    assert item.answer == ("24", "24.5") and is_correct(item, completion("24.5"))[0]


def test_pass_at_1_and_groups_equal_a_hand_computation(mathvista):
    """k = 3 injected completions per row: rows have 2, 1, 0 and 3 correct samples."""
    items, _ = load_items("mathvista", mathvista)
    texts = {
        "1": [completion("C"), completion("145°"), completion("A")],  # 2 of 3
        "2": [completion("4"), completion("3"), "Hmm.\nI am not sure."],  # 1 of 3
        "3": [completion("2"), completion("1.5"), completion("0")],  # 0 of 3
        "4": [completion("5"), completion("5 cm"), completion("5.0")],  # 3 of 3
    }
    calls, seen = [], []

    def complete(batch):
        calls.append([it.id for it in batch])
        return [[{"text": t, "num_tokens": 7} for t in texts[it.id]] for it in batch]

    result = evaluate(items, complete, 3, batch_size=3, on_batch=lambda rows, n: seen.append((len(rows), n)))
    assert calls == [["1", "2", "3"], ["4"]] and seen == [(3, 3), (1, 1)]
    s = result["summary"]
    assert s["num_rows"] == 4 and s["num_samples"] == 3
    assert s["pass@1"] == pytest.approx((2 / 3 + 1 / 3 + 0 + 1) / 4)
    # the k single-sample accuracies ("runs"): sample j correct in rows ...
    assert s["runs"] == pytest.approx([(1 + 0 + 0 + 1) / 4, (1 + 1 + 0 + 1) / 4, (0 + 0 + 0 + 1) / 4])
    assert sum(s["runs"]) / 3 == pytest.approx(s["pass@1"])
    g = s["groups"]
    assert g["category"]["math-targeted-vqa"] == {"pass@1": pytest.approx((2 / 3 + 0 + 1) / 3), "count": 3}
    assert g["category"]["general-vqa"] == {"pass@1": pytest.approx(1 / 3), "count": 1}
    assert g["task"]["geometry problem solving"] == {"pass@1": pytest.approx((2 / 3 + 1) / 2), "count": 2}
    assert g["skills"]["algebraic reasoning"] == {"pass@1": pytest.approx((2 / 3 + 0) / 2), "count": 2}
    assert g["skills"]["geometry reasoning"]["pass@1"] == pytest.approx((2 / 3 + 1) / 2)
    assert g["question_type"]["free_form"] == {"pass@1": pytest.approx((1 / 3 + 0 + 1) / 3), "count": 3}
    rows = result["rows"]
    assert [r["num_correct"] for r in rows] == [2, 1, 0, 3]
    assert rows[0]["answer"] == "C" and rows[0]["choices"][2] == "145°"
    first = rows[0]["samples"]
    assert [x["extracted"] for x in first] == ["C", "C", "A"] and [x["correct"] for x in first] == [True, True, False]
    assert first[0]["num_tokens"] == 7 and first[0]["text"] == texts["1"][0]
    assert rows[1]["samples"][2] == {"text": "Hmm.\nI am not sure.", "num_tokens": 7, "extracted": None,
                                     "correct": False, "reason": "no answer found"}
    # an item the completer could not run (None) is left out of the rows and the means
    partial = evaluate(items, lambda b: [None if it.id == "4" else texts[it.id] for it in b], 3)
    assert partial["summary"]["num_rows"] == 3 and partial["summary"]["pass@1"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="2 samples, expected 3"):
        summarize([score_item(items[0], texts["1"][:2])], 3)


def _expect_error(benchmark, path, match):
    with pytest.raises(BenchmarkFormatError, match=match):
        load_items(benchmark, path)


def test_bad_input_names_file_and_line(tmp_path, capsys):
    bad = [MATHVISTA[0], {k: v for k, v in MATHVISTA[1].items() if k != "answer"}]
    path = write_rows(tmp_path, "a.jsonl", bad, ["images/1.png", "images/2.png"])
    _expect_error("mathvista", path, r"a\.jsonl, line 2: missing key 'answer'")
    path = write_rows(tmp_path, "a2.jsonl", [dict(MMMU[1], answer="  ")], ["images/m3.png"])
    _expect_error("mmmu", path, r"a2\.jsonl, line 1: missing key 'answer'")
    path = write_rows(tmp_path, "b.jsonl", [dict(MATHVISTA[0], image="images/nope.png")], [])
    _expect_error("mathvista", path, r"b\.jsonl, line 1: image 'images/nope.png' not found")
    path = write_rows(tmp_path, "c.jsonl", [MATHVISTA[0], dict(MATHVISTA[0], answer="160°")], [])
    _expect_error("mathvista", path, r"c\.jsonl, line 2: answer '160°' is not among the choices")
    path = write_rows(tmp_path, "d.jsonl", [dict(MMMU[2], answer="D")], ["images/m4.png"])
    _expect_error("mmmu", path, r"d\.jsonl, line 1: answer 'D' is not among the choices \['A', 'B', 'C'\]")
    path = write_rows(tmp_path, "e.jsonl", [dict(MMMU[0], image_2=None)], ["images/m1.png"])
    _expect_error("mmmu", path, r"e\.jsonl, line 1: the question refers to <image 2> but 'image_2' is missing")
    path = write_rows(tmp_path, "f.jsonl", [MMMU[2], "{not json"], [])
    _expect_error("mmmu", path, r"f\.jsonl, line 2: invalid JSON")

    # skip: counted and listed, the good rows kept
    rows = [MATHVISTA[0], {k: v for k, v in MATHVISTA[1].items() if k != "pid"}, dict(MATHVISTA[2], image="x.png"),
            MATHVISTA[3]]
    path = write_rows(tmp_path, "g.jsonl", rows, [r["image"] for r in MATHVISTA])
    items, skipped = load_items("mathvista", path, on_error="skip")
    assert [it.id for it in items] == ["1", "4"] and len(skipped) == 2
    assert "g.jsonl, line 2: missing key 'pid'" in skipped[0] and "g.jsonl, line 3: image 'x.png'" in skipped[1]
    assert [it.index for it in items] == [0, 3]  # positions in the file key the sampling

    # the command: one line naming the file and line, exit status 2, before any model is loaded
    code = main(["eval", "mathvista", "--model", str(tmp_path / "no_model"), "--data", str(path), "--mesh", "1,1,1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("skyjax eval mathvista: error: ") and "g.jsonl, line 2: missing key 'pid'" in err[0]


def test_parquet_with_image_bytes(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    def png(seed):
        buf = io.BytesIO()
        random_image(seed, 40, 30).save(buf, format="PNG")
        return buf.getvalue()

    row = dict(MATHVISTA[0], metadata=MATHVISTA[0]["metadata"], decoded_image={"bytes": png(1), "path": "1.png"},
               precision=float("nan"))
    pq.write_table(pa.Table.from_pylist([row]), tmp_path / "testmini-00000.parquet")
    (item,), _ = load_items("mathvista", tmp_path)  # a folder of shards (the Hugging Face layout)
    assert item.answer == "C" and item.precision is None and isinstance(item.images[0], bytes)
    assert open_image(item.images[0], item.where).size == (40, 30)
    assert item.where.endswith("testmini-00000.parquet, row 1")

    mm = dict(MMMU[0], image_1={"bytes": png(2), "path": "a.png"}, image_2={"bytes": png(3), "path": "b.png"})
    pq.write_table(pa.Table.from_pylist([mm]), tmp_path / "mmmu.parquet")
    (item,), _ = load_items("mmmu", tmp_path / "mmmu.parquet")
    assert [open_image(s, item.where).size for s in item.image_sequence()] == [(40, 30), (40, 30)]
    with pytest.raises(BenchmarkFormatError, match=r"mmmu\.parquet, row 1: "):
        open_image(b"not an image", item.where)


@pytest.fixture(scope="module")
def tiny_r1v(tmp_path_factory):
    from helpers import spread_weights, tiny_hf_internvl
    from skyjax.data.tokenizer import build_tiny_tokenizer

    folder = tmp_path_factory.mktemp("r1v_reasoning")
    spread_weights(tiny_hf_internvl(folder, build_tiny_tokenizer("r1v")), folder, std=0.3)
    return folder


def test_command_end_to_end_on_a_tiny_r1v(tiny_r1v, mathvista, mmmu, capsys):
    data = mathvista.parent
    rows = MATHVISTA + [dict(MATHVISTA[1], pid="5", image="images/missing.png")]
    path = write_rows(data, "with_bad.jsonl", rows, [])
    out = data / "out" / "mathvista.json"
    args = ["--model", str(tiny_r1v), "--num-samples", "2", "--max-new-tokens", "3", "--batch-size", "2",
            "--temperature", "1.0", "--seed", "3", "--mesh", "1,1,1"]
    assert main(["eval", "mathvista", "--data", str(path), "--out", str(out), "--on-error", "skip", *args]) == 0
    result = json.loads(out.read_text())
    assert not (data / "out" / "mathvista.partial.jsonl").exists()
    s = result["summary"]
    assert s["benchmark"] == "mathvista" and s["num_rows"] == 4 and s["num_samples"] == 2
    assert s["skipped"]["count"] == 1 and "with_bad.jsonl, line 5: image 'images/missing.png'" in \
        s["skipped"]["rows"][0]
    assert s["settings"]["temperature"] == 1.0 and s["settings"]["max_new_tokens"] == 3
    assert [r["id"] for r in result["rows"]] == ["1", "2", "3", "4"]
    for r in result["rows"]:
        assert len(r["samples"]) == 2 and r["pass@1"] == r["num_correct"] / 2
        for sample in r["samples"]:
            assert set(sample) == {"text", "num_tokens", "finish_reason", "extracted", "correct", "reason"}
            assert 1 <= sample["num_tokens"] <= 3
    assert s["pass@1"] == pytest.approx(sum(r["pass@1"] for r in result["rows"]) / 4)
    assert set(s["groups"]) >= {"category", "task", "skills", "question_type"}
    assert s["groups"]["category"]["math-targeted-vqa"]["count"] == 3
    captured = capsys.readouterr()
    assert "mathvista: 100%" in captured.err  # the job's progress bar reached the end
    table = captured.out.splitlines()
    assert table[0].startswith("pass@1 %") and f"{100 * s['pass@1']:5.1f}" in table[0] and "4 rows x 2" in table[0]
    assert any(line.strip().startswith("category: math-targeted-vqa") for line in table)

    # MMMU with several images per row; the draws depend on the seed and the row only, not on the batch size
    out_a, out_b = data / "mmmu_a.json", data / "mmmu_b.json"
    assert main(["eval", "mmmu", "--data", str(mmmu), "--out", str(out_a), *args]) == 0
    args[args.index("--batch-size") + 1] = "3"
    assert main(["eval", "mmmu", "--data", str(mmmu), "--out", str(out_b), *args]) == 0
    a, b = json.loads(out_a.read_text()), json.loads(out_b.read_text())
    assert a["summary"]["num_rows"] == 3 and a["summary"]["groups"]["discipline"]["Science"]["count"] == 2
    assert [[x["text"] for x in r["samples"]] for r in a["rows"]] == [[x["text"] for x in r["samples"]]
                                                                      for r in b["rows"]]
