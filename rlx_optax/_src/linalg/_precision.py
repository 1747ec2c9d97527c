"""The library's matmul precision policy, in one place.

JAX's default precision for a float32 product depends on the backend: full float32 on CPU,
TF32 (10-bit mantissa) on NVIDIA GPUs, one bfloat16 pass on TPUs. An optimizer whose matrix
work silently follows the backend gives other numbers on every machine, so no contraction in
the library runs at the default implicitly: every product is given the precision that
`resolve_precision` returns.

* float32 (or wider) operands: ``Precision.HIGHEST`` unless the caller asks otherwise, so the
  crate's float32 arithmetic is reproduced on every backend;
* bfloat16 / float16 operands (a reduced-precision Newton-Schulz chosen with ``ns_dtype``):
  ``Precision.DEFAULT``, the one native pass, which is exact for such operands (the products
  are accumulated in float32 by every backend).

A caller's `precision` (a `jax.lax.Precision`, its name as a string, a pair of them, or a
`jax.lax.DotAlgorithmPreset`) overrides the policy.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Precision = Any  # jax.lax.Precision | str | tuple | jax.lax.DotAlgorithmPreset | None


def _from_name(value: str) -> jax.lax.Precision | None:
    try:
        return jax.lax.Precision(value.lower())
    except (ValueError, KeyError):
        return None


def check_precision(name: str, value: Any) -> None:
    """Raise a ValueError naming `name` unless `value` is a precision JAX understands."""
    if value is None or isinstance(value, jax.lax.Precision | jax.lax.DotAlgorithmPreset):
        return
    if isinstance(value, str) and _from_name(value) is not None:
        return
    if isinstance(value, tuple) and len(value) == 2:
        for v in value:
            check_precision(name, v)
        return
    raise ValueError(
        f"{name} must be None, a jax.lax.Precision or its name ('highest', 'high', "
        f"'default', 'float32', 'tensorfloat32', 'bfloat16'), a pair of those, or a "
        f"jax.lax.DotAlgorithmPreset; got {value!r}"
    )


def resolve_precision(precision: Precision, dtype: Any) -> Precision:
    """The precision of a product whose operands have `dtype` (see the module docstring)."""
    if precision is not None:
        if isinstance(precision, str):
            return _from_name(precision)
        return precision
    if jnp.finfo(dtype).bits < 32:
        return jax.lax.Precision.DEFAULT
    return jax.lax.Precision.HIGHEST
