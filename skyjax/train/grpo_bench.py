"""Benchmark (not a test): one GRPO iteration, skyjax's `kind: grpo` against TRL 1.16's GRPOTrainer, same CPU, same run.

    python -m skyjax.train.grpo_bench --out grpo.json [--prompts 4] [--generations 8] [--new-tokens 64] [--steps 3]
    skyjax bench --only grpo_step --out grpo.json                 # the same, through the harness

One iteration = a rollout (G completions for each of `prompts` prompts, sampled with the current policy, scored by a
reward function, group advantages) and one update (the clipped-surrogate loss on those completions, backward, one
AdamW step). The two phases are timed apart on both sides, and reported apart: `rollout` and `update`.

Setup (the `config.setup` field of the result says the same): a text-only Qwen2 causal LM policy (transformers
Qwen2ForCausalLM, random weights from a fixed seed, saved once with the tiny byte-level Qwen2 tokenizer and its
Qwen2-Instruct chat template, and loaded by both sides, so they start from the same weights), fp32 on both sides, no
gradient checkpointing, every parameter trained, AdamW with global-norm clipping at 1.0 and a linear schedule, lr 1e-6
(TRL's defaults). Both sides use TRL's defaults for the loss: loss_type dapo, beta 0 (no reference model; `beta` > 0
keeps one on both sides), epsilon 0.2, group-scaled advantages, token-level importance sampling, temperature 1, no
top-k / top-p. Every completion is `max_new_tokens` long on both sides (TRL: `generation_kwargs={"min_new_tokens":
N}`, which masks the EOS ids; skyjax: no stop ids), so both generate and train on the same number of tokens. The
prompts are the same chat messages (random words, lengths drawn from `prompt_len` tokens, plus the template's default
system turn), rendered by the same chat template on each side (`batch.prompt_tokens_equal` checks the ids). skyjax
left-pads prompts to its sequence bucket (64, 128, ...), TRL to the batch's longest: `batch.skyjax` / `batch.trl`
record the rows each side's update runs. The reward is one cheap rule on the completion's token ids (the fraction of
even ids, `even_tokens`), the same function on both sides: what rewards cost is not what is measured.

skyjax side: the `kind: grpo` Trainer (skyjax.train.trainer) on that folder, and its own two calls per step, as
`Trainer.fit` makes them: the rollout is `trainer.batches.next(state)` (skyjax.train.grpo.RolloutSource: the sampler
on the training mesh with the state's parameters, the G completions of a prompt decoded from ONE prefill, the reward,
the advantages, the training rows) and the update is the jitted train step on those rows. pi_old is the sampler's
log-probs (no extra forward).

TRL side: `GRPOTrainer` with the same model folder, and the two halves of its `training_step` as transformers' loop
runs it: the rollout is `_generate_and_score_completions` (what its `_prepare_inputs` calls: transformers `generate`
on the G copies of each prompt, decoding, the reward, the advantages) and the update is `training_step` on that
batch (its `_prepare_inputs` made the identity, so it does not generate again), clipping, `optimizer.step`
(transformers' default adamw_torch_fused), scheduler step, `zero_grad`. torch uses as many threads as the machine has
cores.

The same-weights check: before any update, the TRL policy's per-token log-probs of skyjax's first rollout (torch
forward on the same rows) are compared with skyjax's pi_old (`logp_max_abs_diff`). Losses are recorded per step;
at ratio 1 with group-normalised advantages and full-length completions both are ~0 (a sum of advantages), so they are
not compared.

Iterations alternate (TRL, skyjax) on the same prompt batch, so a change in the machine's load hits both alike; each
figure is the median of `steps` iterations after one warm-up iteration (compiles included there: `warmup_s`).
`trl_speedup` = TRL's median iteration seconds / skyjax's; `rollout.trl_speedup` and `update.trl_speedup` the same
per phase; tokens/s: `rollout` counts the generated tokens, `update` the real (unpadded) prompt + completion tokens.
`cpu_s` (and each phase's `*_cpu_s`, `trl_cpu_ratio`) is the process's CPU time per phase, all threads: on a machine
shared with other jobs it moves less than wall time, but idle threads that spin count too, so it means most with one
intra-op thread on each side (`python -m skyjax.train.grpo_bench --threads 1`, which sets XLA's and torch's).

Tunix (google-tunix's GRPO learner) is not run: it is not installed in the project's environment (it needs its own
venv with heavy extras); the result says so under `tunix`.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

GRPO_BENCH_SHAPES = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=4096)  # the MPO bench's policy (MPO_BENCH_SHAPES)
WORDS = ("red", "blue", "circle", "square", "count", "how", "many", "left", "right", "image", "the", "of", "is",
         "which", "larger", "answer", "between", "and", "three", "seven", "a", "shape", "colour", "above")
TUNIX_NOTE = ("not run: google-tunix is not installed in the project's environment (it needs a separate venv with "
              "heavy extras: tensorflow_datasets, kagglehub, numba)")


def even_tokens(rows) -> list[float]:
    """The benchmark's reward (skyjax protocol, skyjax.rl.rewards): the fraction of even token ids."""
    return [float(np.mean(np.asarray(r.completion_ids) % 2 == 0)) if len(r.completion_ids) else 0.0 for r in rows]


