"""GRPO's policy loss (skyjax.train.losses.policy) and group advantages (advantages.py) against TRL 1.16.

Policy loss: TRL's own `GRPOTrainer._compute_loss`, on a trainer built without its __init__ (`object.__new__`) with
the attributes the loss reads, and its per-token log-prob method replaced by one that returns a leaf tensor: TRL's
loss, metrics and gradient with respect to the per-token log-probs are compared with skyjax's on the same tensors,
for every aggregation (grpo, bnpo, dr_grpo, dapo), clip-higher, the two-sided ratio cap and the k3 KL with and
without the ratio correction.

Advantages: TRL computes them inline in `_generate_and_score_completions` (generation, reward functions and all),
with no callable unit; they are checked against an independent numpy computation written from that code's
formulas (group mean; Bessel std per group or over the batch; divide by std + 1e-4 unless "none"; NaN -> 0), and
the NaN-aware std against TRL's own `trl.trainer.utils.nanstd`.
"""

from __future__ import annotations

import types
import zlib
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from skyjax.train.losses import PolicyLossConfig, group_advantages, grpo_policy_loss, nanstd

torch = pytest.importorskip("torch")
pytest.importorskip("trl")
from trl.trainer.grpo_trainer import GRPOTrainer  # noqa: E402
from trl.trainer.utils import nanstd as trl_nanstd  # noqa: E402

RTOL = 1e-6
ATOL = 1e-7  # for entries that are 0 or nearly so


def close(actual, expected):
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64), rtol=RTOL,
                               atol=ATOL)


def make_rollout(seed: int, b: int = 6, t: int = 9, token_advantages: bool = False) -> dict:
    """b completions of up to t tokens: per-token log-probs of the policy, of the sampling policy (off by up to a few
    tenths, so ratios fall inside and outside the clip range on both sides), of the reference, entropies, and
    advantages of both signs. Positions past a row's length are 0 in every log-prob, as TRL's LM head leaves them;
    one row has no token at all."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, t + 1, size=b)
    lengths[-1] = 0
    mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.int64)
    logps = -rng.gamma(1.5, 0.8, size=(b, t))
    old = logps + rng.normal(0.0, 0.35, size=(b, t))
    ref = logps + rng.normal(0.0, 0.5, size=(b, t))
    adv = rng.normal(0.0, 1.0, size=(b, t) if token_advantages else b)
    f32 = lambda x: (x * (mask if x.ndim == 2 else 1)).astype(np.float32)  # noqa: E731
    return {"logps": f32(logps), "old": f32(np.minimum(old, 0.0)), "ref": f32(np.minimum(ref, 0.0)),
            "entropies": f32(rng.gamma(2.0, 0.5, size=(b, t))), "advantages": adv.astype(np.float32), "mask": mask}


def trl_grpo(batch: dict, *, loss_type: str, epsilon_low: float, epsilon_high: float, beta: float,
             bias_correction_kl: bool = True, delta: float | None = None, max_completion_length: int = 16,
             grad_accum: int = 1, num_items: float | None = None, num_processes: int = 1,
             steps_per_generation: int = 1, with_old: bool = True, level: str = "token"
             ) -> tuple[float, np.ndarray, dict]:
    """TRL 1.16's GRPO loss on `batch`: (loss, d loss / d per-token log-probs [b, t], logged metrics)."""
    tr = object.__new__(GRPOTrainer)
    leaf = torch.tensor(batch["logps"], requires_grad=True)
    entropies = torch.tensor(batch["entropies"])
    tr._get_per_token_logps_and_entropies = lambda *args, **kwargs: (leaf, entropies, None)
    tr.top_entropy_quantile, tr.aux_loss_enabled, tr.off_policy_mask_threshold = 1.0, False, None
    tr.importance_sampling_level, tr.loss_type = level, loss_type
    tr.epsilon_low, tr.epsilon_high, tr.beta = epsilon_low, epsilon_high, beta
    tr.args = types.SimpleNamespace(use_bias_correction_kl=bias_correction_kl, delta=delta,
                                    steps_per_generation=steps_per_generation)
    tr.use_vllm, tr.vllm_importance_sampling_correction, tr._entropy_bonus_enabled = False, False, False
    tr.model = types.SimpleNamespace(training=True)
    tr.current_gradient_accumulation_steps, tr.max_completion_length = grad_accum, max_completion_length
    tr.accelerator = types.SimpleNamespace(num_processes=num_processes, gather=lambda x: x,
                                           reduce=lambda x, reduction: x)
    tr._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    mask = torch.tensor(batch["mask"])
    b = mask.shape[0]
    inputs = {"prompt_ids": torch.zeros((b, 3), dtype=torch.long), "prompt_mask": torch.ones((b, 3)),
              "completion_ids": torch.zeros_like(mask), "completion_mask": mask,
              "advantages": torch.tensor(batch["advantages"]), "ref_per_token_logps": torch.tensor(batch["ref"]),
              "num_items_in_batch": torch.tensor(float(mask.sum() if num_items is None else num_items))}
    if with_old:
        inputs["old_per_token_logps"] = torch.tensor(batch["old"])
    loss = tr._compute_loss(None, inputs)
    loss.backward()
    return loss.item(), leaf.grad.numpy(), {k: v[-1] for k, v in tr._metrics["train"].items()}


