"""JSONL record formats (README "Records"; the formats below) parsed into one normalised, frozen `Record`.

A line is one JSON object in TRL's conversational style::

    {"images": ["img/0.png"],
     "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}],
     "chosen": [{"role": "assistant", "content": "Red."}], "rejected": [{"role": "assistant", "content": "Blue."}]}

Rules (all checked; a violation is a `RecordError` naming the file, the 1-based line and the key):

- Allowed top-level keys: ``images, prompt, chosen, rejected, response, answer, id, meta``. Any other key is rejected
  (a typo such as ``"choosen"`` must not silently turn a preference row into a prompt-only row).
- ``prompt``: a string (shorthand for one user turn whose images are placed before the text) or a non-empty list of
  messages ``{"role": "system"|"user"|"assistant", "content": str | [part, ...]}``; a part is ``{"type": "text",
  "text": str}`` or ``{"type": "image"}`` (``"text": null`` is tolerated on image parts: `datasets` exports add it).
  The number of image parts in the prompt must equal ``len(images)``.
- ``chosen`` / ``rejected`` / ``response``: a string (shorthand for one assistant turn) or a list of assistant
  messages; images may only appear in the prompt. ``chosen`` and ``rejected`` come together.
- ``images``: list of path strings, resolved against the JSONL file's folder (absolute paths and URLs such as
  ``gs://...`` are kept). Existence is not checked here: image loading reports missing files.
- ``answer``: ground truth for generation/RL rows; a string or a number (stored as its string).
- ``id`` (string or integer) and ``meta`` (object) are passed through untouched.

SFT rows (TRL's two dataset styles) come in two forms:

- conversational: ``{"images": [...], "messages": [{"role": ..., "content": ...}, ...]}``: the whole conversation;
  every assistant turn is trained. Image parts may sit in system/user turns only; their number must equal
  ``len(images)``. ``messages`` excludes ``prompt`` and every completion key.
- prompt/completion: ``{"images": [...], "prompt": ..., "completion": ...}``: ``completion`` is a string (one
  assistant turn) or a list of assistant messages; only the completion is trained (assistant turns inside the
  prompt are context).

Kinds: ``preference`` needs chosen+rejected; ``score`` needs response, or chosen+rejected (scored as a pair), not
both; ``generate`` needs only prompt; ``sft`` needs ``messages`` with an assistant turn, or prompt+completion; ``any``
accepts every valid combination. Every kind but ``sft`` needs ``prompt``.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Mapping

from skyjax.errors import UserError

__all__ = [
    "ALLOWED_KEYS",
    "ContentPart",
    "Message",
    "Record",
    "RecordError",
    "RecordReader",
    "parse_record",
    "read_jsonl_records",
]

ALLOWED_KEYS = ("images", "prompt", "messages", "chosen", "rejected", "response", "completion", "answer", "id", "meta")
ROLES = ("system", "user", "assistant")
KINDS = ("preference", "score", "generate", "sft", "any")
COMPLETION_KEYS = ("chosen", "rejected", "response", "completion")


class RecordError(UserError, ValueError):
    """A bad record. `reason` is a short category used for skip counts: json, unknown_key, type, image_count,
    missing_key, conflict."""

    def __init__(self, source: str, line: int, key: str | None, reason: str, detail: str):
        self.source, self.line, self.key, self.reason, self.detail = source, line, key, reason, detail
        where = f"{source}:{line}"
        super().__init__(f"{where}: key {key!r}: {detail}" if key is not None else f"{where}: {detail}")


@dataclass(frozen=True)
class ContentPart:
    """One part of a list-valued message content: text, or an image placeholder (the pixels live in `images`)."""

    type: Literal["text", "image"]
    text: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"type": "image"} if self.type == "image" else {"type": "text", "text": self.text}


@dataclass(frozen=True)
class Message:
    """A chat turn; `content` keeps the record's form: a string, or a tuple of parts."""

    role: str
    content: str | tuple[ContentPart, ...]

    @property
    def num_images(self) -> int:
        return 0 if isinstance(self.content, str) else sum(p.type == "image" for p in self.content)

    def to_dict(self) -> dict[str, Any]:
        """The transformers chat-template form: ``{"role", "content": str | [part dicts]}``."""
        content = self.content if isinstance(self.content, str) else [p.to_dict() for p in self.content]
        return {"role": self.role, "content": content}


