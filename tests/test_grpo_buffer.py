"""R1V2's Selective Sample Buffer and DAPO's dynamic sampling in kind grpo (skyjax.train.grpo_buffer).

Unit tests of the buffer on hand-made rows (draws proportional to |A|, staleness and use eviction, capacity, the
rows a batch gets and the layout they keep, the JSON state), then the tiny Skywork R1V policy of tests/test_grpo.py:
the effective fraction rises with the buffer in a trainer run, buffered rows keep the log-probs of the policy that
sampled them (importance-corrected, not recomputed), a checkpoint (source state or the trainer's orbax checkpoint)
resumes with identical batches, and dynamic sampling fills the batch with groups whose rewards differ.
"""

import dataclasses
import json

import jax
import numpy as np
import pytest

from helpers import random_image
from skyjax.config import ConfigError, load_config
from skyjax.data.records import ContentPart, Message, Record
from skyjax.train.config import RunConfig, SampleBufferConfig
from skyjax.train.grpo_buffer import SampleBuffer, effective_rows, record_from_json, record_to_json

G = 3


# --- the buffer alone ---------------------------------------------------------------------------------------------


def _record(i: int) -> Record:
    parts = (ContentPart("image"), ContentPart("text", f"question {i}?"))
    return Record(images=(f"/data/{i}.png",), prompt=(Message("user", parts),), answer=str(i), id=i,
                  meta={"k": [i, "x"]}, source="prompts.jsonl", line=i + 1)