def skyjax_grpo(batch: dict, cfg: PolicyLossConfig, with_old: bool = True, **kw) -> tuple[float, np.ndarray, dict]:
    def f(logps):
        return grpo_policy_loss(logps, jnp.asarray(batch["advantages"]), jnp.asarray(batch["mask"]), cfg,
                                old_logps=jnp.asarray(batch["old"]) if with_old else None,
                                ref_logps=jnp.asarray(batch["ref"]), entropies=jnp.asarray(batch["entropies"]), **kw)

    (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(batch["logps"]))
    return float(loss), np.asarray(grad), {k: float(v) for k, v in metrics.items()}


METRICS = ("entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "clip_ratio/low_min",
           "clip_ratio/high_max")

CASES = [  # (beta, kl ratio correction, two-sided cap, epsilon_high)
    (0.0, True, None, 0.2),
    (0.0, True, None, 0.28),  # DAPO clip-higher
    (0.04, True, None, 0.28),  # k3 KL times the ratio (TRL's default)
    (0.04, False, None, 0.2),  # plain k3 KL (DeepSeek's GRPO)
    (0.0, True, 1.3, 0.2),  # two-sided GRPO: ratio capped
]


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta,kl_correction,cap,eps_high", CASES)
def test_policy_loss_matches_trl(loss_type, beta, kl_correction, cap, eps_high, level):
    """Value, gradient with respect to the per-token log-probs, and the logged metrics equal TRL's, with one
    importance ratio per token or per completion (GSPO's sequence level)."""
    batch = make_rollout(seed=zlib.crc32(repr((loss_type, beta, kl_correction, cap, eps_high)).encode()))
    if level == "sequence":  # per-sequence ratios move less: push every other completion's ratio out of the clip
        # range on the side its advantage clips (high for A > 0, low for A < 0)
        push = -0.6 * np.sign(batch["advantages"]) * (np.arange(len(batch["advantages"])) % 2 == 0)
        batch["old"] = (batch["old"] + push[:, None] * batch["mask"]).astype(np.float32)
    cfg = PolicyLossConfig(loss_type=loss_type, epsilon_low=0.2, epsilon_high=eps_high, beta=beta,
                           kl_ratio_correction=kl_correction, ratio_cap=cap, max_completion_length=16,
                           importance_sampling_level=level)
    loss, grad, metrics = skyjax_grpo(batch, cfg)
    t_loss, t_grad, t_metrics = trl_grpo(batch, loss_type=loss_type, epsilon_low=0.2, epsilon_high=eps_high,
                                         beta=beta, bias_correction_kl=kl_correction, delta=cap, level=level)
    close(loss, t_loss)
    close(grad, t_grad)
    assert np.abs(t_grad).max() > 1e-3
    for key in METRICS + (("kl",) if beta else ()):
        close(metrics[key], t_metrics[key])
    assert metrics["clip_ratio/region_mean"] > 0  # the batch does exercise the clip


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_on_policy_and_accumulation_match_trl(loss_type):
    """No stored old log-probs (the ratio is exp(logp - stop_gradient(logp)) = 1, gradient -A), per-token
    advantages [B, T], 2 accumulation steps, and for dapo TRL's window normaliser num_items_in_batch /
    num_processes * G / steps_per_generation."""
    batch = make_rollout(seed=21, token_advantages=True)
    kw, trl_kw = {"grad_accum_steps": 2}, {"grad_accum": 2}
    if loss_type == "dapo":
        num_items, procs, spg = 123.0, 2, 4
        kw = {"token_normalizer": num_items / procs * 2 / spg}
        trl_kw.update(num_items=num_items, num_processes=procs, steps_per_generation=spg)
    cfg = PolicyLossConfig(loss_type=loss_type, beta=0.04, max_completion_length=16)
    loss, grad, metrics = skyjax_grpo(batch, cfg, with_old=False, **kw)
    t_loss, t_grad, t_metrics = trl_grpo(batch, loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.2, beta=0.04,
                                         with_old=False, **trl_kw)
    close(loss, t_loss)
    close(grad, t_grad)
    close(metrics["kl"], t_metrics["kl"])
    assert metrics["clip_ratio/region_mean"] == 0.0


