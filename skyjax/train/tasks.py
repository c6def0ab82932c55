"""What differs between kinds of run, in one registry: `TASKS[cfg.kind]`.

A `Task` bundles the objective, how its model is loaded, how its records are read and batched, where its batches
come from (a skyjax.train.batch_source.BatchSource), its synthetic data, its held-out evaluation and what it adds to
summary.json. The Trainer owns everything else (mesh, state, step, checkpoints, metrics, signals) and never asks which
kind it runs. The evaluation functions take the trainer as an argument; this module does not import it (the trainer
imports the tasks).

    reward_model  Bradley-Terry on preference pairs; Qwen2.5-VL + value head; eval = pair accuracy
    sft           next-token cross-entropy on assistant tokens; Skywork R1V (or Qwen2.5-VL); eval = held-out loss
                  and token accuracy
    mpo           DPO + BCO + SFT of a policy (Skywork R1V or Qwen2.5-VL) on preference pairs against a frozen
                  reference (resident, or its log-probs precomputed); eval = the objective's metrics on held-out pairs
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh

from skyjax.parallel.rules import use_mesh
from skyjax.train.batch_source import pipeline_source
from skyjax.train.batching import abstract, host_batch, to_device
from skyjax.train.bundle import ModelBundle, image_config
from skyjax.train.config import DataConfig
from skyjax.train.objectives import OBJECTIVES, Objective, pair_scores
from skyjax.train.optimizer import merge_params
from skyjax.train.pipeline import RecordPipeline, read_records
from skyjax.train.setup import PairPipeline, load_reward_bundle
from skyjax.train.grpo import (PromptPipeline, abstract_grpo_batch, greedy_eval, grpo_summary, rollout_source,
                               synthetic_prompts)
from skyjax.train.grpo_text import load_grpo_bundle
from skyjax.train.mpo import MPOPipeline
from skyjax.train.sft import SFTPipeline, abstract_sft_batch, load_sft_bundle

Trainer = Any  # skyjax.train.trainer.Trainer (not imported: it imports this module)


@dataclasses.dataclass(frozen=True)
class Task:
    kind: str
    objective: Objective
    record_kind: str  # how skyjax.data.records checks each row
    load_bundle: Callable  # (ModelConfig, Mesh, run_dir) -> ModelBundle
    pipeline: type[RecordPipeline]  # (records, bundle, DataConfig, **options) -> batches
    make_synthetic: Callable  # (folder, name, n, *, seed, image_size, tasks) -> JSONL path
    evaluate: Callable  # (trainer, JSONL path, **options) -> the file's held-out result
    summarize: Callable  # (trainer, {file stem: result}) -> entries for summary.json
    abstract_batch: Callable  # (bundle, DataConfig, micro_batches, mesh, hosts=1) -> ShapeDtypeStructs of the
    # largest batch (the multi-host global batch when hosts > 1)
    row_unit: str = "rows"  # what one row of a batch is, for logs and throughput ("pairs_per_s")
    prepare: Callable | None = None  # (bundle, DataConfig) -> bundle: what the run's data settings change in the model
    # (the task's pipeline, ModelBundle, RunConfig) -> BatchSource: what the trainer loops over (default: the
    # pipeline's batches; an on-policy task wraps its prompt pipeline in a rollout source)
    batch_source: Callable = pipeline_source


def prepare_bundle(task: Task, bundle: ModelBundle, data: DataConfig) -> ModelBundle:
    """The bundle as the run uses it (the task's `prepare`, if any): the Trainer and `skyjax aot` both call this."""
    return task.prepare(bundle, data) if task.prepare is not None else bundle


# --- shared evaluation helpers ----------------------------------------------------------------------------------------


def eval_pipeline(trainer: "Trainer", files, **options) -> RecordPipeline:
    """One ordered pass over `files` in eval-sized batches (a short last batch is padded with zero-weight rows)."""
    if jax.process_count() > 1:
        # The hosts' shares of a file may differ by a batch (they would then wait on each other forever), and the
        # per-pair results are sharded over hosts: multi-host evaluation is not written yet.
        raise NotImplementedError(f"held-out evaluation on {jax.process_count()} hosts is not supported yet (training "
                                  "is): evaluate the saved checkpoint on one host, or set trainer.eval_every=0")
    task, cfg = trainer.task, trainer.cfg
    records, _ = read_records(files, cfg.data.on_error, kind=task.record_kind)
    return task.pipeline(records, trainer.bundle, cfg.data, epochs=1, shuffle=False,
                         batch_size=cfg.trainer.eval_batch_size, drop_remainder=False, pad_last=True, **options)


def eval_batches(trainer: "Trainer", pipe: RecordPipeline, *, augmented: bool = True):
    """(host batch, row ids, device batch) for every batch of `pipe`, placed on the trainer's mesh. A batch source
    that adds to its batches what the step needs beyond the records (`augment(batch, row_ids)`, e.g. precomputed
    reference log-probs) adds it to these too."""
    augment = getattr(getattr(trainer, "batches", None), "augment", None) if augmented else None
    with use_mesh(trainer.mesh):
        for batch in pipe.dataset:
            if hasattr(trainer, "stop_if_signalled"):
                trainer.stop_if_signalled()  # a preemption during evaluation: stop now (the checkpoint is saved)
            batch, row_ids = host_batch(batch)
            if augment is not None:
                batch = augment(batch, row_ids)
            yield batch, row_ids, to_device(batch, trainer.mesh)


def _bound(trainer: "Trainer", f):
    """f(model, micro_batch) as a function of (trainable, frozen, batch with one micro-batch)."""
    fn = trainer.fn

    def run(trainable, frozen, batch):
        return f(fn.bind(merge_params(trainable, frozen)), jax.tree.map(lambda x: x[0], batch))

    return run


def _objective_sums(trainer: "Trainer"):
    """The objective's sums of one micro-batch as a function of (train state, batch): the policy, the reference
    model when the state holds one, and the objective's state (its update is dropped: evaluation changes nothing)."""
    fn, objective = trainer.fn, trainer.objective
    settings = objective.settings(trainer.cfg.objective)

    def run(state, batch):
        frozen, reference = state["frozen"], state.get("reference")
        ref = None if reference is None else fn.bind(merge_params(reference, frozen))
        _, sums, _ = objective.loss(fn.bind(merge_params(state["trainable"], frozen)),
                                    jax.tree.map(lambda x: x[0], batch), settings, reference=ref,
                                    state=state.get("objective"))
        return sums

    return run


# --- reward model -----------------------------------------------------------------------------------------------------


def score_pairs(trainer: "Trainer", files, *, blank_images: bool = False) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Scores of every (chosen, rejected) pair in the JSONL files with the trainer's current parameters."""
    run = trainer.compiled("pair_scores", lambda: _bound(trainer, pair_scores))
    chosen, rejected, ids = [], [], []
    for batch, row_ids, device in eval_batches(trainer, eval_pipeline(trainer, files, blank_images=blank_images)):
        c, r = run(trainer.state["trainable"], trainer.state["frozen"], device)
        keep = np.asarray(batch["pair_weight"][0]) > 0
        chosen.append(np.asarray(c)[keep])
        rejected.append(np.asarray(r)[keep])
        ids.extend(i for i, k in zip(row_ids, keep) if k)
    return np.concatenate(chosen), np.concatenate(rejected), ids


def pair_accuracy(trainer: "Trainer", path, *, blank_images: bool = False) -> float:
    c, r, _ = score_pairs(trainer, [path], blank_images=blank_images)
    return float(np.mean(c > r))  # ties count as wrong


def reward_summary(trainer: "Trainer", evals: dict) -> dict:
    out: dict[str, Any] = {"eval_accuracy": evals}
    if trainer.cfg.data.synthetic is not None:  # the demo's two numbers: with the images, and with them blanked
        out["heldout_accuracy"] = evals.get("heldout")
        out["blind_accuracy"] = trainer.evaluate(blank_images=True).get("heldout")
    return out


def bound_image_patches(bundle: ModelBundle, data: DataConfig) -> ModelBundle:
    """The reward model with its vision tower told the most patches one image of this run can have (the run's
    image processor: max_pixels / patch_size^2): full-attention vision blocks then attend by blocks of neighbouring
    patches instead of under a dense mask over the whole packed batch (skyjax.models.qwen2_5_vl_vision.attention_plan),
    the same result for less work; a larger image is a bad row (skyjax.train.pairs.featurize_pair)."""
    from skyjax.nn.functional import Functional

    loaded = bundle.model
    bound = image_config(bundle, data).max_patches
    if loaded.config.vision.max_image_patches == bound:
        return bundle
    config = dataclasses.replace(loaded.config,
                                 vision=dataclasses.replace(loaded.config.vision, max_image_patches=bound))
    fn = Functional.create(lambda r: loaded.arch.build(config, r))  # traced only; the parameters are unchanged
    return dataclasses.replace(bundle, model=dataclasses.replace(loaded, config=config, fn=fn))


def abstract_pair_batch(bundle: ModelBundle, data: DataConfig, micro_batches: int, mesh: Mesh, hosts: int = 1) -> dict:
    """ShapeDtypeStructs (with `to_device`'s shardings) of the largest-bucket preference batch: on `hosts` > 1 the
    multi-host global batch (skyjax.train.global_batch) of H hosts that each collated their share of data.batch_size
    at the largest buckets (their own patch and image-slot buckets), with `host_blocks`."""
    from skyjax.models.qwen2_5_vl_vision import vision_inputs
    from skyjax.train.global_batch import abstract_global_batch, host_share

    a, b = micro_batches, host_share(data.batch_size, hosts, micro_batches, "pairs")  # one host's micro-batch
    s, patches, slots = max(data.seq_buckets), max(data.patch_buckets), max(data.image_buckets)
    vcfg = bundle.model.config.vision
    dim = vcfg.in_channels * vcfg.temporal_patch_size * vcfg.patch_size**2
    meta = vision_inputs(np.zeros((0, 3), np.int32), vcfg, pad_to=patches)
    batch = {"input_ids": ((2 * b, s), np.int32), "attention_mask": ((2 * b, s), np.bool_),
             "pixel_values": ((patches, dim), np.float32),
             "vision_meta": {k: (v.shape, v.dtype) for k, v in meta.items()},
             "image_grid_thw": ((2 * slots, 3), np.int32), "pair_weight": ((b,), np.float32)}
    if data.share_prompt:  # one row per pair (skyjax.train.pairs.collate_shared_prompt)
        batch.update({"input_ids": ((b, s), np.int32), "attention_mask": ((b, s), np.bool_),
                      "branch_ids": ((b, s), np.int32), "score_index": ((b, 2), np.int32),
                      "image_grid_thw": ((slots, 3), np.int32)})
    is_leaf = lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], tuple)  # noqa: E731
    local = jax.tree.map(lambda x: jax.ShapeDtypeStruct((a, *x[0]), x[1]), batch, is_leaf=is_leaf)
    return abstract(abstract_global_batch(local, hosts), mesh)


