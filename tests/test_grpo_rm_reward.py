"""The VL reward model as a GRPO reward (skyjax.rl.reward_model) and bad input to rewards.

The reward equals RewardScorer's score of the same conversation and a transformers computation of the reward model
(its own chat template, tokenizer and image processor); images reach it; it re-tokenizes from text, so a policy with
another vocabulary is fine; inside a grpo run it sits on the trainer's mesh and a step trains with it as the only
reward. Bad input: a reward that raises or returns NaN (an error naming the function and the prompt's file:line,
or skip-and-count), a conversation too long for the reward model, a prompt row whose image is missing."""

import dataclasses
import json
import re
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from helpers import random_image, rel_error, tiny_hf_qwen2_5_vl
from skyjax.data.qwen_vl_image import load_image
from skyjax.data.tokenizer import build_tiny_tokenizer
from skyjax.eval.scorer import Conversation, RewardScorer
from skyjax.rl.reward_model import assistant_text, scorer_of
from skyjax.rl.rewards import (Reward, RewardContext, RewardError, Rollout, RowFailures, compute_rewards, failed_rows,
                               load_reward, reward_factory)

G = 2


@pytest.fixture(scope="module")
def rm(tmp_path_factory):
    """A tiny Skywork-VL-Reward-layout folder (Qwen2.5-VL + value_head.safetensors) and its torch twin."""
    folder = tmp_path_factory.mktemp("rm")
    hf = tiny_hf_qwen2_5_vl(folder, build_tiny_tokenizer("qwen2_5_vl"))
    rng = np.random.RandomState(0)
    head = {"v_head.summary.weight": rng.normal(0, 0.5, (1, 64)).astype(np.float32),
            "v_head.summary.bias": np.array([0.3], np.float32)}
    save_file(head, str(folder / "value_head.safetensors"))
    return folder, hf, head


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("img")
    paths = []
    for seed, (w, h) in enumerate([(84, 56), (56, 112), (70, 70), (84, 56)]):
        random_image(seed, w, h).save(root / f"{seed}.png")
        paths.append(str(root / f"{seed}.png"))
    return paths


@pytest.fixture(scope="module")
def reward(rm):
    from skyjax.parallel.mesh import make_mesh

    return load_reward("reward_model", RewardContext(mesh=make_mesh((1, 1, 1))), source=str(rm[0]), batch_size=4)


def user(question, n_images):
    return {"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": question}]}


def row(question, paths, completion, *, prompt="", where="prompts.jsonl:1", ids=()):
    return Rollout(prompt=prompt, completion=completion, completion_ids=ids, images=tuple(paths),
                   messages=[user(question, len(paths))], image_data=tuple(load_image(p) for p in paths),
                   where=where)


