"""Tiny tokenizer, chat templates, image-token expansion, assistant masks and batch padding."""

import unicodedata

import jinja2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from skyjax.data.chat import (
    FormattedConversation,
    SequenceTooLongError,
    expand_internvl_images,
    format_conversation,
    pad_batch,
)
from skyjax.data.tokenizer import QWEN_SPECIAL_TOKENS, build_tiny_tokenizer, special_token_ids

ONE_IMAGE = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
# qwen2_5_vl.md §3, verbatim.
SPEC_ONE_IMAGE = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "<|vision_start|><|image_pad|><|vision_end|>Describe.<|im_end|>\n<|im_start|>assistant\n"
)
SAMPLES = [
    "héllo wörld 🙂\n\n  tabs\tand the end",
    "<|im_start|>user\nthe in<|image_pad|>x<|im_end|>",
    "<think>a</think><img><IMG_CONTEXT></img>",
]


@pytest.fixture(scope="module")
def qwen():
    return build_tiny_tokenizer("qwen2_5_vl")


@pytest.fixture(scope="module")
def internvl():
    return build_tiny_tokenizer("internvl")


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen2", "internvl", "r1v"])
def test_save_and_reload_is_identical(tmp_path, kind):
    tok = build_tiny_tokenizer(kind, out_dir=tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert type(again).__name__ == "Qwen2Tokenizer"
    assert again.chat_template == tok.chat_template
    assert special_token_ids(again) == special_token_ids(tok)
    assert again.get_vocab() == tok.get_vocab()
    for text in SAMPLES:
        assert again.encode(text) == tok.encode(text)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert again.apply_chat_template(messages, tokenize=False) == tok.apply_chat_template(messages, tokenize=False)


def test_special_tokens_order_and_roles(qwen, internvl):
    ids = special_token_ids(qwen)
    order = [ids[n] for n in ("endoftext", "im_start", "im_end", "vision_start", "vision_end", "vision_pad",
                              "image_pad", "video_pad")]
    assert order == list(range(order[0], order[0] + 8))  # Qwen's relative order, contiguous
    assert qwen.convert_ids_to_tokens(order) == list(QWEN_SPECIAL_TOKENS)
    assert ids["eos"] == ids["im_end"] and ids["pad"] == ids["endoftext"]
    assert qwen.bos_token is None
    assert "img_context" not in ids and "think_start" not in ids
    vl = special_token_ids(internvl)
    assert vl["img_start"] + 1 == vl["img_end"] and vl["img_end"] + 1 == vl["img_context"]
    assert internvl.convert_ids_to_tokens(vl["img_context"]) == "<IMG_CONTEXT>"
    assert "<image>" not in internvl.get_vocab()  # a text marker, expanded by our code, never a token
    for token in ("<img>", "</img>", "<IMG_CONTEXT>", "<think>", "</think>"):
        assert internvl.encode(token) == [internvl.convert_tokens_to_ids(token)]
    # <think> is not special: skipping special tokens keeps the reasoning markers.
    text = "<|im_start|><think>x</think>y<|im_end|>"
    assert internvl.decode(internvl.encode(text), skip_special_tokens=True) == "<think>x</think>y"


@settings(max_examples=40, deadline=None)
@given(st.text(max_size=30))
def test_byte_level_roundtrip(qwen, text):
    text = unicodedata.normalize("NFC", text)  # NFC normalisation is part of Qwen's tokenizer
    ids = qwen.encode(text)
    assert max(ids, default=0) < special_token_ids(qwen)["endoftext"]  # bytes/merges only, never a special token
    assert qwen.decode(ids) == text


def test_qwen_template_matches_spec(qwen):
    assert qwen.apply_chat_template(ONE_IMAGE, tokenize=False, add_generation_prompt=True) == SPEC_ONE_IMAGE
    no_gen = qwen.apply_chat_template(ONE_IMAGE, tokenize=False)
    assert no_gen == SPEC_ONE_IMAGE.removesuffix("<|im_start|>assistant\n")
    with_system = [{"role": "system", "content": "Be brief."}, *ONE_IMAGE, {"role": "assistant", "content": "A cat."}]
    assert qwen.apply_chat_template(with_system, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
        "Describe.<|im_end|>\n<|im_start|>assistant\nA cat.<|im_end|>\n"
    )


def test_text_and_internvl_templates():
    text_only = build_tiny_tokenizer("qwen2")
    assert text_only.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )
    with pytest.raises(jinja2.TemplateError, match="no slot for image"):
        text_only.apply_chat_template(ONE_IMAGE, tokenize=False)
    internvl = build_tiny_tokenizer("internvl")
    assert internvl.apply_chat_template(ONE_IMAGE, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\n<image>\nDescribe.<|im_end|>\n<|im_start|>assistant\n"
    )


