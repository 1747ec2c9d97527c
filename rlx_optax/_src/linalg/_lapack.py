"""`eigh` and `qr` whose batched form runs one matrix at a time on the CPU.

jaxlib's CPU LAPACK kernels split a batch over XLA's intra-op thread pool and block the
calling pool thread until the pieces finish. Two such batched calls that XLA runs concurrently
(independent branches of one program, e.g. SOAP's left and right statistics, or two shape
groups of a model) can occupy every pool thread while each waits for work queued behind the
other: on a 2-core machine the program never finishes (observed with jaxlib 0.10.2: SOAP's
batched step on a d=64 transformer tree; a single batched `eigh`, or several unbatched ones,
run fine). Under `jax.vmap` these wrappers therefore loop over the batch with `jax.lax.map` on
the CPU backend (the same per-matrix LAPACK call; on a CPU a batched kernel saves nothing
anyway) and keep the native batched kernel elsewhere (GPU, TPU).

Results are those of `jnp.linalg.eigh` / `jnp.linalg.qr` (on the CPU bit for bit: the same
routine per matrix). Differentiation uses the jnp functions' rules.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import custom_batching


def _batch_safe(fn: Callable[[jax.Array], tuple[jax.Array, jax.Array]]):
    """`fn` (one matrix -> two arrays) with the vmap rule and the derivative described above."""

    @custom_batching.custom_vmap
    def batched(x):
        return fn(x)

    @batched.def_vmap
    def _rule(axis_size, in_batched, x):
        del axis_size
        if not in_batched[0]:
            return batched(x), (False, False)
        if jax.default_backend() == "cpu":
            return jax.lax.map(batched, x), (True, True)
        return fn(x), (True, True)  # the jnp functions batch over leading axes

    @jax.custom_jvp
    def wrapped(x):
        return batched(x)

    @wrapped.defjvp
    def _jvp(primals, tangents):
        return jax.jvp(fn, primals, tangents)

    return wrapped


eigh = _batch_safe(lambda s: tuple(jnp.linalg.eigh(s)))
eigh.__doc__ = "`jnp.linalg.eigh(s)` as ``(w, v)``, one matrix at a time under vmap on the CPU."
qr = _batch_safe(lambda a: tuple(jnp.linalg.qr(a)))
qr.__doc__ = "`jnp.linalg.qr(a)` as ``(q, r)``, one matrix at a time under vmap on the CPU."
