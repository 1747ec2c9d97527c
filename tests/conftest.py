import atexit
import os
import shutil
import tempfile

# One XLA compilation cache per test session, shared by the xdist workers and the subprocesses
# that fake 8 devices (they inherit the environment): several of them compile the same programs
# (a family's one-device run on the same tree, the same step in two processes). The process
# that starts the session makes it and removes it at exit; a cache the caller chose is kept.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="rlx_optax_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])

# Strict numerics as in Equinox's suites: implicit rank promotion is a bug here.
jax.config.update("jax_numpy_rank_promotion", "raise")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