# --- SFT --------------------------------------------------------------------------------------------------------------


def objective_eval(trainer: "Trainer", path, *, blank_images: bool = False) -> dict[str, float]:
    """The objective's own metrics over a held-out file (SFT: mean loss as averaged in training, token accuracy,
    trained tokens), from its summed sums: exact however the file is batched."""
    run = trainer.compiled("objective_sums", lambda: _objective_sums(trainer))
    parts = {k: v for k, v in trainer.state.items() if k != "opt"}  # the optimizer state is not needed
    total: dict[str, float] = {}
    for _, _, device in eval_batches(trainer, eval_pipeline(trainer, [path], blank_images=blank_images)):
        sums = jax.device_get(run(parts, device))
        for k, v in sums.items():
            total[k] = total.get(k, 0.0) + float(v)
    return trainer.objective.report(total)


def sft_summary(trainer: "Trainer", evals: dict) -> dict:
    out: dict[str, Any] = {"eval": evals}
    if "heldout" in evals:
        out["heldout_loss"] = evals["heldout"]["loss"]
        out["heldout_accuracy"] = evals["heldout"]["accuracy"]
    return out


# --- MPO --------------------------------------------------------------------------------------------------------------


def mpo_summary(trainer: "Trainer", evals: dict) -> dict:
    out: dict[str, Any] = {"eval": evals}
    if "heldout" in evals:
        for key in ("loss", "rewards/accuracies", "rewards/margins"):
            out[f"heldout_{key.replace('rewards/', 'reward_')}"] = evals["heldout"][key]
    return out


