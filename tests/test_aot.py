"""TPU ahead-of-time compiles on a CPU machine (libtpu's compile-only client): topologies, meshes laid over them,
the lm training step's compiled shardings, memory reports, and the errors for steps and meshes that cannot work.

libtpu comes with the `test` extra; each compile of the tiny step takes a few seconds on 2 cores.
"""

import dataclasses
import json
import math

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from skyjax.config import ConfigError
from skyjax.parallel import aot as aot_module
from skyjax.parallel.aot import (DoesNotFitError, aot_kinds, compile_config, compile_for_topology,
                                 register_aot_builder)
from skyjax.parallel.cli import main as aot_main
from skyjax.parallel.rules import ShardingError
from skyjax.parallel.topology import CHIPS, GiB, TopologyError, get_topology, parse_topology, topology_mesh

TINY = """\
kind: lm_forward_backward
model: {vocab_size: 320, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 4,
        num_key_value_heads: 2, rope_theta: 10000.0}
batch_size: 8
seq_len: 32
mesh: {shape: [1, 2, 2]}
"""

# The Qwen2.5-7B text model: ~7.6B fp32 parameters + AdamW moments = 122 GB, far beyond four 16 GiB v5e chips.
BIG = """\
kind: lm_forward_backward
model: {vocab_size: 152064, hidden_size: 3584, intermediate_size: 18944, num_hidden_layers: 28,
        num_attention_heads: 28, num_key_value_heads: 4, dtype: bfloat16, remat: full}
batch_size: 8
seq_len: 512
mesh: {shape: [1, -1, 1]}
"""


@pytest.fixture(scope="module")
def tiny_yaml(tmp_path_factory):
    path = tmp_path_factory.mktemp("aot") / "tiny.yaml"
    path.write_text(TINY)
    return path


@pytest.fixture(scope="module")
def tiny_report(tiny_yaml):
    return compile_config(tiny_yaml, topology="v5e:2x2")


def test_topology_names_and_chips():
    t = parse_topology("v5e:4x4", num_slices=2)
    assert (t.name, t.chips_per_slice, t.num_devices, str(t)) == ("v5e:4x4", 16, 32, "2 x v5e:4x4")
    assert parse_topology("v5:2x2x2").chip.generation == "v5p"  # libtpu's name for v5p
    assert parse_topology("v4:2x2").shape == (2, 2, 1)
    assert parse_topology("tpu7x:2x2x1").num_devices == 8  # two TensorCores per chip, each a JAX device
    assert CHIPS["v5e"].hbm_bytes_per_device == 16 * GiB
    assert CHIPS["tpu7x"].hbm_bytes_per_device == 96 * GiB
    with pytest.raises(TopologyError, match="v5litepod-16 is v5e:4x4"):
        parse_topology("v5litepod-16")
    with pytest.raises(TopologyError, match="unknown TPU generation 'v9'"):
        parse_topology("v9:2x2")
    with pytest.raises(TopologyError, match="2-D torus"):
        parse_topology("v6e:2x2x2")


def test_topology_mesh_single_and_multi_slice():
    mesh = topology_mesh("v5e:4x4", (1, -1, 4))
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 4}
    assert {d.device_kind for d in mesh.devices.flat} == {"TPU v5 lite"} and mesh.devices.size == 16
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    multi = topology_mesh("v5e:2x2", (1, 2, 2), num_slices=2)
    assert dict(multi.shape) == {"slice": 2, "data": 1, "fsdp": 2, "tensor": 2}
    # each index of the slice axis holds exactly the devices of one slice
    for s in range(2):
        assert {d.slice_index for d in multi.devices[s].flat} == {s}
    assert jax.devices()[0].platform == "cpu"  # compile-only TPU devices never replace the CPU backend


def test_mesh_that_is_not_a_product_of_physical_axes_is_named():
    with pytest.raises(TopologyError, match=r"cannot be laid out on v5e:4x4 \(physical axes 4x4\): mesh axes "
                                            r"'fsdp' \(size 8\), 'tensor' \(size 2\) are not products of physical "
                                            r"axes.*sizes possible here: 1, 4, 16"):
        topology_mesh("v5e:4x4", (1, 8, 2))
    topology_mesh("v5e:4x4", (4, 4, 1))  # the same 16 chips as 4 x 4 lay out fine
    with pytest.raises(TopologyError, match="needs 8 devices per slice but 4 are available"):
        topology_mesh("v5e:2x2", (2, 2, 2))