def trl_even_tokens(prompts, completions, completion_ids, **_) -> list[float]:
    """The same reward in TRL's protocol."""
    return [float(np.mean(np.asarray(ids) % 2 == 0)) if len(ids) else 0.0 for ids in completion_ids]


def make_prompt_texts(tokenizer, n: int, prompt_len, seed: int = 0) -> list[str]:
    """`n` prompts of random words, each the shortest that reaches a token count drawn from [lo, hi]."""
    rng = np.random.RandomState(seed)
    lo, hi = (prompt_len, prompt_len) if isinstance(prompt_len, int) else prompt_len
    out = []
    for _ in range(n):
        target = int(rng.randint(lo, hi + 1))
        words: list[str] = []
        while len(tokenizer(" ".join(words))["input_ids"]) < target:
            words.append(WORDS[rng.randint(len(WORDS))])
        out.append(" ".join(words) + "?")
    return out


def _skyjax_trainer(folder: Path, data: Path, work: Path, *, prompts: int, num_generations: int,
                    max_new_tokens: int, loss_type: str, beta: float, epsilon: float, lr: float, seed: int):
    from skyjax.config import load_config
    from skyjax.train.config import RunConfig
    from skyjax.train.trainer import Trainer

    cfg = load_config(RunConfig, None, [
        "kind=grpo", f"model.source={folder}", "model.dtype=float32", "model.param_dtype=float32",
        f"data.train=[{data}]", f"data.batch_size={prompts}", f"data.shuffle_seed={seed}",
        f"optimizer.lr={lr}", "optimizer.schedule=linear", "optimizer.clip_norm=1.0", "trainer.steps=1000",
        "trainer.freeze=[]", "trainer.progress=false", "trainer.export=false", "trainer.async_checkpointing=false",
        "mesh.shape=[1,1,1]", f"rollout.num_generations={num_generations}", f"rollout.max_new_tokens={max_new_tokens}",
        "rollout.temperature=1.0", f"rollout.seed={seed}",
        f"rollout.rewards=[{{name: '{__name__}:even_tokens', weight: 1.0}}]",
        f"objective.grpo.loss_type={loss_type}", f"objective.grpo.beta={beta}", f"objective.grpo.epsilon={epsilon}"])
    trainer = Trainer(cfg, work / "run", resume=False, log=lambda m: None)
    trainer.batches.stop_ids = ()  # every completion max_new_tokens long (TRL: min_new_tokens), see the docstring
    return trainer