def _segments_to_ids(tok, segments):
    """Expected ids and mask from (text, is_assistant) segments, each split at special tokens."""
    ids, mask = [], []
    for text, is_assistant in segments:
        piece = tok.encode(text, add_special_tokens=False)
        ids += piece
        mask += [is_assistant] * len(piece)
    return np.array(ids), np.array(mask)


def test_assistant_mask_hand_made(qwen):
    messages = [
        {"role": "user", "content": "Is it red?"},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": [{"type": "text", "text": "And the sky?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Blue, the sky."}]},
    ]
    out = format_conversation(qwen, messages, num_image_tokens=[])
    expected_ids, expected_mask = _segments_to_ids(qwen, [
        ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nIs it red?<|im_end|>\n"
         "<|im_start|>assistant\n", False),
        ("Red.<|im_end|>", True),
        ("\n<|im_start|>user\nAnd the sky?<|im_end|>\n<|im_start|>assistant\n", False),
        ("Blue, the sky.<|im_end|>", True),
        ("\n", False),
    ])
    np.testing.assert_array_equal(out.input_ids, expected_ids)
    np.testing.assert_array_equal(out.assistant_mask, expected_mask)
    assert qwen.decode(out.input_ids[out.assistant_mask]) == "Red.<|im_end|>Blue, the sky.<|im_end|>"
    assert out.input_ids.dtype == np.int32 and out.assistant_mask.dtype == bool
    assert not out.mm_token_type_ids.any() and out.image_token_counts.shape == (0,)
    # The same ids as HF's own tokenized rendering.
    hf = qwen.apply_chat_template(messages, tokenize=True, return_dict=False)
    np.testing.assert_array_equal(out.input_ids, hf)

    prompt_only = format_conversation(qwen, messages[:1], num_image_tokens=[], add_generation_prompt=True)
    assert not prompt_only.assistant_mask.any()
    assert qwen.decode(prompt_only.input_ids).endswith("Is it red?<|im_end|>\n<|im_start|>assistant\n")


def test_template_that_rewrites_earlier_turns_is_refused():
    tok = build_tiny_tokenizer("qwen2")
    # Drops every assistant turn but the last, like reasoning templates that strip earlier thoughts.
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    )
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    with pytest.raises(ValueError, match="rewrites earlier turns"):
        format_conversation(tok, messages, num_image_tokens=[])


def test_image_expansion_counts_and_positions(qwen):
    ids = special_token_ids(qwen)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}]},
                {"role": "assistant", "content": "Two."}]
    out = format_conversation(qwen, messages, num_image_tokens=[3, 5])
    unexpanded = qwen.encode(out.text)
    assert out.length == len(unexpanded) + (3 - 1) + (5 - 1)
    np.testing.assert_array_equal(out.image_token_counts, [3, 5])
    is_pad = out.input_ids == ids["image_pad"]
    np.testing.assert_array_equal(out.mm_token_type_ids, is_pad.astype(np.int32))
    assert out.mm_token_type_ids.dtype == np.int32
    # Each run of pads sits between vision_start and vision_end with the requested length.
    starts = np.flatnonzero(out.input_ids == ids["vision_start"])
    ends = np.flatnonzero(out.input_ids == ids["vision_end"])
    assert [int(e - s - 1) for s, e in zip(starts, ends)] == [3, 5]
    assert is_pad[starts[0] + 1 : ends[0]].all() and is_pad[starts[1] + 1 : ends[1]].all()
    # Token-level expansion equals tokenizing the textually expanded prompt.
    first, rest = out.text.split("<|image_pad|>", 1)
    expanded_text = first + "<|image_pad|>" * 3 + rest.replace("<|image_pad|>", "<|image_pad|>" * 5, 1)
    np.testing.assert_array_equal(out.input_ids, qwen.encode(expanded_text))
    assert qwen.decode(out.input_ids[out.assistant_mask]) == "Two.<|im_end|>"


def test_image_count_mismatch_and_length_errors(qwen):
    with pytest.raises(ValueError, match=r"1 image placeholder.*2 entries"):
        format_conversation(qwen, ONE_IMAGE, num_image_tokens=[4, 4])
    with pytest.raises(ValueError, match=r"1 image placeholder.*0 entries"):
        format_conversation(qwen, ONE_IMAGE, num_image_tokens=[])
    with pytest.raises(ValueError, match="at least one token"):
        format_conversation(qwen, ONE_IMAGE, num_image_tokens=[0])
    length = format_conversation(qwen, ONE_IMAGE, num_image_tokens=[40]).length
    assert format_conversation(qwen, ONE_IMAGE, num_image_tokens=[40], max_length=length).length == length
    with pytest.raises(SequenceTooLongError, match=rf"{length} tokens.*max_length={length - 1}") as info:
        format_conversation(qwen, ONE_IMAGE, num_image_tokens=[40], max_length=length - 1)
    assert isinstance(info.value, ValueError) and (info.value.length, info.value.limit) == (length, length - 1)


