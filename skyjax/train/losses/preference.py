"""Mixed Preference Optimisation (MPO): L = w_dpo * L_DPO + w_bco * L_BCO + w_sft * L_SFT on preference pairs.

Everything here is a pure function of arrays (jittable, differentiable in the policy's log-probs) except the two
host-side checks at the end. Inputs are per-sequence completion log-probs (summed over completion tokens) of the
policy and the frozen reference for the chosen (c) and rejected (r) response of each pair, rho = logpi - logpi_ref,
plus the chosen responses' per-token log-probs for the SFT term. `pair_weight` [B] (1 for a real pair, 0 for a
padding row) lets a padded batch give the loss of its real pairs alone; None means every row is real.

The BCO term's reward shift delta is objective state when `bco_delta="running"`: `BCODeltaState` goes in with each
batch and the updated state comes back (the caller keeps it, e.g. next to the optimiser state, and checkpoints it).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

BCO_DELTA_MODES = ("running", "none")
SFT_AVERAGES = ("token", "sequence")


@dataclasses.dataclass(frozen=True)
class MPOConfig:
    """MPO's weights and options. Defaults: InternVL's MPO recipe (which Skywork R1V2 follows)."""

    beta: float = 0.1
    dpo_weight: float = 0.8
    bco_weight: float = 0.2
    sft_weight: float = 1.0
    # conservative DPO: the chosen/rejected label is taken to be flipped with this probability
    label_smoothing: float = 0.0
    # "running": delta = running mean of past batches' mean reward (InternVL, R1V2, TRL <= 0.28);
    # "none": delta = 0 (TRL 1.16's bco_pair)
    bco_delta: str = "running"
    # "token": mean NLL over all chosen tokens of the batch (InternVL, TRL); "sequence": each chosen response's mean
    # NLL, averaged over pairs (the NLL / |y_c| of the R1V2 paper)
    sft_average: str = "token"

    def __post_init__(self):
        if self.bco_delta not in BCO_DELTA_MODES:
            raise ValueError(f"bco_delta {self.bco_delta!r} is not one of {BCO_DELTA_MODES}")
        if self.sft_average not in SFT_AVERAGES:
            raise ValueError(f"sft_average {self.sft_average!r} is not one of {SFT_AVERAGES}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing {self.label_smoothing} is not in [0, 0.5)")
        if self.beta <= 0:
            raise ValueError(f"beta {self.beta} must be positive")


class BCODeltaState(NamedTuple):
    """The running BCO shift: the sum of the batch-mean rewards seen so far and how many batches they were."""

    total: jax.Array  # float32 scalar
    batches: jax.Array  # float32 scalar (a float so that the state is one dtype; exact up to 2**24 batches)


def init_bco_state() -> BCODeltaState:
    """No batch seen yet: the first batch's delta is its own mean reward."""
    return BCODeltaState(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))


def _weights(pair_weight: jax.Array | None, like: jax.Array) -> jax.Array:
    if pair_weight is None:
        return jnp.ones(like.shape[0], jnp.float32)
    return pair_weight.astype(jnp.float32)


def _pair_mean(x: jax.Array, w: jax.Array) -> jax.Array:
    """Weighted mean over pairs [B] -> scalar; 0 for a batch of padding only."""
    return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1e-12)


def implicit_rewards(policy_logps: jax.Array, ref_logps: jax.Array, beta: float) -> jax.Array:
    """beta * (logpi - logpi_ref) [B]: the DPO implicit reward of each response (differentiable)."""
    return beta * (policy_logps.astype(jnp.float32) - ref_logps.astype(jnp.float32))


