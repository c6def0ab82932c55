"""Meshes, logical-axis sharding rules, multi-host start-up and TPU topology compiles."""

from skyjax.parallel.mesh import MESH_AXES, MeshConfig, make_mesh, single_device_mesh
from skyjax.parallel.rules import (
    DEFAULT_RULES,
    ShardingError,
    constrain,
    current_mesh,
    logical_to_spec,
    shard_input,
    tree_shardings,
    use_mesh,
)

__all__ = [
    "MESH_AXES", "MeshConfig", "make_mesh", "single_device_mesh", "DEFAULT_RULES", "ShardingError", "constrain",
    "current_mesh", "logical_to_spec", "shard_input", "tree_shardings", "use_mesh",
]
