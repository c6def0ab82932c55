"""Post-training objectives as pure functions of arrays: MPO (preference.py), GRPO's policy loss (policy.py) and
group-relative advantages (advantages.py), and the log-prob helper they share (logprobs.py).

Each takes log-probs (or logits) and masks and returns (loss, metrics); nothing here knows about models, batches
or the trainer, so each can be checked term by term against a reference implementation on the same tensors.
"""

from skyjax.train.losses.advantages import SCALE_REWARDS, group_advantages, nanstd
from skyjax.train.losses.logprobs import next_token_alignment, token_entropy, token_logprobs
from skyjax.train.losses.policy import LOSS_TYPES, PolicyLossConfig, grpo_policy_loss, k3_kl
from skyjax.train.losses.preference import (
    BCODeltaState,
    MPOConfig,
    NonFiniteLogProbs,
    bco_pair_loss,
    check_finite_logprobs,
    dpo_sigmoid_loss,
    identical_pair,
    identical_pairs,
    implicit_rewards,
    init_bco_state,
    mpo_loss,
    nonfinite_rows,
    sft_nll_loss,
    update_bco_delta,
)

__all__ = [
    "BCODeltaState", "LOSS_TYPES", "MPOConfig", "NonFiniteLogProbs", "PolicyLossConfig", "SCALE_REWARDS",
    "bco_pair_loss", "check_finite_logprobs", "dpo_sigmoid_loss", "group_advantages", "grpo_policy_loss",
    "identical_pair", "identical_pairs", "implicit_rewards", "init_bco_state", "k3_kl", "mpo_loss", "nanstd",
    "next_token_alignment", "nonfinite_rows", "sft_nll_loss", "token_entropy", "token_logprobs", "update_bco_delta",
]
