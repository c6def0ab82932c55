"""Skywork R1V (InternViT + pixel shuffle + projector + Qwen2) end to end vs transformers'
InternVLForConditionalGeneration: logits (one tile, several tiles with thumbnail, two images in one sample, padded
batches, select_layer), the mesh, both checkpoint layouts, export to either, the token-count check, LLM-swap assembly,
and the 38B shapes."""

import dataclasses
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from helpers import random_image, rel_error, tiny_hf_internvl, tiny_hf_qwen2
from test_internvit import make_remote_folder
from skyjax.cli import main as cli
from skyjax.convert.checkpoint import LoadedModel, export_hf, load_checkpoint, load_hf, save_checkpoint
from skyjax.convert.internvl import AssemblyError, assemble
from skyjax.data.tokenizer import build_tiny_tokenizer, load_tokenizer
from skyjax.models.r1v import ImageTokenMismatchError, R1VConfig, R1VForConditionalGeneration, check_image_tokens
from skyjax.models.r1v_inputs import Buckets, prepare_r1v_batch
from skyjax.nn.functional import Functional
from skyjax.parallel import make_mesh, use_mesh

BUCKETS = Buckets(seq=(160,), tiles=(16,))  # every case below shares these shapes: one compile per batch size


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    folder = tmp_path_factory.mktemp("internvl_native")
    tok = build_tiny_tokenizer("internvl")
    hf = tiny_hf_internvl(folder, tok)
    return folder, hf, tok, load_hf(folder)


def user(*parts):
    return [{"role": "user", "content": [{"type": "image"} if p is None else {"type": "text", "text": p}
                                         for p in parts]}]


def batch_for(folder, lm, convs, specs, **kw):
    """Inputs made as a user makes them: the checkpoint folder's own tokenizer."""
    images = [[random_image(*s) for s in row] for row in specs]
    return prepare_r1v_batch(convs, images, load_tokenizer(folder), lm.config, buckets=kw.pop("buckets", BUCKETS),
                             **kw)


@functools.partial(jax.jit, static_argnums=0)
def _forward(fn, params, ids, kw):
    return fn.bind(params)(ids, **kw)[0]


@functools.lru_cache(maxsize=None)
def _functional(cfg: R1VConfig) -> Functional:
    """One Functional per config, so models converted from different layouts share compiled programs."""
    return Functional.create(lambda r: R1VForConditionalGeneration(cfg, rngs=r))


def our_logits(lm, batch, mesh=None):
    with use_mesh(mesh):
        fn = _functional(lm.config)
        return np.asarray(_forward(fn, lm.params, jnp.asarray(batch.input_ids), batch.model_kwargs()))


def hf_logits(hf, batch, left=False, **kw):
    import torch

    mask = batch.attention_mask.astype(np.int64)
    args = dict(input_ids=torch.as_tensor(batch.input_ids, dtype=torch.long), attention_mask=torch.as_tensor(mask))
    if left:  # HF's forward would count padding into the positions; generate() (and we) do not
        args["position_ids"] = torch.as_tensor(np.maximum(np.cumsum(mask, 1) - 1, 0))
    if batch.real_pixel_values is not None:
        args["pixel_values"] = torch.as_tensor(batch.real_pixel_values)
    with torch.no_grad():
        return hf(**args, **kw).logits.numpy()


CASES = {
    "one_tile": ([user(None, "What colour is it?")], [[(0, 60, 60)]]),
    "tiles_and_thumbnail": ([user(None, "Describe the picture.")], [[(1, 150, 80)]]),
    "two_images_one_sample": ([user(None, "left", None, "Which differs?")], [[(2, 90, 60), (3, 60, 120)]]),
    "padded_batch": ([user(None, "Describe."), user("A long question first, then", None, "an image.")],
                     [[(4, 150, 100)], [(5, 60, 60)]]),
}


@pytest.mark.parametrize("case,side", [("one_tile", "right"), ("tiles_and_thumbnail", "right"),
                                       ("two_images_one_sample", "right"), ("padded_batch", "right"),
                                       ("padded_batch", "left")])