def _trl_trainer(folder: Path, work: Path, *, prompts: int, num_generations: int, max_new_tokens: int,
                 loss_type: str, beta: float, epsilon: float, lr: float, seed: int):
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, Qwen2ForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    tok.padding_side = "left"
    policy = Qwen2ForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    args = GRPOConfig(output_dir=str(work / "trl"), per_device_train_batch_size=prompts * num_generations,
                      num_generations=num_generations, max_completion_length=max_new_tokens,
                      generation_kwargs={"min_new_tokens": max_new_tokens}, temperature=1.0, top_p=1.0, top_k=0,
                      loss_type=loss_type, beta=beta, epsilon=epsilon, learning_rate=lr, lr_scheduler_type="linear",
                      max_grad_norm=1.0, gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True,
                      report_to="none", save_strategy="no", disable_dropout=True, seed=seed,
                      dataloader_num_workers=0, log_completions=False)
    dummy = Dataset.from_list([{"prompt": [{"role": "user", "content": "a"}]}] * num_generations)
    trainer = GRPOTrainer(model=policy, reward_funcs=[trl_even_tokens], args=args, train_dataset=dummy,
                          processing_class=tok)
    trainer.create_optimizer_and_scheduler(num_training_steps=1000)
    trainer.current_gradient_accumulation_steps = 1  # what the training loop sets before each step
    trainer._prepare_inputs = lambda inputs: inputs  # the rollout is run (and timed) apart: see the docstring
    trainer.model.train()
    return trainer, tok, args


