"""Benchmark (not a test): the MPO train step, skyjax vs TRL's DPOTrainer configured as MPO, same CPU, same run.

    python -m skyjax.train.mpo_bench --out mpo.json [--pairs 8] [--steps 5]

Setup (the `setup` field of the result says the same): a text-only Qwen2 causal LM policy (transformers
Qwen2ForCausalLM, random weights from a fixed seed, saved once and loaded by both sides, so the two start from the
same weights), fp32 on both sides, a frozen reference resident on both sides (TRL: `ref_model`, a second copy loaded
from the same folder, `precompute_ref_log_probs=False`; skyjax: the reference in the train state), AdamW with global
gradient-norm clipping at 1.0 and a linear schedule (transformers' Trainer defaults; skyjax's build_optimizer with the
same settings), no gradient checkpointing / remat on either side. The batch is the same preference pairs of random
token ids (prompt / chosen / rejected lengths drawn per pair from the `prompt_len` / `response_len` ranges with a fixed
seed); every response token is a completion token.

TRL side: `DPOTrainer(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0], beta=0.1)` (TRL's
own MPO recipe), its collator's batch ([prompt+chosen; prompt+rejected], 2 rows per pair, padded to the longest),
and one optimizer step as transformers' training loop runs it: `trainer.training_step` (forward of policy and
reference, loss, backward), `accelerator.clip_grad_norm_`, `optimizer.step`, `lr_scheduler.step`, `zero_grad`.
torch uses as many threads as the machine has cores.

skyjax side: the train step of `kind: mpo` (skyjax.train.step.build_train_step with the MPO objective, jitted as the
trainer jits it) on its own batch layout: one shared-prompt row per pair ([prompt | chosen | rejected], the prompt
run once, each response attending to the prompt and itself only; skyjax.train.mpo), padded to a multiple of
`seq_multiple`. `bco_delta` defaults to "none" (TRL 1.16's bco_pair has no reward shift), so both sides compute the
same loss: the first step's losses (same weights, same pairs) are recorded and compared (`loss_abs_diff`). With
`precompute` the reference.precompute step is timed too (the reference's log-probs read from the batch, no
reference in the state; TRL's resident-reference step is still what it is compared against, so its ratio is
reported apart, as `precompute_vs_trl_resident`).

The steps alternate (TRL, skyjax resident, skyjax precompute), so a change in the machine's load hits all alike;
each figure is the median of `steps` steps after one warm-up step (the compile is timed apart, `compile_s`).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

MPO_BENCH_SHAPES = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=4096)
TRL_LOSS_TYPE = ["sigmoid", "bco_pair", "sft"]
MPO_WEIGHTS = dict(dpo_weight=0.8, bco_weight=0.2, sft_weight=1.0)


def make_pairs(pairs: int, prompt_len, response_len, vocab: int, seed: int = 0):
    """`pairs` (prompt, chosen, rejected) int32 arrays of random token ids in [16, vocab); each length is drawn from
    its [lo, hi] range (an int: fixed). The two responses of a pair differ in their first token."""
    rng = np.random.RandomState(seed)

    def length(spec):
        lo, hi = (spec, spec) if isinstance(spec, int) else spec
        return int(rng.randint(lo, hi + 1))

    out = []
    for _ in range(pairs):
        prompt = rng.randint(16, vocab, length(prompt_len)).astype(np.int32)
        chosen = rng.randint(16, vocab, length(response_len)).astype(np.int32)
        rejected = rng.randint(16, vocab, length(response_len)).astype(np.int32)
        if rejected[0] == chosen[0]:
            rejected[0] = 16 + (chosen[0] - 15) % (vocab - 16)
        out.append((prompt, chosen, rejected))
    return out


def skyjax_batch(pairs, seq_multiple: int, pad_id: int) -> dict:
    """The MPO batch of `kind: mpo` for these pairs: one shared-prompt row per pair, one micro-batch ([1, b, S])."""
    from skyjax.train.mpo import MPOExample, pair_rows

    examples = [MPOExample(f"pair{i}", f"pair{i}", p, c, r, np.ones(len(c), bool), np.ones(len(r), bool),
                           np.zeros((0, 3, 1, 1), np.float32), np.zeros((0, 3), np.int32))
                for i, (p, c, r) in enumerate(pairs)]
    longest = max(e.length for e in examples)
    seq = -(-longest // seq_multiple) * seq_multiple
    rows = pair_rows(examples, seq, pad_id)
    batch = {**rows, "pair_weight": np.ones(len(pairs), np.float32), "vision": {}}
    return {k: (v if k == "vision" else np.asarray(v)[None]) for k, v in batch.items()}


def save_policy(folder: Path, shapes: dict, seed: int, pad_id: int):
    """A transformers Qwen2ForCausalLM with random weights (torch seed `seed`), saved to `folder` in fp32."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(**shapes, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=4096,
                      tie_word_embeddings=False, bos_token_id=None, eos_token_id=pad_id, pad_token_id=pad_id)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # the default init leaves biases at 0 and norms at 1: move them too
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(folder)


