"""Tiny, fully local Qwen-style tokenizers for tests, notebooks and demos (no hub access).

`build_tiny_tokenizer` wraps a byte-level BPE vocabulary (GPT-2's 256 byte symbols, in GPT-2/Qwen id order, plus a
few merges) in transformers' `Qwen2Tokenizer` (in transformers 5.x this is the only Qwen2 tokenizer class; it is
backed by the Rust `tokenizers` library, so offsets are available). Qwen's special tokens are appended after the BPE
vocabulary in the real order, as in the real checkpoints (the real ids are 151643.. instead of 256+merges..).

Chat templates (`CHAT_TEMPLATES`):

- ``qwen2_5_vl``: the structure of the Qwen2-VL / Qwen2.5-VL template. A default system turn
  ``<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n`` when the first message is not a system message;
  every message is ``<|im_start|>{role}\\n{content}<|im_end|>\\n``; a ``{"type": "image"}`` content part renders as
  ``<|vision_start|><|image_pad|><|vision_end|>`` (video likewise with ``<|video_pad|>``; ``add_vision_id`` prefixes
  ``Picture k: ``); ``add_generation_prompt`` appends ``<|im_start|>assistant\\n``.
- ``qwen2``: the text-only Qwen2-Instruct template (same ChatML turns and default system prompt); an image part
  raises, because a text-only checkpoint has no image slot.
- ``internvl``: ChatML turns like InternVL2.5 / Skywork-R1V, but no default system prompt (the checkpoint's own
  conversation template decides that; we add none). An image part renders as the plain-text marker ``<image>\\n``
  (InternVL's convention: images precede the question), which `skyjax.data.chat` later expands to
  ``<img><IMG_CONTEXT>...</img>``. ``<image>`` is deliberately *not* a token. ``add_generation_prompt`` appends
  ``<|im_start|>assistant\\n`` (no forced ``<think>``).
- ``r1v``: the tokenizer Skywork-R1V checkpoints ship (DeepSeek-R1-Distill-Qwen's, plus InternVL's image tokens) with
  the structure of its chat template, which takes only plain-text content (``'<｜User｜>' + message['content']``
  raises on a list of parts; `skyjax.data.chat` then renders plain text): ``{bos}{system contents}``, then
  ``<｜User｜>{content}`` per user turn and ``<｜Assistant｜>{content}<｜end▁of▁sentence｜>`` per assistant turn,
  where an assistant content keeps only what follows its last ``</think>`` (the reasoning is dropped, every turn);
  ``add_generation_prompt`` appends ``<｜Assistant｜><think>\\n``. bos is ``<｜begin▁of▁sentence｜>``, eos and pad
  ``<｜end▁of▁sentence｜>``. The tool-call branches of the real template are left out.
"""

from __future__ import annotations

import os
from functools import lru_cache

from tokenizers import AddedToken
from transformers import PreTrainedTokenizerBase, Qwen2Tokenizer

__all__ = [
    "CHAT_TEMPLATES",
    "QWEN_SPECIAL_TOKENS",
    "INTERNVL_SPECIAL_TOKENS",
    "R1_DISTILL_SPECIAL_TOKENS",
    "THINK_TOKENS",
    "INTERNVL_IMAGE_MARKER",
    "bytes_to_unicode",
    "build_tiny_tokenizer",
    "special_token_ids",
]

# Qwen2 / Qwen2.5-VL special tokens in their real relative order (object_ref/box/quad tokens omitted: unused here).
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# InternVL adds these after Qwen's tokens; `<IMG_CONTEXT>` is the slot overwritten by image features.
INTERNVL_SPECIAL_TOKENS = ("<img>", "</img>", "<IMG_CONTEXT>")
# Reasoning markers are ordinary (non-special) added tokens, as in the R1-distilled tokenizers, so that
# `decode(..., skip_special_tokens=True)` keeps them for answer extraction.
THINK_TOKENS = ("<think>", "</think>")
# DeepSeek-R1-Distill-Qwen's special tokens in their real relative order (they replace Qwen's first four);
# Skywork-R1V appends InternVL's image tokens.
R1_DISTILL_SPECIAL_TOKENS = ("<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<｜begin▁of▁sentence｜>")
# InternVL's plain-text image marker (not a token).
INTERNVL_IMAGE_MARKER = "<image>"

_QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_QWEN2_TEXT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'text' %}{{ content['text'] }}"
    "{% else %}{{ raise_exception('the text-only qwen2 chat template has no slot for ' + content['type']) }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_INTERNVL_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<image>\n"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% else %}{{ raise_exception('the internvl chat template has no slot for ' + content['type']) }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_R1_DISTILL_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(system_prompt='') %}"
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{% set ns.system_prompt = message['content'] %}{% endif %}{% endfor %}"
    "{{ bos_token }}{{ ns.system_prompt }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}{% endif %}"
    "{% if message['role'] == 'assistant' and message['content'] is not none %}"
    "{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"
)

CHAT_TEMPLATES = {"qwen2_5_vl": _QWEN2_VL_TEMPLATE, "qwen2": _QWEN2_TEXT_TEMPLATE, "internvl": _INTERNVL_TEMPLATE,
                  "r1v": _R1_DISTILL_TEMPLATE}
