"""Owner-resident state: a leaf's matrix state kept on the device that computes it (private).

Owner compute (`_owner`) sends each leaf's arguments to one owner device and its results back.
For Muon that is the gradient there and the update back, about two parameter shards per step.
SOAP and Kron also carry a preconditioner per leaf (statistics, eigenbases and rotated moments;
Kronecker factors) several times the size of the parameter; in the parameter's layout that
state travels to the owner and back every step, 13 to 34 parameter shards on a GPT-shaped
tree. With ``state_placement="owner"`` the state of every owned leaf lives on its owner instead:

- one buffer per dtype of shape ``(devices, width)``, split over all mesh axes along its first
  axis, so that row ``d`` is device ``d``'s memory; device ``d``'s owned leaves' state arrays
  lie in its row, flattened, at offsets fixed when the state is made (`Directory`);
- a step sends only the other arguments (the gradient) to the owner and the other results (the
  update) back; the owner reads its leaves' state from its row and writes the new state there.

The owners, and therefore the layout of the state, depend on the mesh's device count: `init`
computes them from the parameters' mesh and `update` checks that it runs on a mesh of the same
size. Where `update` runs without owner compute (one device, ``owner_compute(False)``), the
state is read out of the buffers, the leaves are computed the ordinary way, and the new state
is written back into the same places: slower (the state moves), the same numbers.

Each device holds the state of the leaves it owns, padded to the largest row: about
``total / devices`` when the owners balance (they are chosen by estimated work, largest first).

On meshes with Explicit axes ``state_placement="owner"`` makes the ordinary state (kept per
parameter, owner compute still runs): the per-leaf functions close over values typed on the
mesh, which `_owner.run` hoists into its `shard_map` and this module does not yet.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rlx_optax._src import common
from rlx_optax._src.transforms import _owner

PLACEMENTS = ("parameter", "owner")


class Entry(NamedTuple):
    """Where one owned leaf's state lies: its owner's row, and per array its shape, dtype and
    offset (in elements) within that row's buffer of the dtype."""

    leaf: int  # index among the non-empty leaves, in flattening order
    owner: int
    struct: Any  # the tree structure of the leaf's resident arguments
    arrays: tuple[tuple[tuple[int, ...], str, int], ...]


class Directory(NamedTuple):
    """The static layout of owner-resident state (hashable: it is the buffers' pytree aux)."""

    mesh: tuple[tuple[str, int], ...]  # the mesh's axis names and sizes
    positions: tuple[int, ...]  # which arguments (and results) of the per-leaf function
    dtypes: tuple[str, ...]  # one buffer per dtype, in this order
    widths: tuple[int, ...]
    entries: tuple[Entry, ...]


@jax.tree_util.register_pytree_with_keys_class
class OwnedBuffers:
    """The state of the owned leaves: one ``(devices, width)`` buffer per dtype, row ``d`` on
    device ``d``, and the `Directory` of what lies where (static)."""

    def __init__(self, buffers: Sequence[Any], directory: Directory):
        self.buffers = tuple(buffers)
        self.directory = directory

    def tree_flatten_with_keys(self):
        keys = [jax.tree_util.DictKey(dt) for dt in self.directory.dtypes]
        return list(zip(keys, self.buffers, strict=True)), self.directory

    def tree_flatten(self):
        return self.buffers, self.directory

    @classmethod
    def tree_unflatten(cls, directory, buffers):
        return cls(buffers, directory)

    def __repr__(self) -> str:
        mesh = " x ".join(f"{n}={s}" for n, s in self.directory.mesh)
        return (
            f"OwnedBuffers({len(self.directory.entries)} leaves over {mesh}, "
            f"dtypes={list(self.directory.dtypes)}, widths={list(self.directory.widths)})"
        )


class OwnerPlacedState(NamedTuple):
    """State of a matrix family made with ``state_placement="owner"`` on a mesh.

    `inner` is the family's own state with None at the places of the owned leaves; `owned`
    holds those leaves' state on their owner devices (`OwnedBuffers`).
    """

    inner: Any
    owned: Any


def check_placement(name: str, value: Any) -> str:
    if value not in PLACEMENTS:
        raise ValueError(f"{name} must be one of {PLACEMENTS}, got {value!r}")
    return value


def _mesh_key(mesh: Any) -> tuple[tuple[str, int], ...]:
    return tuple((str(a), int(mesh.shape[a])) for a in mesh.axis_names)


def _axis(mesh: Any) -> Any:
    names = tuple(mesh.axis_names)
    return names if len(names) > 1 else names[0]


