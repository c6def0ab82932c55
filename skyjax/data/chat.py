"""Chat formatting: render with the tokenizer's own chat template, expand image placeholders, build loss masks.

`format_conversation` is the one place where text becomes model input ids:

1. Render the messages with ``tokenizer.apply_chat_template(..., tokenize=False)`` (the checkpoint decides the format).
2. Find each assistant message's character span (see `_assistant_spans`).
3. Tokenize the rendered text once (with offsets; exactly as HF's own ``apply_chat_template(tokenize=True)`` does:
   ``add_special_tokens=False``).
4. Expand the k-th image placeholder token to ``num_image_tokens[k]`` copies. Expanding at the token level gives the
   same ids as tokenizing the expanded text (the placeholder is an added token, so it splits the text), without
   tokenizing thousands of copies.

Qwen2.5-VL: the placeholder is ``<|image_pad|>`` (rendered as ``<|vision_start|><|image_pad|><|vision_end|>``).
InternVL / R1V: pass ``image_token="<image>"``; the k-th ``<image>`` text marker becomes ``<img>`` +
``<IMG_CONTEXT>`` x num_image_tokens[k] + ``</img>`` (num_image_tokens[k] = tokens_per_tile * tiles), the same ids as
`expand_internvl_images` followed by tokenization.

Templates that take only plain-text content. Messages carry typed parts (``[{"type": "image"}, {"type": "text",
...}]``, what the Qwen2-VL template renders). Many checkpoints' templates concatenate ``message['content']`` as a
string instead (DeepSeek-R1-Distill's, which the Skywork-R1V checkpoints ship; Qwen2/Qwen2.5-Instruct's), and fail
or print the list's repr on typed parts. `renders_typed_parts` finds out by rendering a probe conversation both ways
(typed text parts and plain strings): a template takes typed parts when both renderings agree. Otherwise every
typed content becomes a string, part by part in order: a text part is its text, an image part is the family's
placeholder text (`image_placeholder_text`), what the typed templates render for an image part:
``<image>\\n`` for InternVL / R1V, ``<|vision_start|><|image_pad|><|vision_end|>`` for Qwen2.5-VL.

For R1V this is its own chat convention: Skywork-R1V's inference code builds the question as ``"<image>\\n" *
n_images + question`` (InternVL's ``chat`` puts ``<image>\\n`` before a question that has none) and then replaces
the k-th ``<image>`` with the k-th image's tokens. Rows whose images come before the text (the records' string
shorthand, and most datasets) render exactly that; images placed between text parts keep their place, the same text
the typed InternVL template renders, so a row means the same thing whichever kind of template the checkpoint has.
We add no ``Image-k:`` labels (InternVL's multi-image README example writes them into the question itself; R1V's
inference code does not); a row that wants them writes them as text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from skyjax.data.tokenizer import INTERNVL_IMAGE_MARKER

__all__ = [
    "ChatTemplateError",
    "FormattedConversation",
    "SequenceTooLongError",
    "expand_internvl_images",
    "format_conversation",
    "image_placeholder_text",
    "pad_batch",
    "renderable_messages",
    "renders_typed_parts",
    "text_content_messages",
]

IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
# Stands in for an assistant message's content to locate it in the rendering; no template produces it itself.
_SENTINEL = "\x00skyjax-assistant-content\x00"


class SequenceTooLongError(ValueError):
    """A formatted sequence is longer than the allowed maximum (we never truncate silently)."""

    def __init__(self, length: int, limit: int):
        self.length, self.limit = length, limit
        super().__init__(f"sequence has {length} tokens (images expanded), more than max_length={limit}")


@dataclass(frozen=True)
class FormattedConversation:
    """Model inputs for one conversation (1-D numpy arrays of equal length L).

    - input_ids (int32)
    - assistant_mask (bool): True on the tokens an SFT loss trains on: each assistant message's rendered content
      plus the eos token (``<|im_end|>``; DeepSeek-R1's ``<｜end▁of▁sentence｜>``) that closes it when the template
      puts it right after the content (a template that drops reasoning renders, and so trains, only the rest). The
      ``<|im_start|>assistant\\n`` header, the newline after ``<|im_end|>``, and image tokens are False. A token that
      straddles a span edge counts as assistant (HF's rule for ``return_assistant_tokens_mask``).
    - mm_token_type_ids (int32): 1 on expanded image tokens (``<|image_pad|>`` / ``<IMG_CONTEXT>``), 0 elsewhere.
    - image_token_counts (int32, one per image): the expansion sizes, in order.
    - text: the rendered text before expansion (for debugging).
    """

    input_ids: np.ndarray
    assistant_mask: np.ndarray
    mm_token_type_ids: np.ndarray
    image_token_counts: np.ndarray
    text: str

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])


def expand_internvl_images(text: str, tiles_per_image: Sequence[int], tokens_per_tile: int) -> str:
    """Replace the k-th ``<image>`` with ``<img>`` + ``<IMG_CONTEXT>`` x (tokens_per_tile * tiles_per_image[k]) +
    ``</img>``. Raises ValueError when the number of markers differs from ``len(tiles_per_image)``."""
    pieces = text.split(INTERNVL_IMAGE_MARKER)
    if len(pieces) - 1 != len(tiles_per_image):
        raise ValueError(
            f"text has {len(pieces) - 1} {INTERNVL_IMAGE_MARKER} marker(s) but tiles_per_image has "
            f"{len(tiles_per_image)} entries"
        )
    if tokens_per_tile < 1 or any(int(t) < 1 for t in tiles_per_image):
        raise ValueError(f"tokens_per_tile and every tile count must be >= 1, got {tokens_per_tile}, {tiles_per_image}")
    out = [pieces[0]]
    for tiles, piece in zip(tiles_per_image, pieces[1:]):
        out.append(IMG_START + IMG_CONTEXT * (tokens_per_tile * int(tiles)) + IMG_END + piece)
    return "".join(out)


class ChatTemplateError(ValueError):
    """The checkpoint's chat template cannot render a conversation (one line: callers prefix the row)."""


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: " + " ".join(str(e).split())


def _render(tokenizer, messages: Sequence[Mapping[str, Any]], **kwargs) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, **kwargs)


# Placeholder text of one image part in a plain-text rendering, per family (keyed by `format_conversation`'s
# image_token): what the typed templates render for an image part.
_IMAGE_TEXT = {INTERNVL_IMAGE_MARKER: INTERNVL_IMAGE_MARKER + "\n",
               "<|image_pad|>": "<|vision_start|><|image_pad|><|vision_end|>"}
# Probe turns; distinct texts so that a template which drops or moves a turn's content cannot agree by accident.
_PROBE = (("system", "skyjax probe S"), ("user", "skyjax probe U"), ("assistant", "skyjax probe A"))
_TYPED_SUPPORT: dict[str, bool] = {}  # chat template text -> renders typed parts


def image_placeholder_text(image_token: str) -> str:
    """The text one ``{"type": "image"}`` part becomes when content is rendered as plain text (see the module
    docstring): ``<image>\\n`` for InternVL / R1V, ``<|vision_start|><|image_pad|><|vision_end|>`` for Qwen2.5-VL."""
    return _IMAGE_TEXT.get(image_token, image_token)


def renders_typed_parts(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders typed content parts: a probe conversation (system, user,
    assistant; then user, assistant for templates that refuse a system turn) rendered with ``[{"type": "text",
    "text": t}]`` contents must equal its rendering with the plain strings ``t``. A template that raises on typed
    parts (string concatenation) or prints them differently (their repr) does not. When no probe renders even as
    plain strings, typed parts are assumed, and the real rendering reports the template's own error."""
    template = getattr(tokenizer, "chat_template", None)
    key = template if isinstance(template, str) else None
    if key is not None and key in _TYPED_SUPPORT:
        return _TYPED_SUPPORT[key]
    answer = True
    for turns in (_PROBE, _PROBE[1:]):
        try:
            as_text = _render(tokenizer, [{"role": r, "content": t} for r, t in turns])
        except Exception:  # noqa: BLE001 - any template failure: try the next probe
            continue
        try:
            typed = _render(tokenizer, [{"role": r, "content": [{"type": "text", "text": t}]} for r, t in turns])
        except Exception:  # noqa: BLE001
            typed = None
        answer = typed == as_text
        break
    if key is not None:
        _TYPED_SUPPORT[key] = answer
    return answer


def text_content_messages(messages: Sequence[Mapping[str, Any]], image_token: str) -> list[dict]:
    """`messages` with every list-valued content joined into one string, parts in order: a text part is its text,
    an image part `image_placeholder_text(image_token)`. String contents are kept as they are."""
    image_text = image_placeholder_text(image_token)
    out = []
    for i, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, (list, tuple)):
            pieces = []
            for part in content:
                kind = part.get("type") if isinstance(part, Mapping) else None
                if kind == "image":
                    pieces.append(image_text)
                elif kind == "text":
                    pieces.append(part.get("text") or "")
                else:
                    raise ChatTemplateError(f"message {i}: content part {part!r} has no plain-text form (the chat "
                                            "template takes only plain-text content)")
            message = {**message, "content": "".join(pieces)}
        out.append(dict(message))
    return out


def renderable_messages(tokenizer, messages: Sequence[Mapping[str, Any]], image_token: str,
                        **kwargs) -> tuple[list[dict], str]:
    """(the messages in the form the chat template takes, their rendering with `kwargs`): as they are when the
    template renders typed parts, else with plain-text contents (`text_content_messages`). Any template failure
    becomes a one-line `ChatTemplateError`."""
    messages = [dict(m) for m in messages]
    if renders_typed_parts(tokenizer):
        try:
            return messages, _render(tokenizer, messages, **kwargs)
        except Exception as e:  # noqa: BLE001 - jinja errors, TypeErrors, ... become one line
            raise ChatTemplateError(f"the chat template cannot render this conversation ({_one_line(e)})") from None
    as_text = text_content_messages(messages, image_token)
    try:
        return as_text, _render(tokenizer, as_text, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise ChatTemplateError(
            "the chat template renders neither typed content parts nor plain-text content "
            f"(plain text: {_one_line(e)})"
        ) from None


def _assistant_spans(tokenizer, messages: Sequence[Mapping[str, Any]], full: str,
                     only: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """Character spans [start, end) of assistant content (+ the closing eos token) in `full`; with `only`, of those
    assistant messages (indices into `messages`) alone.

    For assistant message i we render messages[:i+1] twice, once as is and once with the content replaced by a
    sentinel; the sentinel's surroundings (header before, closing tokens after) locate the content exactly, whatever
    the template does to whitespace. The rendering of messages[:i+1] must be a prefix of the full rendering (true
    for ChatML templates; templates that rewrite earlier turns, e.g. stripping reasoning, are refused).
    """
    spans = []
    eos = tokenizer.eos_token
    for i, message in enumerate(messages):
        if message.get("role") != "assistant" or (only is not None and i not in only):
            continue
        upto = _render(tokenizer, messages[: i + 1])
        probe = _render(tokenizer, [*messages[:i], {**message, "content": _SENTINEL}])
        head, sep, tail = probe.partition(_SENTINEL)
        if not sep or not (upto.startswith(head) and upto.endswith(tail)) or len(head) + len(tail) > len(upto):
            raise ValueError(f"cannot locate assistant message {i} in the chat template's output")
        if not full.startswith(upto):
            raise ValueError(
                f"the chat template renders messages[:{i + 1}] differently inside the full conversation (it "
                "rewrites earlier turns), so assistant tokens cannot be located"
            )
        start, end = len(head), len(upto) - len(tail)
        if eos and upto.startswith(eos, end):
            end += len(eos)
        spans.append((start, end))
    return spans


def _shift_for_markers(text: str, marker: str, replacement: str, positions: list[int]) -> tuple[str, list[int]]:
    """Replace every `marker` with `replacement` and map character `positions` into the new text."""
    starts, at = [], text.find(marker)
    while at >= 0:
        starts.append(at)
        at = text.find(marker, at + len(marker))
    grow = len(replacement) - len(marker)
    ends = np.array([s + len(marker) for s in starts], dtype=np.int64)
    mapped = [p + grow * int(np.searchsorted(ends, p, side="right")) for p in positions]
    return text.replace(marker, replacement), mapped


def format_conversation(
    tokenizer,
    messages: Sequence[Mapping[str, Any]],
    *,
    num_image_tokens: Sequence[int],
    image_token: str = "<|image_pad|>",
    add_generation_prompt: bool = False,
    max_length: int | None = None,
    loss_messages: Sequence[int] | None = None,
) -> FormattedConversation:
    """Render `messages` with the tokenizer's chat template, expand images, and build the masks.

    `loss_messages` restricts `assistant_mask` to those messages (indices into `messages`, each an assistant turn;
    default every assistant turn): a prompt/completion SFT row trains its completion, not few-shot turns before it.

    `num_image_tokens[k]` is the number of LLM tokens of the k-th image in rendering order (Qwen2.5-VL:
    grid_t*grid_h*grid_w/4; InternVL: tokens_per_tile * tiles). `image_token` is a single added token that is
    repeated in place (``<|image_pad|>``), or InternVL's ``<image>`` text marker. Raises ValueError when the number
    of placeholders differs from ``len(num_image_tokens)``, and `SequenceTooLongError` when the expanded length
    exceeds `max_length`.
    """
    counts = [int(n) for n in num_image_tokens]
    if any(n < 1 for n in counts):
        raise ValueError(f"every image needs at least one token, got num_image_tokens={counts}")
    messages = list(messages)
    if loss_messages is not None:
        bad = [i for i in loss_messages if not (0 <= i < len(messages) and messages[i].get("role") == "assistant")]
        if bad:
            raise ValueError(f"loss_messages {bad} are not indices of assistant messages")
    messages, text = renderable_messages(tokenizer, messages, image_token, add_generation_prompt=add_generation_prompt)
    try:
        spans = _assistant_spans(tokenizer, messages, text, loss_messages)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - the template failed on a prefix of the conversation
        raise ChatTemplateError(f"the chat template cannot render a prefix of this conversation ({_one_line(e)})"
                                ) from None

    vocab = tokenizer.get_vocab()
    if image_token == INTERNVL_IMAGE_MARKER:
        n_markers = text.count(INTERNVL_IMAGE_MARKER)
        if n_markers != len(counts):
            raise ValueError(
                f"rendered text has {n_markers} image placeholder(s) {image_token} but num_image_tokens has "
                f"{len(counts)} entries"
            )
        # One <IMG_CONTEXT> per image here; it is repeated at the token level below.
        flat = [p for span in spans for p in span]
        one_context = IMG_START + IMG_CONTEXT + IMG_END
        text_to_tokenize, flat = _shift_for_markers(text, INTERNVL_IMAGE_MARKER, one_context, flat)
        spans = list(zip(flat[::2], flat[1::2]))
        expand_token = IMG_CONTEXT
    else:
        text_to_tokenize, expand_token = text, image_token
    if expand_token not in vocab:
        raise ValueError(f"image token {expand_token!r} is not a single token of this tokenizer")
    expand_id = vocab[expand_token]

    enc = tokenizer(text_to_tokenize, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int32)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)

    is_image = ids == expand_id
    n_found = int(is_image.sum())
    if n_found != len(counts):
        raise ValueError(
            f"rendered text has {n_found} image placeholder(s) {expand_token} but num_image_tokens has "
            f"{len(counts)} entries"
        )
    mask = np.zeros(ids.shape, dtype=bool)
    for start, end in spans:  # a token overlapping [start, end) is an assistant token
        mask |= (offsets[:, 1] > start) & (offsets[:, 0] < end)
    mask &= ~is_image

    repeats = np.ones(ids.shape, dtype=np.int64)
    repeats[is_image] = counts
    length = int(repeats.sum())
    if max_length is not None and length > max_length:
        raise SequenceTooLongError(length, max_length)
    return FormattedConversation(
        input_ids=np.repeat(ids, repeats),
        assistant_mask=np.repeat(mask, repeats),
        mm_token_type_ids=np.repeat(is_image.astype(np.int32), repeats),
        image_token_counts=np.asarray(counts, dtype=np.int32),
        text=text,
    )


def _field(example, name: str):
    return getattr(example, name) if isinstance(example, FormattedConversation) else example.get(name)


def pad_batch(
    examples: Sequence[FormattedConversation | Mapping[str, np.ndarray]],
    pad_id: int,
    side: str = "right",
    bucket_sizes: Sequence[int] | None = None,
) -> dict[str, np.ndarray]:
    """Stack formatted conversations into (B, L) arrays, padding on `side`.

    L is the longest example, or with `bucket_sizes` the smallest bucket >= the longest example (so jit sees a few
    static shapes); ValueError if no bucket fits. Returns input_ids (int32, `pad_id` in padding), attention_mask
    (int32, 1 on real tokens), assistant_mask (bool), mm_token_type_ids (int32), and image bookkeeping:
    image_token_counts (all images of the batch in order, int32) and num_images (B,) int32.
    """
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    if not examples:
        raise ValueError("pad_batch needs at least one example")
    lengths = [len(_field(e, "input_ids")) for e in examples]
    longest = max(lengths)
    if bucket_sizes is None:
        width = longest
    else:
        fitting = [b for b in sorted(bucket_sizes) if b >= longest]
        if not fitting:
            raise ValueError(f"longest sequence has {longest} tokens; no bucket fits (buckets {sorted(bucket_sizes)})")
        width = fitting[0]

    batch = len(examples)
    out = {
        "input_ids": np.full((batch, width), pad_id, dtype=np.int32),
        "attention_mask": np.zeros((batch, width), dtype=np.int32),
        "assistant_mask": np.zeros((batch, width), dtype=bool),
        "mm_token_type_ids": np.zeros((batch, width), dtype=np.int32),
    }
    counts = []
    for row, (example, n) in enumerate(zip(examples, lengths)):
        cols = slice(0, n) if side == "right" else slice(width - n, width)
        out["input_ids"][row, cols] = _field(example, "input_ids")
        out["attention_mask"][row, cols] = 1
        for name in ("assistant_mask", "mm_token_type_ids"):
            value = _field(example, name)
            if value is not None:
                out[name][row, cols] = value
        image_counts = _field(example, "image_token_counts")
        counts.append(np.zeros(0, np.int32) if image_counts is None else np.asarray(image_counts, np.int32))
    out["image_token_counts"] = np.concatenate(counts).astype(np.int32)
    out["num_images"] = np.asarray([len(c) for c in counts], dtype=np.int32)
    return out
