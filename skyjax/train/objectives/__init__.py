"""Training objectives: what the one trainer differentiates, picked by the run's task (skyjax.train.tasks).

An `Objective` is:

    loss(model, micro_batch, settings, *, reference, state) -> (loss, sums, new_state)
        `settings` is the objective's own config section (objective.<section>). `loss` is what gets differentiated;
        `sums` are additive fp32 scalars (weighted sums of metrics) plus the loss's denominator under "weight", so
        micro-batches and hosts combine exactly (the step scales each micro-batch's gradient by its weight, adds the
        sums and divides by the total weight). `reference` is the frozen reference policy as a model (the reference
        trainable parameters merged with the policy's frozen ones, under stop_gradient) or None; `state` is the
        objective's state (a pytree of fp32 arrays, e.g. MPO's running BCO delta) or None. The step threads the state
        through the micro-batch scan: each micro-batch's forward sees the state the previous one returned.
    needs_reference(settings) -> bool
        whether the train state keeps a reference (skyjax.train.reference); False: no reference memory at all.
    init_state(settings) -> pytree | None
        the objective's state before the first step; None (the default): stateless, no `objective` in the state.
    report(summed sums) -> metrics (host side).
    precompute
        whether the loss can take the reference's log-probs from the batch (reference.precompute: true), so that the
        reference need not be resident during training.

MPO (objectives/mpo.py) needs a reference and keeps BCO's running shift as state. Reward model and SFT are stateless
and reference-free (`stateless` adapts their `(model, batch, cfg) -> (loss, sums)`
functions). A new objective: its loss in its own file here, its config section in skyjax.train.config
(ObjectiveConfig), one `register(Objective(...))` line below, and a Task in skyjax.train.tasks that uses it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from skyjax.train.objectives.grpo import grpo_objective, grpo_report, needs_reference as grpo_needs_reference
from skyjax.train.objectives.mpo import init_state as mpo_init_state, mpo_objective, needs_reference as mpo_needs_reference
from skyjax.train.objectives.reward import bradley_terry, pair_scores, reward_model_loss, shared_prompt_scores
from skyjax.train.objectives.sft import masked_cross_entropy, next_token_targets, sft_loss, sft_report, token_nll

__all__ = ["OBJECTIVES", "Objective", "bradley_terry", "finalize", "masked_cross_entropy", "mpo_objective",
           "next_token_targets",
           "pair_scores", "register", "reward_model_loss", "sft_loss", "sft_report", "shared_prompt_scores",
           "stateless", "token_nll"]


def finalize(sums: dict) -> dict:
    """Weighted sums -> means (every key divided by "weight")."""
    w = max(float(sums["weight"]), 1e-9)
    return {k: float(v) / w for k, v in sums.items() if k != "weight"}


def never(settings: Any) -> bool:
    return False


def stateless(fn: Callable) -> Callable:
    """The objective protocol's loss from a `(model, batch, settings) -> (loss, sums)` function: no reference, and
    the (absent) state passes through unchanged."""

    def loss(model, batch: dict, settings, *, reference=None, state=None):
        value, sums = fn(model, batch, settings)
        return value, sums, state

    loss.__name__ = getattr(fn, "__name__", "loss")
    return loss


@dataclasses.dataclass(frozen=True)
class Objective:
    name: str
    loss: Callable  # (model, micro_batch, settings, *, reference, state) -> (loss, sums, new_state)
    report: Callable[[dict], dict] = finalize  # host side: summed sums (floats) -> metrics
    needs_reference: Callable[[Any], bool] = never  # (settings) -> keep a frozen reference in the train state?
    init_state: Callable[[Any], Any] | None = None  # (settings) -> the initial state pytree; None: stateless
    section: str | None = None  # its config section under `objective` (default: its name)
    # whether its loss can read the reference's log-probs from the batch instead (reference.precompute: the batch
    # source computes them in one pass before training, and the state then holds no reference)
    precompute: bool = False

    def settings(self, objective_cfg) -> Any:
        """This objective's section of the run's `objective` config."""
        return getattr(objective_cfg, self.section or self.name)

    def initial_state(self, settings) -> Any:
        """The objective state before the first step (None when stateless)."""
        return None if self.init_state is None else self.init_state(settings)


OBJECTIVES: dict[str, Objective] = {}


def register(objective: Objective, *, replace: bool = False) -> Objective:
    """Add an objective to `OBJECTIVES` (a second one of the same name is an error unless `replace`)."""
    if objective.name in OBJECTIVES and not replace:
        raise ValueError(f"an objective named {objective.name!r} is already registered")
    OBJECTIVES[objective.name] = objective
    return objective


register(Objective("reward_model", stateless(reward_model_loss)))
register(Objective("sft", stateless(sft_loss), sft_report))
register(Objective("mpo", mpo_objective, needs_reference=mpo_needs_reference, init_state=mpo_init_state,
                   precompute=True))
register(Objective("grpo", grpo_objective, grpo_report, needs_reference=grpo_needs_reference))
