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
