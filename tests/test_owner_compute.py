"""Owner compute (`transforms/_owner.py`): the matrix families on meshes of several devices.

The mesh runs happen in a subprocess with 8 fake CPU devices (`tests/owner_worker.py`): a small
GPT-shaped tree trained 3 steps with one jitted update, on one device and on each mesh. The
oracle is the one-device run (no mesh, no owner compute); the compiled mesh program is read for
its collectives. The CI run covers the 1-D FSDP mesh of 8 devices and the 4 x 2 mesh, with Auto
axes and with Explicit axes (the reference variants on the 8-device mesh); meshes of 2 and 4
devices, the mixed Explicit/Auto mesh, the reference variants on 4 x 2 and the larger tree are
`slow`.
"""

from __future__ import annotations

import itertools
import pathlib

import numpy as np
import pytest

from rlx_optax._src.transforms import _owner
from tests import device_workers
from tests.session_cache import once_per_session

WORKER = pathlib.Path(__file__).with_name("owner_worker.py")
FAMILIES = (
    "muon",
    "muon_reference",
    "muon_scanned",
    "mars_shampoo",
    "stiefel",
    "soap",
    "soap_reference",
    "kron",
    "kron_reference",
)
# Bound on `max|mesh - one device| / max|one device|` (updates of 3 steps, and the state): 1e-4,
# or 4x what one float32 ulp on every gradient moves the one-device run, when that is larger.
# Crate SOAP's eigenbases of rank-deficient statistics are not unique (a null space has no
# preferred basis), so its results move by more than rounding under any change of rounding;
# tests/golden.py keeps those tensors out of the crate parity for the same reason.
TOLERANCE = 1e-4


def _run(meshes: str, families: tuple[str, ...], *extra: str, timeout: float = 840) -> dict:
    command = [str(WORKER), "--meshes", meshes, "--families", ",".join(families)]
    return device_workers.report(
        [*command, "--timeout", str(timeout - 30), *extra], "OWNER_REPORT", timeout
    )


# each worker run once per session, whichever xdist worker asks first (tests/session_cache.py)
@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    return once_per_session(
        tmp_path_factory,
        "owner_auto",
        lambda: _run(
            "8,4x2,4x2l",
            FAMILIES,
            "--told",
            ",".join(TOLD_FAMILIES),
            "--first-mesh-only",
            ",".join(FIRST_MESH_ONLY),
        ),
    )


# the reference variants share the exchange with their defaults and differ only in the
# per-leaf numerics, which owner compute runs on whole matrices: in CI they run on the 8-device
# mesh, and on 4 x 2 under `slow` (`test_reference_variants_on_the_2d_mesh`)
FIRST_MESH_ONLY = ("muon_reference", "soap_reference", "kron_reference")


# the families run on the Auto 4 x 2 mesh with the parameters' layouts told (in CI; the
# slow mixed-mesh test tells every family, and tests/test_owner_state.py tells SOAP with its
# state on the owners)
TOLD_FAMILIES = ("muon", "muon_scanned", "stiefel")


def _check(
    report: dict, family: str, mesh: str, owner: bool = True, state_split: bool = True
) -> None:
    result, ulp = report[f"{family}@{mesh}"], report[f"{family}@ulp"]
    where = f"{family} on mesh {mesh}"
    assert result["ok"], f"{where}: {result.get('error')}\n{result.get('traceback', '')}"
    for part in ("updates", "state"):
        bound = max(TOLERANCE, 4 * ulp[part])
        assert result[part] <= bound, (
            f"{where}: {part} differ by {result[part]:.3g} (bound {bound:.3g}; one ulp "
            f"moves the one-device run by {ulp[part]:.3g})"
        )
    # the matrix work ran on owners: one exchange there and one back per dtype, and no
    # collective inside any loop (Newton-Schulz, eigen refresh, Gram-Schmidt)
    if owner:
        assert result["all_to_all"] >= 2, f"{where}: no all-to-all, the matrices were not moved"
    assert result["in_loops"] == 0, f"{where}: {result['in_loops']} collectives inside loops"
    # the state placed by `state_shardings`: about an equal share on every device
    if state_split:
        share = result["state_share"]
        assert share <= 1.2, f"{where}: largest state share {share}"


@pytest.mark.parametrize(
    ("family", "mesh"),
    [(f, m) for f in FAMILIES for m in ("8", "4x2") if m == "8" or f not in FIRST_MESH_ONLY],
)
def test_mesh_matches_one_device(report, family, mesh):
    _check(report, family, mesh)


@pytest.mark.slow
def test_reference_variants_on_the_2d_mesh():
    result = _run("4x2", FIRST_MESH_ONLY)
    for family in FIRST_MESH_ONLY:
        _check(result, family, "4x2")


