"""Decode throughput of `skyjax.sample.generate` vs transformers `generate`, same machine, same weights.

    python -m skyjax.sample.bench --out bench_generate.json

A random Qwen2 (default: hidden 512, 8 layers, vocab 32000 -- small but not tiny) is built with transformers, saved,
and loaded by skyjax from that folder, so both run the same weights. Both decode a left-padded batch of prompts of
different lengths greedily in float32 (or `dtype=bfloat16`, weights and activations, both sides) for exactly
`new_tokens` tokens (no stop token). Where JAX runs on a GPU, transformers runs on the same GPU (`device`).
Reported: new tokens per second (batch * new_tokens / wall time of a whole generate call, prefill included; best of
`repeats` runs after a warm-up, ours and the reference interleaved so both see the same machine load; compile time
reported separately), the ratio ours / transformers, and how many rows agree token for token. On a busy machine
the wall times are noisy: the process CPU time of each call is recorded too (`ratio_cpu_time`, best of each;
meaningful with --threads 1, since idle worker threads that spin count as CPU time).
`run_generate_bench(...)` returns the same dict, for a later `skyjax bench`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

DEFAULTS = dict(hidden=512, layers=8, heads=8, kv_heads=2, intermediate=1408, vocab=32000, batch=8, new_tokens=128,
                min_prompt=16, max_prompt=64, repeats=5, seed=0, dtype="float32", device="auto")


def _best(times):
    return min(times)


def run_generate_bench(hidden: int = 512, layers: int = 8, heads: int = 8, kv_heads: int = 2,
                       intermediate: int = 1408, vocab: int = 32000, batch: int = 8, new_tokens: int = 128,
                       min_prompt: int = 16, max_prompt: int = 64, repeats: int = 5, seed: int = 0,
                       torch_threads: int | None = None, dtype: str = "float32", device: str = "auto",
                       log=print) -> dict:
    """The benchmark; returns the result dict (see the module docstring). torch_threads: torch's intra-op threads
    (default: all cores). XLA's threads are fixed when JAX starts (XLA_FLAGS); `main --threads N` sets both.

    dtype: float32 or bfloat16, for both models (weights and activations). device: where transformers runs, "cpu",
    "cuda" or "auto" (cuda when JAX's backend is a GPU and torch sees one, else cpu); skyjax runs on JAX's default
    backend. In float32 both do full-precision matmuls (skyjax with matmul_precision=highest, since XLA on a GPU
    would otherwise use TF32, which PyTorch does not by default)."""
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"generate benchmark dtype {dtype!r}: use float32 or bfloat16")
    import jax
    import numpy as np
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from skyjax.convert.checkpoint import load_hf
    from skyjax.sample.adapters import adapter_for
    from skyjax.sample.decode import Sampling, generate, left_pad

    if device == "auto":
        device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    torch.manual_seed(seed)
    torch.set_num_threads(torch_threads or os.cpu_count() or 1)
    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=4096, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False,
                         bos_token_id=None, eos_token_id=None, pad_token_id=0)
    hf = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # random but not degenerate: the default init makes greedy repeat one token
        for name, p in hf.named_parameters():
            std = 0.1 if "norm" in name else 0.6 / p.shape[-1] ** 0.5
            p.copy_((1.0 if "norm" in name else 0.0) + std * torch.randn_like(p))
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    if dtype == "bfloat16":
        hf = hf.to(torch.bfloat16)
    n_params = sum(p.numel() for p in hf.parameters())

    rng = np.random.RandomState(seed)
    lengths = rng.randint(min_prompt, max_prompt + 1, batch)
    rows = [rng.randint(1, vocab, n).tolist() for n in lengths]
    ids, mask = left_pad(rows, 0)

    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        full_precision = dtype == "float32" and jax.default_backend() != "cpu"
        lm = load_hf(tmp, dtype=dtype, param_dtype=dtype, **({"matmul_precision": "highest"} if full_precision else {}))
    hf = hf.to(device)
    adapter = adapter_for(lm)
    inputs = {"input_ids": ids, "attention_mask": mask}
    sampling = Sampling(max_new_tokens=new_tokens)

    def ours():
        out = generate(adapter, lm.params, inputs, sampling)
        return np.asarray(jax.block_until_ready(out.tokens))

    def timed(fn, walls, cpus):
        t, c = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
        return result

    t_ids = torch.as_tensor(ids, dtype=torch.long).to(device)
    t_mask = torch.as_tensor(mask.astype(np.int64)).to(device)

    def reference():
        with torch.no_grad():
            out = hf.generate(input_ids=t_ids, attention_mask=t_mask, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False)
        return out[:, ids.shape[1]:].cpu().numpy()  # .cpu() waits for the GPU

    t = time.perf_counter()
    ours_tokens = ours()
    first_call = time.perf_counter() - t
    hf_tokens = reference()  # warm-up
    ours_times, hf_times, ours_cpu, hf_cpu = [], [], [], []
    for _ in range(repeats):  # interleaved, so that both see the same machine load
        timed(ours, ours_times, ours_cpu)
        hf_tokens = timed(reference, hf_times, hf_cpu)
        log(f"skyjax {ours_times[-1]:.3f}s (cpu {ours_cpu[-1]:.3f}s), transformers {hf_times[-1]:.3f}s "
            f"(cpu {hf_cpu[-1]:.3f}s) for {batch} x {new_tokens} tokens")
    log(f"skyjax first call (compile + run) {first_call:.2f}s")
    if hf_tokens.shape != (batch, new_tokens) or ours_tokens.shape != (batch, new_tokens):
        raise RuntimeError(f"token counts differ: ours {ours_tokens.shape}, transformers {hf_tokens.shape}")

    ours_tps = batch * new_tokens / _best(ours_times)
    hf_tps = batch * new_tokens / _best(hf_times)
    agree_rows = int(np.sum(np.all(ours_tokens == hf_tokens, axis=1)))
    first_diff = [int(np.argmax(a != b)) if np.any(a != b) else None for a, b in zip(ours_tokens, hf_tokens)]
    return {
        "benchmark": "generate_decode_throughput",
        "config": dict(hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, intermediate=intermediate,
                       vocab=vocab, batch=batch, new_tokens=new_tokens, prompt_lengths=lengths.tolist(),
                       dtype=dtype, decoding="greedy", torch_device=device, parameters=n_params, repeats=repeats,
                       seed=seed),
        "machine": dict(platform=platform.platform(), cpus=os.cpu_count(), jax=jax.__version__,
                        jax_devices=[str(d) for d in jax.devices()], torch=torch.__version__,
                        torch_threads=torch.get_num_threads(), xla_flags=os.environ.get("XLA_FLAGS", ""),
                        load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None),
        "skyjax": dict(tokens_per_s=round(ours_tps, 2), seconds=[round(x, 4) for x in ours_times],
                       cpu_seconds=[round(x, 4) for x in ours_cpu],
                       first_call_seconds=round(first_call, 3), decode_step=adapter.__class__.__name__ +
                       (" (unstacked layers)" if adapter.unstack_layers else " (scanned layers)")),
        "transformers": dict(tokens_per_s=round(hf_tps, 2), seconds=[round(x, 4) for x in hf_times],
                             cpu_seconds=[round(x, 4) for x in hf_cpu]),
        "ratio": round(ours_tps / hf_tps, 3),
        "ratio_cpu_time": round(min(hf_cpu) / min(ours_cpu), 3),
        "rows_identical": f"{agree_rows}/{batch}",
        "first_differing_step": first_diff,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m skyjax.sample.bench", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    for key, value in DEFAULTS.items():
        p.add_argument("--" + key.replace("_", "-"), type=type(value), default=value)
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads for BOTH XLA and torch (default: XLA's and torch's own defaults, all cores); "
                        "1 gives a comparison that a busy machine disturbs less")
    args = p.parse_args(argv)
    if args.threads:  # before JAX starts its CPU client
        flags = f" --xla_cpu_multi_thread_eigen={'false' if args.threads == 1 else 'true'}" \
                f" intra_op_parallelism_threads={args.threads}"
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + flags
    kw = {k: getattr(args, k) for k in DEFAULTS}
    result = run_generate_bench(**kw, torch_threads=args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"skyjax {result['skyjax']['tokens_per_s']} tokens/s, transformers {result['transformers']['tokens_per_s']} "
          f"tokens/s: ratio {result['ratio']}x, CPU-time ratio {result['ratio_cpu_time']}x (rows identical "
          f"{result['rows_identical']}); wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
