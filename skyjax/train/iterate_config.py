"""The config of `skyjax iterate` (skyjax.train.iterate; docs/iterative_sft.md): the SFT run section of stage 1
and the rounds' schedule, scores, generation and optional self-distillation. Loaded with skyjax.config.load_config,
so an unknown key or a value out of range is a one-line error naming the key."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from skyjax.train.config import RunConfig, require

LEVELS = 6  # score levels 0..5


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
    """A judge of skyjax.rl.judge: heuristic (local, no model), endpoint (an OpenAI-compatible service) or a user judge
    `package.module:MyJudge`. The model judge needs a loaded policy and is not offered here."""

    name: str = "heuristic"
    url: str | None = None  # endpoint: the full chat-completions URL
    model: str | None = None  # endpoint: the model name sent
    api_key_env: str = "OPENAI_API_KEY"  # endpoint: the environment variable holding the key
    timeout: float = 60.0
    retries: int = 3
    workers: int = 4

    def __post_init__(self):
        require("judge.name", self.name, self.name != "model",
                "heuristic, endpoint or package.module:MyJudge (the model judge needs a loaded policy)")
        require("judge.timeout", self.timeout, self.timeout > 0, "must be > 0")
        require("judge.retries", self.retries, self.retries >= 0, "must be >= 0")
        require("judge.workers", self.workers, self.workers >= 1, "must be >= 1")

    def make(self):
        from skyjax.rl.judge import make_judge

        return make_judge(self.name, url=self.url, model=self.model, api_key_env=self.api_key_env,
                          timeout=self.timeout, max_retries=self.retries, workers=self.workers)


@dataclasses.dataclass(frozen=True)
class ScoreConfig:
    """How every training row gets its score level 0..5 (the paper: a reward model's).

    source: judge = the judge's min-max normalised scores combined as DRLC combines them, (S_v + beta*S_t +
    gamma*S_I) / (1 + beta + gamma), in [0, 1]; reward_model = a skyjax reward model's score of the row's whole
    conversation; meta = the number in each row's meta[meta_key]. levels: quantiles = six equal-count bins of the
    raw scores over the data set, or over each group of `group_by` (equal scores share the lower bin); thresholds =
    the number of the five ascending `thresholds` a raw score reaches."""

    source: Literal["judge", "reward_model", "meta"] = "judge"
    judge: JudgeConfig = JudgeConfig()
    beta: float = 1.0
    gamma: float = 1.0
    reward_model: str | None = None  # source reward_model: a Hugging Face reward folder or skyjax checkpoint
    reward_batch_size: int = 64  # source reward_model: rows per batch at most
    reward_max_batch_tokens: int | None = None  # source reward_model: tokens per batch (default: the scorer's)
    meta_key: str = "score"
    levels: Literal["quantiles", "thresholds"] = "quantiles"
    thresholds: tuple[float, ...] = ()
    # quantiles within groups of rows: "answer" (rows with the same ground truth) or a meta key (e.g. a source data
    # set whose scores run on another scale); null = one group
    group_by: str | None = None
    batch_size: int = 64  # judge: rows (and decoded images) per batch

    def __post_init__(self):
        require("score.beta", self.beta, self.beta >= 0, "must be >= 0")
        require("score.gamma", self.gamma, self.gamma >= 0, "must be >= 0")
        require("score.batch_size", self.batch_size, self.batch_size >= 1, "must be >= 1")
        require("score.reward_batch_size", self.reward_batch_size, self.reward_batch_size >= 1, "must be >= 1")
        if self.source == "reward_model":
            require("score.reward_model", self.reward_model, bool(self.reward_model),
                    "a reward-model folder (score.source is reward_model)")
        if self.levels == "thresholds":
            t = list(self.thresholds)
            require("score.thresholds", t, len(t) == LEVELS - 1 and all(a < b for a, b in zip(t, t[1:])),
                    f"{LEVELS - 1} ascending cut points (score.levels is thresholds): level = how many a score reaches")


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Greedy answers of a round's model (its errors on the training rows, its held-out accuracy)."""

    max_new_tokens: int = 1024
    batch_size: int = 8
    choices_key: str = "choices"  # meta key with a row's multiple-choice options
    stop_token_ids: tuple[int, ...] | None = None  # default: the checkpoint's eos ids

    def __post_init__(self):
        require("generation.max_new_tokens", self.max_new_tokens, self.max_new_tokens >= 1, "must be >= 1")
        require("generation.batch_size", self.batch_size, self.batch_size >= 1, "must be >= 1")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Self-distillation (skyjax.rl.distill_run; docs/distill.md) before stage 1 and before every round: the
    training rows become the current model's verified <think> chains, sampled with each row's DRLC penalty."""

    enabled: bool = False
    before_stage1: bool = True
    model: str | None = None  # the model that distils before stage 1 (default: sft.model.source); later M_{t-1}
    judge: JudgeConfig = JudgeConfig()
    alpha: float = math.log(2.0)
    beta: float = 1.0
    gamma: float = 1.0
    max_new_tokens: int = 4096
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 0
    num_samples: int = 1
    max_rewrites: int = 2
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self):
        for name in ("alpha", "beta", "gamma", "temperature", "max_rewrites", "top_k"):
            require(f"distill.{name}", getattr(self, name), getattr(self, name) >= 0, "must be >= 0")
        for name in ("max_new_tokens", "num_samples", "batch_size"):
            require(f"distill.{name}", getattr(self, name), getattr(self, name) >= 1, "must be >= 1")
        require("distill.top_p", self.top_p, 0 < self.top_p <= 1, "must be in (0, 1]")


@dataclasses.dataclass(frozen=True)
class IterateConfig:
    sft: RunConfig  # the SFT run of stage 1 (kind sft): model, data, optimizer, trainer, mesh; the rounds reuse it
    name: str = "iterate"
    rounds: int = 4  # T (0: stage 1 only)
    taus: tuple[int, ...] = (2, 3, 4, 5)  # tau_t of round t = 1..T
    lrs: tuple[float, ...] = (1e-4, 2e-5)  # round t's peak learning rate; a shorter list repeats its last value
    round_epochs: float = 1.0  # each round's passes over its rows (the paper: 1)
    round_steps: int | None = None  # or a fixed number of optimizer steps per round
    heldout: tuple[str, ...] = ()  # JSONL files of held-out rows (with data.synthetic: its held-out split too)
    # sft.data.synthetic only: blur each image by a Gaussian of radius uniform in [0, synthetic_blur] px,
    # independently of its answer (skyjax.data.synthetic_sft), so image-clarity scores vary
    synthetic_blur: float = 0.0
    score: ScoreConfig = ScoreConfig()
    generation: GenerationConfig = GenerationConfig()
    distill: DistillConfig = DistillConfig()
    progress: bool = True

    def __post_init__(self):
        require("sft.kind", self.sft.kind, self.sft.kind == "sft", "'sft' (iterative SFT trains SFT rounds)")
        require("rounds", self.rounds, self.rounds >= 0, "must be >= 0")
        require("taus", list(self.taus), len(self.taus) >= self.rounds and all(0 <= t < LEVELS for t in self.taus),
                f"one score level 0..{LEVELS - 1} per round ({self.rounds} rounds)")
        require("lrs", list(self.lrs), bool(self.lrs) and all(x > 0 for x in self.lrs), "a non-empty list of LRs > 0")
        require("round_epochs", self.round_epochs, self.round_epochs > 0, "must be > 0")
        require("synthetic_blur", self.synthetic_blur, self.synthetic_blur >= 0, "must be >= 0")
        require("round_steps", self.round_steps, self.round_steps is None or self.round_steps >= 1,
                "must be >= 1 (or null: round_epochs)")
        if self.distill.enabled and self.distill.before_stage1:
            source = self.distill.model or self.sft.model.source
            require("distill.model", self.distill.model, source != "tiny" and not source.startswith("shape:"),
                    "a model folder: distillation before stage 1 samples from it (sft.model.source is "
                    f"{self.sft.model.source!r}); or set distill.before_stage1: false")

    def tau(self, t: int) -> int:
        return self.taus[t - 1]

    def lr(self, t: int) -> float:
        return self.sft.optimizer.lr if t == 0 else self.lrs[min(t, len(self.lrs)) - 1]


# Keys a resumed job may change (a key ending in '.' covers its section): the number of rounds (and the schedule of
# rounds not started yet: checked apart), bookkeeping, and the SFT settings the trainer itself lets a resume change.
RESUMABLE_KEYS = ("rounds", "taus", "lrs", "progress", "generation.batch_size", "score.batch_size",
                  "score.reward_batch_size", "score.reward_max_batch_tokens", "score.judge.timeout",
                  "score.judge.retries", "score.judge.workers", "distill.batch_size", "distill.judge.timeout",
                  "distill.judge.retries", "distill.judge.workers", "sft.mesh.", "sft.trainer.log_every",
                  "sft.trainer.eval_every", "sft.trainer.save_every", "sft.trainer.keep_checkpoints",
                  "sft.trainer.async_checkpointing", "sft.trainer.progress", "sft.trainer.eval_batch_size")
