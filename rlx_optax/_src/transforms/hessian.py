"""Stochastic estimates of a Hessian diagonal, for Sophia and other curvature-aware methods.

Both estimators take the parameters as a pytree and an explicit PRNG key, return a pytree shaped
like the parameters, and are pure functions of their inputs (they can be jitted, vmapped or run
inside `lax.cond`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from rlx_optax._src import common

_DISTRIBUTIONS = ("rademacher", "gaussian")


def _probe(key: jax.Array, leaf: jax.Array, distribution: str) -> jax.Array:
    if distribution == "rademacher":
        return jax.random.rademacher(key, leaf.shape, leaf.dtype)
    return jax.random.normal(key, leaf.shape, leaf.dtype)


def hutchinson_diag(
    obj_fn: Callable[[Any], jax.Array],
    params: Any,
    key: jax.Array,
    *,
    distribution: str = "rademacher",
    num_samples: int = 1,
) -> Any:
    r"""Hutchinson's estimate :math:`u \odot (\nabla^2 L\, u)` of the Hessian diagonal.

    .. math::
        \hat h = \frac{1}{S}\sum_{s=1}^{S} u_s \odot (H u_s),\qquad
        \mathbb{E}[\hat h] = \operatorname{diag}(H)

    for probes :math:`u_s` with independent entries of mean 0 and variance 1. The
    Hessian-vector product is forward-over-reverse, ``jax.jvp(jax.grad(obj_fn))``: about the
    cost of two gradient evaluations per probe, and no Hessian is ever formed.

    Rademacher probes (entries :math:`\pm 1`, optax.contrib's choice) have the smaller variance,
    :math:`\sum_{j\ne i} H_{ij}^2` per entry, and are exact for a diagonal Hessian; Gaussian probes
    (the Sophia paper's and levanter's choice) add :math:`2H_{ii}^2`.

    Args:
      obj_fn: the scalar loss as a function of `params` (close over the batch).
      params: pytree of floating arrays at which the curvature is measured.
      key: a PRNG key; each leaf and each sample draws from its own split.
      distribution: ``"rademacher"`` or ``"gaussian"``.
      num_samples: number of probes averaged (run sequentially, so memory does not grow).

    Returns:
      A pytree like `params` holding the estimate.

    Example:
      >>> import jax, jax.numpy as jnp, rlx_optax
      >>> a = jnp.array([1.0, 2.0, 3.0])
      >>> loss = lambda p: 0.5 * jnp.sum(a * p["x"] ** 2)
      >>> h = rlx_optax.hutchinson_diag(loss, {"x": jnp.zeros(3)}, jax.random.key(0))
      >>> h["x"]  # a diagonal Hessian is recovered exactly with Rademacher probes
      Array([1., 2., 3.], dtype=float32)

    References:
      Hutchinson, *A stochastic estimator of the trace of the influence matrix for Laplacian
      smoothing splines* (1990); Liu et al., *Sophia: A Scalable Stochastic Second-order
      Optimizer for Language Model Pre-training*, https://arxiv.org/abs/2305.14342
    """
    common.check_choice("distribution", distribution, _DISTRIBUTIONS)
    common.check_positive_int("num_samples", num_samples)
    leaves, treedef = jax.tree.flatten(params)
    grad_fn = jax.grad(obj_fn)

    def one(k):
        keys = jax.random.split(k, max(len(leaves), 1))
        probes = treedef.unflatten(
            [_probe(keys[i], leaf, distribution) for i, leaf in enumerate(leaves)]
        )
        _, hvp = jax.jvp(grad_fn, (params,), (probes,))
        return jax.tree.map(lambda u, hu: u * hu, probes, hvp)

    if num_samples == 1:
        return one(key)

    def body(total, k):
        return jax.tree.map(jnp.add, total, one(k)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    total, _ = jax.lax.scan(body, zeros, jax.random.split(key, num_samples))
    return jax.tree.map(lambda t: t / num_samples, total)


def gauss_newton_bartlett_diag(
    logits_fn: Callable[[Any], jax.Array],
    params: Any,
    key: jax.Array,
    *,
    scale: float | None = None,
) -> Any:
    r"""The Gauss-Newton-Bartlett estimate of the Hessian diagonal of a softmax cross-entropy.

    Labels :math:`\hat y_b` are sampled from the model's own predictive distribution
    :math:`\operatorname{softmax}(f(\theta, x_b))`, and

    .. math::
        \hat g = \nabla_\theta \frac{1}{B}\sum_b \ell_{ce}(f(\theta, x_b), \hat y_b),\qquad
        \hat h = B\,\hat g \odot \hat g,

    whose expectation over the sampled labels is the diagonal of the Gauss-Newton matrix of the
    mean cross-entropy (Sophia-G, Algorithm 2 of the paper). One forward pass and one backward
    pass: `logits_fn` is differentiated with `jax.vjp`, the labels never need the true targets.

    Args:
      logits_fn: maps `params` to logits of shape ``(..., classes)`` (close over the inputs).
      params: pytree of floating arrays.
      key: a PRNG key for the sampled labels.
      scale: the factor :math:`B`; defaults to the number of sampled labels (the product of the
        leading dimensions of the logits).

    Returns:
      A pytree like `params` holding the estimate (non-negative).

    Example:
      >>> import jax, jax.numpy as jnp, rlx_optax
      >>> x = jnp.ones((4, 3))
      >>> h = rlx_optax.gauss_newton_bartlett_diag(
      ...     lambda p: x @ p["w"], {"w": jnp.zeros((3, 5))}, jax.random.key(0))
      >>> h["w"].shape, bool(jnp.all(h["w"] >= 0))
      ((3, 5), True)

    References:
      Liu et al., *Sophia: A Scalable Stochastic Second-order Optimizer for Language Model
      Pre-training*, https://arxiv.org/abs/2305.14342
    """
    logits, pullback = jax.vjp(logits_fn, params)
    labels = jax.random.categorical(key, jax.lax.stop_gradient(logits), axis=-1)
    n = labels.size
    probs = jax.nn.softmax(logits.astype(common.compute_dtype(logits.dtype)), axis=-1)
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=probs.dtype)
    (grads,) = pullback(((probs - onehot) / n).astype(logits.dtype))
    b = float(n) if scale is None else scale
    return jax.tree.map(lambda g: (b * g * g).astype(g.dtype), grads)


def constant_hessian_diag(params: optax.Params, value: float = 1.0) -> optax.Params:
    """A Hessian-diagonal 'estimate' equal to `value` everywhere, shaped like `params`.

    The crate's own tests call ``update_hessian(name, ones)`` once; this is that estimate as a
    pytree. `None` leaves stay `None`.

    Example:
      >>> import jax.numpy as jnp, rlx_optax
      >>> rlx_optax.constant_hessian_diag({"w": jnp.zeros(2)}, 2.0)
      {'w': Array([2., 2.], dtype=float32)}
    """
    return jax.tree.map(lambda p: jnp.full_like(p, value), params)