def test_lm_step_compiles_with_the_rules_shardings(tiny_report, tiny_yaml):
    """Golden check: the executable takes and returns every parameter and optimizer moment with the specs the rules
    table gives (here fsdp=2, tensor=2), and the batch split over the batch axes."""
    r = tiny_report
    assert r.fits and r.topology == "v5e:2x2" and r.device_kind == "TPU v5 lite" and r.num_devices == 4
    assert r.mesh == {"data": 1, "fsdp": 2, "tensor": 2}
    params_in, opt_in, batch_in = r.input_shardings
    params_out, opt_out, loss_out = r.output_shardings
    layers = params_in["model"]["layers"]
    golden = {
        "gate_proj": (layers["mlp"]["gate_proj"]["kernel"], P(None, "fsdp", "tensor")),  # (layers, embed, mlp)
        "down_proj": (layers["mlp"]["down_proj"]["kernel"], P(None, "tensor", "fsdp")),  # (layers, mlp, embed)
        "q_bias": (layers["self_attn"]["q_proj"]["bias"], P(None, "tensor")),  # (layers, heads)
        "embedding": (params_in["model"]["embed_tokens"]["embedding"], P("tensor", "fsdp")),  # (vocab, embed)
        "lm_head": (params_in["lm_head"]["kernel"], P("fsdp", "tensor")),  # (embed, vocab)
        "norm": (params_in["model"]["norm"]["weight"], P(None)),
    }
    for name, (sharding, spec) in golden.items():
        assert sharding.spec == spec, name
    # every leaf: what the rules say, and updated params / moments come back exactly as they went in
    from skyjax.models.qwen2 import Qwen2ForCausalLM
    from skyjax.nn.functional import Functional
    from skyjax.parallel.cli import lm_step_config

    cfg = lm_step_config(tiny_yaml)
    mesh = jax.tree.leaves(params_in)[0].mesh
    expected = Functional.create(lambda rngs: Qwen2ForCausalLM(cfg.model, rngs=rngs)).shardings(mesh)
    spec_of = lambda tree: jax.tree.map(lambda s: s.spec, tree, is_leaf=lambda x: isinstance(x, NamedSharding))  # noqa
    assert spec_of(params_in) == spec_of(expected)
    assert spec_of(params_out) == spec_of(expected)
    assert spec_of(opt_out) == spec_of(opt_in)
    assert spec_of(opt_in[0].mu) == spec_of(expected) and spec_of(opt_in[0].nu) == spec_of(expected)
    assert batch_in["input_ids"].spec == P("fsdp", None) and loss_out.spec == P()
    # donated params and moments are updated in place
    assert r.alias_bytes > 0 and r.alias_bytes >= 0.9 * r.argument_bytes
    assert r.flops > 0 and r.compile_seconds > 0
    table = r.table()
    assert "v5e:2x2" in table and "fits" in table and "FLOPs per step" in table


def test_two_slices_shard_the_batch_over_the_slice_axis(tiny_yaml):
    r = compile_config(tiny_yaml, topology="v5e:2x2", num_slices=2)
    assert r.mesh == {"slice": 2, "data": 1, "fsdp": 2, "tensor": 2} and r.num_devices == 8
    params_in, _, batch_in = r.input_shardings
    assert batch_in["input_ids"].spec == P(("slice", "fsdp"), None)
    # parameters are sharded within a slice and replicated across slices
    assert params_in["model"]["layers"]["mlp"]["gate_proj"]["kernel"].spec == P(None, "fsdp", "tensor")
    assert r.output_shardings[0]["lm_head"]["kernel"].spec == P("fsdp", "tensor")


def test_fits_check_and_does_not_fit_error(tiny_report):
    small = dataclasses.replace(tiny_report, hbm_bytes=1024 * 1024)
    assert not small.fits
    with pytest.raises(DoesNotFitError, match=r"does not fit on v5e:2x2: it needs .* MiB per device .* has "
                                              r"1.00 MiB of HBM") as e:
        small.raise_if_not_fits()
    assert e.value.report is small
    assert "DOES NOT FIT" in small.table()


def test_too_big_model_on_small_topology_does_not_fit(tmp_path, capsys):
    """The 7B step on four v5e chips: XLA refuses the compile; that becomes DoesNotFitError with its figures, and
    the command prints the report, writes the JSON and exits 1."""
    path = tmp_path / "big.yaml"
    path.write_text(BIG)
    assert aot_main([str(path), "--topology", "v5e:2x2", "--json", str(tmp_path / "r.json")]) == 1
    out = capsys.readouterr()
    assert "DOES NOT FIT" in out.out
    assert "does not fit on v5e:2x2: it needs" in out.err and "16.00 GiB of HBM" in out.err
    r = json.loads((tmp_path / "r.json").read_text())
    assert not r["fits"] and r["required_bytes"] > 16 * GiB
    assert r["argument_bytes"] > 20 * GiB  # 7.6B x 16 bytes (fp32 params, mu, nu) / 4 chips, plus the batch


def test_non_dividing_mesh_names_the_parameter(tiny_yaml, capsys):
    with pytest.raises(ShardingError, match=r"lm_head/kernel: dimension 0 \('embed'\) of shape \(66, 320\) is 66, "
                                            r"which does not divide mesh axes \('fsdp',\) of size 4"):
        compile_config(tiny_yaml, ["mesh.shape=[1,4,1]", "model.hidden_size=66", "model.num_attention_heads=2",
                                   "model.num_key_value_heads=1"], topology="v5e:2x2")
    assert aot_main([str(tiny_yaml), "batch_size=5", "--topology", "v5e:2x2"]) == 2
    assert "batch/input_ids: dimension 0 ('batch') of shape (5, 32)" in capsys.readouterr().err
    assert aot_main([str(tiny_yaml), "mesh.shape=[2,4,2]", "--topology", "v5e:4x4"]) == 2
    assert "cannot be laid out on v5e:4x4" in capsys.readouterr().err