def test_expand_internvl_images():
    text = "<image>\n<image>\nWhich?"
    assert expand_internvl_images(text, [1, 2], 2) == (
        "<img>" + "<IMG_CONTEXT>" * 2 + "</img>\n<img>" + "<IMG_CONTEXT>" * 4 + "</img>\nWhich?"
    )
    with pytest.raises(ValueError, match=r"2 <image> marker.*1 entries"):
        expand_internvl_images(text, [1], 256)
    with pytest.raises(ValueError, match=">= 1"):
        expand_internvl_images(text, [1, 0], 256)


def test_format_conversation_internvl(internvl):
    ids = special_token_ids(internvl)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Q?"}]},
                {"role": "assistant", "content": "<think>hm</think>A."}]
    out = format_conversation(internvl, messages, num_image_tokens=[2 * 3, 1 * 3], image_token="<image>")
    expected = internvl.encode(expand_internvl_images(out.text, [2, 1], 3))
    np.testing.assert_array_equal(out.input_ids, expected)
    assert int((out.input_ids == ids["img_context"]).sum()) == 9 == int(out.mm_token_type_ids.sum())
    assert int((out.input_ids == ids["img_start"]).sum()) == 2
    # Span mapping survives the text growing by the <image> replacements before the assistant turn.
    assert internvl.decode(out.input_ids[out.assistant_mask]) == "<think>hm</think>A.<|im_end|>"
    with pytest.raises(ValueError, match=r"2 image placeholder.*1 entries"):
        format_conversation(internvl, messages, num_image_tokens=[3], image_token="<image>")


def _example(n, start=1):
    ids = np.arange(start, start + n, dtype=np.int32)
    return FormattedConversation(
        input_ids=ids, assistant_mask=ids % 2 == 0, mm_token_type_ids=(ids == start).astype(np.int32),
        image_token_counts=np.array([n], np.int32), text="",
    )


@pytest.mark.parametrize("side", ["right", "left"])
def test_pad_batch_sides(side):
    a, b = _example(3), _example(5, start=10)
    out = pad_batch([a, b], pad_id=0, side=side)
    assert out["input_ids"].shape == (2, 5) and out["input_ids"].dtype == np.int32
    if side == "right":
        np.testing.assert_array_equal(out["input_ids"][0], [1, 2, 3, 0, 0])
        np.testing.assert_array_equal(out["attention_mask"][0], [1, 1, 1, 0, 0])
        np.testing.assert_array_equal(out["assistant_mask"][0], [False, True, False, False, False])
        np.testing.assert_array_equal(out["mm_token_type_ids"][0], [1, 0, 0, 0, 0])
    else:
        np.testing.assert_array_equal(out["input_ids"][0], [0, 0, 1, 2, 3])
        np.testing.assert_array_equal(out["attention_mask"][0], [0, 0, 1, 1, 1])
        np.testing.assert_array_equal(out["assistant_mask"][0], [False, False, False, True, False])
        np.testing.assert_array_equal(out["mm_token_type_ids"][0], [0, 0, 1, 0, 0])
    np.testing.assert_array_equal(out["input_ids"][1], np.arange(10, 15))
    assert out["attention_mask"][1].all()
    np.testing.assert_array_equal(out["image_token_counts"], [3, 5])
    np.testing.assert_array_equal(out["num_images"], [1, 1])


def test_pad_batch_buckets_and_errors(qwen):
    a, b = _example(3), _example(5)
    assert pad_batch([a, b], 0, bucket_sizes=[16, 4, 8])["input_ids"].shape == (2, 8)
    assert pad_batch([a, b], 0, bucket_sizes=[5, 8])["input_ids"].shape == (2, 5)
    with pytest.raises(ValueError, match=r"5 tokens; no bucket fits"):
        pad_batch([a, b], 0, bucket_sizes=[2, 4])
    with pytest.raises(ValueError, match="at least one"):
        pad_batch([], 0)
    with pytest.raises(ValueError, match="side"):
        pad_batch([a], 0, side="middle")
    # Plain dicts work; missing masks pad as zeros; pad_id comes from the tokenizer in real use.
    pad = special_token_ids(qwen)["pad"]
    out = pad_batch([{"input_ids": np.array([7, 8])}, a], pad, bucket_sizes=[4])
    np.testing.assert_array_equal(out["input_ids"][0], [7, 8, pad, pad])
    assert not out["assistant_mask"][0].any()
    np.testing.assert_array_equal(out["num_images"], [0, 1])
