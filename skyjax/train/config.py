"""The run config of `skyjax train`: one frozen dataclass tree, loaded from YAML with dotted overrides.

    skyjax train configs/reward_model/stage1_7b.yaml optimizer.lr=1e-5 trainer.steps=100

`kind` picks the task (skyjax.train.tasks): reward_model (Bradley-Terry on preference pairs), sft (next-token
cross-entropy on assistant tokens) or mpo (DPO + BCO + SFT of a policy on preference pairs, against a frozen
reference); grpo plugs into the same trainer. Values the papers do not state are marked
UNCONFIRMED in the shipped YAML files and are ordinary options here.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from skyjax.config import ConfigError
from skyjax.parallel.mesh import MeshConfig


def require(key: str, value, ok: bool, allowed: str) -> None:
    """A `ConfigError` naming the key, its value and the allowed range unless `ok`."""
    if not ok:
        raise ConfigError(f"{key}={value!r} is out of range: {allowed}")


def _positive(section: str, obj, *names: str, optional: bool = False) -> None:
    for name in names:
        value = getattr(obj, name)
        if optional and value is None:
            continue
        require(f"{section}.{name}", value, value > 0, "must be > 0" + (" (or null)" if optional else ""))


def _non_negative(section: str, obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        require(f"{section}.{name}", value, value >= 0, "must be >= 0")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # "tiny": the kind's built-in tiny model (reward_model: Qwen2.5-VL + value head; sft: Skywork R1V, i.e.
    # InternViT + projector + Qwen2); otherwise a Hugging Face folder or a skyjax checkpoint. `skyjax aot` also takes
    # a shape without weights: "shape:qwen2_5_vl_7b", "shape:r1v_38b" or "shape:configs/models/NAME.yaml"
    # (skyjax.train.aot); training refuses those
    source: str = "tiny"
    tokenizer: str | None = None  # folder with the tokenizer; default: `source` (tiny: a local byte-level one)
    dtype: str | None = None  # compute dtype (default: the checkpoint's)
    param_dtype: str | None = None  # master-weight dtype (default: the checkpoint's); float32 for bf16 training
    remat: str | None = None  # none | full | dots | dots_no_batch (default: the checkpoint config's)
    attention_impl: str | None = None
    seed: int = 0  # initialisation of new parameters (the value head, or everything for "tiny")
    tiny_layers: int = 2  # tiny model: decoder layers
    tiny_vision_depth: int = 4  # tiny model: vision blocks
    tiny_hidden: int = 64  # tiny model: decoder width (the vision tower's output width follows it)
    tiny_init_std: float = 0.02  # tiny model: initializer_range of every weight


@dataclasses.dataclass(frozen=True)
class SyntheticDataConfig:
    """A locally generated visual task: preference pairs (skyjax.data.synthetic) or SFT conversations
    (skyjax.data.synthetic_sft), as the run's kind needs."""

    train: int = 2000
    heldout: int = 256
    seed: int = 0
    image_size: int = 56
    tasks: tuple[str, ...] = ("colour", "shape", "position")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    train: tuple[str, ...] = ()  # JSONL files (skyjax.data.records; SFT rows for kind sft), concatenated, shuffled
    eval: tuple[str, ...] = ()  # held-out JSONL files evaluated after training (and every trainer.eval_every steps)
    synthetic: SyntheticDataConfig | None = None  # generate the demo task instead of reading files
    batch_size: int = 8  # pairs (reward model) or conversations (SFT) per optimizer step, over all hosts
    seq_buckets: tuple[int, ...] = (128, 256, 512, 1024, 2048, 4096)
    # The vision buckets hold one HOST's share of a micro-batch (each host packs its own images; on one host, the whole
    # micro-batch): on H hosts the step sees H such blocks (skyjax.train.global_batch).
    patch_buckets: tuple[int, ...] = (256, 1024, 4096, 16384)  # Qwen2.5-VL: vision patches per micro-batch
    image_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32)  # Qwen2.5-VL: images per micro-batch
    tile_buckets: tuple[int, ...] = (1, 5, 9, 13, 26, 39, 52)  # R1V / InternVL: 448 px tiles per micro-batch
    max_tiles: int | None = None  # R1V / InternVL: override the checkpoint's max_dynamic_patch (tiles per image)
    max_length: int | None = None  # longer rows are errors (or skipped, with on_error: skip)
    min_pixels: int | None = None  # override the checkpoint's preprocessor_config.json
    max_pixels: int | None = None
    shuffle_seed: int = 0
    on_error: Literal["raise", "skip"] = "raise"  # a bad row (missing image, too long...) stops the run or is counted
    # reward model: one row per pair, [prompt | chosen | rejected], the prompt (and its images) computed once instead
    # of twice; the same scores as two rows (skyjax.train.objectives.shared_prompt_scores). Rows are then
    # prompt + both responses long: seq_buckets must hold that.
    share_prompt: bool = False

    def __post_init__(self):
        _positive("data", self, "batch_size")
        _positive("data", self, "max_tiles", "max_length", "min_pixels", "max_pixels", optional=True)
        for name in ("seq_buckets", "patch_buckets", "image_buckets", "tile_buckets"):
            value = getattr(self, name)
            require(f"data.{name}", list(value), bool(value) and all(v > 0 for v in value),
                    "a non-empty list of sizes > 0")
        if self.min_pixels is not None and self.max_pixels is not None:
            require("data.min_pixels", self.min_pixels, self.min_pixels <= self.max_pixels,
                    f"must be <= data.max_pixels ({self.max_pixels})")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    lr: float = 1e-5
    schedule: Literal["constant", "cosine", "linear"] = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps is 0
    min_lr_ratio: float = 0.0  # final LR as a fraction of lr (cosine / linear)
    weight_decay: float = 0.0  # decoupled (AdamW); never applied to norms and biases
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float | None = 1.0  # global gradient-norm clipping (None: off)
    grad_accum: int = 1  # micro-batches per optimizer step (batch_size must divide by it)

    def __post_init__(self):
        _positive("optimizer", self, "lr", "eps", "grad_accum")
        _positive("optimizer", self, "clip_norm", optional=True)
        _non_negative("optimizer", self, "warmup_steps", "weight_decay")
        for name in ("b1", "b2"):
            require(f"optimizer.{name}", getattr(self, name), 0 <= getattr(self, name) < 1, "must be in [0, 1)")
        require("optimizer.warmup_ratio", self.warmup_ratio, 0 <= self.warmup_ratio < 1, "must be in [0, 1)")
        require("optimizer.min_lr_ratio", self.min_lr_ratio, 0 <= self.min_lr_ratio <= 1, "must be in [0, 1]")


