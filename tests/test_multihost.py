"""Multi-host training batches (skyjax.train.global_batch): hosts' local batches -> one host-major global batch.

Simulated in one process: two different local batches (different images, patch / tile counts and buckets) are
assembled into the global batch, and the objective on it equals the objective on each local batch alone (per-pair
scores, summed metrics), for the reward model and for SFT (R1V tiles, Qwen2.5-VL patches). Then a real two-process
job (jax.distributed on localhost, gloo CPU collectives, 4 CPU devices each): each process reads its half of the pairs
and `to_device` assembles the global batch on the (2, 2, 2) mesh; the scores equal one process with 8 devices. The
same with the real Trainer for 2 steps, compared with one process, is opt-in (SKYJAX_TEST_MULTIPROCESS_TRAINER=1: about 2
minutes on 2 cores); the two-process `skyjax train` that is preempted, resumes and restores onto one process runs in
CI (tests/test_preemption.py).
"""

import dataclasses
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from helpers import random_image
from skyjax.config import load_config
from skyjax.data.records import parse_record
from skyjax.models.qwen2_5_vl_vision import META_KEYS, PAD_SEGMENT
from skyjax.parallel import make_mesh, use_mesh
from skyjax.train import global_batch as gb
from skyjax.train.config import RewardModelObjectiveConfig, RunConfig, SFTObjectiveConfig
from skyjax.train.objectives import bradley_terry, pair_scores, sft_loss
from skyjax.train.batching import host_batch
from skyjax.train.global_batch import batch_shardings
from skyjax.train.pairs import PairBuckets, collate_pairs, featurize_pair
from skyjax.train.sft import collate_sft, featurize_sft, vision_format

REPO = Path(__file__).resolve().parents[1]
RM_CONFIG = "configs/demo/reward_model.yaml"
TINY_RM = ["model.tiny_layers=1", "model.tiny_vision_depth=2"]


def random_params(fn, seed=0, std=0.1):
    """Random parameters drawn on the host (numpy): norm weights 1 + noise, everything else noise. Much quicker
    than compiling `fn.init` for every tiny model, and as good for comparing two layouts of one batch."""
    rng = np.random.RandomState(seed)

    def draw(path, s):
        keys = [str(getattr(k, "key", k)) for k in path]
        noise = rng.normal(0, std, s.shape)
        is_norm = keys[-1] == "weight" and any("norm" in k or k.startswith("ln") for k in keys[:-1])
        return (noise + 1 if is_norm else noise).astype(s.dtype)

    return jax.tree_util.tree_map_with_path(draw, fn.shapes)


def reward_bundle(folder, vision_depth=2):
    """The tiny reward model of the demo config (1 LLM layer, 2 vision blocks: a window and a full-attention one)
    with host-drawn parameters."""
    from skyjax.convert.checkpoint import LoadedModel
    from skyjax.convert.registry import ARCHITECTURES
    from skyjax.data.tokenizer import build_tiny_tokenizer, special_token_ids
    from skyjax.nn.functional import Functional
    from skyjax.train.bundle import ModelBundle
    from skyjax.train.setup import TINY_IMAGE_CFG, tiny_reward_config

    cfg = load_config(RunConfig, RM_CONFIG, [*TINY_RM, f"model.tiny_vision_depth={vision_depth}"])
    tok = build_tiny_tokenizer("qwen2_5_vl")
    mcfg = tiny_reward_config(cfg.model, special_token_ids(tok))
    arch = ARCHITECTURES["qwen2_5_vl_reward"]
    fn = Functional.create(lambda r: arch.build(mcfg, r))
    return ModelBundle(LoadedModel(arch, mcfg, fn, random_params(fn), folder, {}), tok, TINY_IMAGE_CFG)


def test_meta_rules_cover_the_vision_inputs():
    assert set(gb.META_RULES) == set(META_KEYS) and gb.PAD_SEGMENT == PAD_SEGMENT


def images(tmp_path, sizes):
    """Random images of the given (width, height) saved under tmp_path; their file names."""
    paths = []
    for w, h in sizes:
        n = len(list(tmp_path.glob("img*.png")))
        random_image(n, w, h).save(tmp_path / f"img{n}.png")
        paths.append(f"img{n}.png")
    return paths


