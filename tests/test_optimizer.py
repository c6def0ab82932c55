"""The optimizer recipe, tested rather than only used: learning-rate schedules (warmup by steps or ratio, cosine and
linear decay to min_lr_ratio), AdamW with decoupled weight decay that skips 1-D parameters, global-norm clipping (all
against an independent numpy implementation of the formulas), and reward-model gradient accumulation (two-row and
shared-prompt layouts) equal to one batch."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from skyjax.train.config import ObjectiveConfig, OptimizerConfig
from skyjax.train.optimizer import build_optimizer, frozen_predicate, learning_rate_schedule, split_params


def numpy_lr(cfg: OptimizerConfig, total: int, step: int) -> float:
    """The schedule written from its definition: linear warmup 0 -> lr over `warmup` steps, then constant, cosine or
    linear from lr to lr * min_lr_ratio over the remaining steps."""
    warmup = cfg.warmup_steps or int(round(cfg.warmup_ratio * total))
    if step < warmup:
        return cfg.lr * step / warmup
    t = min((step - warmup) / max(total - warmup, 1), 1.0)
    end = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        return end + (cfg.lr - end) * 0.5 * (1 + math.cos(math.pi * t))
    return cfg.lr + (end - cfg.lr) * t


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
@pytest.mark.parametrize("warmup_steps,warmup_ratio,min_lr_ratio", [(0, 0.0, 0.0), (7, 0.0, 0.1), (0, 0.25, 0.05)])
def test_schedule_matches_its_definition(schedule, warmup_steps, warmup_ratio, min_lr_ratio):
    cfg = OptimizerConfig(lr=3e-4, schedule=schedule, warmup_steps=warmup_steps, warmup_ratio=warmup_ratio,
                          min_lr_ratio=min_lr_ratio)
    total = 40
    fn = learning_rate_schedule(cfg, total)
    got = np.array([float(fn(s)) for s in range(total + 1)])
    want = np.array([numpy_lr(cfg, total, s) for s in range(total + 1)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)
    warmup = warmup_steps or int(round(warmup_ratio * total))
    if warmup:
        assert got[0] == 0.0 and got[warmup] == pytest.approx(cfg.lr, rel=1e-6)  # warmup ends at the peak
        assert np.all(np.diff(got[: warmup + 1]) > 0)
    if schedule != "constant":  # ends at lr * min_lr_ratio and never goes below it
        assert got[total] == pytest.approx(cfg.lr * min_lr_ratio, abs=1e-10)
        assert got[warmup:].min() >= cfg.lr * min_lr_ratio - 1e-10


def numpy_adamw(params, grads_per_step, cfg: OptimizerConfig, total: int):
    """AdamW from its definition, in float64: clip the global gradient norm to clip_norm, Adam moments with bias
    correction, then p -= lr_t * (m_hat / (sqrt(v_hat) + eps) + wd * p) with weight decay only on ndim > 1."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v2 = {k: np.zeros_like(v) for k, v in p.items()}
    for t, grads in enumerate(grads_per_step):
        g = {k: x.astype(np.float64) for k, x in grads.items()}
        if cfg.clip_norm is not None:
            norm = math.sqrt(sum(float((x ** 2).sum()) for x in g.values()))
            g = {k: x * min(1.0, cfg.clip_norm / norm) for k, x in g.items()}
        lr = numpy_lr(cfg, total, t)
        for k in p:
            m[k] = cfg.b1 * m[k] + (1 - cfg.b1) * g[k]
            v2[k] = cfg.b2 * v2[k] + (1 - cfg.b2) * g[k] ** 2
            m_hat = m[k] / (1 - cfg.b1 ** (t + 1))
            v_hat = v2[k] / (1 - cfg.b2 ** (t + 1))
            decay = cfg.weight_decay * p[k] if p[k].ndim > 1 else 0.0
            p[k] = p[k] - lr * (m_hat / (np.sqrt(v_hat) + cfg.eps) + decay)
    return p


