"""The built-in MPO demo (configs/demo/mpo.yaml): the Skywork-VL Reward -> MPO path of the papers, end to end on a
synthetic visual question task, on the CPU mesh, with nothing downloaded.

    skyjax train configs/demo/mpo.yaml --run-dir runs/mpo_demo

A run config of kind mpo with `data.synthetic` and a `demo` section (DemoConfig) runs, in its run folder:

    1. data/       the task (skyjax.data.synthetic: one shape per image, "Colour?" -> "Red." / "Green." / ...):
                   SFT rows to warm-start the policy, prompts with their answers for the pairs, held-out prompts
    2. warmup/     a short SFT of the tiny R1V policy: it answers in the right form but often with the wrong colour
                   (held-out greedy accuracy below 60%: `accuracy_before`)
    3. reward_model/  a tiny Qwen2.5-VL reward model trained with Bradley-Terry on preference pairs of the same task
    4. pairs.jsonl `skyjax pairs`: N samples per prompt from the warm-started policy, scored by the reward model
                   (both see the image), a rule check against the answer, best-vs-worst pairs
    5. mpo/        MPO (the run config itself: DPO + BCO + SFT against the warm-started policy as reference) on those
                   pairs -> `accuracy_after`
    6. control/    the same MPO on the same pairs with chosen and rejected swapped at random -> `accuracy_control`

Each stage is an ordinary run (its own summary.json, checkpoints, resume); a rerun skips the finished stages.
summary.json holds the three accuracies, the pair counts and every path.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from skyjax.train.config import DataConfig, ModelConfig, OptimizerConfig, RunConfig, TrainerConfig


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def greedy_accuracy(policy: Path, prompts: Path, *, max_new_tokens: int, batch_size: int = 32) -> dict:
    """Held-out greedy accuracy of a policy folder on generate rows with answers (skyjax.eval.verifiers), and how
    often each answer was given."""
    from PIL import Image

    from skyjax.convert.checkpoint import load_model
    from skyjax.data.records import RecordReader
    from skyjax.data.tokenizer import load_tokenizer
    from skyjax.eval.verifiers import verify
    from skyjax.parallel.mesh import MeshConfig, make_mesh
    from skyjax.parallel.rules import use_mesh
    from skyjax.rl.generation import GenRequest, model_generator
    from skyjax.sample.adapters import adapter_for
    from skyjax.sample.cli import default_stop_ids
    from skyjax.sample.decode import Sampling

    mesh = make_mesh(MeshConfig(shape=(-1, 1, 1)))
    with use_mesh(mesh):
        loaded = load_model(str(policy), mesh=mesh)
        tokenizer = load_tokenizer(loaded.folder)
        adapter = adapter_for(loaded)
        sampling = Sampling(max_new_tokens=max_new_tokens, temperature=0.0,
                            stop_token_ids=tuple(default_stop_ids(loaded, tokenizer)), num_samples=1)
        generate = model_generator(loaded, tokenizer, adapter, sampling, batch_size=batch_size, seed=0)
        records = list(RecordReader(prompts, kind="generate"))
        requests = [GenRequest(tuple(r.conversation()), tuple(Image.open(p).convert("RGB") for p in r.images), 1.0,
                               r.line) for r in records]
        completions = generate(requests, 0)
    correct = [verify(c[0].text, r.answer).correct for c, r in zip(completions, records)]
    return {"accuracy": float(np.mean(correct)), "rows": len(records),
            "answers": {c[0].text: int(sum(1 for d in completions if d[0].text == c[0].text)) for c in completions}}



def swapped_pairs(pairs: Path, out: Path, seed: int) -> int:
    """The control's pairs: each pair's chosen and rejected swapped with probability 1/2 (a fixed seed); returns
    how many were swapped."""
    rng = np.random.RandomState(seed)
    rows = [json.loads(line) for line in pairs.read_text().splitlines() if line.strip()]
    swapped = 0
    with out.open("w") as f:
        for row in rows:
            if rng.rand() < 0.5:
                row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
                row.setdefault("meta", {})["swapped"] = True
                swapped += 1
            f.write(json.dumps(row) + "\n")
    return swapped


def _stage(name: str, cfg: RunConfig, run_dir: Path) -> dict:
    """Train one stage (skipped when its summary.json says it finished) and return its summary."""
    from skyjax.train.run import train

    done = run_dir / "summary.json"
    if done.is_file():
        summary = json.loads(done.read_text())
        if summary.get("complete") and summary.get("steps") == cfg.trainer.steps:
            _log(f"[{name}] already trained: {run_dir}")
            return summary
    _log(f"[{name}] {cfg.kind}: {cfg.trainer.steps} steps -> {run_dir}")
    return train(cfg, run_dir, resume=True)


def fresh_start(run_dir: Path) -> None:
    """--no-resume: everything an earlier demo left in `run_dir` moves into previous-<UTC timestamp>/ (nothing is
    deleted), as a single run's fresh start does (skyjax.train.run_dir)."""
    if not run_dir.is_dir():
        return
    old = [p for p in run_dir.iterdir() if not p.name.startswith("previous-")]
    if old:
        aside = run_dir / f"previous-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
        aside.mkdir()
        for p in old:
            p.rename(aside / p.name)
        _log(f"--no-resume: moved the previous demo's files to {aside}")


