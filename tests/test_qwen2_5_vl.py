"""Qwen2.5-VL end to end vs transformers: logits (one image, two images, padded batch, text only), bf16, mesh,
conversion from every layout, export, the image-token count check, and no recompilation for new image sizes."""

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from helpers import random_image, rel_error, tiny_hf_qwen2_5_vl
from skyjax.convert.checkpoint import export_hf, load_checkpoint, load_hf, save_checkpoint
from skyjax.data.qwen_vl_image import QwenVLImageConfig
from skyjax.data.tokenizer import build_tiny_tokenizer, load_tokenizer
from skyjax.models.qwen2_5_vl import ImageTokenMismatchError, check_image_tokens
from skyjax.models.qwen2_5_vl_inputs import Buckets, prepare_vl_batch
from skyjax.parallel import make_mesh, use_mesh


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen2_5_vl")
    tok = build_tiny_tokenizer("qwen2_5_vl")
    model = tiny_hf_qwen2_5_vl(folder, tok)
    return folder, model, tok


def user(*parts):
    content = [{"type": "image"} if p is None else {"type": "text", "text": p} for p in parts]
    return [{"role": "user", "content": content}]


def build(folder, tok, convs, images, **kw):
    """Inputs made as a user makes them: the checkpoint folder's own tokenizer, template and preprocessor config."""
    lm = load_hf(folder)
    tokenizer = load_tokenizer(folder)
    assert tokenizer.get_vocab() == tok.get_vocab()
    batch = prepare_vl_batch(convs, images, tokenizer, QwenVLImageConfig.from_folder(folder), lm.config.vision, **kw)
    return lm, batch


def hf_logits(model, batch):
    import torch

    kw = dict(input_ids=torch.as_tensor(batch.input_ids, dtype=torch.long),
              attention_mask=torch.as_tensor(batch.attention_mask.astype(np.int64)),
              mm_token_type_ids=torch.as_tensor(batch.mm_token_type_ids, dtype=torch.long))
    if batch.real_pixel_values is not None and len(batch.real_grid_thw):
        kw.update(pixel_values=torch.as_tensor(batch.real_pixel_values),
                  image_grid_thw=torch.as_tensor(batch.real_grid_thw, dtype=torch.long))
    with torch.no_grad():
        return model(**kw).logits.float().numpy()


def our_logits(lm, batch, mesh=None):
    fwd = jax.jit(lambda p, ids, kw: lm.fn.bind(p)(ids, **kw)[0])
    with use_mesh(mesh):
        return np.asarray(fwd(lm.params, jnp.asarray(batch.input_ids), batch.model_kwargs()))


CASES = {
    "one_image": ([user(None, "What colour is the square?")], [[(0, 90, 130)]]),
    "two_images_one_sample": ([user(None, "left", None, "Which differs?")], [[(1, 150, 80), (2, 60, 60)]]),
    "padded_batch": ([user(None, "Describe."), user("Long question first,", None, "then an image.")],
                     [[(3, 200, 120)], [(4, 70, 100)]]),
    "text_only": ([user("Just text, no image."), user("Hi")], [[], []]),
}


@pytest.mark.parametrize("case,side", [("one_image", "right"), ("two_images_one_sample", "right"),
                                       ("padded_batch", "right"), ("padded_batch", "left"),
                                       ("text_only", "right"), ("text_only", "left")])
def test_logits_match_transformers(hf_folder, case, side):
    folder, hf, tok = hf_folder
    convs, specs = CASES[case]
    images = [[random_image(*s) for s in row] for row in specs]
    lm, batch = build(folder, tok, convs, images, pad_side=side)
    ref = hf_logits(hf, batch)
    got = our_logits(lm, batch)
    mask = batch.attention_mask
    assert rel_error(got[mask], ref[mask]) <= 1e-5
    if case == "padded_batch":  # the patches were padded to a bucket and the rows to a sequence bucket
        assert batch.pixel_values.shape[0] > batch.real_pixel_values.shape[0]
        assert len(np.unique(mask.sum(1))) == 2