def test_logits_match_transformers(native, case, side):
    folder, hf, _, lm = native
    convs, specs = CASES[case]
    batch = batch_for(folder, lm, convs, specs, pad_side=side)
    tiles = batch.tiles_per_image.tolist()
    if case == "one_tile":
        assert tiles == [1]
    if case == "tiles_and_thumbnail":
        assert len(tiles) == 1 and tiles[0] >= 3  # a grid of >= 2 tiles + the thumbnail
    if case == "padded_batch":
        assert len(np.unique(batch.attention_mask.sum(1))) == 2
    if case == "two_images_one_sample":  # each <image> became <img> + <IMG_CONTEXT> x (4 x tiles) + </img>
        tok = load_tokenizer(folder)
        start, end, ctx = (tok.convert_tokens_to_ids(t) for t in ("<img>", "</img>", "<IMG_CONTEXT>"))
        row = batch.input_ids[0]
        starts, ends = np.flatnonzero(row == start), np.flatnonzero(row == end)
        assert [int((row[a + 1:b] == ctx).sum()) for a, b in zip(starts, ends)] == [4 * t for t in tiles]
        assert all((row[a + 1:b] == ctx).all() for a, b in zip(starts, ends))
        assert ctx == lm.config.image_token_id
    assert batch.pixel_values.shape[0] > sum(tiles)  # padded tiles are ignored
    ref = hf_logits(hf, batch, left=side == "left")
    got = our_logits(lm, batch)
    m = batch.attention_mask
    assert rel_error(got[m], ref[m]) <= 1e-5


def test_new_image_sizes_in_the_buckets_do_not_recompile(native):
    folder, _, _, lm = native
    traces = []

    @jax.jit
    def fwd(p, ids, kw):
        traces.append(1)
        return lm.fn.bind(p)(ids, **kw)[0]

    tiles = set()
    for spec in [(10, 60, 60), (11, 150, 80), (12, 200, 70)]:
        batch = batch_for(folder, lm, [user(None, "q")], [[spec]])
        tiles.add(int(batch.tiles_per_row[0]))
        fwd(lm.params, jnp.asarray(batch.input_ids), batch.model_kwargs())
    assert len(tiles) == 3 and len(traces) == 1


def test_select_layer_and_image_features_matter(native):
    """select_layer -2 (hidden state before the last vision layer) equals transformers' vision_feature_layer -2;
    and a different image changes the logits (guard against a silent no-op)."""
    folder, hf, _, lm = native
    batch = batch_for(folder, lm, *CASES["tiles_and_thumbnail"])
    cfg = dataclasses.replace(lm.config, select_layer=-2)
    other = LoadedModel(lm.arch, cfg, _functional(cfg), lm.params, folder, {})
    got, ref = our_logits(other, batch), hf_logits(hf, batch, vision_feature_layer=-2)
    m = batch.attention_mask
    assert rel_error(got[m], ref[m]) <= 1e-5
    assert rel_error(got[m], our_logits(lm, batch)[m]) > 1e-3
    b2 = batch_for(folder, lm, CASES["tiles_and_thumbnail"][0], [[(9, 150, 80)]])
    assert rel_error(our_logits(lm, b2)[0, -1], our_logits(lm, batch)[0, -1]) > 1e-3


def test_mesh_matches_single_device(native):
    folder, _, _, lm = native
    convs, specs = CASES["padded_batch"]
    batch = batch_for(folder, lm, convs, specs)
    mesh = make_mesh((2, 2, 2))
    sharded = load_hf(folder, mesh=mesh)
    assert sharded.params["vision_tower"]["layers"]["attn"]["q_proj"]["kernel"].sharding.spec == P(None, "fsdp",
                                                                                                    "tensor")
    assert sharded.params["projector"]["linear_1"]["kernel"].sharding.spec == P("fsdp", "tensor")
    one, many = our_logits(lm, batch), our_logits(sharded, batch, mesh)
    assert np.max(np.abs(one - many)) <= 1e-6 * max(1.0, np.max(np.abs(one)))


