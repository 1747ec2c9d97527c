"""Run a per-leaf function once per group of same-shaped leaves (private helper of transforms).

A model has many matrices of few shapes (every layer's `qkv`, `up`, `down`, ...). The matrix
families (Muon's Newton-Schulz, SOAP's Gram/rotation/refresh, Kron's factor work) call one
per-leaf function; `grouped_map` stacks the leaves whose arguments agree in structure, shape,
dtype and static values, runs the function once under `jax.vmap` over the stack (one batched
product per shape group instead of one chain of small kernels per leaf), and splits the
results back. The per-leaf function is the one implementation; vmap only batches it, so the
results are those of the per-leaf loop up to the rounding of batched products. (SOAP's `eigh`
and `qr` batch through `linalg._lapack`, which loops over the group on the CPU: two batched
LAPACK calls at once can deadlock jaxlib's CPU thread pool.)

Leaves on a mesh of several devices are run one by one. Their layouts differ from leaf to
leaf (rows, columns, replicated), and a stack has one layout: on an Explicit mesh the products
carry explicit output shardings (`linalg._sharding`) that a stack would not have, and on an
Auto mesh (where the partition spec is not visible while tracing) the compiler would give every
leaf of the stack, and the state computed from it, the same layout, not its parameter's.
Batching is for the single-device step on an accelerator, where the per-leaf kernel chains
cost most. On a CPU there is no launch overhead to save and the stack is an extra copy: the
model benchmark measured the batched step 1.08x (Muon), 1.12x (SOAP) and 1.33x (Kron) slower
than leaf by leaf, so on the CPU backend leaves run one by one unless `force_batching(True)` says
otherwise (the tests use it to check the batched path on CPU).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rlx_optax._src import common
from rlx_optax._src.transforms import _owner, _resident

_FORCED: list[bool] = []


@contextlib.contextmanager
def force_batching(enabled: bool) -> Iterator[None]:
    """Within the block, batch (or not) whatever the backend (while tracing)."""
    _FORCED.append(enabled)
    try:
        yield
    finally:
        _FORCED.pop()


def batching_enabled() -> bool:
    """Whether same-shaped leaves are batched: on accelerators, or when forced."""
    if _FORCED:
        return _FORCED[-1]
    return jax.default_backend() != "cpu"


def _on_mesh(x: Any) -> bool:
    """Whether `x` lives on a mesh of several devices (Auto or Explicit axes)."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    if not isinstance(sharding, NamedSharding):
        return False
    manual = jax.sharding.AxisType.Manual
    return sharding.mesh.size > 1 and any(t != manual for t in sharding.mesh.axis_types)


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _signature(x: Any, index: int) -> Any:
    """What two leaves' arguments must share to be stacked; unique on a multi-device mesh."""
    if _is_array(x):
        if _on_mesh(x):
            return ("mesh", index)
        return (
            "array",
            tuple(x.shape),
            str(x.dtype),
            bool(getattr(jax.typeof(x), "weak_type", False)),
        )
    try:
        hash(x)
    except TypeError:
        return ("object", id(x))
    return ("static", type(x).__name__, x)


def grouped_map(
    fn: Callable[..., tuple],
    n_out: int,
    tree: Any,
    *rest: Any,
    min_group: int = 2,
    stacked: bool = False,
    cost: Callable[[list[Any]], float] | None = None,
    resident: Any = None,
) -> tuple:
    """`common.tree_map_multi` with same-shaped leaves batched under `jax.vmap`.

    `fn(leaf, *others)` returns `n_out` pytrees (arrays, tuples of arrays, None). Empty places
    of `tree` (None, `optax.MaskedNode`) are kept as they are in every output. The leaves whose
    argument tuples ``(leaf, *others)`` have the same pytree structure, array shapes and dtypes,
    and equal non-array values form a group; a group of at least `min_group` leaves runs as one
    call of ``jax.vmap(fn)`` over stacked arrays (non-array values are passed as they are). `fn`
    must not keep Python state between calls (a group makes one call). On the CPU backend every
    leaf runs alone (see the module docstring) unless batching is forced.

    On a mesh of several devices (the arguments' types, or `jax.set_mesh`) every leaf runs on
    one owner device, on whole matrices (`_owner`), unless `_owner.owner_compute(False)`. With
    `stacked`, `fn` treats a leading axis beyond a matrix's two as a stack of independent
    matrices (Muon's scanned layers): on a mesh each matrix of such a stack is then owned on
    its own, so a few stacked leaves still spread over every device. `cost(arrays)` estimates
    a leaf's work from its array arguments for the choice of owners (`_owner.leaf_cost` by
    default).

    With `resident` (the `_resident.OwnedBuffers` of a state made with
    ``state_placement="owner"``), the owned leaves' arguments and results at the directory's
    positions are their state, held in those buffers (None in `rest` and in the results):
    on the mesh it was made for, each owner reads and writes its own row and only the other
    arguments and results travel; elsewhere the state is read out and written back. Returns
    the new buffers after the `n_out` trees.
    """
    leaves, treedef = jax.tree.flatten(tree, is_leaf=common.is_empty)
    others = [treedef.flatten_up_to(r) for r in rest]
    outs: list[list[Any]] = [list(leaves) for _ in range(n_out)]
    indices, calls = [], []
    for i, leaf in enumerate(leaves):
        if common.is_empty(leaf):
            continue
        flat, struct = jax.tree.flatten((leaf, *(o[i] for o in others)))
        indices.append(i)
        calls.append((flat, struct))

    def local(calls: list[tuple[list[Any], Any]]) -> list[tuple]:
        return _run_grouped(fn, calls, min_group)

    mesh = _owner.mesh_of([x for flat, _ in calls for x in flat if _is_array(x)])
    hints = None
    if mesh is not None:  # the parameters' layouts of `owner_compute(layouts=...)`, per call
        given = _owner.layout_hints(treedef)
        if given is not None:
            hints = [
                None if given[i] is None else (tuple(np.shape(leaves[i])), given[i])
                for i in indices
            ]
    if resident is not None:
        args = [jax.tree.unflatten(struct, flat) for flat, struct in calls]
        results, resident = _resident_map(fn, args, mesh, local, resident, n_out, hints)
        for i, result in zip(indices, results, strict=True):
            for k in range(n_out):
                outs[k][i] = result[k]
        return (*(treedef.unflatten(o) for o in outs), resident)
    if mesh is None:
        results = local(calls)
    elif stacked:
        pieces, spans, piece_hints = [], [], []
        for n, (flat, struct) in enumerate(calls):
            split = _unstack(flat)
            spans.append(len(pieces) if split is None else (len(pieces), len(split)))
            pieces.extend([(flat, struct)] if split is None else [(f, struct) for f in split])
            hint = None if hints is None else hints[n]
            piece_hints.extend([hint] if split is None else [_matrix_hint(hint)] * len(split))
        done = _owner.run(
            fn, n_out, pieces, mesh, local, cost, hints=None if hints is None else piece_hints
        )
        results = []
        for span in spans:
            if isinstance(span, int):
                results.append(done[span])
                continue
            start, count = span
            parts = done[start : start + count]
            results.append(
                tuple(
                    jax.tree.map(lambda *xs: jnp.stack(xs), *[p[k] for p in parts])
                    for k in range(n_out)
                )
            )
    else:
        results = _owner.run(fn, n_out, calls, mesh, local, cost, hints=hints)
    for i, result in zip(indices, results, strict=True):
        for k in range(n_out):
            outs[k][i] = result[k]
    return tuple(treedef.unflatten(o) for o in outs)


