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

The step itself is `_owner.run` with the buffers as its `store`: the same exchange, the same
per-leaf code, on Auto and Explicit meshes alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
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
    """State of SOAP, Kron or Stiefel made with ``state_placement="owner"`` on a mesh.

    `inner` is the family's own state (`SoapState`, `KronPsgdState`, `StiefelState`) with None
    at the places of the leaves computed on owner devices. `owned` holds those leaves' state:
    one ``(devices, width)`` buffer per dtype, split over all mesh axes so that row ``d`` lives
    on device ``d``, with the static directory of which leaf's arrays lie where (it depends on
    the mesh's device count). Place it with `rlx_optax.state_shardings`; see
    docs/scaling.md.
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
    if mesh is None:
        return None
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