def test_dr_grpo_divides_by_the_generation_cap():
    """dr_grpo's divisor is B * max_completion_length (the configured cap), whatever the padded width: doubling the
    cap halves the loss; and dr_grpo refuses to run without one."""
    batch = make_rollout(seed=5)
    l16, _, _ = skyjax_grpo(batch, PolicyLossConfig(loss_type="dr_grpo", max_completion_length=16))
    l32, _, _ = skyjax_grpo(batch, PolicyLossConfig(loss_type="dr_grpo", max_completion_length=32))
    close(l32 * 2, l16)
    with pytest.raises(ValueError, match="max_completion_length"):
        PolicyLossConfig(loss_type="dr_grpo")


def test_padding_values_never_reach_the_loss():
    """NaN, inf or large values at masked positions of any input leave the loss and gradient unchanged (the
    gradient at those positions is 0)."""
    batch = make_rollout(seed=6)
    junk = dict(batch)
    off = batch["mask"] == 0
    junk["logps"] = np.where(off, 80.0, batch["logps"]).astype(np.float32)
    junk["old"] = np.where(off, -np.inf, batch["old"]).astype(np.float32)
    junk["ref"] = np.where(off, np.nan, batch["ref"]).astype(np.float32)
    cfg = PolicyLossConfig(loss_type="bnpo", beta=0.04, epsilon_high=0.28)
    loss, grad, metrics = skyjax_grpo(batch, cfg)
    j_loss, j_grad, j_metrics = skyjax_grpo(junk, cfg)
    close(j_loss, loss)
    close(j_grad, grad)
    close(j_metrics["kl"], metrics["kl"])
    assert not np.any(j_grad[off])


def test_policy_loss_is_jittable():
    batch = make_rollout(seed=7)
    cfg = PolicyLossConfig(loss_type="grpo", beta=0.04, epsilon_high=0.28)
    args = [jnp.asarray(batch[k]) for k in ("logps", "advantages", "mask", "old", "ref")]

    def f(logps, adv, mask, old, ref):
        return grpo_policy_loss(logps, adv, mask, cfg, old_logps=old, ref_logps=ref)

    eager = jax.value_and_grad(f, has_aux=True)(*args)
    jitted = jax.jit(jax.value_and_grad(f, has_aux=True))(*args)
    close(jitted[0][0], eager[0][0])
    close(jitted[1], eager[1])
    close(jitted[0][1]["kl"], eager[0][1]["kl"])


# --- group advantages -------------------------------------------------------------------------------------------------


