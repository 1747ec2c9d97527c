"""Shardings of an optimizer state, derived from the shardings of its parameters."""

from __future__ import annotations

import math
from typing import Any

import jax
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rlx_optax._src.transforms import _resident


def _mesh_axes_size(mesh: Any, entry: Any) -> int:
    if entry is None:
        return 1
    names = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(mesh.shape[name] for name in names)


def _is_block_scale(path: tuple) -> bool:
    """Whether a state leaf is the block scales of an 8-bit moment (`QuantizedArray.scale`)."""
    key = path[-1] if path else None
    return isinstance(key, jax.tree_util.GetAttrKey) and key.name == "scale"


def state_shardings(
    tx: optax.GradientTransformation, params: Any, param_shardings: Any = None
) -> Any:
    """`NamedSharding`s for ``tx.init(params)``, one per state leaf, from the parameters'.

    Use them to build the state where it belongs, with no replicated copy on the way
    (``jax.jit(tx.init, out_shardings=state_shardings(tx, params))(params)``), or as the
    `in_shardings`/`out_shardings` of a jitted train step. The rule, per state leaf:

    * a leaf kept for a parameter (its key path ends with the parameter's) and of the
      parameter's shape (moments, momentum, the previous gradient) takes the parameter's
      sharding;
    * a leaf kept for a parameter with another shape (SOAP's statistics and eigenbases, Kron's
      factors, Adafactor's row and column factors) is split along its first axis: over all
      mesh axes when the device count divides it (the layout in which owner compute exchanges
      it, so the exchange needs no resharding and every device holds about 1/P of it), else
      over the mesh axes that split the parameter's first axis when they divide it; it is
      replicated otherwise;
    * the codes and block scales of an 8-bit moment (`QuantizedArray`) count as kept for its
      parameter: the codes take the parameter's sharding, the scales (one per block of the
      last axis) too, their last axis split only where its shards hold whole blocks;
    * the buffers of a state made with ``state_placement="owner"`` (`OwnerPlacedState`) are
      split along their first axis over all mesh axes: row ``d`` on device ``d``;
    * everything else (step counts, PRNG keys, hyperparameters) is replicated.

    Args:
      tx: the optimizer.
      params: the parameters (arrays or `jax.ShapeDtypeStruct`), as given to ``tx.init``.
      param_shardings: a pytree of `NamedSharding` like `params`; by default each array's own
        ``.sharding``. All must share one mesh.

    Returns:
      A pytree of `NamedSharding` with the structure of ``tx.init(params)``.

    Example:
      >>> import jax, jax.numpy as jnp, rlx_optax
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> from jax.sharding import AxisType
      >>> mesh = jax.make_mesh((1,), ("fsdp",), axis_types=(AxisType.Auto,))
      >>> params = {"w": jax.device_put(jnp.ones((4, 3)), NamedSharding(mesh, P("fsdp")))}
      >>> tx = rlx_optax.soap(1e-2)
      >>> shardings = rlx_optax.state_shardings(tx, params)
      >>> state = jax.jit(tx.init, out_shardings=shardings)(params)
      >>> soap_state = shardings[0]
      >>> [str(s.spec) for s in (soap_state.mu["w"], soap_state.stats[1]["w"], soap_state.count)]
      ["P('fsdp',)", "P('fsdp',)", 'P()']
    """
    if param_shardings is None:
        param_shardings = jax.tree.map(lambda p: p.sharding, params)
    by_path: dict[tuple, tuple[tuple[int, ...], NamedSharding]] = {}
    shardings = jax.tree.leaves(param_shardings)
    for (path, p), s in zip(jax.tree_util.tree_leaves_with_path(params), shardings, strict=True):
        if not isinstance(s, NamedSharding):
            raise ValueError(
                f"state_shardings: parameter {jax.tree_util.keystr(path)} has sharding {s!r}; "
                "pass NamedShardings (param_shardings=...)"
            )
        by_path[tuple(path)] = (tuple(p.shape), s)
    if not by_path:
        raise ValueError("state_shardings: params has no array leaves")
    meshes = {s.mesh for _, s in by_path.values()}
    if len(meshes) != 1:
        raise ValueError("state_shardings: the parameters' shardings must share one mesh")
    (mesh,) = meshes
    replicated = NamedSharding(mesh, P())

    def owner(path: tuple) -> tuple[tuple[int, ...], NamedSharding] | None:
        for start in range(len(path)):
            found = by_path.get(path[start:])
            if found is not None:
                return found
        return None

    def sharding_of(path, leaf):
        if isinstance(leaf, _resident.OwnedBuffers):
            return _resident.buffer_shardings(leaf, mesh)
        # a leaf of a per-parameter container (an 8-bit moment's codes and scales) belongs to
        # the parameter its container is kept for
        found = owner(tuple(path)) or (owner(tuple(path)[:-1]) if len(path) > 1 else None)
        if found is None or len(leaf.shape) == 0:
            return replicated
        shape, sharding = found
        if tuple(leaf.shape) == shape:
            return sharding
        spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
        if _is_block_scale(path) and tuple(leaf.shape[:-1]) == shape[:-1]:
            # one value per block of the last axis (an 8-bit moment's scales): the parameter's
            # layout, the last axis split only where the shards hold whole blocks
            last = spec[-1]
            if last is not None and leaf.shape[-1] % _mesh_axes_size(mesh, last):
                last = None
            return NamedSharding(mesh, P(*spec[:-1], last))
        axes = tuple(mesh.axis_names)
        if leaf.shape[0] % mesh.size == 0 and leaf.shape[0] >= mesh.size:
            return NamedSharding(mesh, P(axes if len(axes) > 1 else axes[0]))
        first = spec[0] if spec else None
        if first is not None and leaf.shape[0] % _mesh_axes_size(mesh, first) == 0:
            return NamedSharding(mesh, P(first))
        return replicated

    # the parameters as placed (a state made with state_placement="owner" depends on the mesh)
    placed = jax.tree.map(
        lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s), params, param_shardings
    )
    state = jax.eval_shape(tx.init, placed)
    return jax.tree_util.tree_map_with_path(
        sharding_of, state, is_leaf=lambda x: isinstance(x, _resident.OwnedBuffers)
    )