def test_registry_and_config_errors(tmp_path, monkeypatch):
    assert "lm_forward_backward" in aot_kinds()
    path = tmp_path / "x.yaml"
    path.write_text("kind: nonsense\n")
    with pytest.raises(ConfigError, match="kind 'nonsense' has no AOT builder"):
        compile_config(path, topology="v5e:2x2")
    path.write_text(TINY.replace("batch_size: 8", "batch_sise: 8"))
    with pytest.raises(ConfigError, match="unknown config key batch_sise"):
        compile_config(path, topology="v5e:2x2")

    calls = []

    def builder(config_path, overrides, mesh):
        calls.append((config_path, list(overrides), dict(mesh.shape)))
        raise ShardingError("stop before compiling")

    monkeypatch.setitem(aot_module._BUILDERS, "test_kind", None)
    register_aot_builder("test_kind")(builder)
    assert "test_kind" in aot_kinds()
    path.write_text("kind: test_kind\nmesh: {shape: [1, 4, 1]}\n")
    with pytest.raises(ShardingError, match="stop before compiling"):
        compile_config(path, ["batch_size=4"], topology="v5e:2x2", num_slices=2)
    # the builder sees the overrides (with --num-slices as mesh.num_slices) and the mesh from the config
    assert calls == [(path, ["batch_size=4", "mesh.num_slices=2"],
                      {"slice": 2, "data": 1, "fsdp": 4, "tensor": 1})]


def test_builder_api_directly():
    """compile_for_topology with a hand-written builder: any jitted function of abstract sharded arguments."""
    import jax.numpy as jnp

    def build(mesh):
        sh = NamedSharding(mesh, P("fsdp", "tensor"))
        x = jax.ShapeDtypeStruct((256, 512), jnp.bfloat16, sharding=sh)
        step = jax.jit(lambda a, b: a @ b.T, out_shardings=NamedSharding(mesh, P("fsdp", None)))
        return step, (x, x), "matmul"

    r = compile_for_topology(build, topology=get_topology("v6e:2x2"), mesh_shape=(1, 2, 2))
    assert r.description == "matmul" and r.device_kind == "TPU v6 lite"
    assert r.output_shardings.spec == P("fsdp", None)
    # a quarter of the (256 x 256) output, each a 512-long multiply-add: the work splits evenly over 4 devices
    assert r.flops == pytest.approx(2 * 256 * 256 * 512 / 4, rel=0.05)


def test_scanned_layers_flops_count_every_layer(tiny_report, tiny_yaml):
    """XLA's cost analysis counts a while-loop body once; the report counts the traced program's matmuls with every
    scan body times its length, which must agree with XLA's own count of the same step with the layer scan unrolled."""
    unrolled = compile_config(tiny_yaml, ["model.scan_unroll=2"], topology="v5e:2x2")
    assert unrolled.loop_flops_factor == pytest.approx(1.0)
    assert tiny_report.loop_flops_factor > 1.3  # two layers, most of the work
    assert tiny_report.xla_flops < 0.8 * unrolled.xla_flops
    assert tiny_report.program_flops == unrolled.program_flops  # unrolling changes the loop, not the work
    assert tiny_report.flops == pytest.approx(unrolled.xla_flops, rel=0.03)
    # the matmuls split over 4 chips: XLA's count adds the elementwise work, a few percent of this tiny model's
    assert 0.85 * unrolled.xla_flops < tiny_report.program_flops / 4 <= unrolled.xla_flops


# --- the trainer's kinds: reward_model and sft ------------------------------------------------------------------------

DEMO_RM = "configs/demo/reward_model.yaml"
TINY_SFT = "configs/sft/r1v_tiny.yaml"


def _spec_of(tree):
    return jax.tree.map(lambda s: s.spec, tree, is_leaf=lambda x: isinstance(x, NamedSharding))


def _adam(opt_state):
    """The ScaleByAdamState inside the trainer's optax chain (clip -> adamw)."""
    import optax

    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
             if isinstance(s, optax.ScaleByAdamState)]
    assert len(found) == 1
    return found[0]


def _expected_state_specs(config, overrides, mesh):
    """What the rules table says for the run's parameters, cut by its freeze masks like the trainer does."""
    from skyjax.config import load_config
    from skyjax.train.aot import abstract_bundle
    from skyjax.train.config import RunConfig
    from skyjax.train.optimizer import frozen_predicate, split_params

    cfg = load_config(RunConfig, config, overrides)
    bundle = abstract_bundle(cfg)
    fn = bundle.model.fn
    trainable, frozen = split_params(fn.shardings(mesh), frozen_predicate(bundle.model.arch.name, cfg.trainer.freeze))
    return _spec_of(trainable), _spec_of(frozen)


def _batch_args(report):
    """The abstract batch the compiled step takes (shapes and dtypes of every leaf, used by the step or not)."""
    (_, batch), _ = report.compiled.args_info
    return batch


