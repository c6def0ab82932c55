"""`skyjax bench`: every benchmark of the project in one run, written as one JSON file plus a short table.

    skyjax bench --out bench.json                          # the settings the issues name (tens of minutes on CPU)
    skyjax bench --quick --out bench_quick.json            # smaller settings, ~2-3 minutes on a 2-core machine
    skyjax bench --only compile,matmul --out c.json        # a subset
    skyjax bench --only mpo_step --out m.json              # the MPO step against TRL's DPOTrainer as MPO
    skyjax bench --only grpo_step --out g.json             # one GRPO iteration against TRL's GRPOTrainer
    skyjax bench --quick --out t.json compile.hidden=256 generate.batch=2   # dotted overrides of any setting

Benchmarks are not tests: each one measures skyjax against a reference measured in the same run on the
same machine, and the numbers that matter are the ratios.

rm_train_step   The reward-model train step (skyjax.train.bench.run_rm_bench): Qwen2.5-VL reward model, text hidden
                512 x 4 layers, vision hidden 256 x 4 blocks, 4 preference pairs with two 224x224 images each;
                forward, Bradley-Terry loss, backward, AdamW. `freeze` (default [vision, lm_head]) names the parts
                not trained, as trainer.freeze does: by default what the reward-model stages train (the ViT frozen,
                as in the trainer's default and the paper; merger, LLM and value head trained; the unused LM head
                frozen); [lm_head] trains the vision tower too. Reference: transformers + PyTorch doing the same
                step, the same parameters frozen (requires_grad False), on the two rows of every pair. skyjax is
                timed in two batch layouts, each its own compiled step: `two_rows` (a chosen and a rejected row per
                pair, the images encoded once per pair: the trainer's default) and `shared_prompt` (one row per
                pair, prompt | chosen | rejected, the prompt computed once: data.share_prompt=true; the same
                scores, tested against transformers). `skyjax_s` / `speedup` are the first layout of
                `rm_train_step.layouts` (two_rows); `layouts` holds each one's time and
                speedup = reference_s / skyjax_s (above 1: skyjax is faster).
generate        Decode throughput (skyjax.sample.bench.run_generate_bench): a random Qwen2 (hidden 512, 8 layers),
                batch 8, 128 new greedy tokens, against transformers `generate` on the same weights.
                `speedup` = skyjax_tokens_per_s / reference_tokens_per_s.
compile         Wall time of jit lower + compile (no execution) of a Qwen2 train step (forward, mean next-token
                cross entropy on the logits, backward, AdamW) at hidden 512, 8 heads, 2 KV heads, seq 256, batch 2,
                with 2 and with 28 layers. Layers are stacked and run with `lax.scan` (skyjax.nn.scan), so the
                28-layer step should compile within 1.5x of the 2-layer one: `ratio` = layers_28_s / layers_2_s,
                `pass` = ratio <= 1.5. The persistent compilation cache is off while it is measured and every compile
                is of a freshly traced function, so nothing is reused; an untimed 1-layer compile first absorbs the
                one-time costs. The lowered program's size (`hlo_lines`) is recorded to show whether it grows with
                depth (something unrolled per layer would).
matmul          This machine's matmul peak (skyjax.train.bench.matmul_peak: a square fp32 matmul through JAX, best
                of several; with rm_train_step, measured before and after its steps and the higher kept, both in
                `matmul.samples_flops_per_s`). `rm_train_step_flops_fraction` = the RM step's FLOPs / its time /
                this peak. The FLOPs are counted from the step's jaxpr (skyjax.parallel.aot.count_flops: matmuls
                and convolutions, scanned layers times their trip count), not from XLA's cost_analysis, which counts
                a scanned body once.
score           A VL-RewardBench scoring job (skyjax.eval.bench.run_score_bench): 1,250 rows (2,500 conversations) with
                a tiny Qwen2.5-VL reward model, the whole job as `skyjax eval` runs it (compiles included; `compiles`
                counts them) against transformers + PyTorch scoring one conversation at a time, same weights and
                inputs. `data` = the benchmark's data.jsonl (stand-in images are drawn); without it, synthetic rows
                with its length distribution (`rows_source` says which). `speedup` = skyjax rows/s / reference rows/s.
rm_train_step_gpu  Only where JAX's backend is a GPU (otherwise recorded as skipped, at once): the reward-model train
                step in bf16 at a ~1.5B-parameter decoder (Qwen2-1.5B's shape) with Qwen2.5-VL's own vision tower
                (skyjax.train.bench.run_rm_gpu_bench, GPU_SHAPES), both layouts, against transformers + PyTorch on
                the same GPU in the same run; `mfu` = the step's jaxpr FLOPs / time / the GPU's dense bf16
                datasheet peak (GPU_BF16_PEAK), `reference_mfu` the same for PyTorch's step.
mpo_step        The MPO train step (skyjax.train.mpo_bench.run_mpo_bench): the `kind: mpo` step (DPO 0.8 + BCO 0.2 + SFT
                1.0, beta 0.1, reference resident in the state) against TRL 1.16's DPOTrainer configured as MPO
                (loss_type [sigmoid, bco_pair, sft], loss_weights [0.8, 0.2, 1.0], ref_model a resident copy,
                precompute_ref_log_probs false), timed as transformers' loop runs a step (training_step, clipping,
                AdamW, scheduler). The same text-only Qwen2 causal LM on both sides (hidden 256 x 4 layers, vocab
                4096: MPO_BENCH_SHAPES; random weights saved once and loaded by both), fp32, no gradient checkpointing,
                8 pairs of random tokens (prompt 128-256, responses 32-160 tokens, fixed seed). TRL's batch is its
                collator's (two rows per pair); skyjax's is the trainer's (one shared-prompt row per pair).
                bco_delta "none" (TRL's bco_pair), so both compute the same loss: `loss_abs_diff` (first step) and
                `loss_abs_diff_all_steps` check it. `trl_speedup` = trl_s / skyjax_s (medians of `steps` alternating
                steps after a warm-up; `compile_s` apart); `layouts.precomputed_reference` is skyjax's
                reference.precompute step (no reference in the state), `precompute_vs_trl_resident` its ratio to
                TRL's resident-reference step. `config.setup` states the setup in words.
grpo_step       One GRPO iteration (skyjax.train.grpo_bench.run_grpo_bench): 4 prompts x G = 8 completions of exactly
                64 new tokens, a token-id rule reward, group advantages, then one optimizer step (loss_type dapo,
                beta 0, epsilon 0.2: TRL's defaults), skyjax's `kind: grpo` Trainer (its rollout source and jitted
                step) against TRL 1.16's GRPOTrainer (_generate_and_score_completions, then training_step + AdamW)
                on the same text-only Qwen2 (MPO_BENCH_SHAPES' size, random weights saved once, the tiny Qwen
                tokenizer, the same chat prompts), fp32, same CPU. `rollout` and `update` are timed apart
                (seconds, tokens/s: generated tokens for the rollout, real prompt + completion tokens for the
                update, and `trl_speedup` each); `trl_speedup` = TRL's median iteration / skyjax's (alternating
                iterations after a warm-up, `warmup_s` holding the compiles); `logp_max_abs_diff` checks that both
                sides hold the same weights (TRL's policy scoring skyjax's first rollout). `tunix` says why Tunix's
                GRPO learner was not run.

The JSON has one entry per benchmark (each with its `config`), `matmul_peak_flops_per_s`,
`rm_train_step_flops_fraction`, `machine` (platform, backend, device kind and count, CPU count, load average at
the start and at the end, jax / torch / transformers versions, XLA_FLAGS), `date`, and `settings` (every setting used, after --quick and
overrides). `run_benchmarks(only, settings)` is the same thing as a function.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from skyjax.parallel.aot import count_flops  # noqa: F401  (part of this module's interface)
from skyjax.machine import machine_info  # noqa: F401 -- re-exported: benchmark JSONs record it
from skyjax.train.bench import RM_BENCH_FREEZE

BENCHMARKS = ("rm_train_step", "generate", "compile", "matmul", "rm_train_step_gpu", "score", "mpo_step",
              "grpo_step")
COMPILE_RATIO_LIMIT = 1.5

# The settings the issues name. Every key is a keyword argument of the benchmark's function.
DEFAULT_SETTINGS: dict[str, dict[str, Any]] = {
    "matmul": dict(n=2048, repeats=10, dtype="float32"),
    "rm_train_step": dict(pairs=4, steps=5, dtype="float32", torch_baseline=True, shapes=None,  # None: BENCH_SHAPES
                          freeze=list(RM_BENCH_FREEZE)),
    "generate": dict(hidden=512, layers=8, heads=8, kv_heads=2, intermediate=1408, vocab=32000, batch=8,
                     new_tokens=128, repeats=5, dtype="float32"),
    "compile": dict(hidden=512, heads=8, kv_heads=2, intermediate=1408, vocab=32000, seq=256, batch=2,
                    layers=[2, 28], repeats=2, dtype="float32", remat="none", warmup=True),
    "rm_train_step_gpu": dict(pairs=4, steps=5, shapes=None,  # None: GPU_SHAPES (a 1.5B decoder); no GPU: skipped
                              freeze=list(RM_BENCH_FREEZE)),
    # data: VL-RewardBench's data.jsonl (None: synthetic rows with its length distribution); rows None = all
    "score": dict(rows=None, data=None, reference_rows=None, max_batch_tokens=None, torch_baseline=True),
    # shapes None: skyjax.train.mpo_bench.MPO_BENCH_SHAPES (Qwen2, hidden 256 x 4 layers, vocab 4096)
    "mpo_step": dict(pairs=8, steps=5, prompt_len=[128, 256], response_len=[32, 160], shapes=None, seq_multiple=32,
                     bco_delta="none", lr=1e-6, precompute=True, trl_baseline=True),
    # shapes None: skyjax.train.grpo_bench.GRPO_BENCH_SHAPES (the MPO bench's Qwen2)
    "grpo_step": dict(prompts=4, num_generations=8, max_new_tokens=64, steps=3, prompt_len=[24, 48], shapes=None,
                      loss_type="dapo", beta=0.0, epsilon=0.2, lr=1e-6, trl_baseline=True),
}

# --quick: the same benchmarks, small enough that the whole command takes ~2-3 minutes on 2 CPU cores. The compile
# benchmark keeps the named width (it is about depth, and its cost hardly depends on width); it only repeats less.
QUICK_SETTINGS: dict[str, dict[str, Any]] = {
    "matmul": dict(n=1024, repeats=5, dtype="float32"),
    "rm_train_step": dict(pairs=1, steps=2, dtype="float32", torch_baseline=True, freeze=list(RM_BENCH_FREEZE),
                          shapes=dict(
        text=dict(hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=32000),
        vision=dict(depth=2, hidden_size=128, num_heads=2, intermediate_size=352, fullatt_block_indexes=[1],
                    window_size=112))),
    "generate": dict(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=704, vocab=32000, batch=4,
                     new_tokens=32, repeats=2, dtype="float32"),
    "compile": dict(hidden=512, heads=8, kv_heads=2, intermediate=1408, vocab=32000, seq=256, batch=2,
                    layers=[2, 28], repeats=1, dtype="float32", remat="none", warmup=True),
    "rm_train_step_gpu": dict(pairs=2, steps=2, shapes=None, freeze=list(RM_BENCH_FREEZE)),
    "score": dict(rows=200, data=None, reference_rows=100, max_batch_tokens=None, torch_baseline=True),
    "mpo_step": dict(pairs=2, steps=2, prompt_len=[12, 20], response_len=[4, 10], seq_multiple=8, bco_delta="none",
                     lr=1e-6, precompute=True, trl_baseline=True,
                     shapes=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=512)),
    "grpo_step": dict(prompts=2, num_generations=2, max_new_tokens=4, steps=1, prompt_len=[8, 12], loss_type="dapo",
                      beta=0.0, epsilon=0.2, lr=1e-6, trl_baseline=True,
                      shapes=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=512)),
}


# --- FLOPs of a traced function ------------------------------------------------------------------------------------


# --- the compile benchmark ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def no_persistent_compilation_cache():
    """Compiles inside neither read nor write the persistent compilation cache (JAX memoises whether the cache is in
    use, so the flag alone is not enough once something has compiled: the cache state is reset on entry and exit)."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    old = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    cc.reset_cache()
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", old)
        cc.reset_cache()


