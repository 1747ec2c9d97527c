"""Output shardings for matrix products under explicit sharding (private helper of linalg)."""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec


def explicit_shardings(x: jax.Array) -> tuple[Any, Any]:
    """(replicated, x's own) shardings when `x` lives on a mesh with Explicit axes, else Nones.

    Under explicit sharding (``jax.make_mesh(..., axis_types=Explicit)``) a product whose
    contracting dimension is sharded, or whose output would be sharded twice over one axis
    (``X @ X.T`` with rows sharded), is ambiguous and JAX raises ``ShardingTypeError``; the
    caller names the output sharding with these. Outside explicit meshes both are None and
    the products are left to the compiler's propagation.
    """
    sharding = getattr(jax.typeof(x), "sharding", None)
    if not isinstance(sharding, NamedSharding):
        return None, None
    mesh = sharding.mesh
    explicit = any(kind == jax.sharding.AxisType.Explicit for kind in mesh.axis_types)
    if not explicit or all(s is None for s in sharding.spec):
        return None, None
    return NamedSharding(mesh, PartitionSpec()), sharding