def _trl_step(folder: Path, pairs, lr: float, work: Path):
    """(one TRL step as a callable returning the loss, the batch it runs on, TRL's args as a dict)."""
    import torch
    import trl
    from datasets import Dataset
    from transformers import Qwen2ForCausalLM
    from trl import DPOConfig, DPOTrainer

    from skyjax.data.tokenizer import build_tiny_tokenizer

    tok = build_tiny_tokenizer("qwen2_5_vl")  # TRL's collator pads with its pad id (masked out: any id would do)
    policy = Qwen2ForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    reference = Qwen2ForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    args = DPOConfig(output_dir=str(work / "trl"), per_device_train_batch_size=len(pairs), learning_rate=lr,
                     loss_type=list(TRL_LOSS_TYPE),
                     loss_weights=[MPO_WEIGHTS["dpo_weight"], MPO_WEIGHTS["bco_weight"], MPO_WEIGHTS["sft_weight"]],
                     beta=0.1, precompute_ref_log_probs=False, gradient_checkpointing=False, bf16=False, fp16=False,
                     use_cpu=True, report_to="none", max_length=None, disable_dropout=True, seed=0,
                     save_strategy="no", dataloader_num_workers=0)
    # the trainer wants a text data set to build; the timed batch is collated from the token ids below
    dummy = Dataset.from_list([{"prompt": "a", "chosen": " b", "rejected": " c"}])
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=dummy, processing_class=tok)
    trainer.create_optimizer_and_scheduler(num_training_steps=1000)
    trainer.current_gradient_accumulation_steps = 1  # what the training loop sets before each step
    inputs = trainer.data_collator([{"prompt_ids": p.tolist(), "chosen_ids": c.tolist(), "rejected_ids": r.tolist()}
                                    for p, c, r in pairs])
    model = trainer.model

    def one() -> float:
        loss = trainer.training_step(model, dict(inputs))
        trainer.accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        model.zero_grad()
        return float(loss)

    info = {"trl": trl.__version__, "optim": str(args.optim), "lr_scheduler_type": str(args.lr_scheduler_type),
            "max_grad_norm": args.max_grad_norm, "attn_implementation": policy.config._attn_implementation,
            "torch_threads": torch.get_num_threads(), "rows": int(inputs["input_ids"].shape[0]),
            "seq_len": int(inputs["input_ids"].shape[1])}
    return one, inputs, info


