"""`skyjax bench`: the harness at tiny sizes (every benchmark, its references included), the JSON it writes, --only,
and the FLOP count it divides by the matmul peak. mpo_step and grpo_step (the ones that build a TRL trainer) run in
tests of their own, at their --quick settings. Timings are never asserted (benchmarks are not tests): only the
arithmetic between the recorded numbers and the shape of the result."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from skyjax.bench import BENCHMARKS, count_flops, run_benchmarks, settings_for, table
from skyjax.cli import main as cli_main
from skyjax.config import ConfigError

TINY_RM_SHAPES = dict(
    text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=320),
    vision=dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=64, fullatt_block_indexes=[0],
                window_size=112))
TINY_COMPILE = dict(hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=320, seq=16, batch=1, layers=[2, 28],
                    repeats=1, warmup=False)
TINY = {
    "matmul": dict(n=128, repeats=2),
    "rm_train_step": dict(pairs=1, steps=1, shapes=TINY_RM_SHAPES),
    "generate": dict(hidden=64, layers=1, heads=4, kv_heads=2, intermediate=128, vocab=320, batch=2, new_tokens=4,
                     repeats=1),
    "compile": TINY_COMPILE,
    "rm_train_step_gpu": dict(pairs=1, steps=1, shapes=TINY_RM_SHAPES),
    "score": dict(rows=3, reference_rows=2),
}
# the TRL ones run in tests of their own: test_mpo_step_quick_against_trl, test_grpo_step_quick_against_trl
BUT_MPO = tuple(b for b in BENCHMARKS if b not in ("mpo_step", "grpo_step"))


def _number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def result():
    out = run_benchmarks(BUT_MPO, TINY, log=lambda _: None)
    return json.loads(json.dumps(out))  # what the JSON file holds


def test_every_benchmark_and_its_reference(result):
    rm, gen, comp = result["rm_train_step"], result["generate"], result["compile"]
    for value in (rm["skyjax_s"], rm["reference_s"], gen["skyjax_tokens_per_s"], gen["reference_tokens_per_s"],
                  comp["layers_2_s"], comp["layers_28_s"], result["matmul_peak_flops_per_s"],
                  result["rm_train_step_flops_fraction"], rm["flops_per_step"]):
        assert _number(value), value
    assert rm["speedup"] == pytest.approx(rm["reference_s"] / rm["skyjax_s"], rel=1e-9)
    # both batch layouts were timed; the headline is the trainer's default (two rows per pair)
    assert set(rm["layouts"]) == {"two_rows", "shared_prompt"} and rm["config"]["layout"] == "two_rows"
    assert rm["layouts"]["two_rows"]["skyjax_s"] == rm["skyjax_s"]
    for lay in rm["layouts"].values():
        assert _number(lay["skyjax_s"]) and lay["speedup"] == pytest.approx(rm["reference_s"] / lay["skyjax_s"])
    assert rm["config"]["rows"] == {"two_rows": 2, "shared_prompt": 1}
    # by default the step trains what the reward-model stages train: the ViT and the unused LM head frozen (on both
    # sides: the reference raises if it froze a different number of parameters)
    assert rm["config"]["freeze"] == ["vision", "lm_head"] and rm["config"]["frozen_parameters"] > 0
    assert gen["speedup"] == pytest.approx(gen["skyjax_tokens_per_s"] / gen["reference_tokens_per_s"], rel=1e-9)
    assert comp["ratio"] == pytest.approx(comp["layers_28_s"] / comp["layers_2_s"], rel=1e-9)
    assert comp["pass"] is (comp["ratio"] <= 1.5) and comp["limit"] == 1.5
    assert rm["flops_source"] == "jaxpr"  # counted from the step's jaxpr, scanned layers included
    assert result["rm_train_step_flops_fraction"] == pytest.approx(
        rm["flops_per_step"] / rm["skyjax_s"] / result["matmul_peak_flops_per_s"], rel=1e-9)
    # the peak is measured before and after the RM steps, and the higher one is the one divided by
    samples = result["matmul"]["samples_flops_per_s"]
    assert len(samples) == 2 and result["matmul_peak_flops_per_s"] == max(samples) == result["matmul"]["flops_per_s"]
    # each entry records the settings it ran with
    assert rm["config"]["text"]["hidden_size"] == 64 and rm["config"]["pairs"] == 1
    assert gen["config"]["batch"] == 2 and gen["config"]["new_tokens"] == 4
    assert comp["config"]["layers"] == [2, 28] and comp["config"]["hidden"] == 64
    assert comp["config"]["persistent_cache"] == "disabled"
    m = result["machine"]
    assert m["backend"] == "cpu" and m["device_count"] >= 1 and m["cpu_count"] >= 1
    assert m["jax"] == jax.__version__ and m["torch"] and m["transformers"] and m["device_kind"]
    assert result["date"][:2] == "20" and result["benchmarks"] == list(BUT_MPO)
    lines = table(result).splitlines()
    assert [line.split()[0] for line in lines[2:]] == ["rm_train_step"] * 2 + ["generate", "compile", "score",
                                                                                "matmul"]
    assert result["rm_train_step_gpu"]["skipped"].startswith("no GPU: JAX's backend is 'cpu'")
    assert len({len(line) for line in lines[:2]}) == 1  # aligned columns


def test_compile_step_is_scanned(result):
    """The lowered program is the same size at 2 and 28 layers: nothing is unrolled per layer."""
    detail = result["compile"]["detail"]
    assert detail["layers_2"]["hlo_lines"] == detail["layers_28"]["hlo_lines"]
    assert detail["layers_28"]["parameters"] > 5 * detail["layers_2"]["parameters"]


def test_count_flops_multiplies_scans_and_sees_through_jit_and_grad():
    def f(w, x):
        return jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), x, w)[0]

    layer = 2 * 8 * 16 * 16
    for n in (1, 5):
        w, x = jax.ShapeDtypeStruct((n, 16, 16), jnp.float32), jax.ShapeDtypeStruct((8, 16), jnp.float32)
        assert count_flops(f, w, x) == n * layer
        assert count_flops(jax.jit(f), w, x) == n * layer
        # forward, then per layer d(weights) and d(inputs): three matmuls per layer
        assert count_flops(jax.grad(lambda w, x: f(w, x).sum(), argnums=(0, 1)), w, x) == 3 * n * layer
    conv = lambda x, k: jax.lax.conv(x, k, (1, 1), "VALID")  # noqa: E731
    # [N=1, C=3, 8x8] * [O=4, I=3, 3x3] -> [1, 4, 6, 6]: 2*27 FLOPs per output
    assert count_flops(conv, jnp.ones((1, 3, 8, 8)), jnp.ones((4, 3, 3, 3))) == 2 * 27 * 4 * 36


def test_cli_only_selects_and_writes_json(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert cli_main(["bench", "--quick", "--only", "matmul", "--out", str(out), "matmul.n=64", "matmul.repeats=1"]) == 0
    data = json.loads(out.read_text())
    assert data["benchmarks"] == ["matmul"] and data["settings"] == {"matmul": {"n": 64, "repeats": 1,
                                                                                "dtype": "float32"}}
    assert data["quick"] is True and _number(data["matmul_peak_flops_per_s"])
    assert not {"rm_train_step", "generate", "compile", "rm_train_step_flops_fraction"} & set(data)
    printed = capsys.readouterr().out
    assert "matmul peak (GFLOP/s)" in printed and "rm_train_step" not in printed


def test_settings_and_bad_arguments(capsys):
    quick = settings_for(True, ["generate.batch=3", "rm_train_step.shapes.text.num_hidden_layers=1"])
    assert quick["generate"]["batch"] == 3 and quick["rm_train_step"]["shapes"]["text"]["num_hidden_layers"] == 1
    full = settings_for(False, ["rm_train_step.shapes.vision.depth=2"])  # filled from BENCH_SHAPES first
    assert full["rm_train_step"]["shapes"]["vision"]["depth"] == 2
    mpo = settings_for(False, ["mpo_step.shapes.num_hidden_layers=2"])["mpo_step"]  # from MPO_BENCH_SHAPES
    assert mpo["shapes"]["num_hidden_layers"] == 2 and mpo["shapes"]["hidden_size"] == 256
    assert full["rm_train_step"]["shapes"]["text"]["hidden_size"] == 512
    assert full["generate"]["batch"] == 8 and full["generate"]["new_tokens"] == 128
    with pytest.raises(ConfigError, match="not a setting"):
        settings_for(True, ["generate.batchsize=3"])
    with pytest.raises(SystemExit):
        cli_main(["bench", "--only", "compile,nope", "--out", "x.json"])
    assert "choose from rm_train_step,generate,compile,matmul" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown benchmark"):
        run_benchmarks(["nope"])


def test_gpu_benchmark_arithmetic_on_the_cpu():
    """The GPU entry's own code path (bf16 on both sides, MFU against a peak), run on the CPU at a tiny shape."""
    from skyjax.train.bench import gpu_bf16_peak, run_rm_gpu_bench

    assert gpu_bf16_peak("NVIDIA H100 80GB HBM3")[0] == 989.4e12 and gpu_bf16_peak("NVIDIA H200")[0] == 989.4e12
    assert gpu_bf16_peak("NVIDIA A100-SXM4-80GB")[0] == 312e12 and gpu_bf16_peak("Some GPU")[0] is None
    r = run_rm_gpu_bench(pairs=1, steps=1, shapes=TINY_RM_SHAPES, require_gpu=False, peak=1e12, freeze=["lm_head"])
    assert r["config"]["dtype"] == "bfloat16" and r["peak_source"] == "given"
    assert r["config"]["freeze"] == ["lm_head"]  # the vision tower trained too, on both sides
    for lay in r["layouts"].values():
        assert lay["mfu"] == pytest.approx(lay["flops_per_step"] / lay["skyjax_s"] / 1e12, rel=1e-9)
    assert r["mfu"] == r["layouts"]["two_rows"]["mfu"]
    assert r["reference_mfu"] == pytest.approx(r["layouts"]["two_rows"]["flops_per_step"] / r["reference_s"] / 1e12)


