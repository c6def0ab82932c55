"""Benchmark (not a test): the reward-model train step, skyjax vs transformers + PyTorch on the same machine.

    python -m skyjax.train.bench --out rm_bench.json [--dtype float32|bfloat16] [--pairs 4] [--steps 5]

Both sides do the same work on the same random weights: a batch of preference pairs, each prompt with two 224x224
images; forward of chosen and rejected, the fp32 value head at the last real token, the Bradley-Terry loss, backward,
an AdamW update. The PyTorch side runs the reference layout ([chosen; rejected] in one batch, images encoded for both
rows, as the reference training code does); skyjax encodes each pair's images once. It prints the speedup and the step's
achieved FLOP/s as a fraction of this machine's matmul peak, measured in the same run.

FLOPs per step are counted from the step's jaxpr (`skyjax.bench.count_flops`: every matmul and convolution, scanned
layers multiplied by their trip count). XLA's `cost_analysis()` is recorded beside it as `xla_cost_analysis_flops`,
but it counts a while loop's body once, so with scanned layers it undercounts by about the number of layers.
`skyjax bench` runs this together with the other benchmarks.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

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
    f = jax.jit(lambda x: x @ x)
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


def mrope_section_for(head_dim: int) -> tuple[int, int, int]:
    """Qwen2.5-VL's (t, h, w) split of the rotary half, scaled to head_dim ((16, 24, 24) at head_dim 128)."""
    half = head_dim // 2
    return (half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8)