def _array_leaves(tree: Any) -> list[Any]:
    return [x for x in jax.tree.leaves(tree) if _owner._is_array(x)]


def plan(
    calls: list[tuple[Any, ...]],
    positions: tuple[int, ...],
    mesh: Any,
    cost: Callable[[list[Any]], float] | None = None,
) -> Directory | None:
    """The owners and the state layout for per-leaf argument tuples `calls` (arrays or
    `jax.ShapeDtypeStruct`; ``calls[n][k]`` for `k` in `positions` is the leaf's state).

    A leaf is owned when it has state and one of its arrays is split in the canonical layout
    (as in `_owner.run`); None when no leaf is.
    """
    devices = math.prod(mesh.shape[a] for a in mesh.axis_names)
    owned, costs = [], []
    for n, args in enumerate(calls):
        state = [args[k] for k in positions]
        if not _array_leaves(state):
            continue
        arrays = _array_leaves(args)
        if all(_owner._in_spec(x, mesh) == P() for x in arrays):
            continue
        owned.append(n)
        costs.append((cost or _owner.leaf_cost)(arrays))
    if not owned:
        return None
    owners = _owner.assign_owners(costs, devices)
    fill: dict[tuple[int, str], int] = {}
    entries = []
    for n, d in zip(owned, owners, strict=True):
        state = tuple(calls[n][k] for k in positions)
        leaves, struct = jax.tree.flatten(state)
        arrays = []
        for x in leaves:
            dt = jnp.dtype(x.dtype).name
            at = fill.get((d, dt), 0)
            arrays.append((tuple(x.shape), dt, at))
            fill[(d, dt)] = at + math.prod(x.shape)
        entries.append(Entry(n, d, struct, tuple(arrays)))
    dtypes = sorted({dt for _, dt in fill})
    widths = tuple(max(w for (_, t), w in fill.items() if t == dt) for dt in dtypes)
    return Directory(_mesh_key(mesh), tuple(positions), tuple(dtypes), widths, tuple(entries))


def _rows(directory: Directory, values: dict[int, Any], dtype: str) -> list[list[jax.Array]]:
    """Per device, the flattened arrays of `dtype` of its owned leaves' state, in offset order."""
    devices = math.prod(s for _, s in directory.mesh)
    parts: list[list[jax.Array]] = [[] for _ in range(devices)]
    for e in directory.entries:
        for x, (_, dt, _) in zip(jax.tree.leaves(values[e.leaf]), e.arrays, strict=True):
            if dt == dtype:
                parts[e.owner].append(jnp.ravel(x).astype(dt))
    return parts


def pack(directory: Directory, values: dict[int, Any], mesh: Any = None) -> OwnedBuffers:
    """The buffers holding ``values[leaf]`` (each owned leaf's state tuple) where `directory`
    puts them; placed on `mesh` (a concrete one) when given."""
    buffers = []
    for dt, width in zip(directory.dtypes, directory.widths, strict=True):
        rows = [_owner._pad(p, width, dt) for p in _rows(directory, values, dt)]
        buf = jnp.stack(rows)
        if mesh is not None:
            buf = jax.device_put(buf, NamedSharding(mesh, P(_axis(mesh), None)))
        buffers.append(buf)
    return OwnedBuffers(buffers, directory)


def unpack(owned: OwnedBuffers) -> dict[int, Any]:
    """Each owned leaf's state tuple, read out of the buffers (moves it: for the paths without
    owner compute)."""
    d = owned.directory
    out = {}
    for e in d.entries:
        leaves = []
        for shape, dt, at in e.arrays:
            buf = owned.buffers[d.dtypes.index(dt)]
            leaves.append(buf[e.owner, at : at + math.prod(shape)].reshape(shape))
        out[e.leaf] = jax.tree.unflatten(e.struct, leaves)
    return out


def abstract(entry: Entry) -> Any:
    """The leaf's state tuple as `jax.ShapeDtypeStruct`s."""
    return jax.tree.unflatten(
        entry.struct, [jax.ShapeDtypeStruct(s, jnp.dtype(dt)) for s, dt, _ in entry.arrays]
    )


def check_mesh(owned: OwnedBuffers, mesh: Any, algorithm: str) -> None:
    """Refuse a step on a mesh of another size than the one the state was made for."""
    made = owned.directory.mesh
    devices = math.prod(s for _, s in made)
    now = 1 if mesh is None else math.prod(mesh.shape[a] for a in mesh.axis_names)
    if mesh is not None and now != devices:
        raise ValueError(
            f"{algorithm}: the state was made with state_placement='owner' for a mesh of "
            f"{devices} devices ({dict(made)}), but update runs on {now} devices; make the "
            "state again with init on this mesh"
        )


