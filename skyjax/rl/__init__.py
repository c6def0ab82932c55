"""Pure pieces of reinforcement learning from rollouts: the reward protocol and built-in rewards (``rewards``), and
the scoring half of the adaptive-length chain-of-thought sampler (``distill``).

Nothing here imports the trainer or the sampler: they import this package, never the other way round.
"""

from skyjax.rl.rewards import (  # noqa: F401
    Reward,
    RewardContext,
    RewardError,
    RewardFailure,
    Rollout,
    RowFailures,
    compute_rewards,
    failed_rows,
    load_reward,
    register_reward,
    reward_factory,
    weighted_sum,
)