def demo_data(cfg: RunConfig, run_dir: Path, *, resume: bool, **sft_kw):
    """The demos' run folder (moved aside first with resume=False) and their synthetic task under run_dir/data: SFT
    rows of the warm start (`sft_kw` to make_sft_records), prompts with answers and held-out prompts.
    Returns (run_dir, data, sft_rows, prompts, heldout, the task's keyword arguments)."""
    from skyjax.data.synthetic import make_prompts
    from skyjax.data.synthetic_sft import make_sft_records

    syn = cfg.data.synthetic
    run_dir = Path(run_dir).resolve()
    if not resume:
        fresh_start(run_dir)
    data = run_dir / "data"
    kw = dict(image_size=syn.image_size, tasks=tuple(syn.tasks))
    sft_rows = make_sft_records(data, "warmup", syn.train, seed=syn.seed, **sft_kw, **kw)
    prompts = make_prompts(data, "prompts", cfg.demo.prompts, seed=syn.seed + 2, **kw)
    heldout = make_prompts(data, "heldout", syn.heldout, seed=syn.seed + 1, **kw)
    return run_dir, data, sft_rows, prompts, heldout, kw


def warmup_config(cfg: RunConfig, sft_rows: Path, **data) -> RunConfig:
    """The demos' warm start: a short SFT of the run's model on `sft_rows` (demo.warmup_steps at demo.warmup_lr);
    `data` replaces keys of the run's data section."""
    demo = cfg.demo
    return RunConfig(
        kind="sft", name=f"{cfg.name}_warmup", model=cfg.model,
        data=dataclasses.replace(cfg.data, train=(str(sft_rows),), eval=(), synthetic=None, **data),
        optimizer=OptimizerConfig(lr=demo.warmup_lr, schedule="constant", warmup_steps=0, clip_norm=1.0),
        trainer=TrainerConfig(steps=demo.warmup_steps, log_every=max(demo.warmup_steps // 4, 1),
                              freeze=cfg.trainer.freeze, progress=cfg.trainer.progress,
                              eval_batch_size=cfg.trainer.eval_batch_size, export=True), mesh=cfg.mesh)


def run_demo(cfg: RunConfig, run_dir: Path, *, resume: bool = True) -> dict:
    """The whole demo (see the module docstring); returns the summary written to run_dir/summary.json. A rerun
    resumes: finished stages are skipped, an interrupted one resumes from its checkpoint."""
    from skyjax.data.synthetic import make_records

    t0 = time.time()
    demo, syn = cfg.demo, cfg.data.synthetic
    run_dir, data, sft_rows, prompts, heldout, kw = demo_data(cfg, run_dir, resume=resume)
    rm_train = make_records(data, "rm_train", demo.reward_rows, seed=syn.seed + 3, **kw)

    mesh, model = cfg.mesh, cfg.model
    quiet = dict(progress=cfg.trainer.progress, eval_batch_size=cfg.trainer.eval_batch_size, export=True)
    warm = _stage("warmup", warmup_config(cfg, sft_rows), run_dir / "warmup")
    policy = Path(warm["paths"]["checkpoint"])
    before = greedy_accuracy(policy, heldout, max_new_tokens=demo.max_new_tokens)
    _log(f"[warmup] held-out greedy accuracy {before['accuracy']:.3f}")

    rm_cfg = RunConfig(
        kind="reward_model", name=f"{cfg.name}_reward_model",
        model=ModelConfig(source="tiny", tiny_layers=model.tiny_layers, tiny_vision_depth=model.tiny_vision_depth,
                          tiny_init_std=demo.reward_init_std),
        data=DataConfig(train=(str(rm_train),), batch_size=demo.reward_batch_size, seq_buckets=(64,),
                        patch_buckets=(16 * demo.reward_batch_size,), image_buckets=(demo.reward_batch_size,)),
        optimizer=OptimizerConfig(lr=demo.reward_lr, schedule="cosine", warmup_steps=10, clip_norm=1.0),
        trainer=TrainerConfig(steps=demo.reward_steps, log_every=max(demo.reward_steps // 4, 1),
                              freeze=("lm_head",), **quiet), mesh=mesh)
    rm = _stage("reward_model", rm_cfg, run_dir / "reward_model")

    from skyjax.rl.pairs import PairsConfig, build_pairs

    pairs = run_dir / "pairs.jsonl"
    if not pairs.is_file():
        _log(f"[pairs] {demo.num_samples} samples per prompt, scored by the reward model -> {pairs}")
        report = build_pairs(policy=str(policy), reward_model=rm["paths"]["hf_export"], data=prompts, out=pairs,
                             config=PairsConfig(num_samples=demo.num_samples, min_margin=demo.min_margin,
                                                temperature=demo.temperature, max_new_tokens=demo.max_new_tokens,
                                                seed=syn.seed),
                             progress=cfg.trainer.progress)
        from skyjax.rl.pairs import format_report

        _log(format_report(report))
        (run_dir / "pairs_report.json").write_text(json.dumps(report, indent=2))
    report = json.loads((run_dir / "pairs_report.json").read_text())
    control_pairs = run_dir / "pairs_control.jsonl"
    swapped = swapped_pairs(pairs, control_pairs, seed=syn.seed + 4)

    base = dataclasses.replace(cfg, model=dataclasses.replace(model, source=str(policy)), demo=None,
                               data=dataclasses.replace(cfg.data, train=(str(pairs),), eval=(), synthetic=None),
                               trainer=dataclasses.replace(cfg.trainer, export=True))
    mpo = _stage("mpo", base, run_dir / "mpo")
    control = _stage("control", dataclasses.replace(
        base, name=f"{cfg.name}_control", data=dataclasses.replace(base.data, train=(str(control_pairs),))),
        run_dir / "control")
    after = greedy_accuracy(Path(mpo["paths"]["checkpoint"]), heldout, max_new_tokens=demo.max_new_tokens)
    ctrl = greedy_accuracy(Path(control["paths"]["checkpoint"]), heldout, max_new_tokens=demo.max_new_tokens)

    summary: dict[str, Any] = {
        "kind": "mpo_demo", "name": cfg.name, "steps": mpo["steps"],
        "accuracy_before": before["accuracy"], "accuracy_after": after["accuracy"],
        "accuracy_control": ctrl["accuracy"], "heldout_rows": before["rows"],
        "pairs": report, "control_swapped": swapped,
        "reward_model_heldout_accuracy": rm.get("heldout_accuracy"),
        "answers": {"before": before["answers"], "after": after["answers"], "control": ctrl["answers"]},
        "train": mpo.get("train", {}), "control_train": control.get("train", {}),
        "seconds": round(time.time() - t0, 1), "complete": True,
        "paths": {"run_dir": str(run_dir), "summary": str(run_dir / "summary.json"), "data": str(data),
                  "heldout": str(heldout), "prompts": str(prompts), "pairs": str(pairs),
                  "control_pairs": str(control_pairs), "warmup": str(run_dir / "warmup"),
                  "reward_model": str(run_dir / "reward_model"), "mpo": str(run_dir / "mpo"),
                  "control": str(run_dir / "control"), "checkpoint": mpo["paths"]["checkpoint"],
                  "hf_export": mpo["paths"].get("hf_export"), "metrics": mpo["paths"]["metrics"]},
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def format_demo(summary: dict) -> str:
    p = summary["pairs"]
    lines = [f"{summary['name']} (MPO demo): {summary['seconds']:.0f} s",
             f"  accuracy_before      {summary['accuracy_before']:.3f}   held-out greedy accuracy of the warm-started "
             f"policy",
             f"  accuracy_after       {summary['accuracy_after']:.3f}   after MPO on the reward model's pairs",
             f"  accuracy_control     {summary['accuracy_control']:.3f}   MPO on the same pairs, chosen/rejected "
             f"swapped at random",
             f"  pairs                {p.get('kept')} of {p.get('prompts')} prompts kept",
             f"wrote {summary['paths']['summary']} (every number and path)"]
    return "\n".join(lines)
