"""Qwen2 decoder vs transformers on tiny random weights (fp32 parity <= 1e-5 relative), bf16, mesh and KV cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from helpers import rel_error, tiny_hf_qwen2, torch_logits
from skyjax.convert.checkpoint import load_hf
from skyjax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM
from skyjax.nn.functional import Functional
from skyjax.parallel import make_mesh, use_mesh

VOCAB = 320


def padded_batch(rng, lengths, width, side):
    ids = rng.randint(3, VOCAB, (len(lengths), width))
    mask = np.zeros((len(lengths), width), bool)
    for i, n in enumerate(lengths):
        if side == "right":
            mask[i, :n] = True
        else:
            mask[i, width - n:] = True
    ids[~mask] = 0
    return ids, mask


def ours(model, ids, mask=None):
    fwd = jax.jit(lambda p, i, m: model.fn.bind(p)(i, attention_mask=m)[0])
    return np.asarray(fwd(model.params, jnp.asarray(ids), None if mask is None else jnp.asarray(mask)))


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("side", ["right", "left"])
def test_logits_match_transformers(tmp_path, tied, side):
    hf = tiny_hf_qwen2(tmp_path, tied=tied, kv_heads=2, heads=4)  # GQA 4:2
    model = load_hf(tmp_path)
    assert model.config.tie_word_embeddings is tied and model.config.num_key_value_heads == 2
    rng = np.random.RandomState(1)
    ids, mask = padded_batch(rng, [11, 6, 9], 11, side)
    # the reference is given the same positions (count of real tokens before each one)
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    ref = torch_logits(hf, ids, mask, positions)
    got = ours(model, ids, mask)
    assert rel_error(got[mask], ref[mask]) <= 1e-5
    # padding invariance: the most padded row equals that prompt run alone, unpadded (also against transformers)
    i = 1
    alone = ours(model, ids[i][mask[i]][None])
    assert rel_error(got[i][mask[i]], alone[0]) <= 1e-5
    assert rel_error(alone[0], torch_logits(hf, ids[i][mask[i]][None])[0]) <= 1e-5


def test_bf16_compute_close_to_fp32_reference(tmp_path):
    """bf16 keeps 8 mantissa bits (relative rounding 2^-9 per op). Errors compound through the layers, so the
    yardstick is the reference's own bf16 run: ours (bf16 compute, fp32 master weights) must stay within 2x the
    error of transformers in bf16 versus fp32, plus one bf16 ulp of slack (2^-8), and agree on the argmax."""
    import torch

    hf = tiny_hf_qwen2(tmp_path)
    ids, mask = padded_batch(np.random.RandomState(2), [12, 12], 12, "right")
    ref32 = torch_logits(hf, ids, mask)
    ref16 = torch_logits(hf.to(torch.bfloat16), ids, mask)
    model = load_hf(tmp_path, dtype="bfloat16", param_dtype="float32")
    got = ours(model, ids, mask).astype(np.float32)
    ref_err = rel_error(ref16, ref32)
    our_err = rel_error(got, ref32)
    assert our_err <= 2 * ref_err + 2**-8, (our_err, ref_err)
    assert np.mean(got.argmax(-1) == ref32.argmax(-1)) >= 0.9
    # and bf16 compute really ran in bf16 (a silent fp32 fallback would make this test meaningless)
    assert model.config.compute_dtype == jnp.bfloat16 and our_err > 1e-4


def test_mesh_matches_single_device_and_shardings_follow_rules(tmp_path):
    tiny_hf_qwen2(tmp_path)
    single = load_hf(tmp_path)
    mesh = make_mesh((2, 2, 2))
    sharded = load_hf(tmp_path, mesh=mesh)
    p = sharded.params["model"]
    expected = {
        ("embed_tokens", "embedding"): P("tensor", "fsdp"),
        ("layers", "self_attn", "q_proj", "kernel"): P(None, "fsdp", "tensor"),
        ("layers", "self_attn", "q_proj", "bias"): P(None, "tensor"),
        ("layers", "self_attn", "k_proj", "kernel"): P(None, "fsdp", "tensor"),
        ("layers", "self_attn", "o_proj", "kernel"): P(None, "tensor", "fsdp"),
        ("layers", "mlp", "gate_proj", "kernel"): P(None, "fsdp", "tensor"),
        ("layers", "mlp", "down_proj", "kernel"): P(None, "tensor", "fsdp"),
        ("layers", "input_layernorm", "weight"): P(None, None),
        ("norm", "weight"): P(None),
    }
    for path, spec in expected.items():
        node = p
        for k in path:
            node = node[k]
        assert node.sharding.spec == spec, (path, node.sharding.spec)
        assert node.sharding.mesh.shape == mesh.shape
    assert sharded.params["lm_head"]["kernel"].sharding.spec == P("fsdp", "tensor")
    # every parameter is actually split across devices where its spec says so (not replicated)
    kernel = p["layers"]["mlp"]["gate_proj"]["kernel"]
    assert kernel.addressable_shards[0].data.shape == (2, 32, 64)

    ids, mask = padded_batch(np.random.RandomState(3), [10, 7, 10, 4], 10, "left")
    one = ours(single, ids, mask)
    with use_mesh(mesh):
        many = ours(sharded, ids, mask)
    assert np.max(np.abs(one - many)) <= 1e-6


def test_kv_cache_decode_matches_full_forward():
    cfg = Qwen2Config.tiny()
    fn = Functional.create(lambda r: Qwen2ForCausalLM(cfg, rngs=r))
    params = fn.init(seed=4)
    rng = np.random.RandomState(4)
    prompt_ids, prompt_mask = padded_batch(rng, [7, 3], 7, "left")
    new = rng.randint(3, VOCAB, (2, 5))
    full_ids = np.concatenate([prompt_ids, new], 1)
    full_mask = np.concatenate([prompt_mask, np.ones_like(new, bool)], 1)
    full = np.asarray(jax.jit(lambda p, i, m: fn.bind(p)(i, attention_mask=m)[0])(
        params, jnp.asarray(full_ids), jnp.asarray(full_mask)))

    @jax.jit
    def step(params, ids, mask, cache, index):
        return fn.bind(params)(ids, attention_mask=mask, cache=cache, cache_index=index)

    model = fn.bind(params)
    cache = model.init_cache(2, 16)
    logits, cache = step(params, jnp.asarray(prompt_ids), jnp.asarray(prompt_mask), cache, 0)
    m = prompt_mask
    assert rel_error(np.asarray(logits)[m], full[:, :7][m]) <= 1e-5
    for t in range(5):
        logits, cache = step(params, jnp.asarray(new[:, t:t + 1]), jnp.ones((2, 1), bool), cache, 7 + t)
        assert rel_error(np.asarray(logits)[:, 0], full[:, 7 + t]) <= 1e-5, t
    assert np.asarray(cache.valid).sum(1).tolist() == [12, 8]


def test_scan_remat_policies_agree():
    cfg = Qwen2Config.tiny()
    ids = jnp.asarray(np.random.RandomState(5).randint(0, VOCAB, (2, 6)))
    grads = {}
    for remat in ("none", "full"):
        c = Qwen2Config.tiny(remat=remat)
        fn = Functional.create(lambda r, c=c: Qwen2ForCausalLM(c, rngs=r))
        params = fn.init(seed=0)
        loss = lambda p: jnp.mean(fn.bind(p)(ids)[0] ** 2)  # noqa: E731
        grads[remat] = jax.jit(jax.grad(loss))(params)
    for remat in ("full",):
        diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), grads["none"], grads[remat])
        assert max(jax.tree.leaves(diff)) <= 1e-6
    assert cfg.remat == "none"


def test_packed_rows_with_segment_ids_equal_separate_rows():
    """Two sequences packed into one row (segment ids, positions restarting) give the logits of running each alone."""
    cfg = Qwen2Config.tiny()
    fn = Functional.create(lambda r: Qwen2ForCausalLM(cfg, rngs=r))
    params = fn.init(seed=6)
    rng = np.random.RandomState(6)
    a, b = rng.randint(3, VOCAB, 5), rng.randint(3, VOCAB, 4)
    packed = np.concatenate([a, b])[None]
    segments = np.array([[1] * 5 + [2] * 4])
    positions = np.array([list(range(5)) + list(range(4))])
    fwd = jax.jit(lambda p, i, s, pos: fn.bind(p)(i, segment_ids=s, positions=pos)[0])
    got = np.asarray(fwd(params, jnp.asarray(packed), jnp.asarray(segments), jnp.asarray(positions)))[0]
    alone_a = np.asarray(fn.bind(params)(jnp.asarray(a[None]))[0])[0]
    alone_b = np.asarray(fn.bind(params)(jnp.asarray(b[None]))[0])[0]
    assert rel_error(got[:5], alone_a) <= 1e-5 and rel_error(got[5:], alone_b) <= 1e-5
    # without the segment ids the second sequence would see the first: the check can fail
    mixed = np.asarray(fwd(params, jnp.asarray(packed), jnp.ones_like(segments), jnp.asarray(positions)))[0]
    assert rel_error(mixed[5:], alone_b) > 1e-3


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("remat", ["none", "full", "dots", "dots_no_batch"])
def test_swiglu_backward_equals_autodiff(bias, remat):
    """The hand-written SwiGLU backward (skyjax.nn.layers.swiglu) against autodiff of the same forward, inside a
    scanned layer stack under every remat policy, for [B, S, E] and [N, E] inputs, with and without biases."""
    from skyjax.nn.layers import swiglu
    from skyjax.nn.scan import REMAT_POLICIES

    rng = np.random.RandomState(0)
    layers, e, f = 3, 8, 12
    ws = [jnp.asarray(rng.randn(layers, *s).astype(np.float32) * 0.3) for s in ((e, f), (e, f), (f, e))]
    bs = [jnp.asarray(rng.randn(layers, n).astype(np.float32) * 0.3) for n in (f, f, e)] if bias else []

    def reference(x, wg, wu, wd, b):
        bg, bu, bd = b or (0.0, 0.0, 0.0)
        return (jax.nn.silu(x @ wg + bg) * (x @ wu + bu)) @ wd + bd

    def ours(x, wg, wu, wd, b):
        return swiglu(x, wg, wu, wd, tuple(b), None, ("batch", "seq", "mlp") if x.ndim == 3 else None)

    for shape in [(2, 5, e), (7, e)]:
        x = jnp.asarray(rng.randn(*shape).astype(np.float32))
        g = jnp.asarray(rng.randn(*shape).astype(np.float32))

        def loss(params, x, mlp):
            def step(h, p):
                wg, wu, wd, *b = p
                return h + mlp(h, wg, wu, wd, b), None

            if remat != "none":
                step = jax.checkpoint(step, policy=REMAT_POLICIES[remat])
            h, _ = jax.lax.scan(step, x, params)
            return jnp.sum(h * g)

        params = (*ws, *bs)
        got = jax.jit(jax.grad(lambda p, x: loss(p, x, ours), argnums=(0, 1)))(params, x)
        want = jax.jit(jax.grad(lambda p, x: loss(p, x, reference), argnums=(0, 1)))(params, x)
        assert float(loss(params, x, ours)) == pytest.approx(float(loss(params, x, reference)), rel=1e-6)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            assert rel_error(a, b) < 1e-5, (shape, a.shape, rel_error(a, b))