def _row(adv: float, step: int, n: int = 4, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    live = np.arange(n) < 3
    return {"row_id": "prompts.jsonl:1", "ids": np.where(live, rng.integers(10, 90, n), 0).astype(np.int32),
            "live": live, "completion": live.copy(), "old_logps": np.where(live, -rng.random(n), 0).astype(np.float32),
            "advantage": adv, "step": step}


def _buffer(**kw) -> SampleBuffer:
    return SampleBuffer(SampleBufferConfig(enabled=True, **kw), seed=0)


def test_draws_are_proportional_to_abs_advantage_and_without_replacement():
    buf = _buffer(capacity=16)
    advs = [0.5, -1.0, 2.0, -0.25, 1.25]
    for i, a in enumerate(advs):
        buf.add(_record(i), np.arange(5, dtype=np.int32), None, [_row(a, 0, seed=i)])
    trials = 20000
    first = np.zeros(len(advs))
    pairs = np.zeros((len(advs), len(advs)))
    rng = np.random.default_rng(1234)
    for _ in range(trials):
        picks = buf.draw(2, rng)
        first[picks[0]] += 1
        pairs[picks[0], picks[1]] += 1
    w = np.abs(advs) / np.sum(np.abs(advs))
    # binomial standard error sqrt(p(1-p)/n) <= 0.0036: 5 of them
    np.testing.assert_allclose(first / trials, w, atol=0.018)
    assert np.all(np.diag(pairs) == 0)  # without replacement
    # the second draw is proportional to |A| among the rest: P(second = 4 | first = 2) = w4 / (1 - w2)
    np.testing.assert_allclose(pairs[2, 4] / first[2], w[4] / (1 - w[2]), atol=0.03)
    assert sorted(buf.draw(10, rng)) == list(range(len(advs)))  # k > size: every row once
    assert buf.draw(0, rng) == []


def test_staleness_and_uses_evict_and_capacity_keeps_the_newest():
    buf = _buffer(capacity=5, max_staleness=2, max_uses=2)
    for step in range(4):  # two rows per step, one prompt each
        buf.add(_record(step), np.arange(3, dtype=np.int32), None, [_row(1.0, step), _row(-1.0, step, seed=1)])
    assert len(buf) == 5  # 8 admitted, capacity 5: the oldest went first
    assert [r.step for r in buf.rows] == [1, 2, 2, 3, 3]
    assert set(buf.prompts) == {r.prompt for r in buf.rows}  # prompts of dropped rows are forgotten
    assert buf.evict(4) == 1  # step 1 is 3 steps behind step 4 > max_staleness 2
    assert [r.step for r in buf.rows] == [2, 2, 3, 3]
    buf.rows[0].uses = 2
    buf.rows[1].uses = 1
    assert buf.evict(4) == 1 and len(buf) == 3  # used max_uses times: gone; used once: stays
    assert buf.evict(5) == 1 and [r.step for r in buf.rows] == [3, 3]


def _fake_batch(prompts, *, a=2, n=4, width=8, advantages, seed=0, pad=0):
    """A rollout batch in build_batch's layout: row r = completion r % G of prompt r // G ([left pad | prompt |
    completion], tiles of a micro-batch's rows in row order)."""
    rng = np.random.default_rng(seed)
    rows = len(prompts) * G
    per = rows // a
    ids = np.full((rows, width + n), pad, np.int32)
    mask = np.zeros((rows, width + n), bool)
    comp = np.zeros((rows, width + n), bool)
    old = np.zeros((rows, width + n), np.float32)
    for r in range(rows):
        p_ids = prompts[r // G][0]
        ids[r, width - len(p_ids):width] = p_ids
        mask[r, width - len(p_ids):width] = True
        k = int(rng.integers(1, n + 1))
        ids[r, width:width + k] = rng.integers(100, 200, k)
        mask[r, width:width + k] = True
        comp[r, width:width + k] = True
        old[r, width:width + k] = -rng.random(k)
    adv = np.asarray(advantages, np.float32)
    zero = np.repeat(np.ptp(adv.reshape(-1, G), axis=1) == 0, G).astype(np.float32)
    flat = {"input_ids": ids, "attention_mask": mask, "completion": comp, "old_logps": old, "advantages": adv,
            "rewards": adv + 1, "lengths": comp.sum(1).astype(np.float32), "truncated": np.zeros(rows, np.float32),
            "zero_std": zero, "row_weight": np.ones(rows, np.float32)}
    batch = {k: v.reshape(a, per, *v.shape[1:]) for k, v in flat.items()}
    tiles = [prompts[r // G][1] for r in range(rows)]
    from skyjax.train.grpo_buffer import pack_tiles

    batch["vision"] = {"pixel_values": pack_tiles(tiles, a, per, (4, 8, 16))}
    return batch


def _prompts(lengths, tiles, seed):
    rng = np.random.default_rng(seed)
    return [(rng.integers(300, 400, n).astype(np.int32), rng.random((t, 3, 2, 2)).astype(np.float32))
            for n, t in zip(lengths, tiles)]


def _strip(ids, mask):
    return ids[mask].tolist()


def test_mix_replaces_zero_advantage_rows_with_buffered_rows_in_the_same_layout():
    buf = _buffer(capacity=64, max_fraction=1.0)
    mix = dict(num_generations=G, max_new_tokens=4, pad_id=0, seq_buckets=(8, 16), tile_buckets=(4, 8, 16))
    # rollout at step 0: prompts 0 and 2 informative, 1 and 3 constant (prompt 2 longer: 7 tokens, 2 tiles)
    first = _prompts([5, 3, 7, 4], [1, 1, 2, 1], seed=0)
    adv0 = [1.0, -0.5, -0.5, 0, 0, 0, 0.7, -0.7, 0.0, 0, 0, 0]  # row 8: A = 0 in an informative group
    b0 = _fake_batch(first, advantages=adv0, seed=0)
    records = [_record(i) for i in range(4)]
    ids0 = [f"prompts.jsonl:{i + 1}" for i in range(4) for _ in range(G)]
    out0, rid0, stats0 = buf.mix(b0, ids0, records, first, 0, np.random.default_rng(0), **mix)
    assert stats0["buffer/used"] == 0 and stats0["buffer/size"] == 5  # rows 0, 1, 2, 6, 7
    np.testing.assert_array_equal(out0["effective"].reshape(-1), np.abs(adv0) > 0)
    np.testing.assert_array_equal(out0["effective_fresh"], out0["effective"])
    flat0 = {k: np.asarray(out0[k]).reshape(12, -1) for k in ("input_ids", "attention_mask", "old_logps")}
    kept = {tuple(_strip(flat0["input_ids"][r], flat0["attention_mask"][r])): (r, adv0[r]) for r in (0, 1, 2, 6, 7)}

    # rollout at step 1: short prompts (width 4 would do), every group constant; the buffer fills at most 9 rows
    # (max_fraction 1.0 but only 5 buffered), the batch widens to the longest buffered prompt's bucket
    second = _prompts([2, 3, 2, 3], [1, 1, 1, 1], seed=1)
    b1 = _fake_batch(second, width=4, advantages=[0.0] * 12, seed=1)
    ids1 = [f"new.jsonl:{i + 1}" for i in range(4) for _ in range(G)]
    out1, rid1, stats1 = buf.mix(b1, ids1, [_record(10 + i) for i in range(4)], second, 1,
                                 np.random.default_rng(1), **mix)
    assert out1["input_ids"].shape == (2, 6, 8 + 4)  # prompt part 4 -> bucket 8 (a 7-token buffered prompt)
    assert stats1["buffer/used"] == 5 and stats1["buffer/size"] == 0  # max_uses 1: all used, all gone
    assert stats1["buffer/staleness"] == 1.0
    flat1 = {k: np.asarray(v).reshape(12, *np.shape(v)[2:]) for k, v in out1.items() if k != "vision"}
    got = [r for r in range(12) if flat1["buffered"][r]]
    assert len(got) == 5
    for r in range(12):
        row = _strip(flat1["input_ids"][r], flat1["attention_mask"][r])
        if r in got:  # the very row of step 0: tokens, log-probs on its completion tokens, advantage, row id
            src, adv = kept[tuple(row)]
            assert flat1["advantages"][r] == np.float32(adv) and rid1[r] == rid0[src]
            np.testing.assert_array_equal(flat1["old_logps"][r][flat1["completion"][r]],
                                          flat0["old_logps"][src][np.asarray(out0["completion"]).reshape(12, -1)[src]])
        else:  # a fresh row: only more left padding
            fresh = np.asarray(b1["input_ids"]).reshape(12, -1)[r]
            assert row == _strip(fresh, np.asarray(b1["attention_mask"]).reshape(12, -1)[r]) and rid1[r] == ids1[r]
        assert flat1["attention_mask"][r, -4:].tolist() == flat1["completion"][r, -4:].tolist()
    assert flat1["effective"].sum() == 5 and flat1["effective_fresh"].sum() == 0
    np.testing.assert_array_equal(flat1["zero_std"], 1.0)  # rollout metrics stay the fresh rollout's
    # each micro-batch's tiles: its rows' tiles in row order (a buffered row brings its prompt's), then zeros
    prompt_of = {tuple(p[0].tolist()): p[1] for p in first + second}
    for i in range(2):
        want = []
        for r in range(i * 6, (i + 1) * 6):
            ids = _strip(flat1["input_ids"][r], flat1["attention_mask"][r])
            want += [t for key, t in prompt_of.items() if ids[:len(key)] == list(key)]
        want = np.concatenate(want)
        pix = out1["vision"]["pixel_values"][i]
        np.testing.assert_array_equal(pix[:len(want)], want)
        assert not pix[len(want):].any()


def test_mix_leaves_a_row_out_whose_tiles_do_not_fit_and_respects_max_fraction():
    mix = dict(num_generations=G, max_new_tokens=4, pad_id=0, seq_buckets=None, tile_buckets=(4, 8))
    big = _prompts([3], [8], seed=2)  # a prompt with 8 tiles: a micro-batch of 6 rows holds it once at most
    buf = _buffer(capacity=64, max_fraction=1.0)
    buf.add(_record(0), big[0][0], big[0][1], [_row(1.0, 0, seed=s) for s in range(3)])
    small = _prompts([3, 3], [0, 0], seed=3)  # text-only prompts: no tiles at all
    small = [(p, None) for p, _ in small]
    out, _, stats = buf.mix(_fake_batch_text(small), ["x"] * 6, [_record(1), _record(2)], small, 1,
                            np.random.default_rng(0), **mix)
    assert stats["buffer/used"] == 1  # one 8-tile row fills the only micro-batch's largest bucket
    assert out["vision"]["pixel_values"].shape == (1, 8, 3, 2, 2)
    buf2 = _buffer(capacity=64, max_fraction=0.34)
    rows = _prompts([3], [0], seed=4)
    buf2.add(_record(0), rows[0][0], None, [_row(1.0, 0, seed=s) for s in range(6)])
    out2, _, stats2 = buf2.mix(_fake_batch_text(small), ["x"] * 6, [_record(1), _record(2)], small, 1,
                               np.random.default_rng(0), **mix)
    assert stats2["buffer/used"] == 2  # floor(0.34 * 6)
    assert "vision" not in out2


def _fake_batch_text(prompts):
    b = _fake_batch([(p, np.zeros((0, 3, 2, 2), np.float32)) for p, _ in prompts], a=1, width=4,
                    advantages=[0.0] * (len(prompts) * G))
    del b["vision"]
    return b


def test_buffer_state_is_json_and_round_trips():
    buf = _buffer(capacity=8)
    parts = _prompts([4, 6], [1, 2], seed=5)
    for i, (ids, tiles) in enumerate(parts):
        buf.add(_record(i), ids, tiles, [_row(0.5 + i, i, seed=i), _row(-1.5, i, seed=i + 7)])
    buf.rows[0].uses = 1
    saved = json.loads(json.dumps(buf.get_state()))
    by_record = {r.record: (r.ids, r.tiles) for r in buf.prompts.values()}
    back = _buffer(capacity=8)
    back.set_state(saved, lambda record: by_record[record])
    assert back.next_uid == buf.next_uid and set(back.prompts) == set(buf.prompts)
    for a, b in zip(buf.rows, back.rows, strict=True):
        for f in dataclasses.fields(a):
            x, y = getattr(a, f.name), getattr(b, f.name)
            if isinstance(x, np.ndarray):
                assert x.dtype == y.dtype
                np.testing.assert_array_equal(x, y)
            else:
                assert x == y
    assert record_from_json(json.loads(json.dumps(record_to_json(_record(3))))) == _record(3)


def test_effective_rows_and_config_errors():
    np.testing.assert_array_equal(effective_rows([0.0, 1e-7, -0.3, 0.3], [0, 0, 0, 1]), [False, False, True, False])
    with pytest.raises(ConfigError, match="rollout.buffer.max_fraction"):
        load_config(RunConfig, None, ["kind=grpo", "rollout.buffer.max_fraction=1.5"])
    with pytest.raises(ConfigError, match="rollout.dynamic_sampling.max_draws"):
        load_config(RunConfig, None, ["kind=grpo", "rollout.dynamic_sampling.max_draws=0"])


# --- the tiny R1V policy ------------------------------------------------------------------------------------------


def split_reward(rows):
    """A test reward: constant for prompts whose answer is 'fixed' (their groups teach nothing), the first sampled
    token's id mod 4 otherwise (samples of a group differ)."""
    return [1.0 if r.answer == "fixed" else float(r.completion_ids[0] % 4) for r in rows]


def _data(root, answers):
    rows = []
    for i, answer in enumerate(answers):
        names = []
        for k in range(1 + i % 2):  # one or two images per prompt
            random_image(10 * i + k, 40 + 10 * k, 56).save(root / f"{i}_{k}.png")
            names.append(f"{i}_{k}.png")
        q = "Which one? " * (1 + i % 3)  # prompts of different lengths: left padding
        content = [{"type": "image"} for _ in names] + [{"type": "text", "text": q}]
        rows.append({"images": names, "prompt": [{"role": "user", "content": content}], "answer": answer})
    path = root / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(data, *extra):
    return load_config(RunConfig, None, [
        "kind=grpo", "model.source=tiny", "model.tiny_layers=2", "model.tiny_vision_depth=2",
        "model.tiny_init_std=0.2", f"data.train=[{data}]", "data.batch_size=4", "data.max_tiles=1",
        "data.tile_buckets=[16]", "optimizer.grad_accum=2", "trainer.progress=false", "trainer.export=false",
        "trainer.async_checkpointing=false", "mesh.shape=[2,2,2]", f"rollout.num_generations={G}",
        "rollout.max_new_tokens=5", "rollout.temperature=1.0", "optimizer.lr=1e-3",
        f"rollout.rewards=[{{name: '{__name__}:split_reward'}}]", *extra])


@pytest.fixture(scope="module")
def buffered(tmp_path_factory):
    from skyjax.train.trainer import Trainer

    root = tmp_path_factory.mktemp("grpo_buffer")
    data = _data(root, ["fixed", "a", "fixed", "b"])  # every batch: 2 constant groups of 4
    cfg = _config(data, "trainer.steps=3", "trainer.log_every=1", "rollout.buffer.enabled=true",
                  "rollout.buffer.max_fraction=1.0",
                  "rollout.buffer.max_staleness=2")
    return Trainer(cfg, root / "run", resume=False, log=lambda m: None)


_FORWARD = []


def _forward(trainer, params, batch):
    """The objective's log-probs [A, b, S] of every row of `batch` under `params` (merged trainable + frozen)."""
    from skyjax.train.objectives.grpo import completion_logps

    if not _FORWARD:
        _FORWARD.append(jax.jit(completion_logps))
    model = trainer.fn.bind(params)
    return np.stack([np.asarray(_FORWARD[0](model, jax.tree.map(lambda x: x[i], batch)))
                     for i in range(batch["input_ids"].shape[0])])


def test_buffered_rows_keep_the_sampling_policys_logps(buffered):
    """pi_old of a buffered row is the sampler's log-prob under the parameters that drew it (equal to a fresh
    forward with THOSE parameters: the row, its prompt and its tiles are put back exactly), not the current ones."""
    from skyjax.train.grpo import rollout_source
    from skyjax.train.optimizer import merge_params

    trainer = buffered
    src = rollout_source(trainer.train_pipe, trainer.bundle, trainer.cfg, trainer)  # its own buffer and position
    state0 = trainer.state
    b0, _ = src.next(state0)
    assert b0["effective_fresh"].sum() <= 6 and b0["buffered"].sum() == 0 and len(src.buffer) > 0
    noise = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape, x.dtype),
                         state0["trainable"])
    state1 = {**state0, "trainable": noise, "step": state0["step"] + 1}
    b1, ids1 = src.next(state1)
    used = b1["buffered"].astype(bool)
    assert used.sum() > 0 and np.all(b1["effective"] >= b1["effective_fresh"])
    assert src.stats["buffer/staleness"] == 1.0
    comp = b1["completion"].astype(bool)
    new = _forward(trainer, merge_params(noise, state0["frozen"]), b1)
    old = _forward(trainer, merge_params(state0["trainable"], state0["frozen"]), b1)
    fresh_rows = comp & ~used[..., None]
    buf_rows = comp & used[..., None]
    assert np.max(np.abs(new - b1["old_logps"])[fresh_rows]) <= 1e-5  # fresh rows: pi_old = pi_theta
    assert np.max(np.abs(old - b1["old_logps"])[buf_rows]) <= 1e-5  # buffered rows: the policy that drew them
    assert np.max(np.abs(new - b1["old_logps"])[buf_rows]) > 1e-3  # ... importance-corrected, not recomputed

    # the source's state (JSON, as the checkpoint saves it) gives a new source the very same next batches
    saved = json.loads(json.dumps(src.get_state()))
    want = [src.next(state1) for _ in range(2)]
    assert sum(b["buffered"].sum() for b, _ in want) > 0
    again = rollout_source(trainer.train_pipe, trainer.bundle, trainer.cfg, trainer)
    again.set_state(saved)
    for (wb, wi), (gb, gi) in zip(want, [again.next(state1) for _ in range(2)]):
        assert wi == gi
        jax.tree.map(np.testing.assert_array_equal, wb, gb)


def test_the_buffer_raises_the_effective_fraction_and_resumes_exactly(buffered):
    from skyjax.train.trainer import Trainer

    trainer = buffered
    trainer.fit()
    rows = [json.loads(x) for x in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("split") == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["effective_fraction_fresh"] <= 0.5 + 1e-6  # two of the four groups are constant
        assert r["effective_fraction"] == pytest.approx(r["effective_fraction_fresh"] + r["buffer_fraction"])
        assert "buffer/size" in r and "buffer/staleness" in r
    assert rows[0]["buffer_fraction"] == 0  # nothing buffered before the first rollout
    assert all(r["buffer_fraction"] > 0 and r["effective_fraction"] > r["effective_fraction_fresh"] for r in rows[1:])
    assert np.mean([r["effective_fraction"] for r in rows[1:]]) > 0.5
    # the orbax checkpoint of the last step holds the buffer: a resumed trainer draws the very same next batch
    assert len(trainer.batches.buffer) > 0
    resumed = Trainer(trainer.cfg, trainer.run_dir, resume=True, log=lambda m: None)
    assert resumed.start_step == 3 and len(resumed.batches.buffer) == len(trainer.batches.buffer)
    want, want_ids = trainer.batches.next(trainer.state)
    got, got_ids = resumed.batches.next(resumed.state)
    assert want_ids == got_ids and want["buffered"].sum() > 0
    jax.tree.map(np.testing.assert_array_equal, want, got)


def _with_rollout(cfg, **changes):
    return dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, **changes))


def test_dynamic_sampling_fills_the_batch_with_groups_whose_rewards_differ(buffered):
    from skyjax.train.config import DynamicSamplingConfig
    from skyjax.train.grpo import rollout_source
    from skyjax.train.optimizer import merge_params

    trainer = buffered  # every prompt batch holds two constant groups of four
    cfg = _with_rollout(trainer.cfg, buffer=SampleBufferConfig(),
                        dynamic_sampling=DynamicSamplingConfig(enabled=True, max_draws=4))
    logs = []
    src = rollout_source(trainer.train_pipe, trainer.bundle, cfg, trainer)
    src.log = logs.append
    batch, row_ids = src.next(trainer.state)
    assert src.stats["dynamic/draws"] >= 2 and not logs
    # every group's rewards differ, so at most one row of three sits at its group's mean (A = 0)
    assert batch["zero_std"].sum() == 0 and batch["effective"].sum() >= 8
    assert all(r.endswith((":2", ":4")) for r in row_ids)  # only the varying prompts' rows
    # the re-assembled batch (prompts of several draws prepared again as one) is what the sampler saw
    fresh = _forward(trainer, merge_params(trainer.state["trainable"], trainer.state["frozen"]), batch)
    comp = batch["completion"].astype(bool)
    assert np.max(np.abs(fresh - batch["old_logps"])[comp]) <= 1e-5
    # the cap: one draw per step cannot fill the batch; it is completed with constant groups and says so
    capped = _with_rollout(cfg, dynamic_sampling=DynamicSamplingConfig(enabled=True, max_draws=1))
    one = rollout_source(trainer.train_pipe, trainer.bundle, capped, trainer)
    one.log = logs.append
    b, _ = one.next(trainer.state)
    assert b["input_ids"].shape[:2] == batch["input_ids"].shape[:2] and b["zero_std"].sum() == 6
    assert one.stats["dynamic/draws"] == 1 and one.stats["dynamic/cap_hits"] == 1
    assert len(logs) == 1 and "max_draws=1" in logs[0] and "2 constant-reward groups" in logs[0]
    again = rollout_source(trainer.train_pipe, trainer.bundle, capped, trainer)
    again.set_state(json.loads(json.dumps(one.get_state())))  # the count survives a checkpoint
    assert again.dynamic_cap_hits == 1 and again.rollouts == one.rollouts
