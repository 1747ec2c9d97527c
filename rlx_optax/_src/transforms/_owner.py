"""Owner compute: on a mesh, each device computes whole matrices that it owns (private helper).

The matrix families run one per-leaf function over whole matrices (Muon's Newton-Schulz, SOAP's
statistics, refresh and rotations, Kron's factor work). Left to the SPMD partitioner, a
sharded matrix makes every device take part in every product of every leaf: the partitioner
repeats work, gathers operands and puts collectives inside Newton-Schulz and eigen loops. Here
instead every leaf gets one owner device. In one `shard_map` over all mesh axes:

1. every device sends its block of each leaf's arrays to the leaf's owner (one `all_to_all`
   per dtype, the blocks packed by destination);
2. each device runs the per-leaf function on the whole matrices it owns, with no collective
   (a `lax.switch` on the device index: devices own different sets of shapes);
3. every owner sends each device its block of each result (one `all_to_all` per dtype back).

Owners are chosen once per traced step, largest cost first onto the least loaded device, over
all shapes together (a 6-layer model has fewer matrices of one shape than 8 devices have
places). The cost of a leaf is estimated from its array arguments: ``rows * cols * min(rows,
cols)`` per matrix (a product chain, an eigendecomposition), the size of a vector; SOAP and
Kron give `preconditioned_cost` instead (their factorisations run only on refresh steps).

Layouts on Auto meshes (``jax.jit`` with sharded inputs, with or without `jax.set_mesh`). The
partition spec of an argument is not visible while tracing there, so each is given the
canonical layout of `canonical_spec` (its first axis that the device count divides, split over
all mesh axes): an FSDP layout already is one; any other is resharded by the compiler at the
edge of the `shard_map`. A result whose shape is that of the argument at its position (the
update and the gradient, a new statistic and the old one) is released from the canonical layout
and tied to that argument's (`shard_alike`). That keeps a row-and-column layout such as
``P("data", "model")`` through an unpinned step, but the compiler's propagation may still
settle other layouts (replicated, rows only) on the canonical one: a training step should pin
its output shardings (``state_shardings`` and the parameters' own), as large-model steps do
anyway. A leaf whose array arguments are all small enough to be replicated (no axis the device
count divides) is computed on every device, with nothing to exchange.

Layouts on meshes with Explicit axes (``jax.make_mesh(..., axis_types=(AxisType.Explicit,
...))``). The layout is part of each array's type, so the exchange takes every argument in its
own layout (no resharding before or after; the canonical one only where a spec does not divide
its shape) and gives every result of an argument's shape that argument's layout as its
`shard_map` out_spec: updates and state come back typed with their parameter's and their own
shardings, as Explicit mode requires. On a mesh of Explicit and Auto axes the types show the
Explicit part of a layout; that part is kept, the Auto part is the compiler's.

Values closed over on an Explicit mesh. A `shard_map` body cannot close over a value typed on
an Explicit mesh (JAX raises ``NotImplementedError: Closing over inputs to shard_map where the
input is sharded on `Explicit` axes``), and the per-leaf functions do: SOAP's bias corrections
and refresh flags, Kron's update flag, any hyperparameter of `optax.inject_hyperparams`.
`jax.closure_convert` does not lift them (it leaves integer and boolean values closed over,
and its converted function replays a program typed on the Explicit mesh, which does not run
inside the body). So each leaf's function is traced once before the exchange (`_trace`, which
also gives its result shapes) to list the values it closes over that are typed on an Explicit
mesh; they enter the `shard_map` as replicated operands (scalars, a few bytes), and inside it
the caller's `local` runs as a copy whose closures hold those operands in their place
(`_substituted`: through the closures and defaults of Python functions, `functools.partial`s
and built-in containers). A second trace checks that the copy closes over none of them any
more; a leaf where one is out of reach (held by another kind of object) runs on the
compiler's partitioned path instead, as every leaf on an Explicit mesh did before.

The per-leaf function is the one implementation; each owner runs it on the same whole matrices
a single device would, so results do not depend on the mesh beyond the rounding of the
compiled programs.
"""

from __future__ import annotations

import contextlib
import functools
import math
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.shard_alike import shard_alike
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

_ENABLED: list[tuple[bool, Any]] = []