def test_generate_benchmark_in_bfloat16_and_its_device():
    """The bf16 variant (both sides' weights and activations) and where the reference ran are recorded; an unknown
    dtype is refused before anything is built."""
    from skyjax.sample.bench import run_generate_bench

    r = run_generate_bench(**{**TINY["generate"], "repeats": 1}, dtype="bfloat16", log=lambda _: None)
    assert r["config"]["dtype"] == "bfloat16" and r["config"]["torch_device"] == "cpu"  # auto: JAX is on the CPU
    assert _number(r["skyjax"]["tokens_per_s"]) and _number(r["transformers"]["tokens_per_s"])
    assert r["ratio"] == pytest.approx(r["skyjax"]["tokens_per_s"] / r["transformers"]["tokens_per_s"], rel=1e-2)
    with pytest.raises(ValueError, match="float16.*use float32 or bfloat16"):
        run_generate_bench(**TINY["generate"], dtype="float16")


def test_reference_step_freezes_what_skyjax_freezes():
    """The reference freezes the parameters of the same trainer.freeze presets (requires_grad False): its frozen
    count is checked against skyjax's, and a preset it does not know is refused."""
    from skyjax.train.bench import TORCH_FREEZE, _torch_step, run_rm_bench
    from skyjax.train.optimizer import FREEZE_PRESETS

    assert set(TORCH_FREEZE) <= set(FREEZE_PRESETS["qwen2_5_vl_reward"])
    with pytest.raises(ValueError, match=r"freeze \['head'\]: the reference knows"):
        _torch_step(None, None, 1, "float32", freeze=["head"])
    with pytest.raises(ValueError, match=r"freeze \['head'\]: the reference knows"):  # before anything compiles
        run_rm_bench(pairs=1, steps=1, shapes=TINY_RM_SHAPES, freeze=["vision", "head"])


