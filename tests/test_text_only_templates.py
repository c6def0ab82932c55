"""Chat templates that take only plain-text content (DeepSeek-R1-Distill's, shipped by Skywork-R1V; Qwen2.5-Instruct's):
the probe that tells them from typed-part templates, the plain-text fallback for every family, R1V's own prompt
convention (``"<image>\\n" * n + question``, then each ``<image>`` replaced by its tokens), SFT assistant masks
with the ``</think>`` split, one-line errors, and `skyjax generate` on an R1V folder with such a template
token-exact against transformers for rows with 0, 1 and 2 images."""

import json

import numpy as np
import pytest
import torch

from helpers import random_image, spread_weights, tiny_hf_internvl
from skyjax.cli import main
from skyjax.data.chat import (
    IMG_CONTEXT,
    IMG_END,
    IMG_START,
    ChatTemplateError,
    format_conversation,
    renders_typed_parts,
    text_content_messages,
)
from skyjax.data.internvl_image import tile_images
from skyjax.data.records import parse_record
from skyjax.data.tokenizer import CHAT_TEMPLATES, build_tiny_tokenizer, special_token_ids
from skyjax.models.r1v import R1VConfig
from skyjax.models.r1v_inputs import Buckets, prepare_r1v_batch
from skyjax.train.config import DataConfig
from skyjax.train.sft import R1VTiles, featurize_sft

# The string-only form of the Qwen2-VL / Qwen2 ChatML templates (Qwen2.5-Instruct concatenates content likewise).
QWEN_STRING_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def user(*parts):
    """A user turn with typed parts; None is an image part."""
    return {"role": "user", "content": [{"type": "image"} if p is None else {"type": "text", "text": p}
                                        for p in parts]}


@pytest.fixture(scope="module")
def r1v_tok():
    return build_tiny_tokenizer("r1v")


def tiny_cfg(tok) -> R1VConfig:
    ids = special_token_ids(tok)
    return R1VConfig.tiny(image_token_id=ids["img_context"])


def r1v_convention_ids(tok, question: str, tiles_per_image, tokens_per_tile: int, system: str | None = None):
    """R1V's own chat code, independently of skyjax.data.chat: the question as ``"<image>\\n" * n + question``
    (plain-text content) rendered by the checkpoint's template, then the k-th ``<image>`` replaced by
    ``<img>`` + ``<IMG_CONTEXT>`` x (tokens per tile x tiles) + ``</img>``, tokenized as HF's apply_chat_template
    does (no extra special tokens: the template writes bos itself)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": "<image>\n" * len(tiles_per_image) + question}]
    query = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    for tiles in tiles_per_image:
        query = query.replace("<image>", IMG_START + IMG_CONTEXT * (tokens_per_tile * tiles) + IMG_END, 1)
    return tok(query, add_special_tokens=False)["input_ids"]


def test_r1v_tokenizer_and_template_structure(r1v_tok):
    """The tiny R1V tokenizer: DeepSeek-R1-Distill's roles (bos, eos = pad) and single tokens; its template has the
    real one's structure: system text right after bos, no separators, reasoning dropped from assistant turns."""
    ids = special_token_ids(r1v_tok)
    assert (r1v_tok.bos_token, r1v_tok.eos_token, r1v_tok.pad_token) == (
        "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜end▁of▁sentence｜>")
    assert ids["eos"] == ids["pad"] == ids["end_of_sentence"] and r1v_tok.bos_token_id == ids["begin_of_sentence"]
    for token in ("<｜User｜>", "<｜Assistant｜>", "<img>", "</img>", "<IMG_CONTEXT>", "<think>", "</think>"):
        assert r1v_tok.encode(token, add_special_tokens=False) == [r1v_tok.convert_tokens_to_ids(token)]
    # <think> is not special (decoding with skip_special_tokens keeps the reasoning markers)
    text = "<｜Assistant｜><think>x</think>y<｜end▁of▁sentence｜>"
    assert r1v_tok.decode(r1v_tok.encode(text), skip_special_tokens=True) == "<think>x</think>y"
    messages = [{"role": "system", "content": "S."}, {"role": "user", "content": "Q1"},
                {"role": "assistant", "content": "<think>r</think>A1"}, {"role": "user", "content": "Q2"}]
    assert r1v_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<｜begin▁of▁sentence｜>S.<｜User｜>Q1<｜Assistant｜>A1<｜end▁of▁sentence｜><｜User｜>Q2<｜Assistant｜><think>\n")


# --- detection and the plain-text form ---------------------------------------------------------------------------


