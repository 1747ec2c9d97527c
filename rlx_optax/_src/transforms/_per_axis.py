"""Per-axis matrix state held as one pytree per axis (private helper of SOAP and Kron).

SOAP's statistics and eigenbases and Kron's factors are one matrix per axis of a leaf. Held as
a tuple per leaf, the state has a container where the parameter has an array, and frameworks
that wrap every parameter-shaped leaf of the state (`flax.nnx.Optimizer` wraps each one in a
`Variable`; orbax compares the saved tree with the restore target) see a different structure
at save and at restore. So the state holds a tuple of trees instead, the k-th tree holding
each leaf's axis-k matrix (None where the leaf has no such axis or passes it through), the way
optax's factored Adafactor keeps `v_row` and `v_col`: every tree has the parameters' structure
with an array or None in each place. The transforms work per leaf, so `update` regroups the
trees into per-leaf tuples (`by_leaf`) and back (`by_axis`).
"""

from __future__ import annotations

from typing import Any

import jax

from rlx_optax._src import common


def by_axis(per_leaf: Any, like: Any) -> tuple[Any, ...]:
    """Per-leaf tuples (or None) placed at the leaves of `like` -> one tree per axis.

    The number of trees is the largest tuple; shorter tuples give None; an empty place of
    `like` (None, `optax.MaskedNode`) stays as it is in every tree.
    """
    _, treedef = jax.tree.flatten(like, is_leaf=common.is_empty)
    entries = treedef.flatten_up_to(per_leaf)
    width = max((len(e) for e in entries if not common.is_empty(e)), default=0)
    return tuple(
        treedef.unflatten(
            [e if common.is_empty(e) else e[k] if k < len(e) else None for e in entries]
        )
        for k in range(width)
    )


def by_leaf(per_axis: tuple[Any, ...], like: Any, ndim: Any = None) -> Any:
    """The inverse of `by_axis`: one tuple per leaf of `like`; its empty places kept.

    A leaf's tuple has one entry per axis: ``ndim(leaf)`` entries (the leaf's rank by default;
    SOAP passes its working rank).
    """
    leaves, treedef = jax.tree.flatten(like, is_leaf=common.is_empty)
    columns = [treedef.flatten_up_to(tree) for tree in per_axis]
    rank = ndim or (lambda x: x.ndim)
    out = []
    for i, x in enumerate(leaves):
        if common.is_empty(x):
            out.append(x)
            continue
        n = rank(x)
        out.append(tuple(columns[k][i] if k < len(columns) else None for k in range(n)))
    return treedef.unflatten(out)
