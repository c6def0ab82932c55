"""Benchmark (not a test): the reward-model train step, skyjax vs transformers + PyTorch on the same machine.

    python -m skyjax.train.bench --out rm_bench.json [--dtype float32|bfloat16] [--pairs 4] [--steps 5]
                                 [--freeze vision,lm_head]

Both sides do the same work on the same random weights: a batch of preference pairs, each prompt with two 224x224
images; forward of chosen and rejected, the fp32 value head at the last real token, the Bradley-Terry loss, backward,
an AdamW update of what is trained. By default that is what the reward-model stages train: the ViT frozen (the
trainer's default, as in the paper), the merger, the LLM and the value head trained, the unused LM head frozen;
`--freeze lm_head` trains the vision tower too. The PyTorch side runs the reference layout ([chosen; rejected] in
one batch, images encoded for both rows, as the reference training code does); skyjax encodes each pair's images
once. It prints the speedup and the step's achieved FLOP/s as a fraction of this machine's matmul peak, measured in
the same run.

FLOPs per step are counted from the step's jaxpr (`skyjax.parallel.aot.count_flops`: every matmul and convolution,
scanned
layers multiplied by their trip count). XLA's `cost_analysis()` is recorded beside it as `xla_cost_analysis_flops`,
but it counts a while loop's body once, so with scanned layers it undercounts by about the number of layers.
`skyjax bench` runs this together with the other benchmarks.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np

BENCH_SHAPES = dict(text=dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                              num_key_value_heads=2, vocab_size=32000),
                    vision=dict(depth=4, hidden_size=256, num_heads=4, intermediate_size=704,
                                fullatt_block_indexes=(1, 3), window_size=112))


def matmul_peak(dtype: str = "float32", n: int = 2048, repeats: int = 10) -> float:
    """This machine's achieved FLOP/s on a square matmul, through JAX (the ceiling the step is compared to)."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), dtype)
    # float32 on an accelerator: full precision, as the benchmarked steps use there (XLA's default would be TF32 /
    # bf16 passes); on a CPU the two are the same
    precision = jax.lax.Precision.HIGHEST if dtype == "float32" and jax.default_backend() != "cpu" else None
    f = jax.jit(lambda x: jnp.matmul(x, x, precision=precision))
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def _inputs(pairs: int, seed: int = 0):
    """Conversations and images for `pairs` pairs (two 224x224 images per prompt)."""
    from PIL import Image

    rng = np.random.RandomState(seed)
    images, chosen, rejected = [], [], []
    for i in range(pairs):
        imgs = [Image.fromarray(rng.randint(0, 255, (224, 224, 3), dtype=np.uint8)) for _ in range(2)]
        prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                               {"type": "text", "text": f"Compare the two pictures ({i})."}]}]
        images.append(imgs)
        chosen.append(prompt + [{"role": "assistant", "content": "The left one is brighter, with more red."}])
        rejected.append(prompt + [{"role": "assistant", "content": "They are identical."}])
    return images, chosen, rejected


# what the reward-model stages train: the ViT frozen (trainer.freeze's default, the paper's), the unused LM head
# frozen; the merger, the LLM and the value head trained
RM_BENCH_FREEZE = ("vision", "lm_head")


def mrope_section_for(head_dim: int) -> tuple[int, int, int]:
    """Qwen2.5-VL's (t, h, w) split of the rotary half, scaled to head_dim ((16, 24, 24) at head_dim 128)."""
    half = head_dim // 2
    return (half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8)