def dpo_sigmoid_loss(chosen_rewards: jax.Array, rejected_rewards: jax.Array, label_smoothing: float = 0.0,
                     pair_weight: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """DPO: mean over pairs of -(1 - ls) log sig(m) - ls log sig(-m), m = beta*rho_c - beta*rho_r.

    chosen_rewards, rejected_rewards [B] = beta * rho (see `implicit_rewards`) -> (loss scalar, {"dpo_loss"}).
    """
    margin = chosen_rewards - rejected_rewards
    per_pair = -jax.nn.log_sigmoid(margin)
    if label_smoothing:
        per_pair = (1.0 - label_smoothing) * per_pair - label_smoothing * jax.nn.log_sigmoid(-margin)
    loss = _pair_mean(per_pair, _weights(pair_weight, margin))
    return loss, {"dpo_loss": loss}


def update_bco_delta(state: BCODeltaState, chosen_rewards: jax.Array, rejected_rewards: jax.Array,
                     pair_weight: jax.Array | None = None) -> tuple[jax.Array, BCODeltaState]:
    """Add this batch's mean reward (over [chosen; rejected], detached) to the running mean; return (delta, state).

    The update comes first, so a batch's delta already counts the batch itself (the first batch's delta is its own
    mean). Each batch counts once whatever its size: delta is the mean of batch means, not of all rewards.
    A batch of padding only leaves the state as it was.
    """
    w = _weights(pair_weight, chosen_rewards)
    rewards = jax.lax.stop_gradient(jnp.concatenate([chosen_rewards, rejected_rewards]))
    ww = jnp.concatenate([w, w])
    real = (jnp.sum(ww) > 0).astype(jnp.float32)
    batch_mean = jnp.sum(rewards * ww) / jnp.maximum(jnp.sum(ww), 1e-12)
    new = BCODeltaState(state.total.astype(jnp.float32) + real * batch_mean,
                        state.batches.astype(jnp.float32) + real)
    return new.total / jnp.maximum(new.batches, 1.0), new


def bco_pair_loss(chosen_rewards: jax.Array, rejected_rewards: jax.Array, delta: jax.Array | float = 0.0,
                  pair_weight: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """BCO on pairs: mean over pairs of -log sig(beta*rho_c - delta) - log sig(-(beta*rho_r - delta)).

    chosen_rewards, rejected_rewards [B] = beta * rho; delta: a scalar with no gradient (see `update_bco_delta`)
    -> (loss scalar, {"bco_loss"}).
    """
    delta = jax.lax.stop_gradient(jnp.asarray(delta, jnp.float32))
    per_pair = -jax.nn.log_sigmoid(chosen_rewards - delta) - jax.nn.log_sigmoid(-(rejected_rewards - delta))
    loss = _pair_mean(per_pair, _weights(pair_weight, chosen_rewards))
    return loss, {"bco_loss": loss}


def sft_nll_loss(chosen_token_logps: jax.Array, chosen_mask: jax.Array, average: str = "token",
                 pair_weight: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Negative log-likelihood of the chosen responses.

    chosen_token_logps [B, T] (per-token log-probs of the chosen responses), chosen_mask [B, T] (1 on completion
    tokens). average "token": sum of -logp over every chosen token of the batch / their number; "sequence": each
    response's -logp sum / its length, averaged over the responses that have tokens. -> (loss, {"sft_loss"});
    0 when the batch has no chosen token.
    """
    mask = chosen_mask.astype(jnp.float32) * _weights(pair_weight, chosen_mask)[:, None]
    nll = -jnp.where(mask > 0, chosen_token_logps.astype(jnp.float32), 0.0)  # masked entries may be anything
    if average == "token":
        loss = jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    elif average == "sequence":
        lengths = jnp.sum(chosen_mask.astype(jnp.float32), axis=1)
        rows = (lengths > 0).astype(jnp.float32) * _weights(pair_weight, chosen_mask)
        per_row = jnp.sum(nll * chosen_mask.astype(jnp.float32), axis=1) / jnp.maximum(lengths, 1.0)
        loss = jnp.sum(per_row * rows) / jnp.maximum(jnp.sum(rows), 1e-12)
    else:
        raise ValueError(f"sft average {average!r} is not one of {SFT_AVERAGES}")
    return loss, {"sft_loss": loss}


def mpo_loss(policy_chosen_logps: jax.Array, policy_rejected_logps: jax.Array, ref_chosen_logps: jax.Array,
             ref_rejected_logps: jax.Array, chosen_token_logps: jax.Array, chosen_mask: jax.Array,
             bco_state: BCODeltaState | None = None, cfg: MPOConfig = MPOConfig(),
             pair_weight: jax.Array | None = None) -> tuple[jax.Array, dict, BCODeltaState | None]:
    """The MPO objective of one batch: (loss, metrics, new BCO state).

    policy_* / ref_* [B]: summed completion log-probs (ref ones carry no gradient); chosen_token_logps [B, T] and
    chosen_mask [B, T]: the chosen responses' per-token log-probs (the same ones policy_chosen_logps sums) for SFT.
    bco_state: required when cfg.bco_delta == "running" and the BCO weight is non-zero; returned updated (None
    stays None). Terms with weight 0 are not computed (they report 0). Metrics are float32 scalars: loss, the three
    terms, rewards/{chosen,rejected,margins,accuracies} (means over pairs of beta*rho; a tie counts as wrong),
    logps/{chosen,rejected}, bco_delta.
    """
    ref_chosen_logps = jax.lax.stop_gradient(ref_chosen_logps)
    ref_rejected_logps = jax.lax.stop_gradient(ref_rejected_logps)
    chosen_r = implicit_rewards(policy_chosen_logps, ref_chosen_logps, cfg.beta)
    rejected_r = implicit_rewards(policy_rejected_logps, ref_rejected_logps, cfg.beta)
    w = _weights(pair_weight, chosen_r)
    zero = jnp.zeros((), jnp.float32)

    dpo = dpo_sigmoid_loss(chosen_r, rejected_r, cfg.label_smoothing, w)[0] if cfg.dpo_weight else zero
    delta, new_state = zero, bco_state
    if cfg.bco_weight:
        if cfg.bco_delta == "running":
            if bco_state is None:
                raise ValueError("bco_delta='running' needs a BCODeltaState (init_bco_state() before the first batch)")
            delta, new_state = update_bco_delta(bco_state, chosen_r, rejected_r, w)
        bco = bco_pair_loss(chosen_r, rejected_r, delta, w)[0]
    else:
        bco = zero
    sft = sft_nll_loss(chosen_token_logps, chosen_mask, cfg.sft_average, w)[0] if cfg.sft_weight else zero
    loss = cfg.dpo_weight * dpo + cfg.bco_weight * bco + cfg.sft_weight * sft

    c, r = jax.lax.stop_gradient(chosen_r), jax.lax.stop_gradient(rejected_r)
    metrics = {
        "loss": jax.lax.stop_gradient(loss),
        "dpo_loss": jax.lax.stop_gradient(dpo),
        "bco_loss": jax.lax.stop_gradient(bco),
        "sft_loss": jax.lax.stop_gradient(sft),
        "rewards/chosen": _pair_mean(c, w),
        "rewards/rejected": _pair_mean(r, w),
        "rewards/margins": _pair_mean(c - r, w),
        "rewards/accuracies": _pair_mean((c > r).astype(jnp.float32), w),
        "logps/chosen": _pair_mean(jax.lax.stop_gradient(policy_chosen_logps.astype(jnp.float32)), w),
        "logps/rejected": _pair_mean(jax.lax.stop_gradient(policy_rejected_logps.astype(jnp.float32)), w),
        "bco_delta": jnp.asarray(delta, jnp.float32),
    }
    return loss, metrics, new_state


# --- host-side checks on what goes in ---------------------------------------------------------------------------------


class NonFiniteLogProbs(ValueError):
    """Some rows' log-probs are NaN or infinite; `rows` maps each named array to its offending row indices."""

    def __init__(self, rows: dict[str, list[int]]):
        self.rows = rows
        parts = [f"{name} rows {idx}" for name, idx in rows.items()]
        super().__init__("non-finite log-probs in " + "; ".join(parts))


def nonfinite_rows(arrays: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray] | None = None
                   ) -> dict[str, list[int]]:
    """Rows (first axis) of each named array [B] or [B, T] that hold a NaN or +-inf; for a name in `masks`, only
    positions where its mask [B, T] is non-zero count (a masked-out position's value is never used). Names with
    no offending row are left out."""
    out: dict[str, list[int]] = {}
    for name, arr in arrays.items():
        bad = ~np.isfinite(np.asarray(arr, dtype=np.float64))
        if masks is not None and name in masks:
            bad &= np.asarray(masks[name]) != 0
        per_row = bad.reshape(bad.shape[0], -1).any(axis=1) if bad.ndim else np.atleast_1d(bad)
        rows = np.flatnonzero(per_row).tolist()
        if rows:
            out[name] = rows
    return out


def check_finite_logprobs(arrays: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray] | None = None) -> None:
    """Raise NonFiniteLogProbs naming every offending row (see `nonfinite_rows`); return None when all are finite.

    A single non-finite log-prob makes the whole batch's loss and gradient NaN, so the rows are named before the
    step instead of after it."""
    rows = nonfinite_rows(arrays, masks)
    if rows:
        raise NonFiniteLogProbs(rows)


def _normalised(turns: Sequence | None) -> tuple | None:
    """A response's turns with surrounding whitespace of text dropped (a trailing newline does not make two
    responses different)."""
    if turns is None:
        return None
    out = []
    for m in turns:
        content = m.content
        if isinstance(content, str):
            content = content.strip()
        else:
            content = tuple((p.type, (p.text or "").strip() if p.type == "text" else None) for p in content)
        out.append((m.role, content))
    return tuple(out)


def identical_pair(record) -> bool:
    """Whether a preference record's chosen and rejected responses are the same (up to surrounding whitespace).

    Such a pair has DPO margin 0 whatever the policy (loss log 2, zero gradient) while BCO and SFT still push on
    the same text from both sides: it carries no preference and should be dropped or fixed in the data."""
    if record.chosen is None or record.rejected is None:
        return False
    return _normalised(record.chosen) == _normalised(record.rejected)


def identical_pairs(records: Sequence) -> list[int]:
    """Indices of the records whose chosen and rejected responses are identical (see `identical_pair`)."""
    return [i for i, rec in enumerate(records) if identical_pair(rec)]