def run_rm_bench(pairs: int = 4, steps: int = 5, dtype: str = "float32", torch_baseline: bool = True,
                 shapes: dict | None = None, peak: float | None = None, measure_peak: bool = True) -> dict:
    """shapes: {'text': Qwen2Config fields, 'vision': vision config fields} (default BENCH_SHAPES). peak: this
    machine's matmul FLOP/s if already measured; otherwise it is measured here unless measure_peak is False (then
    the FLOP fraction is None)."""
    import jax
    import jax.numpy as jnp
    import optax

    from skyjax.bench import count_flops
    from skyjax.data.qwen_vl_image import QwenVLImageConfig
    from skyjax.data.tokenizer import build_tiny_tokenizer, special_token_ids
    from skyjax.models.qwen2 import Qwen2Config
    from skyjax.models.qwen2_5_vl import Qwen2_5_VLConfig
    from skyjax.models.qwen2_5_vl_inputs import Buckets, prepare_vl_batch
    from skyjax.models.qwen2_5_vl_vision import Qwen2_5_VLVisionConfig
    from skyjax.models.reward import Qwen2_5_VLRewardModel
    from skyjax.nn.functional import Functional
    from skyjax.train.config import ObjectiveConfig
    from skyjax.train.objectives import reward_model_loss

    shapes = shapes or BENCH_SHAPES
    tok = build_tiny_tokenizer("qwen2_5_vl")
    ids = special_token_ids(tok)
    text = Qwen2Config(**shapes["text"], dtype=dtype, param_dtype="float32", eos_token_id=ids["eos"],
                       pad_token_id=ids["pad"])
    vision = Qwen2_5_VLVisionConfig(**shapes["vision"], out_hidden_size=text.hidden_size, dtype=dtype,
                                    param_dtype="float32")
    cfg = Qwen2_5_VLConfig(text=text, vision=vision, image_token_id=ids["image_pad"], video_token_id=ids["video_pad"],
                           vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"],
                           mrope_section=mrope_section_for(text.head_dim))
    image_cfg = QwenVLImageConfig(min_pixels=224 * 224, max_pixels=224 * 224)
    images, chosen, rejected = _inputs(pairs)
    buckets = Buckets(seq=(256, 512), patches=(512 * pairs, 1024 * pairs), images=(2 * pairs, 4 * pairs))
    both = prepare_vl_batch(chosen + rejected, images + images, tok, image_cfg, vision, buckets=buckets)
    prompt_only = prepare_vl_batch(chosen, images, tok, image_cfg, vision, buckets=buckets)  # the pairs' images once

    fn = Functional.create(lambda r: Qwen2_5_VLRewardModel(cfg, rngs=r))
    params = fn.init(seed=0)
    opt = optax.adamw(1e-5)
    opt_state = jax.jit(opt.init)(params)  # one compile, not one per parameter shape
    slots = prompt_only.image_grid_thw
    batch = {"input_ids": jnp.asarray(both.input_ids), "attention_mask": jnp.asarray(both.attention_mask),
             "pixel_values": jnp.asarray(prompt_only.pixel_values),
             "vision_meta": jax.tree.map(jnp.asarray, prompt_only.vision_meta),
             "image_grid_thw": jnp.asarray(np.concatenate([slots, slots])), "pair_weight": jnp.ones(pairs)}

    def step(params, opt_state, batch):
        loss_fn = lambda p: reward_model_loss(fn.bind(p), batch, ObjectiveConfig())  # noqa: E731
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    jitted = jax.jit(step, donate_argnums=(0, 1))
    t = time.perf_counter()
    compiled = jitted.lower(params, opt_state, batch).compile()
    compile_s = time.perf_counter() - t
    flops = count_flops(step, params, opt_state, batch)  # the jaxpr's matmuls, scan trip counts included
    cost = compiled.cost_analysis()
    cost = (cost[0] if cost else {}) if isinstance(cost, (list, tuple)) else (cost or {})
    state = [params, opt_state]

    def ours_step():
        state[0], state[1], loss = compiled(state[0], state[1], batch)
        loss.block_until_ready()

    ref_step = _torch_step(cfg, both, pairs, dtype) if torch_baseline else None
    # the two steps alternate, so a change in the machine's load hits both alike (the ratio is what counts)
    ours_step()
    if ref_step is not None:
        ref_step()
    times, ref_times = [], []
    for _ in range(steps):
        times.append(_timed(ours_step))
        if ref_step is not None:
            ref_times.append(_timed(ref_step))
    ours = float(np.median(times))
    if peak is None and measure_peak:
        peak = matmul_peak(dtype)
    result = {"config": {"pairs": pairs, "steps": steps, "images_per_pair": 2, "image_size": 224, "dtype": dtype,
                         **shapes, "mrope_section": list(cfg.mrope_section),
                         "seq_len": int(both.input_ids.shape[1]), "patches_per_step": int(both.real_grid_thw.prod(1)
                                                                                           .sum() // 2)},
              "skyjax_s": ours, "compile_s": compile_s, "flops_per_step": flops, "flops_source": "jaxpr",
              "xla_cost_analysis_flops": float(cost.get("flops", 0.0)), "matmul_peak_flops_per_s": peak,
              "rm_train_step_flops_fraction": flops / ours / peak if flops and peak else None}
    if ref_step is not None:
        ref = float(np.median(ref_times))
        result.update(reference_s=ref, speedup=ref / ours, timing="alternating steps, median of each")
    return result


def _timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def _torch_step(cfg, batch, pairs: int, dtype: str):
    """The same step in transformers + PyTorch (the reference): a callable running one optimizer step."""
    import torch
    from transformers import Qwen2_5_VLConfig as HFConfig, Qwen2_5_VLForConditionalGeneration

    hf_cfg = HFConfig(**{k: v for k, v in cfg.to_hf().items() if k not in ("architectures", "torch_dtype")})
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(hf_cfg)
    head = torch.nn.Linear(cfg.text.hidden_size, 1)
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-5)
    kw = dict(input_ids=torch.as_tensor(batch.input_ids, dtype=torch.long),
              attention_mask=torch.as_tensor(batch.attention_mask.astype(np.int64)),
              mm_token_type_ids=torch.as_tensor(batch.mm_token_type_ids, dtype=torch.long),
              pixel_values=torch.as_tensor(batch.real_pixel_values).to(model.dtype),
              image_grid_thw=torch.as_tensor(batch.real_grid_thw, dtype=torch.long))
    last = torch.as_tensor(batch.attention_mask.sum(1) - 1)

    def one():
        opt.zero_grad()
        hidden = model.model(**kw).last_hidden_state
        scores = head(hidden[torch.arange(hidden.shape[0]), last].float())[:, 0]
        loss = -torch.nn.functional.logsigmoid(scores[:pairs] - scores[pairs:]).mean()
        loss.backward()
        opt.step()

    return one


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    args = p.parse_args(argv)
    result = run_rm_bench(args.pairs, args.steps, args.dtype, torch_baseline=not args.no_torch)
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
