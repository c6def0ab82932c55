import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from skyjax.parallel import (DEFAULT_RULES, MeshConfig, ShardingError, constrain, logical_to_spec, make_mesh,
                             shard_input, use_mesh)


def test_mesh_shapes():
    mesh = make_mesh((2, 2, 2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(make_mesh(MeshConfig(shape=(1, -1, 2))).shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    with pytest.raises(ValueError, match="needs 12 devices"):
        make_mesh((3, 2, 2))
    assert make_mesh((1, 2, 1)).devices.size == 2  # a smaller mesh takes the first devices
    with pytest.raises(ValueError, match="do not divide"):
        make_mesh((3, -1, 1))
    sliced = make_mesh(MeshConfig(shape=(1, -1, 1), num_slices=2))
    assert dict(sliced.shape) == {"slice": 2, "data": 1, "fsdp": 4, "tensor": 1}


def test_rules_map_logical_axes():
    mesh = make_mesh((2, 2, 2))
    assert logical_to_spec(("embed", "mlp"), mesh) == P("fsdp", "tensor")
    assert logical_to_spec(("layers", "embed", "heads"), mesh) == P(None, "fsdp", "tensor")
    # batch takes data+fsdp, so embed on the same array is replicated (a mesh axis is used once per array)
    assert logical_to_spec(("batch", "seq", "embed"), mesh) == P(("data", "fsdp"), None, None)
    # rules are data: a different table gives a different layout
    rules = {**DEFAULT_RULES, "mlp": ("fsdp", "tensor"), "embed": ()}
    assert logical_to_spec(("embed", "mlp"), mesh, rules) == P(None, ("fsdp", "tensor"))
    with pytest.raises(ShardingError, match="logical axis 'bogus' has no sharding rule"):
        logical_to_spec(("bogus",), mesh)


def test_non_dividing_dimension_named():
    mesh = make_mesh((1, 4, 2))
    with pytest.raises(ShardingError, match=r"layers/mlp/kernel: dimension 1 \('embed'\) of shape \(2, 6, 8\) is 6, "
                                            r"which does not divide mesh axes \('fsdp',\) of size 4"):
        logical_to_spec(("layers", "embed", "mlp"), mesh, shape=(2, 6, 8), name="layers/mlp/kernel")
    with pytest.raises(ShardingError, match=r"batch: dimension 0 \('batch'\) of shape \(3, 5\)"):
        shard_input(np.zeros((3, 5)), ("batch", "seq"), mesh, name="batch")
    # activations fall back to replication on a non-dividing dim instead of failing
    assert logical_to_spec(("batch", "seq"), mesh, shape=(3, 5), strict=False) == P(None, None)


def test_constrain_applies_inside_mesh_context():
    mesh = make_mesh((2, 2, 2))
    x = jnp.ones((8, 4, 16))

    @jax.jit
    def f(x):
        return constrain(x * 2, ("batch", "seq", "mlp"))

    assert f(x).sharding.is_fully_replicated  # outside a mesh context: no-op
    with use_mesh(mesh):
        y = f(x)
    assert y.sharding.spec == P(("data", "fsdp"), None, "tensor")
    np.testing.assert_array_equal(np.asarray(y), 2 * np.ones((8, 4, 16)))
