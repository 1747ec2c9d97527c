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


def unshard_axis(x: jax.Array, axis: int) -> tuple[jax.Array, Any]:
    """`x` resharded so that `axis` is not split, and the sharding to give the result back.

    On a mesh with Explicit axes an operation that contracts `axis` (a triangular solve) needs
    it whole on every device; the other axes keep their sharding. Returns ``(x, None)`` when
    `x` is not on an explicit mesh or `axis` is already unsharded (an Auto mesh is left to the
    compiler's propagation).
    """
    sharding = getattr(jax.typeof(x), "sharding", None)
    if not isinstance(sharding, NamedSharding):
        return x, None
    mesh = sharding.mesh
    if not any(kind == jax.sharding.AxisType.Explicit for kind in mesh.axis_types):
        return x, None
    spec = list(sharding.spec) + [None] * (x.ndim - len(sharding.spec))
    if spec[axis] is None:
        return x, None
    spec[axis] = None
    return jax.sharding.reshard(x, NamedSharding(mesh, PartitionSpec(*spec))), sharding


def like_explicit(x: jax.Array, like: jax.Array) -> jax.Array:
    """`x` resharded like `like` when `like` lives on a mesh with Explicit axes, else `x`.

    Keeps a loop carry or `lax.cond` branch output in the layout of its input (the branches of
    a `lax.cond` must agree on their output types, sharding included, on explicit meshes).
    """
    sharding = getattr(jax.typeof(like), "sharding", None)
    if not isinstance(sharding, NamedSharding):
        return x
    if not any(kind == jax.sharding.AxisType.Explicit for kind in sharding.mesh.axis_types):
        return x
    if getattr(jax.typeof(x), "sharding", None) == sharding:
        return x
    return jax.sharding.reshard(x, sharding)