def test_probe_tells_typed_from_string_only_templates(r1v_tok):
    for kind in ("qwen2_5_vl", "qwen2", "internvl"):
        assert renders_typed_parts(build_tiny_tokenizer(kind)), kind
    assert not renders_typed_parts(r1v_tok)
    # the failure the probe avoids: the template itself raises on typed parts
    with pytest.raises(TypeError, match="can only concatenate str"):
        r1v_tok.apply_chat_template([user(None, "Q?")], tokenize=False)
    # a template that prints a list's repr instead of raising is string-only too
    repr_tok = build_tiny_tokenizer("qwen2")
    repr_tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                              "{% endfor %}")
    assert not renders_typed_parts(repr_tok)
    # a string-only template that refuses a system turn is still recognised (the probe without one)
    no_system = build_tiny_tokenizer("qwen2")
    no_system.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}")
    assert not renders_typed_parts(no_system)
    out = format_conversation(no_system, [user("hi"), {"role": "assistant", "content": "yo"}], num_image_tokens=[])
    assert out.text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"


def test_plain_text_form_is_what_the_typed_templates_render():
    """The fallback's text for a message equals the typed InternVL / Qwen2-VL renderings of the same message, image
    placeholders in place (so a row means the same whichever kind of template a checkpoint has)."""
    messages = [{"role": "system", "content": "Be brief."}, user(None, "first,", None, "then text"),
                {"role": "assistant", "content": [{"type": "text", "text": "A"}, {"type": "text", "text": "B."}]}]
    for kind, token in (("internvl", "<image>"), ("qwen2_5_vl", "<|image_pad|>")):
        tok = build_tiny_tokenizer(kind)
        as_text = text_content_messages(messages, token)
        assert all(isinstance(m["content"], str) for m in as_text)
        assert tok.apply_chat_template(as_text, tokenize=False) == tok.apply_chat_template(messages, tokenize=False)
    assert text_content_messages(messages, "<image>")[1]["content"] == "<image>\nfirst,<image>\nthen text"
    assert messages[1]["content"][0] == {"type": "image"}  # the caller's messages are not modified