def pair_record(tmp_path, sizes, question, chosen, rejected, line):
    content = [{"type": "image"}] * len(sizes) + [{"type": "text", "text": question}]
    row = {"images": images(tmp_path, sizes), "prompt": [{"role": "user", "content": content}],
           "chosen": [{"role": "assistant", "content": chosen}],
           "rejected": [{"role": "assistant", "content": rejected}]}
    return parse_record(row, kind="preference", base_dir=tmp_path, source="pairs.jsonl", line=line)


def run_per_micro(fn, batch):
    """fn(micro-batch) for every micro-batch of a [A, ...] batch."""
    a = batch["input_ids"].shape[0]
    return [jax.device_get(fn(jax.tree.map(lambda x: x[i], batch))) for i in range(a)]


def run_alone(fn, local, own_buckets):
    """fn on every micro-batch of each host's local batch on its own: with the buckets it was collated with, or
    (`own_buckets=False`, one compile fewer) padded to the buckets the global batch uses, as the multi-host path
    pads it before assembling."""
    if not own_buckets:
        local = gb.pad_to_common(local)
    return [run_per_micro(fn, b) for b in local]


@pytest.mark.parametrize("layout", ["two_rows", "shared_prompt"])
def test_reward_global_batch_scores_every_host_as_alone(tmp_path, layout):
    """Host 0: 4 pairs with one 56 px image each (short answers); host 1: larger and several images, a text-only pair
    and long answers, so its sequence, patch and image-slot buckets are all larger. On the host-major global batch
    every pair scores as on its own host, and the loss sums add up; in the two-row layout (chosen rows, rejected
    rows per host; on the (2, 2, 2) mesh, each host's batch alone with its own buckets) and in the shared-prompt one
    (data.share_prompt: one row per pair; each host's batch alone padded to the common buckets, one compile)."""
    from skyjax.train.objectives import shared_prompt_scores
    from skyjax.train.pairs import collate_shared_prompt

    collate, scores = ((collate_pairs, pair_scores) if layout == "two_rows" else
                       (collate_shared_prompt, shared_prompt_scores))
    rows = 2 if layout == "two_rows" else 1  # per pair
    bundle = reward_bundle(tmp_path)
    tok, image_cfg, vcfg = bundle.tokenizer, bundle.image_cfg, bundle.model.config.vision
    buckets = PairBuckets(seq=(96, 192, 256), patches=(32, 64, 128, 256), images=(1, 2, 4, 8))
    host0 = [pair_record(tmp_path, [(56, 56)], f"Colour {i}?", "Red.", "Blue.", i) for i in range(4)]
    host1 = [pair_record(tmp_path, [(112, 112)], "Which shape is in the picture?", "A circle, near the top left.",
                         "A square.", 10),
             pair_record(tmp_path, [(56, 56), (112, 56)], "Same colour?", "No: the first is red " * 3, "Yes.", 11),
             pair_record(tmp_path, [], "What is 2 + 3?", "5.", "6.", 12),
             pair_record(tmp_path, [(56, 112)], "Colour?", "Green.", "Green, surely, and a lot of it.", 13)]
    local = []
    for records, weights in ((host0, [1, 1, 1, 0]), (host1, [1, 1, 1, 1])):
        examples = [featurize_pair(r, tok, image_cfg) for r in records]
        local.append(host_batch(collate(examples, vcfg, buckets, tok.pad_token_id, micro_batches=2,
                                        weights=weights))[0])
    for key in ("input_ids", "pixel_values", "image_grid_thw"):  # the hosts picked different buckets
        assert local[0][key].shape != local[1][key].shape, key
    glob = gb.assemble_global_batch(local)
    assert glob["host_blocks"].tolist() == [[0, 1], [0, 1]] and gb.host_blocks(glob) == 2
    assert glob["input_ids"].shape == (2, 2 * 2 * rows, 192) and glob["pixel_values"].shape == (2, 2 * 128, 1176)
    assert glob["image_grid_thw"].shape == (2, 2 * rows * 4, 3)  # 4 image slots, per row group, per host
    # the vision metadata: a permutation of the global merge units, host 1's segments distinct from host 0's
    meta = glob["vision_meta"]
    assert sorted(meta["window_index"][0].tolist()) == list(range(2 * 32))
    np.testing.assert_array_equal(meta["reverse_index"][0], np.argsort(meta["window_index"][0]))
    seg0, seg1 = meta["image_segment"][0, :128], meta["image_segment"][0, 128:]
    assert not set(seg0[seg0 >= 0].tolist()) & set(seg1[seg1 >= 0].tolist())

    fn = bundle.model.fn
    params = bundle.model.params
    ocfg = RewardModelObjectiveConfig()

    def objective(params, mb):
        model = fn.bind(params)
        chosen, rejected = scores(model, mb)
        return chosen, rejected, bradley_terry(chosen, rejected, mb["pair_weight"], ocfg)[1]

    run = jax.jit(objective)
    # the two-row layout with each host's own buckets: the padding to the common ones is checked by the model too
    alone = run_alone(lambda mb: run(params, mb), local, own_buckets=layout == "two_rows")
    if layout == "two_rows":  # on the (2, 2, 2) mesh, rows split over the batch axes
        mesh = make_mesh((2, 2, 2))
        with use_mesh(mesh):
            placed = jax.device_put(glob, batch_shardings(glob, mesh))
            assert placed["input_ids"].sharding.spec[1] == ("data", "fsdp")
            together = run_per_micro(lambda mb: run(params, mb), placed)
    else:
        together = run_per_micro(lambda mb: run(params, mb), glob)
    for i, (c, r, sums) in enumerate(together):
        np.testing.assert_allclose(c, np.concatenate([alone[0][i][0], alone[1][i][0]]), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(r, np.concatenate([alone[0][i][1], alone[1][i][1]]), rtol=1e-5, atol=1e-6)
        for key, value in sums.items():
            assert value == pytest.approx(alone[0][i][2][key] + alone[1][i][2][key], rel=1e-5, abs=1e-6), (i, key)
    assert not np.allclose(together[0][0], together[0][1])  # the scores say something


def sft_records(tmp_path, n_images, answer_repeats, line0):
    out = []
    for i, n in enumerate(n_images):
        content = [{"type": "image"}] * n + [{"type": "text", "text": f"Colours of {n} images?"}]
        row = {"images": images(tmp_path, [(56, 56)] * n),
               "messages": [{"role": "user", "content": content},
                            {"role": "assistant", "content": "Red and blue. " * answer_repeats * (1 + i)}]}
        out.append(parse_record(row, kind="sft", base_dir=tmp_path, source="sft.jsonl", line=line0 + i))
    return out


def r1v_bundle(cfg):
    from skyjax.convert.checkpoint import LoadedModel
    from skyjax.convert.registry import ARCHITECTURES
    from skyjax.data.tokenizer import build_tiny_tokenizer, special_token_ids
    from skyjax.nn.functional import Functional
    from skyjax.train.bundle import ModelBundle
    from skyjax.train.sft import tiny_r1v_config

    tok = build_tiny_tokenizer("internvl")
    mcfg = tiny_r1v_config(cfg.model, special_token_ids(tok))
    arch = ARCHITECTURES["internvl"]
    fn = Functional.create(lambda r: arch.build(mcfg, r))
    return ModelBundle(LoadedModel(arch, mcfg, fn, random_params(fn), None, {}), tok, mcfg.image_config())


def qwen_sft_bundle():
    """A tiny Qwen2.5-VL for SFT (windows of 2 x 2 merge units: partial on the test's images)."""
    from skyjax.convert.checkpoint import LoadedModel
    from skyjax.convert.registry import ARCHITECTURES
    from skyjax.data.qwen_vl_image import QwenVLImageConfig
    from skyjax.data.tokenizer import build_tiny_tokenizer, special_token_ids
    from skyjax.models.qwen2_5_vl import Qwen2_5_VLConfig
    from skyjax.nn.functional import Functional
    from skyjax.train.bundle import ModelBundle

    tok = build_tiny_tokenizer("qwen2_5_vl")
    ids = special_token_ids(tok)
    cfg = Qwen2_5_VLConfig.tiny(image_token_id=ids["image_pad"], video_token_id=ids["video_pad"],
                                vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"])
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_hidden_layers=1),  # one window block
                              vision=dataclasses.replace(cfg.vision, depth=2, fullatt_block_indexes=(1,)))
    arch = ARCHITECTURES["qwen2_5_vl"]
    fn = Functional.create(lambda r: arch.build(cfg, r))
    return ModelBundle(LoadedModel(arch, cfg, fn, random_params(fn), None, {}), tok,
                       QwenVLImageConfig(min_pixels=56 * 56, max_pixels=112 * 112))