def _eval_shape(fn: Callable[..., tuple], struct: Any, flat: list[Any]) -> Any:
    """The result shapes of `fn` on ``unflatten(struct, flat)``; arrays and
    `jax.ShapeDtypeStruct`s of `flat` are its abstract inputs, the rest static."""
    where = [
        j for j, x in enumerate(flat) if isinstance(x, jax.ShapeDtypeStruct) or _owner._is_array(x)
    ]

    def call(*arrays):
        full = list(flat)
        for j, a in zip(where, arrays, strict=True):
            full[j] = a
        return tuple(fn(*jax.tree.unflatten(struct, full)))

    return jax.eval_shape(
        call, *[jax.ShapeDtypeStruct(flat[j].shape, flat[j].dtype) for j in where]
    )


def _store(value: Any, like_dtype: str) -> jax.Array:
    return jnp.ravel(value).astype(like_dtype)


def run(
    fn: Callable[..., tuple],
    n_out: int,
    calls: list[tuple[Any, ...]],
    mesh: Any,
    local: Callable[[list[tuple[list[Any], Any]]], list[tuple]],
    owned: OwnedBuffers,
) -> tuple[list[tuple], OwnedBuffers]:
    """`fn` on every leaf's argument tuple in `calls`; the owned leaves on their owners, with
    their state (the arguments at the directory's positions) read from and written to their
    owner's row of `owned`. Returns `fn`'s results per leaf (None at the positions for the owned
    leaves) and the new buffers."""
    d = owned.directory
    positions = d.positions
    devices = math.prod(mesh.shape[a] for a in mesh.axis_names)
    axis = _axis(mesh)
    entry_of = {e.leaf: e for e in d.entries}

    results: list[tuple | None] = [None] * len(calls)
    rest = [n for n in range(len(calls)) if n not in entry_of]
    if rest:
        flat_calls = [jax.tree.flatten(calls[n]) for n in rest]
        for n, r in zip(rest, local(flat_calls), strict=True):
            results[n] = r

    # the owned leaves' moving arguments (every argument but the state), and their layouts
    def moving(n: int) -> tuple[list[Any], Any]:
        args = tuple(None if k in positions else a for k, a in enumerate(calls[n]))
        return jax.tree.flatten(args)

    info = {}
    for e in d.entries:
        flat, struct = moving(e.leaf)
        arrays = [j for j, x in enumerate(flat) if _owner._is_array(x)]
        specs = {j: _owner._in_spec(flat[j], mesh) for j in arrays}
        layouts = {j: _owner._Layout(tuple(flat[j].shape), specs[j], mesh) for j in arrays}
        sent = [j for j in arrays if not layouts[j].replicated]
        info[e.leaf] = (flat, struct, arrays, specs, layouts, sent)

    def full_args(e: Entry, flat: list[Any], state: Any) -> tuple[list[Any], Any]:
        args = list(jax.tree.unflatten(info[e.leaf][1], flat))
        for k, s in zip(positions, state, strict=True):
            args[k] = s
        return jax.tree.flatten(tuple(args))

    # the moving results: their shapes and layouts (like the argument at their position)
    out_info = {}
    for e in d.entries:
        flat, struct, *_ = info[e.leaf]
        full, full_struct = full_args(e, flat, abstract(e))
        shapes = _eval_shape(fn, full_struct, full)
        args = calls[e.leaf]
        per_out = []
        for k in range(n_out):
            if k in positions:
                per_out.append(None)
                continue
            leaves, treedef = jax.tree.flatten(shapes[k])
            like = args[k] if k < len(args) else None
            like_leaves = jax.tree.leaves(like) if like is not None else []
            same = (
                like is not None
                and jax.tree.structure(like) == treedef
                and all(
                    _owner._is_array(a) and tuple(a.shape) == tuple(o.shape)
                    for a, o in zip(like_leaves, leaves, strict=True)
                )
            )
            specs = [
                P()
                if np.ndim(o) == 0 or _owner._is_key(o)
                else _owner._in_spec(like_leaves[m], mesh)
                if same
                else _owner.canonical_spec(o.shape, mesh)
                for m, o in enumerate(leaves)
            ]
            layouts = [
                _owner._Layout(tuple(o.shape), s, mesh) for o, s in zip(leaves, specs, strict=True)
            ]
            per_out.append((treedef, leaves, specs, layouts, like_leaves if same else None))
        out_info[e.leaf] = per_out

    def packing(items):  # (owner, key, dtype, size) -> offsets within the owner's chunk, widths
        offsets, fill = {}, {}
        for owner, key, dt, size in items:
            at = fill.get((owner, dt), 0)
            offsets[key] = at
            fill[(owner, dt)] = at + size
        widths: dict[str, int] = {}
        for (_, dt), w in fill.items():
            widths[dt] = max(widths.get(dt, 0), w)
        return offsets, widths

    in_offsets, in_width = packing(
        [
            (e.owner, (e.leaf, j), jnp.dtype(info[e.leaf][0][j].dtype).name, lay.block_size)
            for e in d.entries
            for j, lay in info[e.leaf][4].items()
            if j in info[e.leaf][5]
        ]
    )
    out_offsets, out_width = packing(
        [
            (e.owner, (e.leaf, k, m), jnp.dtype(o.dtype).name, out[3][m].block_size)
            for e in d.entries
            for k, out in enumerate(out_info[e.leaf])
            if out is not None
            for m, o in enumerate(out[1])
        ]
    )
    in_dtypes, out_dtypes = sorted(in_width), sorted(out_width)

    operands, operand_specs, where = [], [], {}
    for e in d.entries:
        flat, _, arrays, specs, _, _ = info[e.leaf]
        for j in arrays:
            where[(e.leaf, j)] = len(operands)
            operands.append(flat[j])
            operand_specs.append(specs[j])
    n_moving = len(operands)
    row_spec = P(axis, None)
    result_specs = [s for e in d.entries for out in out_info[e.leaf] if out for s in out[2]]

    def body(*blocks):
        rows = [b[0] for b in blocks[n_moving:]]
        send = {dt: [[] for _ in range(devices)] for dt in in_dtypes}
        for e in d.entries:
            for j in info[e.leaf][5]:
                b = blocks[where[(e.leaf, j)]]
                send[jnp.dtype(b.dtype).name][e.owner].append(b.reshape(-1))
        received = [
            lax.all_to_all(
                jnp.stack([_owner._pad(p, in_width[dt], dt) for p in send[dt]]),
                axis,
                0,
                0,
                tiled=True,
            )
            for dt in in_dtypes
        ]

        def branch(dev):
            def compute(received, blocks, rows):
                mine = [e for e in d.entries if e.owner == dev]
                local_calls = []
                for e in mine:
                    flat, _, arrays, _, layouts, _ = info[e.leaf]
                    flat = list(flat)
                    for j in arrays:
                        if layouts[j].replicated:
                            flat[j] = blocks[where[(e.leaf, j)]]
                            continue
                        buf = received[in_dtypes.index(jnp.dtype(flat[j].dtype).name)]
                        at = in_offsets[(e.leaf, j)]
                        flat[j] = layouts[j].assemble(buf[:, at : at + layouts[j].block_size])
                    state = []
                    for shape, dt, at in e.arrays:
                        row = rows[d.dtypes.index(dt)]
                        state.append(row[at : at + math.prod(shape)].reshape(shape))
                    local_calls.append(full_args(e, flat, jax.tree.unflatten(e.struct, state)))
                outs = local(local_calls) if local_calls else []
                sendback = {dt: [[] for _ in range(devices)] for dt in out_dtypes}
                new_parts: dict[str, list[jax.Array]] = {dt: [] for dt in d.dtypes}
                for e, result in zip(mine, outs, strict=True):
                    state = tuple(result[k] for k in positions)
                    leaves, struct = jax.tree.flatten(state)
                    if struct != e.struct:
                        raise AssertionError(f"state structure changed: {struct} != {e.struct}")
                    for x, (_, dt, _) in zip(leaves, e.arrays, strict=True):
                        new_parts[dt].append(_store(x, dt))
                    for k, out in enumerate(out_info[e.leaf]):
                        if out is None:
                            continue
                        for m, o in enumerate(jax.tree.leaves(result[k])):
                            split = out[3][m].split(o)
                            for dst in range(devices):
                                sendback[jnp.dtype(o.dtype).name][dst].append(split[dst])
                new_rows = [
                    _owner._pad(new_parts[dt], w, dt) if new_parts[dt] else rows[t]
                    for t, (dt, w) in enumerate(zip(d.dtypes, d.widths, strict=True))
                ]
                back = [
                    jnp.stack([_owner._pad(p, out_width[dt], dt) for p in sendback[dt]])
                    for dt in out_dtypes
                ]
                return back, new_rows

            return compute

        me = lax.axis_index(axis)
        back, new_rows = lax.switch(
            me, [branch(dev) for dev in range(devices)], received, list(blocks), rows
        )
        back = [lax.all_to_all(b, axis, 0, 0, tiled=True) for b in back]
        outs = []
        for e in d.entries:
            for k, out in enumerate(out_info[e.leaf]):
                if out is None:
                    continue
                for m, o in enumerate(out[1]):
                    buf = back[out_dtypes.index(jnp.dtype(o.dtype).name)]
                    at = out_offsets[(e.leaf, k, m)]
                    size = out[3][m].block_size
                    outs.append(buf[e.owner, at : at + size].reshape(out[3][m].block))
        return (*outs, *(r[None] for r in new_rows))

    flat_results = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(*operand_specs, *([row_spec] * len(owned.buffers))),
        out_specs=(*result_specs, *([row_spec] * len(owned.buffers))),
        check_vma=False,
    )(*[_owner._free(x, mesh) for x in operands], *owned.buffers)
    it = iter(flat_results[: len(result_specs)])
    for e in d.entries:
        result = []
        for out in out_info[e.leaf]:
            if out is None:
                result.append(None)
                continue
            treedef, leaves, _, _, likes = out
            values = [next(it) for _ in leaves]
            if likes is not None:
                values = [
                    _owner._layout_like(v, lk, mesh) for v, lk in zip(values, likes, strict=True)
                ]
            result.append(jax.tree.unflatten(treedef, values))
        results[e.leaf] = tuple(result)
    new = OwnedBuffers(flat_results[len(result_specs) :], d)
    return results, new  # type: ignore[return-value]