@dataclasses.dataclass(frozen=True)
class RewardModelObjectiveConfig:
    """Bradley-Terry exactly as the paper by default, -log sigmoid(r+ - r-), nothing else."""

    margin: float = 0.0  # optional: -log sigmoid(r+ - r- - margin)
    center_coef: float = 0.0  # optional reward centering: + coef * mean((r+ + r-)^2)

    def __post_init__(self):
        _non_negative("objective.reward_model", self, "center_coef")


@dataclasses.dataclass(frozen=True)
class SFTObjectiveConfig:
    """Next-token cross-entropy (fp32) on assistant tokens only."""

    # "token" = mean over every assistant token of the batch (long answers weigh more); "sequence" = mean over
    # conversations of their per-token means
    average: Literal["token", "sequence"] = "token"
    # the LM head and its cross-entropy run over sequence chunks of this many tokens (0: the whole sequence at once),
    # so [batch, seq, vocab] fp32 logits never exist at once (152k vocab x 16k tokens is 10 GB a row)
    logits_chunk: int = 0

    def __post_init__(self):
        _non_negative("objective.sft", self, "logits_chunk")


@dataclasses.dataclass(frozen=True)
class MPOObjectiveConfig:
    """Mixed preference optimisation on preference pairs: w_dpo * DPO (sigmoid) + w_bco * BCO (pair) + w_sft * SFT
    (skyjax.train.losses.preference). Defaults: InternVL's MPO recipe, which Skywork R1V2 follows."""

    beta: float = 0.1
    dpo_weight: float = 0.8
    bco_weight: float = 0.2
    sft_weight: float = 1.0
    label_smoothing: float = 0.0  # conservative DPO: the label is taken to be flipped with this probability
    # "running": BCO's reward shift delta = the mean of every past batch's mean reward, updated before use (InternVL,
    # R1V2); kept in the train state and checkpointed. "none": delta = 0 (TRL 1.16's bco_pair)
    bco_delta: Literal["running", "none"] = "running"
    # "token": mean NLL over every chosen token of the (micro-)batch (InternVL, TRL); "sequence": each chosen
    # response's NLL / its length, averaged over pairs (R1V2's formula)
    sft_average: Literal["token", "sequence"] = "token"
    # the LM head runs over sequence chunks of this many tokens (0: at once), as objective.sft.logits_chunk
    logits_chunk: int = 0

    def __post_init__(self):
        _positive("objective.mpo", self, "beta")
        _non_negative("objective.mpo", self, "dpo_weight", "bco_weight", "sft_weight", "logits_chunk")
        require("objective.mpo.label_smoothing", self.label_smoothing, 0 <= self.label_smoothing < 0.5,
                "must be in [0, 0.5)")
        require("objective.mpo", (self.dpo_weight, self.bco_weight, self.sft_weight),
                self.dpo_weight + self.bco_weight + self.sft_weight > 0,
                "dpo_weight, bco_weight and sft_weight cannot all be 0")
        require("objective.mpo.bco_delta", self.bco_delta, self.bco_delta in ("running", "none"),
                "'running' or 'none'")
        require("objective.mpo.sft_average", self.sft_average, self.sft_average in ("token", "sequence"),
                "'token' or 'sequence'")