def test_image_token_count_mismatch_names_the_row(native):
    ids = np.array([[1, 274, 274, 274, 274, 2], [274, 274, 274, 274, 274, 0]])
    with pytest.raises(ImageTokenMismatchError, match=r"row 1: 5 <IMG_CONTEXT> placeholder tokens but its 1 tile\(s\) "
                                                      r"give 4 image tokens \(4 per tile\)"):
        check_image_tokens(ids, [1, 1], 274, 4, num_tiles=16)
    with pytest.raises(ImageTokenMismatchError, match="row 1: 5 .* not a whole number of tiles"):
        check_image_tokens(ids, None, 274, 4)
    check_image_tokens(ids[:1], [1], 274, 4, num_tiles=1)  # consistent: no error
    # the model itself checks concrete inputs
    folder, _, _, lm = native
    batch = batch_for(folder, lm, *CASES["two_images_one_sample"])
    ids = batch.input_ids.copy()
    ids[0, np.argmax(ids[0] == lm.config.image_token_id)] = 5  # drop one placeholder
    with pytest.raises(ImageTokenMismatchError, match=r"row 0: \d+ <IMG_CONTEXT> placeholder tokens but its"):
        lm.module()(jnp.asarray(ids), **batch.model_kwargs())


def test_remote_layout_converts_to_the_same_model(native, tmp_path):
    """A Skywork-R1V remote-code folder (fused qkv, mlp1.*, llm_config, no image_token_id in config.json) made from
    the native weights converts to the same config, weights and logits."""
    folder, hf, tok, lm = native
    remote = make_remote_folder(folder, tmp_path / "remote", hf, tok)
    assert "image_token_id" not in json.loads((remote / "config.json").read_text())
    other = load_hf(remote)
    assert other.arch.name == "internvl_chat" and other.config == lm.config
    assert other.config.image_token_id == tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), lm.params,
                         other.params)
    assert max(jax.tree.leaves(diffs)) == 0.0
    batch = batch_for(folder, lm, *CASES["one_tile"])
    np.testing.assert_array_equal(our_logits(other, batch), our_logits(lm, batch))
    # a remote checkpoint keeps ps_version: v1 is honoured (and cannot be exported natively)
    v1 = load_hf(make_remote_folder(folder, tmp_path / "v1", hf, tok, ps_version="v1"))
    assert v1.config.ps_version == "v1"
    with pytest.raises(ValueError, match="no ps_version 'v1'"):
        export_hf(v1, tmp_path / "v1_native")


def test_export_native_and_remote_round_trips(native, tmp_path):
    """Native export reloads in transformers bit-exactly (from a native or a remote source); remote export writes
    the same tensors as the reference key mapping and converts back identically."""
    import torch
    from safetensors.numpy import load_file
    from transformers import InternVLForConditionalGeneration

    folder, hf, tok, lm = native
    save_checkpoint(tmp_path / "ckpt", lm)
    back = load_checkpoint(tmp_path / "ckpt", mesh=make_mesh((2, 2, 2)))
    remote_src = load_hf(make_remote_folder(folder, tmp_path / "remote_src", hf, tok))
    ref = hf.state_dict()
    for name, model in (("from_native", back), ("from_remote", remote_src)):
        out = export_hf(model, tmp_path / name)
        assert (out / "tokenizer.json").is_file()
        reloaded = InternVLForConditionalGeneration.from_pretrained(out).eval()
        got = reloaded.state_dict()
        assert set(got) == set(ref) and reloaded.config.image_token_id == hf.config.image_token_id
        for k in ref:
            assert torch.equal(got[k], ref[k]), (name, k)

    assert cli(["export", str(tmp_path / "ckpt"), str(tmp_path / "remote"), "--layout", "remote"]) == 0
    cfg = json.loads((tmp_path / "remote" / "config.json").read_text())
    assert cfg["model_type"] == "internvl_chat" and "llm_config" in cfg and cfg["ps_version"] == "v2"
    written = load_file(str(tmp_path / "remote" / "model.safetensors"))
    expected = load_file(str(tmp_path / "remote_src" / "model.safetensors"))
    assert set(written) == set(expected)
    for k in expected:
        np.testing.assert_array_equal(written[k], expected[k], err_msg=k)
    again = load_hf(tmp_path / "remote")
    assert again.arch.name == "internvl_chat" and again.config == lm.config
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), lm.params,
                         again.params)
    assert max(jax.tree.leaves(diffs)) == 0.0
    with pytest.raises(Exception, match="layout 'bogus'"):
        export_hf(back, tmp_path / "bogus", layout="bogus")