@contextlib.contextmanager
def owner_compute(enabled: bool = True, *, layouts: Any = None) -> Iterator[None]:
    """Within the block, whether the matrix families compute whole matrices on owner devices.

    On by default. On a mesh of several devices, Muon, MARS-Shampoo, Stiefel, SOAP and Kron
    send each matrix to one owner device, compute it there and send the result back (see
    ``docs/scaling.md``), on meshes with Auto axes and with Explicit axes (there each array
    is exchanged in the layout its type gives, and every result comes back typed with its
    argument's sharding). ``owner_compute(False)`` leaves the matrix work to the compiler's
    partitioning instead (the behaviour before 0.2; for comparisons). It acts while a step is
    traced, so wrap the first call of a jitted function, not its definition.

    Args:
      enabled: compute on owner devices (True, the default) or leave the matrix work to the
        compiler's partitioning (False).
      layouts: the parameters' layouts, for meshes with Auto axes: a pytree of the
        parameters' structure with a `jax.sharding.PartitionSpec`,
        `jax.sharding.NamedSharding` or None (unknown) at each parameter, or a wrapper of one
        (the ``nnx.Param`` of ``flax.nnx.get_partition_spec``). A traced step on an Auto mesh cannot
        see its arrays' layouts, so the exchange otherwise takes every matrix in a canonical
        layout (its first axis that the device count divides, split over all mesh axes) and
        the compiler reshards any other layout to it and back: for ``P("fsdp", "tp")``
        weights that is an all-gather over ``tp`` before the exchange. With `layouts`, each
        matrix of its parameter's shape is exchanged in its parameter's layout. A layout
        that does not divide its matrix's shape (a family that reshapes it) is not used.
        On a mesh of Explicit axes only, the arrays' types give the layouts and this is not
        used; on a mesh of Explicit and Auto axes, a layout whose Explicit part is the one
        the array's type shows is used whole (the type shows only that part).

    Example:
      >>> import rlx_optax
      >>> with rlx_optax.owner_compute(False):
      ...     pass  # trace and compile the step here
    """
    _ENABLED.append((bool(enabled), layouts))
    try:
        yield
    finally:
        _ENABLED.pop()


def enabled() -> bool:
    return _ENABLED[-1][0] if _ENABLED else True


def _is_layout_leaf(x: Any) -> bool:
    return x is None or isinstance(x, (P, NamedSharding))


def layout_hints(treedef: Any) -> list[Any] | None:
    """Per leaf of a tree of structure `treedef` (flattened with its empty places as leaves),
    the `PartitionSpec` of the innermost `owner_compute(layouts=...)`, or None where none is
    given; None outside such a block.

    The layouts tree has the parameters' structure down to their leaves; at each leaf a
    `PartitionSpec`, a `NamedSharding`, None, or a container of exactly one of them (as the
    ``nnx.Param`` wrappers of `flax.nnx.get_partition_spec`). Raises ValueError (naming
    `layouts`) otherwise."""
    given = next((lay for _, lay in reversed(_ENABLED) if lay is not None), None)
    if given is None:
        return None

    def refuse(detail: str) -> ValueError:
        return ValueError(
            "owner_compute(layouts=...): the layouts must be a pytree of the parameters' "
            "structure with a PartitionSpec, NamedSharding or None at each parameter; "
            f"{detail} (parameters: {treedef})"
        )

    try:
        parts = treedef.flatten_up_to(given)
    except (ValueError, TypeError) as exc:
        raise refuse(f"the structure differs: {exc}") from None
    hints = []
    for part in parts:
        inner = jax.tree.leaves(part, is_leaf=_is_layout_leaf)
        if len(inner) != 1 or not _is_layout_leaf(inner[0]):
            raise refuse(f"got {part!r} at a parameter")
        hints.append(inner[0].spec if isinstance(inner[0], NamedSharding) else inner[0])
    return hints


def _typed_sharding(x: Any) -> Any:
    sharding = getattr(jax.typeof(x), "sharding", None)
    return sharding if isinstance(sharding, NamedSharding) else None


def _splitting_axes(mesh: Any) -> tuple[str, ...]:
    """The mesh axes that are not manual (inside a `shard_map` every axis is)."""
    types = tuple(getattr(mesh, "axis_types", ())) or (AxisType.Auto,) * len(mesh.axis_names)
    return tuple(n for n, t in zip(mesh.axis_names, types, strict=True) if t != AxisType.Manual)


def mesh_of(arrays: Sequence[Any]) -> Any:
    """The mesh of several devices the arrays live on (from their types, or `jax.set_mesh`).

    None outside such a mesh, inside a `shard_map` (manual axes), or when owner compute is off.
    """
    if not enabled():
        return None
    for x in arrays:
        sharding = _typed_sharding(x)
        if sharding is not None and sharding.mesh.size > 1:
            mesh = sharding.mesh
            break
    else:
        mesh = jax.sharding.get_abstract_mesh()
        if mesh is None or mesh.empty or mesh.size <= 1:
            return None
    axes = _splitting_axes(mesh)
    if len(axes) != len(mesh.axis_names) or math.prod(mesh.shape[a] for a in axes) <= 1:
        return None
    return mesh


def _is_explicit(mesh: Any) -> bool:
    return any(t == AxisType.Explicit for t in getattr(mesh, "axis_types", ()))


def _all_explicit(mesh: Any) -> bool:
    types = tuple(getattr(mesh, "axis_types", ()))
    return bool(types) and all(t == AxisType.Explicit for t in types)