@pytest.mark.parametrize("family", TOLD_FAMILIES)
def test_told_layouts_match_one_device(report, family):
    """Auto 4 x 2 mesh, ``P("fsdp", "tp")`` weights, the step traced under
    `rlx_optax.owner_compute(layouts=...)`: the same numbers. Muon, scanned Muon and Stiefel
    move only the exchange's two all-to-alls (without the layouts the compiler reshards each
    matrix between its layout and the canonical rows before and after: 8 to 37 collectives)
    and return every update and state leaf in its own layout."""
    _check(report, family, "4x2l")
    told, untold = report[f"{family}@4x2l"], report[f"{family}@4x2"]
    assert (told["collectives"], told["all_to_all"]) == (2, 2), told
    assert untold["collectives"] > told["collectives"], (told, untold)
    assert told["layouts_kept"], f"{family}: a result left its layout"


def test_told_layouts_refuse_bad_trees(report):
    """A layouts tree of another structure, or a spec naming an axis that is not the mesh's:
    a ValueError naming `layouts`."""
    probe = report["layouts_probe"]
    assert "owner_compute(layouts=...)" in probe["structure"], probe["structure"]
    assert "structure" in probe["structure"]
    assert "owner_compute(layouts=...)" in probe["axis"] and "'data'" in probe["axis"], probe


def test_told_layouts_in_a_flax_nnx_loop(report):
    """`nnx.Optimizer` with Muon in one `nnx.jit` on an Auto 4 x 2 mesh, told the layouts by
    `nnx.get_partition_spec` (each spec inside its ``nnx.Param``): the losses of the untold
    run, and the ``("fsdp", "tp")`` kernels keep their layout."""
    nnx = report["layouts_probe"]["nnx"]
    told, untold = nnx["told"], nnx["untold"]
    np.testing.assert_allclose(told["losses"], untold["losses"], rtol=1e-6)
    assert told["losses"][-1] < told["losses"][0]
    assert told["kernels_kept"]


@pytest.fixture(scope="module")
def quantized_report(tmp_path_factory) -> dict:
    # width 64: the matrices have >= 4096 elements, so their moments are quantized
    return once_per_session(
        tmp_path_factory,
        "owner_q8",
        lambda: _run("8,4x2", ("muon_q8", "adamw_q8"), "--width", "64"),
    )


@pytest.mark.parametrize("mesh", ["8", "4x2"])
@pytest.mark.parametrize("family", ["muon_q8", "adamw_q8"])
def test_quantized_state_on_a_mesh_matches_one_device(quantized_report, family, mesh):
    """8-bit state on a mesh (FSDP rows; on 4 x 2 the columns split too, inside a block)."""
    _check(quantized_report, family, mesh, owner=family.startswith("muon"))


# Explicit meshes (FSDP rows on 8; rows and columns on 4 x 2); the reference variants and
# scanned Muon are `slow` there
EXPLICIT_FAMILIES = ("muon", "mars_shampoo", "stiefel", "soap", "kron")
# families whose `state_shardings` state is not split (none: every family's per-axis matrices
# are split over the mesh, on Explicit meshes too)
REPLICATED_STATE: tuple[str, ...] = ()


@pytest.fixture(scope="module")
def explicit_report(tmp_path_factory) -> dict:
    return once_per_session(
        tmp_path_factory, "owner_explicit", lambda: _run("8e,4x2e", EXPLICIT_FAMILIES)
    )


def _check_explicit(report: dict, family: str, mesh: str) -> None:
    _check(report, family, mesh, state_split=family not in REPLICATED_STATE)
    result = report[f"{family}@{mesh}"]
    assert result["layouts_kept"], f"{family} on mesh {mesh}: a result changed its sharding"


@pytest.mark.parametrize("mesh", ["8e", "4x2e"])
@pytest.mark.parametrize("family", EXPLICIT_FAMILIES)
def test_explicit_mesh_matches_one_device(explicit_report, family, mesh):
    """Owner compute on a mesh of Explicit axes: the exchange takes every array in the layout
    its type gives, and every update and state leaf comes back typed with its own sharding."""
    _check_explicit(explicit_report, family, mesh)


def test_closures_over_explicit_values(explicit_report):
    """A traced scalar typed on the Explicit mesh, given to the per-leaf function as an argument
    or closed over, reaches the owner (all-to-all there and back); closed over inside an object
    that `_owner` does not look into, it keeps the leaf on the partitioned path (no
    all-to-all). All three agree with NumPy and keep the matrix's sharding."""
    probe = explicit_report["closure_probe"]
    for name, moved in (("passed", True), ("closing", True), ("boxed", False)):
        result = probe[name]
        assert result["error"] <= 1e-6, f"{name}: {result['error']}"
        assert (result["all_to_all"] >= 2) == moved, f"{name}: {result['all_to_all']} all-to-all"
        assert result["sharding_kept"], name


