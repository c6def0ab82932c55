"""Text-only policies for kind grpo: a Qwen2 causal LM (e.g. an R1-distilled Qwen2 reasoning model) as the policy.

`load_grpo_bundle` is the model loader of kind grpo: a Hugging Face folder or skyjax checkpoint whose architecture is
a text-only causal LM (`TEXT_POLICIES`) loads with its own tokenizer and no image settings; anything else (the tiny
R1V, R1V / InternVL folders) is what SFT loads (skyjax.train.sft.load_sft_bundle). The rollout source
(skyjax.train.grpo.RolloutSource) samples a text policy with the Qwen2 decode adapter, and the objective's forward
(skyjax.train.objectives.grpo.completion_logps) is `hidden_states` of the causal LM with the same 1-D positions (the
count of real tokens before each token), so pi_old equals a fresh forward as for R1V (tests/test_grpo_text.py).
Prompt rows of a text policy must not carry images (an error names the row).
"""

from __future__ import annotations

from pathlib import Path

from jax.sharding import Mesh

from skyjax.train.bundle import ModelBundle, require_weights, runtime_overrides
from skyjax.train.config import ModelConfig

TEXT_POLICIES = ("qwen2",)  # skyjax.convert.registry names of the text-only causal LMs kind grpo trains


def is_text_policy(arch_name: str) -> bool:
    return arch_name in TEXT_POLICIES


def load_grpo_bundle(cfg: ModelConfig, mesh: Mesh, run_dir: Path) -> ModelBundle:
    """The policy of a kind grpo run: a text-only causal LM folder / checkpoint (no image settings), else what SFT
    loads (the tiny R1V, R1V / InternVL). Reads the architecture from the folder's config before any weight."""
    from skyjax.convert.checkpoint import load_model, read_model_config
    from skyjax.data.tokenizer import load_tokenizer
    from skyjax.train.sft import load_sft_bundle

    if cfg.source == "tiny":
        return load_sft_bundle(cfg, mesh, run_dir)
    require_weights(cfg)
    arch, _, _ = read_model_config(cfg.source)
    if not is_text_policy(arch.name):
        return load_sft_bundle(cfg, mesh, run_dir)
    loaded = load_model(cfg.source, mesh=mesh, dtype=cfg.dtype, param_dtype=cfg.param_dtype, **runtime_overrides(cfg))
    return ModelBundle(loaded, load_tokenizer(cfg.tokenizer or loaded.folder), None)
