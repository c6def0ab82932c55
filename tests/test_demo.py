"""The README's main command runs end to end and its own checks hold."""

import json

from skyjax.cli import build_parser, main


def test_demo_runs_and_checks_hold(tmp_path, capsys):
    assert main(["demo", "--run-dir", str(tmp_path), "--mesh", "2,2,2"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["roundtrip_max_abs_diff"] == 0.0
    assert summary["kv_cache_matches_full_forward"] is True
    assert summary["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    assert all(0 < g["num_tokens"] <= 12 for g in summary["generated"])
    assert (tmp_path / "hf_source" / "model.safetensors.index.json").is_file()
    assert (tmp_path / "checkpoint" / "skyjax.json").is_file()
    assert "OK: summary written" in capsys.readouterr().out


def test_every_subcommand_has_help_with_an_example():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        assert "example:" in p.format_help() and f"skyjax {name}" in p.format_help(), name


def test_readme_main_command_learns_to_use_the_image(tmp_path, capsys):
    """The README's main command with the shipped config, unchanged: the tiny reward model must reach >= 90% held-out
    pairwise accuracy while the blind control (same pairs, images blanked) stays near chance; the run directory holds
    what the README promises, and its exports are read by transformers and by `skyjax score`."""
    import numpy as np
    from transformers import Qwen2_5_VLForConditionalGeneration

    assert main(["train", "configs/demo/reward_model.yaml", "--run-dir", str(tmp_path), "trainer.progress=false"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in ("heldout_accuracy", "blind_accuracy", "steps", "seconds", "paths"):
        assert key in summary, key
    assert "heldout_accuracy" in printed and str(tmp_path / "summary.json") in printed
    assert summary["heldout_accuracy"] >= 0.9, summary
    assert 0.35 <= summary["blind_accuracy"] <= 0.65, summary
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["loss"] > 0.6 > metrics[-1]["loss"]  # it started at chance and learned

    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(summary["paths"]["hf_export"])
    assert hf.config.text_config.num_hidden_layers == 2
    assert (tmp_path / "hf" / "value_head.safetensors").is_file()
    assert (tmp_path / "tensorboard").is_dir() and (tmp_path / "checkpoints").is_dir()

    # `skyjax score` on the exported folder ranks the held-out pairs as the trainer's own evaluation did
    heldout = tmp_path / "data" / "heldout.jsonl"
    rows = heldout.read_text().splitlines()[:32]
    small = tmp_path / "data" / "heldout_32.jsonl"
    small.write_text("\n".join(rows) + "\n")
    out = tmp_path / "scored.jsonl"
    assert main(["score", "--model", summary["paths"]["hf_export"], "--data", str(small), "--out", str(out)]) == 0
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(scored) == 32
    assert np.mean([r["score_chosen"] > r["score_rejected"] for r in scored]) >= 0.85
