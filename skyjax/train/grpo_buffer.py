"""What kind grpo does about groups whose rewards are all equal (their advantages vanish, so they teach nothing):
R1V2's Selective Sample Buffer (`rollout.buffer`) and DAPO's dynamic sampling (`rollout.dynamic_sampling`).
docs/grpo.md describes both for users; this is how they work.

Selective Sample Buffer (`SampleBuffer`, used by `mix_buffer`), once per rollout, on this host's rows:

    1. evict: rows older than `max_staleness` optimizer steps, or already trained on `max_uses` times, leave;
    2. draw: the fresh batch's rows whose advantage is zero (at most `max_fraction` of the batch) are replaced by
       buffered rows drawn without replacement with probability proportional to |advantage| (Efraimidis-Spirakis
       keys u^(1/|A|) on a generator seeded by (rollout.seed, the rollout's index, the host)); a buffered row goes
       to the first free slot whose micro-batch still fits the largest tile bucket (else it waits);
    3. admit: the fresh rows with a non-zero advantage and at least one counted completion token join the buffer
       (their completion tokens, the sampler's log-probs, their advantage, the step that made them, and their
       prompt's tokens and tiles, shared by the prompt's rows), the oldest leave beyond `capacity`.

A buffered row keeps the sampler's log-probs of ITS rollout as pi_old and its advantage from ITS group: the clipped
surrogate's ratio pi_theta / pi_old then importance-corrects for the policy having moved since (and the clip bounds
how far a stale row can push), as PPO does for its own stale minibatches. They are not recomputed with the current
policy: that would make the ratio 1 and train on another policy's samples as if they were on-policy.

The shapes stay those of a fresh batch: the same rows, the completion width max_new_tokens; only the prompt width
may grow to the sequence bucket of a longer buffered prompt (the prompts are left-padded, so extra padding moves no
position), and the tiles of each micro-batch are re-packed to their tile bucket, as a fresh batch's are.

The rollout metrics of a row (reward, length, truncation, zero-std) stay those of the fresh rollout; what the step
trains on is logged as `effective_fraction` (rows with A != 0, after the buffer), `effective_fraction_fresh`
(before it), `buffer_fraction` (rows from the buffer), and the source's `buffer/size`, `buffer/used`,
`buffer/staleness` (mean steps behind of the rows used) and `buffer/evicted`.

Dynamic sampling (`dynamic_sampling`): while fewer than data.batch_size groups have rewards that differ, another
prompt batch is drawn, sampled and scored (at most `max_draws` batches per step, the first included); the step
trains on the first data.batch_size such groups in draw order, their prompts prepared again as one batch. When the
cap is hit (or the prompts run out) the batch is completed with the first constant-reward groups drawn and a line
is logged. On
several hosts every host draws as long as any host needs to (the sampler runs collectives).

The buffer is part of the rollout source's checkpointed state (JSON: arrays as base64, prompts as their records;
a prompt's tokens and tiles are prepared again from its record and images on restore, bit for bit).
"""

from __future__ import annotations

import base64
import dataclasses
import math
from typing import Any, Callable, Sequence

import numpy as np

from skyjax.config import ConfigError
from skyjax.data.records import ContentPart, Message, Record

ADVANTAGE_EPS = 1e-6  # |A| at or below this is "zero" (a constant group's advantage is 0 / (0 + eps) up to rounding)

# per-token arrays of a rollout batch [rows, S] the buffer knows how to rebuild (skyjax.train.grpo.build_batch)
SEQ_KEYS = ("input_ids", "attention_mask", "completion", "old_logps")


def effective_rows(advantages, zero_std=None) -> np.ndarray:
    """bool per row: the advantage is non-zero (and, given `zero_std`, its group's rewards differ)."""
    eff = np.abs(np.asarray(advantages, np.float32)) > ADVANTAGE_EPS
    if zero_std is not None:
        eff &= np.asarray(zero_std) == 0
    return eff


# --- the buffer ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class BufferedPrompt:
    record: Record
    ids: np.ndarray  # [L] int32: the prompt's tokens, no padding
    tiles: np.ndarray | None  # [t, 3, s, s] float32: its image tiles (None: no images)