def _concrete_mesh(arrays: Sequence[Any]) -> Any:
    """The concrete mesh of the first committed array on one (None while tracing)."""
    for x in arrays:
        if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
            sharding = getattr(x, "sharding", None)
            if isinstance(sharding, NamedSharding):
                return sharding.mesh
    return None


def place(
    leaves: list[Any],
    calls: list[tuple[Any, ...]],
    positions: tuple[int, ...],
    cost: Callable[[list[Any]], float] | None = None,
) -> OwnedBuffers | None:
    """At `init`: the owned leaves' state (``calls[n][k]``, `k` in `positions`) packed onto
    their owners, for parameters `leaves` (the non-empty ones) on a mesh of several devices;
    None off such a mesh or when no leaf is owned."""
    mesh = _owner.mesh_of(leaves)
    if mesh is None or _owner._is_explicit(mesh):
        return None  # Explicit meshes: the state stays per parameter (see the module docstring)
    directory = plan(calls, positions, mesh, cost)
    if directory is None:
        return None
    values = {e.leaf: tuple(calls[e.leaf][k] for k in positions) for e in directory.entries}
    return pack(directory, values, _concrete_mesh(leaves))


def owned_leaves(owned: OwnedBuffers | None) -> set[int]:
    return set() if owned is None else {e.leaf for e in owned.directory.entries}


