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

import os
import warnings
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


def check_cpu_blas_threads() -> None:
    """Warn once when LAPACK work is traced in a process with several CPU devices while
    OpenBLAS may run threaded.

    jaxlib's CPU LAPACK kernels call OpenBLAS. With several CPU devices in one process (fake
    devices, ``--xla_force_host_platform_device_count``) every device runs its program on its
    own thread, and concurrent calls into a threaded OpenBLAS contend for its one thread pool:
    measured with jaxlib 0.10.2 on 2 cores, eight concurrent `eigh` of a 1024 x 1024 matrix took
    over 120 s (one device: 0.33 s; with ``OPENBLAS_NUM_THREADS=1`` set before the process
    started: 0.6 s), past XLA's 40 s collective termination timeout, so the process aborted.
    Limiting the threads after OpenBLAS is loaded is not enough (16.7 s), hence a warning
    rather than a fix: set the variable before Python starts.
    """
    if os.environ.get("OPENBLAS_NUM_THREADS") == "1" or "cpu" in _WARNED:
        return
    try:
        several = jax.default_backend() == "cpu" and jax.local_device_count() > 1
    except RuntimeError:  # no backend yet
        return
    if several:
        _WARNED.add("cpu")
        warnings.warn(
            f"rlx_optax: LAPACK work (eigh, qr, triangular solves) on {jax.local_device_count()} "
            "CPU devices in one process can take minutes and abort on XLA's collective timeout "
            "while OpenBLAS runs threaded: start Python with OPENBLAS_NUM_THREADS=1 (see the "
            "sharded-training guide)",
            RuntimeWarning,
            stacklevel=3,
        )


_WARNED: set[str] = set()


def _checked(fn: Callable[[jax.Array], tuple[jax.Array, jax.Array]]):
    def run(x):
        check_cpu_blas_threads()
        return fn(x)

    return run


eigh = _checked(_batch_safe(lambda s: tuple(jnp.linalg.eigh(s))))
eigh.__doc__ = "`jnp.linalg.eigh(s)` as ``(w, v)``, one matrix at a time under vmap on the CPU."
qr = _checked(_batch_safe(lambda a: tuple(jnp.linalg.qr(a))))
qr.__doc__ = "`jnp.linalg.qr(a)` as ``(q, r)``, one matrix at a time under vmap on the CPU."