def test_reward_model_step_on_two_slices_has_the_rules_shardings():
    """The real reward-model train step (the demo config) on 2 x v5e:2x2: parameters and Adam moments as the rules
    table gives them within a slice (replicated across slices), frozen parameters without moments, the state
    returned exactly as it came in, and the pairs' rows split over the slice and fsdp axes. Each slice is one host:
    the batch is the 2 hosts' batches side by side, each with its 8 pairs and its own 256-patch bucket."""
    overrides = ["mesh.shape=[1,2,2]"]
    r = compile_config(DEMO_RM, overrides, topology="v5e:2x2", num_slices=2)
    assert r.fits and r.mesh == {"slice": 2, "data": 1, "fsdp": 2, "tensor": 2} and r.num_devices == 8
    assert r.description.startswith("reward_model 'reward_demo': qwen2_5_vl_reward")
    (state_in, batch_in), (state_out, stats_out) = r.input_shardings, r.output_shardings
    mesh = jax.tree.leaves(state_in)[0].mesh
    trainable, frozen = _expected_state_specs(DEMO_RM, overrides + ["mesh.num_slices=2"], mesh)
    assert _spec_of(state_in["trainable"]) == trainable and _spec_of(state_in["frozen"]) == frozen
    layers = state_in["trainable"]["model"]["layers"]
    assert layers["mlp"]["gate_proj"]["kernel"].spec == P(None, "fsdp", "tensor")  # (layers, embed, mlp)
    assert layers["self_attn"]["o_proj"]["kernel"].spec == P(None, "tensor", "fsdp")  # (layers, heads, embed)
    assert state_in["frozen"]["lm_head"]["kernel"].spec == P("fsdp", "tensor")  # freeze [lm_head]: no moments
    assert "lm_head" not in state_in["trainable"] and "v_head" in state_in["trainable"]
    adam = _adam(state_in["opt"])
    assert _spec_of(adam.mu) == trainable and _spec_of(adam.nu) == trainable
    assert _spec_of(state_out) == _spec_of(state_in)  # donated and returned as is: one program for every step
    assert state_in["step"].spec == P() and adam.count.spec == P()
    rows = P(None, ("slice", "fsdp"), None)  # [micro-batches, 2 x pairs, seq]
    assert batch_in["input_ids"].spec == rows and batch_in["attention_mask"].spec == rows
    assert batch_in["pixel_values"].spec == P() and batch_in["pair_weight"].spec == P()
    assert all(s.spec == P() for s in jax.tree.leaves(stats_out))
    assert r.loop_flops_factor > 1 and r.flops > r.xla_flops > 0
    assert r.alias_bytes > 0  # the state is donated: updated in place
    batch = _batch_args(r)
    assert r.hosts == 2 and batch["host_blocks"].shape == (1, 2)
    assert batch["pixel_values"].shape == (1, 2 * 256, 1176) and batch["input_ids"].shape == (1, 32, 64)
    assert "hosts: 2 (per-host batch: 8 pairs (16 rows), 256 patches, 32 image slots" in r.table()


def test_projector_only_sft_step_and_a_too_small_hbm(monkeypatch, tmp_path, capsys):
    """`skyjax aot configs/sft/r1v_tiny.yaml trainer.freeze=[vision,llm] --hbm-gib 0.001`: the R1V SFT step is
    compiled (projector trained: only it has moments), and the command exits 1 naming the overflow."""
    compiled = []

    def spy(*args, **kwargs):
        try:
            return real(*args, **kwargs)
        except DoesNotFitError as e:
            compiled.append(e.report)
            raise

    real = aot_module.compile_config
    monkeypatch.setattr(aot_module, "compile_config", spy)
    overrides = ["mesh.shape=[1,2,2]", "trainer.freeze=[vision,llm]"]
    out_json = tmp_path / "sft.json"
    assert aot_main([TINY_SFT, *overrides, "--topology", "v5e:2x2", "--hbm-gib", "0.001", "--json", str(out_json)]) == 1
    out = capsys.readouterr()
    assert "sft 'sft_r1v_tiny': internvl" in out.out and "DOES NOT FIT (over by" in out.out
    assert "does not fit on v5e:2x2: it needs" in out.err and "has 1.02 MiB of HBM" in out.err
    report = json.loads(out_json.read_text())
    assert not report["fits"] and report["required_bytes"] > report["hbm_bytes"] == int(0.001 * GiB)
    (r,) = compiled
    (state_in, batch_in), (state_out, _) = r.input_shardings, r.output_shardings
    mesh = jax.tree.leaves(state_in)[0].mesh
    trainable, frozen = _expected_state_specs(TINY_SFT, overrides, mesh)
    assert set(state_in["trainable"]) == {"projector"} and {"vision_tower", "model", "lm_head"} <= set(frozen)
    assert _spec_of(state_in["trainable"]) == trainable and _spec_of(state_in["frozen"]) == frozen
    assert state_in["frozen"]["model"]["layers"]["mlp"]["down_proj"]["kernel"].spec == P(None, "tensor", "fsdp")
    assert state_in["frozen"]["model"]["embed_tokens"]["embedding"].spec == P("tensor", "fsdp")  # (vocab, embed)
    adam = _adam(state_in["opt"])
    assert _spec_of(adam.mu) == trainable and _spec_of(adam.nu) == trainable
    assert _spec_of(state_out) == _spec_of(state_in)
    rows = P(None, "fsdp", None)  # [micro-batches, rows, seq] over the batch axes (data=1, fsdp=2)
    for key in ("input_ids", "attention_mask", "assistant_mask"):
        assert batch_in[key].spec == rows, key
    assert batch_in["vision"]["pixel_values"].spec == P() and batch_in["row_weight"].spec == P()


