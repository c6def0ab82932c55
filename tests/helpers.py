"""Shared test utilities: tiny random Hugging Face models saved locally (never downloaded) and error metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def rel_error(ours, ref) -> float:
    """max |ours - ref| / max |ref|: the relative error of a whole tensor (element-wise ratios blow up near 0)."""
    ours = np.asarray(ours, np.float64)
    ref = np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-30))


def tiny_hf_qwen2(folder: Path, *, tied: bool = False, seed: int = 0, dtype: str = "float32", vocab: int = 320,
                  layers: int = 2, heads: int = 4, kv_heads: int = 2, hidden: int = 64, max_shard_size=None):
    """Build, randomise and save a tiny transformers Qwen2ForCausalLM; returns the torch model (eval mode)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, rms_norm_eps=1e-6, rope_theta=10000.0,
        max_position_embeddings=512, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        attn_implementation="eager",
    )
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # default init leaves biases at zero and norms at one: randomise everything
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(folder, **kwargs)
    return model


def torch_logits(model, input_ids, attention_mask=None, position_ids=None):
    import torch

    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(np.asarray(input_ids), dtype=torch.long),
            attention_mask=None if attention_mask is None else torch.as_tensor(np.asarray(attention_mask)).long(),
            position_ids=None if position_ids is None else torch.as_tensor(np.asarray(position_ids)).long(),
        )
    return out.logits.float().numpy()
