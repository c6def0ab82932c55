"""VL-RewardBench and RewardBench: reading (real file + malformed inputs), pair construction and exact scoring."""

import importlib.util
import io
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from skyjax.eval import common, rewardbench as rb, vl_rewardbench as vl
from skyjax.eval.common import BenchmarkFormatError

DATA = Path(__file__).resolve().parents[2] / "shared/data/vl_rewardbench/data.jsonl"
HAS_PYARROW = importlib.util.find_spec("pyarrow") is not None
needs_data = pytest.mark.skipif(not DATA.is_file(), reason=f"VL-RewardBench metadata not found at {DATA}")


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _vl_row(i=0, ranking=(0, 1), prefix="RLAIF-V", **extra):
    row = {"id": f"{prefix}-{i}", "image_path": f"images/x/{i}.png", "query": f"q{i}",
           "response": [f"first{i}", f"second{i}"], "human_ranking": list(ranking), "models": ["mA", "mB"]}
    row.update(extra)
    return row


def _png_bytes(color):
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------- VL-RewardBench: the real file


@needs_data
def test_real_file_groups_subsets_and_reversed_rankings():
    items = vl.load_vl_rewardbench(DATA)
    raw = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    assert len(items) == len(raw) == 1250
    assert Counter(it.group for it in items) == {"general": 183, "hallucination": 749, "reasoning": 318}
    assert Counter(it.subset for it in items) == {"povid": 448, "reasoning_tasks": 318, "rlaif-v": 233,
                                                  "wildvision-battle": 173, "rlhf-v": 68, "vlfeedback": 10}
    # Independent check of the id-prefix rule: the image folder names the sub-set too.
    assert all(it.subset == r["image_path"].split("/")[1] for it, r in zip(items, raw))
    # Pairs: rank 0 is preferred, so [1, 0] rows take response[1] as chosen.
    reversed_rows = [(it, r) for it, r in zip(items, raw) if r["human_ranking"] == [1, 0]]
    assert len(reversed_rows) == 5
    for it, r in reversed_rows:
        assert (it.chosen, it.rejected) == (r["response"][1], r["response"][0])
        assert it.chosen_model == r["models"][1]
    for it, r in zip(items, raw):
        if r["human_ranking"] == [0, 1]:
            assert (it.chosen, it.rejected) == tuple(r["response"])
    assert [it.line for it in items[:3]] == [1, 2, 3] and items[-1].line == 1250


@needs_data
def test_real_file_metric_matches_independent_computation():
    items = vl.load_vl_rewardbench(DATA)
    raw = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    rng = np.random.default_rng(0)
    sc, sr = rng.normal(size=len(items)), rng.normal(size=len(items))
    sr[:50] = sc[:50]  # some ties
    folder_group = {"povid": "hallucination", "rlaif-v": "hallucination", "rlhf-v": "hallucination",
                    "reasoning_tasks": "reasoning", "wildvision-battle": "general", "vlfeedback": "general"}
    hits = {"general": [], "hallucination": [], "reasoning": []}
    for r, c, j in zip(raw, sc, sr):
        hits[folder_group[r["image_path"].split("/")[1]]].append(c > j)
    out = vl.summarize(items, sc, sr)["summary"]
    assert out["overall"] == pytest.approx(sum(map(sum, hits.values())) / 1250)
    assert out["macro"] == pytest.approx(np.mean([np.mean(v) for v in hits.values()]))
    for g, v in hits.items():
        assert out["groups"][g] == {"accuracy": pytest.approx(np.mean(v)), "count": len(v)}


# ---------------------------------------------------------------- VL-RewardBench: scoring by hand


def _items(groups):
    prefix = {"general": "wildvision-battle", "hallucination": "hallucination_pair", "reasoning": "mathverse"}
    return [vl.VLRewardBenchItem(id=f"{prefix[g]}-{i}", group=g, subset="s", query="q", chosen="c",
                                 rejected="r", image_path="i.png", line=i + 1, source="mem.jsonl")
            for i, g in enumerate(groups)]