def _explicit_part(entries: tuple[tuple[str, ...], ...], mesh: Any) -> tuple:
    """Normalised spec `entries` restricted to the mesh's Explicit axes (what a type shows)."""
    types = dict(zip(mesh.axis_names, getattr(mesh, "axis_types", ()), strict=False))
    return tuple(tuple(a for a in e if types.get(a) == AxisType.Explicit) for e in entries)


def canonical_spec(shape: Sequence[int], mesh: Any) -> P:
    """The layout owner compute gives an array on an Auto mesh: the first axis that the device
    count divides, split over all mesh axes (major to minor); replicated when there is none."""
    axes = tuple(mesh.axis_names)
    n = math.prod(mesh.shape[a] for a in axes)
    for d, size in enumerate(shape):
        if size % n == 0 and size >= n:
            return P(*([None] * d), axes if len(axes) > 1 else axes[0])
    return P()


def _normalise(spec: P, ndim: int) -> tuple[tuple[str, ...], ...]:
    entries = list(spec) + [None] * (ndim - len(spec))
    out = []
    for e in entries[:ndim]:
        if e is None:
            out.append(())
        elif isinstance(e, tuple):
            out.append(tuple(e))
        else:
            out.append((e,))
    return tuple(out)


class _Layout:
    """Where each device's block of an array sits: the static geometry of one partition spec."""

    def __init__(self, shape: tuple[int, ...], spec: P, mesh: Any):
        self.shape = shape
        self.spec = spec
        entries = _normalise(spec, len(shape))
        names = tuple(mesh.axis_names)
        sizes = [mesh.shape[a] for a in names]
        self.devices = math.prod(sizes)
        self.grid = tuple(math.prod(mesh.shape[a] for a in e) for e in entries)
        if any(s % g for s, g in zip(shape, self.grid, strict=True)):
            raise ValueError(f"spec {spec} does not divide shape {shape}")
        self.block = tuple(s // g for s, g in zip(shape, self.grid, strict=True))
        self.block_size = math.prod(self.block)
        self.replicated = all(g == 1 for g in self.grid)
        # cell[s]: the grid cell (flat, row-major) of device s's block
        cell = []
        for s in range(self.devices):
            coords = dict(zip(names, np.unravel_index(s, sizes), strict=True))
            index = []
            for e in entries:
                k = 0
                for a in e:
                    k = k * mesh.shape[a] + int(coords[a])
                index.append(k)
            cell.append(int(np.ravel_multi_index(index, self.grid)) if index else 0)
        self.cell = np.asarray(cell, np.int32)
        # holder[c]: one device holding grid cell c (the first)
        cells = math.prod(self.grid)
        self.holder = np.asarray([int(np.argmax(self.cell == c)) for c in range(cells)], np.int32)

    def assemble(self, rows: jax.Array) -> jax.Array:
        """The whole array from ``rows[s]`` = device s's flattened block."""
        identity = np.array_equal(self.holder, np.arange(rows.shape[0]))
        blocks = rows if identity else rows[self.holder]
        return _from_blocks(blocks, self.grid, self.block, self.shape)

    def split(self, whole: jax.Array) -> jax.Array:
        """``rows[s]`` = device s's flattened block of `whole`."""
        blocks = _to_blocks(whole, self.grid, self.block)
        identity = np.array_equal(self.cell, np.arange(blocks.shape[0]))
        return blocks if identity else blocks[self.cell]


def _to_blocks(x: jax.Array, grid: tuple[int, ...], block: tuple[int, ...]) -> jax.Array:
    nd = len(grid)
    y = x.reshape(tuple(v for gb in zip(grid, block, strict=True) for v in gb))
    y = jnp.transpose(y, tuple(range(0, 2 * nd, 2)) + tuple(range(1, 2 * nd, 2)))
    return y.reshape(math.prod(grid), math.prod(block))


def _from_blocks(rows: jax.Array, grid, block, shape) -> jax.Array:
    nd = len(grid)
    y = rows.reshape(tuple(grid) + tuple(block))
    order = [v for d in range(nd) for v in (d, nd + d)]
    return jnp.transpose(y, order).reshape(shape)


def leaf_cost(arrays: Sequence[Any]) -> float:
    """Estimated work of one leaf: ``rows * cols * min(rows, cols)`` per matrix (times its batch
    size), the size of a vector."""
    cost = 0.0
    for x in arrays:
        shape = tuple(x.shape)
        if len(shape) >= 2:
            r, c = shape[-2:]
            cost += math.prod(shape[:-2]) * r * c * min(r, c)
        else:
            cost += math.prod(shape)
    return cost


def preconditioned_cost(arrays: Sequence[Any]) -> float:
    """Work of one step of a per-axis preconditioner on the leaf `arrays[0]` (SOAP's and Kron's
    products of the gradient with a factor per axis): ``size * sum(shape)``. Their
    factorisations (cubic in a side) run only on refresh steps and are left out."""
    g = arrays[0]
    return float(math.prod(g.shape) * max(1, sum(g.shape)))


def assign_owners(costs: Sequence[float], devices: int) -> list[int]:
    """Owner of each item: largest cost first onto the least loaded device (ties: lowest)."""
    load = [0.0] * devices
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        d = min(range(devices), key=lambda d: (load[d], d))
        owners[i] = d
        load[d] += costs[i]
    return owners


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _is_key(x: Any) -> bool:
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _in_spec(x: Any, mesh: Any, hint: Any = None) -> P:
    """The layout `x` enters and leaves the exchange in: on an Explicit mesh its own (its type
    says it) when that divides its shape, else the canonical one. `hint` ``(shape, spec)``
    (the leaf's shape and its parameter's spec from `owner_compute(layouts=...)`) gives an
    array of that shape the spec when it divides it: on an Auto mesh always, on a mixed mesh
    when its Explicit part is the one the type shows, on an Explicit mesh never."""
    if np.ndim(x) == 0 or _is_key(x):
        return P()
    if hint is not None and tuple(x.shape) == hint[0] and not _all_explicit(mesh):
        spec = _dividing(hint[1], hint[0], mesh)
        if spec is not None:
            if not _is_explicit(mesh):
                return spec
            own = _typed_sharding(x)  # a mixed mesh: the type shows the Explicit part
            shown = None if own is None else _normalise(own.spec, np.ndim(x))
            if shown == _explicit_part(_normalise(spec, np.ndim(x)), mesh):
                return spec
    if _is_explicit(mesh):
        own = _typed_sharding(x)
        if own is not None and tuple(own.mesh.axis_names) == tuple(mesh.axis_names):
            spec = _dividing(own.spec, tuple(x.shape), mesh)
            if spec is not None:
                return spec
    return canonical_spec(x.shape, mesh)


def _dividing(spec: P, shape: tuple[int, ...], mesh: Any) -> P | None:
    """`spec` normalised for an array of `shape` on `mesh`, or None when it has more entries
    than the array has axes or does not divide it. Raises ValueError for an axis that is not
    one of the mesh's."""
    if len(spec) > len(shape):
        return None
    entries = _normalise(spec, len(shape))
    unknown = {a for e in entries for a in e} - set(mesh.axis_names)
    if unknown:
        raise ValueError(
            f"owner_compute(layouts=...): the spec {spec} names {sorted(unknown)}, which are "
            f"not axes of the mesh {tuple(mesh.axis_names)}"
        )
    if any(s % math.prod(mesh.shape[a] for a in e) for s, e in zip(shape, entries, strict=True)):
        return None
    return P(*(_entry(e) for e in entries))


def _entry(axes: tuple[str, ...]) -> Any:
    return None if not axes else axes[0] if len(axes) == 1 else axes


def run(
    fn: Callable[..., tuple],
    n_out: int,
    calls: list[tuple[list[Any], Any]],
    mesh: Any,
    local: Callable[[list[tuple[list[Any], Any]]], list[tuple]],
    cost: Callable[[list[Any]], float] | None = None,
    store: Any = None,
    hints: Sequence[Any] | None = None,
) -> Any:
    """``fn`` applied to every leaf's arguments, each on its owner device of `mesh`.

    `calls` holds one ``(flat_args, struct)`` per leaf (``jax.tree.unflatten(struct, flat_args)``
    are the arguments of `fn`). `local(calls)` runs a list of leaves on one device (the caller
    may batch same-shaped ones). Returns `fn`'s result tuple per leaf.

    With `store` (the `_resident.OwnedBuffers` of a state made with ``state_placement=
    "owner"``), the leaves of its directory are owned by the devices it names and their
    arguments at its positions (None in `calls`) are their state: each owner reads it from its
    own row of the store's buffers and writes the new state back there, so only the other
    arguments and results travel; the leaves outside the directory run on every device.
    Returns the results (None at those positions) and the new buffers.

    ``hints[i]`` (None, or ``(shape, spec)``: leaf `i`'s shape and its parameter's layout from
    `owner_compute(layouts=...)`) gives its arrays and results of that shape that layout on an
    Auto mesh, when it divides the shape, instead of the canonical one.
    """
    names = tuple(mesh.axis_names)
    devices = math.prod(mesh.shape[a] for a in names)
    axis = names if len(names) > 1 else names[0]
    resident = {} if store is None else {e.leaf: e for e in store.directory.entries}
    positions = () if store is None else store.directory.positions

    def with_state(i: int, flat: list[Any], state: Any) -> tuple[list[Any], Any]:
        """The whole arguments of resident leaf `i`: its moving ones and its `state`."""
        args = list(jax.tree.unflatten(calls[i][1], flat))
        for k, value in zip(positions, state, strict=True):
            args[k] = value
        return jax.tree.flatten(tuple(args))

    # static description of every leaf: which flat args are arrays, their layouts
    infos = []
    for i, (flat, _) in enumerate(calls):
        arrays = [j for j, x in enumerate(flat) if _is_array(x)]
        hint = None if hints is None else hints[i]
        specs = {j: _in_spec(flat[j], mesh, hint) for j in arrays}
        layouts = {j: _Layout(tuple(flat[j].shape), specs[j], mesh) for j in arrays}
        sent = [j for j in arrays if not layouts[j].replicated]
        infos.append({"arrays": arrays, "specs": specs, "layouts": layouts, "sent": sent})

    if store is None:
        owned = [i for i, info in enumerate(infos) if info["sent"]]
    else:  # the state's owners were chosen when it was made
        owned = [i for i in range(len(calls)) if i in resident]
    everywhere = [i for i in range(len(calls)) if i not in owned]
    # each owned leaf traced once: its result shapes, and the values typed on an Explicit mesh
    # that its function closes over (a traced bias correction, refresh flag or injected
    # hyperparameter), which enter the `shard_map` as operands; a leaf whose closures cannot
    # be rebound to them stays on the partitioned path (see the module docstring)
    shapes_of, hoisted, checked = {}, {}, {}
    for i in list(owned):
        flat, struct = calls[i]
        if i in resident:
            flat, struct = with_state(i, flat, _state_shapes(resident[i]))
        shapes, closed_over = _trace(fn, struct, flat)
        if closed_over:
            key = (struct, tuple(_signature(x) for x in flat), tuple(map(id, closed_over)))
            if key not in checked:
                checked[key] = _hoistable(fn, struct, flat, closed_over)
            if not checked[key]:
                if i in resident:
                    raise ValueError(
                        "state_placement='owner': a per-leaf function closes over a value "
                        "typed on this Explicit mesh that cannot be passed to its owner; "
                        "make the state with state_placement='parameter'"
                    )
                owned.remove(i)
                everywhere.append(i)
                continue
        shapes_of[i] = shapes
        hoisted.update((id(c), c) for c in closed_over)
    results: list[tuple | None] = [None] * len(calls)
    if everywhere:
        for i, r in zip(everywhere, local([calls[i] for i in everywhere]), strict=True):
            results[i] = r
    if not owned:
        return results if store is None else (results, list(store.buffers))

    if store is None:
        cost = cost or leaf_cost
        costs = [cost([calls[i][0][j] for j in infos[i]["arrays"]]) for i in owned]
        owner_of = dict(zip(owned, assign_owners(costs, devices), strict=True))
    else:
        owner_of = {i: resident[i].owner for i in owned}

    # result shapes, and each result's layout (the argument's at the same position when the
    # shapes agree, else canonical)
    out_info = {}
    for i in owned:
        flat, struct = calls[i]
        shapes = shapes_of[i]
        args = jax.tree.unflatten(struct, flat)
        per_out = []
        for k in range(n_out):
            if i in resident and k in positions:
                per_out.append(None)  # the new state: written to the owner's row
                continue
            out_leaves, out_def = jax.tree.flatten(shapes[k])
            like = args[k] if k < len(args) else None
            like_leaves, like_def = jax.tree.flatten(like) if like is not None else ([], None)
            same = (
                like_def is not None
                and like_def == out_def
                and all(
                    _is_array(a) and tuple(a.shape) == tuple(o.shape)
                    for a, o in zip(like_leaves, out_leaves, strict=False)
                )
            )
            specs = []
            for n, o in enumerate(out_leaves):
                if np.ndim(o) == 0 or _is_key(o):
                    specs.append(P())
                elif same:
                    hint = None if hints is None else hints[i]
                    specs.append(_in_spec(like_leaves[n], mesh, hint))
                else:
                    specs.append(canonical_spec(o.shape, mesh))
            layouts = [
                _Layout(tuple(o.shape), s, mesh) for o, s in zip(out_leaves, specs, strict=True)
            ]
            likes = like_leaves if same else [None] * len(out_leaves)
            per_out.append((out_def, out_leaves, specs, layouts, likes))
        out_info[i] = per_out

    # packing plans: per dtype, offsets within the chunk each owner receives / sends
    def plan(entries):  # entries: (owner, key, dtype, size) in a fixed order
        offsets, fill = {}, {}
        for owner, key, dtype, size in entries:
            at = fill.get((owner, dtype), 0)
            offsets[key] = at
            fill[(owner, dtype)] = at + size
        width = {}
        for (_, dtype), n in fill.items():
            width[dtype] = max(width.get(dtype, 0), n)
        return offsets, width

    in_entries = []
    for i in owned:
        for j in infos[i]["sent"]:
            x = calls[i][0][j]
            in_entries.append(
                (owner_of[i], (i, j), jnp.dtype(x.dtype), infos[i]["layouts"][j].block_size)
            )
    in_offsets, in_width = plan(in_entries)
    out_entries = []
    for i in owned:
        for k, (_, leaves, _, layouts, _) in _moving(out_info[i]):
            for n, o in enumerate(leaves):
                out_entries.append(
                    (owner_of[i], (i, k, n), jnp.dtype(o.dtype), layouts[n].block_size)
                )
    out_offsets, out_width = plan(out_entries)
    in_dtypes = sorted(in_width, key=str)
    out_dtypes = sorted(out_width, key=str)

    # the shard_map's operands: every array argument of the owned leaves
    operands, operand_specs, where = [], [], {}
    for i in owned:
        for j in infos[i]["arrays"]:
            where[(i, j)] = len(operands)
            operands.append(calls[i][0][j])
            operand_specs.append(infos[i]["specs"][j])
    # and every value the per-leaf function closes over that is typed on an Explicit mesh,
    # replicated; inside, `local` runs with those closures bound to these operands instead
    first_hoisted = len(operands)
    for c in hoisted.values():
        operands.append(c)
        operand_specs.append(P())
    # and the store's buffers, row d on device d
    first_buffer = len(operands)
    row_spec = P(axis, None)
    if store is not None:
        operands.extend(store.buffers)
        operand_specs.extend([row_spec] * len(store.buffers))
    result_specs = []
    for i in owned:
        for _, (_, _, specs, _, _) in _moving(out_info[i]):
            result_specs.extend(specs)

    def body(*blocks):
        # 1. pack every sent block by destination (its leaf's owner), one buffer per dtype
        send = {dt: [[] for _ in range(devices)] for dt in in_dtypes}
        for i in owned:
            for j in infos[i]["sent"]:
                b = blocks[where[(i, j)]]
                send[jnp.dtype(b.dtype)][owner_of[i]].append(b.reshape(-1))
        received = []
        for dt in in_dtypes:
            rows = [_pad(parts, in_width[dt], dt) for parts in send[dt]]
            buf = jnp.stack(rows)
            received.append(lax.all_to_all(buf, axis, 0, 0, tiled=True))

        # 2. each device computes the leaves it owns
        def branch(d):
            def compute(received, blocks):
                mine = [i for i in owned if owner_of[i] == d]
                rows = [b[0] for b in blocks[first_buffer:]]
                local_calls = []
                for i in mine:
                    flat, struct = calls[i]
                    flat = list(flat)
                    for j in infos[i]["arrays"]:
                        layout = infos[i]["layouts"][j]
                        if layout.replicated:
                            flat[j] = blocks[where[(i, j)]]
                            continue
                        buf = received[in_dtypes.index(jnp.dtype(flat[j].dtype))]
                        at = in_offsets[(i, j)]
                        flat[j] = layout.assemble(buf[:, at : at + layout.block_size])
                    if i in resident:
                        flat, struct = with_state(i, flat, _read_state(resident[i], store, rows))
                    local_calls.append((flat, struct))
                inner = dict(zip(hoisted, blocks[first_hoisted:first_buffer], strict=True))
                run_local = _substituted(local, inner) if inner else local
                outs = run_local(local_calls) if local_calls else []
                sendback = {dt: [[] for _ in range(devices)] for dt in out_dtypes}
                written: dict[str, list[jax.Array]] = {}
                for i, result in zip(mine, outs, strict=True):
                    if i in resident:
                        _write_state(resident[i], [result[k] for k in positions], written)
                    for k, (_, _, _, layouts, _) in _moving(out_info[i]):
                        for n, o in enumerate(jax.tree.leaves(result[k])):
                            split = layouts[n].split(o)
                            dt = jnp.dtype(o.dtype)
                            for dst in range(devices):
                                sendback[dt][dst].append(split[dst])
                packed = [
                    jnp.stack([_pad(parts, out_width[dt], dt) for parts in sendback[dt]])
                    for dt in out_dtypes
                ]
                if store is None:
                    return packed, []
                new_rows = [
                    _pad(written[dt], width, dt) if dt in written else row
                    for dt, width, row in zip(
                        store.directory.dtypes, store.directory.widths, rows, strict=True
                    )
                ]
                return packed, new_rows

            return compute

        me = lax.axis_index(axis)
        packed, new_rows = lax.switch(
            me, [branch(d) for d in range(devices)], received, list(blocks)
        )

        # 3. back to every device: its block of every result
        back = [lax.all_to_all(b, axis, 0, 0, tiled=True) for b in packed]
        outs = []
        for i in owned:
            for k, (_, leaves, _, layouts, _) in _moving(out_info[i]):
                for n, o in enumerate(leaves):
                    buf = back[out_dtypes.index(jnp.dtype(o.dtype))]
                    at = out_offsets[(i, k, n)]
                    size = layouts[n].block_size
                    outs.append(buf[owner_of[i], at : at + size].reshape(layouts[n].block))
        return (*outs, *(row[None] for row in new_rows))

    n_buffers = 0 if store is None else len(store.buffers)
    flat_results = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=tuple(operand_specs),
        out_specs=(*result_specs, *([row_spec] * n_buffers)),
        check_vma=False,
    )(*[_enter(x, spec, mesh) for x, spec in zip(operands, operand_specs, strict=True)])
    it = iter(flat_results[: len(result_specs)])
    for i in owned:
        result = []
        for out in out_info[i]:
            if out is None:
                result.append(None)
                continue
            out_def, leaves, _, _, likes = out
            values = [next(it) for _ in leaves]
            values = [_layout_like(v, like, mesh) for v, like in zip(values, likes, strict=True)]
            result.append(jax.tree.unflatten(out_def, values))
        results[i] = tuple(result)
    if store is None:
        return results
    return results, list(flat_results[len(result_specs) :])