def _lm_train_step(cfg):
    """A fresh jitted Qwen2 train step (new closures, so no jit cache can match) and its abstract arguments."""
    import jax
    import jax.numpy as jnp
    import optax

    from skyjax.models.qwen2 import Qwen2ForCausalLM
    from skyjax.nn.functional import Functional

    fn = Functional.create(lambda r: Qwen2ForCausalLM(cfg, rngs=r))
    opt = optax.adamw(1e-5)

    def train_step(params, opt_state, batch):
        ids, mask = batch["input_ids"], batch["attention_mask"]

        def loss_fn(p):
            logits, _ = fn.bind(p)(ids, attention_mask=mask)  # [B, S, V]
            logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
            nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
            return jnp.mean(nll)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(train_step, donate_argnums=(0, 1)), fn, opt


def _time_compile(cfg, batch: int, seq: int) -> dict:
    import jax
    import jax.numpy as jnp

    step, fn, opt = _lm_train_step(cfg)
    params = fn.shapes
    opt_state = jax.eval_shape(opt.init, params)
    data = {"input_ids": jax.ShapeDtypeStruct((batch, seq), jnp.int32),
            "attention_mask": jax.ShapeDtypeStruct((batch, seq), jnp.bool_)}
    t0 = time.perf_counter()
    lowered = step.lower(params, opt_state, data)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    return {"lower_s": t1 - t0, "compile_s": t2 - t1, "total_s": t2 - t0,
            "hlo_lines": lowered.as_text().count("\n"), "parameters": fn.num_params()}


