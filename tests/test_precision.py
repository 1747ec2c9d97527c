"""The precision policy: no contraction in the library runs at the backend's default implicitly.

JAX's default float32 matmul is TF32 on NVIDIA GPUs and one bfloat16 pass on TPUs, so a
product without an explicit precision gives other numbers on other machines. These tests trace
`update` of every registered algorithm (and the option sets that take other code paths) to a
jaxpr, walk every sub-jaxpr (`cond` branches, `scan` / `while` / `fori_loop` bodies, `pjit`),
and check the precision of every `dot_general` against the policy of `docs/numerics.md`:

* crate mode (the defaults): ``HIGHEST`` for every float32 product;
* reference modes: the reference's own explicit choice (bfloat16 Newton-Schulz: the native
  pass on bfloat16 operands; psgd-jax's Kron: ``HIGH`` for the factor step and ``DEFAULT``
  for preconditioning);
* ``precision=`` overrides both.

The check is structural and runs on CPU, where every precision computes the same numbers.
"""

from __future__ import annotations

from collections import Counter

import jax
import jax.extend
import jax.numpy as jnp
import pytest

from rlx_optax import newton_schulz
from rlx_optax._src import registry

HIGHEST = jax.lax.Precision.HIGHEST
HIGH = jax.lax.Precision.HIGH
DEFAULT = jax.lax.Precision.DEFAULT

# Option sets whose code paths the defaults skip: name -> (label, kwargs, expected precisions
# of the float32 products, or None: "HIGHEST only").
VARIANTS: dict[str, list[tuple[str, dict, set | None]]] = {
    "muon": [
        ("bf16", {"ns_dtype": jnp.bfloat16}, None),
        ("keller", {"shape_scale": "keller", "fallback": "adamw", "flatten_conv": True}, None),
    ],
    "soap": [
        (
            "reference",
            {
                "skip_first_step": True,
                "reproject_moments": True,
                "refresh": "qr",
                "max_precond_dim": 64,
                "precondition_nd": True,
            },
            None,
        ),
    ],
    "kron_psgd": [
        (
            "reference",
            {
                "probe": "random",
                "key": jax.random.key(0),
                "factor_update": "reference",
                "clip_mode": "rms",
                "precondition_nd": True,
                "momentum_before": True,
            },
            {HIGH, DEFAULT},
        ),
    ],
    "mars": [("shampoo", {"variant": "shampoo"}, None)],
    "stiefel": [("momentum", {"momentum": 0.9}, None)],
}

# the families whose matrix work is a contraction: the audit must see some
CONTRACTING = {"muon", "soap", "kron_psgd", "mars", "stiefel"}


def _params():
    k = jax.random.split(jax.random.key(0), 4)
    return {
        "w": jax.random.normal(k[0], (6, 4)),
        "v": jax.random.normal(k[1], (4, 6)) / 3,  # rows <= cols: a Stiefel leaf
        "b": jax.random.normal(k[2], (4,)),
        "t": jax.random.normal(k[3], (3, 4, 5)),
    }


def _sub_jaxprs(value):
    if isinstance(value, jax.extend.core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jax.extend.core.Jaxpr):
        yield value
    elif isinstance(value, tuple | list):
        for v in value:
            yield from _sub_jaxprs(v)