def _moving(per_out: list[Any]) -> list[tuple[int, Any]]:
    """The results that travel back (index, layout info): all but a resident leaf's state."""
    return [(k, out) for k, out in enumerate(per_out) if out is not None]


def _state_shapes(entry: Any) -> Any:
    """A resident leaf's state as `jax.ShapeDtypeStruct`s (from its `_resident.Entry`)."""
    leaves = [jax.ShapeDtypeStruct(s, jnp.dtype(dt)) for s, dt, _ in entry.arrays]
    return jax.tree.unflatten(entry.struct, leaves)


def _read_state(entry: Any, store: Any, rows: list[jax.Array]) -> Any:
    """A resident leaf's state, read from the owner's rows (one per dtype of the store)."""
    dtypes = store.directory.dtypes
    leaves = [
        rows[dtypes.index(dt)][at : at + math.prod(s)].reshape(s) for s, dt, at in entry.arrays
    ]
    return jax.tree.unflatten(entry.struct, leaves)


def _write_state(entry: Any, state: list[Any], written: dict[str, list[jax.Array]]) -> None:
    """Append a resident leaf's new state to the owner's new rows, in the directory's order."""
    leaves, struct = jax.tree.flatten(tuple(state))
    if struct != entry.struct:
        raise ValueError(f"the per-leaf state changed structure: {struct} != {entry.struct}")
    for x, (_, dt, _) in zip(leaves, entry.arrays, strict=True):
        written.setdefault(dt, []).append(jnp.ravel(x).astype(dt))