@pytest.mark.parametrize("family", ["r1v", "qwen2_5_vl"])
def test_sft_global_batch_sums_every_host_as_alone(tmp_path, family):
    """SFT rows (R1V tiles, or Qwen2.5-VL patches + M-RoPE grids): host 0 has 1 image per row, host 1 two and
    longer answers (larger tile / patch, slot and sequence buckets). The global batch's loss sums (tokens, correct,
    sequences) are the two hosts' sums (each host's batch run alone, padded to the common buckets: one compile)."""
    overrides = ["model.tiny_layers=1", "model.tiny_vision_depth=1", "data.seq_buckets=[64,128,192,256,320,384]",
                 "data.tile_buckets=[2,4,8]", "data.patch_buckets=[32,64,128]", "data.image_buckets=[2,4]"]
    cfg = load_config(RunConfig, "configs/sft/r1v_tiny.yaml", overrides)
    bundle = r1v_bundle(cfg) if family == "r1v" else qwen_sft_bundle()
    fmt = vision_format(bundle, cfg.data)
    tok = bundle.tokenizer
    local = []
    for n_images, repeats, line0 in (([1, 1], 1, 0), ([2, 2], 4, 10)):
        examples = [featurize_sft(r, tok, fmt) for r in sft_records(tmp_path, n_images, repeats, line0)]
        local.append(host_batch(collate_sft(examples, fmt, cfg.data.seq_buckets, tok.pad_token_id))[0])
    assert local[0]["vision"]["pixel_values"].shape != local[1]["vision"]["pixel_values"].shape
    assert local[0]["input_ids"].shape != local[1]["input_ids"].shape
    glob = gb.assemble_global_batch(local)
    assert glob["input_ids"].shape[1] == 4 and gb.host_blocks(glob) == 2

    fn, params, ocfg = bundle.model.fn, bundle.model.params, SFTObjectiveConfig()
    run = jax.jit(lambda params, mb: sft_loss(fn.bind(params), mb, ocfg)[1])
    alone = [a[0] for a in run_alone(lambda mb: run(params, mb), local, own_buckets=False)]
    together = run_per_micro(lambda mb: run(params, mb), glob)[0]
    assert together["tokens"] > 0
    for key, value in together.items():
        assert value == pytest.approx(alone[0][key] + alone[1][key], rel=1e-5, abs=1e-6), key


