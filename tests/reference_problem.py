"""The deterministic problem behind the recorded reference trajectories (NumPy only).

Both `tests/reference_record.py` (run by hand with torch and pytorch-optimizer installed) and
`tests/test_reference.py` (CI, no torch) import this module: each side of a comparison gets
the gradient of *its own* current parameters from `gradient`, in float64 (closed loop).

Leaves, in PyTorch's layout (rows = output axis):
  ``w`` (48, 80) a matrix, ``b`` (80,) a vector, ``k`` (6, 4, 3, 3) a conv kernel.

Loss per leaf, with :math:`M` the leaf viewed as ``(shape[0], -1)`` (a vector as one row),
:math:`T` its target and :math:`S` a fixed symmetric positive definite matrix:

.. math::
    L(M) = \\tfrac12 \\operatorname{tr}\\big((M-T) S (M-T)^\\top\\big)
           + \\tfrac{1}{40} \\textstyle\\sum (M-T)^4

so :math:`\\nabla L = (M-T) S + 0.1 (M-T)^3`: coupled columns (a preconditioner has
something to learn) and a non-quadratic term.
"""

from __future__ import annotations

import os

import numpy as np

DATA_DIR = os.path.join(os.path.dirname(__file__), "reference_data")
PROBLEM_FILE = os.path.join(DATA_DIR, "problem.npz")
SHAPES = {"w": (48, 80), "b": (80,), "k": (6, 4, 3, 3)}
LEAVES = tuple(SHAPES)
#: Steps whose parameters are stored (1-based); the last step of a case is always stored too.
CHECKPOINTS = (1, 6)


def _view(x: np.ndarray) -> np.ndarray:
    return x.reshape(1, -1) if x.ndim == 1 else x.reshape(x.shape[0], -1)


def make_problem(seed: int = 20261127) -> dict[str, np.ndarray]:
    """Fresh problem arrays: ``init/<leaf>``, ``target/<leaf>``, ``spd/<leaf>``."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in SHAPES.items():
        n = _view(np.zeros(shape)).shape[1]
        q, _ = np.linalg.qr(rng.normal(size=(n, n)))
        eig = np.logspace(-1, 1, n)
        out[f"init/{name}"] = 0.5 * rng.normal(size=shape)
        out[f"target/{name}"] = rng.normal(size=shape)
        out[f"spd/{name}"] = (q * eig) @ q.T / n**0.5
    return out


def load_problem() -> dict[str, np.ndarray]:
    with np.load(PROBLEM_FILE) as f:
        return {k: f[k] for k in f.files}


def init_params(problem: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: problem[f"init/{name}"].copy() for name in LEAVES}


def loss(problem: dict[str, np.ndarray], params: dict[str, np.ndarray]) -> float:
    """The float64 loss whose gradient `gradient` returns."""
    total = 0.0
    for name in LEAVES:
        d = _view(np.asarray(params[name], np.float64) - problem[f"target/{name}"])
        total += 0.5 * np.sum((d @ problem[f"spd/{name}"]) * d) + 0.025 * np.sum(d**4)
    return float(total)


def gradient(problem: dict[str, np.ndarray], params: dict[str, np.ndarray]) -> dict:
    """float64 gradient of the loss at `params` (a dict of arrays shaped as `SHAPES`)."""
    out = {}
    for name in LEAVES:
        p = np.asarray(params[name], np.float64)
        d = _view(p - problem[f"target/{name}"])
        g = d @ problem[f"spd/{name}"] + 0.1 * d**3
        out[name] = g.reshape(p.shape)
    return out