def _flat_call(fn, struct, flat, positions):
    """`fn` as a function of the array arguments alone (at `positions` of `flat`)."""

    def call(*arrays):
        full = list(flat)
        for j, a in zip(positions, arrays, strict=True):
            full[j] = a
        return tuple(fn(*jax.tree.unflatten(struct, full)))

    return call


def _trace(fn, struct, flat) -> tuple[Any, list[Any]]:
    """`fn`'s result shapes on the arrays of `flat`, and the values typed on a mesh with
    Explicit axes that it closes over (a `shard_map` cannot take them in)."""
    positions = [j for j, x in enumerate(flat) if _is_input(x)]
    abstract = [_abstract(flat[j]) for j in positions]
    closed, shapes = jax.make_jaxpr(_flat_call(fn, struct, flat, positions), return_shape=True)(
        *abstract
    )
    return shapes, [c for c in closed.consts if _on_explicit_mesh(c)]


def _signature(x: Any) -> Any:
    """What two leaves' arguments share when their functions trace alike."""
    if _is_input(x):
        a = _abstract(x)
        return (tuple(a.shape), str(a.dtype), bool(a.weak_type))
    try:
        hash(x)
    except TypeError:
        return ("object", id(x))
    return ("static", type(x).__name__, x)


def _is_input(x: Any) -> bool:
    """An array argument, or the shape of one (a resident leaf's state while tracing)."""
    return _is_array(x) or isinstance(x, jax.ShapeDtypeStruct)


