"""Which leaves a matrix optimizer treats as matrices, and how: labels from rank and key path.

Muon (and the other matrix families' `adam_leaves`-style options) orthogonalise the matrix a
layer multiplies by and leave embeddings, output heads, biases and norm scales to AdamW. A
pytree of leaves only says "rank 2" or "rank 3"; the key path says what a leaf is.
`MatrixAxes` names, for one leaf, the axes contracted with the layer's input and the output
axes (every other axis is a batch axis: one matrix per index, e.g. stacked layers), and
`MuonLabels` decides it for every leaf from its rank and its path:

* a leaf whose path has a component matching one of `adam_names` (embeddings, the output head,
  ``bias``, ``scale``), or of rank < 2, goes to AdamW (``None``);
* a rank-3 ``kernel`` of an attention projection is the matrix the layer multiplies by:
  Flax's q/k/v kernels ``(in, heads, head_dim)`` are the ``(in, heads * head_dim)`` matrix
  and the output kernel ``(heads, head_dim, out)`` is ``(heads * head_dim, out)``;
* any other leaf of rank >= 2 is ``(in, out)`` (``layout="in_out"``, Flax/optax, with a conv
  kernel ``(..., in, out)`` flattened as ``(-1, out)``) or ``(out, in)`` (``"out_in"``,
  PyTorch), after `stacked_axes` leading batch axes.

`MuonLabels` is a frozen dataclass, not a function, so `optax.inject_hyperparams` passes it
through as it is (it takes every callable for a schedule).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Sequence
from typing import Any

import jax
import optax

#: Path components (lowercased, shell-style patterns) sent to AdamW by `MuonLabels`:
#: embeddings, output heads, biases and norm scales.
DEFAULT_ADAM_NAMES: tuple[str, ...] = (
    "*embed*",
    "wte",
    "wpe",
    "tok_emb",
    "pos_emb",
    "lm_head",
    "head",
    "output_head",
    "classifier",
    "bias",
    "scale",
)
#: Names of attention input projections whose rank-3 kernel is ``(in, heads, head_dim)``.
DEFAULT_QKV_NAMES: tuple[str, ...] = (
    "query",
    "key",
    "value",
    "q",
    "k",
    "v",
    "q_proj",
    "k_proj",
    "v_proj",
    "qkv",
)
#: Names of attention output projections whose rank-3 kernel is ``(heads, head_dim, out)``.
DEFAULT_OUT_NAMES: tuple[str, ...] = ("out", "o", "o_proj", "out_proj")


@dataclasses.dataclass(frozen=True)
class MatrixAxes:
    """The matrix view of one leaf: `reduction` axes (contracted with the layer's input, the
    rows) and `output` axes (the columns); axes in neither are batch axes (one matrix each).

    The matrix is the leaf transposed to ``(*batch, *reduction, *output)`` and reshaped to
    ``(batch..., prod(reduction), prod(output))``.
    """

    reduction: tuple[int, ...]
    output: tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "reduction", _axes_tuple(self.reduction))
        object.__setattr__(self, "output", _axes_tuple(self.output))

    def resolve(self, ndim: int, where: str = "matrix_axes") -> tuple[tuple[int, ...], ...]:
        """(batch, reduction, output) as non-negative axes of a rank-`ndim` leaf."""
        red = tuple(a % ndim if -ndim <= a < ndim else None for a in self.reduction)
        out = tuple(a % ndim if -ndim <= a < ndim else None for a in self.output)
        if None in red + out:
            raise ValueError(f"{where}: {self} has an axis out of range for a rank-{ndim} leaf")
        if not red or not out or len(set(red + out)) != len(red + out):
            raise ValueError(
                f"{where}: {self} needs at least one reduction and one output axis, all distinct"
            )
        batch = tuple(a for a in range(ndim) if a not in red + out)
        return batch, red, out


def _axes_tuple(axes: Any) -> tuple[int, ...]:
    if isinstance(axes, int):
        return (axes,)
    return tuple(int(a) for a in axes)


def matrix_view_shape(shape: tuple[int, ...], axes: MatrixAxes, where: str) -> tuple:
    """(perm, view shape) of a leaf of `shape` under `axes`: ``(*batch, rows, cols)``."""
    batch, red, out = axes.resolve(len(shape), where)
    perm = batch + red + out
    view = tuple(shape[a] for a in batch)
    view += (math.prod(shape[a] for a in red), math.prod(shape[a] for a in out))
    return perm, view


def path_names(path: Sequence[Any]) -> tuple[str, ...]:
    """The lowercased names of a key path; a trailing ``.value`` attribute (the field of a
    `flax.nnx.Variable` in an `nnx.State`) is not a name."""
    keys = list(path)
    if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
        keys = keys[:-1]
    names = []
    for k in keys:
        if isinstance(k, jax.tree_util.DictKey):
            names.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            names.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            names.append(str(k.idx))
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            names.append(str(k.key))
        else:
            names.append(str(k))
    return tuple(n.lower() for n in names)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p.lower()) for p in patterns)


@dataclasses.dataclass(frozen=True)
class MuonLabels:
    """Per-leaf labels for Muon from rank and key path (see the module docstring).

    Args:
      adam_names: shell-style patterns; a leaf with a path component matching one goes to
        AdamW (default `DEFAULT_ADAM_NAMES`: embeddings, heads, ``bias``, ``scale``). Extend
        with ``DEFAULT_ADAM_NAMES + ("my_head",)``.
      qkv_names: modules whose rank-3 ``kernel`` is ``(in, heads, head_dim)``.
      out_names: modules whose rank-3 ``kernel`` is ``(heads, head_dim, out)``.
      layout: ``"in_out"`` (Flax, optax: ``y = x @ W``) or ``"out_in"`` (PyTorch) for the
        other leaves of rank >= 2.
      stacked_axes: leading axes of every leaf that index stacked layers (``nnx.scan``,
        ``nnx.vmap``): each index is its own matrix; a leaf of rank < 2 + stacked_axes goes
        to AdamW.

    `axes(params)` gives the pytree of `MatrixAxes` (or None: AdamW) that `muon`'s
    `matrix_axes` takes, `adam_mask(params)` the booleans (True: AdamW) of an `adam_leaves`
    option. `muon(matrix_axes=MuonLabels())` and `muon(adam_leaves=MuonLabels())` accept the
    object itself.
    """

    adam_names: tuple[str, ...] = DEFAULT_ADAM_NAMES
    qkv_names: tuple[str, ...] = DEFAULT_QKV_NAMES
    out_names: tuple[str, ...] = DEFAULT_OUT_NAMES
    layout: str = "in_out"
    stacked_axes: int = 0

    def __post_init__(self):
        for field in ("adam_names", "qkv_names", "out_names"):
            value = getattr(self, field)
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"MuonLabels: {field} must be a tuple of strings, got {value!r}")
            object.__setattr__(self, field, tuple(value))
        if self.layout not in ("in_out", "out_in"):
            raise ValueError(
                f"MuonLabels: layout must be 'in_out' or 'out_in', got {self.layout!r}"
            )
        if not isinstance(self.stacked_axes, int) or self.stacked_axes < 0:
            raise ValueError(
                f"MuonLabels: stacked_axes must be an int >= 0, got {self.stacked_axes!r}"
            )

    def leaf_axes(self, path: Sequence[Any], shape: Sequence[int]) -> MatrixAxes | None:
        """The `MatrixAxes` of one leaf, or None for AdamW."""
        names = path_names(path)
        s = self.stacked_axes
        rank = len(shape) - s
        if rank < 2 or any(_matches(n, self.adam_names) for n in names):
            return None
        owner = names[-2] if len(names) >= 2 else ""
        if rank == 3 and names and names[-1] == "kernel":
            if _matches(owner, self.qkv_names):
                return MatrixAxes((s,), (s + 1, s + 2))
            if _matches(owner, self.out_names):
                return MatrixAxes((s, s + 1), (s + 2,))
        last = s + rank - 1
        if self.layout == "in_out":
            return MatrixAxes(tuple(range(s, last)), (last,))
        return MatrixAxes(tuple(range(s + 1, last + 1)), (s,))

    def axes(self, params: Any) -> Any:
        """A pytree like `params` of `MatrixAxes` (orthogonalised) or None (AdamW)."""
        return jax.tree_util.tree_map_with_path(
            lambda path, p: self.leaf_axes(path, _shape(p)), params
        )

    def adam_mask(self, params: Any) -> Any:
        """A pytree like `params` of booleans, True where the leaf goes to AdamW."""
        return jax.tree_util.tree_map_with_path(
            lambda path, p: self.leaf_axes(path, _shape(p)) is None, params
        )


def _shape(leaf: Any) -> tuple[int, ...]:
    return tuple(getattr(leaf, "shape", ()))


def _is_spec(x: Any) -> bool:
    return x is None or isinstance(x, MatrixAxes)


def _is_axes_like(x: Any) -> bool:  # a tuple or list of ints: an axes tuple, not a subtree
    return isinstance(x, tuple | list) and bool(x) and all(isinstance(a, int) for a in x)


def _describe(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= 80 else shown[:77] + "..."


def is_array(value: Any) -> bool:
    return isinstance(value, jax.Array) or (hasattr(value, "dtype") and hasattr(value, "shape"))


def _schedule_hint(name: str, value: Any) -> str:
    if is_array(value) or isinstance(value, bool):
        return (
            f" (if this came from optax.inject_hyperparams: it takes every callable for a "
            f"schedule and calls it with the step count; pass "
            f"static_args=({name!r},) or a rlx_optax.MuonLabels, which is not callable)"
        )
    return ""


def resolve_matrix_axes(spec: Any, tree: Any, name: str = "matrix_axes") -> dict:
    """{key path: MatrixAxes or None} for every leaf of `tree`, from a `MuonLabels`, a
    callable of the tree or a pytree of `MatrixAxes`/None; leaves the spec leaves out map to
    nothing. Masked leaves (`optax.MaskedNode`) of `tree` have no entry."""
    if isinstance(spec, MuonLabels):
        spec = spec.axes(tree)
    elif callable(spec):
        spec = spec(tree)
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    try:
        flat, _ = jax.tree_util.tree_flatten_with_path(
            spec, is_leaf=lambda x: _is_spec(x) or _is_axes_like(x)
        )
    except Exception as err:  # noqa: BLE001 - any flattening problem is the spec's
        raise ValueError(f"{name} must be a pytree of MatrixAxes or None: {err}") from err
    out = {}
    for path, value in flat:
        if not _is_spec(value):
            raise ValueError(
                f"{name} at {jax.tree_util.keystr(path) or '<root>'} must be a "
                f"rlx_optax.MatrixAxes or None, got {_describe(value)}"
                + _schedule_hint(name, value)
            )
        out[path] = value
    known = {path for path, _ in leaves}
    if not (set(out) & known) and leaves:
        raise ValueError(
            f"{name} does not match the parameters: it has the leaves "
            f"{sorted(jax.tree_util.keystr(p) for p in out)[:4]}, the parameters "
            f"{sorted(jax.tree_util.keystr(p) for p, _ in leaves)[:4]}" + _schedule_hint(name, spec)
        )
    return out


def resolve_adam_mask(adam_leaves: Any, params: Any) -> Any:
    """`adam_leaves` (a pytree of booleans like `params`, a callable returning one, or a
    `MuonLabels`) as a pytree of Python booleans like `params`; a clear ValueError naming
    `adam_leaves` otherwise."""
    if isinstance(adam_leaves, MuonLabels):
        return adam_leaves.adam_mask(params)
    chosen = adam_leaves(params) if callable(adam_leaves) else adam_leaves
    if chosen is None:
        return jax.tree.map(lambda _: False, params)
    treedef = jax.tree.structure(params)
    if isinstance(chosen, bool | str) or is_array(chosen):
        raise ValueError(
            "adam_leaves must be a pytree of booleans shaped like the parameters (one per "
            f"leaf), a callable of the parameters returning one, or a rlx_optax.MuonLabels; "
            f"got {_describe(chosen)}" + _schedule_hint("adam_leaves", chosen)
        )
    try:
        flat = treedef.flatten_up_to(chosen)
    except (ValueError, TypeError) as err:
        raise ValueError(
            "adam_leaves must be a pytree of booleans with the structure of the parameters "
            f"(one per leaf: {treedef}); got {_describe(chosen)} ({err})"
        ) from None
    paths = [p for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    for path, value in zip(paths, flat, strict=True):
        if not isinstance(value, bool) and not (
            getattr(value, "shape", None) == () and str(getattr(value, "dtype", "")) == "bool"
        ):
            raise ValueError(
                f"adam_leaves at {jax.tree_util.keystr(path) or '<root>'} must be a boolean, "
                f"got {_describe(value)}"
            )
    return jax.tree.unflatten(treedef, [bool(v) for v in flat])


def is_masked(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)