def tiny_pair_batch(rows=4, seq=8, patches=16, slots=2, a=1):
    from skyjax.models.qwen2_5_vl_vision import Qwen2_5_VLVisionConfig, vision_inputs

    meta = vision_inputs(np.zeros((0, 3), np.int32), Qwen2_5_VLVisionConfig.tiny(), pad_to=patches)
    b = {"input_ids": np.ones((a, 2 * rows, seq), np.int32), "attention_mask": np.ones((a, 2 * rows, seq), bool),
         "pixel_values": np.zeros((a, patches, 1176), np.float32),
         "vision_meta": {k: np.stack([v] * a) for k, v in meta.items()},
         "image_grid_thw": np.zeros((a, 2 * slots, 3), np.int32), "pair_weight": np.ones((a, rows), np.float32)}
    return b


def test_padding_to_a_larger_bucket_is_collating_with_it_and_errors_name_hosts():
    from skyjax.models.qwen2_5_vl_vision import Qwen2_5_VLVisionConfig, vision_inputs

    vcfg = Qwen2_5_VLVisionConfig.tiny()
    grid = np.array([[1, 4, 4], [1, 4, 8]], np.int32)
    small = vision_inputs(grid, vcfg, pad_to=64)
    big = vision_inputs(grid, vcfg, pad_to=128)
    batch = tiny_pair_batch(patches=64)
    batch["vision_meta"] = {k: v[None] for k, v in small.items()}
    target = gb.batch_shapes(tiny_pair_batch(patches=128))
    padded = gb.pad_local_batch(batch, target, "reward_model")
    for k, v in big.items():
        np.testing.assert_array_equal(padded["vision_meta"][k][0], v, err_msg=k)
    # [chosen slots, rejected slots]: each half gets its own zero slots
    batch["image_grid_thw"] = np.concatenate([grid, grid])[None]
    target[("image_grid_thw",)] = (1, 8, 3)
    padded = gb.pad_local_batch(batch, target, "reward_model")
    assert padded["image_grid_thw"][0, :, 1].tolist() == [4, 4, 0, 0, 4, 4, 0, 0]
    # the shared-prompt layout (one row per pair): one grid list; per-token arrays padded like the tokens, with the
    # batch's own padding token (masked) and branch 0
    ids, mask = np.arange(16, dtype=np.int32).reshape(1, 2, 8), np.ones((1, 2, 8), bool)
    ids[0, 1, 6:], mask[0, 1, 6:] = 99, False
    shared = {"input_ids": ids, "attention_mask": mask, "branch_ids": np.ones((1, 2, 8), np.int32),
              "score_index": np.zeros((1, 2, 2), np.int32), "image_grid_thw": grid[None],
              "pair_weight": np.ones((1, 2), np.float32)}
    assert gb.batch_kind(shared) == "reward_model_shared_prompt"
    target = {**gb.batch_shapes(shared), ("input_ids",): (1, 2, 12), ("attention_mask",): (1, 2, 12),
              ("branch_ids",): (1, 2, 12), ("image_grid_thw",): (1, 4, 3)}
    padded = gb.pad_local_batch(shared, target, "reward_model_shared_prompt")
    assert padded["image_grid_thw"][0, :, 1].tolist() == [4, 4, 0, 0]
    assert (padded["input_ids"][0, :, 8:] == 99).all() and not padded["attention_mask"][0, :, 8:].any()
    assert (padded["branch_ids"][0, :, 8:] == 0).all() and padded["score_index"].shape == (1, 2, 2)

    with pytest.raises(gb.HostBatchError, match=r"attention_mask rows .*host 0: \(1, 8, 8\), host 1: \(1, 6, 8\)"):
        gb.assemble_global_batch([tiny_pair_batch(), tiny_pair_batch(rows=3)])
    with pytest.raises(gb.HostBatchError, match=r"micro-batches .*host 0: \(1, 8, 8\), host 1: \(2, 8, 8\)"):
        gb.assemble_global_batch([tiny_pair_batch(), tiny_pair_batch(a=2)])
    other = tiny_pair_batch()
    other["extra"] = np.zeros((1, 2))
    with pytest.raises(gb.HostBatchError, match="different keys"):
        gb.assemble_global_batch([tiny_pair_batch(), other])