def np_nanstd(x: np.ndarray, axis=None) -> np.ndarray:
    """Bessel-corrected std over the finite entries; NaN when fewer than two."""
    n = np.sum(~np.isnan(x), axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.nanmean(x, axis=axis, keepdims=True) if np.any(n) else np.nan
        ss = np.nansum((x - mean) ** 2, axis=axis)
        return np.where(n > 1, np.sqrt(ss / np.maximum(n - 1, 1)), np.nan)


def np_advantages(rewards: np.ndarray, g: int, scale: str) -> np.ndarray:
    """TRL 1.16's sum_then_normalize advantages, written from its formulas in float64."""
    grouped = rewards.reshape(-1, g).astype(np.float64)
    with np.errstate(invalid="ignore"):
        mean = np.repeat(np.nanmean(grouped, axis=1), g)
    if scale in ("group", "none"):
        std = np.repeat(np_nanstd(grouped, axis=1), g) if g > 1 else np.zeros(rewards.shape)
    else:
        std = np.full(rewards.shape, np_nanstd(rewards.astype(np.float64))) if rewards.size > 1 else \
            np.zeros(rewards.shape)
    adv = rewards - mean
    if scale != "none":
        adv = adv / (std + 1e-4)
    return np.nan_to_num(adv, nan=0.0)


def rewards_with_edge_cases(seed: int) -> np.ndarray:
    """5 prompts x 4 completions: ordinary groups, a group of equal rewards, one with an unscorable (NaN) row,
    and one with a single scorable row."""
    rng = np.random.default_rng(seed)
    r = rng.normal(0.0, 1.0, size=(5, 4))
    r[1] = 2.5  # all equal: no signal
    r[2, 1] = np.nan
    r[3, :3] = np.nan
    return r.reshape(-1).astype(np.float32)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_trl_formulas(scale):
    rewards = rewards_with_edge_cases(seed=1)
    adv, metrics = group_advantages(jnp.asarray(rewards), 4, scale)
    expected = np_advantages(rewards, 4, scale)
    close(adv, expected)
    assert np.all(np.asarray(adv)[4:8] == 0.0)  # the all-equal group
    assert np.asarray(adv)[9] == 0.0 and np.all(np.asarray(adv)[12:16] == 0.0)  # unscorable / lone scorable row
    close(metrics["reward"], np.nanmean(rewards.astype(np.float64)))
    close(metrics["reward_std"], np_nanstd(rewards.astype(np.float64)))
    # TRL counts the rows whose (group or batch) std is 0: the equal group under group/none, none under batch
    close(metrics["frac_reward_zero_std"], 0.0 if scale == "batch" else 4 / 20)


def test_one_generation_and_population_std():
    """G = 1 gives zero advantages (no spread to measure) in every mode but batch; unbiased_std=False is the
    population std (the only change)."""
    r = np.array([1.0, 3.0, 2.0, 7.0], np.float32)
    for scale in ("group", "none"):
        close(group_advantages(jnp.asarray(r), 1, scale)[0], np_advantages(r, 1, scale))
    close(group_advantages(jnp.asarray(r), 1, "batch")[0], np_advantages(r, 1, "batch"))
    adv_pop, _ = group_advantages(jnp.asarray(r), 4, "group", unbiased_std=False)
    close(adv_pop, (r - r.mean()) / (r.astype(np.float64).std() + 1e-4))


def test_nanstd_matches_trl():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, 5)).astype(np.float32)
    x[0, 2] = np.nan
    x[1, :4] = np.nan  # one finite entry: NaN
    x[2, :] = np.nan  # none: NaN
    ours = np.asarray(nanstd(jnp.asarray(x), axis=1))
    theirs = trl_nanstd(torch.tensor(x), dim=1).numpy()
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
    close(ours[~np.isnan(ours)], theirs[~np.isnan(theirs)])
    close(nanstd(jnp.asarray(x)), trl_nanstd(torch.tensor(x)).item())


def test_group_advantages_jittable():
    rewards = jnp.asarray(rewards_with_edge_cases(seed=2))
    f = jax.jit(group_advantages, static_argnums=(1, 2))
    close(f(rewards, 4, "group")[0], group_advantages(rewards, 4, "group")[0])