def _abstract(x: Any) -> jax.ShapeDtypeStruct:
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    weak = bool(getattr(jax.typeof(x), "weak_type", False))
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, weak_type=weak)


def _on_explicit_mesh(x: Any) -> bool:
    sharding = getattr(jax.typeof(x), "sharding", None)
    return isinstance(sharding, NamedSharding) and _is_explicit(sharding.mesh)


def _hoistable(fn, struct, flat, closed_over: list[Any]) -> bool:
    """Whether `fn`, its closures bound to arguments in place of `closed_over` (through
    `_substituted`), closes over no value typed on an Explicit mesh any more."""
    positions = [j for j, x in enumerate(flat) if _is_input(x)]
    call = _flat_call(fn, struct, flat, positions)

    def bound(values, *arrays):
        inner = {id(c): v for c, v in zip(closed_over, values, strict=True)}
        return _substituted(call, inner)(*arrays)

    stand_ins = [_abstract(c) for c in closed_over]
    closed = jax.make_jaxpr(bound)(stand_ins, *[_abstract(flat[j]) for j in positions])
    return not any(_on_explicit_mesh(c) for c in closed.consts)


def _substituted(obj: Any, values: dict[int, Any]) -> Any:
    """`obj` with every value whose ``id`` is a key of `values` replaced by that value, through
    the closures and defaults of Python functions, `functools.partial`s and built-in
    containers (tuples, named tuples, lists, dicts). What reaches none of them is `obj` itself;
    what is reached only through other objects is not replaced (`_hoistable` checks)."""
    reaches: dict[int, bool] = {}

    def reach(x: Any) -> bool:
        key = id(x)
        if key in values:
            return True
        if key in reaches:
            return reaches[key]
        reaches[key] = False  # a cycle reaches nothing more through itself
        reaches[key] = any(reach(c) for c in _children(x))
        return reaches[key]

    memo: dict[int, Any] = {}

    def swap(x: Any) -> Any:
        key = id(x)
        if key in values:
            return values[key]
        if not reach(x):
            return x
        if key in memo:
            return memo[key]
        if isinstance(x, types.FunctionType):
            cells = tuple(types.CellType() for _ in x.__closure__ or ())
            new = types.FunctionType(x.__code__, x.__globals__, x.__name__, None, cells or None)
            memo[key] = new  # before the cells: a function may reach itself
            for cell, old in zip(cells, x.__closure__ or (), strict=True):
                with contextlib.suppress(ValueError):  # an empty cell stays empty
                    cell.cell_contents = swap(old.cell_contents)
            new.__defaults__ = swap(x.__defaults__)
            new.__kwdefaults__ = swap(x.__kwdefaults__)
            new.__dict__.update(x.__dict__)
            new.__qualname__, new.__module__ = x.__qualname__, x.__module__
            return new
        if isinstance(x, functools.partial):
            new = functools.partial(swap(x.func), *swap(x.args), **swap(x.keywords))
        elif isinstance(x, dict):
            new = type(x)((k, swap(v)) for k, v in x.items())
        elif isinstance(x, tuple) and hasattr(type(x), "_make"):
            new = type(x)._make(swap(v) for v in x)
        else:  # tuple or list
            new = type(x)(swap(v) for v in x)
        memo[key] = new
        return new

    return swap(obj)