def run_rm_bench(pairs: int = 4, steps: int = 5, dtype: str = "float32", torch_baseline: bool = True,
                 shapes: dict | None = None, peak: float | None = None, measure_peak: bool = True,
                 layouts: Sequence[str] = ("two_rows", "shared_prompt"), torch_device: str = "auto",
                 log=None, compiler_options: dict | None | str = "auto",
                 freeze: Sequence[str] = RM_BENCH_FREEZE) -> dict:
    """shapes: {'text': Qwen2Config fields, 'vision': vision config fields} (default BENCH_SHAPES). peak: this
    machine's matmul FLOP/s if already measured; otherwise it is measured here unless measure_peak is False (then
    the FLOP fraction is None).

    layouts: the batch layouts timed, each its own compiled step on the same parameters: "two_rows" (a chosen and a
    rejected row per pair, the trainer's default) and "shared_prompt" (one row per pair, the prompt computed once:
    data.share_prompt). The first one is the headline (`skyjax_s`, `speedup`); every one is in `layouts`.

    torch_device: where the reference runs ("auto": "cuda" when JAX's backend is a GPU, else "cpu"). In float32 on
    an accelerator both sides do full-precision matmuls (matmul_precision=highest; PyTorch does not use TF32 by
    default), so the comparison is of the same arithmetic. On a GPU the reference is timed first and freed before
    skyjax's steps run (both in one process would not fit beside each other's allocator caches at a 1.5B shape; a
    GPU's speed does not drift with the host's load, which is what alternating guards against on a CPU).
    log: a callable for progress lines (compiles, reference), default silent. compiler_options: XLA options of the
    step's compile; "auto" = what the trainer uses (skyjax.nn.runtime.train_compiler_options).

    freeze: the parts not trained, as `trainer.freeze` names them (presets of qwen2_5_vl_reward), on both sides
    alike. The default is what the reward-model stages train: the ViT frozen (the trainer's default and the
    paper's), the merger, the LLM and the value head trained, the unused LM head frozen. ("lm_head",) alone trains
    the vision tower too (the demo's setting)."""
    log = log or (lambda *_: None)
    layout_names = tuple(layouts)
    unknown = set(layout_names) - {"two_rows", "shared_prompt"}
    if unknown or not layout_names:
        raise ValueError(f"rm_train_step layouts {sorted(unknown) or '(none)'}: use two_rows and/or shared_prompt")
    freeze = tuple(freeze)
    if torch_baseline:
        torch_frozen_prefixes(freeze)  # a preset the reference cannot freeze fails before anything is built
    import jax
    import jax.numpy as jnp
    import optax

    from skyjax.parallel.aot import count_flops
    from skyjax.data.qwen_vl_image import QwenVLImageConfig
    from skyjax.data.tokenizer import build_tiny_tokenizer, special_token_ids
    from skyjax.models.qwen2 import Qwen2Config
    from skyjax.models.qwen2_5_vl import Qwen2_5_VLConfig
    from skyjax.models.qwen2_5_vl_inputs import Buckets, prepare_vl_batch
    from skyjax.models.qwen2_5_vl_vision import Qwen2_5_VLVisionConfig
    from skyjax.models.reward import Qwen2_5_VLRewardModel
    from skyjax.nn.functional import Functional
    from skyjax.train.config import RewardModelObjectiveConfig
    from skyjax.train.objectives import reward_model_loss
    from skyjax.train.optimizer import frozen_predicate, merge_params, split_params
    from skyjax.train.batching import fit_bucket
    from skyjax.train.pairs import shared_prompt_rows, split_rows

    shapes = shapes or BENCH_SHAPES
    if torch_device == "auto":
        torch_device = "cuda" if jax.default_backend() == "gpu" else "cpu"
    if compiler_options == "auto":
        from skyjax.nn.runtime import train_compiler_options

        compiler_options = train_compiler_options(jax.default_backend())
    precision = "highest" if dtype == "float32" and jax.default_backend() != "cpu" else "default"
    tok = build_tiny_tokenizer("qwen2_5_vl")
    ids = special_token_ids(tok)
    text = Qwen2Config(**{"matmul_precision": precision, **shapes["text"]}, dtype=dtype, param_dtype="float32",
                       eos_token_id=ids["eos"], pad_token_id=ids["pad"])
    image_cfg = QwenVLImageConfig(min_pixels=224 * 224, max_pixels=224 * 224)
    vision = Qwen2_5_VLVisionConfig(**{"max_image_patches": image_cfg.max_patches, "matmul_precision": precision,
                                       **shapes["vision"]},
                                    out_hidden_size=text.hidden_size, dtype=dtype, param_dtype="float32")
    cfg = Qwen2_5_VLConfig(text=text, vision=vision, image_token_id=ids["image_pad"], video_token_id=ids["video_pad"],
                           vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"],
                           mrope_section=mrope_section_for(text.head_dim))
    images, chosen, rejected = _inputs(pairs)
    # token buckets every 32 up to 512 (each layout, and the reference's rows, padded to the smallest that fits)
    buckets = Buckets(seq=tuple(range(64, 513, 32)), patches=(512 * pairs, 1024 * pairs),
                      images=(2 * pairs, 4 * pairs))
    both = prepare_vl_batch(chosen + rejected, images + images, tok, image_cfg, vision, buckets=buckets)
    prompt_only = prepare_vl_batch(chosen, images, tok, image_cfg, vision, buckets=buckets)  # the pairs' images once

    fn = Functional.create(lambda r: Qwen2_5_VLRewardModel(cfg, rngs=r))
    # frozen parts are neither differentiated nor updated -- as in the reference, where they have requires_grad
    # False, so autograd skips them and AdamW sees no gradient
    params, frozen = split_params(fn.init(seed=0), frozen_predicate("qwen2_5_vl_reward", freeze))
    frozen_count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(frozen))
    opt = optax.adamw(1e-5)
    opt_state = jax.jit(opt.init)(params)  # one compile, not one per parameter shape
    slots = prompt_only.image_grid_thw
    batch = {"input_ids": jnp.asarray(both.input_ids), "attention_mask": jnp.asarray(both.attention_mask),
             "pixel_values": jnp.asarray(prompt_only.pixel_values),
             "vision_meta": jax.tree.map(jnp.asarray, prompt_only.vision_meta),
             "image_grid_thw": jnp.asarray(np.concatenate([slots, slots])), "pair_weight": jnp.ones(pairs)}

    def step(params, opt_state, frozen, batch):
        settings = RewardModelObjectiveConfig()
        loss_fn = lambda p: reward_model_loss(fn.bind(merge_params(p, frozen)), batch, settings)  # noqa: E731
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    layouts = {"two_rows": batch}
    if "shared_prompt" in layout_names:  # one row per pair, the prompt once (data.share_prompt)
        real = both.attention_mask.astype(bool)
        parts = [split_rows(both.input_ids[i][real[i]], both.input_ids[pairs + i][real[pairs + i]],
                            both.mm_token_type_ids[i][real[i]], both.mm_token_type_ids[pairs + i][real[pairs + i]])
                 for i in range(pairs)]
        seq = fit_bucket(max(sum(map(len, p)) for p in parts), buckets.seq, "seq", "the benchmark's pairs")
        layouts["shared_prompt"] = {**jax.tree.map(jnp.asarray, shared_prompt_rows(parts, seq, tok.pad_token_id)),
                                    **{k: batch[k] for k in ("pixel_values", "vision_meta", "pair_weight")},
                                    "image_grid_thw": jnp.asarray(slots)}
    layouts = {k: layouts[k] for k in layout_names}
    # one train state that every layout's step updates in turn (each donates it and the next reads the result):
    # the same work as separate copies, without holding one copy per layout (a 1.5B model's fp32 weights and AdamW
    # moments twice would not leave room for the reference on an 80 GB GPU)
    state = [params, opt_state]
    del params, opt_state
    runs, compile_s, flops, cost = {}, {}, {}, {}
    for name, b in layouts.items():
        t = time.perf_counter()
        jitted = jax.jit(step, donate_argnums=(0, 1), compiler_options=compiler_options)
        compiled = jitted.lower(*state, frozen, b).compile()
        compile_s[name] = time.perf_counter() - t
        log(f"rm_train_step: {name} step compiled in {compile_s[name]:.1f}s")
        flops[name] = count_flops(step, *state, frozen, b)  # the jaxpr's matmuls, scan trip counts included
        c = compiled.cost_analysis()
        cost[name] = (c[0] if c else {}) if isinstance(c, (list, tuple)) else (c or {})

        def run(compiled=compiled, b=b):
            state[0], state[1], loss = compiled(state[0], state[1], frozen, b)
            loss.block_until_ready()

        runs[name] = run

    times = {name: [] for name in runs}
    if torch_baseline and torch_device != "cpu":  # reference first, then freed (see above)
        import gc

        import torch

        reference = _torch_step(cfg, both, pairs, dtype, torch_device, freeze, frozen_count)
        reference()
        times["reference"] = [_timed(reference) for _ in range(steps)]
        log(f"rm_train_step: reference on {torch_device}: {np.median(times['reference']):.4f}s per step")
        del reference
        gc.collect()
        torch.cuda.empty_cache()
    elif torch_baseline:
        runs["reference"] = _torch_step(cfg, both, pairs, dtype, torch_device, freeze, frozen_count)
        times["reference"] = []
    # the steps alternate, so a change in the machine's load hits all alike (the ratios are what count)
    for run in runs.values():
        run()
    for _ in range(steps):
        for name, run in runs.items():
            times[name].append(_timed(run))
    median = {name: float(np.median(t)) for name, t in times.items()}
    headline = layout_names[0]
    ours = median[headline]
    if peak is None and measure_peak:
        peak = matmul_peak(dtype)
    result = {"config": {"pairs": pairs, "steps": steps, "images_per_pair": 2, "image_size": 224, "dtype": dtype,
                         "layout": headline, "freeze": list(freeze), "frozen_parameters": frozen_count, **shapes,
                         "mrope_section": list(cfg.mrope_section),
                         "seq_len": {k: int(b["input_ids"].shape[1]) for k, b in layouts.items()},
                         "rows": {k: int(b["input_ids"].shape[0]) for k, b in layouts.items()},
                         "patches_per_step": int(both.real_grid_thw.prod(1).sum() // 2)},
              "skyjax_s": ours, "compile_s": compile_s[headline], "flops_per_step": flops[headline],
              "flops_source": "jaxpr", "xla_cost_analysis_flops": float(cost[headline].get("flops", 0.0)),
              "matmul_peak_flops_per_s": peak,
              "rm_train_step_flops_fraction": flops[headline] / ours / peak if flops[headline] and peak else None,
              "layouts": {name: {"skyjax_s": median[name], "compile_s": compile_s[name], "flops_per_step": flops[name],
                                 "speedup": median["reference"] / median[name] if "reference" in median else None}
                          for name in layouts}}
    if "reference" in median:
        result.update(reference_s=median["reference"], speedup=median["reference"] / ours,
                      timing="alternating steps (each layout, then the reference), median of each"
                      if torch_device == "cpu" else
                      f"reference ({torch_device}) timed first and freed, then the layouts alternating; medians")
    return result


def _timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


# trainer.freeze presets -> the transformers module names they cover (the same parameters as FREEZE_PRESETS'
# qwen2_5_vl regexes over skyjax paths; run_rm_bench checks the two sides freeze the same number of parameters)
TORCH_FREEZE = {"vision": ("model.visual.patch_embed.", "model.visual.blocks."),
                "projector": ("model.visual.merger.",), "llm": ("model.language_model.",), "lm_head": ("lm_head.",)}


def torch_frozen_prefixes(freeze: Sequence[str]) -> tuple[str, ...]:
    """The transformers parameter-name prefixes of trainer.freeze presets; an unknown preset is an error."""
    unknown = [f for f in freeze if f not in TORCH_FREEZE]
    if unknown:
        raise ValueError(f"rm_train_step freeze {unknown}: the reference knows {sorted(TORCH_FREEZE)}")
    return tuple(p for f in freeze for p in TORCH_FREEZE[f])


def _torch_step(cfg, batch, pairs: int, dtype: str, device: str = "cpu", freeze: Sequence[str] = (),
                expect_frozen: int | None = None):
    """The same step in transformers + PyTorch (the reference): a callable running one optimizer step (on `device`,
    waiting for it to finish). `freeze`: trainer.freeze presets whose parameters get requires_grad False;
    `expect_frozen`: how many parameters skyjax froze (a mismatch is an error: the two would do different work)."""
    prefixes = torch_frozen_prefixes(freeze)
    import torch
    from transformers import Qwen2_5_VLConfig as HFConfig, Qwen2_5_VLForConditionalGeneration

    hf_cfg = HFConfig(**{k: v for k, v in cfg.to_hf().items() if k not in ("architectures", "torch_dtype")})
    torch.manual_seed(0)
    with torch.device(device):  # built where it runs (a 2B model's random init on the host is slow)
        model = Qwen2_5_VLForConditionalGeneration(hf_cfg)
        head = torch.nn.Linear(cfg.text.hidden_size, 1)
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    model, head = model.to(device), head.to(device)
    frozen = 0
    for name, p in model.named_parameters():
        if name.startswith(prefixes):
            p.requires_grad_(False)
            frozen += p.numel()
    if expect_frozen is not None and frozen != expect_frozen:
        raise RuntimeError(f"rm_train_step freeze {list(freeze)}: the reference froze {frozen} parameters, skyjax "
                           f"{expect_frozen}")
    params = [p for p in list(model.parameters()) + list(head.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    kw = dict(input_ids=torch.as_tensor(batch.input_ids, dtype=torch.long),
              attention_mask=torch.as_tensor(batch.attention_mask.astype(np.int64)),
              mm_token_type_ids=torch.as_tensor(batch.mm_token_type_ids, dtype=torch.long),
              pixel_values=torch.as_tensor(batch.real_pixel_values).to(model.dtype),
              image_grid_thw=torch.as_tensor(batch.real_grid_thw, dtype=torch.long))
    kw = {k: v.to(device) for k, v in kw.items()}
    last = torch.as_tensor(batch.attention_mask.sum(1) - 1).to(device)
    rows = torch.arange(len(batch.input_ids), device=device)

    def one():
        opt.zero_grad()
        hidden = model.model(**kw).last_hidden_state
        scores = head(hidden[rows, last].float())[:, 0]
        loss = -torch.nn.functional.logsigmoid(scores[:pairs] - scores[pairs:]).mean()
        loss.backward()
        opt.step()
        if device != "cpu":
            torch.cuda.synchronize()

    return one


# The GPU benchmark (issue: "the reward-model train step on a GPU in bf16 at a ~1.5B-parameter LLM shape, MFU against
# the GPU's peak, the PyTorch baseline in the same run"): Qwen2-1.5B's decoder (Qwen2.5-VL-3B is 3B; 1.5B is the
# size named) with Qwen2.5-VL's own vision tower (675 M parameters, as in every Qwen2.5-VL).
GPU_SHAPES = dict(text=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                            num_key_value_heads=2, vocab_size=151936),
                  vision=dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420,
                              fullatt_block_indexes=(7, 15, 23, 31), window_size=112))

# Dense bf16 tensor-core peak FLOP/s by device kind (vendor datasheets; SXM parts). MFU is measured against these.
GPU_BF16_PEAK = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def gpu_bf16_peak(device_kind: str) -> tuple[float | None, str]:
    """(peak FLOP/s, source) for a GPU's device kind, e.g. 'NVIDIA H100 80GB HBM3'; (None, why) when unknown."""
    for name, peak in GPU_BF16_PEAK.items():
        if name in device_kind.upper():
            return peak, f"{name} dense bf16 datasheet peak"
    return None, f"no datasheet peak for {device_kind!r} (known: {', '.join(GPU_BF16_PEAK)})"


def run_rm_gpu_bench(pairs: int = 4, steps: int = 5, shapes: dict | None = None, require_gpu: bool = True,
                     peak: float | None = None, log=None, freeze: Sequence[str] = RM_BENCH_FREEZE) -> dict:
    """The reward-model train step on the GPU in bf16 (fp32 master weights in skyjax; the PyTorch model in bf16 with
    its AdamW), at GPU_SHAPES, both batch layouts, with MFU = step FLOPs (from the jaxpr) / time / the GPU's bf16
    peak (or `peak`). `freeze` as in run_rm_bench. Without a GPU it returns {"skipped": why} at once
    (require_gpu=False runs it on the CPU, for tests)."""
    import jax

    backend = jax.default_backend()
    if require_gpu and backend != "gpu":
        return {"skipped": f"no GPU: JAX's backend is {backend!r} (install jax[cuda12] and torch with CUDA on a GPU "
                           f"machine)", "config": {"shapes": shapes or GPU_SHAPES}}
    kind = jax.devices()[0].device_kind
    if peak is not None:
        source = "given"
    else:
        peak, source = gpu_bf16_peak(kind) if backend == "gpu" else (None, "cpu: no datasheet peak")
    raw = run_rm_bench(pairs, steps, "bfloat16", torch_baseline=True, shapes=shapes or GPU_SHAPES, peak=peak,
                       measure_peak=False, torch_device="cuda" if backend == "gpu" else "cpu", log=log, freeze=freeze)
    out = {"device_kind": kind, "peak_flops_per_s": peak, "peak_source": source, **{
        k: raw.get(k) for k in ("skyjax_s", "reference_s", "speedup", "flops_per_step", "layouts", "config")}}
    for name, lay in raw["layouts"].items():
        lay["mfu"] = lay["flops_per_step"] / lay["skyjax_s"] / peak if peak and lay["flops_per_step"] else None
    if raw.get("reference_s") and peak:  # the reference does the two-row step's work
        out["reference_mfu"] = raw["layouts"]["two_rows"]["flops_per_step"] / raw["reference_s"] / peak
    out["mfu"] = raw["layouts"]["two_rows"]["mfu"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--freeze", default=",".join(RM_BENCH_FREEZE),
                   help="parts not trained, comma-separated trainer.freeze presets (default: vision,lm_head, as the "
                        "reward-model stages train; lm_head alone trains the vision tower too)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    args = p.parse_args(argv)
    freeze = [f for f in args.freeze.split(",") if f]
    result = run_rm_bench(args.pairs, args.steps, args.dtype, torch_baseline=not args.no_torch, freeze=freeze)
    print(json.dumps(result, indent=2))
    if "speedup" in result:
        print(f"reward-model train step: skyjax {result['skyjax_s'] * 1e3:.1f} ms, transformers+PyTorch "
              f"{result['reference_s'] * 1e3:.1f} ms -> {result['speedup']:.2f}x; "
              f"{100 * (result['rm_train_step_flops_fraction'] or 0):.1f}% of the measured matmul peak")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