def test_each_host_must_hold_its_own_rows():
    """With devices 0-3 on host 0 and 4-7 on host 1 the (2, 2, 2) mesh gives each host its block of rows; if the
    hosts alternate (a tensor axis spanning them) the error names the mesh axes and what each host holds."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = make_mesh((2, 2, 2))
    rows = NamedSharding(mesh, P(None, ("data", "fsdp"), None))
    gb.check_host_rows(rows, (1, 8, 16), 2, host_of=lambda d: d.id // 4)
    with pytest.raises(gb.HostBatchError, match=r"host 0's devices hold rows \[0, 2\), \[2, 4\), \[4, 6\), \[6, 8\) "
                                                r".*split over mesh axes \('data', 'fsdp'\)"):
        gb.check_host_rows(rows, (1, 8, 16), 2, host_of=lambda d: d.id % 2)
    with pytest.raises(gb.HostBatchError, match="replicated"):
        gb.check_host_rows(NamedSharding(mesh, P()), (1, 8, 16), 2, host_of=lambda d: d.id // 4)


# --- a real two-process run ------------------------------------------------------------------------------------------


def write_pairs(folder: Path) -> Path:
    """8 preference pairs: the even ones (host 0's share of an unshuffled 2-host pipeline) one small image and short
    answers, the odd ones (host 1's) two larger images and long answers, so the hosts pick different buckets."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(8):
        sizes = [(56, 56)] if i % 2 == 0 else [(112, 56), (56, 112)]
        long = "" if i % 2 == 0 else " It is quite clearly so, as anyone can see in the picture."
        content = [{"type": "image"}] * len(sizes) + [{"type": "text", "text": f"Colour {i}?"}]
        rows.append({"id": f"pair-{i}", "images": images(folder, sizes),
                     "prompt": [{"role": "user", "content": content}],
                     "chosen": [{"role": "assistant", "content": f"Red.{long}"}],
                     "rejected": [{"role": "assistant", "content": f"Blue{'.' * (i + 1)}{long}"}]})
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def objective_on_the_pipeline(pairs: str) -> dict:
    """The reward objective on the first batch of an unshuffled pipeline over `pairs`, placed on the (2, 2, 2) mesh
    by `to_device`: per-pair scores (in the global batch's order) and the loss sums, and this host's local shapes.
    On 2 processes each host collates its 4 pairs and `to_device` assembles the global batch."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from skyjax.train.batching import to_device
    from skyjax.train.pipeline import read_records
    from skyjax.train.setup import PairPipeline

    cfg = load_config(RunConfig, RM_CONFIG, [*TINY_RM, "data.batch_size=8", "data.seq_buckets=[96,192]",
                                             "data.patch_buckets=[64,128,256,512]", "data.image_buckets=[4,8,16]"])
    bundle = reward_bundle(Path(pairs).parent, vision_depth=1)  # the vision details are tested above: compile less
    records, _ = read_records([pairs])
    batch, row_ids = host_batch(next(iter(PairPipeline(records, bundle, cfg.data, shuffle=False).dataset)))
    mesh = make_mesh((2, 2, 2))
    fn = bundle.model.fn
    params = jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda i: x[i]),
                          bundle.model.params, fn.shardings(mesh))
    ocfg = RewardModelObjectiveConfig()

    def objective(params, batch):
        mb = jax.tree.map(lambda x: x[0], batch)
        chosen, rejected = pair_scores(fn.bind(params), mb)
        return chosen, rejected, bradley_terry(chosen, rejected, mb["pair_weight"], ocfg)[1]

    with use_mesh(mesh):
        placed = to_device(batch, mesh)
        out = jax.jit(objective, out_shardings=NamedSharding(mesh, P()))(params, placed)
    chosen, rejected, sums = jax.device_get(out)
    return {"chosen": chosen.tolist(), "rejected": rejected.tolist(), "sums": {k: float(v) for k, v in sums.items()},
            "row_ids": row_ids, "shapes": {k: list(np.shape(v)) for k, v in batch.items() if k != "vision_meta"},
            "global_rows": list(placed["input_ids"].shape)}


WORKER = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from skyjax.parallel.distributed import initialize_from_environment
    initialize_from_environment()
    assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
    import test_multihost
    task = {"objective": test_multihost.objective_on_the_pipeline, "train": test_multihost.train_in_worker}
    print("RESULT " + json.dumps(task[sys.argv[1]](*sys.argv[2:])), flush=True)
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(tmp_path: Path, args: list[str], timeout: int = 240, meanwhile=lambda: None):
    """Run WORKER as processes 0 and 1 of a localhost job (4 CPU devices each) and `meanwhile()` here; (their
    stdouts, what meanwhile returned). A failure or timeout raises with both processes' stderr."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "SKYJAX_COORDINATOR": f"127.0.0.1:{free_port()}", "SKYJAX_NUM_PROCESSES": "2",
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)]), "JAX_ENABLE_COMPILATION_CACHE": "false"}
    procs, logs = [], []
    for i in range(2):
        logs += [open(tmp_path / f"out{i}.txt", "w"), open(tmp_path / f"err{i}.txt", "w")]
        procs.append(subprocess.Popen([sys.executable, str(script), *args], cwd=REPO, stdout=logs[-2],
                                      stderr=logs[-1], env={**env, "SKYJAX_PROCESS_ID": str(i)}))
    start, codes = time.time(), [None, None]
    try:
        result = meanwhile()
        # a process that fails leaves the other waiting in a collective: stop it too
        while None in codes and time.time() - start < timeout:
            codes = [p.poll() for p in procs]
            if any(c not in (None, 0) for c in codes):
                time.sleep(2)
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for f in logs:
            f.close()
    codes = [p.returncode for p in procs]
    if codes != [0, 0]:
        report = "\n".join(f"--- process {i} (exit {p.returncode}) stderr:\n"
                           f"{(tmp_path / f'err{i}.txt').read_text()[-6000:]}" for i, p in enumerate(procs))
        what = "timed out" if time.time() - start >= timeout else "failed"
        raise AssertionError(f"the two-process run {what} (exit codes {codes}):\n{report}")
    return [(tmp_path / f"out{i}.txt").read_text() for i in range(2)], result