@dataclass(frozen=True)
class Record:
    """One normalised row. Completions that a row lacks are None; `images` are resolved paths."""

    images: tuple[str, ...]
    prompt: tuple[Message, ...]  # empty for a conversational SFT row (its turns are in `messages`)
    chosen: tuple[Message, ...] | None = None
    rejected: tuple[Message, ...] | None = None
    response: tuple[Message, ...] | None = None
    completion: tuple[Message, ...] | None = None
    messages: tuple[Message, ...] | None = None
    answer: str | None = None
    id: str | int | None = None
    meta: dict[str, Any] | None = field(default=None, hash=False)
    source: str = "<memory>"
    line: int = 0

    @property
    def is_pair(self) -> bool:
        return self.chosen is not None

    @property
    def is_sft(self) -> bool:
        return self.messages is not None or self.completion is not None

    def sft_conversation(self) -> tuple[list[dict], tuple[int, ...] | None]:
        """(chat-template messages, indices of the trained assistant messages; None = every assistant message)."""
        if self.messages is not None:
            return [m.to_dict() for m in self.messages], None
        if self.completion is None:
            raise ValueError(f"{self.source}:{self.line}: record is not an SFT row (no 'messages' or 'completion')")
        n = len(self.prompt)
        return self.conversation("completion"), tuple(range(n, n + len(self.completion)))

    def conversation(self, completion: Literal["chosen", "rejected", "response", "completion"] | None = None
                     ) -> list[dict]:
        """Prompt (+ the named completion) as a list of chat-template message dicts."""
        messages = list(self.prompt)
        if completion is not None:
            turns = getattr(self, completion)
            if turns is None:
                raise ValueError(f"{self.source}:{self.line}: record has no {completion!r}")
            messages += turns
        return [m.to_dict() for m in messages]


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


class _Ctx:
    """Where a record came from, to build errors."""

    def __init__(self, source: str, line: int):
        self.source, self.line = source, line

    def error(self, key: str | None, reason: str, detail: str) -> RecordError:
        return RecordError(self.source, self.line, key, reason, detail)


def _parse_part(ctx: _Ctx, key: str, part: Any) -> ContentPart:
    if not isinstance(part, Mapping):
        raise ctx.error(key, "type", f"a content part must be an object, got {_type_name(part)}")
    kind = part.get("type")
    if kind == "text":
        extra = set(part) - {"type", "text"}
        text = part.get("text")
        if not isinstance(text, str):
            raise ctx.error(key, "type", f"a text part needs a string 'text', got {_type_name(text)}")
    elif kind == "image":
        extra = set(part) - {"type", "text"}
        if part.get("text") is not None:
            raise ctx.error(key, "type", "an image part must not carry text")
    else:
        raise ctx.error(key, "type", f"content part type must be 'text' or 'image', got {kind!r}")
    if extra:
        raise ctx.error(
            key, "unknown_key",
            f"unknown content-part keys {sorted(extra)} (allowed: type, text; image paths go in top-level 'images')",
        )
    return ContentPart(kind, part.get("text") if kind == "text" else None)


def _parse_message(ctx: _Ctx, key: str, msg: Any, roles: tuple[str, ...]) -> Message:
    if not isinstance(msg, Mapping):
        raise ctx.error(key, "type", f"a message must be an object, got {_type_name(msg)}")
    extra = set(msg) - {"role", "content"}
    if extra:
        raise ctx.error(key, "unknown_key", f"unknown message keys {sorted(extra)} (allowed: role, content)")
    if "role" not in msg or "content" not in msg:
        raise ctx.error(key, "missing_key", "a message needs both 'role' and 'content'")
    role = msg["role"]
    if role not in roles:
        raise ctx.error(key, "type", f"role must be one of {list(roles)}, got {role!r}")
    content = msg["content"]
    if isinstance(content, str):
        return Message(role, content)
    if not isinstance(content, list):
        raise ctx.error(key, "type", f"content must be a string or a list of parts, got {_type_name(content)}")
    return Message(role, tuple(_parse_part(ctx, key, p) for p in content))


def _parse_turns(ctx: _Ctx, key: str, value: Any, roles: tuple[str, ...], shorthand_role: str) -> tuple[Message, ...]:
    if isinstance(value, str):
        return (Message(shorthand_role, value),)
    if not isinstance(value, list):
        raise ctx.error(key, "type", f"expected a string or a list of messages, got {_type_name(value)}")
    if not value:
        raise ctx.error(key, "type", "expected at least one message, got an empty list")
    return tuple(_parse_message(ctx, key, m, roles) for m in value)