# (bos, eos, pad) per kind.
_ROLES = {"r1v": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜end▁of▁sentence｜>")}
_QWEN_ROLES = (None, "<|im_end|>", "<|endoftext|>")

# A few merges so that the BPE path is exercised (not just byte fallback); each is (left, right) in byte symbols.
_MERGES = (("Ġ", "t"), ("h", "e"), ("i", "n"), ("Ġt", "he"), ("Ġ", "a"), ("e", "r"), ("o", "n"), ("Ġ", "s"))


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode symbol map; insertion order is GPT-2/Qwen's id order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            symbols.append(256 + extra)
            extra += 1
    return {b: chr(s) for b, s in zip(printable, symbols)}


def _special_tokens_for(kind: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(special tokens, non-special added tokens) for a tokenizer kind, in id order."""
    if kind in ("qwen2_5_vl", "qwen2"):
        return QWEN_SPECIAL_TOKENS, ()
    if kind == "internvl":
        return QWEN_SPECIAL_TOKENS + INTERNVL_SPECIAL_TOKENS, THINK_TOKENS
    if kind == "r1v":
        return R1_DISTILL_SPECIAL_TOKENS + INTERNVL_SPECIAL_TOKENS, THINK_TOKENS
    raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {sorted(CHAT_TEMPLATES)}")


def build_tiny_tokenizer(kind: str = "qwen2_5_vl", out_dir: str | os.PathLike | None = None) -> Qwen2Tokenizer:
    """Build a tiny byte-level Qwen2 tokenizer with Qwen's special tokens and the `kind`'s chat template.

    Ids: 0..255 are the byte symbols (GPT-2 order), then the merged symbols, then the special tokens in
    `QWEN_SPECIAL_TOKENS` order (+ `INTERNVL_SPECIAL_TOKENS` and `THINK_TOKENS` for ``kind="internvl"``; for
    ``kind="r1v"`` `R1_DISTILL_SPECIAL_TOKENS`, `INTERNVL_SPECIAL_TOKENS`, `THINK_TOKENS`).
    Qwen kinds: eos is ``<|im_end|>``, pad ``<|endoftext|>``, no bos; ``r1v``: see the module docstring. No unk
    (every byte is in the vocabulary).
    If `out_dir` is given the tokenizer is saved there and reloads with `AutoTokenizer.from_pretrained(out_dir)`.
    """
    specials, plain_added = _special_tokens_for(kind)
    vocab = {symbol: i for i, symbol in enumerate(bytes_to_unicode().values())}
    for left, right in _MERGES:
        vocab[left + right] = len(vocab)
    # Placing the added tokens in the vocab fixes their ids (add_tokens reuses an existing id); otherwise transformers
    # numbers them in the order of its own special-token attributes (eos before pad), not Qwen's order.
    for token in specials + plain_added:
        vocab[token] = len(vocab)
    bos, eos, pad = _ROLES.get(kind, _QWEN_ROLES)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=list(_MERGES),  # tuples: "a b" strings are not accepted as merges by tokenizers' BPE here
        unk_token=None,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        extra_special_tokens=[t for t in specials if t not in (bos, eos, pad)],
    )
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in specials], special_tokens=True)
    if plain_added:
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain_added])
    tokenizer.chat_template = CHAT_TEMPLATES[kind]
    for token in specials + plain_added:  # cheap guard against a transformers change renumbering added tokens
        if tokenizer.convert_tokens_to_ids(token) != vocab[token]:
            raise RuntimeError(f"{token} got id {tokenizer.convert_tokens_to_ids(token)}, expected {vocab[token]}")
    if out_dir is not None:
        tokenizer.save_pretrained(os.fspath(out_dir))
    return tokenizer


# name -> token text; `special_token_ids` reports the ones the tokenizer has.
_NAMED_TOKENS = {
    "endoftext": "<|endoftext|>",
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
    "vision_start": "<|vision_start|>",
    "vision_end": "<|vision_end|>",
    "vision_pad": "<|vision_pad|>",
    "image_pad": "<|image_pad|>",
    "video_pad": "<|video_pad|>",
    "img_start": "<img>",
    "img_end": "</img>",
    "img_context": "<IMG_CONTEXT>",
    "think_start": "<think>",
    "think_end": "</think>",
    "begin_of_sentence": "<｜begin▁of▁sentence｜>",
    "end_of_sentence": "<｜end▁of▁sentence｜>",
    "user": "<｜User｜>",
    "assistant": "<｜Assistant｜>",
}


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """Ids of the named special tokens this tokenizer has, read from its vocabulary (never hard-coded).

    Keys: those of `_NAMED_TOKENS` that are single tokens in the vocabulary (e.g. ``image_pad``, ``vision_start``,
    ``img_context``), plus ``eos`` and ``pad`` when the tokenizer defines them.
    """
    vocab = tokenizer.get_vocab()
    ids = {name: vocab[text] for name, text in _NAMED_TOKENS.items() if text in vocab}
    if tokenizer.eos_token_id is not None:
        ids["eos"] = tokenizer.eos_token_id
    if tokenizer.pad_token_id is not None:
        ids["pad"] = tokenizer.pad_token_id
    return ids


def load_tokenizer(folder: str | os.PathLike) -> PreTrainedTokenizerBase:
    """The checkpoint's own tokenizer and chat template, from local files only (no hub access, no remote code)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{folder}: cannot load the tokenizer ({e})") from e