@dataclasses.dataclass
class BufferedRow:
    uid: int
    prompt: str  # key into SampleBuffer.prompts
    row_id: str  # the prompt's file:line
    ids: np.ndarray  # [N] int32: the completion part of the training row (padding after the stop)
    live: np.ndarray  # [N] bool: its attention mask
    completion: np.ndarray  # [N] bool: the tokens that count
    old_logps: np.ndarray  # [N] float32: the sampler's raw log-probs at generation time (pi_old)
    advantage: float
    step: int  # the optimizer step whose parameters sampled it
    uses: int = 0


class SampleBuffer:
    """R1V2's selective sample buffer (see the module docstring); `cfg` is rollout.buffer."""

    def __init__(self, cfg, seed: int = 0):
        self.cfg, self.seed = cfg, seed
        self.rows: list[BufferedRow] = []  # oldest first
        self.prompts: dict[str, BufferedPrompt] = {}
        self.next_uid = 0

    def __len__(self) -> int:
        return len(self.rows)

    def evict(self, step: int) -> int:
        """Drop rows more than max_staleness steps behind `step` or used max_uses times; returns how many left."""
        keep = [r for r in self.rows if step - r.step <= self.cfg.max_staleness and r.uses < self.cfg.max_uses]
        dropped = len(self.rows) - len(keep)
        self.rows = keep
        self._forget_prompts()
        return dropped

    def draw(self, k: int, rng: np.random.Generator) -> list[int]:
        """Indices of min(k, len) rows drawn without replacement, each draw with probability proportional to
        |advantage| among the rows not drawn yet (Efraimidis-Spirakis: the k largest u^(1/w))."""
        k = min(k, len(self.rows))
        if k <= 0:
            return []
        w = np.array([abs(r.advantage) for r in self.rows], np.float64)
        u = 1.0 - rng.random(len(w))  # (0, 1]
        keys = np.log(u) / np.maximum(w, 1e-30)
        return np.argsort(-keys, kind="stable")[:k].tolist()

    def add(self, record: Record, ids: np.ndarray, tiles, rows: Sequence[dict]) -> None:
        """Admit one prompt's rows (dicts of BufferedRow's fields but uid and prompt), then keep `capacity`."""
        if not rows:
            return
        key = f"p{self.next_uid}"
        self.prompts[key] = BufferedPrompt(record, np.asarray(ids, np.int32), None if tiles is None else
                                           np.asarray(tiles, np.float32))
        for fields in rows:
            self.rows.append(BufferedRow(uid=self.next_uid, prompt=key, **fields))
            self.next_uid += 1
        if len(self.rows) > self.cfg.capacity:
            self.rows = self.rows[len(self.rows) - self.cfg.capacity:]
            self._forget_prompts()

    def _forget_prompts(self) -> None:
        used = {r.prompt for r in self.rows}
        self.prompts = {k: v for k, v in self.prompts.items() if k in used}

    # --- checkpointed state (JSON) ----------------------------------------------------------------------------

    def get_state(self) -> dict:
        rows = [{"uid": r.uid, "prompt": r.prompt, "row_id": r.row_id, "ids": _encode(r.ids), "live": _encode(r.live),
                 "completion": _encode(r.completion), "old_logps": _encode(r.old_logps),
                 "advantage": float(r.advantage), "step": int(r.step), "uses": int(r.uses)} for r in self.rows]
        return {"rows": rows, "prompts": {k: record_to_json(p.record) for k, p in self.prompts.items()},
                "next_uid": self.next_uid}

    def set_state(self, saved: dict | None, prepare: Callable[[Record], tuple[np.ndarray, Any]]) -> None:
        """Restore `get_state`'s dict; `prepare(record) -> (prompt ids, tiles)` rebuilds each prompt's inputs."""
        self.rows, self.prompts, self.next_uid = [], {}, 0
        if not saved:
            return
        for key, rec in saved["prompts"].items():
            record = record_from_json(rec)
            ids, tiles = prepare(record)
            self.prompts[key] = BufferedPrompt(record, np.asarray(ids, np.int32), tiles)
        for r in saved["rows"]:
            self.rows.append(BufferedRow(uid=int(r["uid"]), prompt=r["prompt"], row_id=r["row_id"],
                                         ids=_decode(r["ids"]), live=_decode(r["live"]),
                                         completion=_decode(r["completion"]), old_logps=_decode(r["old_logps"]),
                                         advantage=float(r["advantage"]), step=int(r["step"]), uses=int(r["uses"])))
        self.next_uid = int(saved["next_uid"])

    # --- mixing into a batch ------------------------------------------------------------------------------------

    def mix(self, batch: dict, row_ids: list[str], records: Sequence[Record], parts: Sequence[tuple], step: int,
            rng: np.random.Generator, *, num_generations: int, max_new_tokens: int, pad_id: int,
            seq_buckets: Sequence[int] | None, tile_buckets: Sequence[int]) -> tuple[dict, list[str], dict]:
        """Steps 1-3 of the module docstring on one rollout batch [A, b, ...] whose row r is completion r % G of
        prompt r // G (`records[p]`, `parts[p]` = (its prompt ids, its tiles)). Returns (batch, row ids, stats)."""
        a, per = np.shape(batch["input_ids"])[:2]
        n_rows, g, n = a * per, num_generations, max_new_tokens
        flat = {k: np.array(v).reshape(n_rows, *np.shape(v)[2:]) for k, v in batch.items() if k != "vision"}
        width = flat["input_ids"].shape[1]
        for k, v in flat.items():
            if v.ndim > 1 and k not in SEQ_KEYS:
                raise ConfigError(f"rollout.buffer cannot rebuild the batch's per-token array {k!r} (it knows "
                                  f"{', '.join(SEQ_KEYS)}); turn rollout.buffer.enabled off for this policy")
        vision = batch.get("vision") or {}
        if set(vision) - {"pixel_values"}:
            raise ConfigError("rollout.buffer supports Skywork R1V / InternVL tile inputs only; turn "
                              "rollout.buffer.enabled off for this policy")
        tiles = [parts[r // g][1] for r in range(n_rows)]
        fresh = effective_rows(flat["advantages"], flat.get("zero_std"))
        evicted = self.evict(step)

        # 2. draw and place
        limit = int(math.floor(self.cfg.max_fraction * n_rows + 1e-9))
        slots = [int(r) for r in np.flatnonzero(~fresh)][:limit]
        largest = max(tile_buckets)
        in_mb = [sum(_count(tiles[r]) for r in range(i * per, (i + 1) * per)) for i in range(a)]
        placed: list[tuple[int, BufferedRow]] = []
        for index in self.draw(len(slots), rng):
            row = self.rows[index]
            t = _count(self.prompts[row.prompt].tiles)
            for j, slot in enumerate(slots):
                m = slot // per
                if in_mb[m] - _count(tiles[slot]) + t <= largest:
                    in_mb[m] += t - _count(tiles[slot])
                    placed.append((slot, row))
                    del slots[j]
                    break

        # the rows placed: widen the prompt part if a buffered prompt is longer, then write them
        prompt_w = width - n
        need = max([prompt_w] + [len(self.prompts[row.prompt].ids) for _, row in placed])
        if need > prompt_w:
            new_w = need if seq_buckets is None else min(b for b in seq_buckets if b >= need)
            extra = new_w - prompt_w
            fill = {"input_ids": pad_id, "attention_mask": False, "completion": False, "old_logps": 0.0}
            for k in SEQ_KEYS:
                left = np.full((n_rows, extra), fill[k], flat[k].dtype)
                flat[k] = np.concatenate([left, flat[k]], axis=1)
            prompt_w = new_w
        staleness = np.zeros(n_rows, np.float32)
        buffered = np.zeros(n_rows, bool)
        row_ids = list(row_ids)
        for slot, row in placed:
            prompt = self.prompts[row.prompt]
            start = prompt_w - len(prompt.ids)
            flat["input_ids"][slot] = pad_id
            flat["input_ids"][slot, start:prompt_w] = prompt.ids
            flat["input_ids"][slot, prompt_w:] = row.ids
            flat["attention_mask"][slot] = False
            flat["attention_mask"][slot, start:prompt_w] = True
            flat["attention_mask"][slot, prompt_w:] = row.live
            flat["completion"][slot] = False
            flat["completion"][slot, prompt_w:] = row.completion
            flat["old_logps"][slot] = 0.0
            flat["old_logps"][slot, prompt_w:] = row.old_logps
            flat["advantages"][slot] = row.advantage
            tiles[slot] = prompt.tiles
            staleness[slot] = step - row.step
            buffered[slot] = True
            row_ids[slot] = row.row_id
            row.uses += 1
        # 3. admit this rollout's informative rows (never a slot, so not rewritten; their last n columns)
        counted = flat["completion"][:, -n:].any(axis=1)
        for p in range(n_rows // g):
            fields = [{"row_id": row_ids[r], "ids": flat["input_ids"][r, -n:].astype(np.int32),
                       "live": flat["attention_mask"][r, -n:].astype(bool),
                       "completion": flat["completion"][r, -n:].astype(bool),
                       "old_logps": flat["old_logps"][r, -n:].astype(np.float32),
                       "advantage": float(flat["advantages"][r]), "step": step}
                      for r in range(p * g, (p + 1) * g) if fresh[r] and counted[r]]
            self.add(records[p], parts[p][0], parts[p][1], fields)

        # 1. (again) rows used up leave now, so the saved state holds only what can still be drawn
        self.evict(step)

        flat["effective_fresh"] = fresh.astype(np.float32)
        flat["effective"] = np.where(buffered, effective_rows(flat["advantages"]), fresh).astype(np.float32)
        flat["buffered"] = buffered.astype(np.float32)
        out = {k: v.reshape(a, per, *v.shape[1:]) for k, v in flat.items()}
        packed = pack_tiles(tiles, a, per, tile_buckets)
        if packed is not None:
            out["vision"] = {"pixel_values": packed}
        stats = {"buffer/size": float(len(self.rows)), "buffer/used": float(len(placed)),
                 "buffer/staleness": float(staleness[buffered].mean()) if placed else 0.0,
                 "buffer/evicted": float(evicted)}
        return out, row_ids, stats


def _count(tiles) -> int:
    return 0 if tiles is None else int(np.shape(tiles)[0])


def pack_tiles(per_row: Sequence, a: int, per: int, tile_buckets: Sequence[int]) -> np.ndarray | None:
    """Rows' tiles (None: no image) -> [A, T, 3, s, s], each micro-batch's rows' tiles in row order, zero-padded to
    one tile bucket (the layout skyjax.train.grpo.RolloutSource._tiles builds); None when no row has tiles."""
    from skyjax.train.batching import fit_bucket

    shapes = [np.shape(t)[1:] for t in per_row if t is not None and np.shape(t)[0]]
    if not shapes:
        return None
    groups = [[np.asarray(t) for t in per_row[i * per:(i + 1) * per] if t is not None and np.shape(t)[0]]
              for i in range(a)]
    most = max(max(sum(x.shape[0] for x in grp) for grp in groups), 1)
    size = fit_bucket(most, tile_buckets, "tile", "a rollout batch")
    out = np.zeros((a, size, *shapes[0]), np.float32)
    for i, grp in enumerate(groups):
        if grp:
            x = np.concatenate(grp)
            out[i, : x.shape[0]] = x
    return out


def prompt_parts(inputs: dict) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """A prepared prompt batch (the sampler adapter's `prepare`) -> per prompt (its ids without padding, its tiles
    [t, 3, s, s] or None). Only R1V / InternVL inputs (tiles_per_row) have image tiles to split."""
    ids = np.asarray(inputs["input_ids"])
    mask = np.asarray(inputs["attention_mask"]).astype(bool)
    pixels = inputs.get("pixel_values")
    if pixels is not None and inputs.get("tiles_per_row") is None:
        raise ConfigError("rollout.buffer supports Skywork R1V / InternVL tile inputs only; turn "
                          "rollout.buffer.enabled off for this policy")
    starts = None
    if pixels is not None:
        pixels = np.asarray(pixels, np.float32)
        starts = np.concatenate([[0], np.cumsum(np.asarray(inputs["tiles_per_row"]).astype(int))])
    return [(ids[b][mask[b]].astype(np.int32), None if starts is None else pixels[starts[b]:starts[b + 1]])
            for b in range(ids.shape[0])]


def mix_buffer(source, state: dict, batch: dict, row_ids: list[str], examples: Sequence, inputs: dict
               ) -> tuple[dict, list[str], dict]:
    """The rollout source's hook after build_batch: adds `effective` (rows with A != 0) to every batch and, with
    rollout.buffer.enabled, mixes the buffer in (SampleBuffer.mix). Returns (batch, row ids, stats)."""
    import jax

    buf: SampleBuffer | None = getattr(source, "buffer", None)
    if buf is None:
        eff = effective_rows(np.asarray(batch["advantages"]).reshape(-1), np.asarray(batch["zero_std"]).reshape(-1))
        return {**batch, "effective": eff.reshape(np.shape(batch["advantages"])).astype(np.float32)}, row_ids, {}
    cfg = source.cfg
    step = int(np.asarray(jax.device_get(state["step"])))
    rng = np.random.default_rng([cfg.rollout.seed, source.rollouts, jax.process_index(), 0x55B])
    pad = source.tokenizer.pad_token_id if source.tokenizer.pad_token_id is not None else 0
    return buf.mix(batch, row_ids, [e.record for e in examples], prompt_parts(inputs), step, rng,
                   num_generations=cfg.rollout.num_generations, max_new_tokens=cfg.rollout.max_new_tokens,
                   pad_id=pad, seq_buckets=source.adapter.seq_buckets, tile_buckets=cfg.data.tile_buckets)


def buffer_state(source) -> dict:
    """RolloutSource.get_state's part (JSON): the buffer, and how often dynamic sampling hit its cap."""
    out = {"dynamic_cap_hits": getattr(source, "dynamic_cap_hits", 0)}
    if source.buffer is not None:
        out["buffer"] = source.buffer.get_state()
    return out


def restore_buffer(source, saved: dict) -> None:
    """RolloutSource.set_state's part: the checkpoint's buffer (or an empty one: a checkpoint made without it),
    its prompts prepared again."""
    from skyjax.train.batching import row_location
    from skyjax.train.sft import load_images

    source.dynamic_cap_hits = int(saved.get("dynamic_cap_hits", 0))
    if source.buffer is None:
        return

    def prepare(record: Record):
        images = load_images(record, row_location(record), source.pipeline.blank)
        inputs = source.adapter.prepare([record.conversation()], [images], source.tokenizer)
        return prompt_parts(inputs)[0]

    source.buffer.set_state(saved.get("buffer"), prepare)


# --- dynamic sampling ---------------------------------------------------------------------------------------------


def _any_host(flag: bool) -> bool:
    import jax

    if jax.process_count() == 1:
        return flag
    from jax.experimental.multihost_utils import process_allgather

    return bool(np.asarray(process_allgather(np.asarray([int(flag)], np.int32))).any())


def informative_groups(rewards, g: int) -> np.ndarray:
    """bool per group of G completions: its rewards differ (the complement of the batch's zero_std)."""
    grouped = np.nan_to_num(np.asarray(rewards, np.float64)).reshape(-1, g)
    return np.ptp(grouped, axis=1) > 1e-8


def dynamic_sampling(source, state: dict, examples: list, gen: tuple, rewards, table) -> tuple[tuple, dict]:
    """DAPO's dynamic sampling on the rollout source (see the module docstring). `gen` = the first draw's
    (inputs, tokens, logps, lengths, stopped), `rewards` [B*G], `table` [B*G, K]. Returns ((examples, inputs,
    tokens, logps, lengths, stopped, rewards, table) of the batch to train on, stats)."""
    cfg, g = source.rollout.dynamic_sampling, source.rollout.num_generations
    want = len(examples)
    draws = [(list(examples), gen, np.asarray(rewards), np.asarray(table))]
    kept = [(0, p) for p in np.flatnonzero(informative_groups(rewards, g))]
    dull = [(0, p) for p in np.flatnonzero(~informative_groups(rewards, g))]
    ran_out = False
    while _any_host(len(kept) < want) and len(draws) < cfg.max_draws:
        try:
            more = next(source.iterator)["prompts"]
        except StopIteration:
            ran_out = True
            break
        source.rollouts += 1  # a fresh key for every draw (the index is checkpointed: a resumed run draws the same)
        gen_d = source.generate(state, more)
        rewards_d, table_d, _ = source.score(more, gen_d[1], gen_d[3])
        d = len(draws)
        draws.append((list(more), gen_d, np.asarray(rewards_d), np.asarray(table_d)))
        ok = informative_groups(rewards_d, g)
        kept += [(d, p) for p in np.flatnonzero(ok)]
        dull += [(d, p) for p in np.flatnonzero(~ok)]
    drawn = len(draws) * want
    stats = {"dynamic/draws": float(len(draws)), "dynamic/informative_fraction": len(kept) / drawn}
    if len(kept) < want:
        source.dynamic_cap_hits = getattr(source, "dynamic_cap_hits", 0) + 1
        hits = source.dynamic_cap_hits
        if hits <= 3 or hits % 100 == 0:
            why = "the prompts ran out" if ran_out else f"rollout.dynamic_sampling.max_draws={cfg.max_draws}"
            source.log(f"rollout.dynamic_sampling: only {len(kept)} of {want} groups had differing rewards after "
                       f"{len(draws)} prompt batch(es) ({why}); the batch is completed with {want - len(kept)} "
                       f"constant-reward groups (no learning signal). Cap hit {hits} time(s) so far"
                       + ("; this line repeats every 100th time" if hits == 3 else ""))
    chosen = sorted(kept[:want] + dull[:max(want - len(kept), 0)])  # in draw order
    stats["dynamic/cap_hits"] = float(getattr(source, "dynamic_cap_hits", 0))
    if chosen == [(0, p) for p in range(want)]:  # the first draw as it is
        return (examples, *gen, rewards, table), stats
    rows = lambda d, p: slice(p * g, (p + 1) * g)  # noqa: E731
    picked_examples = [draws[d][0][p] for d, p in chosen]
    cat = lambda i: np.concatenate([np.asarray(draws[d][1][i])[rows(d, p)] for d, p in chosen])  # noqa: E731
    tokens, logps, lengths, stopped = cat(1), cat(2), cat(3), cat(4)
    rewards = np.concatenate([draws[d][2][rows(d, p)] for d, p in chosen])
    table = np.concatenate([draws[d][3][rows(d, p)] for d, p in chosen])
    # one prompt batch again (one padding width, the tiles in row order), as the sampler would have prepared it
    inputs = source.adapter.prepare([e.record.conversation() for e in picked_examples],
                                    [e.images for e in picked_examples], source.tokenizer)
    source.adapter.check(inputs)
    return (picked_examples, inputs, tokens, logps, lengths, stopped, rewards, table), stats


# --- records as JSON (the buffer's prompts in a checkpoint) ------------------------------------------------------

_MESSAGE_FIELDS = ("prompt", "chosen", "rejected", "response", "completion", "messages")


def _messages_to_json(messages):
    if messages is None:
        return None
    return [{"role": m.role, "content": m.content if isinstance(m.content, str) else
             [{"type": p.type, "text": p.text} for p in m.content]} for m in messages]


def _messages_from_json(data):
    if data is None:
        return None
    return tuple(Message(m["role"], m["content"] if isinstance(m["content"], str) else
                         tuple(ContentPart(p["type"], p["text"]) for p in m["content"])) for m in data)


def record_to_json(record: Record) -> dict:
    out = {f: _messages_to_json(getattr(record, f)) for f in _MESSAGE_FIELDS}
    out.update(images=list(record.images), answer=record.answer, id=record.id, meta=record.meta,
               source=record.source, line=record.line)
    return out


def record_from_json(data: dict) -> Record:
    msgs = {f: _messages_from_json(data.get(f)) for f in _MESSAGE_FIELDS}
    msgs["prompt"] = msgs["prompt"] or ()
    return Record(images=tuple(data["images"]), answer=data.get("answer"), id=data.get("id"), meta=data.get("meta"),
                  source=data.get("source", "<memory>"), line=int(data.get("line", 0)), **msgs)


def _encode(a) -> dict:
    a = np.ascontiguousarray(a)
    return {"dtype": a.dtype.str, "shape": list(a.shape), "data": base64.b64encode(a.tobytes()).decode("ascii")}


def _decode(d: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(d["data"]), dtype=np.dtype(d["dtype"])).reshape(d["shape"]).copy()