def test_score_benchmark_on_a_handful_of_rows():
    """The scoring job's entry: synthetic rows (no data given, and it says so), rows/s on both sides and their ratio,
    the compile count, and scores that agree with the transformers reference."""
    out = json.loads(json.dumps(run_benchmarks(["score"], {"score": dict(rows=4, reference_rows=3)},
                                               log=lambda _: None)))
    r = out["score"]
    assert r["rows"] == 4 and r["conversations"] == 8 and r["reference_rows"] == 3
    assert r["rows_source"].startswith("synthetic rows with VL-RewardBench's length distribution")
    assert _number(r["skyjax_rows_per_s"]) and _number(r["reference_rows_per_s"]) and r["compiles"] >= 1
    assert r["skyjax_rows_per_s"] == pytest.approx(4 / r["skyjax_s"], rel=1e-9)
    assert r["speedup"] == pytest.approx(r["skyjax_rows_per_s"] / r["reference_rows_per_s"], rel=1e-9)
    assert r["max_abs_diff"] < 1e-4  # fp32 on both sides
    assert "score (rows/s)" in table(out) and "compiles" in table(out)


def test_mpo_step_quick_against_trl():
    """mpo_step at its --quick settings: skyjax's kind: mpo step and TRL's DPOTrainer as MPO on the same tiny Qwen2
    and pairs; every figure is recorded and finite, the ratios are the recorded times' ratios, and the two sides'
    losses agree at every step (the same loss, the same updates)."""
    pytest.importorskip("trl")
    settings = settings_for(True)
    out = json.loads(json.dumps(run_benchmarks(["mpo_step"], settings, log=lambda _: None)))
    r, quick = out["mpo_step"], settings["mpo_step"]
    for value in (r["skyjax_s"], r["trl_s"], r["trl_speedup"], r["compile_s"], r["skyjax_pairs_per_s"],
                  r["trl_pairs_per_s"], r["flops_per_step"], r["precompute_vs_trl_resident"]):
        assert _number(value), value
    assert r["trl_speedup"] == pytest.approx(r["trl_s"] / r["skyjax_s"], rel=1e-9)
    assert r["skyjax_pairs_per_s"] == pytest.approx(quick["pairs"] / r["skyjax_s"], rel=1e-9)
    assert r["trl_pairs_per_s"] == pytest.approx(quick["pairs"] / r["trl_s"], rel=1e-9)
    pre = r["layouts"]["precomputed_reference"]
    assert _number(pre["skyjax_s"]) and _number(pre["compile_s"])
    assert r["precompute_vs_trl_resident"] == pytest.approx(r["trl_s"] / pre["skyjax_s"], rel=1e-9)
    assert r["layouts"]["resident_reference"]["skyjax_s"] == r["skyjax_s"]
    assert all(len(t) == quick["steps"] for t in r["times_s"].values()) and set(r["times_s"]) == {
        "trl", "resident_reference", "precomputed_reference"}
    assert r["loss_abs_diff"] < 1e-4 and r["loss_abs_diff_all_steps"] < 1e-4
    b = r["batch"]
    assert b["pairs"] == quick["pairs"] == len(b["prompt_tokens"]) and b["skyjax"]["rows"] == quick["pairs"]
    assert b["trl"]["rows"] == 2 * quick["pairs"] and b["skyjax"]["seq_len"] % quick["seq_multiple"] == 0
    assert r["config"]["setup"].startswith("text-only Qwen2ForCausalLM") and r["config"]["bco_delta"] == "none"
    assert r["config"]["model"]["hidden_size"] == 64 and r["config"]["trl"]["trl"]
    assert out["settings"]["mpo_step"]["pairs"] == quick["pairs"] and out["benchmarks"] == ["mpo_step"]
    assert [line.split()[0] for line in table(out).splitlines()[2:]] == ["mpo_step"] * 2