def test_layouts_match_jax_device_indices(report):
    """`_Layout`'s block of every device equals the slice `NamedSharding` gives that device."""
    checks = report["layouts"]
    assert checks, "the worker checked no layout"
    for name, ok in checks.items():
        assert ok, f"layout {name}: blocks differ from NamedSharding.devices_indices_map"


def test_collective_counter_sees_loops(report):
    """The HLO reader that says "no collective inside a loop" finds the psum of a fori_loop."""
    total, in_loops, _ = report["loop_probe"]
    assert total >= 1 and in_loops >= 1


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["2", "4"])
def test_smaller_meshes(mesh):
    result = _run(mesh, FAMILIES)
    for family in FAMILIES:
        _check(result, family, mesh)


@pytest.mark.slow
def test_explicit_mesh_all_families():
    """The reference variants, scanned Muon and SOAP with injected hyperparameters (closed
    over by its per-leaf function, typed on the mesh) on the Explicit meshes."""
    families = (*(f for f in FAMILIES if f not in EXPLICIT_FAMILIES), "soap_injected")
    result = _run("8e,4x2e", families)
    for family, mesh in itertools.product(families, ("8e", "4x2e")):
        _check_explicit(result, family, mesh)


@pytest.mark.slow
def test_mixed_explicit_and_auto_mesh():
    """4 x 2 with `fsdp` Explicit and `tp` Auto: the types show the `fsdp` part of each layout,
    which the exchange takes; the `tp` part is the compiler's, unless the step is told the
    layouts (`4x2ml`): then the exchange takes ``P("fsdp", "tp")`` whole, and Muon and
    Stiefel need fewer collectives (a pinned step needs none besides the two all-to-alls)."""
    result = _run("4x2m,4x2ml", FAMILIES)
    for family in FAMILIES:
        _check(result, family, "4x2m", state_split=family not in REPLICATED_STATE)
        _check(result, family, "4x2ml", state_split=family not in REPLICATED_STATE)
    for family in ("muon", "stiefel"):
        told, untold = result[f"{family}@4x2ml"], result[f"{family}@4x2m"]
        assert told["collectives"] < untold["collectives"], (family, told, untold)


@pytest.mark.slow
def test_gpt_tree_of_the_issue():
    """Width 256, 6 layers, 2048 tokens: the tree on which SOAP and Kron aborted before."""
    families = ("muon", "mars_shampoo", "stiefel", "soap", "kron", "kron_reference")
    result = _run(
        "8,4x2", families, "--width", "256", "--layers", "6", "--vocab", "2048", timeout=3000
    )
    for family, mesh in itertools.product(families, ("8", "4x2")):
        _check(result, family, mesh)


def _makespan(costs, owners, devices):
    load = [0.0] * devices
    for c, o in zip(costs, owners, strict=True):
        load[o] += c
    return max(load)


@pytest.mark.parametrize("seed", range(20))
def test_owners_within_graham_bound_of_the_optimum(seed):
    """Largest-first onto the least loaded device: makespan <= (4/3 - 1/(3m)) x the optimum
    (Graham's bound for LPT), the optimum found by brute force over every assignment."""
    rng = np.random.default_rng(seed)
    devices = int(rng.integers(2, 4))
    costs = [float(c) for c in rng.integers(1, 50, size=int(rng.integers(3, 8)))]
    owners = _owner.assign_owners(costs, devices)
    assert sorted(set(owners)) <= list(range(devices))
    best = min(
        _makespan(costs, assignment, devices)
        for assignment in itertools.product(range(devices), repeat=len(costs))
    )
    got = _makespan(costs, owners, devices)
    assert got <= (4 / 3 - 1 / (3 * devices)) * best + 1e-9


def test_owners_balance_across_shapes():
    """The issue's tree on 8 devices: 6 layers of 4 shapes (fewer of each than devices) and two
    large matrices spread to within 5% of the ideal share (each leaf's cost as estimated)."""
    shapes = [(2048, 256), (256, 2048)] + [(256, 768), (256, 256), (256, 1024), (1024, 256)] * 6
    costs = [_owner.leaf_cost([np.zeros(s)]) for s in shapes]
    owners = _owner.assign_owners(costs, 8)
    assert _makespan(costs, owners, 8) <= 1.05 * sum(costs) / 8