def run_mpo_bench(pairs: int = 8, steps: int = 5, prompt_len=(128, 256), response_len=(32, 160),
                  shapes: dict | None = None, seq_multiple: int = 32, bco_delta: str = "none", lr: float = 1e-6,
                  precompute: bool = True, trl_baseline: bool = True, logits_chunk: int = 0, seed: int = 0,
                  log=None) -> dict:
    """The benchmark (see the module docstring). Returns a dict with `skyjax_s`, `trl_s`, `trl_speedup` (TRL's
    seconds per step / skyjax's), pairs/s of both, `compile_s`, the first step's losses, `batch`, `config`."""
    log = log or (lambda *_: None)
    import jax
    import jax.numpy as jnp
    import torch

    from skyjax.convert.checkpoint import load_hf
    from skyjax.parallel.aot import count_flops
    from skyjax.parallel.mesh import make_mesh
    from skyjax.parallel.rules import use_mesh
    from skyjax.train.batching import to_device
    from skyjax.train.config import MPOObjectiveConfig, ObjectiveConfig, OptimizerConfig, ReferenceConfig
    from skyjax.train.objectives import OBJECTIVES
    from skyjax.train.optimizer import build_optimizer, split_params
    from skyjax.train.reference import copy_of
    from skyjax.train.step import build_train_step, jit_train_step, objective_extras, state_shardings

    if trl_baseline:
        try:
            import trl  # noqa: F401
        except ImportError:
            raise ImportError("mpo_step compares against TRL's DPOTrainer: install trl==1.16.0 (pip install -e "
                              "'.[test]'), or run it without the baseline (mpo_step.trl_baseline=false)") from None
    shapes = dict(shapes or MPO_BENCH_SHAPES)
    torch.set_num_threads(os.cpu_count() or 1)
    pad_id = 0
    data = make_pairs(pairs, prompt_len, response_len, shapes["vocab_size"], seed)
    lengths = np.asarray([[len(p), len(c), len(r)] for p, c, r in data])
    batch_np = skyjax_batch(data, seq_multiple, pad_id)

    with tempfile.TemporaryDirectory(prefix="mpo_bench_") as tmp:
        work = Path(tmp)
        save_policy(work / "policy", shapes, seed, pad_id)
        mesh = make_mesh((1, 1, 1))
        loaded = load_hf(work / "policy", dtype="float32", param_dtype="float32")
        fn = loaded.fn
        objective = OBJECTIVES["mpo"]
        ocfg = ObjectiveConfig(mpo=MPOObjectiveConfig(beta=0.1, **MPO_WEIGHTS, bco_delta=bco_delta,
                                                      logits_chunk=logits_chunk))
        optimizer, schedule = build_optimizer(OptimizerConfig(lr=lr, schedule="linear", clip_norm=1.0), 1000)
        step_fn = build_train_step(fn, objective, optimizer, schedule, ocfg)
        is_frozen = lambda path: False  # noqa: E731  (every parameter trained, as on the TRL side)

        def new_state(reference: bool, objective_state):
            sh = state_shardings(fn, optimizer, is_frozen, mesh, reference, objective_state)
            trainable, frozen = split_params(loaded.params, is_frozen)
            trainable = copy_of(trainable, sh["trainable"])  # buffers of its own: each step donates its state
            state = {"step": jnp.zeros((), jnp.int32), "trainable": trainable, "frozen": frozen,
                     "opt": jax.jit(optimizer.init, out_shardings=sh["opt"])(trainable)}
            if reference:
                state["reference"] = copy_of(trainable, sh["reference"])
            if objective_state is not None:
                state["objective"] = objective_state
            return jax.device_put(state, sh), sh

        layouts = {"resident_reference": False}
        if precompute:
            layouts["precomputed_reference"] = True
        runs, compile_s, first_loss, flops, states = {}, {}, {}, {}, {}
        with use_mesh(mesh):
            for name, pre in layouts.items():
                keep_reference, objective_state = objective_extras(objective, ocfg, ReferenceConfig(precompute=pre))
                state, sh = new_state(keep_reference, objective_state)
                batch = dict(batch_np)
                if pre:  # the reference's log-probs, computed once (the policy at step 0 is the reference)
                    from skyjax.train.objectives.mpo import sequence_logps

                    ref = jax.jit(lambda p, b: sequence_logps(fn.bind(p), jax.tree.map(lambda x: x[0], b),
                                                              logits_chunk)[:2])(
                        loaded.params, jax.tree.map(jnp.asarray, batch_np))
                    batch["ref_logps"] = np.stack([np.asarray(ref[0]), np.asarray(ref[1])], -1)[None]
                batch = to_device(batch, mesh)
                jitted = jit_train_step(step_fn, sh, mesh)
                t = time.perf_counter()
                compiled = jitted.lower(state, batch).compile()
                compile_s[name] = time.perf_counter() - t
                flops[name] = count_flops(step_fn, state, batch)
                log(f"mpo_step: skyjax {name} step compiled in {compile_s[name]:.1f}s")
                states[name] = state

                def run(name=name, compiled=compiled, batch=batch):
                    states[name], stats = compiled(states[name], batch)
                    stats = jax.device_get(stats)
                    return float(stats["loss"]) / max(float(stats["weight"]), 1e-9)

                runs[name] = run
            loaded.params = None
            info = None
            if trl_baseline:
                trl_run, _, info = _trl_step(work / "policy", data, lr, work)
                runs = {"trl": trl_run, **runs}
            times = {name: [] for name in runs}
            warmup_s = {}
            for name, run in runs.items():  # warm-up: the first step of each (same weights: the losses must agree)
                t = time.perf_counter()
                first_loss[name] = run()
                warmup_s[name] = time.perf_counter() - t
            log("mpo_step: first-step losses " + ", ".join(f"{k} {v:.6f}" for k, v in first_loss.items()))
            losses = {name: [first_loss[name]] for name in runs}
            for _ in range(steps):
                for name, run in runs.items():
                    t = time.perf_counter()
                    losses[name].append(run())
                    times[name].append(time.perf_counter() - t)
    median = {name: float(np.median(t)) for name, t in times.items()}
    ours = median["resident_reference"]
    result = {
        "skyjax_s": ours, "compile_s": compile_s["resident_reference"],
        "skyjax_pairs_per_s": pairs / ours, "flops_per_step": flops["resident_reference"], "flops_source": "jaxpr",
        "first_step_loss": first_loss, "warmup_s": warmup_s, "times_s": times, "losses": losses,
        "layouts": {name: {"skyjax_s": median[name], "compile_s": compile_s[name], "pairs_per_s": pairs / median[name],
                           "flops_per_step": flops[name]} for name in layouts},
    }
    if trl_baseline:
        result.update(trl_s=median["trl"], trl_pairs_per_s=pairs / median["trl"], trl_speedup=median["trl"] / ours,
                      loss_abs_diff=abs(first_loss["trl"] - first_loss["resident_reference"]),
                      # every later step's too: the same updates (AdamW, clipping, schedule) on both sides
                      loss_abs_diff_all_steps=float(np.max(np.abs(np.subtract(losses["trl"],
                                                                              losses["resident_reference"])))))
        if precompute:
            result["precompute_vs_trl_resident"] = median["trl"] / median["precomputed_reference"]
    seq = int(batch_np["input_ids"].shape[-1])
    result["batch"] = {
        "pairs": pairs, "prompt_tokens": lengths[:, 0].tolist(), "chosen_tokens": lengths[:, 1].tolist(),
        "rejected_tokens": lengths[:, 2].tolist(), "real_tokens_per_pair_shared": int(lengths.sum(1).mean()),
        # the tokens each side's model runs per step (padding included): the shared prompt is most of the difference
        "skyjax": {"rows": pairs, "seq_len": seq, "tokens": pairs * seq,
                   "layout": "one shared-prompt row per pair [prompt|chosen|rejected]"},
        "trl": None if info is None else {"rows": info["rows"], "seq_len": info["seq_len"],
                                          "tokens": info["rows"] * info["seq_len"],
                                          "layout": "two rows per pair [prompt+chosen; prompt+rejected]"}}
    result["config"] = {
        "setup": "text-only Qwen2ForCausalLM policy (random weights, fixed seed) saved once and loaded by both sides; "
                 "fp32; reference resident on both sides (TRL ref_model copy, precompute_ref_log_probs=False; skyjax "
                 "reference in the train state); AdamW, clip 1.0, linear schedule; no gradient checkpointing; every "
                 "parameter trained. TRL: DPOTrainer loss_type=[sigmoid, bco_pair, sft], loss_weights=[0.8, 0.2, "
                 "1.0], beta 0.1, timed as training_step + clip + optimizer/scheduler step + zero_grad. skyjax: the "
                 "kind: mpo train step (shared-prompt rows), jitted as the trainer does.",
        "model": {"arch": "Qwen2ForCausalLM", **shapes, "parameters": int(sum(int(np.prod(x.shape)) for x in
                                                                              jax.tree.leaves(fn.shapes)))},
        "pairs": pairs, "steps": steps, "prompt_len": [int(x) for x in np.atleast_1d(prompt_len)],
        "response_len": [int(x) for x in np.atleast_1d(response_len)], "seq_multiple": seq_multiple, "dtype": "float32",
        "beta": 0.1, **MPO_WEIGHTS, "bco_delta": bco_delta, "sft_average": "token", "lr": lr,
        "logits_chunk": logits_chunk, "seed": seed, "trl": info,
        "timing": "alternating steps (TRL, skyjax resident, skyjax precomputed), one warm-up step each, median of "
                  "`steps`"}
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--no-trl", action="store_true", help="skip the TRL baseline")
    args = p.parse_args(argv)
    result = run_mpo_bench(args.pairs, args.steps, trl_baseline=not args.no_trl, log=print)
    print(json.dumps({k: v for k, v in result.items() if k != "times_s"}, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
