"""Muon: momentum orthogonalised by Newton-Schulz on matrices, SGD-momentum (or AdamW) elsewhere."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rlx_optax._src import common, linalg
from rlx_optax._src.linalg import DEFAULT_NS_COEFFS, newton_schulz
from rlx_optax._src.transforms import _batching, _lowbit
from rlx_optax._src.transforms import adam as _adam
from rlx_optax._src.transforms import labels as _labels

_SCALES = ("crate", "keller", "moonlight")
_LAYOUTS = ("in_out", "out_in")
_MOMENTUM_FORMS = ("sum", "ema")
_FALLBACKS = ("sgd", "adamw")
#: The switches each `behaviour` sets (explicit arguments take precedence).
PRESETS = {
    "crate": {
        "shape_scale": "crate",
        "momentum_form": "sum",
        "flatten_conv": False,
        "fallback": "sgd",
        "eps": 1e-12,
        "ns_dtype": None,
    },
    "reference": {
        "shape_scale": "keller",
        "momentum_form": "ema",
        "flatten_conv": True,
        "fallback": "adamw",
        "eps": 1e-7,
        "ns_dtype": jnp.bfloat16,
    },
}


class MuonState(NamedTuple):
    """State of `scale_by_muon`."""

    count: jax.Array  # int32, number of `update` calls so far
    mu: optax.Updates  # momentum buffer, shaped like the parameters


def _matrix_shape(shape: tuple[int, ...], layout: str, flatten_conv: bool) -> tuple | None:
    """The (rows, cols) view Muon orthogonalises, or None for the fallback path."""
    if len(shape) == 2:
        return shape
    if flatten_conv and len(shape) >= 3:
        if layout == "in_out":  # Flax conv kernel (..., in, out): fan-in is everything but out
            return (math.prod(shape[:-1]), shape[-1])
        return (shape[0], math.prod(shape[1:]))  # PyTorch (out, in, ...)
    return None


def _shape_scale(shape_scale: str | Callable, rows: int, cols: int, layout: str) -> float:
    if callable(shape_scale):
        return float(shape_scale(rows, cols))
    if shape_scale == "crate":
        return math.sqrt(max(rows, cols))
    if shape_scale == "moonlight":
        return 0.2 * math.sqrt(max(rows, cols))
    fan_in, fan_out = (rows, cols) if layout == "in_out" else (cols, rows)
    return math.sqrt(max(1.0, fan_out / fan_in)) if fan_in else 1.0  # an empty leaf


def scale_by_muon(
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    ns_coeffs: Sequence[float] | Sequence[Sequence[float]] = DEFAULT_NS_COEFFS,
    *,
    shape_scale: str | Callable[[int, int], float] | None = None,
    layout: str = "in_out",
    momentum_form: str | None = None,
    flatten_conv: bool | None = None,
    eps: float | None = None,
    mu_dtype: Any = None,
    ns_dtype: Any = None,
    precision: Any = None,
    behaviour: str = "crate",
    matrix_axes: Any = None,
    stochastic_rounding: bool = False,
) -> optax.GradientTransformation:
    r"""Muon's update direction.

    For every leaf, with :math:`\mu` the momentum,

    .. math::
        m_t = \mu m_{t-1} + g_t,\qquad
        d_t = g_t + \mu m_t \ \text{(Nesterov)}\quad\text{or}\quad d_t = m_t ;

    a matrix leaf of shape (R, C) returns :math:`s\,\mathrm{NS}(d_t)` (`newton_schulz`, the
    approximate polar factor) with :math:`s = \sqrt{\max(R, C)}`; every other leaf returns
    :math:`d_t` (SGD momentum). These are the crate's rules; the arguments below switch to
    the reference conventions.

    Args:
      momentum: :math:`\mu` in [0, 1).
      nesterov: use :math:`g_t + \mu m_t` (or its EMA form) instead of :math:`m_t`.
      ns_steps: Newton-Schulz iterations.
      ns_coeffs: (a, b, c) or one (a, b, c) row per iteration (see `newton_schulz`).
      shape_scale: ``"crate"`` :math:`\sqrt{\max(R,C)}` (update RMS about 1);
        ``"keller"`` :math:`\sqrt{\max(1, \text{fan\_out}/\text{fan\_in})}` (Keller Jordan's
        reference and optax.contrib.muon, read with `layout`); ``"moonlight"``
        :math:`0.2\sqrt{\max(R,C)}` (matches AdamW's update RMS); or a callable
        ``(rows, cols) -> float``.
      layout: which axis is the output for ``"keller"`` and for flattened conv kernels:
        ``"in_out"`` (Flax/optax kernels, ``y = x @ W``) or ``"out_in"`` (PyTorch weights).
      momentum_form: ``"sum"`` (crate and Keller's first versions: :math:`m = \mu m + g`,
        Nesterov :math:`g + \mu m`) or ``"ema"`` (Keller's current reference,
        torch.optim.Muon and pytorch-optimizer: :math:`m = \mu m + (1-\mu) g`, Nesterov
        :math:`(1-\mu) g + \mu m`). Newton-Schulz removes the factor
        :math:`1-\mu` on matrices; it changes the step of fallback leaves.
      flatten_conv: orthogonalise leaves of rank >= 3 as matrices (``(-1, out)`` for
        ``"in_out"``, ``(out, -1)`` for ``"out_in"``) instead of the fallback (the crate
        sends them to the fallback; the reference flattens conv kernels). The shape scale uses
        the flattened shape. Attention kernels are not conv kernels (Flax's q/k/v
        ``(in, heads, head_dim)`` would be read as ``(in*heads, head_dim)``): give them
        `matrix_axes` (``rlx_optax.MuonLabels()``).
      eps: floor of the Frobenius norm in Newton-Schulz (crate 1e-12, reference 1e-7).
      mu_dtype: storage of the momentum: None (the parameter dtype), a floating dtype such
        as ``jnp.bfloat16``, ``"q8"`` or ``"q4"`` (8- or 4-bit block-wise,
        `rlx_optax.QuantizedArray`; 4-bit fails the convergence bound on the char LM);
        the momentum is updated in float32 whatever its storage.
      ns_dtype: dtype of the Newton-Schulz iteration (default float32, or the parameter
        dtype if wider; ``jnp.bfloat16`` follows the reference's cast, rounding each fused
        step once as torch.optim.Muon does).
      precision: precision of the Newton-Schulz products (a `jax.lax.Precision`, its name or a
        `jax.lax.DotAlgorithmPreset`). Default: ``HIGHEST`` for a float32 iteration (the
        crate's float32 arithmetic on every backend; the backend default would be TF32 on
        NVIDIA GPUs and one bfloat16 pass on TPUs), the native pass for ``ns_dtype=bfloat16``
        (the reference's choice). See `docs/numerics.md`.
      behaviour: ``"crate"`` or ``"reference"`` (Keller Jordan's Muon: ``shape_scale="keller"``,
        ``momentum_form="ema"``, ``flatten_conv=True``, ``eps=1e-7``, bf16 Newton-Schulz);
        arguments given explicitly take precedence.
      matrix_axes: per-leaf matrix views, replacing the rank rule, `layout` and
        `flatten_conv`: a pytree like the parameters of `rlx_optax.MatrixAxes` (reduction
        and output axes; other axes are batch axes, one matrix each) or None (the fallback
        path), a callable of the gradient tree returning one, or a `rlx_optax.MuonLabels`.
        The shape scale reads the view as (fan_in, fan_out) = (reduction, output). Default
        None: the rank rule.
      stochastic_rounding: round the float32 momentum into a bfloat16 `mu_dtype`
        stochastically (unbiased; the bits derive from the step and the leaf).

    Returns:
      An `optax.GradientTransformation`.
    """
    opts = common.resolve_preset(
        behaviour,
        PRESETS,
        shape_scale=shape_scale,
        momentum_form=momentum_form,
        flatten_conv=flatten_conv,
        eps=eps,
        ns_dtype=ns_dtype,
    )
    shape_scale, momentum_form = opts["shape_scale"], opts["momentum_form"]
    flatten_conv, eps, ns_dtype = opts["flatten_conv"], opts["eps"], opts["ns_dtype"]
    common.check_beta("momentum", momentum)
    common.check_non_negative("eps", eps)
    common.check_range("ns_steps", ns_steps, 0)
    if not callable(shape_scale):
        common.check_choice("shape_scale", shape_scale, _SCALES)
    common.check_choice("layout", layout, _LAYOUTS)
    common.check_choice("momentum_form", momentum_form, _MOMENTUM_FORMS)
    linalg.check_precision("precision", precision)
    _lowbit.check_storage("mu_dtype", mu_dtype)
    if isinstance(ns_steps, bool):
        raise ValueError(f"ns_steps must be an int >= 0, got {ns_steps!r}")

    mu_value = momentum

    def init_fn(params):
        common.reject_complex(params, "muon")
        return MuonState(
            count=jnp.zeros([], jnp.int32), mu=_lowbit.init_tree(params, mu_dtype, signed=True)
        )

    def momentum_leaf(g, stored, count, leaf):
        ct = common.compute_dtype(g.dtype)
        mu = jnp.asarray(mu_value, ct)
        g32, m = g.astype(ct), _lowbit.read(stored, ct)
        if momentum_form == "sum":
            m = mu * m + g32
            d = g32 + mu * m if nesterov else m
        else:
            m = mu * m + (1 - mu) * g32
            d = (1 - mu) * g32 + mu * m if nesterov else m
        bound = None
        if isinstance(stored, _lowbit.QuantizedArray):  # new = mu * old + weight * g
            weight = 1.0 if momentum_form == "sum" else 1 - mu
            bound = _lowbit.ema_bound(stored, mu, weight, g32)
        sr = dict(stochastic=stochastic_rounding, step=count, leaf=leaf, salt=_lowbit.SALT_MU)
        return d, _lowbit.write(m, stored, bound=bound, **sr)

    def orthogonalise(d):
        def ns(x):
            return newton_schulz(
                x, ns_steps, ns_coeffs, eps=eps, ns_dtype=ns_dtype, precision=precision
            )

        return (jax.vmap(ns)(d) if d.ndim == 3 else ns(d),)  # (batch, rows, cols) views

    def update_fn(updates, state, params=None):
        del params
        state = common.check_state("muon", state, MuonState, updates, ("mu",))
        count = optax.safe_increment(state.count)
        index = _lowbit.leaf_indices(updates)
        d, mu = common.tree_map_multi(
            lambda g, m, i: momentum_leaf(g, m, count, i), 2, updates, state.mu, index
        )

        spec = None
        if matrix_axes is not None:
            spec = _labels.resolve_matrix_axes(matrix_axes, updates)

        def explicit_view(path, shape):  # (perm, view) of a leaf under `matrix_axes`
            axes = spec.get(path)
            if axes is None:
                return None
            where = f"matrix_axes at {jax.tree_util.keystr(path)}"
            perm, view = _labels.matrix_view_shape(shape, axes, where)
            return perm, (math.prod(view[:-2]), *view[-2:]) if len(view) > 2 else view

        def view_of(path, x):
            if common.is_empty(x):
                return None
            if spec is not None:
                pv = explicit_view(path, x.shape)
                return None if pv is None else jnp.transpose(x, pv[0]).reshape(pv[1])
            view = _matrix_shape(x.shape, layout, flatten_conv)
            return None if view is None else x.reshape(view)

        views = jax.tree_util.tree_map_with_path(view_of, d, is_leaf=common.is_empty)
        # Newton-Schulz runs once per group of same-shaped matrices (one batched product
        # chain per shape, `grouped_map`), not once per leaf.
        (o,) = _batching.grouped_map(orthogonalise, 1, views, stacked=True)

        def finish(path, g, d, o):
            if common.is_empty(g):
                return g
            if o is None:
                return d.astype(g.dtype)
            rows, cols = o.shape[-2:]
            if spec is None:
                scale = _shape_scale(shape_scale, rows, cols, layout)
                return (scale * o.astype(d.dtype)).reshape(g.shape).astype(g.dtype)
            scale = _shape_scale(shape_scale, rows, cols, "in_out")
            perm = explicit_view(path, g.shape)[0]
            o = (scale * o.astype(d.dtype)).reshape(tuple(g.shape[a] for a in perm))
            inverse = [0] * len(perm)
            for i, a in enumerate(perm):
                inverse[a] = i
            return jnp.transpose(o, inverse).astype(g.dtype)

        u = jax.tree_util.tree_map_with_path(finish, updates, d, o, is_leaf=common.is_empty)
        return u, MuonState(count=count, mu=mu)

    return optax.GradientTransformation(init_fn, update_fn)


def muon(
    learning_rate: common.ScalarOrSchedule,
    momentum: float = 0.95,
    nesterov: bool = True,
    weight_decay: float = 0.0,
    *,
    ns_steps: int = 5,
    ns_coeffs: Sequence[float] | Sequence[Sequence[float]] = DEFAULT_NS_COEFFS,
    shape_scale: str | Callable[[int, int], float] | None = None,
    layout: str = "in_out",
    momentum_form: str | None = None,
    flatten_conv: bool | None = None,
    fallback: str | None = None,
    adam_leaves: Any = None,
    adam_learning_rate: common.ScalarOrSchedule | None = None,
    adam_b1: float = 0.9,
    adam_b2: float = 0.95,
    adam_eps: float = 1e-10,
    adam_weight_decay: float = 0.0,
    eps: float | None = None,
    mu_dtype: Any = None,
    ns_dtype: Any = None,
    precision: Any = None,
    behaviour: str = "crate",
    mask: common.MaskOrFn = None,
    matrix_axes: Any = None,
    nu_dtype: Any = None,
    stochastic_rounding: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Muon, as the crate's `Muon`, with switches to Keller Jordan's reference.

    .. math::
        \theta \leftarrow \theta - \eta\,\big(s\,\mathrm{NS}(d_t) + \lambda\theta\big)
        \ \text{(matrices)},\qquad
        \theta \leftarrow \theta - \eta\,(d_t + \lambda\theta)\ \text{(other leaves)}

    with :math:`d_t` the (Nesterov) SGD momentum of `scale_by_muon`, :math:`s =
    \sqrt{\max(R,C)}` and decoupled decay multiplied by the learning rate on both paths.
    Defaults are the crate's: momentum 0.95, Nesterov, 5 quintic Newton-Schulz steps, no decay.
    Rows are the first axis of a leaf; a leaf is a matrix when its rank is 2.

    Crate -> reference: ``shape_scale="keller"`` with ``layout`` (Flax kernels are
    ``(in, out)``, the default; PyTorch weights ``"out_in"``), ``momentum_form="ema"``,
    ``flatten_conv=True``, and ``fallback="adamw"`` (non-matrix leaves to AdamW with
    Keller's auxiliary Adam defaults b1 0.9, b2 0.95, eps 1e-10). `adam_leaves` sends chosen
    leaves (embeddings, output heads) to AdamW whatever their rank, through `optax.partition`.
    ``shape_scale="moonlight"`` is Moonlight's :math:`0.2\sqrt{\max(R,C)}`.
    ``behaviour="reference"`` sets Keller's conventions at once (those four, ``eps=1e-7`` and
    bf16 Newton-Schulz); arguments given explicitly take precedence.

    Args:
      learning_rate: a float or an optax schedule.
      momentum: :math:`\mu` in [0, 1).
      nesterov: Nesterov momentum.
      weight_decay: decoupled decay coefficient (multiplied by the learning rate).
      ns_steps: Newton-Schulz iterations (crate name `ns_steps`). Under
        `optax.inject_hyperparams` it becomes a traced count (at most 32, see
        `newton_schulz`); `jax.grad` through the update (meta-gradients) works with it, and
        ``static_args=("ns_steps",)`` keeps it a Python int (no guarded loop).
      ns_coeffs: Newton-Schulz coefficients (crate name `ns_coeffs`), or a per-iteration
        schedule of rows.
      shape_scale: ``"crate"``, ``"keller"``, ``"moonlight"`` or ``(rows, cols) -> float``.
      layout: ``"in_out"`` or ``"out_in"`` (see `scale_by_muon`).
      momentum_form: ``"sum"`` (crate) or ``"ema"`` (reference).
      flatten_conv: orthogonalise rank >= 3 leaves as matrices.
      fallback: ``"sgd"`` (crate: SGD momentum for non-matrix leaves) or ``"adamw"``.
      adam_leaves: pytree of booleans like the parameters (True: AdamW), a callable of the
        parameters returning one, or a `rlx_optax.MuonLabels` (its `adam_mask`): leaves
        sent to AdamW whatever `fallback` is. Under `optax.inject_hyperparams` a callable
        is taken for a schedule: pass ``static_args=("adam_leaves",)``, or a `MuonLabels`
        (not callable), which needs nothing.
      adam_learning_rate: AdamW's rate (default: `learning_rate`).
      adam_b1: AdamW's first-moment decay.
      adam_b2: AdamW's second-moment decay.
      adam_eps: AdamW's epsilon.
      adam_weight_decay: AdamW's decoupled decay.
      eps: floor of the Frobenius norm in Newton-Schulz.
      mu_dtype: storage of the momentum (and of AdamW's first moment on AdamW leaves): None
        (the parameter dtype), a floating dtype, ``"q8"`` or ``"q4"`` (see `scale_by_muon`).
      ns_dtype: dtype of the Newton-Schulz iteration (default float32).
      precision: precision of the Newton-Schulz products (a `jax.lax.Precision`, its name or a
        `jax.lax.DotAlgorithmPreset`). Default: ``HIGHEST`` for a float32 iteration (the
        crate's float32 arithmetic on every backend; the backend default would be TF32 on
        NVIDIA GPUs and one bfloat16 pass on TPUs), the native pass for ``ns_dtype=bfloat16``
        (the reference's choice). See `docs/numerics.md`.
      behaviour: ``"crate"`` or ``"reference"`` (see `scale_by_muon`; the reference preset
        also sets ``fallback="adamw"``).
      mask: pytree (or callable) of booleans selecting the leaves decayed (Muon branch).
      matrix_axes: per-leaf matrix views (see `scale_by_muon`): a pytree of
        `rlx_optax.MatrixAxes` or None, a callable returning one, or a
        `rlx_optax.MuonLabels`; a leaf given None goes to AdamW. ``MuonLabels()`` sends
        embeddings, heads, biases, norm scales and rank < 2 leaves to AdamW and
        orthogonalises Flax attention kernels as the matrices the layer multiplies by
        (q/k/v ``(in, heads, head_dim)`` as ``(in, heads*head_dim)``, out ``(heads,
        head_dim, out)`` as ``(heads*head_dim, out)``). Default None: the rank rule.
      nu_dtype: storage of AdamW's second moment on AdamW leaves (as `rlx_optax.adamw`).
      stochastic_rounding: round float32 results into bfloat16 storage stochastically
        (both branches).

    Returns:
      An `optax.GradientTransformationExtraArgs`.

    Example:
      >>> import jax, jax.numpy as jnp, rlx_optax
      >>> tx = rlx_optax.muon(3e-3)  # the crate scale's measured starting rate
      >>> params = {"w": jnp.zeros((4, 2)), "b": jnp.zeros(2)}
      >>> state = tx.init(params)
      >>> grads = {"w": jnp.ones((4, 2)), "b": jnp.ones(2)}
      >>> updates, state = tx.update(grads, state)
      >>> round(float(updates["b"][0]), 5)  # SGD momentum: -lr * (1 + 0.95)
      -0.00585
      >>> # -lr * sqrt(max(4, 2)) * NS(g): the quintic maps g's one singular value to 0.70
      >>> round(float(jnp.linalg.norm(updates["w"], ord=2)) / (3e-3 * 2.0), 2)
      0.7

      Attention kernels, embeddings and norms (a Flax NNX model: ``nnx.Optimizer(model, tx,
      wrt=nnx.Param)`` hands `init` the `nnx.State` of the parameters, labelled the same):

      >>> labels = rlx_optax.MuonLabels()  # embeddings, heads, biases, norms -> AdamW
      >>> tx = rlx_optax.muon(0.02, behaviour="reference", matrix_axes=labels)
      >>> params = {
      ...     "embed": {"embedding": jnp.ones((50, 8))},
      ...     "attn": {"query": {"kernel": jnp.ones((8, 2, 4)), "bias": jnp.ones((2, 4))},
      ...              "out": {"kernel": jnp.ones((2, 4, 8))}},
      ...     "norm": {"scale": jnp.ones(8)},
      ... }
      >>> axes = labels.axes(params)
      >>> axes["attn"]["query"]["kernel"]  # (in, heads, head_dim): the (8, 8) matrix
      MatrixAxes(reduction=(0,), output=(1, 2))
      >>> axes["attn"]["out"]["kernel"]
      MatrixAxes(reduction=(0, 1), output=(2,))
      >>> [axes["embed"]["embedding"], axes["attn"]["query"]["bias"], axes["norm"]["scale"]]
      [None, None, None]
      >>> state = tx.init(params)
      >>> updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
      >>> round(float(updates["embed"]["embedding"][0, 0]), 4)  # AdamW's first step: -lr
      -0.02

    References:
      Jordan et al., *Muon: An optimizer for hidden layers in neural networks* (2024),
      https://kellerjordan.github.io/posts/muon/ ;
      Liu et al., *Muon is Scalable for LLM Training* (Moonlight),
      https://arxiv.org/abs/2502.16982
    """
    opts = common.resolve_preset(
        behaviour,
        PRESETS,
        shape_scale=shape_scale,
        momentum_form=momentum_form,
        flatten_conv=flatten_conv,
        fallback=fallback,
        eps=eps,
        ns_dtype=ns_dtype,
    )
    shape_scale, momentum_form = opts["shape_scale"], opts["momentum_form"]
    flatten_conv, fallback = opts["flatten_conv"], opts["fallback"]
    eps, ns_dtype = opts["eps"], opts["ns_dtype"]
    common.check_choice("fallback", fallback, _FALLBACKS)
    if adam_learning_rate is not None:
        common.check_learning_rate(adam_learning_rate, "adam_learning_rate")
    common.check_beta("adam_b1", adam_b1)
    common.check_beta("adam_b2", adam_b2)
    common.check_non_negative("adam_eps", adam_eps)
    common.check_non_negative("adam_weight_decay", adam_weight_decay)
    if adam_leaves is not None and not (
        callable(adam_leaves) or isinstance(adam_leaves, _labels.MuonLabels)
    ):
        if isinstance(adam_leaves, bool | str) or _labels.is_array(adam_leaves):
            _labels.resolve_adam_mask(adam_leaves, {})  # raises, naming adam_leaves
    scale = scale_by_muon(
        momentum,
        nesterov,
        ns_steps,
        ns_coeffs,
        shape_scale=shape_scale,
        layout=layout,
        momentum_form=momentum_form,
        flatten_conv=flatten_conv,
        eps=eps,
        mu_dtype=mu_dtype,
        ns_dtype=ns_dtype,
        precision=precision,
        matrix_axes=matrix_axes,
        stochastic_rounding=stochastic_rounding,
    )
    muon_tx = common.alias(scale, learning_rate, weight_decay, mask)
    if fallback == "sgd" and adam_leaves is None and matrix_axes is None:
        return muon_tx

    adam_tx = _adam.adamw(
        learning_rate if adam_learning_rate is None else adam_learning_rate,
        adam_b1,
        adam_b2,
        adam_eps,
        adam_weight_decay,
        mu_dtype=mu_dtype,
        nu_dtype=nu_dtype,
        stochastic_rounding=stochastic_rounding,
    )

    def labels(params):
        chosen = _labels.resolve_adam_mask(adam_leaves, params)
        spec = None
        if matrix_axes is not None:
            spec = _labels.resolve_matrix_axes(matrix_axes, params)

        def label(path, p, to_adam):
            if spec is not None:
                matrix = spec.get(path) is not None
                return "adam" if to_adam or not matrix else "muon"
            matrix = _matrix_shape(p.shape, layout, flatten_conv) is not None
            if to_adam or (fallback == "adamw" and not matrix):
                return "adam"
            return "muon"

        return jax.tree_util.tree_map_with_path(label, params, chosen)

    return optax.partition({"muon": muon_tx, "adam": adam_tx}, labels)