def transformers_score(rm, messages, paths) -> float:
    """The reward model computed by transformers from the text: the folder's tokenizer and chat template, its
    Qwen2-VL image processor, each <|image_pad|> expanded to the image's merged patches, the value head on the last
    token's final hidden state (fp32)."""
    import torch
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    folder, hf, head = rm
    tok = AutoTokenizer.from_pretrained(folder)
    text = tok.apply_chat_template(messages, tokenize=False)
    kw = {}
    if paths:
        processed = Qwen2VLImageProcessorPil.from_pretrained(str(folder))(
            images=[load_image(p) for p in paths], return_tensors="np")
        grids = processed["image_grid_thw"]
        parts = text.split("<|image_pad|>")
        assert len(parts) == len(paths) + 1
        text = parts[0] + "".join("<|image_pad|>" * int(np.prod(g) // 4) + p for g, p in zip(grids, parts[1:]))
        kw = dict(pixel_values=torch.as_tensor(processed["pixel_values"]),
                  image_grid_thw=torch.as_tensor(grids, dtype=torch.long))
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    mm = (ids == tok.convert_tokens_to_ids("<|image_pad|>")).long()
    with torch.no_grad():
        hidden = hf.model(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm,
                          **kw).last_hidden_state.float().numpy()
    return float(hidden[0, -1] @ head["v_head.summary.weight"][0] + head["v_head.summary.bias"][0])


# ------------------------------------------------------------------------------------------ the reward model reward


def test_reward_equals_the_scorer_alone_and_transformers(rm, images, reward):
    rows = [row("What colour is it?", images[:1], "<think>\nred blocks</think> \\boxed{Red}"),
            row("Compare the two.", images[1:3], "The left one is taller.", where="prompts.jsonl:2"),
            row("Think first.", images[2:3], "a short chain</think> Answer: B", prompt="...<think>\n"),
            row("No image here?", [], "None.")]
    values = reward(rows)
    # the scorer on its own: another instance, on its own mesh, reading the image files itself
    own = RewardScorer(rm[0], mesh_shape=(1, 1, 1), batch_size=4, progress=False)
    convs, want_hf = [], []
    for r in rows:
        messages = [*r.messages, {"role": "assistant", "content": assistant_text(r)}]
        convs.append(Conversation(messages, r.images, r.where))
        want_hf.append(transformers_score(rm, messages, r.images))
    assert np.max(np.abs(np.array(values) - own.score_conversations(convs))) <= 1e-5
    assert rel_error(values, want_hf) <= 1e-5
    # the prompt opened <think>: the RM reads the chain with its opening tag put back (as skyjax pairs scores it)
    assert assistant_text(rows[2]) == "<think>\na short chain</think> Answer: B"
    assert assistant_text(rows[0], "strip") == "\\boxed{Red}" and assistant_text(rows[1], "strip") == rows[1].completion
    assert assistant_text(row("q", [], "cut off mid-thought", prompt="<think>\n"), "strip") == ""


def test_normalisation_options(rm, images, reward):
    from skyjax.parallel.mesh import make_mesh

    rows = [row("What colour is it?", images[:1], "Red."), row("And this?", images[1:2], "Blue.")]
    raw = np.array(reward(rows))
    shaped = load_reward("reward_model", RewardContext(mesh=make_mesh((1, 1, 1))), source=str(rm[0]), batch_size=4,
                         scale=0.5, shift="-1e-1", sigmoid=True)  # YAML 1.1 reads -1e-1 as a string
    np.testing.assert_allclose([shaped.fn.transform(v) for v in raw], 1 / (1 + np.exp(-(0.5 * raw - 0.1))),
                               rtol=1e-6)
    np.testing.assert_allclose(shaped.fn.transform(-800.0), 0.0, atol=1e-30)  # no overflow far from 0


def test_the_images_reach_the_reward_model(images, reward):
    a, b = images[0], images[3]  # the same size (the same tokens), other pixels
    values = reward([row("What colour is it?", [a], "Red."), row("What colour is it?", [b], "Red."),
                     row("What colour is it?", [a], "Red.")])
    assert values[0] == pytest.approx(values[2], abs=1e-6)  # the same conversation, the same score
    assert abs(values[0] - values[1]) > 1e-4  # only the image differs


def test_a_prompts_decoded_images_are_preprocessed_once_for_all_its_completions(images, reward, monkeypatch):
    import skyjax.eval.scorer as scorer_module

    answers = ("Red.", "Blue, surely.", "Green?")
    first = row("What colour is it?", images[:2], answers[0])
    rows = [dataclasses.replace(first, completion=c) for c in answers]  # one prompt's decoded images, shared
    alone = reward([row("What colour is it?", images[:2], c) for c in answers])  # each row decodes its own
    calls = []
    preprocess = scorer_module.preprocess_image
    monkeypatch.setattr(scorer_module, "preprocess_image", lambda im, cfg: calls.append(id(im)) or preprocess(im, cfg))
    np.testing.assert_allclose(reward(rows), alone, atol=1e-5)
    assert sorted(calls) == sorted(id(im) for im in first.image_data)  # each image once, not once per completion


def test_scoring_uses_the_reward_models_own_tokenizer(images, reward, monkeypatch):
    """The policy (Skywork R1V's tokenizer: other special tokens, <think> one token) and the reward model (Qwen2.5-VL)
    have different vocabularies; the reward model re-tokenizes the completion's text with its own."""
    import skyjax.eval.scorer as scorer_module

    policy = build_tiny_tokenizer("r1v")
    scorer = scorer_of(reward)
    assert policy.get_vocab() != scorer.tokenizer.get_vocab()
    think_id = policy.convert_tokens_to_ids("<think>")
    assert scorer.tokenizer.convert_ids_to_tokens(think_id) != "<think>"
    completion = "<think>\nlooks red</think> Red."
    ids = policy(completion, add_special_tokens=False)["input_ids"]
    seen = []
    prepare = scorer_module.prepare_vl_batch

    def spy(convs, imgs, tokenizer, *args, **kw):
        out = prepare(convs, imgs, tokenizer, *args, **kw)
        seen.append((tokenizer, out.input_ids[out.attention_mask]))
        return out

    monkeypatch.setattr(scorer_module, "prepare_vl_batch", spy)
    with_ids = reward([row("Colour?", images[:1], completion, ids=ids)])
    garbage = reward([row("Colour?", images[:1], completion, ids=[think_id] * 50)])
    assert with_ids == garbage  # the policy's token ids are never read
    tokenizer, fed = seen[0]
    assert tokenizer is scorer.tokenizer
    rendered = scorer.tokenizer.apply_chat_template(
        [user("Colour?", 1), {"role": "assistant", "content": completion}], tokenize=False)
    assert completion in rendered and scorer.tokenizer.encode("<think>") != [think_id]
    assert len(scorer.tokenizer.encode("<think>")) > 1  # spelled in the RM's bytes, not the policy's token
    assert set(scorer.tokenizer.encode(completion)) <= set(fed.tolist())


def test_a_conversation_too_long_for_the_reward_model_fails_its_row(rm, images):
    from skyjax.parallel.mesh import make_mesh

    short = load_reward("reward_model", RewardContext(mesh=make_mesh((1, 1, 1))), source=str(rm[0]), batch_size=4,
                        max_length=160)
    rows = [row("Colour?", [], "Red."), row("Colour?", [], "very long " * 40, where="prompts.jsonl:7")]
    with pytest.raises(RewardError, match=r"^reward function 'reward_model' could not score row 1 of 2 "
                                          r"\(prompts.jsonl:7\): \d+ tokens, longer than the 160"):
        short(rows)
    failures = []
    table = compute_rewards([short], rows, on_error="skip", failures=failures)
    assert np.isfinite(table[0, 0]) and np.isnan(table[1, 0])
    assert [(f.reward, f.row, f.where) for f in failures] == [("reward_model", 1, "prompts.jsonl:7")]


def test_bad_reward_model_options(rm, tmp_path):
    with pytest.raises(ValueError, match="think='all' is not one of keep, strip"):
        load_reward("reward_model", source=str(rm[0]), think="all")
    with pytest.raises(ValueError, match="does not accept options"):
        load_reward("reward_model", source=str(rm[0]), temperature=2.0)
    with pytest.raises(ValueError, match="source .* does not exist"):
        load_reward("reward_model", source=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="scale='big' must be a finite number"):
        load_reward("reward_model", source=str(rm[0]), scale="big")
    policy = tmp_path / "policy"
    shutil.copytree(rm[0], policy)
    (policy / "value_head.safetensors").unlink()  # a Qwen2.5-VL without a value head
    with pytest.raises(Exception, match="no value_head.safetensors"):
        load_reward("reward_model", source=str(policy))


# ------------------------------------------------------------------------------------ failing rewards: raise or skip


def flaky(rows):
    """Raises on the rows of one prompt (answer 'Blue.')."""
    for r in rows:
        if r.answer == "Blue.":
            raise ZeroDivisionError("no blue")
    return [1.0] * len(rows)


def nan_on_blue(rows):
    return [float("nan") if r.answer == "Blue." else 0.5 for r in rows]


def constant(rows):
    return [1.0] * len(rows)


def plain_rows(answers):
    return [Rollout(prompt="p", completion="c", answer=a, where=f"prompts.jsonl:{i + 1}")
            for i, a in enumerate(answers)]


def test_a_raising_reward_names_the_function_and_the_prompt_row():
    rows = plain_rows(["Red.", "Blue.", "Red."])
    with pytest.raises(RewardError, match=r"^reward function '.*:flaky' raised ZeroDivisionError: no blue on row 1 "
                                          r"of 3 \(prompts.jsonl:2\)$"):
        compute_rewards([load_reward(f"{__name__}:flaky")], rows)
    with pytest.raises(RewardError, match=r"returned nan for row 1 \(prompts.jsonl:2\); return None"):
        compute_rewards([load_reward(f"{__name__}:nan_on_blue")], rows)


def test_skip_leaves_only_the_failed_rows_unscored_and_lists_them():
    rows = plain_rows(["Red.", "Blue.", "Red.", "Blue."])
    failures = []
    rewards = [load_reward(f"{__name__}:constant"), load_reward(f"{__name__}:flaky"),
               load_reward(f"{__name__}:nan_on_blue")]
    table = compute_rewards(rewards, rows, on_error="skip", failures=failures)
    np.testing.assert_array_equal(table[:, 0], 1.0)
    np.testing.assert_array_equal(np.isnan(table[:, 1:]), [[False, False], [True, True]] * 2)
    assert sorted((f.reward.split(":")[-1], f.row, f.where) for f in failures) == [
        ("flaky", 1, "prompts.jsonl:2"), ("flaky", 3, "prompts.jsonl:4"),
        ("nan_on_blue", 1, "prompts.jsonl:2"), ("nan_on_blue", 3, "prompts.jsonl:4")]
    assert failed_rows(failures, 4).tolist() == [False, True, False, True]
    # a reward's own on_error wins over the caller's
    strict = dataclasses.replace(load_reward(f"{__name__}:flaky"), on_error="raise")
    with pytest.raises(RewardError, match="flaky"):
        compute_rewards([strict], rows, on_error="skip")


def test_a_function_that_names_its_failed_rows_is_not_rerun():
    calls = []

    def judge(rows):
        calls.append(len(rows))
        raise RowFailures([0.25, None, 0.75], {1: "the judge timed out"})

    failures = []
    table = compute_rewards([load_reward(judge)], plain_rows(["a", "b", "c"]), on_error="skip", failures=failures)
    assert calls == [3] and np.isnan(table[1, 0]) and table[[0, 2], 0].tolist() == [0.25, 0.75]
    assert "could not score row 1 of 3 (prompts.jsonl:2): the judge timed out" in failures[0].message


def test_a_batch_only_failure_skips_every_row():
    def batch_only(rows):
        if len(rows) > 1:
            raise RuntimeError("too many")
        return [1.0]

    failures = []
    table = compute_rewards([load_reward(batch_only)], plain_rows(["a", "b"]), on_error="skip", failures=failures)
    # each row alone succeeds: those values are kept, nothing is skipped
    assert table[:, 0].tolist() == [1.0, 1.0] and not failures

    def always(rows):
        raise RuntimeError("down")

    table = compute_rewards([load_reward(always)], plain_rows(["a", "b"]), on_error="skip", failures=failures)
    assert np.isnan(table).all() and [f.row for f in failures] == [0, 1]


def test_a_user_factory_gets_the_context():
    seen = {}

    @reward_factory
    def make(context, *, bonus=0.0):
        seen["context"] = context

        def fn(rows):
            return [bonus] * len(rows)
        return fn

    context = RewardContext(dtype="bfloat16")
    reward = load_reward(make, context, bonus=2.0)
    assert isinstance(reward, Reward) and reward(plain_rows(["a"])) == [2.0] and seen["context"] is context
    with pytest.raises(ValueError, match="does not accept options"):
        load_reward(make, context, malus=1.0)


# ------------------------------------------------------------------------------------------------ inside a grpo run


@pytest.fixture(scope="module")
def trainer(tmp_path_factory, rm):
    """A tiny Skywork R1V policy (its own tokenizer) with the reward model as its only reward, on a (2, 2, 2) mesh;
    one of the four prompt rows names a missing image (data.on_error: skip)."""
    from skyjax.config import load_config
    from skyjax.train.config import RunConfig
    from skyjax.train.trainer import Trainer

    root = tmp_path_factory.mktemp("grpo_rm")
    rows = []
    for i, (q, answer) in enumerate([("Colour?", "Red."), ("Which colour is larger?", "Blue."), ("Name it.", "Red."),
                                     ("Missing?", "Red.")]):
        if i < 3:
            random_image(10 + i, 56 + 14 * i, 56).save(root / f"{i}.png")
        content = [{"type": "image"}, {"type": "text", "text": q}]
        rows.append({"images": [f"{i}.png"], "prompt": [{"role": "user", "content": content}], "answer": answer})
    data = root / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(RunConfig, None, [
        "kind=grpo", "model.source=tiny", "model.tiny_layers=2", "model.tiny_vision_depth=2",
        "model.tiny_init_std=0.2", f"data.train=[{data}]", "data.batch_size=4", "data.max_tiles=1",
        "data.tile_buckets=[16]", "data.on_error=skip", "optimizer.grad_accum=1", "optimizer.lr=1e-3",
        "trainer.steps=1", "trainer.progress=false", "trainer.export=false", "trainer.async_checkpointing=false",
        "mesh.shape=[2,2,2]", f"rollout.num_generations={G}", "rollout.max_new_tokens=4",
        f"rollout.rewards=[{{name: reward_model, weight: 2.0, options: {{source: '{rm[0]}', batch_size: 8}}}}]"])
    return Trainer(cfg, root / "run", resume=False, log=lambda m: None)


def test_the_reward_model_sits_on_the_trainers_mesh(trainer):
    scorer = scorer_of(trainer.batches.rewards[0])
    assert scorer is not None and scorer.mesh is trainer.mesh
    leaves = jax.tree.leaves(scorer.model.params)
    assert all(leaf.sharding.mesh == trainer.mesh for leaf in leaves)
    assert any(not leaf.sharding.is_fully_replicated for leaf in leaves)  # really spread over the mesh
    assert scorer.tokenizer.get_vocab() != trainer.bundle.tokenizer.get_vocab()


def test_a_step_with_the_reward_model_as_the_only_reward(trainer, rm):
    from skyjax.train.optimizer import flatten

    src = trainer.batches
    recorded = []
    inner = src.rewards[0]

    def recording(rows):
        recorded.extend(rows)
        return inner.fn(rows)

    src.rewards = [dataclasses.replace(inner, fn=recording)]
    batch, row_ids = src.next(trainer.state)
    # the prompt with the missing image was skipped: a zero-weight copy of another prompt stands in for it
    weights = batch["row_weight"].reshape(-1)
    assert weights.tolist().count(0.0) == G
    assert any(r["file"].endswith("prompts.jsonl") and r["line"] == 4 for r in trainer.skipped_rows())
    # the reward model saw each prompt row's own messages and images (decoded from its files) with a completion...
    assert len(recorded) == 4 * G
    by_line = {json.dumps(r["prompt"]): r for r in map(json.loads, open(trainer.cfg.data.train[0]))}
    for r in recorded:
        source = by_line[json.dumps(r.messages)]
        assert r.where.endswith(f"prompts.jsonl:{list(by_line).index(json.dumps(r.messages)) + 1}")
        assert [p.rsplit("/", 1)[-1] for p in r.images] == source["images"]
        assert all(np.array_equal(np.asarray(a), np.asarray(load_image(p))) for a, p in zip(r.image_data, r.images))
    # ...and every completion's reward is the weight x its score (the score itself is checked against the scorer
    # alone and transformers above)
    want = 2.0 * np.array(inner(recorded))
    live = weights > 0
    np.testing.assert_allclose(batch["rewards"].reshape(-1)[live], want[live], atol=2e-5)
    assert (batch["rewards"].reshape(-1)[~live] == 0).all() and (batch["advantages"].reshape(-1)[~live] == 0).all()
    assert np.abs(batch["advantages"]).max() > 0
    before = {k: np.array(v) for k, v in flatten(trainer.state["trainable"]).items()}
    src.cached, src.used = (batch, row_ids), 0  # train on exactly this rollout
    last = trainer.fit()
    assert np.isfinite(last["loss"]) and last["ratio_max_dev"] <= 1e-5
    assert last["reward_skipped_fraction"] == 0.0
    after = flatten(trainer.state["trainable"])
    assert any(not np.array_equal(before[k], np.asarray(after[k])) for k in before)


def test_failing_rewards_in_a_run_raise_naming_the_row_or_are_skipped_and_counted(trainer):
    from skyjax.train.losses.advantages import group_advantages

    src = trainer.batches
    examples = next(src.iterator)["prompts"]
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, 250, (len(examples) * G, 4))
    lengths = np.full(len(examples) * G, 4)
    blue = [e.row_id for e in examples if e.record.answer == "Blue."]
    assert blue  # the prompt flaky fails on is in this batch
    src.rewards = [load_reward(f"{__name__}:constant"), load_reward(f"{__name__}:flaky")]
    src.weights = [1.0, 1.0]
    with pytest.raises(RewardError, match=rf"'{__name__}:flaky' raised ZeroDivisionError: no blue on row \d+ of "
                                          rf"{len(examples) * G} \({re.escape(blue[0])}\)"):
        src.score(examples, tokens, lengths)
    src.rollout = dataclasses.replace(src.rollout, on_reward_error="skip")
    total, table, _ = src.score(examples, tokens, lengths)
    is_blue = np.repeat([e.record.answer == "Blue." for e in examples], G)
    stand_in = np.repeat([e.weight == 0 for e in examples], G)  # the missing image's place: no reward either
    assert stand_in.sum() == G
    assert np.isnan(total[is_blue]).all() and (total[~is_blue & ~stand_in] == 2.0).all()  # no partial reward
    assert np.isnan(total[stand_in]).all() and np.isfinite(table[is_blue, 0]).all()
    assert src.skipped_completions == is_blue.sum() and {f.where for f in src.reward_failures} == set(blue)
    adv, _ = group_advantages(jax.numpy.asarray(total), G)
    assert (np.asarray(adv)[is_blue] == 0).all()
    # through a whole rollout: the skipped completions are flagged in the batch (logged reward_skipped_fraction)
    src.rewards, src.weights = [load_reward(f"{__name__}:nan_on_blue")], [1.0]
    batch, row_ids = src.next(trainer.state)
    flagged = batch["reward_skipped"].reshape(-1).astype(bool)
    assert flagged.tolist() == [r in blue for r in row_ids]
    assert (batch["advantages"].reshape(-1)[flagged] == 0).all()


def test_a_missing_image_is_an_error_naming_the_row(trainer, tmp_path):
    from skyjax.train.batching import BadRowError
    from skyjax.train.grpo import PromptPipeline
    from skyjax.train.pipeline import read_records

    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"images": ["gone.png"], "prompt": "What is it?", "answer": "Red."}) + "\n")
    records, _ = read_records([data], "raise", kind="generate")
    pipe = PromptPipeline(records, trainer.bundle, dataclasses.replace(trainer.cfg.data, on_error="raise",
                                                                        batch_size=1))
    with pytest.raises(BadRowError, match=rf"{data}:1: image file not found: .*gone.png"):
        next(iter(pipe.dataset))


def test_reward_error_settings_in_the_config():
    from skyjax.config import ConfigError, load_config
    from skyjax.train.config import RunConfig

    cfg = load_config(RunConfig, None, ["kind=grpo", "data.train=[p.jsonl]", "rollout.on_reward_error=skip",
                                        "rollout.rewards=[{name: accuracy}, {name: format, on_error: raise}]"])
    assert cfg.rollout.on_reward_error == "skip" and [r.on_error for r in cfg.rollout.rewards] == [None, "raise"]
    with pytest.raises(ConfigError, match="rollout.on_reward_error"):
        load_config(RunConfig, None, ["kind=grpo", "data.train=[p.jsonl]", "rollout.on_reward_error=ignore"])
    with pytest.raises(ConfigError, match="on_error"):
        load_config(RunConfig, None, ["kind=grpo", "data.train=[p.jsonl]",
                                      "rollout.rewards=[{name: format, on_error: maybe}]"])