def run_grpo_bench(prompts: int = 4, num_generations: int = 8, max_new_tokens: int = 64, steps: int = 3,
                   prompt_len=(24, 48), shapes: dict | None = None, loss_type: str = "dapo", beta: float = 0.0,
                   epsilon: float = 0.2, lr: float = 1e-6, trl_baseline: bool = True, seed: int = 0,
                   torch_threads: int | None = None, log=None) -> dict:
    """The benchmark (see the module docstring). Returns a dict with `skyjax_s`, `trl_s`, `trl_speedup` (TRL's
    seconds per iteration / skyjax's), `rollout` and `update` (each: both sides' seconds, tokens/s and the ratio),
    `warmup_s`, `times_s`, `cpu_s`, `losses`, `logp_max_abs_diff`, `batch`, `config`, `tunix`. torch_threads:
    torch's intra-op threads (default: all cores); XLA's are fixed when JAX starts (`main --threads N` sets both)."""
    log = log or (lambda *_: None)
    import jax
    import torch

    from skyjax.data.tokenizer import build_tiny_tokenizer
    from skyjax.parallel.rules import use_mesh
    from skyjax.train.batching import row_location, to_device
    from skyjax.train.mpo_bench import save_policy
    from skyjax.train.pipeline import read_records
    from skyjax.train.step import report

    if trl_baseline:
        try:
            import trl
        except ImportError:
            raise ImportError("grpo_step compares against TRL's GRPOTrainer: install trl==1.16.0 (pip install -e "
                              "'.[test]'), or run it without the baseline (grpo_step.trl_baseline=false)") from None
    shapes = dict(shapes or GRPO_BENCH_SHAPES)
    torch.set_num_threads(torch_threads or os.cpu_count() or 1)
    g, n = num_generations, max_new_tokens
    knobs = dict(prompts=prompts, num_generations=g, max_new_tokens=n, loss_type=loss_type, beta=beta,
                 epsilon=epsilon, lr=lr, seed=seed)
    with tempfile.TemporaryDirectory(prefix="grpo_bench_") as tmp:
        work = Path(tmp)
        folder = work / "policy"
        tok = build_tiny_tokenizer("qwen2", out_dir=folder)
        if shapes["vocab_size"] < len(tok):
            raise ValueError(f"grpo_step.shapes.vocab_size={shapes['vocab_size']} is below the tokenizer's "
                             f"{len(tok)} ids: raise it")
        save_policy(folder, shapes, seed, tok.pad_token_id)
        texts = make_prompt_texts(tok, prompts * (steps + 1), prompt_len, seed)
        data = work / "prompts.jsonl"
        data.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": t}]}) + "\n" for t in texts))
        records, _ = read_records([data], "raise", kind="generate")
        conversation = {row_location(r): r.conversation() for r in records}

        trainer = _skyjax_trainer(folder, data, work, **knobs)
        mesh = trainer.mesh
        info, trl_trainer = None, None
        if trl_baseline:
            trl_trainer, trl_tok, args = _trl_trainer(folder, work, **knobs)
            info = {"trl": trl.__version__, "optim": str(args.optim), "lr_scheduler_type": str(args.lr_scheduler_type),
                    "max_grad_norm": args.max_grad_norm, "attn_implementation":
                        trl_trainer.model.config._attn_implementation, "torch_threads": torch.get_num_threads(),
                    "loss_type": trl_trainer.loss_type, "beta": trl_trainer.beta,
                    "generation": {k: v for k, v in trl_trainer.generation_kwargs.items()
                                   if isinstance(v, (int, float, str, list, type(None)))}}

        def skyjax_rollout():
            batch, row_ids = trainer.batches.next(trainer.state)
            return batch, row_ids

        def skyjax_update(batch):
            trainer.state, stats = trainer._step(trainer.state, to_device(batch, mesh))
            return report(trainer.objective, jax.device_get(stats))

        def trl_rollout(convs):
            rows = [{"prompt": c} for c in convs for _ in range(g)]  # what TRL's RepeatSampler feeds it
            return trl_trainer._generate_and_score_completions(rows)

        def trl_update(out):
            model = trl_trainer.model
            loss = trl_trainer.training_step(model, out, None)
            trl_trainer.accelerator.clip_grad_norm_(model.parameters(), trl_trainer.args.max_grad_norm)
            trl_trainer.optimizer.step()
            trl_trainer.lr_scheduler.step()
            model.zero_grad()
            return float(loss)

        times = {"skyjax": {"rollout": [], "update": []}, "trl": {"rollout": [], "update": []}}
        cpu = {"skyjax": {"rollout": [], "update": []}, "trl": {"rollout": [], "update": []}}
        losses: dict[str, list] = {"skyjax": [], "trl": []}
        warmup_s: dict[str, dict] = {}
        layout: dict[str, dict] = {}
        logp_diff = None
        with use_mesh(mesh):
            for it in range(steps + 1):
                t, c = time.perf_counter(), time.process_time()
                batch, row_ids = skyjax_rollout()
                t_roll, c_roll = time.perf_counter() - t, time.process_time() - c
                convs = [conversation[r] for r in row_ids[::g]]
                if it == 0:
                    layout["skyjax"] = _skyjax_layout(batch, tok.pad_token_id)
                    if trl_baseline:  # the same weights: TRL's policy scores skyjax's rollout before any update
                        logp_diff = _torch_logp_diff(trl_trainer.model, batch)
                        log(f"grpo_step: skyjax pi_old vs TRL's policy on the same tokens: max |diff| "
                            f"{logp_diff:.2e}")
                t, c = time.perf_counter(), time.process_time()
                metrics = skyjax_update(batch)
                t_upd, c_upd = time.perf_counter() - t, time.process_time() - c
                losses["skyjax"].append(metrics["loss"])
                if it == 0:
                    warmup_s["skyjax"] = {"rollout": t_roll, "update": t_upd}
                    log(f"grpo_step: skyjax warm-up (compiles) rollout {t_roll:.1f}s, update {t_upd:.1f}s")
                else:
                    times["skyjax"]["rollout"].append(t_roll)
                    times["skyjax"]["update"].append(t_upd)
                    cpu["skyjax"]["rollout"].append(c_roll)
                    cpu["skyjax"]["update"].append(c_upd)
                if not trl_baseline:
                    continue
                t, c = time.perf_counter(), time.process_time()
                out = trl_rollout(convs)
                t_roll, c_roll = time.perf_counter() - t, time.process_time() - c
                if it == 0:
                    layout["trl"] = _trl_layout(out)
                    layout["prompt_tokens_equal"] = layout["trl"].pop("prompt_ids") == layout["skyjax"]["prompt_ids"]
                t, c = time.perf_counter(), time.process_time()
                losses["trl"].append(trl_update(out))
                t_upd, c_upd = time.perf_counter() - t, time.process_time() - c
                if it == 0:
                    warmup_s["trl"] = {"rollout": t_roll, "update": t_upd}
                    log(f"grpo_step: TRL warm-up rollout {t_roll:.1f}s, update {t_upd:.1f}s")
                else:
                    times["trl"]["rollout"].append(t_roll)
                    times["trl"]["update"].append(t_upd)
                    cpu["trl"]["rollout"].append(c_roll)
                    cpu["trl"]["update"].append(c_upd)
                    log(f"grpo_step: iteration {it}: skyjax {times['skyjax']['rollout'][-1]:.2f}s + "
                        f"{times['skyjax']['update'][-1]:.2f}s, TRL {t_roll:.2f}s + {t_upd:.2f}s")
        params = int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainer.fn.shapes)))
    layout["skyjax"].pop("prompt_ids")
    result = _result(times, losses, warmup_s, layout, logp_diff, info, shapes, params, knobs, steps, prompt_len,
                     trl_baseline)
    # the process's CPU seconds (all threads) per phase: less sensitive than wall time to other jobs on a shared
    # machine, but idle worker threads that spin count too (most meaningful with one thread each, `main --threads 1`)
    result["cpu_s"] = cpu
    for phase in ("rollout", "update"):
        result[phase]["skyjax_cpu_s"] = float(np.median(cpu["skyjax"][phase]))
        if trl_baseline:
            result[phase]["trl_cpu_s"] = float(np.median(cpu["trl"][phase]))
            result[phase]["trl_cpu_ratio"] = result[phase]["trl_cpu_s"] / result[phase]["skyjax_cpu_s"]
    result["config"]["torch_threads"] = torch.get_num_threads()
    result["config"]["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    return result


def _skyjax_layout(batch: dict, pad_id: int) -> dict:
    """Rows, padded length and real tokens of skyjax's training batch, and each prompt's token ids."""
    ids = np.asarray(batch["input_ids"]).reshape(-1, batch["input_ids"].shape[-1])
    mask = np.asarray(batch["attention_mask"]).reshape(ids.shape).astype(bool)
    comp = np.asarray(batch["completion"]).reshape(ids.shape).astype(bool)
    prompt = mask & ~comp
    return {"rows": int(ids.shape[0]), "seq_len": int(ids.shape[1]), "tokens": int(ids.size),
            "real_tokens": int(mask.sum()), "completion_tokens": int(comp.sum()),
            "prompt_ids": [ids[r][prompt[r]].tolist() for r in range(ids.shape[0])],
            "layout": "[left-padded prompt (sequence bucket) | completion] per completion"}


def _trl_layout(out: dict) -> dict:
    p_ids, p_mask = out["prompt_ids"], out["prompt_mask"].bool()
    c_mask = out["completion_mask"].bool()
    rows, seq = p_ids.shape[0], p_ids.shape[1] + out["completion_ids"].shape[1]
    return {"rows": int(rows), "seq_len": int(seq), "tokens": int(rows * seq),
            "real_tokens": int(p_mask.sum() + c_mask.sum()), "completion_tokens": int(c_mask.sum()),
            "prompt_ids": [p_ids[r][p_mask[r]].tolist() for r in range(rows)],
            "layout": "[left-padded prompt (longest) | completion (right-padded)] per completion"}


def _torch_logp_diff(model, batch: dict) -> float:
    """max |log pi_torch(token) - skyjax's pi_old| over skyjax's first rollout's completion tokens."""
    import torch

    ids = np.asarray(batch["input_ids"]).reshape(-1, batch["input_ids"].shape[-1])
    mask = np.asarray(batch["attention_mask"]).reshape(ids.shape).astype(bool)
    comp = np.asarray(batch["completion"]).reshape(ids.shape).astype(bool)
    old = np.asarray(batch["old_logps"]).reshape(ids.shape)
    with torch.no_grad():
        t_ids, t_mask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
        position_ids = (torch.cumsum(t_mask, 1) - 1).clamp(min=0)  # what HF generate uses under left padding
        logits = model(input_ids=t_ids, attention_mask=t_mask, position_ids=position_ids).logits.float()
        logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, t_ids[:, 1:, None])[..., 0].numpy()
    return float(np.max(np.abs(logps[comp[:, 1:]] - old[:, 1:][comp[:, 1:]])))


