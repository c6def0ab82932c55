"""InternViT vs transformers' native InternVL vision tower (RMSNorm and LayerNorm variants, qkv bias, select_layer,
position-table interpolation for other tile sizes), and pixel shuffle v1/v2 vs a direct torch port of the reference."""

import functools
import json
import re

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from helpers import rel_error, tiny_hf_internvl
from skyjax.convert.checkpoint import load_hf
from skyjax.data.tokenizer import build_tiny_tokenizer
from skyjax.models.internvit import bicubic_matrix
from skyjax.models.r1v import pixel_shuffle


def torch_tower(hf, pixel_values):
    import torch

    with torch.no_grad():
        out = hf.model.vision_tower(pixel_values=torch.as_tensor(pixel_values), output_hidden_states=True)
    return [h.numpy() for h in out.hidden_states], out.last_hidden_state.numpy()


@functools.partial(jax.jit, static_argnums=(0, 3))
def _tower(fn, params, px, num_layers):
    return fn.bind(params).vision_tower(px, num_layers=num_layers)


def run_tower(lm, px, num_layers=None):
    return np.asarray(_tower(lm.fn, lm.params, px, num_layers))


def pixels(seed, n, size):
    return np.random.RandomState(seed).randn(n, 3, size, size).astype(np.float32)


def native_to_remote(tensors: dict) -> dict:
    """The remote-code (InternVL-chat) names of a native InternVL state dict, written from the reference table:
    q/k/v fused by rows into attn.qkv, mlp1.{0,1,3}, language_model.* unchanged."""
    out, qkv = {}, {}
    for key, value in tensors.items():
        if key.startswith("vision_tower."):
            r = key.replace("vision_tower.", "vision_model.", 1).replace(".encoder.layer.", ".encoder.layers.")
            for a, b in (("embeddings.cls_token", "embeddings.class_embedding"),
                         ("embeddings.position_embeddings", "embeddings.position_embedding"),
                         ("patch_embeddings.projection", "patch_embedding"), (".lambda_1", ".ls1"),
                         (".lambda_2", ".ls2"), (".attention.projection_layer", ".attn.proj"),
                         (".attention.q_norm", ".attn.q_norm"), (".attention.k_norm", ".attn.k_norm"),
                         (".layernorm_before", ".norm1"), (".layernorm_after", ".norm2")):
                r = r.replace(a, b)
            m = re.fullmatch(r"(.*)\.attention\.([qkv])_proj\.(weight|bias)", r)
            if m:
                qkv.setdefault((m[1], m[3]), {})[m[2]] = value
                continue
            out[r] = value
        elif key.startswith("multi_modal_projector."):
            r = key.replace("multi_modal_projector.layer_norm", "mlp1.0")
            out[r.replace("multi_modal_projector.linear_1", "mlp1.1").replace("multi_modal_projector.linear_2",
                                                                               "mlp1.3")] = value
        else:
            out[key] = value
    for (prefix, kind), parts in qkv.items():
        out[f"{prefix}.attn.qkv.{kind}"] = np.concatenate([parts["q"], parts["k"], parts["v"]], axis=0)
    return out


def remote_config(hf, tok, **overrides) -> dict:
    """A Skywork-R1V-style remote-code config.json describing the same tiny model as `hf`'s native config."""
    from skyjax.data.tokenizer import special_token_ids

    v, t = hf.config.vision_config, hf.config.text_config
    ids = special_token_ids(tok)
    cfg = {
        "architectures": ["SkyworkR1VChatModel"], "model_type": "internvl_chat",
        "auto_map": {"AutoConfig": "configuration_skywork_chat.SkyworkChatConfig",
                     "AutoModel": "modeling_skywork_chat.SkyworkR1VChatModel"},
        "template": "skywork-r1v", "select_layer": -1, "force_image_size": 56, "downsample_ratio": 0.5,
        "ps_version": "v2", "dynamic_image_size": True, "use_thumbnail": True, "min_dynamic_patch": 1,
        "max_dynamic_patch": 12, "use_backbone_lora": 0, "use_llm_lora": 0, "torch_dtype": "float32",
        "vision_config": {
            "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "hidden_size": v.hidden_size,
            "num_hidden_layers": v.num_hidden_layers, "num_attention_heads": v.num_attention_heads,
            "intermediate_size": v.intermediate_size, "image_size": 56, "patch_size": 14, "num_channels": 3,
            "qkv_bias": v.attention_bias, "qk_normalization": True, "norm_type": v.norm_type, "layer_norm_eps": 1e-6,
            "hidden_act": "gelu", "initializer_factor": 0.1, "drop_path_rate": 0.0, "use_flash_attn": True},
        "llm_config": {
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers, "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "rope_scaling": None, "max_position_embeddings": 2048, "tie_word_embeddings": False,
            "use_sliding_window": False, "bos_token_id": None, "eos_token_id": ids["eos"],
            "pad_token_id": ids["pad"], "hidden_act": "silu"},
    }
    cfg.update(overrides)
    return cfg