def _resolve_image(base_dir: str | None, path: str) -> str:
    if "://" in path or base_dir is None:  # URLs (gs://, https://) are not filesystem-relative
        return path
    return os.path.normpath(os.path.join(base_dir, path))


def parse_record(
    obj: Any,
    *,
    kind: str = "any",
    base_dir: str | os.PathLike | None = None,
    source: str = "<memory>",
    line: int = 0,
) -> Record:
    """Validate one decoded JSON object and normalise it into a `Record` (see the module docstring for the rules)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    ctx = _Ctx(source, line)
    if not isinstance(obj, Mapping):
        raise ctx.error(None, "type", f"a record must be a JSON object, got {_type_name(obj)}")
    unknown = [k for k in obj if k not in ALLOWED_KEYS]
    if unknown:
        raise ctx.error(unknown[0], "unknown_key", f"unknown record field(s) {unknown}; allowed: {list(ALLOWED_KEYS)}")

    images = obj.get("images", [])
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise ctx.error("images", "type", f"expected a list of non-empty path strings, got {images!r}")
    base = None if base_dir is None else os.fspath(base_dir)
    resolved = tuple(_resolve_image(base, p) for p in images)

    if "messages" in obj:
        return _parse_conversation(ctx, obj, kind, resolved)
    if "prompt" not in obj:
        hint = " (or 'messages')" if kind in ("sft", "any") else ""
        raise ctx.error("prompt", "missing_key", f"missing required key 'prompt'{hint} (kind {kind!r})")
    raw_prompt = obj["prompt"]
    if isinstance(raw_prompt, str):
        # Shorthand: one user turn, images first (so the placeholder count matches by construction).
        parts = tuple(ContentPart("image") for _ in resolved)
        prompt = (Message("user", parts + (ContentPart("text", raw_prompt),) if parts else raw_prompt),)
    else:
        prompt = _parse_turns(ctx, "prompt", raw_prompt, ROLES, "user")
        n_placeholders = sum(m.num_images for m in prompt)
        if n_placeholders != len(resolved):
            raise ctx.error(
                "prompt", "image_count",
                f"the prompt has {n_placeholders} {{'type': 'image'}} placeholder(s) but 'images' lists "
                f"{len(resolved)} path(s)",
            )

    completions: dict[str, tuple[Message, ...] | None] = {}
    for key in COMPLETION_KEYS:
        if key not in obj:
            completions[key] = None
            continue
        turns = _parse_turns(ctx, key, obj[key], ("assistant",), "assistant")
        if any(m.num_images for m in turns):
            raise ctx.error(key, "image_count", "images may only appear in the prompt")
        completions[key] = turns

    has_chosen, has_rejected = completions["chosen"] is not None, completions["rejected"] is not None
    if has_chosen != has_rejected:
        missing = "rejected" if has_chosen else "chosen"
        raise ctx.error(missing, "missing_key", f"'chosen' and 'rejected' come together; missing {missing!r}")
    has_response = completions["response"] is not None
    if completions["completion"] is not None:
        other = "response" if has_response else "chosen" if has_chosen else None
        if other is not None:
            raise ctx.error("completion", "conflict", f"an SFT row's 'completion' excludes {other!r}")
        if kind not in ("sft", "any"):
            raise ctx.error("completion", "conflict", f"kind {kind!r} does not take 'completion' (SFT rows only)")
    elif kind == "sft":
        raise ctx.error("completion", "missing_key", "kind 'sft' needs 'messages', or 'prompt' and 'completion'")
    if kind == "preference" and not has_chosen:
        raise ctx.error("chosen", "missing_key", "kind 'preference' needs 'chosen' and 'rejected'")
    if kind == "score":
        if not (has_chosen or has_response):
            raise ctx.error("response", "missing_key", "kind 'score' needs 'response', or 'chosen' and 'rejected'")
        if has_chosen and has_response:
            raise ctx.error("response", "conflict", "kind 'score' takes 'response' or a chosen/rejected pair, not both")

    return Record(images=resolved, prompt=prompt, **_passthrough(ctx, obj), source=source, line=line, **completions)


def _parse_conversation(ctx: _Ctx, obj: Mapping, kind: str, images: tuple[str, ...]) -> Record:
    """A conversational SFT row: ``messages`` holds every turn (and is the only conversation key)."""
    if kind not in ("sft", "any"):
        raise ctx.error("messages", "conflict", f"kind {kind!r} does not take 'messages' (SFT rows only)")
    others = [k for k in ("prompt", *COMPLETION_KEYS) if k in obj]
    if others:
        raise ctx.error("messages", "conflict", f"'messages' holds the whole conversation; drop {others}")
    raw = obj["messages"]
    if not isinstance(raw, list):
        raise ctx.error("messages", "type", f"expected a list of messages, got {_type_name(raw)}")
    messages = _parse_turns(ctx, "messages", raw, ROLES, "user")
    if any(m.num_images for m in messages if m.role == "assistant"):
        raise ctx.error("messages", "image_count", "images may only appear in system and user turns")
    n_placeholders = sum(m.num_images for m in messages)
    if n_placeholders != len(images):
        raise ctx.error("messages", "image_count",
                        f"the messages have {n_placeholders} {{'type': 'image'}} placeholder(s) but 'images' lists "
                        f"{len(images)} path(s)")
    if not any(m.role == "assistant" for m in messages):
        raise ctx.error("messages", "missing_key", "an SFT conversation needs at least one assistant turn")
    return Record(images=images, prompt=(), messages=messages, **_passthrough(ctx, obj), source=ctx.source,
                  line=ctx.line)


def _passthrough(ctx: _Ctx, obj: Mapping) -> dict[str, Any]:
    """The checked ``answer``, ``id`` and ``meta`` fields."""
    answer = obj.get("answer")
    if answer is not None:
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise ctx.error("answer", "type", f"expected a string or a number, got {_type_name(answer)}")
        answer = str(answer)
    rid = obj.get("id")
    if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (str, int))):
        raise ctx.error("id", "type", f"expected a string or an integer, got {_type_name(rid)}")
    meta = obj.get("meta")
    if meta is not None and not isinstance(meta, Mapping):
        raise ctx.error("meta", "type", f"expected an object, got {_type_name(meta)}")
    return {"answer": answer, "id": rid, "meta": None if meta is None else dict(meta)}


class RecordReader:
    """Iterable over the records of one JSONL file.

    With ``on_error="skip"`` bad lines are dropped; `skipped` counts them by `RecordError.reason` and `errors` keeps
    the first `max_kept_errors` errors (None: every one). Counts are reset at the start of each pass over the file.
    Blank lines are ignored (they are not records).
    """

    def __init__(self, path: str | os.PathLike, kind: str = "any", on_error: str = "raise",
                 max_kept_errors: int | None = 20):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.path = os.fspath(path)
        self.kind, self.on_error, self.max_kept_errors = kind, on_error, max_kept_errors
        self.skipped: Counter[str] = Counter()
        self.errors: list[RecordError] = []
        self.num_read = 0

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def __iter__(self) -> Iterator[Record]:
        self.skipped, self.errors, self.num_read = Counter(), [], 0
        base_dir = os.path.dirname(os.path.abspath(self.path))
        with open(self.path, encoding="utf-8") as f:
            for lineno, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                try:
                    try:
                        obj = json.loads(text)
                    except json.JSONDecodeError as e:
                        detail = f"malformed JSON: {e.msg} (column {e.colno})"
                        raise RecordError(self.path, lineno, None, "json", detail) from None
                    record = parse_record(obj, kind=self.kind, base_dir=base_dir, source=self.path, line=lineno)
                except RecordError as e:
                    if self.on_error == "raise":
                        raise
                    self.skipped[e.reason] += 1
                    if self.max_kept_errors is None or len(self.errors) < self.max_kept_errors:
                        self.errors.append(e)
                    continue
                self.num_read += 1
                yield record


def read_jsonl_records(
    path: str | os.PathLike,
    kind: Literal["preference", "score", "generate", "sft", "any"] = "any",
    on_error: Literal["raise", "skip"] = "raise",
) -> RecordReader:
    """Records of a JSONL file, lazily. Iterate the returned `RecordReader`; afterwards ``.skipped`` (a Counter by
    reason), ``.num_skipped`` and ``.errors`` describe what ``on_error="skip"`` dropped."""
    return RecordReader(path, kind=kind, on_error=on_error)