@pytest.mark.parametrize("kind,token", [("qwen2_5_vl", "<|image_pad|>"), ("qwen2", "<|image_pad|>")])
def test_string_only_qwen_templates_give_the_typed_ids_and_masks(kind, token):
    """Qwen families: a string-only ChatML template gives exactly the ids and masks of the typed template."""
    typed = build_tiny_tokenizer(kind)
    plain = build_tiny_tokenizer(kind)
    plain.chat_template = QWEN_STRING_TEMPLATE
    assert not renders_typed_parts(plain)
    images = kind == "qwen2_5_vl"
    messages = [user(*((None,) if images else ()), "What is it?"), {"role": "assistant", "content": "A dog."},
                user("And", *((None,) if images else ()), "this?"),
                {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}]
    counts = [4, 6] if images else []
    a = format_conversation(typed, messages, num_image_tokens=counts, image_token=token)
    b = format_conversation(plain, messages, num_image_tokens=counts, image_token=token)
    assert a.text == b.text
    for name in ("input_ids", "assistant_mask", "mm_token_type_ids", "image_token_counts"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert plain.decode(b.input_ids[b.assistant_mask]) == "A dog.<|im_end|>A cat.<|im_end|>"
    # typed templates render the caller's typed parts themselves (no fallback): the rendering HF gives
    assert a.text == typed.apply_chat_template(messages, tokenize=False)


# --- R1V's prompt convention ---------------------------------------------------------------------------------------


def test_r1v_prompt_ids_follow_r1vs_own_chat_convention(r1v_tok):
    """0, 1 and 2 images, typed rows and the records' string shorthand: the prompt ids are R1V's convention."""
    cfg = tiny_cfg(r1v_tok)
    image_sets = [[], [random_image(1, 150, 80)], [random_image(2, 60, 60), random_image(3, 90, 150)]]
    question = "What is in the picture?"
    typed = [[user(*[None] * len(imgs), question)] for imgs in image_sets]
    shorthand = [parse_record({"images": [f"{k}.png" for k in range(len(imgs))], "prompt": question}).conversation()
                 for imgs in image_sets]
    assert shorthand[1:] == typed[1:] and shorthand[0] == [{"role": "user", "content": question}]
    for convs in (typed, shorthand):
        batch = prepare_r1v_batch(convs, image_sets, r1v_tok, cfg, add_generation_prompt=True, pad_side="left",
                                  buckets=Buckets(seq=None))
        for row, imgs in enumerate(image_sets):
            tiles = [int(n) for n in tile_images(imgs, cfg.image_config())[1]] if imgs else []
            ours = batch.input_ids[row][batch.attention_mask[row]].tolist()
            want = r1v_convention_ids(r1v_tok, question, tiles, cfg.tokens_per_tile)
            assert ours == want, row
            assert ours.count(r1v_tok.bos_token_id) == 1 and ours[0] == r1v_tok.bos_token_id
            assert r1v_tok.decode(ours[-3:]) == "<｜Assistant｜><think>\n"
        assert batch.tiles_per_row.tolist()[0] == 0 and min(batch.tiles_per_row.tolist()[1:]) >= 1
    # a system turn goes right after bos, as the template writes it
    sys_batch = prepare_r1v_batch([[{"role": "system", "content": "Think."}, *typed[1]]], image_sets[1:2], r1v_tok,
                                  cfg, add_generation_prompt=True, buckets=Buckets(seq=None))
    tiles = [int(n) for n in tile_images(image_sets[1], cfg.image_config())[1]]
    assert sys_batch.input_ids[0].tolist() == r1v_convention_ids(r1v_tok, question, tiles, cfg.tokens_per_tile,
                                                                 system="Think.")


# --- SFT masks -----------------------------------------------------------------------------------------------------


def deepseek_trained_positions(tok, ids, turns):
    """Independently of the chat module: the tokens after the `turns`-th ``<｜Assistant｜>`` up to and including
    the ``<｜end▁of▁sentence｜>`` that closes the answer."""
    ids = list(ids)
    assistant, eos = tok.convert_tokens_to_ids("<｜Assistant｜>"), tok.eos_token_id
    starts = [i + 1 for i, t in enumerate(ids) if t == assistant]
    out = []
    for k in turns:
        end = ids.index(eos, starts[k])
        out.extend(range(starts[k], end + 1))
    return out


def test_sft_masks_with_the_string_only_template(r1v_tok, tmp_path):
    """featurize_sft (the SFT path) with DeepSeek-R1's template: every trained token is an answer token or the eos
    that closes it; an answer keeps only what follows its last ``</think>``, as the real template renders it (the
    reasoning is not in the ids at all); image tokens are never trained."""
    cfg = tiny_cfg(r1v_tok)
    fmt = R1VTiles(cfg, cfg.image_config(), DataConfig())
    random_image(4, 90, 60).save(tmp_path / "a.png")
    random_image(5, 60, 60).save(tmp_path / "b.png")
    conversational = parse_record({"images": ["a.png", "b.png"], "messages": [
        {"role": "system", "content": "You reason."},
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}]},
        {"role": "assistant", "content": "<think>\nlook closer\n</think>\n\nNo."},
        {"role": "user", "content": "Why?"},
        {"role": "assistant", "content": "Colours differ."}]}, base_dir=tmp_path, line=1)
    completion = parse_record({"images": ["a.png"], "prompt": [
        {"role": "user", "content": "Warm up."}, {"role": "assistant", "content": "Ready."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}],
        "completion": "<think>red or orange</think>Red."}, base_dir=tmp_path, line=2)
    # the same conversations as R1V's chat code writes them: plain text, "<image>\n" per image before the question
    plain = ([{"role": "system", "content": "You reason."}, {"role": "user", "content": "<image>\n<image>\nSame?"},
              {"role": "assistant", "content": "<think>\nlook closer\n</think>\n\nNo."},
              {"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Colours differ."}],
             [{"role": "user", "content": "Warm up."}, {"role": "assistant", "content": "Ready."},
              {"role": "user", "content": "<image>\nColour?"},
              {"role": "assistant", "content": "<think>red or orange</think>Red."}])
    cases = ((conversational, [0, 1], "\n\nNo.<｜end▁of▁sentence｜>Colours differ.<｜end▁of▁sentence｜>"),
             (completion, [1], "Red.<｜end▁of▁sentence｜>"))
    for (record, turns, trained_text), messages in zip(cases, plain):
        example = featurize_sft(record, r1v_tok, fmt)
        conv = example.conversation
        ids = conv.input_ids
        assert np.flatnonzero(conv.assistant_mask).tolist() == deepseek_trained_positions(r1v_tok, ids, turns)
        assert r1v_tok.decode(ids[conv.assistant_mask]) == trained_text
        assert not (conv.assistant_mask & (ids == cfg.image_token_id)).any()
        assert "think" not in r1v_tok.decode(ids) and "closer" not in r1v_tok.decode(ids)
        # the ids are the template's own rendering (plain-text content) with the images expanded
        text = r1v_tok.apply_chat_template(messages, tokenize=False)
        for tiles in tile_images([random_image(4, 90, 60), random_image(5, 60, 60)][:len(record.images)],
                                 cfg.image_config())[1]:
            text = text.replace("<image>", IMG_START + IMG_CONTEXT * (cfg.tokens_per_tile * int(tiles)) + IMG_END, 1)
        assert ids.tolist() == r1v_tok(text, add_special_tokens=False)["input_ids"]


