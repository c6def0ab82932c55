"""convert -> export -> transformers reload, sharded/bf16 inputs, and the errors a bad checkpoint gets."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from helpers import rel_error, tiny_hf_qwen2, torch_logits
from skyjax.cli import main as cli
from skyjax.convert.checkpoint import load_checkpoint, load_hf
from skyjax.convert.hf_params import CheckpointMismatchError
from skyjax.convert.safetensors_io import CheckpointError, SafetensorsWriter
from skyjax.parallel import ShardingError, make_mesh


def hf_state(model):
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("tied", [False, True])
def test_convert_export_reload_exact(tmp_path, tied):
    import torch
    from transformers import AutoModelForCausalLM

    src, ckpt, out = tmp_path / "src", tmp_path / "ckpt", tmp_path / "out"
    hf = tiny_hf_qwen2(src, tied=tied, max_shard_size="20KB")  # sharded input with an index file
    assert (src / "model.safetensors.index.json").is_file()
    (src / "tokenizer_config.json").write_text("{}")  # side files travel along
    assert cli(["convert", str(src), str(ckpt), "--mesh", "2,2,2"]) == 0
    assert cli(["export", str(ckpt), str(out), "--mesh", "1,-1,1"]) == 0
    assert (out / "tokenizer_config.json").is_file() and (ckpt / "tokenizer_config.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert reloaded.config.tie_word_embeddings is tied
    a, b = hf_state(hf), hf_state(reloaded)
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)  # bit-exact in fp32
    ids = np.random.RandomState(0).randint(3, 320, (2, 8))
    np.testing.assert_allclose(torch_logits(reloaded, ids), torch_logits(hf, ids), rtol=0, atol=0)
    # the skyjax checkpoint itself gives the HF logits
    model = load_checkpoint(ckpt)
    ours = np.asarray(model.module()(jnp.asarray(ids))[0])
    assert rel_error(ours, torch_logits(hf, ids)) <= 1e-5
    assert reloaded.dtype == torch.float32


def test_bf16_checkpoint_and_restore_on_other_mesh(tmp_path):
    src = tmp_path / "src"
    hf = tiny_hf_qwen2(src, dtype="bfloat16")
    model = load_hf(src, mesh=make_mesh((2, 2, 2)))
    assert model.config.dtype == "bfloat16" and model.config.param_dtype == "bfloat16"
    kernel = model.params["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert kernel.dtype == jnp.bfloat16
    # the values are the checkpoint's bf16 values, exactly
    ref = hf.state_dict()["model.layers.1.self_attn.q_proj.weight"].float().numpy().T
    np.testing.assert_array_equal(np.asarray(kernel[1]).astype(np.float32), ref)
    # convert as fp32 master weights, save, and restore onto a different mesh shape
    from skyjax.convert.checkpoint import save_checkpoint

    up = load_hf(src, mesh=make_mesh((2, 2, 2)), dtype="bfloat16", param_dtype="float32")
    save_checkpoint(tmp_path / "ckpt", up)
    back = load_checkpoint(tmp_path / "ckpt", mesh=make_mesh((1, 4, 2)))
    k2 = back.params["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert k2.dtype == jnp.float32 and dict(k2.sharding.mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    np.testing.assert_array_equal(np.asarray(k2[1]), ref)


def _rewrite(folder, fn):
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_missing_unexpected_and_mis_shaped_keys_reported_together(tmp_path):
    tiny_hf_qwen2(tmp_path)

    def corrupt(t):
        del t["model.layers.1.mlp.up_proj.weight"]
        del t["model.norm.weight"]
        t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((31, 64), np.float32)
        t["model.extra.weight"] = np.zeros(3, np.float32)

    _rewrite(tmp_path, corrupt)
    with pytest.raises(CheckpointMismatchError) as e:
        load_hf(tmp_path)
    msg = str(e.value)
    assert "missing keys (2): model.layers.1.mlp.up_proj.weight, model.norm.weight" in msg
    assert "unexpected keys (1): model.extra.weight" in msg
    assert "model.layers.0.self_attn.k_proj.weight: expected (32, 64), found (31, 64)" in msg
    # the CLI turns it into a clear message and exit code 2, not a traceback
    assert cli(["convert", str(tmp_path), str(tmp_path / "ckpt")]) == 2


def test_non_dividing_mesh_axis_names_the_parameter(tmp_path):
    tiny_hf_qwen2(tmp_path, hidden=48, heads=4, kv_heads=2)  # embed width 48 does not divide fsdp = 32
    fake = jax.sharding.Mesh(np.array(jax.devices() * 4).reshape(1, 32, 1), ("data", "fsdp", "tensor"))
    with pytest.raises(ShardingError, match=r"lm_head/kernel: dimension 0 \('embed'\) of shape \(48, 320\) is 48, "
                                            r"which does not divide mesh axes \('fsdp',\) of size 32"):
        load_hf(tmp_path, mesh=fake)
    # over tensor = 16 the query width (48) divides but the kv projection (2 heads x 12 = 24) does not
    with pytest.raises(ShardingError, match=r"model/layers/self_attn/k_proj/bias: dimension 1 \('kv_heads'\) of "
                                            r"shape \(2, 24\) is 24, which does not divide mesh axes \('tensor',\) "
                                            r"of size 16"):
        load_hf(tmp_path, mesh=jax.sharding.Mesh(np.array(jax.devices() * 2).reshape(1, 1, 16),
                                                 ("data", "fsdp", "tensor")))


def test_unreadable_and_absent_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    tiny = dict(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", **tiny}))
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        load_hf(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="cannot read safetensors header"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="unsupported architecture.*llama"):
        load_hf(tmp_path)


def test_writer_shards_and_index(tmp_path):
    with SafetensorsWriter(tmp_path, max_shard_bytes=100) as w:
        for i in range(5):
            w.add(f"t{i}", np.full((10,), i, np.float32))  # 40 bytes each -> 2 per shard
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert index["metadata"]["total_size"] == 200
    w2 = SafetensorsWriter(tmp_path / "y")
    w2.add("a", np.zeros(1))
    with pytest.raises(CheckpointError, match="tensor 'a' written twice"):
        w2.add("a", np.zeros(1))