def dot_precisions(jaxpr) -> list[tuple[object, str]]:
    """(precision, operand dtype) of every dot_general in `jaxpr` and all its sub-jaxprs."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            dtype = str(jnp.result_type(*(v.aval.dtype for v in eqn.invars)))
            found.append((eqn.params["precision"], dtype))
        for value in eqn.params.values():
            for sub in _sub_jaxprs(value):
                found.extend(dot_precisions(sub))
    return found


def traced_update(row, **kwargs):
    tx = row.factory(row.contract_lr, **{**row.contract_kwargs, **kwargs})
    params = _params()
    grads = jax.tree.map(lambda p: 0.1 * jnp.cos(p), params)
    state = tx.init(params)
    extra = row.update_extra(params, grads) if row.update_extra else {}

    def update(g, s, p):
        return tx.update(g, s, p, **extra)

    return jax.make_jaxpr(update)(grads, state, params).jaxpr


def _names(precision) -> tuple:
    if isinstance(precision, tuple):
        return tuple(p for p in precision)
    return (precision,)


def _check(found, allowed_f32: set, label: str) -> None:
    implicit = [dtype for precision, dtype in found if precision is None]
    assert not implicit, f"{label}: {len(implicit)} products at the backend default ({implicit})"
    for precision, dtype in found:
        names = set(_names(precision))
        if dtype in ("float32", "float64"):
            assert names <= allowed_f32, f"{label}: a {dtype} product at {precision}"
        else:  # reduced-precision operands: the one native pass, said explicitly
            assert names <= {DEFAULT} | allowed_f32, f"{label}: a {dtype} product at {precision}"


def _cases():
    for row in registry.ALGORITHMS:
        yield pytest.param(row.name, "default", {}, None, id=f"{row.name}-default")
        for label, kwargs, allowed in VARIANTS.get(row.name, []):
            yield pytest.param(row.name, label, kwargs, allowed, id=f"{row.name}-{label}")


@pytest.mark.parametrize("name,label,kwargs,allowed", list(_cases()))
def test_every_contraction_has_the_policy_precision(name, label, kwargs, allowed):
    row = registry.get(name)
    found = dot_precisions(traced_update(row, **kwargs))
    _check(found, allowed or {HIGHEST}, f"{name} ({label})")
    if name in CONTRACTING and (label != "default" or name not in ("mars",)):
        assert found, f"{name} ({label}): the audit saw no matrix product"
    if allowed:  # the reference's own mix is actually used
        assert {p for precision, _ in found for p in _names(precision)} == allowed


@pytest.mark.parametrize("name", sorted(CONTRACTING))
def test_precision_argument_overrides_the_policy(name):
    row = registry.get(name)
    kwargs = dict(VARIANTS[name][0][1]) if name in ("mars", "stiefel") else {}
    found = dot_precisions(traced_update(row, precision="tensorfloat32", **kwargs))
    assert found
    assert {p for precision, _ in found for p in _names(precision)} == {HIGH}


def test_every_registered_algorithm_is_audited():
    audited = Counter(p.values[0] for p in _cases())
    assert set(audited) == set(registry.names())
    assert len(registry.names()) == 15


def test_newton_schulz_policy_by_compute_dtype():
    x = jax.random.normal(jax.random.key(1), (5, 7))
    f32 = dot_precisions(jax.make_jaxpr(lambda a: newton_schulz(a))(x).jaxpr)
    bf16 = dot_precisions(
        jax.make_jaxpr(lambda a: newton_schulz(a, ns_dtype=jnp.bfloat16))(x).jaxpr
    )
    traced = dot_precisions(jax.make_jaxpr(lambda a, n: newton_schulz(a, n))(x, 3).jaxpr)
    assert f32 and all(set(_names(p)) == {HIGHEST} for p, _ in f32)
    # bf16 iteration: native bf16 products off CPU; on CPU (whose runtime lacks some bf16 x bf16
    # -> f32 dots) float32 products at HIGHEST of operands rounded to bf16 (exact products)
    native = [(p, d) for p, d in bf16 if d == "bfloat16"]
    widened = [(p, d) for p, d in bf16 if d != "bfloat16"]
    assert native and all(set(_names(p)) == {DEFAULT} for p, _ in native)
    assert widened and all(set(_names(p)) == {HIGHEST} and d == "float32" for p, d in widened)
    assert traced and all(set(_names(p)) == {HIGHEST} for p, _ in traced)  # fori_loop body


def test_bad_precision_is_named():
    with pytest.raises(ValueError, match="precision"):
        registry.get("muon").factory(0.02, precision="fast-ish")
    with pytest.raises(ValueError, match="precision"):
        registry.get("soap").factory(1e-3, precision=3)
