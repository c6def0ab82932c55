"""SFT in the one trainer: the assistant-token loss against an independent numpy cross-entropy, token vs sequence
averaging, projector-only training, gradient accumulation, SFT records and bad rows, the abstract (AOT) step, and a
tiny R1V run end to end on the (2, 2, 2) CPU mesh."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import random_image
from skyjax.config import load_config
from skyjax.data.records import RecordError, parse_record
from skyjax.data.synthetic_sft import make_sft_records
from skyjax.data.tokenizer import build_tiny_tokenizer, special_token_ids
from skyjax.models.r1v import R1VConfig, R1VForConditionalGeneration
from skyjax.nn.functional import Functional
from skyjax.parallel import make_mesh, use_mesh
from skyjax.train.config import ModelConfig, ObjectiveConfig, RunConfig, SFTObjectiveConfig
from skyjax.train.objectives import OBJECTIVES, sft_loss
from skyjax.train.optimizer import FREEZE_PRESETS, flatten, frozen_predicate, split_params
from skyjax.train.batching import BadRowError, host_batch
from skyjax.train.pipeline import read_records
from skyjax.train.sft import SFTPipeline, collate_sft, featurize_sft, tiny_r1v, vision_format
from skyjax.train.step import abstract_state, build_train_step, jit_train_step, state_shardings
from skyjax.train.tasks import abstract_batch

CONFIG = "configs/sft/r1v_tiny.yaml"
QUICK = ["trainer.progress=false", "trainer.export=false", "trainer.async_checkpointing=false",
         "data.synthetic.train=32", "data.synthetic.heldout=8"]


def config(*overrides):
    return load_config(RunConfig, CONFIG, [*QUICK, *overrides])


def host(tree):
    return {k: np.array(v) for k, v in flatten(tree).items()}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """The tiny R1V of configs/sft/r1v_tiny.yaml (not placed on a mesh) with its InternVL tokenizer."""
    return tiny_r1v(config().model, None, tmp_path_factory.mktemp("tiny_r1v"))


def qwen_bundle():
    """A tiny random Qwen2.5-VL (the other SFT family) with its Qwen tokenizer; images of 56-112 px."""
    from skyjax.convert.checkpoint import LoadedModel
    from skyjax.convert.registry import ARCHITECTURES
    from skyjax.data.qwen_vl_image import QwenVLImageConfig
    from skyjax.models.qwen2_5_vl import Qwen2_5_VLConfig
    from skyjax.train.bundle import ModelBundle

    tok = build_tiny_tokenizer("qwen2_5_vl")
    ids = special_token_ids(tok)
    cfg = Qwen2_5_VLConfig.tiny(image_token_id=ids["image_pad"], video_token_id=ids["video_pad"],
                                vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"])
    arch = ARCHITECTURES["qwen2_5_vl"]
    fn = Functional.create(lambda r: arch.build(cfg, r))
    return ModelBundle(LoadedModel(arch, cfg, fn, None, None, {}), tok,
                       QwenVLImageConfig(min_pixels=56 * 56, max_pixels=112 * 112))


# --- the loss ---------------------------------------------------------------------------------------------------------


def expected_trained(tokenizer, ids, turns):
    """Independently of the chat module: the token positions of the `turns`-th assistant answers (their content and
    the <|im_end|> closing them), found in the ids by the `<|im_start|>assistant\\n` header."""
    header = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    starts = [i + len(header) for i in range(len(ids)) if list(ids[i:i + len(header)]) == header]
    out = []
    for k in turns:
        start = starts[k]
        end = start + list(ids[start:]).index(im_end)
        out.extend(range(start, end + 1))  # the answer and its <|im_end|>
    return out


@pytest.mark.parametrize("family", ["r1v", "qwen2_5_vl"])
def test_loss_trains_only_assistant_tokens_and_averages(bundle, tmp_path, family):
    """A hand-made batch: a two-turn conversation with an image (both answers trained), a prompt/completion row whose
    prompt holds an earlier assistant turn (only the completion is trained) and a zero-weight padding row. The loss
    equals a numpy cross-entropy over exactly the expected positions, by token and by sequence."""
    bundle = bundle if family == "r1v" else qwen_bundle()
    tok = bundle.tokenizer
    random_image(0, 56, 56).save(tmp_path / "a.png")
    rows = [
        {"images": ["a.png"], "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
            {"role": "assistant", "content": "Red."},
            {"role": "user", "content": "Sure?"},
            {"role": "assistant", "content": "Yes, it is red."}]},
        {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."},
                    {"role": "user", "content": "2+2?"}], "completion": "4."},
    ]
    records = [parse_record(r, kind="sft", base_dir=tmp_path, source="hand.jsonl", line=i + 1)
               for i, r in enumerate(rows)]
    data = config().data
    fmt = vision_format(bundle, data)
    examples = [featurize_sft(r, tok, fmt) for r in records]
    batch = collate_sft(examples + examples[:1], fmt, [128], tok.pad_token_id, weights=[1.0, 1.0, 0.0])
    batch, _ = host_batch(batch)
    mb = jax.tree.map(lambda x: x[0], batch)
    ids = mb["input_ids"]
    trained = [expected_trained(tok, ids[0], [0, 1]), expected_trained(tok, ids[1], [1])]
    for row, positions in enumerate(trained):
        assert positions and np.flatnonzero(mb["assistant_mask"][row]).tolist() == positions, row
    if family == "r1v":
        assert mb["vision"]["pixel_values"].shape == (8, 3, 56, 56)  # 1 real tile each for rows 0 and 2, padded

    # a spread-out init so per-token losses differ (the default tiny init predicts nearly uniformly)
    cfg = dataclasses.replace(bundle.model.config,
                              text=dataclasses.replace(bundle.model.config.text, initializer_range=0.5))
    arch = bundle.model.arch
    fn = Functional.create(lambda r: arch.build(cfg, r))
    params = fn.init(seed=1)

    @jax.jit
    def run(params, mb):
        model = fn.bind(params)
        logits, _ = model(mb["input_ids"], attention_mask=mb["attention_mask"], **mb["vision"])
        out = {"logits": logits}
        for name, ocfg in (("token", SFTObjectiveConfig()), ("sequence", SFTObjectiveConfig(average="sequence")),
                           ("chunked", SFTObjectiveConfig(logits_chunk=32))):
            out[name] = sft_loss(model, mb, ocfg)
        return out

    out = jax.device_get(run(params, mb))
    logits = out["logits"].astype(np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.sum(np.exp(logits - top), -1, keepdims=True))  # log-softmax
    per_row = [np.array([-logp[r, p - 1, ids[r, p]] for p in positions]) for r, positions in enumerate(trained)]
    correct = sum(int(np.sum(np.argmax(logits[r, [p - 1 for p in pos]], -1) == ids[r, pos]))
                  for r, pos in enumerate(trained))
    token_mean = np.concatenate(per_row).mean()
    sequence_mean = np.mean([x.mean() for x in per_row])

    loss, sums = out["token"]
    assert loss == pytest.approx(token_mean, rel=1e-5)
    assert sums["tokens"] == sum(map(len, trained)) == sums["weight"] and sums["sequences"] == 2
    assert sums["correct"] == correct
    assert OBJECTIVES["sft"].report(sums)["accuracy"] == pytest.approx(correct / sums["tokens"])
    seq_loss, seq_sums = out["sequence"]
    assert seq_loss == pytest.approx(sequence_mean, rel=1e-5) and seq_sums["weight"] == 2
    assert abs(token_mean - sequence_mean) > 1e-2  # rows of 2 and ~20 trained tokens: the averages differ
    assert out["chunked"][0] == pytest.approx(token_mean, rel=1e-5)  # the chunked head computes the same loss


# --- records and bad rows ---------------------------------------------------------------------------------------------


def test_sft_records_both_styles_and_their_errors():
    conv = parse_record({"images": ["x.png"], "messages": [
        {"role": "system", "content": "Look."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]},
        {"role": "assistant", "content": "A"}]}, kind="sft")
    messages, trained = conv.sft_conversation()
    assert conv.prompt == () and len(messages) == 3 and trained is None
    pc = parse_record({"images": ["x.png"], "prompt": "Q", "completion": "A"}, kind="sft")
    messages, trained = pc.sft_conversation()
    assert messages == [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]},
                        {"role": "assistant", "content": "A"}] and trained == (1,)
    bad = [
        ({"prompt": "Q", "chosen": "A", "rejected": "B"}, "completion", "needs 'messages', or 'prompt' and"),
        ({"messages": [{"role": "user", "content": "Q"}]}, "messages", "at least one assistant turn"),
        ({"messages": [{"role": "user", "content": "Q"}], "prompt": "Q"}, "messages", "drop ['prompt']"),
        ({"images": ["x.png"], "messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
         "messages", "0 {'type': 'image'} placeholder(s) but 'images' lists 1"),
        ({"prompt": "Q", "completion": "A", "response": "B"}, "completion", "excludes 'response'"),
    ]
    for row, key, fragment in bad:
        with pytest.raises(RecordError, match=r"rows.jsonl:4: key") as info:
            parse_record(row, kind="sft", source="rows.jsonl", line=4)
        assert info.value.key == key and fragment in str(info.value), (row, str(info.value))
    with pytest.raises(RecordError, match="kind 'preference' does not take 'messages'"):
        parse_record({"messages": [{"role": "assistant", "content": "A"}]}, kind="preference")


def test_bad_rows_are_named_or_skipped_and_counted(bundle, tmp_path):
    folder = tmp_path / "data"
    path = make_sft_records(folder, "train", 12, seed=0, tasks=("colour",))
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[2]["images"] = ["images/missing.png"]
    (folder / "images" / "corrupt.png").write_bytes(b"\x89PNG garbage")
    rows[4]["images"] = ["images/corrupt.png"]
    rows[6]["messages"][-1]["content"] = "very long answer " * 10  # over the 96-token bucket
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = dataclasses.replace(config().data, batch_size=4, synthetic=None)

    records, skipped = read_records([path], "raise", kind="sft")
    assert len(records) == 12 and not skipped
    pipe = SFTPipeline(records, bundle, data, shuffle=False)
    with pytest.raises(BadRowError, match=r"train.jsonl:3: .*missing.png"):
        next(iter(pipe.dataset))
    pipe = SFTPipeline(records, bundle, dataclasses.replace(data, on_error="skip"), shuffle=False)
    batches = [batch for _, batch in zip(range(3), pipe.dataset)]  # 12 rows
    weights = np.concatenate([b["row_weight"].reshape(-1) for b in batches])
    assert weights.sum() == 9 and sum(pipe.skipped.values()) == 3
    assert sorted(pipe.bad_rows) == [f"{path}:3", f"{path}:5", f"{path}:7"]
    reasons = " ".join(pipe.skipped)
    assert "missing.png" in reasons and "corrupt.png" in reasons and "too long" in reasons
    assert all(b["input_ids"].shape == (1, 4, 96) for b in batches)  # skipped rows keep the shape

    rows[1]["rating"] = 5  # an unknown record field
    del rows[8]["messages"][-1]  # system + user only: nothing to train
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(RecordError, match=r"train.jsonl:2: .*rating"):
        read_records([path], "raise", kind="sft")
    records, skipped = read_records([path], "skip", kind="sft")
    assert len(records) == 10 and skipped == {"unknown_key": 1, "missing_key": 1}


# --- training: frozen parts, accumulation, the abstract step ----------------------------------------------------------


def test_projector_only_training_changes_only_the_projector(tmp_path):
    from skyjax.train.trainer import Trainer

    t = Trainer(config("trainer.freeze=[vision,llm]", "trainer.steps=3", "trainer.log_every=1", "mesh.shape=[1,1,1]"),
                tmp_path)
    before_frozen, before_trainable = host(t.state["frozen"]), host(t.state["trainable"])
    assert before_trainable and all(k.startswith("projector/") for k in before_trainable)
    assert {k.split("/")[0] for k in before_frozen} == {"vision_tower", "model", "lm_head"}
    moments = sum(x.size for x in jax.tree.leaves(t.state["opt"]) if x.ndim)  # Adam: 2 per trainable value
    assert moments == 2 * sum(v.size for v in before_trainable.values())
    t.fit()
    after_frozen, after_trainable = host(t.state["frozen"]), host(t.state["trainable"])
    for k in before_frozen:
        np.testing.assert_array_equal(before_frozen[k], after_frozen[k], err_msg=k)  # bit-identical
    assert all(not np.array_equal(before_trainable[k], after_trainable[k]) for k in before_trainable)


def test_freeze_presets_partition_the_r1v_parameters():
    shapes = Functional.create(lambda r: R1VForConditionalGeneration(R1VConfig.tiny(), rngs=r)).shapes
    paths = set(flatten(shapes))
    groups = {name: {p for p in paths if frozen_predicate("internvl_chat", [name])(p)} for name in
              ("vision", "projector", "llm")}
    assert groups["vision"] | groups["projector"] | groups["llm"] == paths
    assert not (groups["vision"] & groups["projector"]) and not (groups["projector"] & groups["llm"])
    assert "lm_head/kernel" in groups["llm"] and "model/embed_tokens/embedding" in groups["llm"]
    assert groups["projector"] == {p for p in paths if p.startswith("projector/")}
    assert FREEZE_PRESETS["internvl"] is FREEZE_PRESETS["r1v"]
    with pytest.raises(ValueError, match="not a preset of internvl"):
        frozen_predicate("internvl", ["merger"])


def test_gradient_accumulation_equals_one_batch(bundle, tmp_path):
    """Two micro-batches of 2 rows (different numbers of trained tokens) give the same step as one batch of 4:
    plain SGD with lr 1 makes the parameter change the gradient itself."""
    path = make_sft_records(tmp_path, "train", 4, seed=3, tasks=("colour", "position"))
    records, _ = read_records([path], kind="sft")
    data = dataclasses.replace(config().data, batch_size=4, synthetic=None)
    one = host_batch(next(iter(SFTPipeline(records, bundle, data, shuffle=False).dataset)))[0]
    two = host_batch(next(iter(SFTPipeline(records, bundle, data, shuffle=False, micro_batches=2).dataset)))[0]
    assert one["input_ids"].shape == (1, 4, 96) and two["input_ids"].shape == (2, 2, 96)
    per_micro = two["assistant_mask"].sum(axis=(1, 2))
    assert per_micro[0] != per_micro[1]  # so a mean of micro-batch means would be wrong

    model = bundle.model
    is_frozen = frozen_predicate(model.arch.name, ["vision"])
    trainable, frozen = split_params(model.params, is_frozen)
    opt = optax.sgd(1.0)
    step = jax.jit(build_train_step(model.fn, OBJECTIVES["sft"], opt, optax.constant_schedule(1.0),
                                    ObjectiveConfig()))
    state = {"step": jnp.zeros((), jnp.int32), "trainable": trainable, "frozen": frozen, "opt": opt.init(trainable)}
    new_one, stats_one = step(state, one)
    new_two, stats_two = step(state, two)
    for key in ("loss", "weight", "correct", "tokens", "sequences"):
        assert float(stats_two[key]) == pytest.approx(float(stats_one[key]), rel=1e-5), key
    assert float(stats_two["grad_norm"]) == pytest.approx(float(stats_one["grad_norm"]), rel=1e-4)
    a, b = host(new_one["trainable"]), host(new_two["trainable"])
    g = host(trainable)
    for k in a:
        grad_one, grad_two = g[k] - a[k], g[k] - b[k]
        np.testing.assert_allclose(grad_two, grad_one, rtol=0, atol=1e-5 * max(np.abs(grad_one).max(), 1e-3),
                                   err_msg=k)


def test_abstract_batch_matches_the_pipeline_and_the_step_lowers(bundle, tmp_path):
    """The AOT inputs: the abstract batch of the config's largest buckets has exactly the shapes, dtypes and
    shardings of a real batch, and the step lowers on the (2, 2, 2) mesh from ShapeDtypeStructs alone."""
    from skyjax.train.batching import to_device

    cfg = config("optimizer.grad_accum=2")
    mesh = make_mesh((2, 2, 2))
    path = make_sft_records(tmp_path, "train", 8, seed=0)
    records, _ = read_records([path], kind="sft")
    real = host_batch(next(iter(SFTPipeline(records, bundle, cfg.data, micro_batches=2).dataset)))[0]
    placed = to_device(real, mesh)
    spec = abstract_batch(cfg, bundle, mesh)
    assert jax.tree.structure(spec) == jax.tree.structure(placed)
    for s, x in zip(jax.tree.leaves(spec), jax.tree.leaves(placed)):
        assert (s.shape, s.dtype, s.sharding) == (x.shape, x.dtype, x.sharding)
    fn = bundle.model.fn
    is_frozen = frozen_predicate("internvl", cfg.trainer.freeze)
    from skyjax.train.optimizer import build_optimizer

    optimizer, schedule = build_optimizer(cfg.optimizer, 10)
    step = build_train_step(fn, OBJECTIVES["sft"], optimizer, schedule, cfg.objective)
    with use_mesh(mesh):
        lowered = jit_train_step(step, state_shardings(fn, optimizer, is_frozen, mesh), mesh).lower(
            abstract_state(fn, optimizer, is_frozen, mesh), spec)
    assert "num_partitions = 8" in lowered.as_text()  # one program partitioned over the 8 devices


# --- end to end -------------------------------------------------------------------------------------------------------


def test_tiny_r1v_sft_end_to_end(tmp_path):
    """`skyjax train configs/sft/r1v_tiny.yaml` (its python entry point) on the (2, 2, 2) mesh: the loss falls, and
    summary.json, the skyjax checkpoint and a Hugging Face export that transformers loads are written."""
    import torch
    from transformers import InternVLForConditionalGeneration

    from skyjax.convert.checkpoint import load_checkpoint, load_hf
    from skyjax.train.cli import train

    cfg = load_config(RunConfig, CONFIG, ["trainer.progress=false", "trainer.log_every=1", "trainer.steps=12",
                                          "data.synthetic.train=96", "data.synthetic.heldout=16"])
    assert cfg.kind == "sft" and tuple(cfg.mesh.shape) == (2, 2, 2)
    summary = train(cfg, tmp_path)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in logged if r["split"] == "train"]
    assert len(losses) == 12 and losses[-1] < min(0.7 * losses[0], losses[0] - 1.0), losses
    assert all(r["tokens"] > 0 and 0 <= r["accuracy"] <= 1 for r in logged if r["split"] == "train")
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["kind"] == "sft" and on_disk["steps"] == 12 and on_disk["skipped_rows"] == 0
    assert on_disk["heldout_loss"] < losses[0] and on_disk["eval"]["heldout"]["tokens"] > 0
    paths = summary["paths"]
    ckpt = load_checkpoint(paths["checkpoint"])
    exported = load_hf(paths["hf_export"])
    assert ckpt.arch.name == "internvl" and exported.config == ckpt.config
    for k, v in host(ckpt.params).items():
        np.testing.assert_array_equal(v, host(exported.params)[k], err_msg=k)
    hf = InternVLForConditionalGeneration.from_pretrained(paths["hf_export"])
    assert hf.config.image_token_id == special_token_ids(build_tiny_tokenizer("internvl"))["img_context"]
    np.testing.assert_array_equal(hf.state_dict()["model.multi_modal_projector.linear_1.weight"].numpy(),
                                  host(ckpt.params)["projector/linear_1/kernel"].T)
    assert torch.is_tensor(hf.lm_head.weight)


def test_shipped_sft_configs():
    root = "configs/sft/"
    projector = load_config(RunConfig, root + "r1v_38b_projector.yaml")
    full = load_config(RunConfig, root + "r1v_38b_full.yaml")
    tiny = load_config(RunConfig, root + "r1v_tiny.yaml")
    assert {projector.kind, full.kind, tiny.kind} == {"sft"}
    assert set(projector.trainer.freeze) == {"vision", "llm"} and tuple(full.trainer.freeze) == ("vision",)
    for cfg in (projector, full):  # the paper's stated values
        assert (cfg.data.batch_size, cfg.data.max_length, cfg.optimizer.weight_decay,
                cfg.optimizer.warmup_ratio) == (512, 16384, 0.05, 0.03)
        assert max(cfg.data.seq_buckets) == 16384 and 16384 % cfg.objective.sft.logits_chunk == 0
    assert projector.optimizer.lr == 2e-4
    assert isinstance(tiny.model, ModelConfig) and tiny.model.source == "tiny"