def _phase(times: dict, name: str, tokens_sky: int, tokens_trl: int | None) -> dict:
    sky = float(np.median(times["skyjax"][name]))
    out = {"skyjax_s": sky, "skyjax_tokens_per_s": tokens_sky / sky}
    if times["trl"][name]:
        trl = float(np.median(times["trl"][name]))
        out.update(trl_s=trl, trl_tokens_per_s=tokens_trl / trl, trl_speedup=trl / sky)
    return out


def _result(times, losses, warmup_s, layout, logp_diff, info, shapes, params, knobs, steps, prompt_len,
            trl_baseline) -> dict:
    g, n, prompts = knobs["num_generations"], knobs["max_new_tokens"], knobs["prompts"]
    generated = prompts * g * n
    sky_layout, trl_layout = layout["skyjax"], layout.get("trl")
    rollout = _phase(times, "rollout", generated, generated)
    update = _phase(times, "update", sky_layout["real_tokens"], trl_layout and trl_layout["real_tokens"])
    total = {side: [r + u for r, u in zip(times[side]["rollout"], times[side]["update"])] for side in times}
    sky = float(np.median(total["skyjax"]))
    result = {"skyjax_s": sky, "rollout": rollout, "update": update, "warmup_s": warmup_s, "times_s": times,
              "losses": losses, "tunix": TUNIX_NOTE}
    if trl_baseline:
        trl = float(np.median(total["trl"]))
        result.update(trl_s=trl, trl_speedup=trl / sky, logp_max_abs_diff=logp_diff)
    result["batch"] = {"prompts": prompts, "num_generations": g, "completions": prompts * g,
                       "generated_tokens": generated, "skyjax": sky_layout, "trl": trl_layout,
                       "prompt_tokens_equal": layout.get("prompt_tokens_equal")}
    result["config"] = {
        "setup": "text-only Qwen2ForCausalLM policy (random weights, fixed seed) saved once with the tiny byte-level "
                 "Qwen tokenizer and loaded by both sides; fp32; every parameter trained; AdamW, clip 1.0, linear "
                 "schedule; no gradient checkpointing. One iteration = rollout (G samples per prompt, every one "
                 "max_new_tokens long, a token-id rule reward, group advantages) + update (one optimizer step on all "
                 "completions). TRL: GRPOTrainer, rollout = _generate_and_score_completions, update = training_step + "
                 "clip + optimizer/scheduler step + zero_grad. skyjax: the kind: grpo Trainer's rollout source "
                 "(batches.next) and its jitted train step.",
        "model": {"arch": "Qwen2ForCausalLM", **shapes, "parameters": params},
        **knobs, "steps": steps, "prompt_len": [int(x) for x in np.atleast_1d(prompt_len)], "dtype": "float32",
        "temperature": 1.0, "scale_rewards": "group", "importance_sampling_level": "token", "reward": "even_tokens",
        "trl": info,
        "timing": "alternating iterations (skyjax, TRL) on the same prompts, one warm-up iteration each (compiles), "
                  "median of `steps`; rollout and update timed apart"}
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--beta", type=float, default=0.0)
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads for BOTH XLA and torch (default: their own defaults, all cores)")
    p.add_argument("--no-trl", action="store_true", help="skip the TRL baseline")
    args = p.parse_args(argv)
    if args.threads:  # before JAX starts its CPU client
        flags = f" --xla_cpu_multi_thread_eigen={'false' if args.threads == 1 else 'true'}" \
                f" intra_op_parallelism_threads={args.threads}"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + flags).strip()
    from skyjax.machine import machine_info

    machine = machine_info()
    result = run_grpo_bench(args.prompts, args.generations, args.new_tokens, args.steps, beta=args.beta,
                            trl_baseline=not args.no_trl, torch_threads=args.threads, log=print)
    machine["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    result = {"machine": machine, "grpo_step": result}
    print(json.dumps({k: v for k, v in result["grpo_step"].items() if k not in ("times_s", "cpu_s")}, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