def make_remote_folder(native, dst, hf, tok, **overrides):
    dst.mkdir(parents=True, exist_ok=True)
    save_file(native_to_remote(load_file(str(native / "model.safetensors"))), str(dst / "model.safetensors"),
              metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(remote_config(hf, tok, **overrides)))
    tok.save_pretrained(dst)
    return dst


@pytest.mark.parametrize("norm_type,qkv_bias", [("rms_norm", False), ("layer_norm", True)])
def test_tower_and_layouts_match_transformers(tmp_path, norm_type, qkv_bias):
    """Every hidden state (select_layer 0..L, the scan stopping early) equals the native tower's; the remote layout
    (fused qkv, incl. its bias) built from the same weights converts to identical parameters."""
    tok = build_tiny_tokenizer("internvl")
    hf = tiny_hf_internvl(tmp_path / "native", tok, norm_type=norm_type, qkv_bias=qkv_bias, vision_layers=3)
    lm = load_hf(tmp_path / "native")
    assert lm.config.vision.norm_type == norm_type and lm.config.vision.qkv_bias is qkv_bias
    px = pixels(0, 3, 56)
    ref_states, ref_last = torch_tower(hf, px)
    np.testing.assert_array_equal(ref_states[-1], ref_last)  # no final norm: the last hidden state is the output
    for k in (range(4) if norm_type == "rms_norm" else (1, 3)):
        assert rel_error(run_tower(lm, px, k), ref_states[k]) <= 1e-5, k
    assert rel_error(ref_states[1], ref_states[2]) > 1e-3  # the layers really differ

    remote = load_hf(make_remote_folder(tmp_path / "native", tmp_path / "remote", hf, tok))
    assert remote.arch.name == "internvl_chat" and remote.config == lm.config
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), lm.params, remote.params)
    assert max(jax.tree.leaves(diffs)) == 0.0


def test_position_table_interpolates_for_other_tile_sizes(tmp_path):
    """84 px and 70 x 98 px inputs (6x6 and 5x7 patches vs the 4x4 table): bicubic resize as transformers."""
    tok = build_tiny_tokenizer("internvl")
    hf = tiny_hf_internvl(tmp_path, tok)
    lm = load_hf(tmp_path)
    np.testing.assert_array_equal(bicubic_matrix(4, 4), np.eye(4, dtype=np.float32))  # identity at the native size
    rect = np.random.RandomState(1).randn(2, 3, 70, 98).astype(np.float32)
    for px in (pixels(2, 2, 84), rect):
        _, ref = torch_tower(hf, px)
        assert rel_error(run_tower(lm, px), ref) <= 1e-5


# --- pixel shuffle ----------------------------------------------------------------------------------------------------


def reference_pixel_shuffle(x, scale_factor=0.5, ps_version="v2"):
    """InternVLChatModel.pixel_shuffle (remote code), verbatim in torch."""
    n, w, h, c = x.size()
    x = x.view(n, w, int(h * scale_factor), int(c / scale_factor))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
    if ps_version != "v1":
        x = x.permute(0, 2, 1, 3).contiguous()
    return x


def test_pixel_shuffle_v1_v2_and_native(tmp_path):
    import torch

    x = np.random.RandomState(0).randn(2, 8, 8, 6).astype(np.float32)
    v1, v2 = (np.asarray(pixel_shuffle(x, 0.5, v)) for v in ("v1", "v2"))
    np.testing.assert_array_equal(v1, reference_pixel_shuffle(torch.as_tensor(x), 0.5, "v1").numpy())
    np.testing.assert_array_equal(v2, reference_pixel_shuffle(torch.as_tensor(x), 0.5, "v2").numpy())
    assert v1.shape == v2.shape == (2, 4, 4, 24) and not np.array_equal(v1, v2)
    # v2: output (i, j) is the 2x2 block of patches at rows 2i.., cols 2j.., channels ordered (row, col, channel)
    np.testing.assert_array_equal(v2[0, 1, 2], np.concatenate([x[0, 2, 4], x[0, 2, 5], x[0, 3, 4], x[0, 3, 5]]))
    # transformers' native InternVLModel.pixel_shuffle is v2
    tok = build_tiny_tokenizer("internvl")
    hf = tiny_hf_internvl(tmp_path, tok)
    native = hf.model.pixel_shuffle(torch.as_tensor(x), scale_factor=0.5).numpy()
    np.testing.assert_array_equal(native, v2)
    with pytest.raises(ValueError, match="does not divide"):
        pixel_shuffle(np.zeros((1, 5, 5, 4), np.float32), 0.5)