@dataclasses.dataclass(frozen=True)
class GRPOObjectiveConfig:
    """GRPO's clipped surrogate (skyjax.train.losses.policy), TRL 1.16's semantics. The rollouts themselves are
    configured in the `rollout` section."""

    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"
    epsilon: float = 0.2  # the ratio is clipped below at 1 - epsilon
    epsilon_high: float | None = None  # ... and above at 1 + epsilon_high (DAPO's clip-higher: 0.28); null: epsilon
    delta: float | None = None  # two-sided GRPO: cap the unclipped ratio
    beta: float = 0.0  # k3 KL to the reference (0: no reference is kept)
    kl_bias_correction: bool = True  # the k3 KL times pi / pi_old (TRL's use_bias_correction_kl)
    # "token": a ratio per token; "sequence": one per completion, exp(mean log-ratio) (GSPO)
    importance_sampling_level: Literal["token", "sequence"] = "token"
    logits_chunk: int = 0  # as objective.sft.logits_chunk
    # dr_grpo's constant normalizer (TRL's max_completion_length); null: rollout.max_new_tokens, filled in by the run
    max_completion_length: int | None = None

    def __post_init__(self):
        _non_negative("objective.grpo", self, "epsilon", "beta", "logits_chunk")
        _positive("objective.grpo", self, "epsilon_high", "delta", "max_completion_length", optional=True)
        require("objective.grpo.importance_sampling_level", self.importance_sampling_level,
                self.importance_sampling_level in ("token", "sequence"), "'token' or 'sequence'")
        require("objective.grpo.loss_type", self.loss_type, self.loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"),
                "grpo, bnpo, dr_grpo or dapo")


@dataclasses.dataclass(frozen=True)
class RewardSpec:
    """One reward function of GRPO (skyjax.rl.rewards): a built-in name (accuracy, format, overlong, reward_model)
    or a dotted path `package.module:function`, its weight, and keyword options passed to it."""

    name: str = "accuracy"
    weight: float = 1.0
    options: dict = dataclasses.field(default_factory=dict)
    on_error: Literal["raise", "skip"] | None = None  # overrides rollout.on_reward_error for this function

    def __post_init__(self):
        require(f"rollout.rewards[{self.name}].on_error", self.on_error, self.on_error in (None, "raise", "skip"),
                "raise, skip or null (rollout.on_reward_error)")


@dataclasses.dataclass(frozen=True)
class SampleBufferConfig:
    """R1V2's Selective Sample Buffer (skyjax.train.grpo_buffer; docs/grpo.md): completion rows with a non-zero
    advantage are kept across steps and replace the zero-advantage rows of later batches, drawn with probability
    proportional to |advantage|. They keep the sampler's log-probs of their own rollout as pi_old (the clipped
    importance ratio corrects for the policy having moved since)."""

    enabled: bool = False
    capacity: int = 512  # completion rows kept at most (the oldest go first)
    max_staleness: int = 4  # optimizer steps a row may lag the policy it trains; older rows are dropped
    max_fraction: float = 0.5  # at most this fraction of a batch's rows come from the buffer
    max_uses: int = 1  # times a buffered row is trained on before it leaves the buffer

    def __post_init__(self):
        _positive("rollout.buffer", self, "capacity", "max_uses")
        _non_negative("rollout.buffer", self, "max_staleness")
        require("rollout.buffer.max_fraction", self.max_fraction, 0 <= self.max_fraction <= 1, "must be in [0, 1]")