def test_vl_summary_by_hand():
    # general: 1 right, 1 wrong -> 1/2; hallucination: 4 right + 1 tie -> 4/5; reasoning: 1 of 3 -> 1/3.
    groups = ["general"] * 2 + ["hallucination"] * 5 + ["reasoning"] * 3
    chosen = [2, 0, 1, 1, 1, 1, 5, 3, 0, 0]
    rejected = [1, 1, 0, 0, 0, 0, 5, 2, 1, 9]
    result = vl.summarize(_items(groups), chosen, rejected)
    s = result["summary"]
    assert s["overall"] == pytest.approx(6 / 10)
    assert s["macro"] == pytest.approx((1 / 2 + 4 / 5 + 1 / 3) / 3)
    assert s["groups"] == {"general": {"accuracy": 0.5, "count": 2},
                           "hallucination": {"accuracy": 0.8, "count": 5},
                           "reasoning": {"accuracy": pytest.approx(1 / 3), "count": 3}}
    assert [r["correct"] for r in result["rows"]] == [c > r for c, r in zip(chosen, rejected)]
    assert result["rows"][6] == {"id": "hallucination_pair-6", "group": "hallucination", "score_chosen": 5.0,
                                 "score_rejected": 5.0, "correct": False}
    table = vl.format_table(s)
    assert "60.0" in table and "80.0" in table and "54.4" in table
    json.dumps(result, allow_nan=False)  # the result is plain JSON


def test_vl_ties_are_wrong_and_absent_groups_leave_macro():
    s = vl.summarize(_items(["reasoning", "reasoning"]), np.array([0.3, 1.0]), np.array([0.3, 0.5]))["summary"]
    assert s["groups"]["reasoning"]["accuracy"] == 0.5
    assert s["groups"]["general"] == {"accuracy": None, "count": 0}
    assert s["macro"] == s["overall"] == 0.5


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_vl_non_finite_scores_name_the_row(bad):
    with pytest.raises(ValueError, match=r"mathverse-2.*mem\.jsonl, line 3"):
        vl.summarize(_items(["general", "hallucination", "reasoning"]), [1, 1, bad], [0, 0, 0])
    with pytest.raises(ValueError, match="3 items but 2 chosen"):
        vl.summarize(_items(["general"] * 3), [1, 1], [0, 0, 0])


