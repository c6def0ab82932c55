"""Generation vs transformers: greedy token-exact (Qwen2, Qwen2.5-VL with images, left padding, early stops), the
logits processors (per-row values), per-row repetition penalty end to end, log-probs vs a full forward, seeded
sampling statistics, and the (2, 2, 2) mesh."""

import math

import jax
import numpy as np
import pytest
import torch
from jax.sharding import PartitionSpec as P

from helpers import random_image, spread_weights, tiny_hf_qwen2, tiny_hf_qwen2_5_vl
from skyjax.convert.checkpoint import load_hf
from skyjax.data.tokenizer import build_tiny_tokenizer, load_tokenizer
from skyjax.parallel import make_mesh, use_mesh
from skyjax.sample.adapters import adapter_for
from skyjax.sample.decode import PAD, Sampling, generate, left_pad
from skyjax.sample.processors import ProcessorFlags, process_logits

VOCAB = 320


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen2_sample")
    hf = spread_weights(tiny_hf_qwen2(folder), folder, std=0.3)
    hf.generation_config.eos_token_id = None  # stop only where a test says so
    lm = load_hf(folder)
    return folder, hf, lm, adapter_for(lm)


@pytest.fixture(scope="module")
def qwen2_5_vl(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen2_5_vl_sample")
    tok = build_tiny_tokenizer("qwen2_5_vl")
    hf = spread_weights(tiny_hf_qwen2_5_vl(folder, tok), folder, std=0.3)
    hf.generation_config.eos_token_id = None
    lm = load_hf(folder)
    return folder, hf, lm, adapter_for(lm), load_tokenizer(folder)


def text_prompts(lengths, seed=0):
    rng = np.random.RandomState(seed)
    ids, mask = left_pad([rng.randint(3, VOCAB, n).tolist() for n in lengths], 0)
    return {"input_ids": ids, "attention_mask": mask}


def hf_generate(model, inputs, new, **kw):
    """transformers generate on the same left-padded batch; returns the new tokens [B, new] (pad after eos)."""
    t = {"input_ids": torch.as_tensor(inputs["input_ids"], dtype=torch.long),
         "attention_mask": torch.as_tensor(np.asarray(inputs["attention_mask"]).astype(np.int64))}
    for key in ("mm_token_type_ids",):
        if key in kw:
            t[key] = kw.pop(key)
    with torch.no_grad():
        out = model.generate(**t, **kw, max_new_tokens=new, do_sample=False)
    return out[:, inputs["input_ids"].shape[1]:].numpy()


def pick_stop(tokens):
    """A token that row 0 first produces at step >= 2 and that some other row never produces: greedy stops row 0
    early while another row runs to the length limit."""
    for k in range(2, tokens.shape[1] - 1):
        s = int(tokens[0, k])
        if s not in tokens[0, :k] and any(s not in row for row in tokens[1:]):
            return s, k
    raise AssertionError(f"no usable stop token in {tokens}")


def assert_matches_hf_with_stop(ours, ref, stop, pad):
    """ours: GenerateOutput; ref: HF new tokens with eos=stop (pad after it)."""
    tokens, lengths, stopped = np.asarray(ours.tokens), np.asarray(ours.lengths), np.asarray(ours.stopped)
    n = ref.shape[1]
    for b in range(ref.shape[0]):
        hits = np.flatnonzero(ref[b] == stop)
        want_len = int(hits[0]) + 1 if hits.size else n
        assert lengths[b] == want_len and stopped[b] == bool(hits.size), (b, lengths[b], want_len)
        np.testing.assert_array_equal(tokens[b, :want_len], ref[b, :want_len])
        assert np.all(tokens[b, want_len:] == PAD) and np.all(ref[b, want_len:] == pad)


def test_greedy_matches_transformers_qwen2(qwen2):
    _, hf, lm, ad = qwen2
    inputs = text_prompts([5, 13, 9, 3])
    new = 12
    free = hf_generate(hf, inputs, new, pad_token_id=0)  # no stop token: every row runs to the limit
    out = generate(ad, lm.params, inputs, Sampling(max_new_tokens=new))
    np.testing.assert_array_equal(np.asarray(out.tokens), free)
    assert np.all(np.asarray(out.lengths) == new) and not np.any(np.asarray(out.stopped))

    stop, k = pick_stop(free)
    ref = hf_generate(hf, inputs, new, pad_token_id=0, eos_token_id=stop)
    out = generate(ad, lm.params, inputs, Sampling(max_new_tokens=new, stop_token_ids=(VOCAB - 1, stop)))
    assert_matches_hf_with_stop(out, ref, stop, 0)
    assert int(out.lengths[0]) == k + 1 and out.finish_reasons()[0] == "stop" and "length" in out.finish_reasons()


def vl_case(ad, tok):
    def user(*parts):
        return [{"role": "user", "content": [{"type": "image"} if p is None else {"type": "text", "text": p}
                                             for p in parts]}]

    convs = [user(None, "Describe."), user("A longer question first,", None, "then an image."), user("text only"),
             user(None, "two", None, "images")]
    images = [[random_image(3, 200, 120)], [random_image(4, 70, 100)], [],
              [random_image(5, 60, 60), random_image(6, 90, 56)]]
    return ad.prepare(convs, images, tok)


def hf_vl_kwargs(inputs, image_token_id):
    """The reference's inputs: real patches and grids only (ours are padded to buckets), and mm_token_type_ids."""
    grid = inputs["image_grid_thw"]
    real = grid[np.prod(grid, axis=1) > 0]
    n_patches = int(np.sum(np.prod(real, axis=1)))
    return dict(pixel_values=torch.as_tensor(inputs["pixel_values"][:n_patches]),
                image_grid_thw=torch.as_tensor(real, dtype=torch.long),
                mm_token_type_ids=torch.as_tensor(inputs["input_ids"] == image_token_id, dtype=torch.long))


def test_greedy_matches_transformers_qwen2_5_vl(qwen2_5_vl):
    _, hf, lm, ad, tok = qwen2_5_vl
    inputs = vl_case(ad, tok)
    assert inputs["attention_mask"].sum(1).tolist() != [inputs["input_ids"].shape[1]] * 4  # really left-padded
    new, pad = 10, tok.pad_token_id
    free = hf_generate(hf, inputs, new, pad_token_id=pad, **hf_vl_kwargs(inputs, lm.config.image_token_id))
    out = generate(ad, lm.params, inputs, Sampling(max_new_tokens=new))
    np.testing.assert_array_equal(np.asarray(out.tokens), free)

    stop, _ = pick_stop(free)
    image_kw = hf_vl_kwargs(inputs, lm.config.image_token_id)
    ref = hf_generate(hf, inputs, new, pad_token_id=pad, eos_token_id=stop, **image_kw)
    out = generate(ad, lm.params, inputs, Sampling(max_new_tokens=new, stop_token_ids=(stop,)))
    assert_matches_hf_with_stop(out, ref, stop, pad)
    # guard against a silent image no-op: another image in row 0 changes its continuation
    other = dict(inputs, pixel_values=inputs["pixel_values"][::-1].copy())
    changed = generate(ad, lm.params, other, Sampling(max_new_tokens=new))
    assert not np.array_equal(np.asarray(changed.tokens)[0], free[0])


def hf_chain(t, k, p, m, r):
    """The processors transformers' generate builds for these settings, in its own order."""
    from transformers import GenerationConfig

    gc = GenerationConfig(do_sample=True, temperature=t, top_k=k, top_p=p, min_p=None if m == 0 else m,
                          repetition_penalty=r)
    return _reference_lm()._get_logits_processor(gc, input_ids_seq_length=1, device="cpu")


_REF = []


def _reference_lm():
    """Any transformers causal LM: `_get_logits_processor` only reads its (decoder-only) config."""
    if not _REF:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        _REF.append(Qwen2ForCausalLM(Qwen2Config(vocab_size=8, hidden_size=8, intermediate_size=8,
                                                 num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1)))
    return _REF[0]


def test_hf_processor_order():
    names = [type(x).__name__ for x in hf_chain(0.7, 5, 0.9, 0.1, 1.3)]
    assert names == ["RepetitionPenaltyLogitsProcessor", "TemperatureLogitsWarper", "TopKLogitsWarper",
                     "TopPLogitsWarper", "MinPLogitsWarper"], names


ROWS = dict(  # one value per row; includes every "off" value and extremes
    temperature=[0.7, 1.0, 1.6, 0.3, 1.0, 2.5, 0.9, 1.2],
    top_k=[0, 5, 40, 1, 0, 3, 64, 10],
    top_p=[1.0, 0.9, 0.5, 1.0, 0.05, 0.99, 0.0, 0.7],
    min_p=[0.0, 0.05, 0.0, 0.2, 0.1, 0.0, 0.5, 0.02],
    repetition_penalty=[1.0, 1.3, 0.8, 2.0, 1.1, 1.0, 1.5, 1.25],
)


def test_processors_match_transformers():
    b, v = 8, 64
    rng = np.random.RandomState(0)
    logits = (rng.standard_normal((b, v)) * 3).astype(np.float32)
    history = rng.randint(0, v, (b, 12))  # token ids already in each row's sequence
    seen = np.zeros((b, v), bool)
    seen[np.arange(b)[:, None], history] = True
    rows = Sampling(**ROWS).rows(b)
    flags = ProcessorFlags.from_rows(*(rows[k] for k in ("temperature", "top_k", "top_p", "min_p",
                                                           "repetition_penalty")), v)
    penalised, warped = jax.jit(lambda l, s, r: process_logits(l, s, r, flags))(logits, seen, rows)
    penalised, warped = np.asarray(penalised), np.asarray(warped)
    removed = 0
    for i in range(b):
        args = [ROWS[k][i] for k in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")]
        chain = hf_chain(*args)
        ids = torch.as_tensor(history[i][None])
        ref = torch.as_tensor(logits[i][None])
        for proc in chain:
            ref = proc(ids, ref)
            if type(proc).__name__ == "RepetitionPenaltyLogitsProcessor":
                np.testing.assert_allclose(penalised[i], ref[0].numpy(), rtol=1e-6, atol=0)
        ref = ref[0].numpy()
        np.testing.assert_array_equal(np.isinf(warped[i]), np.isinf(ref), err_msg=f"row {i}: {args}")
        fin = np.isfinite(ref)
        np.testing.assert_allclose(warped[i][fin], ref[fin], rtol=1e-6, atol=1e-6)
        removed += int((~fin).sum())
    assert removed > b * v // 3  # the filters really removed tokens


def test_repetition_penalty_per_row_matches_transformers(tmp_path):
    """AL-CoTD: one penalty per prompt in one batch == transformers run per prompt with that penalty. The default
    tiny init greedily repeats one token, so the penalty must bite."""
    hf = tiny_hf_qwen2(tmp_path, seed=1)
    hf.generation_config.eos_token_id = None
    lm = load_hf(tmp_path)
    ad = adapter_for(lm)
    inputs = text_prompts([7, 4, 10], seed=3)
    penalties = (1.0, 3.0, 0.5)
    new = 10
    out = generate(ad, lm.params, inputs, Sampling(max_new_tokens=new, repetition_penalty=penalties))
    got = np.asarray(out.tokens)
    changed = 0
    for b, pen in enumerate(penalties):
        row = inputs["attention_mask"][b]
        alone = {"input_ids": inputs["input_ids"][b][row][None], "attention_mask": np.ones((1, row.sum()), bool)}
        ref = hf_generate(hf, alone, new, pad_token_id=0, repetition_penalty=pen)
        np.testing.assert_array_equal(got[b], ref[0], err_msg=f"row {b}, penalty {pen}")
        changed += not np.array_equal(ref, hf_generate(hf, alone, new, pad_token_id=0))
    assert changed == 2  # the penalty really changed both penalised rows


def full_forward_logits(lm, prompt_ids, prompt_mask, tokens, **model_kw):
    """A fresh forward (no cache) over prompt + generated tokens; logits that predicted each generated token.
    `model_kw`: the model's other inputs (e.g. pixel_values)."""
    n = tokens.shape[1]
    ids = np.concatenate([prompt_ids, np.where(tokens < 0, 0, tokens)], 1)
    mask = np.concatenate([prompt_mask, tokens >= 0], 1)
    logits = jax.jit(lambda p, i, m, kw: lm.fn.bind(p)(i, attention_mask=m, **kw)[0])(lm.params, ids, mask, model_kw)
    return np.asarray(logits, np.float32)[:, prompt_ids.shape[1] - 1: prompt_ids.shape[1] - 1 + n]


def chi_square_bound(df: int, z: float = 3.719) -> float:
    """Upper 1e-4 quantile of chi-square(df), Wilson-Hilferty approximation."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


CONTROLS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")


def test_sampling_logprobs_seed_and_distribution(qwen2):
    """Two prompts with different controls, G = 2048 samples each from one prefill:
    - raw log-probs equal a fresh full forward (no cache) within 1e-5, processed ones transformers' chain on it
      with the row's history (prompt + tokens so far: the repetition penalty follows generated tokens);
    - the same seed gives the same samples, another seed others;
    - first-token frequencies follow the processed distribution (chi-square at p = 1e-4), not the raw one."""
    _, _, lm, ad = qwen2
    inputs = text_prompts([8, 3], seed=5)
    g, new = 1024, 6
    rows = dict(temperature=(1.5, 0.8), top_k=(12, 0), top_p=(0.9, 1.0), min_p=(0.02, 0.1),
                repetition_penalty=(1.3, 2.0))
    sampling = Sampling(max_new_tokens=new, num_samples=g, stop_token_ids=(7, 11, 13), **rows)
    out = generate(ad, lm.params, inputs, sampling, seed=11)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    assert tokens.shape == (2 * g, new)
    np.testing.assert_array_equal(tokens, np.asarray(generate(ad, lm.params, inputs, sampling, seed=11).tokens))
    assert np.mean(tokens != np.asarray(generate(ad, lm.params, inputs, sampling, seed=12).tokens)) > 0.3

    check = np.array([0, 1, 2, g, g + 1, g + 2])  # rows checked against a full forward: 3 samples of each prompt
    ids, mask = (np.repeat(inputs[k], g, axis=0)[check] for k in ("input_ids", "attention_mask"))
    logits = full_forward_logits(lm, ids, mask, tokens[check])
    valid = tokens[check] >= 0
    raw = np.take_along_axis(jax.nn.log_softmax(logits, -1), np.maximum(tokens[check], 0)[..., None], -1)[..., 0]
    assert np.max(np.abs(np.where(valid, raw - np.asarray(out.logprobs)[check], 0))) <= 1e-5
    assert np.all(np.asarray(out.logprobs)[check][~valid] == 0) and np.all(valid.sum(1) == lengths[check])
    slp = np.asarray(out.sample_logprobs)[check]
    for i, r in enumerate(check):
        chain = hf_chain(*(rows[k][r // g] for k in CONTROLS))
        history = ids[i][mask[i]].tolist()
        for t in range(lengths[r]):
            scores = chain(torch.as_tensor([history]), torch.tensor(logits[i, t][None]))
            want = torch.log_softmax(scores, -1)[0, tokens[r, t]].item()
            assert abs(slp[i, t] - want) <= 1e-5, (r, t, slp[i, t], want)
            history.append(int(tokens[r, t]))
    assert np.any(lengths < new) and np.any(lengths == new)  # some rows stopped early, some ran to the limit

    # first-token frequencies of prompt 0 vs transformers' processed distribution of its last prompt logits
    chain = hf_chain(*(rows[k][0] for k in CONTROLS))
    prompt = inputs["input_ids"][0][inputs["attention_mask"][0]]
    first = logits[0, 0]
    probs = torch.softmax(chain(torch.as_tensor(prompt[None]), torch.as_tensor(first[None].copy())), -1)[0].numpy()
    support = np.flatnonzero(probs > 0)
    assert 4 <= support.size <= 12, support.size
    counts = np.bincount(tokens[:g, 0], minlength=VOCAB)
    assert counts[probs == 0].sum() == 0  # nothing outside the processed distribution
    expected = g * probs[support]
    chi2 = float(np.sum((counts[support] - expected) ** 2 / expected))
    assert chi2 <= chi_square_bound(support.size - 1), (chi2, counts[support], expected)
    raw_probs = torch.softmax(torch.tensor(first), -1).numpy()  # the test has power: raw is far off
    assert 0.5 * np.abs(counts / g - raw_probs).sum() > 0.1


def test_mesh_gives_the_same_greedy_tokens(qwen2_5_vl):
    """(2, 2, 2) mesh: batch over data x fsdp, heads and vocab over tensor; same tokens as one device. The mesh run
    takes the scanned decode step (the TPU default), the single-device one the unrolled CPU step."""
    folder, _, lm, ad, tok = qwen2_5_vl
    inputs = vl_case(ad, tok)
    sampling = Sampling(max_new_tokens=10)  # the program of the single-device greedy test, already compiled
    one = generate(ad, lm.params, inputs, sampling)
    mesh = make_mesh((2, 2, 2))
    sharded = load_hf(folder, mesh=mesh)
    assert sharded.params["model"]["layers"]["self_attn"]["q_proj"]["kernel"].sharding.spec == \
        P(None, "fsdp", "tensor")
    with use_mesh(mesh):
        many = generate(adapter_for(sharded, unstack_layers=False), sharded.params, inputs, sampling)
    assert ad.unstack_layers  # the default on CPU
    assert many.tokens.sharding.spec[0] == ("data", "fsdp")  # rows stay batch-sharded through the loop
    np.testing.assert_array_equal(np.asarray(one.tokens), np.asarray(many.tokens))
    # fp32 noise of two different programs (sharded scanned step vs unrolled [out, in] step): 1e-5 relative
    np.testing.assert_allclose(np.asarray(one.logprobs), np.asarray(many.logprobs), rtol=1e-5, atol=1e-5)
