"""The scoring benchmark (`skyjax bench --only score`): rows/s of a whole VL-RewardBench scoring job with a tiny
reward model, skyjax against transformers + PyTorch on the same weights, in one run.

Rows: VL-RewardBench's own rows when `data` names its data.jsonl (the images are not shipped with it, so stand-ins
of varied sizes are drawn for every image_path), otherwise synthetic rows whose query and response lengths follow
VL-RewardBench's length distribution (the percentiles below); the result says which (`rows_source`).
Model: Qwen2.5-VL with the value head, text hidden 64 x 2 layers, vision hidden 32 x 4 blocks, random weights, fp32.
skyjax: the whole job as `skyjax eval` runs it (RewardScorer: length-grouped token-budget batches), compiles
included, wall time from the first measurement to the last score. Reference: the Skywork card's recipe on
transformers' Qwen2_5_VLForConditionalGeneration, one conversation at a time (no padding), same inputs, value head on
the last token's final hidden state. `max_abs_diff` compares the two sets of scores.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np

# VL-RewardBench (1,250 rows): percentiles 0,5,10,20,...,90,95,99,100 of the characters of queries and responses.
_PCT = (0, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 99, 100)
_QUERY_CHARS = (6, 26, 33, 38, 38, 38, 46, 66, 111, 213, 312, 478, 1282, 3483)
_RESPONSE_CHARS = (1, 55, 99, 197, 380, 503, 577, 637, 712, 823, 1068, 1410, 2257, 3222)
_WORDS = "the a image shows of in and is with on left right red blue cat dog person table text two three".split()


def _text(rng, chars: int) -> str:
    out, n = [], 0
    while n < chars:
        w = _WORDS[rng.randint(len(_WORDS))]
        out.append(w)
        n += len(w) + 1
    return " ".join(out)[:max(chars, 1)]


def synthetic_rows(n: int, seed: int = 0) -> list[dict]:
    """VL-RewardBench-shaped rows (id, image_path, query, response pair, human_ranking) with its length spread."""
    rng = np.random.RandomState(seed)
    rows = []
    for i in range(n):
        q = int(np.interp(rng.uniform(0, 100), _PCT, _QUERY_CHARS))
        a, b = (int(np.interp(rng.uniform(0, 100), _PCT, _RESPONSE_CHARS)) for _ in range(2))
        rows.append({"id": f"RLAIF-V-{i}", "image_path": f"images/synthetic/{i}.png", "query": _text(rng, q),
                     "response": [_text(rng, a), _text(rng, b)], "human_ranking": [0, 1]})
    return rows


def _draw_images(rows: list[dict], root: Path) -> None:
    """A stand-in image for every image_path: random blocks, 200-1200 px a side (resized by the processor)."""
    from PIL import Image

    for i, row in enumerate(rows):
        path = root / row["image_path"]
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.RandomState(i)
        w, h = (int(x) for x in rng.randint(200, 1200, 2))
        small = rng.randint(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        Image.fromarray(small).resize((w, h), Image.NEAREST).save(path)


def build_tiny_reward_model(folder: Path, seed: int = 0, max_positions: int = 8192):
    """A random transformers Qwen2.5-VL (tiny) + value head saved as a reward folder; returns (model, head)."""
    import torch
    from safetensors.numpy import save_file
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from skyjax.data.qwen_vl_image import QwenVLImageConfig
    from skyjax.data.tokenizer import build_tiny_tokenizer, special_token_ids

    tok = build_tiny_tokenizer("qwen2_5_vl")
    ids = special_token_ids(tok)
    torch.manual_seed(seed)
    text = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=max_positions,
                rope_parameters={"rope_type": "default", "type": "mrope", "mrope_section": [2, 3, 3],
                                 "rope_theta": 10000.0},
                bos_token_id=None, eos_token_id=ids["eos"], pad_token_id=ids["pad"])
    vision = dict(depth=4, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=64,
                  fullatt_block_indexes=[1, 3], window_size=56, patch_size=14, temporal_patch_size=2,
                  spatial_merge_size=2, in_chans=3)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["image_pad"],
                              video_token_id=ids["video_pad"], vision_start_token_id=ids["vision_start"],
                              vision_end_token_id=ids["vision_end"])
    for c in (config, config.text_config, config.vision_config):
        c._attn_implementation = "eager"
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    QwenVLImageConfig(min_pixels=4 * 28 * 28, max_pixels=64 * 28 * 28).save(folder)
    rng = np.random.RandomState(seed)
    head = {"v_head.summary.weight": rng.normal(0, 0.5, (1, 64)).astype(np.float32),
            "v_head.summary.bias": np.array([0.3], np.float32)}
    save_file(head, str(folder / "value_head.safetensors"))
    return model, head


def _reference_scores(model, head, scorer, convs, log) -> tuple[np.ndarray, float]:
    """transformers, one conversation at a time: the same token ids and pixels skyjax sees, no padding."""
    import torch

    from skyjax.models.qwen2_5_vl_inputs import Buckets, prepare_vl_batch

    w, b = torch.as_tensor(head["v_head.summary.weight"][0]), float(head["v_head.summary.bias"][0])
    out = np.zeros(len(convs), np.float32)
    t0 = time.perf_counter()
    for i, conv in enumerate(convs):
        batch = prepare_vl_batch([conv.messages], [scorer._images(conv)], scorer.tokenizer, scorer.image_cfg,
                                 scorer.model.config.vision, buckets=Buckets(None, None, None))
        kw = dict(input_ids=torch.as_tensor(batch.input_ids, dtype=torch.long),
                  attention_mask=torch.as_tensor(batch.attention_mask.astype(np.int64)),
                  mm_token_type_ids=torch.as_tensor(batch.mm_token_type_ids, dtype=torch.long))
        if batch.real_pixel_values is not None:
            kw.update(pixel_values=torch.as_tensor(batch.real_pixel_values),
                      image_grid_thw=torch.as_tensor(batch.real_grid_thw, dtype=torch.long))
        with torch.no_grad():
            hidden = model.model(**kw).last_hidden_state[0, -1].float()
        out[i] = float(hidden @ w) + b
        if (i + 1) % 250 == 0:
            log(f"score: reference {i + 1}/{len(convs)} conversations, {time.perf_counter() - t0:.0f}s")
    return out, time.perf_counter() - t0


def run_score_bench(rows: int | None = None, data: str | None = None, reference_rows: int | None = None,
                    max_batch_tokens: int | None = None, torch_baseline: bool = True, log=print) -> dict:
    """Score `rows` VL-RewardBench rows (all when None) with skyjax and with the transformers reference (on the
    `reference_rows` rows spread evenly over the file (every k-th row: the same mix of lengths as the whole; all
    when None); rows/s and their ratio."""
    from skyjax.eval import vl_rewardbench
    from skyjax.eval.scorer import Conversation, RewardScorer
    from skyjax.data.records import parse_record

    with tempfile.TemporaryDirectory(prefix="skyjax-score-bench-") as tmp:
        tmp = Path(tmp)
        if data is not None and Path(data).is_file():
            raw = [json.loads(line) for line in Path(data).read_text().splitlines() if line.strip()]
            source = f"VL-RewardBench rows from {Path(data).name}, stand-in images"
        else:
            raw = synthetic_rows(rows or 1250)
            source = "synthetic rows with VL-RewardBench's length distribution (its data.jsonl was not given)"
        raw = raw[:rows] if rows else raw
        log(f"score: {len(raw)} rows: {source}")
        _draw_images(raw, tmp / "images")
        (tmp / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in raw))
        items = vl_rewardbench.load_vl_rewardbench(tmp / "data.jsonl", tmp / "images")
        records = vl_rewardbench.to_preference_records(items, tmp / "images")
        convs = []
        for n, row in enumerate(records):
            record = parse_record(row, kind="preference", line=n + 1)
            convs += [Conversation(record.conversation(s), tuple(record.images), f"row {n + 1}", (n, s))
                      for s in ("chosen", "rejected")]
        hf, head = build_tiny_reward_model(tmp / "rm")
        scorer = RewardScorer(tmp / "rm", mesh_shape=(1, -1, 1), dtype="float32", max_batch_tokens=max_batch_tokens,
                              progress=False)
        t0 = time.perf_counter()
        ours = scorer.score_conversations(convs)
        ours_s = time.perf_counter() - t0
        result = {"rows": len(raw), "conversations": len(convs), "rows_source": source,
                  "skyjax_s": ours_s, "skyjax_rows_per_s": len(raw) / ours_s, "compiles": scorer.compiles,
                  "max_batch_tokens": scorer.max_batch_tokens, "longest_tokens": int(max(
                      scorer.measure(c) for c in convs))}
        log(f"score: skyjax {len(raw)} rows in {ours_s:.1f}s ({result['skyjax_rows_per_s']:.2f} rows/s, "
            f"{scorer.compiles} compiles)")
        if torch_baseline:
            n_ref = len(raw) if reference_rows is None else min(reference_rows, len(raw))
            # rows spread over the file, not its first rows (a file's order is not random: VL-RewardBench's first
            # 250 rows are half as long as the average)
            picked = np.unique(np.linspace(0, len(raw) - 1, n_ref).round().astype(int))
            n_ref = len(picked)
            conv_idx = np.stack([2 * picked, 2 * picked + 1], axis=1).reshape(-1)
            ref, ref_s = _reference_scores(hf, head, scorer, [convs[i] for i in conv_idx], log)
            result.update(reference_rows=n_ref, reference_s=ref_s, reference_rows_per_s=n_ref / ref_s,
                          speedup=(len(raw) / ours_s) / (n_ref / ref_s),
                          max_abs_diff=float(np.max(np.abs(ref - ours[conv_idx]))),
                          reference_tokens_mean=float(np.mean([scorer.measure(convs[i]) for i in conv_idx])),
                          tokens_mean=float(np.mean([scorer.measure(c) for c in convs])))
            log(f"score: transformers {n_ref} rows in {ref_s:.1f}s ({result['reference_rows_per_s']:.2f} rows/s); "
                f"skyjax {result['speedup']:.2f}x, max |score diff| {result['max_abs_diff']:.2e}")
        result["config"] = dict(model="Qwen2.5-VL reward model, text 64 x 2 layers, vision 32 x 4 blocks, fp32",
                                reference="transformers eager, one conversation at a time, CPU torch",
                                rows=len(raw), reference_rows=result.get("reference_rows"),
                                max_batch_tokens=scorer.max_batch_tokens)
        return result
