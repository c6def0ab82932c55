"""`skyjax iterate`: the demo config, shortened, end to end (summary structure and arithmetic against the files it
wrote); a SIGTERM before round 2 exits 143 without a summary and the rerun trains round 2 only; score levels; one-
line config errors."""

import json
import signal

import pytest

from skyjax.cli import main
from skyjax.config import ConfigError, load_config
from skyjax.train import iterate as it

DEMO = "configs/demo/iterative_sft.yaml"
# the demo, shortened: 24 rows, two rounds of 2 steps; one learning rate and a constant schedule, so stage 1 and
# both rounds run one compiled train step
SHORT = ["rounds=2", "round_steps=2", "lrs=[3.0e-3]", "sft.optimizer.schedule=constant",
         "sft.optimizer.warmup_steps=0", "sft.trainer.steps=4", "sft.data.synthetic.train=24",
         "sft.data.synthetic.heldout=8", "sft.model.tiny_layers=1", "sft.model.tiny_vision_depth=1",
         "generation.max_new_tokens=4", "generation.batch_size=8", "progress=false"]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_demo_shortened_runs_resumes_and_adds_up(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    trained, killed = [], []
    real_train = it.IterativeSFT._train

    def train(self, t, selection, previous):
        if t == 2 and not killed:  # the job is killed as round 2's training would start
            killed.append(t)
            signal.raise_signal(signal.SIGTERM)  # as a preemption would
        trained.append(t)
        return real_train(self, t, selection, previous)

    monkeypatch.setattr(it.IterativeSFT, "_train", train)
    assert main(["iterate", DEMO, *SHORT, "--run-dir", str(run_dir)]) == 143
    assert "SIGTERM: stopped during round 2" in capsys.readouterr().err
    assert not (run_dir / "summary.json").exists()
    assert (run_dir / "round_1" / "round.json").is_file() and not (run_dir / "round_2" / "round.json").exists()
    assert trained == [0, 1]

    trained.clear()
    assert main(["iterate", DEMO, *SHORT, "--run-dir", str(run_dir)]) == 0
    assert trained == [2]  # rounds 0 and 1 are not trained again
    out = capsys.readouterr().out
    assert "iterative_sft (iterate): 2 rounds" in out

    summary = json.loads((run_dir / "summary.json").read_text())
    rounds = summary["rounds"]
    assert summary["complete"] and [r["round"] for r in rounds] == [0, 1, 2]
    for r in rounds:
        assert {"round", "tau", "d_rm", "errors", "overlap", "train_rows", "heldout_accuracy"} <= set(r)
        assert r["train_rows"] == r["d_rm"] + r["errors"] - r["overlap"]
        assert 0 <= r["overlap"] <= min(r["d_rm"], r["errors"])
        rdir = run_dir / f"round_{r['round']}"
        assert len(read_jsonl(rdir / "data.jsonl")) == r["train_rows"]
        heldout = read_jsonl(rdir / "heldout.jsonl")
        assert len(heldout) == 8 and r["heldout_accuracy"] == pytest.approx(sum(h["correct"] for h in heldout) / 8)
    assert rounds[0]["tau"] is None and rounds[0]["d_rm"] == rounds[0]["train_rows"] == 24
    assert rounds[0]["errors"] == rounds[0]["overlap"] == 0
    levels = {s["key"]: s["level"] for s in read_jsonl(run_dir / "scores.jsonl")}
    assert sorted(levels.values()).count(5) >= 1 and set(levels.values()) <= set(range(6))
    for r in rounds[1:]:
        t = r["round"]
        assert r["tau"] == (2, 3)[t - 1] and r["steps"] == 2 and r["lr"] == 3e-3
        wrong = {p["key"] for p in read_jsonl(run_dir / f"round_{t - 1}" / "predictions.jsonl") if not p["correct"]}
        good = {k for k, v in levels.items() if v >= r["tau"]}
        assert (r["d_rm"], r["errors"], r["overlap"]) == (len(good), len(wrong), len(good & wrong))
        keys = [row["meta"]["iterate"]["key"] for row in read_jsonl(run_dir / f"round_{t}" / "data.jsonl")]
        assert set(keys) == good | wrong and len(keys) == len(set(keys))
        cfg = json.loads((run_dir / f"round_{t}" / "sft" / "config.json").read_text())
        assert cfg["model"]["source"] == rounds[t - 1]["model"]  # round t starts from M_{t-1}'s checkpoint
    assert summary["paths"]["model"] == rounds[-1]["model"]

    # a finished job reruns in no time, and refuses a changed schedule of a round that ran
    trained.clear()
    assert main(["iterate", DEMO, *SHORT, "--run-dir", str(run_dir)]) == 0 and trained == []
    assert main(["iterate", DEMO, *SHORT, "lrs=[1.0e-3]", "--run-dir", str(run_dir)]) == 2
    assert "round 1 (started)" in capsys.readouterr().err


def test_score_levels():
    assert list(it.score_levels([1, 2, 3, 4, 5, 6])) == [0, 1, 2, 3, 4, 5]
    assert list(it.score_levels([3, 1, 1, 1])) == [4, 0, 0, 0]  # equal scores share the lower level
    assert list(it.score_levels([0.05, 0.1, 0.95, 0.5], "thresholds", [0.1, 0.3, 0.5, 0.7, 0.9])) == [0, 1, 5, 3]
    # within groups: each group's own six bins
    assert list(it.score_levels([1, 2, 3, 10, 20, 30], groups=["a", "a", "a", "b", "b", "b"])) == [0, 2, 4, 0, 2, 4]


@pytest.mark.parametrize("override, message", [
    (["rounds=5"], "taus"),
    (["sft.kind=reward_model"], "sft.kind"),
    (["score.levels=thresholds"], "score.thresholds"),
    (["score.levels=thresholds", "score.thresholds=[1,2,3]"], "score.thresholds"),
    (["score.source=reward_model"], "score.reward_model"),
    (["score.judge.name=model"], "judge.name"),
    (["distill.enabled=true"], "distill.model"),
    (["roundz=3"], "unknown config key roundz"),
    (["sft.trainer.stepz=3"], "unknown config key sft.trainer.stepz"),
])
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(it.IterateConfig, DEMO, override)


def test_truth_and_question_of_rows(tmp_path):
    rows = [{"messages": [{"role": "system", "content": "Look."}, {"role": "user", "content": "2+2?"},
                          {"role": "assistant", "content": "<think>easy</think>\nAnswer: \\boxed{4}"},
                          {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes."}]},
            {"prompt": "Colour?", "completion": "Red.", "id": "x"},
            {"prompt": "Pick.", "completion": "It is B.", "answer": "B"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = it.read_samples([tmp_path / "d.jsonl"])
    assert [x.key for x in s] == ["d.jsonl:1", "x", "d.jsonl:3"]
    assert [x.truth for x in s] == ["4", "Red", "B"]  # the final answer, as the verifier extracts it
    assert [m["role"] for m in s[0].question] == ["system", "user"] and s[0].question_text() == "2+2?"
    (tmp_path / "e.jsonl").write_text(json.dumps(rows[1]) + "\n" + json.dumps(rows[1]) + "\n")
    with pytest.raises(it.IterateError, match=r"e\.jsonl:2: row key 'x' also names .*e\.jsonl:1"):
        it.read_samples([tmp_path / "e.jsonl"])


def test_config_error_is_one_line(capsys):
    assert main(["iterate", DEMO, "rounds=9"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("skyjax iterate: error:") and "taus" in err and "\n" not in err


def test_rounds_may_grow_but_a_started_round_keeps_its_schedule(tmp_path):
    cfg = load_config(it.IterateConfig, DEMO, SHORT)
    it.IterativeSFT(cfg, tmp_path)  # claims the folder
    (tmp_path / "round_1").mkdir()
    import dataclasses

    it.IterativeSFT(dataclasses.replace(cfg, rounds=3), tmp_path)  # more rounds: fine
    with pytest.raises(ConfigError, match=r"round 1 \(started\): tau 2 -> 4"):
        it.IterativeSFT(dataclasses.replace(cfg, taus=(4, 5, 5)), tmp_path)
    with pytest.raises(ConfigError, match="sft.optimizer.lr"):
        it.IterativeSFT(dataclasses.replace(cfg, sft=dataclasses.replace(
            cfg.sft, optimizer=dataclasses.replace(cfg.sft.optimizer, lr=1.0))), tmp_path)
    it.IterativeSFT(dataclasses.replace(cfg, taus=(4, 5, 5)), tmp_path, resume=False)  # a fresh start moves it aside
    assert any(p.name.startswith("previous-") for p in tmp_path.iterdir())


def test_distillation_rebuilds_a_rounds_rows(tmp_path, monkeypatch):
    """With distill.enabled the round's rows are the model's verified chains (a scripted generator stands in for the
    model here): the distill API gets every question with its answer, kept rows keep their keys, dropped rows leave
    the pool, and the report is written beside the rows."""
    from skyjax.parallel import make_mesh
    from skyjax.rl import generation
    from skyjax.rl.distill_run import THINK_INSTRUCTION
    from skyjax.rl.generation import Completion

    rows = [{"prompt": f"What is {a} + {b}?", "completion": f"{a + b}", "id": f"q{a}"} for a, b in
            [(1, 2), (3, 4), (5, 6)]]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(it.IterateConfig, None, [f"sft.data.train=[{tmp_path / 'train.jsonl'}]", "sft.kind=sft",
                                               "distill.enabled=true", f"distill.model={tmp_path}",
                                               "distill.max_rewrites=0", "generation.stop_token_ids=[0]"])
    seen = []

    def scripted(loaded, tokenizer, adapter, sampling, *, batch_size, seed):
        def run(requests, rnd):
            seen.extend(requests)
            out = []
            for r in requests:
                a, b = (int(x) for x in r.conversation[-1]["content"].split("?")[0][8:].split(" + "))
                answer = a + b if a != 3 else a * b  # the second question is answered wrongly
                out.append([Completion(f"<think>{a} plus {b}</think>\nAnswer: \\boxed{{{answer}}}", 9, "stop")])
            return out
        return run

    monkeypatch.setattr(it.IterativeSFT, "_load", lambda self, model: (None, None, None, make_mesh((1, 1, 1))))
    monkeypatch.setattr(generation, "model_generator", scripted)
    job = it.IterativeSFT(cfg, tmp_path / "run")
    job.questions = it.read_samples([tmp_path / "train.jsonl"])
    pool = job._pool(0, None)
    assert [s.key for s in pool] == ["q1", "q5"] and [s.truth for s in pool] == ["3", "11"]
    assert pool[0].obj["completion"][0]["content"].startswith("<think>1 plus 2</think>")
    assert len(seen) == 3 and all(r.conversation[-1]["content"].endswith(THINK_INSTRUCTION) for r in seen)
    report = json.loads((tmp_path / "run" / "round_0" / "distill.report.json").read_text())
    assert (report["kept"], report["dropped"]) == (2, 1)
    assert not list((tmp_path / "run" / "round_0").glob("*.partial.jsonl"))


def test_score_sources_meta_and_reward_model(tmp_path, monkeypatch):
    """meta scores through thresholds; reward-model scores (a stand-in scorer) through quantiles, each batch logged
    so that a scoring stopped after its first batch resumes with the rest only."""
    from skyjax.eval import scorer as scorer_module

    rows = [{"prompt": f"Q{i}?", "completion": "A" * (i + 1), "meta": {"score": i % 6}} for i in range(12)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = [f"sft.data.train=[{tmp_path / 'train.jsonl'}]", "sft.kind=sft"]
    cfg = load_config(it.IterateConfig, None, common + ["score.source=meta", "score.levels=thresholds",
                                                       "score.thresholds=[1,2,3,4,5]"])
    job = it.IterativeSFT(cfg, tmp_path / "meta")
    pool = it.read_samples([tmp_path / "train.jsonl"])
    assert job._levels(1, pool) == {s.key: i % 6 for i, s in enumerate(pool)}

    scored, stop = [], [True]

    class Scorer:  # the RewardScorer protocol the job uses: score_conversations(convs, on_batch=...)
        def __init__(self, model, **kw):
            assert model == "rm_folder" and kw["batch_size"] == 64

        def score_conversations(self, convs, on_batch):
            for start in range(0, len(convs), 5):
                batch = convs[start: start + 5]
                scored.append([c.key for c in batch])
                on_batch([c.key for c in batch], [float(len(c.messages[-1]["content"])) for c in batch])
                if stop[0]:
                    raise KeyboardInterrupt

    monkeypatch.setattr(scorer_module, "RewardScorer", Scorer)
    cfg = load_config(it.IterateConfig, None, common + ["score.source=reward_model", "score.reward_model=rm_folder"])
    job = it.IterativeSFT(cfg, tmp_path / "rm")
    with pytest.raises(KeyboardInterrupt):
        job._levels(1, pool)
    stop[0] = False
    levels = job._levels(1, pool)
    assert scored[1][0] == pool[5].key and len(scored) == 1 + 2  # the first five rows were not scored again
    assert [levels[s.key] for s in pool] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]  # longer answers score higher
    saved = read_jsonl(tmp_path / "rm" / "scores.jsonl")
    assert [r["raw"] for r in saved] == [float(i + 1) for i in range(12)]
