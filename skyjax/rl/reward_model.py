"""The vision-language reward model as a GRPO reward (R1V2: r = r_rule + r_RM + r_format).

    rollout:
      rewards:
        - {name: accuracy, weight: 1.0}
        - {name: reward_model, weight: 0.5, options: {source: models/Skywork-VL-Reward-7B}}

`reward_model` is a reward factory (skyjax.rl.rewards): the run calls it once with its `RewardContext`, and it
loads a Skywork-VL-Reward-layout model (Qwen2.5-VL + value head: a Hugging Face folder with
value_head.safetensors, or a skyjax reward checkpoint) onto the context's mesh, i.e. the trainer's mesh, beside
the policy: no second set of devices, no copy in the train state, no gradient, no optimizer state. Each call scores
the completions with `skyjax.eval.scorer.RewardScorer`: token-budget batches, one compiled program per batch shape
(`sticky_vision`: room for the largest images seen so far, so a new image size compiles only when it is larger).

What the reward model reads is its own rendering of the conversation: the prompt row's messages (`Rollout.messages`)
with its images (decoded once by the rollout, `Rollout.image_data`), plus the completion as the assistant turn,
formatted with the reward model's own chat template and tokenizer and its own image processor
(preprocessor_config.json). The policy's token ids are never used, so a policy with another tokenizer (Skywork R1V,
InternVL) needs nothing special.

Options:

- `source` (required): the reward model's folder or checkpoint.
- `think`: "keep" (default) scores the completion as the policy wrote it, with the opening `<think>` put back when
  the policy's prompt opened the block (as `skyjax pairs` scores responses for MPO). The Skywork-VL Reward paper's
  reasoning examples score the whole reasoning-style response, `...</think>` and the final answer, and its
  in-house training pairs are such responses, so the reasoning is what it was trained to judge. "strip" scores only
  the text after the last `</think>` (the answer); a completion whose think block never closes (cut off by the
  token budget) then has an empty answer.
- `scale`, `shift`, `sigmoid`: the reward is `scale * score + shift`, passed through the logistic function when
  `sigmoid` is true (e.g. `shift: -2, sigmoid: true` maps scores into (0, 1) centred at 2). Defaults: the raw score.
- `batch_size`, `max_batch_tokens`, `max_length`: as `skyjax score` (rows per batch, tokens per batch, the longest
  conversation). A conversation longer than the model accepts fails its row (`rollout.on_reward_error`).
- `dtype`: the reward model's compute dtype (default: the run's `model.dtype`, else the checkpoint's).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from skyjax.eval.verifiers import THINK_CLOSE, THINK_OPEN
from skyjax.rl.rewards import RewardContext, Rollout, RowFailures, reward_factory

THINK_MODES = ("keep", "strip")


def assistant_text(row: Rollout, think: str = "keep") -> str:
    """The assistant turn the reward model scores for a completion (see `think` in the module docstring)."""
    text = row.completion
    opened = row.prompt.rstrip().endswith(THINK_OPEN)
    if think == "keep":
        return (THINK_OPEN + "\n" + text) if opened and not text.lstrip().startswith(THINK_OPEN) else text
    close = text.rfind(THINK_CLOSE)
    if close >= 0:
        return text[close + len(THINK_CLOSE):].strip()
    return "" if (opened or THINK_OPEN in text) else text


class RewardModelReward:
    """Scores rollout rows with a loaded `RewardScorer` (see the module docstring). `scorer` is public: tests and
    callers can score the same conversations with it directly."""

    def __init__(self, scorer, *, think: str = "keep", scale: float = 1.0, shift: float = 0.0, sigmoid: bool = False):
        self.scorer, self.think = scorer, think
        self.scale, self.shift, self.sigmoid = float(scale), float(shift), bool(sigmoid)
        self.__name__ = "reward_model"

    def conversations(self, rows: Sequence[Rollout]) -> list:
        """The reward model's conversations, one per row: prompt messages + the completion as the assistant turn."""
        from skyjax.eval.scorer import Conversation

        out = []
        for i, row in enumerate(rows):
            if not row.messages:
                raise ValueError(f"row {i} has no prompt messages (Rollout.messages): the reward model renders the "
                                 "conversation with its own chat template and needs them")
            images = list(row.image_data) if row.image_data else None
            if images is not None and len(images) != len(row.images):
                raise ValueError(f"row {i}: {len(images)} decoded images for {len(row.images)} image paths")
            messages = [dict(m) for m in row.messages] + [{"role": "assistant",
                                                           "content": assistant_text(row, self.think)}]
            out.append(Conversation(messages, tuple(row.images), row.where or f"row {i}", i, images))
        return out

    def transform(self, score: float) -> float:
        value = self.scale * float(score) + self.shift
        if self.sigmoid:
            value = 1.0 / (1.0 + math.exp(-value)) if value >= 0 else math.exp(value) / (1.0 + math.exp(value))
        return value

    def __call__(self, rows: Sequence[Rollout]) -> list[float | None]:
        from skyjax.eval.scorer import Skipped

        convs = self.conversations(rows)
        skipped: list[Skipped] = []
        scores = self.scorer.score_conversations(convs, on_error="skip", skipped=skipped)
        values: list[float | None] = [None if math.isnan(s) else self.transform(s) for s in scores]
        reasons = {s.index: s.reason for s in skipped if s.index >= 0}
        if reasons:
            raise RowFailures(values, reasons)
        return values


