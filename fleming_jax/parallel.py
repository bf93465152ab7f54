"""Meshes and the one table that maps logical axis names to mesh axes.

Model code names logical axes (`embed`, `heads`, …); this module alone decides which mesh
axis (`data`, `fsdp`, `tensor`) shards each of them.
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "length": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "layers": None,
    "norm": None,
}


def logical_to_spec(axes: tuple[str | None, ...]) -> P:
    """PartitionSpec for a tuple of logical axis names, via RULES."""
    return P(*(None if a is None else RULES[a] for a in axes))


def constrain(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """Sharding constraint on an activation when a mesh is set (`jax.set_mesh`); else a no-op."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes))


def sharding_for(var, mesh: jax.sharding.Mesh | None) -> jax.sharding.Sharding:
    """Where a parameter lives: its `axes` metadata through RULES on `mesh`, or device 0."""
    if mesh is None:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.sharding.NamedSharding(mesh, logical_to_spec(var.get_metadata()["axes"]))


def to_host(x: jax.Array):
    """A (possibly multi-host sharded) array as one numpy array on this host."""
    import numpy as np
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
