"""JSONL record parsing: every shorthand, path resolution, and errors that name file, line and key."""

import dataclasses
import json
import os

import pytest

from skyjax.data.records import (
    ALLOWED_KEYS,
    ContentPart,
    Message,
    RecordError,
    parse_record,
    read_jsonl_records,
)

FULL = {
    "images": ["img/0.png"],
    "prompt": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the square?"}]},
    ],
    "chosen": [{"role": "assistant", "content": "Red."}],
    "rejected": [{"role": "assistant", "content": "Blue."}],
}


def write_jsonl(path, rows):
    """Rows are dicts (dumped) or raw strings (written as is, for malformed lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_full_preference_row_and_path_resolution(tmp_path):
    sub = tmp_path / "data"
    sub.mkdir()
    path = write_jsonl(sub / "train.jsonl", [FULL])
    (record,) = list(read_jsonl_records(path, kind="preference"))
    assert record.images == (os.path.join(str(sub), "img", "0.png"),)
    question = ContentPart("text", "What colour is the square?")
    assert record.prompt == (Message("user", (ContentPart("image"), question)),)
    assert record.chosen == (Message("assistant", "Red."),)
    assert record.rejected == (Message("assistant", "Blue."),)
    assert record.response is None and record.answer is None and record.is_pair
    assert (record.source, record.line) == (str(path), 1)
    assert record.conversation("chosen") == FULL["prompt"] + FULL["chosen"]
    assert record.conversation() == FULL["prompt"]
    with pytest.raises(ValueError, match="no 'response'"):
        record.conversation("response")
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.answer = "x"
    hash(record)


def test_relative_path_from_another_cwd(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "a.jsonl", [{"images": ["../x.png", "/abs/y.png", "gs://b/z.png"], "prompt": "hi"}])
    monkeypatch.chdir("/")
    (record,) = list(read_jsonl_records(os.path.relpath(path, "/")))
    assert record.images == (str(tmp_path.parent / "x.png"), "/abs/y.png", "gs://b/z.png")


def test_string_shorthands():
    record = parse_record({"images": ["a.png", "b.png"], "prompt": "Compare.", "chosen": "Same.", "rejected": "No."},
                          kind="preference", base_dir="/d")
    assert record.images == ("/d/a.png", "/d/b.png")
    # Images are placed before the text, so the placeholder count always matches.
    parts = (ContentPart("image"), ContentPart("image"), ContentPart("text", "Compare."))
    assert record.prompt == (Message("user", parts),)
    assert record.chosen == (Message("assistant", "Same."),) and record.rejected == (Message("assistant", "No."),)
    assert record.conversation("rejected")[0]["content"] == [{"type": "image"}, {"type": "image"},
                                                              {"type": "text", "text": "Compare."}]
    text_only = parse_record({"prompt": "Hi"})
    assert text_only.images == () and text_only.prompt == (Message("user", "Hi"),)


def test_score_generate_and_passthrough():
    single = parse_record({"prompt": "Q", "response": "A", "id": 7, "meta": {"src": "x"}}, kind="score")
    assert single.response == (Message("assistant", "A"),) and not single.is_pair
    assert (single.id, single.meta) == (7, {"src": "x"})
    pair = parse_record({"prompt": "Q", "chosen": "A", "rejected": "B"}, kind="score")
    assert pair.is_pair and pair.response is None
    gen = parse_record({"prompt": [{"role": "system", "content": "Think."}, {"role": "user", "content": "1+1?"}],
                        "answer": 2, "id": "q1"}, kind="generate")
    assert gen.answer == "2" and gen.id == "q1" and gen.prompt[0] == Message("system", "Think.")
    # `datasets` exports give image parts "text": null; tolerated.
    tolerant = parse_record({"images": ["i.png"], "prompt": [{"role": "user", "content": [
        {"type": "image", "text": None}, {"type": "text", "text": "Hi"}]}]}, base_dir="/d")
    assert tolerant.prompt[0].content[0] == ContentPart("image")
    # Multi-turn completions are kept.
    turns = [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": [{"type": "text", "text": "b"}]}]
    multi = parse_record({"prompt": "Q", "response": turns})
    assert multi.response[1] == Message("assistant", (ContentPart("text", "b"),))


# (kind, bad row, key named in the error (None: no key), reason, fragment of the message)
BAD_ROWS = [
    ("any", "{not json", None, "json", "malformed JSON"),
    ("any", "[1, 2]", None, "type", "must be a JSON object"),
    ("any", {"prompt": "Q", "choosen": "A"}, "choosen", "unknown_key", "allowed: ['images', 'prompt'"),
    ("any", {"images": "a.png", "prompt": "Q"}, "images", "type", "list of non-empty path strings"),
    ("any", {"images": [""], "prompt": "Q"}, "images", "type", "non-empty"),
    ("any", {"prompt": 3}, "prompt", "type", "got int"),
    ("any", {"prompt": []}, "prompt", "type", "at least one message"),
    ("any", {"prompt": [{"role": "robot", "content": "x"}]}, "prompt", "type", "role must be one of"),
    ("any", {"prompt": [{"role": "user"}]}, "prompt", "missing_key", "'role' and 'content'"),
    ("any", {"prompt": [{"role": "user", "content": "x", "name": "n"}]}, "prompt", "unknown_key", "['name']"),
    ("any", {"prompt": [{"role": "user", "content": 5}]}, "prompt", "type", "string or a list of parts"),
    ("any", {"prompt": [{"role": "user", "content": [{"type": "audio"}]}]}, "prompt", "type", "'text' or 'image'"),
    ("any", {"prompt": [{"role": "user", "content": [{"type": "text"}]}]}, "prompt", "type", "string 'text'"),
    ("any", {"images": ["a.png"], "prompt": [{"role": "user", "content": [{"type": "image", "image": "a.png"}]}]},
     "prompt", "unknown_key", "top-level 'images'"),
    ("any", {"images": ["a.png", "b.png"], "prompt": FULL["prompt"]}, "prompt", "image_count",
     "1 {'type': 'image'} placeholder(s) but 'images' lists 2"),
    ("any", {"prompt": FULL["prompt"]}, "prompt", "image_count", "lists 0"),
    ("any", {"images": [], "answer": "x"}, "prompt", "missing_key", "missing required key 'prompt'"),
    ("any", {"prompt": "Q", "chosen": "A"}, "rejected", "missing_key", "come together"),
    ("any", {"prompt": "Q", "chosen": [{"role": "user", "content": "A"}], "rejected": "B"}, "chosen", "type",
     "['assistant']"),
    ("any", {"prompt": "Q", "response": [{"role": "assistant", "content": [{"type": "image"}]}]}, "response",
     "image_count", "only appear in the prompt"),
    ("any", {"prompt": "Q", "answer": True}, "answer", "type", "got bool"),
    ("any", {"prompt": "Q", "id": 1.5}, "id", "type", "got float"),
    ("any", {"prompt": "Q", "meta": [1]}, "meta", "type", "expected an object"),
    ("preference", {"prompt": "Q", "response": "A"}, "chosen", "missing_key", "needs 'chosen' and 'rejected'"),
    ("score", {"prompt": "Q"}, "response", "missing_key", "needs 'response'"),
    ("score", {"prompt": "Q", "response": "A", "chosen": "B", "rejected": "C"}, "response", "conflict", "not both"),
]


@pytest.mark.parametrize("kind,row,key,reason,fragment", BAD_ROWS)
def test_errors_name_file_line_and_key(tmp_path, kind, row, key, reason, fragment):
    good = {"prompt": "Q", "response": "A"} if kind == "score" else {"prompt": "Q", "chosen": "A", "rejected": "B"}
    # Line 1 good, line 2 blank, line 3 bad: line numbers count physical lines.
    path = write_jsonl(tmp_path / "rows.jsonl", [good, "", row])
    reader = read_jsonl_records(path, kind=kind)
    with pytest.raises(RecordError) as info:
        list(reader)
    err = info.value
    message = str(err)
    assert message.startswith(f"{path}:3: ")
    assert (err.source, err.line, err.key, err.reason) == (str(path), 3, key, reason)
    if key is not None:
        assert f"key {key!r}" in message
    assert fragment in message


def test_unknown_field_lists_every_allowed_key(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "Q", "score": 1.0, "extra": 2}])
    with pytest.raises(RecordError, match="unknown record field") as info:
        list(read_jsonl_records(path))
    assert "['score', 'extra']" in str(info.value)
    assert all(repr(k) in str(info.value) for k in ALLOWED_KEYS)


def test_skip_mode_counts_reasons(tmp_path):
    rows = [
        FULL,
        "{broken",
        {"prompt": "Q", "choosen": "A"},
        {"images": ["a.png"], "prompt": [{"role": "user", "content": "no image"}], "chosen": "A", "rejected": "B"},
        {"prompt": "Q", "chosen": "A", "rejected": "B"},
        {"prompt": "Q", "response": "A"},  # valid row, but not a preference row
        "{also broken",
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    reader = read_jsonl_records(path, kind="preference", on_error="skip")
    records = list(reader)
    assert [r.line for r in records] == [1, 5]
    assert reader.skipped == {"json": 2, "unknown_key": 1, "image_count": 1, "missing_key": 1}
    assert reader.num_skipped == 5 and reader.num_read == 2
    assert [e.line for e in reader.errors] == [2, 3, 4, 6, 7]
    # A second pass recounts instead of accumulating.
    assert len(list(reader)) == 2 and reader.num_skipped == 5
    with pytest.raises(RecordError, match=r":2: malformed JSON"):
        list(read_jsonl_records(path, kind="preference"))


def test_bad_arguments(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "Q"}])
    with pytest.raises(ValueError, match="kind"):
        read_jsonl_records(path, kind="pairs")
    with pytest.raises(ValueError, match="on_error"):
        read_jsonl_records(path, on_error="ignore")
    with pytest.raises(ValueError, match="kind"):
        parse_record({"prompt": "Q"}, kind="dpo")
