"""Record an orbax checkpoint of the NNX loop for the families whose state layout is stable.

The checkpoint `tests/checkpoints/nnx_release_0_1_0/` was written by release 0.1.0
(before SOAP's and Kron's per-axis state became one tree per axis) for the 13 other families:
`tests/test_nnx_loop.py` checks that the current code restores it into fresh objects, value
for value, and trains on from it. The values are also stored in `nnx_release_0_1_0.npz` (NumPy,
independent of orbax), so the test compares what orbax restores with what was written.

Run from the repository root with the release to record importable as `rlx_optax` (an
editable install of the current checkout shadows `PYTHONPATH`: use a venv with the release).
"""

from __future__ import annotations

import pathlib
import shutil
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

HERE = pathlib.Path(__file__).parent
sys.path.insert(0, str(HERE))

import test_nnx_loop as loop  # noqa: E402

#: The families whose state layout 0.1.0 already restored under NNX.
STABLE = tuple(
    c for c in loop.CONFIGS if c.label == c.algorithm and c.algorithm not in {"soap", "kron_psgd"}
)
OUT = HERE / "checkpoints" / "nnx_release_0_1_0"


def flat_values(states: dict) -> dict[str, np.ndarray]:
    pure = {key: nnx.to_pure_dict(state) for key, state in states.items()}
    leaves = jax.tree_util.tree_flatten_with_path(pure)[0]
    return {jax.tree_util.keystr(path): np.asarray(x) for path, x in leaves}


def main() -> None:
    states, arrays = {}, {}
    for config in STABLE:
        model, optimizer = loop.fresh(config)
        loop.run(config, model, optimizer, range(loop.SPLIT))
        states[config.label] = {"model": nnx.state(model), "opt": nnx.state(optimizer)}
        for key, value in flat_values(states[config.label]).items():
            arrays[f"{config.label}{key}"] = value
    if OUT.exists():
        shutil.rmtree(OUT)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(OUT.absolute(), states)
    np.savez_compressed(OUT.with_suffix(".npz"), **arrays)
    print(f"recorded {len(STABLE)} families, {len(arrays)} arrays")


if __name__ == "__main__":
    main()