def test_vl_evaluate_feeds_records_to_the_scorer(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [_vl_row(0), _vl_row(1, ranking=(1, 0), prefix="mmmu")])
    items = vl.load_vl_rewardbench(path)
    seen = []

    def scorer(records):  # prefers the text "second*", so only the reversed row is right
        seen.extend(records)
        return [(float(r["chosen"][0]["content"].startswith("second")),
                 float(r["rejected"][0]["content"].startswith("second"))) for r in records]

    out = vl.evaluate(items, scorer, images_dir="imgs", batch_size=1)
    assert [r["correct"] for r in out["rows"]] == [False, True]
    assert seen[0]["images"] == [str(Path("imgs/images/x/0.png"))]
    assert seen[0]["prompt"] == [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q0"}]}]
    assert seen[1]["chosen"] == [{"role": "assistant", "content": "second1"}]


# ---------------------------------------------------------------- VL-RewardBench: malformed input


@pytest.mark.parametrize("bad_line, message", [
    ('{"id": "RLAIF-1", "query": ', "invalid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({k: v for k, v in _vl_row(5).items() if k != "query"}), "missing key 'query'"),
    (json.dumps(_vl_row(5, response=["a", "b", "c"])), "'response' must be a list of 2"),
    (json.dumps(_vl_row(5, ranking=(0, 0))), "permutation of \\[0, 1\\]"),
    (json.dumps(_vl_row(5, ranking=(1, 2))), "permutation of \\[0, 1\\]"),
    (json.dumps(_vl_row(5, ranking=(False, True))), "permutation of \\[0, 1\\]"),
    (json.dumps({k: v for k, v in _vl_row(5).items() if k != "image_path"}), "missing key 'image_path'"),
])
def test_vl_malformed_rows_name_file_and_line(tmp_path, bad_line, message):
    path = _write_jsonl(tmp_path / "bench.jsonl", [_vl_row(0), "", bad_line])  # blank line 2 is skipped
    with pytest.raises(BenchmarkFormatError, match=message) as err:
        vl.load_vl_rewardbench(path)
    assert f"{path}, line 3" in str(err.value)


def test_vl_missing_image_checked_only_when_asked(tmp_path):
    (tmp_path / "images/x").mkdir(parents=True)
    (tmp_path / "images/x/0.png").write_bytes(_png_bytes("red"))
    path = _write_jsonl(tmp_path / "d.jsonl", [_vl_row(0), _vl_row(1)])
    with pytest.raises(BenchmarkFormatError, match=r"d\.jsonl, line 2: image 'images/x/1.png' not found"):
        vl.load_vl_rewardbench(path, images_dir=tmp_path)
    assert len(vl.load_vl_rewardbench(path, images_dir=tmp_path, check_images=False)) == 2
    assert len(vl.load_vl_rewardbench(path)) == 2  # no images_dir: nothing to check against


# ---------------------------------------------------------------- VL-RewardBench: parquet (HF layout)


def _hf_rows():
    red, blue = _png_bytes("red"), _png_bytes("blue")
    return red, blue, [
        {"id": "RLHF-7", "query": "what?", "response": ["good", "bad"], "human_ranking": [0, 1],
         "image": {"bytes": red, "path": None}, "models": ["a", "b"]},
        {"id": "svit-3", "query": "why?", "response": ["bad", "good"], "human_ranking": [1, 0],
         "image": {"bytes": blue, "path": "svit-3.png"}, "models": ["a", "b"]},
    ]


def _check_hf_items(items, red, blue, tmp_path):
    assert [(it.id, it.group, it.chosen, it.line) for it in items] == [
        ("RLHF-7", "hallucination", "good", 1), ("svit-3", "general", "good", 2)]
    assert items[0].image_bytes == red and items[0].image_path is None
    records = vl.to_preference_records(items, tmp_path / "out")
    written = [Path(r["images"][0]) for r in records]
    assert written[1] == tmp_path / "out/svit-3.png"
    assert [p.read_bytes() for p in written] == [red, blue]
    assert written[0].suffix == ".png" and Image.open(written[0]).getpixel((0, 0)) == (255, 0, 0)
    with pytest.raises(ValueError, match="need an images_dir"):
        vl.to_preference_records(items)


def test_vl_hf_rows_with_image_bytes(tmp_path, monkeypatch):
    # The parquet reader is swapped for its rows, so the HF row layout is checked even without pyarrow.
    red, blue, rows = _hf_rows()
    monkeypatch.setattr(common, "read_parquet_rows", lambda path: rows)
    (tmp_path / "test.parquet").write_bytes(b"")
    items = vl.load_vl_rewardbench(tmp_path / "test.parquet", images_dir=tmp_path)
    assert items[0].where == f"{tmp_path / 'test.parquet'}, row 1"
    _check_hf_items(items, red, blue, tmp_path)
    rows[1]["human_ranking"] = [1, 1]
    with pytest.raises(BenchmarkFormatError, match=r"test\.parquet, row 2: 'human_ranking'"):
        vl.load_vl_rewardbench(tmp_path / "test.parquet")


@pytest.mark.skipif(not HAS_PYARROW, reason="pyarrow not installed")
def test_vl_parquet_roundtrip(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    red, blue, rows = _hf_rows()
    (tmp_path / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data/test-00000-of-00001.parquet")
    for path in (tmp_path / "data/test-00000-of-00001.parquet", tmp_path / "data"):
        _check_hf_items(vl.load_vl_rewardbench(path), red, blue, tmp_path)


@pytest.mark.skipif(HAS_PYARROW, reason="pyarrow installed; the round trip is tested instead")
def test_parquet_without_pyarrow_says_what_to_install(tmp_path):
    path = tmp_path / "test.parquet"
    path.write_bytes(b"PAR1")
    for load in (vl.load_vl_rewardbench, rb.load_rewardbench):
        with pytest.raises(ImportError, match=r"pip install pyarrow") as err:
            load(path)
        assert str(path) in str(err.value)


# ---------------------------------------------------------------- RewardBench


def _rb_items(spec):
    """spec: [(subset, score_chosen, score_rejected)] -> items and the two score lists."""
    items = [rb.RewardBenchItem(id=str(i), subset=s, prompt="p", chosen="c", rejected="r", line=i + 1,
                                source="rb.jsonl") for i, (s, _, _) in enumerate(spec)]
    return items, [c for _, c, _ in spec], [r for _, _, r in spec]


def test_rb_sections_cover_exactly_the_weighted_subsets():
    assert sorted(rb.SUBSET_SECTION) == sorted(rb.EXAMPLE_COUNTS)
    assert sum(len(v) for v in rb.SECTIONS.values()) == len(rb.EXAMPLE_COUNTS) == 23
    # Row counts of the filtered split (math-prm has 447) add up to the benchmark's 2,985 examples.
    assert sum(rb.EXAMPLE_COUNTS.values()) - 984 + 447 == 2985


def test_rb_weighted_sections_and_final_mean_by_hand():
    items, sc, sr = _rb_items([
        ("math-prm", 1, 0), ("math-prm", 1, 0),        # math 2/2 right
        ("hep-python", 0, 1), ("hep-go", 0, 1),        # code 0/2 right
        ("alpacaeval-easy", 1, 0), ("mt-bench-easy", 0, 1),
        ("mt-bench-hard", 2, 2),                       # a tie: wrong
        ("xstest-should-refuse", 1, 0), ("xstest-should-respond", 0, 1),
    ])
    s = rb.summarize(items, sc, sr)["summary"]
    reasoning = 984 / (984 + 164 + 164)  # by rows it would be 2/4: math-prm's up-weighting changes the answer
    chat = 100 / (100 + 28)
    safety = 250 / (250 + 154)
    assert s["sections"]["reasoning"] == {"accuracy": pytest.approx(reasoning), "count": 4}
    assert s["sections"]["chat"]["accuracy"] == pytest.approx(chat)
    assert s["sections"]["chat_hard"] == {"accuracy": 0.0, "count": 1}
    assert s["sections"]["safety"]["accuracy"] == pytest.approx(safety)
    assert s["overall"] == pytest.approx((reasoning + chat + 0.0 + safety) / 4)
    assert s["subsets"]["math-prm"] == {"accuracy": 1.0, "count": 2, "weight": 984, "section": "reasoning"}
    assert "  0.0" in rb.format_table(s) and f"{100 * s['overall']:5.1f}" in rb.format_table(s)


def test_rb_missing_section_is_left_out_of_the_mean():
    items, sc, sr = _rb_items([("donotanswer", 1, 0), ("hep-js", 1, 1)])
    s = rb.summarize(items, sc, sr)["summary"]
    assert s["sections"]["chat"] == {"accuracy": None, "count": 0}
    assert s["overall"] == pytest.approx((1.0 + 0.0) / 2)


def test_rb_unknown_subset(tmp_path):
    items, sc, sr = _rb_items([("alpacaeval-easy", 1, 0), ("anthropic_hhh", 1, 0)])
    with pytest.raises(ValueError, match=r"anthropic_hhh.*rb\.jsonl, line 2"):
        rb.summarize(items, sc, sr)
    with pytest.raises(ValueError, match="anthropic_hhh"):
        rb.evaluate(items, lambda recs: [(1, 0)] * len(recs))
    s = rb.summarize(items, sc, sr, strict=False)["summary"]
    assert s["subsets"]["anthropic_hhh"] == {"accuracy": 1.0, "count": 1, "weight": None, "section": None}
    assert s["overall"] == 1.0 and s["sections"]["chat"]["count"] == 1


def test_rb_nan_and_load_errors(tmp_path):
    items, sc, sr = _rb_items([("hep-cpp", 1, 0), ("hep-go", math.nan, 0)])
    with pytest.raises(ValueError, match="row id '1'"):
        rb.summarize(items, sc, sr)
    good = {"prompt": "p", "chosen": "c", "rejected": "r", "subset": "hep-go", "id": 7}
    path = _write_jsonl(tmp_path / "rb.jsonl", [good, {**good, "chosen": None}])
    with pytest.raises(BenchmarkFormatError, match=r"rb\.jsonl, line 2: 'chosen' must be a string"):
        rb.load_rewardbench(path)
    path = _write_jsonl(tmp_path / "rb.jsonl", [good, {k: v for k, v in good.items() if k != "subset"}])
    with pytest.raises(BenchmarkFormatError, match=r"rb\.jsonl, line 2: missing key 'subset'"):
        rb.load_rewardbench(path)


def test_rb_load_records_and_evaluate(tmp_path):
    rows = [{"prompt": "2+2?", "chosen": "4", "rejected": "5", "subset": "math-prm", "id": 11,
             "chosen_model": "human", "rejected_model": "gpt"},
            {"prompt": "hi", "chosen": "hello", "rejected": "go away", "subset": "alpacaeval-easy"}]
    items = rb.load_rewardbench(_write_jsonl(tmp_path / "rb.jsonl", rows))
    assert [(it.id, it.section, it.chosen_model) for it in items] == [
        ("11", "reasoning", "human"), ("alpacaeval-easy-2", "chat", None)]
    records = rb.to_preference_records(items)
    assert records[0] == {"id": "11", "prompt": "2+2?", "chosen": "4", "rejected": "5"}
    out = rb.evaluate(items, lambda recs: np.array([[len(r["chosen"]), len(r["rejected"])] for r in recs]))
    assert [r["correct"] for r in out["rows"]] == [False, False]  # 1 vs 1 is a tie; 5 < 7
    common.write_json(out, tmp_path / "out/result.json")
    assert json.loads((tmp_path / "out/result.json").read_text()) == out
    with pytest.raises(ValueError, match=r"expected \(2, 2\)"):
        rb.evaluate(items, lambda recs: [1.0] * len(recs))