@pytest.mark.parametrize("clip_norm", [None, 0.5])
def test_adamw_with_clipping_and_decay_mask_matches_numpy(clip_norm):
    """Three steps of the built optimizer equal the definition; the gradients' norms (about 3) exceed the clip
    norm, and the schedule warms up, so clipping, the decay mask and the LR all change the result."""
    cfg = OptimizerConfig(lr=1e-2, schedule="cosine", warmup_steps=1, min_lr_ratio=0.1, weight_decay=0.3,
                          clip_norm=clip_norm, b1=0.8, b2=0.95, eps=1e-6)
    rng = np.random.default_rng(0)
    params = {"kernel": rng.normal(size=(4, 3)).astype(np.float32), "bias": rng.normal(size=(3,)).astype(np.float32),
              "scale": (1 + rng.normal(size=(3,))).astype(np.float32)}
    grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()} for _ in range(3)]
    opt, _ = build_optimizer(cfg, total_steps=6)
    state = opt.init(params)
    ours = {k: jnp.asarray(v) for k, v in params.items()}
    for g in grads:
        updates, state = opt.update({k: jnp.asarray(x) for k, x in g.items()}, state, ours)
        ours = optax.apply_updates(ours, updates)
    want = numpy_adamw(params, grads, cfg, total=6)
    for k in params:
        np.testing.assert_allclose(np.asarray(ours[k]), want[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_weight_decay_skips_one_dimensional_parameters():
    """With zero gradients Adam's update is zero, so only the decay moves a parameter: matrices shrink by
    lr * wd * p, vectors (norm scales, biases) stay bit-identical."""
    cfg = OptimizerConfig(lr=0.1, schedule="constant", weight_decay=0.5, clip_norm=1.0)
    params = {"kernel": jnp.ones((3, 2)), "norm": {"weight": jnp.ones((2,))}, "bias": jnp.full((2,), 2.0)}
    opt, _ = build_optimizer(cfg, total_steps=1)
    updates, _ = opt.update(jax.tree.map(jnp.zeros_like, params), opt.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(np.asarray(new["kernel"]), 1 - 0.1 * 0.5, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(new["norm"]["weight"]), np.ones(2))
    np.testing.assert_array_equal(np.asarray(new["bias"]), np.full(2, 2.0))


# --- reward-model gradient accumulation -------------------------------------------------------------------------------


@pytest.mark.parametrize("share_prompt", [False, True])
def test_reward_model_gradient_accumulation_equals_one_batch(tmp_path, share_prompt):
    """Two micro-batches of 2 pairs give the step of one batch of 4 (plain SGD with lr 1: the parameter change is the
    gradient), in the two-row layout and in the shared-prompt layout. One pair is a bad row skipped with weight 0,
    so the micro-batches carry different weights and a mean of micro-batch means would be wrong."""
    from test_multihost import RM_CONFIG, TINY_RM, pair_record, reward_bundle

    from skyjax.config import load_config
    from skyjax.train.config import RunConfig
    from skyjax.train.objectives import OBJECTIVES
    from skyjax.train.batching import host_batch
    from skyjax.train.setup import PairPipeline
    from skyjax.train.step import build_train_step

    cfg = load_config(RunConfig, RM_CONFIG, [*TINY_RM, "data.batch_size=4", "data.seq_buckets=[128,192]",
                                             "data.patch_buckets=[64,128,256]", "data.image_buckets=[4,8,16]",
                                             f"data.share_prompt={str(share_prompt).lower()}", "data.on_error=skip"])
    records = [pair_record(tmp_path, [(56, 56)], "Colour?", "Red.", "Blue, I think.", 1),
               pair_record(tmp_path, [(56, 56), (56, 112)], "Which colours?", "Red and green.", "Blue.", 2),
               pair_record(tmp_path, [(56, 56)], "Shape?", "A square.", "A circle it is.", 3),
               pair_record(tmp_path, [(112, 56)], "Count?", "Two.", "Three of them.", 4)]
    records[2] = dataclasses.replace(records[2], images=(str(tmp_path / "missing.png"),))  # skipped, weight 0
    bundle = reward_bundle(tmp_path, vision_depth=1)
    data = dataclasses.replace(cfg.data, synthetic=None)
    one = host_batch(next(iter(PairPipeline(records, bundle, data, shuffle=False).dataset)))[0]
    two = host_batch(next(iter(PairPipeline(records, bundle, data, shuffle=False, micro_batches=2).dataset)))[0]
    weights = two["pair_weight"].sum(axis=1)
    assert weights.tolist() == [2.0, 1.0] and one["pair_weight"].sum() == 3.0  # the bad pair weighs nothing

    model = bundle.model
    trainable, frozen = split_params(model.params, frozen_predicate(model.arch.name, ["lm_head"]))
    opt = optax.sgd(1.0)
    step = jax.jit(build_train_step(model.fn, OBJECTIVES["reward_model"], opt, optax.constant_schedule(1.0),
                                    ObjectiveConfig()))
    state = {"step": jnp.zeros((), jnp.int32), "trainable": trainable, "frozen": frozen, "opt": opt.init(trainable)}
    new_one, stats_one = step(state, one)
    new_two, stats_two = step(state, two)
    for key in ("loss", "weight"):
        assert float(stats_two[key]) == pytest.approx(float(stats_one[key]), rel=1e-5), key
    assert float(stats_two["grad_norm"]) == pytest.approx(float(stats_one["grad_norm"]), rel=1e-4)
    flat = lambda tree: {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)  # noqa: E731
                         for path, v in jax.tree_util.tree_leaves_with_path(tree)}
    before, a, b = flat(trainable), flat(new_one["trainable"]), flat(new_two["trainable"])
    scale = max(float(np.abs(before[k] - a[k]).max()) for k in before)  # the largest gradient entry
    moved = 0
    for k in before:
        grad_one, grad_two = before[k] - a[k], before[k] - b[k]
        moved += bool(np.abs(grad_one).max() > 1e-4 * scale)
        # the value head's bias gets no gradient (a shared offset cancels in r+ - r-): compare at the global scale
        np.testing.assert_allclose(grad_two, grad_one, rtol=0, atol=1e-5 * scale, err_msg=k)
    assert moved > len(before) // 2  # the comparison is about real gradients, not zeros
