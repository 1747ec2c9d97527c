"""Code paths chosen for speed by backend compute the same values as the plain formula.

The CPU suite runs only the CPU form of a `jax.lax.platform_dependent` choice; these tests call
every form directly (oracle: NumPy in float64).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from rlx_optax._src.transforms import lamb


@pytest.mark.parametrize("masked_pass", [None, False, True])
@pytest.mark.parametrize("case", ["finite", "nan", "inf", "overflow", "zeros"])
def test_lamb_finite_norm_forms(masked_pass, case):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(37, 5)).astype(np.float32)
    if case == "nan":
        x[3, 1] = np.nan
    elif case == "inf":
        x[0, 0], x[5, 2] = np.inf, -np.inf
    elif case == "overflow":
        x[2, 2] = 1e20  # finite, but its square overflows float32: the norm is inf
    elif case == "zeros":
        x[:] = 0
    finite = np.isfinite(x)
    want = np.sqrt(np.sum(np.where(finite, x.astype(np.float64), 0.0) ** 2))
    # the sums of squares over finite entries, as the trust ratios read them (one term, and
    # the same term twice: a stacked run)
    term = (lambda a: 2.0 * a, (jnp.asarray(x),))
    (one,) = lamb._sums_of_squares([term], masked_pass)
    (stacked,) = lamb._sums_of_squares([term, term], masked_pass)
    want = 2.0 * want
    for got in [float(jnp.sqrt(one[0]))] + [float(v) for v in jnp.sqrt(stacked)]:
        if case == "overflow":
            assert got == np.inf
        else:
            assert got == pytest.approx(want, rel=1e-6)