def test_two_processes_assemble_the_global_batch(tmp_path):
    """Two processes (jax.distributed on localhost, gloo CPU collectives, 4 CPU devices each) each read half of the
    pairs, collate with different buckets, and `to_device` builds the host-major global batch on the (2, 2, 2) mesh:
    every pair's score and the loss sums equal one process with 8 devices reading the whole batch."""
    pairs = write_pairs(tmp_path / "data")
    # meanwhile the reference here: one process (8 devices) reading the whole batch
    outputs, one = run_two_processes(tmp_path, ["objective", str(pairs)],
                                     meanwhile=lambda: objective_on_the_pipeline(str(pairs)))
    hosts = [json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]) for out in outputs]
    assert one["row_ids"] == [f"pair-{i}" for i in range(8)]
    assert [h["row_ids"] for h in hosts] == [one["row_ids"][0::2], one["row_ids"][1::2]]
    assert hosts[0]["shapes"]["input_ids"] == [1, 8, 96] and hosts[1]["shapes"]["input_ids"] == [1, 8, 192]
    assert hosts[0]["shapes"]["pixel_values"][1] < hosts[1]["shapes"]["pixel_values"][1]
    assert hosts[0]["global_rows"] == [1, 16, 192]
    order = [0, 2, 4, 6, 1, 3, 5, 7]  # host-major: host 0's pairs, then host 1's
    for h in hosts:  # every host got the same (replicated) results
        np.testing.assert_allclose(h["chosen"], np.array(one["chosen"])[order], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(h["rejected"], np.array(one["rejected"])[order], rtol=1e-5, atol=1e-6)
        for key, value in one["sums"].items():
            assert h["sums"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def train_config(data: Path) -> list[str]:
    return [*TINY_RM, f"data.train=[{data}]", "data.synthetic=null", "data.batch_size=8", "data.seq_buckets=[64]",
            "data.patch_buckets=[64,128]", "data.image_buckets=[8]", "trainer.steps=2", "trainer.log_every=1",
            "trainer.progress=false", "trainer.export=false", "trainer.async_checkpointing=false",
            "optimizer.warmup_steps=0", "mesh.shape=[2,2,2]"]


def train_in_worker(data: str, run_dir: str) -> dict:
    from skyjax.train.trainer import Trainer

    trainer = Trainer(load_config(RunConfig, RM_CONFIG, train_config(Path(data))), run_dir)
    return trainer.fit()


def train_metrics(run_dir):
    return {r["step"]: r for r in map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines())
            if r["split"] == "train"}


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("SKYJAX_TEST_MULTIPROCESS_TRAINER"),
                    reason="about 2 minutes on 2 cores (three train-step compiles): "
                           "set SKYJAX_TEST_MULTIPROCESS_TRAINER=1")
def test_two_processes_train_like_one(tmp_path):
    """The real Trainer on two processes (the (2, 2, 2) mesh over 2 x 4 CPU devices, each host reading half of every
    batch, orbax checkpoints from both) for 2 steps: the losses and gradient norms equal one process with 8 devices
    on the same data."""
    from skyjax.data.synthetic import make_records
    from skyjax.train.trainer import Trainer

    data = make_records(tmp_path / "data", "train", 16, seed=0, image_size=56, tasks=("colour",))
    run_two_processes(tmp_path, ["train", str(data), str(tmp_path / "multi")], timeout=420,
                      meanwhile=lambda: Trainer(load_config(RunConfig, RM_CONFIG, train_config(data)),
                                                tmp_path / "single").fit())
    multi, one = train_metrics(tmp_path / "multi"), train_metrics(tmp_path / "single")
    assert sorted(multi) == sorted(one) == [1, 2]
    for step in (1, 2):
        for key in ("loss", "accuracy", "margin", "chosen_score", "grad_norm"):
            assert multi[step][key] == pytest.approx(one[step][key], rel=1e-4, abs=1e-6), (step, key)