def precompute_reference_logps(trainer: "Trainer", state: dict, records, eval_files) -> dict[str, list[float]]:
    """{file:line: [chosen, rejected]}: the reference's sequence log-probs of every training and held-out pair, in
    one ordered pass (reference.precompute). The reference is the step-0 policy in `state`, or reference.source
    (loaded for the pass, then dropped). Non-finite log-probs are an error naming the rows."""
    from skyjax.train.batching import BadRowError
    from skyjax.train.losses.preference import nonfinite_rows
    from skyjax.train.mpo import MPOPipeline, precompute_files
    from skyjax.train.objectives.mpo import sequence_logps
    from skyjax.train.reference import load_reference

    cfg = trainer.cfg
    if jax.process_count() > 1:
        raise NotImplementedError(f"reference.precompute on {jax.process_count()} hosts is not supported yet: keep "
                                  "the reference resident (reference.precompute: false)")
    if cfg.reference.source is None:
        reference = state["trainable"]  # the policy at step 0
    else:
        shardings = jax.tree.map(lambda x: x.sharding, state["trainable"])
        reference = load_reference(cfg.reference.source, trainer.task.load_bundle, cfg.model, trainer.mesh,
                                   trainer.run_dir / "reference", trainer.is_frozen, state["trainable"], shardings)
    rows = precompute_files(records, eval_files, cfg.data.on_error)
    pipe = MPOPipeline(rows, trainer.bundle, cfg.data, epochs=1, shuffle=False, batch_size=cfg.trainer.eval_batch_size,
                       drop_remainder=False, pad_last=True)
    fn, chunk = trainer.fn, cfg.objective.mpo.logits_chunk

    def logps(ref, frozen, batch):
        mb = jax.tree.map(lambda x: x[0], batch)
        chosen, rejected, _, _ = sequence_logps(fn.bind(merge_params(ref, frozen)), mb, chunk)
        return chosen, rejected

    run = jax.jit(logps)
    table: dict[str, list[float]] = {}
    trainer.log(f"reference.precompute: the reference's log-probs of {len(rows)} pairs, one pass before training")
    for batch, row_ids, device in eval_batches(trainer, pipe, augmented=False):
        chosen, rejected = map(np.asarray, run(reference, state["frozen"], device))
        keep = np.asarray(batch["pair_weight"][0]) > 0
        bad = nonfinite_rows({"chosen": chosen[keep], "rejected": rejected[keep]})
        if bad:
            names = sorted({row_ids[int(np.flatnonzero(keep)[i])] for idx in bad.values() for i in idx})
            raise BadRowError(f"{', '.join(names)}: the reference's log-probs are not finite")
        for i in np.flatnonzero(keep):
            table[row_ids[i]] = [float(chosen[i]), float(rejected[i])]
    return table