def test_run_config_errors_are_named(capsys, tmp_path):
    """Exit 2 with the reason: a parameter that does not divide its mesh axis (named), a mesh that does not lay out,
    a model folder that is not there (with the shape: hint); shape-only sources are refused by training."""
    # Qwen2.5-VL-7B's vision MLP is 3420 wide: it does not split over 8 tensor-parallel chips (checked before compiling)
    assert aot_main(["configs/reward_model/stage1_7b.yaml", "model.source=shape:qwen2_5_vl_7b", "mesh.shape=[1,1,8]",
                     "--topology", "v5e:2x4"]) == 2
    err = capsys.readouterr().err
    assert "visual/blocks/mlp/down_proj/kernel: dimension 1 ('vision_mlp') of shape (32, 3420, 1280)" in err
    assert "is 3420, which does not divide mesh axes ('tensor',) of size 8" in err
    assert aot_main([TINY_SFT, "--topology", "v5e:2x2"]) == 2  # the config's (2, 2, 2) mesh needs 8 chips
    assert "needs 8 devices per slice but 4 are available" in capsys.readouterr().err
    assert aot_main([DEMO_RM, "model.source=/no/such/model", "mesh.shape=[1,2,2]", "--topology", "v5e:2x2"]) == 2
    assert "model.source=shape:qwen2_5_vl_7b" in capsys.readouterr().err
    assert aot_main([DEMO_RM, "model.source=shape:nonsense", "mesh.shape=[1,2,2]", "--topology", "v5e:2x2"]) == 2
    assert "'shape:nonsense' is not a known shape (known: qwen2_5_vl_7b, r1v_38b" in capsys.readouterr().err

    from skyjax.train.config import ModelConfig
    from skyjax.train.setup import load_reward_bundle

    with pytest.raises(ValueError, match="model shape without weights, for `skyjax aot` only"):
        load_reward_bundle(ModelConfig(source="shape:qwen2_5_vl_7b"), None, tmp_path)


def test_model_sources_read_only_shapes(tmp_path):
    """Named shapes, model-shape YAMLs and Hugging Face folders (config.json only, no weights) give the model the
    trainer would build, with the run's runtime fields applied."""
    from skyjax.config import load_config
    from skyjax.models.qwen2_5_vl import Qwen2_5_VLConfig
    from skyjax.models.r1v import R1VConfig
    from skyjax.train.aot import abstract_bundle
    from skyjax.train.config import RunConfig

    def bundle(config, *overrides):
        return abstract_bundle(load_config(RunConfig, config, list(overrides)))

    rm = bundle("configs/reward_model/stage1_7b.yaml", "model.source=shape:qwen2_5_vl_7b")
    assert rm.model.arch.name == "qwen2_5_vl_reward" and rm.model.params is None
    assert rm.model.config == Qwen2_5_VLConfig.qwen2_5_vl_7b(dtype="bfloat16", param_dtype="float32",
                                                            remat="dots_no_batch")
    assert rm.model.fn.num_params() / 1e9 == pytest.approx(8.292, abs=0.005)  # + the value head
    rm_yaml = bundle("configs/reward_model/stage1_7b.yaml", "model.source=shape:configs/models/qwen2_5_vl_7b.yaml",
                     "model.remat=full")
    assert rm_yaml.model.config.text.remat == rm_yaml.model.config.vision.remat == "full"
    assert rm_yaml.model.config == Qwen2_5_VLConfig.qwen2_5_vl_7b(dtype="bfloat16", param_dtype="float32",
                                                                 remat="full")
    r1v = bundle("configs/sft/r1v_38b_projector.yaml", "model.source=shape:configs/models/r1v_38b.yaml")
    assert r1v.model.arch.name == "internvl" and isinstance(r1v.model.config, R1VConfig)
    assert r1v.model.config == bundle("configs/sft/r1v_38b_projector.yaml", "model.source=shape:r1v_38b").model.config
    assert r1v.model.fn.num_params() / 1e9 == pytest.approx(38.39, abs=0.01)
    assert r1v.image_cfg.image_size == 448 and r1v.image_cfg.max_tiles == 12

    folder = tmp_path / "hf"  # a Hugging Face folder with its config.json and no weights at all
    folder.mkdir()
    tiny = Qwen2_5_VLConfig.tiny()
    (folder / "config.json").write_text(json.dumps(tiny.to_hf()))
    from_folder = bundle(DEMO_RM, f"model.source={folder}", "model.dtype=bfloat16")
    assert from_folder.model.arch.name == "qwen2_5_vl_reward"
    assert from_folder.model.config.text.dtype == "bfloat16" and from_folder.model.config.text.param_dtype == "bfloat16"
    assert from_folder.model.config.vision.depth == tiny.vision.depth
    with pytest.raises(ConfigError, match="a reward model needs a Qwen2.5-VL backbone, got architecture 'internvl'"):
        bundle(DEMO_RM, "model.source=shape:r1v_38b")


# --- several hosts: the multi-host global batch -----------------------------------------------------------------------


def test_topology_hosts():
    """Hosts are the devices' processes (4 chips per host), except that a v5e / v6e slice of up to 8 chips is one
    host (v5litepod-8); with several slices every slice has its own."""
    from skyjax.parallel.topology import device_hosts

    hosts = {(name, n): get_topology(name, n).num_hosts
             for name, n in [("v5e:2x2", 1), ("v5e:2x4", 1), ("v6e:2x4", 1), ("v5e:4x4", 1), ("v5e:4x8", 1),
                             ("v5e:4x8", 2), ("v5e:2x2", 2), ("v5e:2x4", 2), ("v5p:2x2x1", 1), ("v5p:2x2x2", 1),
                             ("v5p:2x2x4", 1), ("v5p:4x4x4", 1)]}
    assert hosts == {("v5e:2x2", 1): 1, ("v5e:2x4", 1): 1, ("v6e:2x4", 1): 1, ("v5e:4x4", 1): 4, ("v5e:4x8", 1): 8,
                     ("v5e:4x8", 2): 16, ("v5e:2x2", 2): 2, ("v5e:2x4", 2): 2, ("v5p:2x2x1", 1): 1,
                     ("v5p:2x2x2", 1): 2, ("v5p:2x2x4", 1): 4, ("v5p:4x4x4", 1): 16}
    devices = get_topology("v5e:4x8", 2).devices()
    host_of = device_hosts(devices)
    assert all(host_of[d.id] == d.process_index for d in devices)  # in process order: slice 0's hosts first
    assert device_hosts(jax.devices()) == {d.id: 0 for d in jax.devices()}  # CPU devices: one host