def test_image_features_really_matter(hf_folder):
    """Guard against a silent no-op: a different image must change the logits of the text after it."""
    folder, _, tok = hf_folder
    convs = [user(None, "What is this?")]
    lm, a = build(folder, tok, convs, [[random_image(5, 84, 84)]])
    _, b = build(folder, tok, convs, [[random_image(6, 84, 84)]])
    la, lb = our_logits(lm, a), our_logits(lm, b)
    assert rel_error(la[0, -1], lb[0, -1]) > 1e-3


def test_bf16_close_to_fp32_reference(hf_folder):
    """bf16 compute with fp32 master weights vs the fp32 reference; yardstick: the reference's own bf16 error
    (see test_qwen2.py for the reasoning), plus one bf16 ulp of slack."""
    import torch

    folder, hf, tok = hf_folder
    convs, specs = CASES["padded_batch"]
    images = [[random_image(*s) for s in row] for row in specs]
    lm16 = load_hf(folder, dtype="bfloat16", param_dtype="float32")
    _, batch = build(folder, tok, convs, images)
    ref32 = hf_logits(hf, batch)
    ref16 = hf_logits(copy.deepcopy(hf).to(torch.bfloat16), batch)  # a copy: the fixture stays fp32
    got = our_logits(lm16, batch).astype(np.float32)
    m = batch.attention_mask
    ref_err, our_err = rel_error(ref16[m], ref32[m]), rel_error(got[m], ref32[m])
    assert our_err <= 2 * ref_err + 2**-8, (our_err, ref_err)
    assert our_err > 1e-4  # it really ran in bf16