@dataclasses.dataclass(frozen=True)
class DynamicSamplingConfig:
    """DAPO's dynamic sampling (skyjax.train.grpo_buffer): draw more prompt batches until the step holds
    data.batch_size groups whose rewards differ, at most max_draws batches per step (then the batch is completed with
    constant-reward groups and a line is logged)."""

    enabled: bool = False
    max_draws: int = 4  # prompt batches sampled per step at most, the first included

    def __post_init__(self):
        _positive("rollout.dynamic_sampling", self, "max_draws")


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """How kind grpo samples (skyjax.train.grpo): data.batch_size prompts per step, each with num_generations
    completions drawn with the policy's current parameters on the training mesh."""

    num_generations: int = 8
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    num_iterations: int = 1  # optimizer steps on each rollout batch (pi_old: the sampler's log-probs)
    scale_rewards: Literal["group", "batch", "none"] = "group"
    mask_truncated_completions: bool = False  # completions cut at max_new_tokens do not count
    buffer: SampleBufferConfig = SampleBufferConfig()  # R1V2's selective sample buffer
    dynamic_sampling: DynamicSamplingConfig = DynamicSamplingConfig()  # DAPO's dynamic sampling
    rewards: tuple[RewardSpec, ...] = (RewardSpec("accuracy"),)
    seed: int = 0
    # every N steps (0: never) the rollout's prompts, image paths, completions and rewards go to
    # run_dir/completions.jsonl (skyjax.train.grpo_log)
    log_completions_every: int = 0
    # a reward function that raises or returns NaN / a non-number for a completion: stop with an error naming the
    # function and the prompt row (file:line), or skip: that completion gets no reward (advantage 0) and is counted
    on_reward_error: Literal["raise", "skip"] = "raise"

    def __post_init__(self):
        _positive("rollout", self, "num_generations", "max_new_tokens", "num_iterations")
        _non_negative("rollout", self, "temperature", "top_k", "log_completions_every")
        require("rollout.top_p", self.top_p, 0 < self.top_p <= 1, "must be in (0, 1]")
        require("rollout.rewards", list(self.rewards), bool(self.rewards), "at least one reward")
        require("rollout.on_reward_error", self.on_reward_error, self.on_reward_error in ("raise", "skip"),
                "raise or skip")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """One section per objective (skyjax.train.objectives); the run's objective reads its own. A new objective adds
    its section here."""

    reward_model: RewardModelObjectiveConfig = RewardModelObjectiveConfig()
    sft: SFTObjectiveConfig = SFTObjectiveConfig()
    mpo: MPOObjectiveConfig = MPOObjectiveConfig()
    grpo: GRPOObjectiveConfig = GRPOObjectiveConfig()

    # the flat keys of earlier versions: a one-line error naming the new key
    RENAMED_KEYS = {"margin": "reward_model.margin", "center_coef": "reward_model.center_coef",
                    "sft_average": "sft.average", "logits_chunk": "sft.logits_chunk"}