def _children(x: Any) -> list[Any]:
    """What `_substituted` looks through in `x`."""
    if isinstance(x, types.FunctionType):
        cells = []
        for cell in x.__closure__ or ():
            with contextlib.suppress(ValueError):
                cells.append(cell.cell_contents)
        return [*cells, x.__defaults__, x.__kwdefaults__]
    if isinstance(x, functools.partial):
        return [x.func, x.args, x.keywords]
    if type(x) in (tuple, list, dict) or (isinstance(x, tuple) and hasattr(type(x), "_make")):
        return list(x.values()) if isinstance(x, dict) else list(x)
    return []


def _free(x: jax.Array, mesh: Any) -> jax.Array:
    """`x` through a copy of unconstrained layout: the exchange's canonical layout then does
    not pull the layout of `x` itself (an intermediate such as Muon's momentum) toward it."""
    if np.ndim(x) == 0 or _is_key(x):
        return x
    free = NamedSharding(mesh, P(*([P.UNCONSTRAINED] * np.ndim(x))))
    return jax.lax.with_sharding_constraint(x, free)


def _enter(x: jax.Array, spec: P, mesh: Any) -> jax.Array:
    """`x` as the exchange takes it: on an Explicit mesh resharded to `spec` when its type
    says otherwise; on an Auto mesh released (`_free`)."""
    if not _is_explicit(mesh):
        return _free(x, mesh)
    if np.ndim(x) == 0 or _is_key(x):
        return x
    own = _typed_sharding(x)
    wanted = _explicit_part(_normalise(spec, np.ndim(x)), mesh)  # what a type can show
    if own is not None and _normalise(own.spec, np.ndim(x)) == wanted:
        return x
    return jax.sharding.reshard(x, NamedSharding(mesh, spec))


def _layout_like(value: jax.Array, like: Any, mesh: Any) -> jax.Array:
    """On an Auto mesh, `value` (a result in the canonical layout) in the layout of `like` (the
    argument it replaces), whatever that is: released from the canonical layout, then tied to
    `like`'s, so that an unpinned step keeps every parameter's and state's layout."""
    if like is None or np.ndim(value) == 0 or _is_explicit(mesh):
        return value  # on an Explicit mesh the out_spec already is `like`'s own
    return shard_alike(like, _free(value, mesh))[1]


def _pad(parts: list[jax.Array], width: int, dtype: Any) -> jax.Array:
    used = sum(int(p.shape[0]) for p in parts)
    if used < width:
        parts = [*parts, jnp.zeros((width - used,), dtype)]
    return jnp.concatenate(parts) if parts else jnp.zeros((width,), dtype)