def test_grpo_step_quick_against_trl():
    """grpo_step at its --quick settings: skyjax's kind: grpo iteration and TRL's GRPOTrainer on the same tiny Qwen2
    and prompts; both sides ran every timed iteration, rollout and update apart, every figure is finite and the ratios
    are the recorded times' ratios; both generated exactly max_new_tokens per completion from the same prompt ids and
    the same weights (TRL's policy scores skyjax's rollout as skyjax's sampler did)."""
    pytest.importorskip("trl")
    settings = settings_for(True)
    out = json.loads(json.dumps(run_benchmarks(["grpo_step"], settings, log=lambda _: None)))
    r, quick = out["grpo_step"], settings["grpo_step"]
    for value in (r["skyjax_s"], r["trl_s"], r["trl_speedup"]):
        assert _number(value), value
    for phase in ("rollout", "update"):
        p = r[phase]
        for key in ("skyjax_s", "trl_s", "skyjax_tokens_per_s", "trl_tokens_per_s", "trl_speedup"):
            assert _number(p[key]), (phase, key, p[key])
        assert p["trl_speedup"] == pytest.approx(p["trl_s"] / p["skyjax_s"], rel=1e-9)
        assert _number(p["skyjax_cpu_s"]) and _number(p["trl_cpu_s"])
        assert p["trl_cpu_ratio"] == pytest.approx(p["trl_cpu_s"] / p["skyjax_cpu_s"], rel=1e-9)
        for side in ("skyjax", "trl"):
            assert len(r["times_s"][side][phase]) == len(r["cpu_s"][side][phase]) == quick["steps"]
        assert set(r["warmup_s"]["skyjax"]) == set(r["warmup_s"]["trl"]) == {"rollout", "update"}
    total = {side: [a + b for a, b in zip(r["times_s"][side]["rollout"], r["times_s"][side]["update"])]
             for side in ("skyjax", "trl")}
    assert r["trl_speedup"] == pytest.approx(np.median(total["trl"]) / np.median(total["skyjax"]), rel=1e-9)
    b = r["batch"]
    completions = quick["prompts"] * quick["num_generations"]
    assert b["completions"] == completions and b["generated_tokens"] == completions * quick["max_new_tokens"]
    for side in ("skyjax", "trl"):  # every completion full length on both sides: the same work
        assert b[side]["rows"] == completions and b[side]["completion_tokens"] == b["generated_tokens"]
    assert b["prompt_tokens_equal"] is True and b["skyjax"]["real_tokens"] == b["trl"]["real_tokens"]
    assert r["rollout"]["skyjax_tokens_per_s"] == pytest.approx(b["generated_tokens"] / r["rollout"]["skyjax_s"])
    assert r["logp_max_abs_diff"] < 1e-4  # the same weights and the same model on both sides (fp32)
    assert len(r["losses"]["skyjax"]) == len(r["losses"]["trl"]) == quick["steps"] + 1
    assert all(math.isfinite(x) for side in r["losses"].values() for x in side)
    assert r["config"]["trl"]["loss_type"] == quick["loss_type"] and r["config"]["trl"]["beta"] == quick["beta"]
    assert r["config"]["model"]["hidden_size"] == 64 and r["tunix"].startswith("not run")
    assert [line.split()[0] for line in table(out).splitlines()[2:]] == ["grpo_step"] * 3