ROWS, REP = P(None, ("data", "fsdp"), None), P()
# What tasks.abstract_batch gave before it knew about hosts, on the (2, 2, 2) CPU mesh: one host must give exactly this.
ONE_HOST = {
    "rm": {
        "attention_mask": ((1, 32, 64), "bool", ROWS),
        "image_grid_thw": ((1, 32, 3), "int32", REP),
        "input_ids": ((1, 32, 64), "int32", ROWS),
        "pair_weight": ((1, 16), "float32", REP),
        "pixel_values": ((1, 256, 1176), "float32", REP),
        "vision_meta/image_segment": ((1, 256), "int32", REP),
        "vision_meta/reverse_index": ((1, 64), "int32", REP),
        "vision_meta/rope_ids": ((1, 256, 2), "int32", REP),
        "vision_meta/valid": ((1, 256), "bool", REP),
        "vision_meta/valid_merged": ((1, 64), "bool", REP),
        "vision_meta/window_index": ((1, 64), "int32", REP),
        "vision_meta/window_segment": ((1, 256), "int32", REP),
    },
    "rm_shared": {
        "attention_mask": ((2, 8, 64), "bool", ROWS),
        "branch_ids": ((2, 8, 64), "int32", REP),
        "image_grid_thw": ((2, 16, 3), "int32", REP),
        "input_ids": ((2, 8, 64), "int32", ROWS),
        "pair_weight": ((2, 8), "float32", REP),
        "pixel_values": ((2, 256, 1176), "float32", REP),
        "score_index": ((2, 8, 2), "int32", REP),
        "vision_meta/image_segment": ((2, 256), "int32", REP),
        "vision_meta/reverse_index": ((2, 64), "int32", REP),
        "vision_meta/rope_ids": ((2, 256, 2), "int32", REP),
        "vision_meta/valid": ((2, 256), "bool", REP),
        "vision_meta/valid_merged": ((2, 64), "bool", REP),
        "vision_meta/window_index": ((2, 64), "int32", REP),
        "vision_meta/window_segment": ((2, 256), "int32", REP),
    },
    "sft_r1v": {
        "assistant_mask": ((1, 8, 96), "bool", ROWS),
        "attention_mask": ((1, 8, 96), "bool", ROWS),
        "input_ids": ((1, 8, 96), "int32", ROWS),
        "row_weight": ((1, 8), "float32", REP),
        "vision/pixel_values": ((1, 8, 3, 56, 56), "float32", REP),
    },
    "sft_qwen": {
        "assistant_mask": ((1, 8, 96), "bool", ROWS),
        "attention_mask": ((1, 8, 96), "bool", ROWS),
        "input_ids": ((1, 8, 96), "int32", ROWS),
        "row_weight": ((1, 8), "float32", REP),
        "vision/image_grid_thw": ((1, 4, 3), "int32", REP),
        "vision/pixel_values": ((1, 128, 1176), "float32", REP),
        "vision/vision_meta/image_segment": ((1, 128), "int32", REP),
        "vision/vision_meta/reverse_index": ((1, 32), "int32", REP),
        "vision/vision_meta/rope_ids": ((1, 128, 2), "int32", REP),
        "vision/vision_meta/valid": ((1, 128), "bool", REP),
        "vision/vision_meta/valid_merged": ((1, 32), "bool", REP),
        "vision/vision_meta/window_index": ((1, 32), "int32", REP),
        "vision/vision_meta/window_segment": ((1, 128), "int32", REP),
    },
}


def _batch_cases(tmp_path):
    """(name, config, overrides): both reward-model layouts, SFT with R1V tiles and with Qwen2.5-VL patches."""
    from skyjax.models.qwen2_5_vl import Qwen2_5_VLConfig

    folder = tmp_path / "qwen_vl"  # a Qwen2.5-VL folder (config.json only) as the SFT model
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(Qwen2_5_VLConfig.tiny().to_hf()))
    return [("rm", DEMO_RM, []),
            ("rm_shared", DEMO_RM, ["data.share_prompt=true", "optimizer.grad_accum=2"]),
            ("sft_r1v", TINY_SFT, []),
            ("sft_qwen", TINY_SFT, [f"model.source={folder}", "data.patch_buckets=[64,128]",
                                    "data.image_buckets=[2,4]"])]


def _abstract(config, overrides, mesh, **kw):
    from skyjax.config import load_config
    from skyjax.train.aot import abstract_bundle
    from skyjax.train.config import RunConfig
    from skyjax.train.tasks import TASKS, abstract_batch, prepare_bundle

    cfg = load_config(RunConfig, config, overrides)
    return abstract_batch(cfg, prepare_bundle(TASKS[cfg.kind], abstract_bundle(cfg), cfg.data), mesh, **kw)