def _matrix_hint(hint: Any) -> Any:
    """The layout hint of one matrix of a stack from the stack's (the stack axis unsplit)."""
    if hint is None:
        return None
    shape, spec = hint
    entries = list(spec) + [None] * (len(shape) - len(spec))
    return None if entries[0] is not None else (shape[1:], P(*entries[1:]))


def _resident_map(fn, args, mesh, local, owned, n_out, hints=None):
    """`grouped_map` with owner-resident state (see there)."""
    positions = owned.directory.positions
    if mesh is not None:
        resident = {e.leaf for e in owned.directory.entries}
        calls = [
            jax.tree.flatten(
                tuple(None if n in resident and k in positions else x for k, x in enumerate(a))
            )
            for n, a in enumerate(args)
        ]
        results, buffers = _owner.run(fn, n_out, calls, mesh, local, store=owned, hints=hints)
        return results, _resident.OwnedBuffers(buffers, owned.directory)
    # no owner compute here: read the state out, compute as usual, write it back in place
    values = _resident.unpack(owned)
    full = []
    for n, a in enumerate(args):
        if n in values:
            a = list(a)
            for k, s in zip(positions, values[n], strict=True):
                a[k] = s
            a = tuple(a)
        full.append(jax.tree.flatten(a))
    results = local(full)
    new = {n: tuple(results[n][k] for k in positions) for n in values}
    results = [
        tuple(None if (n in values and k in positions) else r[k] for k in range(n_out))
        for n, r in enumerate(results)
    ]
    return results, _resident.pack(owned.directory, new)


def _unstack(flat: list[Any]) -> list[list[Any]] | None:
    """The arguments of each matrix of a stack: every array of rank 3, one leading size."""
    arrays = [x for x in flat if _is_array(x)]
    if not arrays or any(np.ndim(x) != 3 for x in arrays):
        return None
    sizes = {x.shape[0] for x in arrays}
    if len(sizes) != 1:
        return None
    count = sizes.pop()
    if count < 2:
        return None
    return [[x[n] if _is_array(x) else x for x in flat] for n in range(count)]


def _run_grouped(
    fn: Callable[..., tuple], calls: list[tuple[list[Any], Any]], min_group: int
) -> list[tuple]:
    """`fn` on every ``(flat_args, struct)``; same-signature calls batched when enabled."""
    if not batching_enabled():
        min_group = len(calls) + 1
    groups: dict[Any, list[int]] = {}
    for n, (flat, struct) in enumerate(calls):
        key = (struct, tuple(_signature(x, n) for x in flat))
        groups.setdefault(key, []).append(n)
    results: list[Any] = [None] * len(calls)
    for members in groups.values():
        if len(members) < min_group:
            for n in members:
                flat, struct = calls[n]
                results[n] = tuple(fn(*jax.tree.unflatten(struct, flat)))
            continue
        flat0, struct = calls[members[0]]
        positions = [j for j, x in enumerate(flat0) if _is_array(x)]
        stacked = [jnp.stack([calls[n][0][j] for n in members]) for j in positions]

        def call(*arrays, flat0=flat0, struct=struct, positions=positions):
            flat = list(flat0)
            for j, a in zip(positions, arrays, strict=True):
                flat[j] = a
            return tuple(fn(*jax.tree.unflatten(struct, flat)))

        result = jax.vmap(call)(*stacked)
        for m, n in enumerate(members):
            results[n] = tuple(jax.tree.map(lambda x, m=m: x[m], r) for r in result)
    return results