def spread(leaves: list[Any], treedef: Any, values: list[Any], skip: set[int]) -> Any:
    """The tree of `treedef` with ``values[n]`` at its n-th non-empty leaf (None where ``n`` is
    in `skip`); `leaves` (the flattened parameters) give the empty places, kept as they are."""
    it = iter(None if n in skip else v for n, v in enumerate(values))
    return treedef.unflatten([x if common.is_empty(x) else next(it) for x in leaves])


def unless_owned(check: Callable[..., str | None]) -> Callable[..., str | None]:
    """A `common.check_state` leaf check that passes the owned leaves (None in the state)."""

    def checked(shape: tuple[int, ...], first: Any, *rest: Any) -> str | None:
        return None if first is None else check(shape, first, *rest)

    return checked


def buffer_shardings(owned: OwnedBuffers, mesh: Any) -> OwnedBuffers:
    """The `NamedSharding` of each buffer on `mesh` (row ``d`` on device ``d``), in an
    `OwnedBuffers` of the same directory (what `rlx_optax.state_shardings` returns there)."""
    made = owned.directory.mesh
    if math.prod(s for _, s in made) != mesh.size:
        raise ValueError(
            f"state_shardings: the state was made for a mesh of {dict(made)}, the parameters "
            f"are on {dict(mesh.shape)}"
        )
    spec = P(_axis(mesh), None)
    return OwnedBuffers([NamedSharding(mesh, spec)] * len(owned.buffers), owned.directory)