def _layout(batch):
    flat = jax.tree_util.tree_flatten_with_path(batch)[0]
    return {"/".join(k.key for k in path): (tuple(x.shape), str(x.dtype), x.sharding.spec) for path, x in flat}


def test_abstract_batch_on_one_host_is_unchanged(tmp_path):
    """hosts=1 (the default) is the single-host batch, exactly as before: shapes, dtypes, shardings, no host_blocks."""
    from skyjax.parallel.mesh import make_mesh

    mesh = make_mesh((2, 2, 2))
    for name, config, overrides in _batch_cases(tmp_path):
        one = _abstract(config, overrides, mesh, hosts=1)
        assert _layout(one) == ONE_HOST[name], name
        assert _layout(_abstract(config, overrides, mesh)) == ONE_HOST[name], name
        assert all(x.sharding.mesh is mesh for x in jax.tree.leaves(one))


def test_abstract_batch_on_several_hosts_is_the_assembled_global_batch(tmp_path):
    """hosts=H is what skyjax.train.global_batch assembles from H hosts that each collated data.batch_size / H rows at
    the largest buckets (shapes and dtypes), with the shardings to_device gives it; a batch that does not divide over
    the hosts (or a host's share over the micro-batches) is an error naming data.batch_size and the hosts."""
    import numpy as np

    from skyjax.config import load_config
    from skyjax.parallel.mesh import make_mesh
    from skyjax.train.config import RunConfig
    from skyjax.train.global_batch import assemble_global_batch
    from skyjax.train.global_batch import batch_shardings

    mesh, hosts = make_mesh((2, 2, 2)), 4
    for name, config, overrides in _batch_cases(tmp_path):
        cfg = load_config(RunConfig, config, overrides)
        share = cfg.data.batch_size // hosts
        local = _abstract(config, overrides + [f"data.batch_size={share}"], mesh)  # what one host collates
        zeros = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), local)
        assembled = assemble_global_batch([zeros] * hosts)
        got = _abstract(config, overrides, mesh, hosts=hosts)
        shapes = lambda t: jax.tree.map(lambda x: (x.shape, x.dtype), t)  # noqa: E731
        assert shapes(got) == shapes(assembled), name
        assert got["host_blocks"].shape == (cfg.optimizer.grad_accum, hosts)
        assert _spec_of(jax.tree.map(lambda x: x.sharding, got)) == _spec_of(batch_shardings(assembled, mesh)), name
        vision = got.get("vision", got)
        assert vision["pixel_values"].shape[1] == hosts * local.get("vision", local)["pixel_values"].shape[1]
    with pytest.raises(ValueError, match=r"data.batch_size 16 does not divide over the 3 hosts of the topology"):
        _abstract(DEMO_RM, [], mesh, hosts=3)
    with pytest.raises(ValueError, match=r"data.batch_size 8 does not divide over the 3 hosts"):
        _abstract(TINY_SFT, [], mesh, hosts=3)
    with pytest.raises(ValueError, match=r"each of the 4 hosts' 4 pairs do not split into optimizer.grad_accum=8"):
        _abstract(DEMO_RM, ["optimizer.grad_accum=8"], mesh, hosts=4)


def test_reward_model_step_on_a_multi_host_slice(monkeypatch, capsys, tmp_path):
    """`skyjax aot` on one v5p:2x2x2 slice, 2 hosts of 4 chips: it compiles the batch they feed, each host's 8 pairs
    (one shared-prompt row each) with its own 256-patch bucket, side by side with host_blocks [1, 2], the rows over
    the batch axes as the rules give them (each host's devices hold its own rows), and the report says so."""
    from skyjax.train.global_batch import batch_shardings

    reports = []

    def spy(*args, **kwargs):
        reports.append(real(*args, **kwargs))
        return reports[-1]

    real = aot_module.compile_config
    monkeypatch.setattr(aot_module, "compile_config", spy)
    overrides = ["mesh.shape=[2,2,2]", "data.share_prompt=true"]
    out_json = tmp_path / "r.json"
    assert aot_main([DEMO_RM, *overrides, "--topology", "v5p:2x2x2", "--json", str(out_json)]) == 0
    assert ("hosts: 2 (per-host batch: 8 pairs, 256 patches, 16 image slots; the step sees the 2 hosts' blocks side "
            "by side (multi-host layout, per-host buckets))") in capsys.readouterr().out
    report = json.loads(out_json.read_text())
    assert report["hosts"] == 2 and report["host_batch"].startswith("8 pairs, 256 patches") and report["fits"]
    (r,) = reports
    batch = _batch_args(r)
    assert r.hosts == 2 and batch["host_blocks"].shape == (1, 2)
    assert batch["pixel_values"].shape == (1, 2 * 256, 1176) and batch["image_grid_thw"].shape == (1, 2 * 16, 3)
    assert batch["input_ids"].shape == (1, 16, 64) and batch["branch_ids"].shape == (1, 16, 64)
    assert batch["vision_meta"]["window_index"].shape == (1, 2 * 64)  # 256 / 4 merge units per host
    (state_in, batch_in) = r.input_shardings
    mesh = jax.tree.leaves(state_in)[0].mesh
    rows = P(None, ("data", "fsdp"), None)  # the hosts are the data axis: host h holds rows [8h, 8h + 8)
    assert batch_in["input_ids"].spec == rows and batch_in["attention_mask"].spec == rows
    assert batch_in["pixel_values"].spec == P() and batch_in["pair_weight"].spec == P()
    assert batch_in["input_ids"] == batch_shardings(batch, mesh)["input_ids"]  # as to_device places them
    trainable, frozen = _expected_state_specs(DEMO_RM, overrides, mesh)
    assert _spec_of(state_in["trainable"]) == trainable and _spec_of(state_in["frozen"]) == frozen