def test_mesh_matches_single_device(hf_folder):
    folder, _, tok = hf_folder
    convs = [user(None, "a"), user("b", None), user(None, "c"), user("d")]
    specs = [[(7, 60, 90)], [(8, 90, 60)], [(9, 56, 56)], []]
    images = [[random_image(*s) for s in row] for row in specs]
    lm, batch = build(folder, tok, convs, images)
    mesh = make_mesh((2, 2, 2))
    sharded = load_hf(folder, mesh=mesh)
    assert sharded.params["visual"]["blocks"]["attn"]["qkv"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
    one, many = our_logits(lm, batch), our_logits(sharded, batch, mesh)
    assert np.max(np.abs(one - many)) <= 1e-6 * max(1.0, np.max(np.abs(one)))


def test_new_image_size_in_bucket_does_not_recompile(hf_folder):
    folder, _, tok = hf_folder
    lm = load_hf(folder)
    traces = []

    @jax.jit
    def fwd(p, ids, kw):
        traces.append(1)
        return lm.fn.bind(p)(ids, **kw)[0]

    cfg = QwenVLImageConfig.from_folder(folder)
    buckets = Buckets(seq=(128,), patches=(256,), images=(2,))
    for spec in [(10, 84, 112), (11, 112, 84), (12, 56, 168)]:
        b = prepare_vl_batch([user(None, "q")], [[random_image(*spec)]], tok, cfg, lm.config.vision, buckets=buckets)
        fwd(lm.params, jnp.asarray(b.input_ids), b.model_kwargs())
    assert len(traces) == 1


def test_image_token_count_mismatch_names_the_row():
    ids = np.array([[1, 300, 300, 2, 0], [1, 300, 300, 300, 2]])
    grid = np.array([[1, 4, 2], [1, 4, 4], [0, 0, 0]])  # 2 tokens, then 4 tokens
    with pytest.raises(ImageTokenMismatchError, match=r"row 1: 3 <\|image_pad\|> placeholder tokens but the "
                                                      r"image\(s\) assigned to it give 4 image tokens"):
        check_image_tokens(ids, grid, 300)
    with pytest.raises(ImageTokenMismatchError, match=r"row 0: 2 .* its 2 image\(s\) give 6"):
        check_image_tokens(ids, grid, 300, images_per_row=[2, 0])
    check_image_tokens(np.array([[300, 300, 5, 300, 300, 300, 300]]), grid, 300)  # consistent: no error


def test_model_raises_on_mismatch(hf_folder):
    folder, _, tok = hf_folder
    lm, batch = build(folder, tok, [user(None, "q")], [[random_image(13, 84, 84)]])
    ids = batch.input_ids.copy()
    ids[0, np.argmax(ids[0] == lm.config.image_token_id)] = 5  # drop one placeholder
    with pytest.raises(ImageTokenMismatchError, match="row 0"):
        lm.module()(jnp.asarray(ids), **batch.model_kwargs())


def test_video_is_rejected():
    from skyjax.data.qwen_vl_image import preprocess_video

    with pytest.raises(NotImplementedError, match="video"):
        preprocess_video([random_image(0, 56, 56)] * 2)


def _rename_keys(folder, fn):
    from safetensors.numpy import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    save_file({fn(k): v for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def test_conversion_layouts_export_and_reload(hf_folder, tmp_path):
    """hub layout, transformers-5 in-memory names and the flat 4.x config all convert to the same weights; export
    writes what transformers reloads bit-exactly; the checkpoint round trip is exact."""
    import shutil

    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    folder, hf, tok = hf_folder
    ref = load_hf(folder)
    mem = tmp_path / "in_memory"
    shutil.copytree(folder, mem)
    _rename_keys(mem, lambda k: k if k.startswith("lm_head") else
                 "model." + k.replace("model.", "language_model.", 1) if k.startswith("model.") else "model." + k)
    from safetensors import safe_open

    with safe_open(str(mem / "model.safetensors"), "np") as f:
        keys = list(f.keys())
    assert any(k.startswith("model.language_model.") for k in keys) and any(k.startswith("model.visual.") for k in keys)
    flat = tmp_path / "flat"
    tiny_hf_qwen2_5_vl(flat, tok, flat_config=True)
    assert "text_config" not in json.loads((flat / "config.json").read_text())
    for other in (load_hf(mem), load_hf(flat)):
        assert other.config == ref.config
        diffs = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), ref.params, other.params)
        assert max(jax.tree.leaves(diffs)) == 0.0

    save_checkpoint(tmp_path / "ckpt", ref)
    back = load_checkpoint(tmp_path / "ckpt", mesh=make_mesh((2, 2, 2)))
    out = export_hf(back, tmp_path / "export")
    for name in ("tokenizer.json", "preprocessor_config.json", "chat_template.jinja"):
        assert (out / name).is_file(), name
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(out).eval()
    a, b = hf.state_dict(), reloaded.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_tied_variant_converts_and_matches(tmp_path):
    tok = build_tiny_tokenizer("qwen2_5_vl")
    hf = tiny_hf_qwen2_5_vl(tmp_path, tok, tied=True)
    lm, batch = build(tmp_path, tok, [user(None, "tied?")], [[random_image(14, 70, 98)]])
    assert lm.config.text.tie_word_embeddings and "lm_head" not in lm.params
    assert rel_error(our_logits(lm, batch)[batch.attention_mask], hf_logits(hf, batch)[batch.attention_mask]) <= 1e-5


def test_sharded_bf16_checkpoint_loads_exact_values(tmp_path):
    tok = build_tiny_tokenizer("qwen2_5_vl")
    hf = tiny_hf_qwen2_5_vl(tmp_path, tok, dtype="bfloat16", max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    lm = load_hf(tmp_path, mesh=make_mesh((1, 4, 2)))
    assert lm.config.text.dtype == "bfloat16" and lm.config.vision.param_dtype == "bfloat16"
    qkv = lm.params["visual"]["blocks"]["attn"]["qkv"]["kernel"]
    ref = hf.state_dict()["model.visual.blocks.2.attn.qkv.weight"].float().numpy().T
    np.testing.assert_array_equal(np.asarray(qkv[2]).astype(np.float32), ref)