def test_assemble_vision_and_llm(native, tmp_path):
    """The efficient-transfer recipe: vision tower + projector of the InternVL checkpoint with another Qwen2 LLM;
    a projector whose width differs from the LLM's hidden size is refused, naming both."""
    folder, _, _, lm = native
    llm = tmp_path / "llm"
    tiny_hf_qwen2(llm, seed=3, hidden=64, vocab=320)
    assert cli(["assemble", "--vision", str(folder), "--llm", str(llm), str(tmp_path / "r1v"),
                "--tokenizer-from", "vision"]) == 0
    out = load_checkpoint(tmp_path / "r1v")
    assert (tmp_path / "r1v" / "tokenizer.json").is_file() and out.config.image_token_id == lm.config.image_token_id
    qwen = load_hf(llm)
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), {"v": lm.params["vision_tower"],
                                                                    "p": lm.params["projector"]},
                        {"v": out.params["vision_tower"], "p": out.params["projector"]})
    assert all(jax.tree.leaves(same))
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)),
                                            {"m": qwen.params["model"], "h": qwen.params["lm_head"]},
                                            {"m": out.params["model"], "h": out.params["lm_head"]})))
    # the assembled config describes exactly the assembled parameters
    assert jax.tree.map(lambda s: s.shape, out.fn.shapes) == jax.tree.map(lambda a: a.shape, out.params)
    assert out.config.text.hidden_size == 64 and out.config.vision == lm.config.vision
    # the LLM's own tokenizer without InternVL's tokens: the image token id is left unknown, not borrowed
    build_tiny_tokenizer("qwen2").save_pretrained(llm)
    assert assemble(folder, llm).config.image_token_id is None

    wide = tmp_path / "llm48"
    tiny_hf_qwen2(wide, hidden=48)
    with pytest.raises(AssemblyError, match=r"projector of .* outputs width 64 but the LLM of .*llm48 has hidden "
                                            r"size 48"):
        assemble(folder, wide)
    assert cli(["assemble", "--vision", str(folder), "--llm", str(wide), str(tmp_path / "bad")]) == 2


def test_model_configs_and_38b_size():
    """configs/models/r1v_38b.yaml is Skywork-R1V-38B: 38.39B parameters (vision 5.536B, projector 91.8M,
    LLM 32.76B), counted on the abstract model; the tiny YAML is R1VConfig.tiny()."""
    from skyjax.config import load_config
    from skyjax.models.r1v import R1VForConditionalGeneration

    root = Path(__file__).resolve().parents[1] / "configs" / "models"
    cfg = load_config(R1VConfig, root / "r1v_38b.yaml")
    assert dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, dtype="float32", param_dtype="float32",
                                                               remat="none"),
                               text=dataclasses.replace(cfg.text, dtype="float32", param_dtype="float32",
                                                        remat="none")) == R1VConfig.r1v_38b()
    assert cfg.tokens_per_tile == 256 and cfg.projector_in == 12800
    shapes = Functional.create(lambda r: R1VForConditionalGeneration(cfg, rngs=r)).shapes
    count = lambda tree: sum(int(x.size) for x in jax.tree.leaves(tree)) / 1e9  # noqa: E731
    assert count(shapes) == pytest.approx(38.39, abs=0.005)
    assert count(shapes["vision_tower"]) == pytest.approx(5.536, abs=0.001)
    assert count(shapes["projector"]) == pytest.approx(0.0918, abs=0.0001)
    assert load_config(R1VConfig, root / "r1v_tiny.yaml") == R1VConfig.tiny()