def test_multi_host_batch_errors(capsys):
    """On v5e:4x4 (4 hosts of 2x2 chips) a batch that does not divide over the hosts is named, and so is a mesh whose
    batch axes cannot give every host its own rows (a tensor axis over all 16 chips replicates every row on every
    host; the trainer's to_device refuses it): before compiling."""
    from skyjax.train.global_batch import HostBatchError

    with pytest.raises(ConfigError, match=r"data.batch_size 6 does not divide over the 4 hosts of the topology"):
        compile_config(DEMO_RM, ["mesh.shape=[4,4,1]", "data.batch_size=6"], topology="v5e:4x4")
    with pytest.raises(HostBatchError, match=r"the 4 hosts of this topology each feed their own rows, and the trainer "
                                             r"\(to_device\) would refuse this mesh: host 0's devices hold rows"):
        compile_config(DEMO_RM, ["mesh.shape=[1,1,16]"], topology="v5e:4x4")
    assert aot_main([DEMO_RM, "data.batch_size=6", "mesh.shape=[4,4,1]", "--topology", "v5e:4x4"]) == 2
    assert "data.batch_size 6 does not divide over the 4 hosts" in capsys.readouterr().err


@pytest.mark.parametrize("topology,shape,slices", [
    ("v5e:4x4", (1, 4, 4), 1), ("v5e:4x4", (4, 4, 1), 1), ("v5e:4x8", (1, 8, 4), 2), ("v5p:2x2x4", (1, 16, 1), 1),
    ("v5p:2x2x4", (1, 4, 4), 1), ("v5p:4x4x4", (1, 16, 4), 1), ("v5p:4x4x4", (1, 64, 1), 1)])
def test_topology_mesh_gives_every_host_its_own_rows(topology, shape, slices):
    """create_device_mesh orders devices along ICI rings, which cut across a pod's hosts (2x2 chips each); the mesh
    keeps each host's devices together (hosts_contiguous) so that the batch axes give host h rows [h*R, (h+1)*R) of
    the host-major global batch, as the trainer's to_device requires (check_host_rows)."""
    from jax.sharding import NamedSharding

    from skyjax.parallel.topology import device_hosts
    from skyjax.train.global_batch import check_host_rows

    mesh = topology_mesh(topology, shape, num_slices=slices)
    hosts = device_hosts(mesh.devices.flat)
    count = len(set(hosts.values()))
    assert count == math.prod(shape) * slices // 4  # 4 chips per host on these slices
    batch_axes = tuple(a for a in ("slice", "data", "fsdp") if a in mesh.axis_names)
    rows = 2 * math.prod(mesh.shape[a] for a in batch_axes)
    check_host_rows(NamedSharding(mesh, P(None, batch_axes)), (1, rows, 8), count, host_of=lambda d: hosts[d.id])


def test_hosts_contiguous_orders_hosts_and_keeps_each_hosts_order():
    from skyjax.parallel.mesh import hosts_contiguous

    class Dev:
        def __init__(self, i, host):
            self.id, self.process_index = i, host

        def __repr__(self):
            return f"{self.id}@{self.process_index}"

    hosts = [0, 1, 0, 1, 2, 3, 2, 3, 0, 1, 0, 1, 2, 3, 2, 3]  # rings that alternate hosts, as on a pod
    grid = np.array([Dev(i, h) for i, h in enumerate(hosts)], dtype=object).reshape(1, 4, 4)
    out = hosts_contiguous(grid, lambda d: d.process_index)
    assert out.shape == grid.shape
    assert [d.process_index for d in out.flat] == sorted(hosts)
    assert [d.id for d in out.flat] == [0, 2, 8, 10, 1, 3, 9, 11, 4, 6, 12, 14, 5, 7, 13, 15]
    sliced = np.stack([grid, grid])  # per slice: the leading axis stays
    assert [d.id for d in hosts_contiguous(sliced, lambda d: d.process_index, slice_axis=True)[1].flat] == \
        [d.id for d in out.flat]
    single = np.array([Dev(i, 0) for i in range(8)], dtype=object).reshape(2, 2, 2)
    assert [d.id for d in hosts_contiguous(single, lambda d: 0).flat] == list(range(8))


def test_mpo_step_compiles_with_the_reference_resident_and_precomputed():
    """kind mpo's real step for a TPU topology: with the reference resident the state holds a second copy of the
    trainable subtree; precomputed, it holds none and the batch carries the reference's log-probs instead."""
    from pathlib import Path

    config = Path(__file__).resolve().parents[1] / "configs" / "demo" / "mpo.yaml"
    resident = compile_config(config, ["mesh.shape=[1,4,1]"], topology="v5e:2x2")
    precomputed = compile_config(config, ["mesh.shape=[1,4,1]", "reference.precompute=true"], topology="v5e:2x2")
    assert resident.fits and precomputed.fits
    assert precomputed.argument_bytes < resident.argument_bytes
