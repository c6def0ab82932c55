"""TPU ahead-of-time compiles on a CPU machine (libtpu's compile-only client): topologies, meshes laid over them,
the lm training step's compiled shardings, memory reports, and the errors for steps and meshes that cannot work.

libtpu comes with the `test` extra; each compile of the tiny step takes a few seconds on 2 cores.
"""

import dataclasses
import json

import jax
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