@reward_factory
def reward_model(context: RewardContext, *, source: str, think: str = "keep", scale: float = 1.0,
                 shift: float = 0.0, sigmoid: bool = False, batch_size: int = 64, max_batch_tokens: int | None = None,
                 max_length: int | None = None, dtype: str | None = None) -> RewardModelReward:
    """Load the reward model at `source` onto the context's mesh (the trainer's) and return the reward function."""
    from pathlib import Path

    from skyjax.convert.checkpoint import require_reward_model
    from skyjax.eval.scorer import RewardScorer

    if think not in THINK_MODES:
        raise ValueError(f"reward_model: think={think!r} is not one of {', '.join(THINK_MODES)}")
    if not isinstance(sigmoid, bool):
        raise ValueError(f"reward_model: sigmoid={sigmoid!r} must be true or false")
    for key, value in (("batch_size", batch_size), ("max_batch_tokens", max_batch_tokens),
                       ("max_length", max_length)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"reward_model: {key}={value!r} must be a positive integer")
    numbers = {}
    for key, value in (("scale", scale), ("shift", shift)):
        try:  # YAML 1.1 reads 1e-3 as a string
            numbers[key] = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            numbers[key] = math.nan
        if not math.isfinite(numbers[key]):
            raise ValueError(f"reward_model: {key}={value!r} must be a finite number")
    if not source or not Path(source).exists():
        raise ValueError(f"reward_model: source {source!r} does not exist (a Hugging Face reward folder with "
                         "value_head.safetensors, or a skyjax reward checkpoint)")
    require_reward_model(source)  # one line before any weight is read when it is not a reward model
    if context.mesh is not None and len({d.process_index for d in context.mesh.devices.flat}) > 1:
        # each process would score its own rows with one program over the whole mesh: not written yet
        raise ValueError("reward_model: a mesh over several processes (multi-host) is not supported yet; score on "
                         "one host, or use rule rewards on several")
    scorer = RewardScorer(source, mesh=context.mesh, dtype=dtype or context.dtype, batch_size=batch_size,
                          max_batch_tokens=max_batch_tokens, max_length=max_length, progress=False,
                          sticky_vision=True)
    return RewardModelReward(scorer, think=think, sigmoid=sigmoid, **numbers)


def scorer_of(reward: Any):
    """The `RewardScorer` behind a loaded `reward_model` reward (a `skyjax.rl.rewards.Reward`), else None."""
    fn = getattr(reward, "fn", reward)
    return getattr(fn, "scorer", None)
