import os

import jax

# Strict numerics as in Equinox's suites: implicit rank promotion is a bug here.
jax.config.update("jax_numpy_rank_promotion", "raise")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