@dataclasses.dataclass(frozen=True)
class ReferenceConfig:
    """The frozen reference policy of objectives that need one (skyjax.train.objectives.Objective.needs_reference;
    MPO's DPO/BCO terms). Ignored by objectives that need none (reward_model, sft): no reference is kept then."""

    # null: the policy's own trainable parameters at step 0. Otherwise any folder or checkpoint model.source accepts
    # ("tiny", a Hugging Face folder, a skyjax checkpoint); only its trainable-subtree parameters are kept (the frozen
    # ones are the policy's), with shapes checked against the policy's
    source: str | None = None
    # compute the reference's log-probs once per batch before the step instead of inside it (objectives that support
    # it, e.g. in their batch source, which is given the train state and so the reference; the others ignore it)
    precompute: bool = False

    def __post_init__(self):
        if self.source is not None:
            require("reference.source", self.source, bool(self.source.strip()), "a model folder, checkpoint or 'tiny' "
                    "(or null: the policy at step 0)")


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
    steps: int | None = None  # optimizer steps; None: `epochs` over the training data
    epochs: float = 1.0
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    save_every: int = 0  # 0: only at the end (and on SIGTERM)
    keep_checkpoints: int = 2
    async_checkpointing: bool = True
    # presets of the architecture (skyjax.train.optimizer.FREEZE_PRESETS: vision, projector, llm, lm_head, head)
    # or path regexes; R1V projector-only = [vision, llm], projector + LLM = [vision], everything = []
    freeze: tuple[str, ...] = ("vision",)
    seed: int = 0
    export: bool = True  # write a Hugging Face folder at the end
    eval_batch_size: int = 16
    progress: bool = True
    # resume from this saved step instead of the latest (e.g. when the latest checkpoint is unreadable)
    resume_step: int | None = None

    def __post_init__(self):
        require("trainer.steps", self.steps, self.steps is None or self.steps >= 1,
                "must be >= 1 (or null: trainer.epochs passes over the training data)")
        _positive("trainer", self, "epochs", "log_every", "keep_checkpoints", "eval_batch_size")
        _non_negative("trainer", self, "eval_every", "save_every")
        require("trainer.resume_step", self.resume_step, self.resume_step is None or self.resume_step >= 0,
                "must be >= 0 (or null: the latest checkpoint)")


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """The stages of a built-in demo before its main run, with kind mpo or grpo and data.synthetic: a short SFT warm
    start of the policy (both), a reward model on the same task and `skyjax pairs` (the MPO demo,
    skyjax.train.mpo_demo; configs/demo/mpo.yaml); the GRPO demo (skyjax.train.grpo_demo; configs/demo/grpo.yaml)
    samples its own rollouts and reads only the warm start's keys and `prompts`."""

    warmup_steps: int = 30  # SFT steps of the policy on the synthetic task (data.synthetic.train rows)
    warmup_lr: float = 3.0e-3
    reasoning: float = 0.0  # fraction of warm-start answers written "<think>...</think> Answer: X" (GRPO's format)
    reward_rows: int = 2000  # preference pairs the reward model trains on
    reward_steps: int = 100
    reward_lr: float = 3.0e-3
    reward_batch_size: int = 16
    reward_init_std: float = 0.1
    prompts: int = 256  # prompts the pairs are sampled for
    num_samples: int = 8  # responses per prompt
    temperature: float = 1.0
    max_new_tokens: int = 8
    min_margin: float = 0.0

    def __post_init__(self):
        _positive("demo", self, "warmup_steps", "warmup_lr", "reward_rows", "reward_steps", "reward_lr",
                  "reward_batch_size", "reward_init_std", "prompts", "num_samples", "max_new_tokens")
        require("demo.num_samples", self.num_samples, self.num_samples >= 2, "must be >= 2 (a pair needs two)")
        _non_negative("demo", self, "temperature", "min_margin")
        require("demo.reasoning", self.reasoning, 0 <= self.reasoning <= 1, "must be in [0, 1]")


MPODemoConfig = DemoConfig  # the name of earlier versions


@dataclasses.dataclass(frozen=True)
class RunConfig:
    kind: Literal["reward_model", "sft", "mpo", "grpo"] = "reward_model"
    name: str = "run"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    reference: ReferenceConfig = ReferenceConfig()
    trainer: TrainerConfig = TrainerConfig()
    mesh: MeshConfig = MeshConfig()
    demo: DemoConfig | None = None  # kind mpo or grpo + data.synthetic: the built-in demo's earlier stages
    rollout: RolloutConfig = RolloutConfig()  # kind grpo: sampling and rewards

    def __post_init__(self):
        if self.demo is not None and (self.kind not in ("mpo", "grpo") or self.data.synthetic is None):
            raise ConfigError("demo: the built-in demo's stages need kind mpo or grpo, and data.synthetic")
        if self.data.batch_size % self.optimizer.grad_accum:
            raise ConfigError(f"data.batch_size {self.data.batch_size} is not a multiple of optimizer.grad_accum "
                             f"{self.optimizer.grad_accum}")
        if not self.data.train and self.data.synthetic is None:
            raise ConfigError("data.train lists no files and data.synthetic is not set: nothing to train on")
        grpo = self.objective.grpo
        if self.kind == "grpo" and grpo.max_completion_length is None:  # derived: dr_grpo's normalizer
            object.__setattr__(self, "objective", dataclasses.replace(self.objective, grpo=dataclasses.replace(
                grpo, max_completion_length=self.rollout.max_new_tokens)))