def mpo_batch_source(pipeline, bundle: ModelBundle, cfg, trainer=None):
    """The MPO pipeline's batches; with reference.precompute, plus the reference's log-probs (computed once, before
    the first step, and kept in the source's checkpointed state)."""
    from skyjax.train.batch_source import PipelineSource
    from skyjax.train.mpo import ReferenceLogpsSource

    if not cfg.reference.precompute:
        return PipelineSource(pipeline)
    if trainer is None:
        raise ValueError("reference.precompute needs the trainer (its model, mesh and held-out files)")

    def compute(state, records, eval_files):
        return precompute_reference_logps(trainer, state, records, eval_files)

    return ReferenceLogpsSource(pipeline, compute, trainer.eval_files)


def _abstract_mpo_batch(bundle: ModelBundle, data: DataConfig, micro_batches: int, mesh: Mesh, hosts: int = 1,
                        **options) -> dict:
    from skyjax.train.mpo import abstract_mpo_batch

    return abstract_mpo_batch(bundle, data, micro_batches, mesh, hosts, **options)


def _synthetic_pairs(folder, name, n, **kw) -> Path:
    from skyjax.data.synthetic import make_records

    return make_records(folder, name, n, **kw)


def _synthetic_sft(folder, name, n, **kw) -> Path:
    from skyjax.data.synthetic_sft import make_sft_records

    return make_sft_records(folder, name, n, **kw)


TASKS: dict[str, Task] = {
    "reward_model": Task("reward_model", OBJECTIVES["reward_model"], "preference", load_reward_bundle, PairPipeline,
                         _synthetic_pairs, pair_accuracy, reward_summary, abstract_pair_batch, row_unit="pairs",
                         prepare=bound_image_patches),
    "sft": Task("sft", OBJECTIVES["sft"], "sft", load_sft_bundle, SFTPipeline, _synthetic_sft, objective_eval,
                sft_summary, abstract_sft_batch),
    "mpo": Task("mpo", OBJECTIVES["mpo"], "preference", load_sft_bundle, MPOPipeline, _synthetic_pairs,
                objective_eval, mpo_summary, _abstract_mpo_batch, row_unit="pairs", batch_source=mpo_batch_source),
    "grpo": Task("grpo", OBJECTIVES["grpo"], "generate", load_grpo_bundle, PromptPipeline, synthetic_prompts,
                 greedy_eval, grpo_summary, abstract_grpo_batch, row_unit="completions", batch_source=rollout_source),
}


def abstract_batch(cfg, bundle: ModelBundle, mesh: Mesh, hosts: int = 1) -> dict:
    """The largest-bucket batch of run config `cfg` as ShapeDtypeStructs with shardings (for `skyjax aot`).

    `hosts` > 1 gives the batch a pod of that many hosts feeds the step (skyjax.train.global_batch): each host's share
    of data.batch_size collated at the largest buckets, the hosts' blocks side by side, `host_blocks` [A, H]; a
    data.batch_size that does not divide over the hosts is a ValueError. With one host, the single-host batch.

    Only the bundle's model architecture and config and its image settings are read (params may be None and the
    tokenizer absent), so an AOT builder can pass an abstract model: with `skyjax.train.step.abstract_state` and
    `build_train_step` this lowers the run's step without allocating anything."""
    task = TASKS[cfg.kind]
    options = {"precomputed": True} if cfg.reference.precompute and task.objective.precompute else {}
    return task.abstract_batch(bundle, cfg.data, cfg.optimizer.grad_accum, mesh, hosts=hosts, **options)
