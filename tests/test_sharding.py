"""Every registered algorithm, sharded over an 8-device mesh, matches the single-device run.

JAX fixes the device count when it starts, so the work runs once in a subprocess
(`tests/sharding_worker.py`, 8 fake CPU devices) that loops over every algorithm, every layout
and both mesh kinds (Auto axes and `AxisType.Explicit` axes) and prints a JSON report; the
tests below read their row of it. See the worker's docstring for what is checked.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from rlx_optax._src import registry
from tests import device_workers
from tests.session_cache import once_per_session

WORKER = pathlib.Path(__file__).with_name("sharding_worker.py")
ROOT = WORKER.parent.parent
KINDS = ("auto", "explicit")
TIMEOUT_S = 900


def run_worker(*args: str) -> dict:
    command = [str(WORKER), "--mesh", ",".join(KINDS), *args]
    return device_workers.report(command, "SHARDING_REPORT", TIMEOUT_S)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    return once_per_session(tmp_path_factory, "sharding_report", run_worker)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", registry.names())
def test_sharded_matches_single_device(report, kind, name):
    result = report[kind][name]
    detail = "\n".join(result["problems"]) + "\n" + result.get("traceback", "")
    assert result["ok"], f"{name} on a {kind} mesh:\n{detail}"
    # every parameter of rank >= 1 has at least one state leaf of its shape (a moment) unless
    # the algorithm keeps none; the ones that do were checked after every step
    assert result["state_leaves_checked"] == result["state_leaves_checked_init"]


VARIANTS = ["soap:rotated", "soap:reference", "kron_psgd:reference_diagonal"]


def check_variant(report: dict, variant: str) -> None:
    result = report["variants"][variant]
    detail = "\n".join(result["problems"]) + "\n" + result.get("traceback", "")
    assert result["ok"], f"{variant}:\n{detail}"
    assert result["state_leaves_checked"] == result["state_leaves_checked_init"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_matrix_family_options_on_explicit_mesh(report, variant):
    """SOAP rotating every axis (Gram, rotation, QR refresh with its permuted second moment)
    and Kron with the reference's diagonal factors, on an Explicit mesh (the worker's
    `VARIANT_LAYOUTS`: matrices split on rows, columns and both, tall, a vector, 3-D)."""
    check_variant(report, variant)


@pytest.fixture(scope="module")
def every_layout_report(tmp_path_factory) -> dict:
    return once_per_session(
        tmp_path_factory,
        "sharding_variants_every_layout",
        lambda: run_worker("--only", "soap,kron_psgd", "--variant-layouts", "all"),
    )


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_matrix_family_options_on_explicit_mesh_every_layout(every_layout_report, variant):
    """The same on every layout of the worker (wide and replicated matrices, the replicated
    vector and the scalar too)."""
    check_variant(every_layout_report, variant)
    layouts = every_layout_report["variants"][variant]["layouts"]
    assert layouts == list(every_layout_report["layouts"])


def test_stiefel_momentum_kept_on_owner_devices(report):
    """stiefel(state_placement="owner") on an Auto mesh: each split Stiefel matrix's momentum
    lies in its owner's row of the buffers; the parameters are those of one device."""
    result = report["stiefel_owner_state"]
    assert result["placed"] == "OwnerPlacedState"
    assert result["owned_leaves"] == 3  # w_rows, w_both, w_wide (rows <= columns, split)
    assert result["buffers"] == ["P(('data', 'model'), None)"]
    for name, err in result["errors"].items():
        assert err <= result["tolerance"], (name, err)


def test_every_layout_was_run(report):
    layouts = report["layouts"]
    specs = {name: spec for name, (shape, spec) in layouts.items()}
    assert report["devices"] == 8
    # matrices on rows, on columns, on both; replicated and sharded vectors
    assert specs["w_rows"] == "P(('data', 'model'), None)"
    assert specs["w_cols"] == "P(None, ('data', 'model'))"
    assert specs["w_both"] == "P('data', 'model')"
    assert specs["b_replicated"] == "P()"
    assert specs["b_sharded"] == "P(('data', 'model'),)"
    for kind in KINDS:
        for name in registry.names():
            assert report[kind][name].get("layouts", list(layouts)) == list(layouts)


def test_optax_muon_fails_on_explicit_mesh_and_ours_does_not(report):
    """optax.contrib.muon (0.2.8) cannot contract a sharded dimension on an Explicit mesh.

    Its Newton-Schulz matmuls leave the output sharding ambiguous and JAX raises
    `ShardingTypeError`; rlx_optax's muon must run on the same parameter.
    """
    comparison = report["muon_comparison"]
    assert comparison["mesh"] == "explicit"
    peer = comparison["optax.contrib.muon"]
    assert peer["raised"] == "ShardingTypeError", peer  # if optax fixed this, drop this line
    if "muon" not in registry.names():
        pytest.skip("rlx_optax.muon is not registered yet")
    ours = comparison["rlx_optax.muon"]
    assert ours["raised"] is None, ours
    assert ours["finite"]
    assert ours["sharding"] == "P('data', 'model')"


_WARN_PROBE = """
import os, warnings
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax, jax.numpy as jnp
from rlx_optax._src import linalg
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    for _ in range(2):
        linalg.symmetric_eigenbasis(jnp.eye(3))
        linalg.solve_upper_triangular(jnp.eye(3), jnp.ones((3, 2)))
print("WARNINGS", sum("OPENBLAS_NUM_THREADS=1" in str(w.message) for w in seen))
"""


@pytest.mark.parametrize("threads", [None, "1"])
def test_lapack_on_several_cpu_devices_warns_once_unless_openblas_is_single_threaded(threads):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    env.pop("OPENBLAS_NUM_THREADS", None)
    if threads is not None:
        env["OPENBLAS_NUM_THREADS"] = threads
    proc = subprocess.run(
        [sys.executable, "-c", _WARN_PROBE], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"WARNINGS {0 if threads else 1}" in proc.stdout