def run_compile_bench(hidden: int = 512, heads: int = 8, kv_heads: int = 2, intermediate: int = 1408,
                      vocab: int = 32000, seq: int = 256, batch: int = 2, layers=(2, 28), repeats: int = 2,
                      dtype: str = "float32", remat: str = "none", warmup: bool = True, log=print) -> dict:
    """Lower + compile time of the Qwen2 train step at each depth in `layers` (best of `repeats`, each a fresh
    trace and a fresh compile); ratio = deepest / shallowest. warmup: first an untimed 1-layer compile at other
    shapes, so that one-time costs do not land on the first measurement."""
    import jax

    from skyjax.models.qwen2 import Qwen2Config

    def config(n):
        return Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=n,
                           num_attention_heads=heads, num_key_value_heads=kv_heads, dtype=dtype, remat=remat)

    layers = sorted(int(n) for n in layers)
    per_depth = {}
    with no_persistent_compilation_cache():
        t = time.perf_counter()
        if warmup:
            _time_compile(config(1), batch, max(seq // 2, 2))  # untimed: first-compile costs, other shapes
        warmup_s = time.perf_counter() - t if warmup else None
        for _ in range(max(repeats, 1)):
            for n in layers:  # interleaved, so that both depths see the same machine load
                r = _time_compile(config(n), batch, seq)
                if n not in per_depth or r["total_s"] < per_depth[n]["total_s"]:
                    per_depth[n] = r
                log(f"compile: {n} layers, lower {r['lower_s']:.2f}s + compile {r['compile_s']:.2f}s, "
                    f"{r['hlo_lines']} HLO lines")
    lo, hi = layers[0], layers[-1]
    ratio = per_depth[hi]["total_s"] / per_depth[lo]["total_s"]
    result = {f"layers_{n}_s": per_depth[n]["total_s"] for n in layers}
    result.update(
        ratio=ratio, limit=COMPILE_RATIO_LIMIT, **{"pass": ratio <= COMPILE_RATIO_LIMIT},
        detail={f"layers_{n}": per_depth[n] for n in layers}, warmup_s=warmup_s,
        config=dict(model="Qwen2ForCausalLM", step="forward + mean next-token CE + backward + AdamW",
                    hidden=hidden, heads=heads, kv_heads=kv_heads, intermediate=intermediate, vocab=vocab, seq=seq,
                    batch=batch, layers=layers, dtype=dtype, remat=remat, scan="skyjax.nn.scan.scan_layers (unroll 1)",
                    repeats=repeats, timed="jit lower + compile, best of repeats", persistent_cache="disabled",
                    backend=jax.default_backend()))
    return result


# --- the harness ------------------------------------------------------------------------------------------------------


def _timed(run) -> dict:
    """A benchmark's entry with the wall time it took (`wall_s`)."""
    t = time.perf_counter()
    entry = run()
    entry["wall_s"] = time.perf_counter() - t
    return entry


def _first(d: dict, *paths, default=None):
    """The first of several possible key paths ('a.b') present in d: the generate benchmark's dict is read
    defensively, since its layout belongs to skyjax.sample.bench."""
    for path in paths:
        node = d
        for key in path.split("."):
            if not isinstance(node, dict) or key not in node:
                break
            node = node[key]
        else:
            return node
    return default


def _generate_entry(raw: dict) -> dict:
    ours = _first(raw, "skyjax.tokens_per_s", "skyjax_tokens_per_s", "ours.tokens_per_s")
    ref = _first(raw, "transformers.tokens_per_s", "reference.tokens_per_s", "reference_tokens_per_s")
    if ours is None or ref is None:
        raise KeyError(f"run_generate_bench returned no tokens/s figures (keys: {sorted(raw)})")
    entry = {"skyjax_tokens_per_s": float(ours), "reference_tokens_per_s": float(ref),
             "speedup": float(ours) / float(ref), "config": _first(raw, "config", default={})}
    for key in ("rows_identical", "first_differing_step"):
        if key in raw:
            entry[key] = raw[key]
    entry["raw"] = {k: v for k, v in raw.items() if k not in ("config", "machine")}
    return entry


def run_benchmarks(only=BENCHMARKS, settings: dict | None = None, log=print) -> dict:
    """Run the benchmarks named in `only` with `settings` (default DEFAULT_SETTINGS; a benchmark missing there
    takes its defaults) and return the result dict described in the module docstring."""
    unknown = sorted(set(only) - set(BENCHMARKS))
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; known: {', '.join(BENCHMARKS)}")
    settings = copy.deepcopy(DEFAULT_SETTINGS if settings is None else settings)
    settings = {name: {**DEFAULT_SETTINGS[name], **settings.get(name, {})} for name in BENCHMARKS}
    out: dict[str, Any] = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                           "machine": machine_info(), "benchmarks": [b for b in BENCHMARKS if b in only],
                           "settings": {b: settings[b] for b in BENCHMARKS if b in only}}
    t_all = time.perf_counter()
    peak = None
    if "matmul" in only:
        from skyjax.train.bench import matmul_peak

        log("matmul: measuring this machine's matmul peak")
        peak = matmul_peak(**settings["matmul"])
        out["matmul_peak_flops_per_s"] = peak
        out["matmul"] = {"flops_per_s": peak, "config": settings["matmul"]}
    if "rm_train_step" in only:
        from skyjax.train.bench import run_rm_bench

        log("rm_train_step: skyjax vs transformers + PyTorch")
        t = time.perf_counter()
        raw = run_rm_bench(**settings["rm_train_step"], peak=peak, measure_peak=False, log=log)
        entry = {"skyjax_s": raw["skyjax_s"], "reference_s": raw.get("reference_s"), "speedup": raw.get("speedup"),
                 "layouts": raw["layouts"], "config": raw["config"]}
        entry.update({k: raw[k] for k in ("compile_s", "flops_per_step", "flops_source", "xla_cost_analysis_flops")
                      if k in raw})
        entry["flops_per_s"] = raw["flops_per_step"] / raw["skyjax_s"] if raw.get("flops_per_step") else None
        entry["wall_s"] = time.perf_counter() - t
        out["rm_train_step"] = entry
        if peak:
            # measured again after the steps, and the higher one kept: a shared or virtual machine has minutes
            # where everything runs slower, and a peak taken in one of them would flatter the fraction
            again = matmul_peak(**settings["matmul"])
            out["matmul"]["samples_flops_per_s"] = [peak, again]
            peak = out["matmul_peak_flops_per_s"] = out["matmul"]["flops_per_s"] = max(peak, again)
            out["rm_train_step_flops_fraction"] = entry["flops_per_s"] / peak if entry["flops_per_s"] else None
    if "generate" in only:
        from skyjax.sample.bench import run_generate_bench

        log("generate: skyjax vs transformers generate")
        out["generate"] = _timed(lambda: _generate_entry(run_generate_bench(**settings["generate"],
                                                                            log=log)))
    if "compile" in only:
        log("compile: lower + compile of a Qwen2 train step, 2 vs 28 layers")
        out["compile"] = _timed(lambda: run_compile_bench(**settings["compile"], log=log))
    if "rm_train_step_gpu" in only:
        from skyjax.train.bench import run_rm_gpu_bench

        log("rm_train_step_gpu: skyjax vs transformers + PyTorch on the GPU, bf16, 1.5B decoder (MFU)")
        entry = out["rm_train_step_gpu"] = _timed(lambda: run_rm_gpu_bench(**settings["rm_train_step_gpu"],
                                                                          log=log))
        if "skipped" in entry:
            log(f"rm_train_step_gpu: skipped ({entry['skipped']})")
    if "score" in only:
        from skyjax.eval.bench import run_score_bench

        log("score: a VL-RewardBench scoring job, skyjax vs transformers + PyTorch")
        out["score"] = _timed(lambda: run_score_bench(**settings["score"], log=log))
    if "mpo_step" in only:
        from skyjax.train.mpo_bench import run_mpo_bench

        log("mpo_step: the kind: mpo train step, skyjax vs TRL's DPOTrainer configured as MPO")
        out["mpo_step"] = _timed(lambda: run_mpo_bench(**settings["mpo_step"], log=log))
    if "grpo_step" in only:
        from skyjax.train.grpo_bench import run_grpo_bench

        log("grpo_step: one GRPO iteration (rollout + update), skyjax's kind: grpo vs TRL's GRPOTrainer")
        out["grpo_step"] = _timed(lambda: run_grpo_bench(**settings["grpo_step"], log=log))
    out["wall_s"] = time.perf_counter() - t_all
    if hasattr(os, "getloadavg"):  # the load at the end too: a shared machine's other work shows here
        out["machine"]["load_average_end"] = list(os.getloadavg())
    return out


def table(result: dict) -> str:
    """The short aligned summary: name, skyjax, reference, ratio."""
    rows = [("benchmark", "skyjax", "reference", "ratio")]
    if "rm_train_step" in result:
        r = result["rm_train_step"]
        ref = r.get("reference_s")
        for name, lay in (r.get("layouts") or {r["config"].get("layout", "two_rows"): r}).items():
            rows.append((f"rm_train_step {name} (s/step)", f"{lay['skyjax_s']:.4g}",
                         "-" if ref is None else f"{ref:.4g}",
                         "-" if lay.get("speedup") is None else f"{lay['speedup']:.2f}x faster"))
    if "generate" in result:
        r = result["generate"]
        rows.append(("generate (tokens/s)", f"{r['skyjax_tokens_per_s']:.4g}", f"{r['reference_tokens_per_s']:.4g}",
                     f"{r['speedup']:.2f}x faster"))
    if "compile" in result:
        r = result["compile"]
        lo, hi = r["config"]["layers"][0], r["config"]["layers"][-1]
        verdict = "PASS" if r["pass"] else "FAIL"
        rows.append((f"compile {hi} vs {lo} layers (s)", f"{r[f'layers_{hi}_s']:.3g}", f"{r[f'layers_{lo}_s']:.3g}",
                     f"{r['ratio']:.2f} {verdict} (<= {r['limit']})"))
    if "rm_train_step_gpu" in result and "skipped" not in result["rm_train_step_gpu"]:
        r = result["rm_train_step_gpu"]
        ref = r.get("reference_s")
        for name, lay in r["layouts"].items():
            mfu = "" if lay.get("mfu") is None else f", MFU {100 * lay['mfu']:.1f}%"
            rows.append((f"rm_train_step_gpu {name} (s/step)", f"{lay['skyjax_s']:.4g}",
                         "-" if ref is None else f"{ref:.4g}",
                         ("-" if lay.get("speedup") is None else f"{lay['speedup']:.2f}x faster") + mfu))
    if "score" in result:
        r = result["score"]
        rows.append(("score (rows/s)", f"{r['skyjax_rows_per_s']:.4g}",
                     "-" if r.get("reference_rows_per_s") is None else f"{r['reference_rows_per_s']:.4g}",
                     ("-" if r.get("speedup") is None else f"{r['speedup']:.2f}x faster")
                     + f", {r['compiles']} compiles"))
    if "mpo_step" in result:
        r = result["mpo_step"]
        trl = r.get("trl_s")
        rows.append(("mpo_step vs TRL (s/step)", f"{r['skyjax_s']:.4g}", "-" if trl is None else f"{trl:.4g}",
                     "-" if r.get("trl_speedup") is None else f"{r['trl_speedup']:.2f}x faster"))
        pre = (r.get("layouts") or {}).get("precomputed_reference")
        if pre:
            rows.append(("mpo_step reference.precompute (s/step)", f"{pre['skyjax_s']:.4g}",
                         "-" if trl is None else f"{trl:.4g}",
                         "-" if r.get("precompute_vs_trl_resident") is None
                         else f"{r['precompute_vs_trl_resident']:.2f}x (TRL resident)"))
    if "grpo_step" in result:
        r = result["grpo_step"]
        trl = r.get("trl_s")
        rows.append(("grpo_step vs TRL (s/iteration)", f"{r['skyjax_s']:.4g}", "-" if trl is None else f"{trl:.4g}",
                     "-" if r.get("trl_speedup") is None else f"{r['trl_speedup']:.2f}x faster"))
        for phase in ("rollout", "update"):
            p = r[phase]
            rows.append((f"grpo_step {phase} (tokens/s)", f"{p['skyjax_tokens_per_s']:.4g}",
                         "-" if p.get("trl_tokens_per_s") is None else f"{p['trl_tokens_per_s']:.4g}",
                         "-" if p.get("trl_speedup") is None else f"{p['trl_speedup']:.2f}x faster"))
    if "matmul_peak_flops_per_s" in result:
        frac = result.get("rm_train_step_flops_fraction")
        rows.append(("matmul peak (GFLOP/s)", f"{result['matmul_peak_flops_per_s'] / 1e9:.4g}", "-",
                     "-" if frac is None else f"rm step at {100 * frac:.1f}%"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _parse_only(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in BENCHMARKS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"--only {text!r}: choose from {','.join(BENCHMARKS)}")
    return names


def settings_for(quick: bool, overrides=()) -> dict:
    """DEFAULT_SETTINGS or QUICK_SETTINGS with `bench.key=value` overrides (values parsed as YAML)."""
    from skyjax.config import ConfigError, apply_overrides

    base = copy.deepcopy(QUICK_SETTINGS if quick else DEFAULT_SETTINGS)
    if base["rm_train_step"].get("shapes") is None and any(o.startswith("rm_train_step.shapes.") for o in overrides):
        from skyjax.train.bench import BENCH_SHAPES

        base["rm_train_step"]["shapes"] = copy.deepcopy(BENCH_SHAPES)
    if base["mpo_step"].get("shapes") is None and any(o.startswith("mpo_step.shapes.") for o in overrides):
        from skyjax.train.mpo_bench import MPO_BENCH_SHAPES

        base["mpo_step"]["shapes"] = copy.deepcopy(MPO_BENCH_SHAPES)
    if base["grpo_step"].get("shapes") is None and any(o.startswith("grpo_step.shapes.") for o in overrides):
        from skyjax.train.grpo_bench import GRPO_BENCH_SHAPES

        base["grpo_step"]["shapes"] = copy.deepcopy(GRPO_BENCH_SHAPES)
    for item in overrides:
        parts = item.split("=", 1)[0].strip().split(".")
        if len(parts) < 2 or parts[0] not in base or parts[1] not in base[parts[0]]:
            known = ", ".join(f"{b}.{k}" for b in BENCHMARKS for k in base[b])
            raise ConfigError(f"override {item!r}: not a setting (settings: {known})")
    return apply_overrides(base, overrides)


def _cmd_bench(args) -> int:
    # JAX would take 75% of a GPU's memory at start-up, leaving too little for the PyTorch reference beside it
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    settings = settings_for(args.quick, args.overrides)
    only = args.only or list(BENCHMARKS)
    result = run_benchmarks(only, settings, log=lambda msg: print(msg, flush=True))
    result["quick"] = bool(args.quick)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(table(result))
    if "compile" in result:
        c = result["compile"]
        print(f"compile ratio {c['ratio']:.2f} ({'PASS' if c['pass'] else 'FAIL'} against {c['limit']})")
    print(f"wrote {args.out} ({result['wall_s']:.0f}s)")
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "bench", help="run every benchmark (RM train step, generate, compile time, matmul peak, scoring, MPO step, "
                      "GRPO step) -> JSON + table",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the project's benchmarks against references measured in the same run (transformers + "
                    "PyTorch, TRL, the machine's matmul peak), write one JSON file and print a table of the ratios.\n\n"
                    f"benchmarks: {', '.join(BENCHMARKS)}\n\n"
                    "example:\n  skyjax bench --quick --out bench_quick.json\n"
                    "  skyjax bench --out bench.json --only rm_train_step,matmul rm_train_step.pairs=2")
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    p.add_argument("--only", type=_parse_only, default=None,
                   help=f"comma-separated subset of {','.join(BENCHMARKS)} (default: all)")
    p.add_argument("--quick", action="store_true", help="smaller settings: the whole run takes a few minutes on CPU")
    p.add_argument("overrides", nargs="*", help="bench.setting=value overrides, e.g. generate.batch=2 "
                                                "compile.layers=[2,28] (values parsed as YAML)")
    p.set_defaults(func=_cmd_bench)
    return p


def main(argv=None) -> int:
    """`python -m skyjax.bench ...` (the same as `skyjax bench ...`)."""
    from skyjax.cli import main as cli_main

    return cli_main(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
