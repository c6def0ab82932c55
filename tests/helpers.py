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


def rotary_tolerance(angles) -> np.ndarray:
    """How far our rotary cos/sin may be from the reference's at rotary angles `angles` (position * inv_freq, fp64).

    Our inverse frequencies are correctly rounded; the reference's fp32 pow is within an ulp or two of them, on any
    CPU or GPU, so the angles differ by at most ~3 * 2^-23 of themselves (the pow, the reciprocal and the product's
    rounding), and cos/sin add an ulp each. The error grows with the position: docs/numerics.md.
    """
    return 3 * 2.0**-23 * np.abs(np.asarray(angles, np.float64)) + 5e-7


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


def tiny_hf_qwen2_5_vl(folder: Path, tokenizer, *, tied: bool = False, seed: int = 0, dtype: str = "float32",
                       flat_config: bool = False, max_shard_size=None):
    """A tiny random transformers Qwen2_5_VLForConditionalGeneration saved (hub layout) with `tokenizer` and a
    preprocessor_config.json; special ids come from the tokenizer. Vision windows are 2x2 merge units (56 px), so
    small images have partial windows. `flat_config` rewrites config.json in the flat 4.x hub style."""
    import json

    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from skyjax.data.qwen_vl_image import QwenVLImageConfig
    from skyjax.data.tokenizer import special_token_ids

    ids = special_token_ids(tokenizer)
    torch.manual_seed(seed)
    text = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "type": "mrope", "mrope_section": [2, 3, 3],
                                 "rope_theta": 10000.0},
                bos_token_id=None, eos_token_id=ids["eos"], pad_token_id=ids["pad"])
    vision = dict(depth=4, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=64,
                  fullatt_block_indexes=[1, 3], window_size=56, patch_size=14, temporal_patch_size=2,
                  spatial_merge_size=2, in_chans=3)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["image_pad"],
                              video_token_id=ids["video_pad"], vision_start_token_id=ids["vision_start"],
                              vision_end_token_id=ids["vision_end"], tie_word_embeddings=tied)
    config._attn_implementation = "eager"
    config.text_config._attn_implementation = "eager"
    config.vision_config._attn_implementation = "eager"
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    model.save_pretrained(folder, **({} if max_shard_size is None else {"max_shard_size": max_shard_size}))
    tokenizer.save_pretrained(folder)
    QwenVLImageConfig(min_pixels=4 * 28 * 28, max_pixels=64 * 28 * 28).save(folder)
    if flat_config:  # the hub's 4.x layout: text keys at the top level, rope_scaling, no text_config
        cfg = json.loads((folder / "config.json").read_text())
        flat = {**cfg.pop("text_config"), **cfg}
        rope = flat.pop("rope_parameters")
        flat["rope_theta"] = rope["rope_theta"]
        flat["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
        flat["model_type"] = "qwen2_5_vl"
        (folder / "config.json").write_text(json.dumps(flat))
    return model


def random_image(seed: int, width: int, height: int, mode: str = "RGB"):
    """A PIL image with random blocks of colour (deterministic)."""
    from PIL import Image

    rng = np.random.RandomState(seed)
    small = rng.randint(0, 256, (max(height // 8, 1), max(width // 8, 1), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.NEAREST).convert(mode)


def spread_weights(model, folder: Path | None = None, *, std: float = 0.5, seed: int = 0):
    """Redraw a tiny torch model's weights with a larger spread (norm weights 1 + small noise) so that its greedy
    continuations vary instead of repeating one token (the default tiny init does); re-save to `folder` if given."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_q" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
            else:
                p.copy_(std * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    if folder is not None:
        model.save_pretrained(folder)
    return model


def tiny_hf_internvl(folder: Path, tokenizer, *, seed: int = 0, tied: bool = False, norm_type: str = "rms_norm",
                     qkv_bias: bool = False, vision_layers: int = 2):
    """A tiny random transformers InternVLForConditionalGeneration shaped like Skywork R1V (InternViT with RMSNorm,
    full-width qk norm, layer scale, no qkv bias; Qwen2 LLM; untied head), saved with `tokenizer`. Tiles are 56 px of
    14 px patches (4 LLM tokens per tile); every parameter (norms, layer scales, cls/pos included) is randomised."""
    import torch
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig
    from transformers import Qwen2Config as HFQwen2Config

    from skyjax.data.tokenizer import special_token_ids

    ids = special_token_ids(tokenizer)
    torch.manual_seed(seed)
    vision = InternVLVisionConfig(
        hidden_size=32, num_hidden_layers=vision_layers, num_attention_heads=2, intermediate_size=64, image_size=56,
        patch_size=14, norm_type=norm_type, use_qk_norm=True, attention_bias=qkv_bias, layer_norm_eps=1e-6,
        hidden_act="gelu", use_mean_pooling=True, layer_scale_init_value=0.1)
    text = HFQwen2Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0,
                         max_position_embeddings=2048, bos_token_id=None, eos_token_id=ids["eos"],
                         pad_token_id=ids["pad"], tie_word_embeddings=tied)
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=ids["img_context"],
                            image_seq_length=4, downsample_ratio=0.5, projector_hidden_act="gelu",
                            vision_feature_layer=-1, vision_feature_select_strategy="default",
                            tie_word_embeddings=tied)
    for c in (config, config.text_config, config.vision_config):
        c._attn_implementation = "eager"
    model = InternVLForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.5 if "embeddings" in name and "patch" not in name else 0.05))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model