# --- errors --------------------------------------------------------------------------------------------------------


def test_one_line_errors_name_the_row(r1v_tok):
    cfg = tiny_cfg(r1v_tok)
    img = [random_image(6, 60, 60)]
    # string-only, and it refuses the plain-text rendering as well
    picky = build_tiny_tokenizer("r1v")
    picky.chat_template = CHAT_TEMPLATES["r1v"].replace(
        "{% if message['role'] == 'user' %}",
        "{% if '<image>' in message['content'] %}{{ raise_exception('no images here\nsorry') }}{% endif %}"
        "{% if message['role'] == 'user' %}")
    assert not renders_typed_parts(picky)
    with pytest.raises(ChatTemplateError) as info:
        prepare_r1v_batch([[user("ok")], [user(None, "Q?")]], [[], img], picky, cfg)
    message = str(info.value)
    assert "\n" not in message and message.startswith("row 1: ")
    assert "neither typed content parts nor plain-text content" in message and "no images here sorry" in message
    # a part with no plain-text form
    with pytest.raises(ChatTemplateError, match=r"row 0: message 0: content part .*video.* no plain-text form"):
        prepare_r1v_batch([[{"role": "user", "content": [{"type": "video"}]}]], [[]], r1v_tok, cfg)
    # a typed template that refuses a part keeps its own error (no silent fallback), in one line
    text_only = build_tiny_tokenizer("qwen2")
    with pytest.raises(ChatTemplateError, match=r"cannot render this conversation \(TemplateError: .*no slot for"):
        format_conversation(text_only, [user(None, "Q?")], num_image_tokens=[4])


# --- generation ----------------------------------------------------------------------------------------------------

NEW = 10


@pytest.fixture(scope="module")
def r1v_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("r1v_text_only")
    tok = build_tiny_tokenizer("r1v")
    hf = spread_weights(tiny_hf_internvl(folder, tok), folder, std=0.3)
    return folder, hf, tok


def test_generate_cli_with_string_only_template_matches_transformers(r1v_folder, tmp_path):
    """The issue's command on an R1V folder whose template takes only plain-text content: rows with 0, 1 and 2
    images (string prompts and typed parts) in one left-padded batch; each equals transformers' greedy generate
    on R1V's own prompt ids for that row alone (stopping at eos, as the CLI does by default)."""
    folder, hf, tok = r1v_folder
    cfg = tiny_cfg(tok)
    (tmp_path / "img").mkdir()
    specs = {"a": (21, 150, 80), "b": (22, 60, 60), "c": (23, 90, 60)}
    for name, spec in specs.items():
        random_image(*spec).save(tmp_path / "img" / f"{name}.png")
    rows = [
        {"prompt": "Only text here.", "id": 0},
        {"images": ["img/a.png"], "prompt": "What is this?", "id": 1},
        {"images": ["img/b.png", "img/c.png"], "prompt": [{"role": "user", "content": [
            {"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare them."}]}], "id": 2},
    ]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    questions = ["Only text here.", "What is this?", "Compare them."]

    eos = tok.eos_token_id
    refs = []
    for src, question in zip(rows, questions):
        images = [random_image(*specs[p[4]]) for p in src.get("images", [])]
        tiles, per_image = tile_images(images, cfg.image_config())
        ids = r1v_convention_ids(tok, question, [int(n) for n in per_image], cfg.tokens_per_tile)
        kw = {"input_ids": torch.as_tensor([ids], dtype=torch.long)}
        if images:
            kw["pixel_values"] = torch.as_tensor(tiles, dtype=torch.float32)
        with torch.no_grad():
            out = hf.generate(**kw, max_new_tokens=NEW, do_sample=False, eos_token_id=eos, pad_token_id=eos)
        refs.append(out[0, len(ids):].numpy().tolist())

    out = tmp_path / "out.jsonl"
    assert main(["generate", "--model", str(folder), "--data", str(tmp_path / "rows.jsonl"), "--out", str(out),
                 "--max-new-tokens", str(NEW), "--temperature", "0", "--batch-size", "3", "--mesh", "1,1,1"]) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in got] == [0, 1, 2]
    for row, ref in zip(got, refs):
        assert row["token_ids"] == ref, (row["id"], row["token_ids"], ref)
        stopped = ref[-1] == eos
        assert row["finish_reason"] == ("stop" if stopped else "length")
        assert row["text"] == tok.decode(ref[:-1] if stopped else ref, skip_special_tokens=True)
    assert len({tuple(r) for r in refs}) == 3  # the rows really differ
