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


def test_train_command_writes_summary_checkpoint_and_an_export_transformers_loads(tmp_path):
    """`skyjax train` end to end on the demo config, shortened: the run directory holds what the README promises."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    overrides = ["trainer.steps=3", "trainer.log_every=1", "data.synthetic.train=48", "data.synthetic.heldout=16",
                 "data.synthetic.image_size=56", "data.patch_buckets=[256]", "mesh.shape=[1,1,1]",
                 "model.tiny_layers=1", "model.tiny_vision_depth=2", "trainer.progress=false"]
    assert main(["train", "configs/demo/reward_model.yaml", "--run-dir", str(tmp_path), *overrides]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in ("heldout_accuracy", "blind_accuracy", "steps", "seconds", "paths"):
        assert key in summary, key
    assert summary["steps"] == 3 and 0.0 <= summary["heldout_accuracy"] <= 1.0
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(summary["paths"]["hf_export"])
    assert hf.config.text_config.num_hidden_layers == 1
    assert (tmp_path / "hf" / "value_head.safetensors").is_file()
    assert (tmp_path / "tensorboard").is_dir() and (tmp_path / "metrics.jsonl").is_file()
