"""`rlx_optax.state_shardings`: the state built where it belongs on an 8-device FSDP mesh.

In a subprocess with 8 fake CPU devices (the device count is fixed when JAX starts): for a
small transformer-like tree sharded over its first axis, ``jax.jit(tx.init,
out_shardings=state_shardings(tx, params))`` gives every state leaf the promised sharding
(moments like their parameter, per-axis matrices split over their first axis, counts and keys
replicated), three jitted steps with those shardings as in/out shardings agree with the same
steps on one device, and the largest per-device share of the state is reported against the
ideal (total / 8).
"""

from __future__ import annotations

import json

import pytest

from tests import device_workers
from tests.session_cache import once_per_session

WORKER = r"""
import json, os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import NamedSharding, PartitionSpec as P
import rlx_optax
from rlx_optax._src import registry

jax.config.update("jax_default_matmul_precision", "highest")
from jax.sharding import AxisType
mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Auto,))
# square matrices: one gradient gives full-rank statistics, so SOAP's eigenbases are determined
# (a rank-deficient side's basis jumps under rounding: see docs/scaling.md)
SHAPES = {"embed": (32, 32), "qkv": (32, 32), "o": (16, 16), "up": (64, 64), "down": (64, 64),
          "ln": (16,), "head": (32, 32)}
rng = np.random.default_rng(0)
host = {k: (0.1 * rng.normal(size=s)).astype(np.float32) for k, s in SHAPES.items()}
grads = [{k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()} for _ in range(3)]
spec = {k: P("fsdp") if len(s) == 2 else P() for k, s in SHAPES.items()}
param_sh = {k: NamedSharding(mesh, spec[k]) for k in SHAPES}
out = {}
for label in json.loads(os.environ["LABELS"]):
    config = next(c for c in registry.configurations() if c.label == label)
    tx = config.make(1e-2)
    params = {k: jax.device_put(v, param_sh[k]) for k, v in host.items()}
    shardings = rlx_optax.state_shardings(tx, params)
    state = jax.jit(tx.init, out_shardings=shardings)(params)
    wrong = [jax.tree_util.keystr(p) for (p, x), s in zip(
        jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(shardings), strict=True)
        if not x.sharding.is_equivalent_to(s, x.ndim)]
    extra = config.row.update_extra

    def step(p, s, g):
        kw = extra(p, g) if extra else {}
        u, s = tx.update(g, s, p, **kw)
        return optax.apply_updates(p, u), s

    sharded = jax.jit(step, in_shardings=(param_sh, shardings, param_sh),
                      out_shardings=(param_sh, shardings))
    single = jax.jit(step)
    free = jax.jit(step)  # on the mesh, layouts left to the compiler
    p1, s1 = params, state
    p2, s2 = params, tx.init(params)
    p0 = {k: jnp.asarray(v) for k, v in host.items()}
    s0 = tx.init(p0)
    for g in grads:
        on_mesh = {k: jax.device_put(v, param_sh[k]) for k, v in g.items()}
        p1, s1 = sharded(p1, s1, on_mesh)
        p2, s2 = free(p2, s2, on_mesh)
        p0, s0 = single(p0, s0, {k: jnp.asarray(v) for k, v in g.items()})
    moved = max(float(np.max(np.abs(np.asarray(p0[k]) - host[k]))) for k in SHAPES)
    err = max(float(np.max(np.abs(np.asarray(p1[k]) - np.asarray(p0[k])))) for k in SHAPES)
    err_mesh = max(float(np.max(np.abs(np.asarray(p1[k]) - np.asarray(p2[k])))) for k in SHAPES)
    err_free = max(float(np.max(np.abs(np.asarray(p2[k]) - np.asarray(p0[k])))) for k in SHAPES)
    leaves = [x for x in jax.tree.leaves(s1) if hasattr(x, "addressable_shards")]
    total = sum(x.nbytes for x in leaves)
    per_device = {}
    for x in leaves:
        for shard in x.addressable_shards:
            per_device[shard.device.id] = per_device.get(shard.device.id, 0) + shard.data.nbytes
    out[label] = {
        "wrong": wrong,
        "relative_error": err / moved,
        "relative_error_vs_free_layouts": err_mesh / moved,
        "free_layouts_vs_one_device": err_free / moved,
        "tol": config.row.golden_tol,
        "largest_share_over_ideal": max(per_device.values()) / (total / 8),
        "specs": {jax.tree_util.keystr(p): str(s.spec) for p, s in
                  jax.tree_util.tree_leaves_with_path(shardings)},
    }
print("STATE_SHARDINGS " + json.dumps(out))
"""

# SOAP's crate defaults are left out of the value comparison: their first step applies Adam to
# a gradient rotated into its own singular bases, a diagonal matrix whose off-diagonal entries
# are rounding noise that Adam's first step turns into +-1 (any change of summation order moves
# them; see docs/scaling.md). The reference preset skips that step.
LABELS = ["adamw", "muon", "soap/reference", "kron_psgd/reference", "adafactor", "mars/shampoo"]


def run_worker() -> dict:
    return device_workers.report(
        ["-c", WORKER], "STATE_SHARDINGS", 600, {"LABELS": json.dumps(LABELS)}
    )


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    return once_per_session(tmp_path_factory, "state_shardings_report", run_worker)


#: Sharded runs that differ from one device by more than the family's tolerance whatever the
#: state's layout (the same gap with the compiler's own layouts): SOAP's reference QR refresh
#: on the (64, 64) leaves, 2.6e-4 of the displacement after 3 steps (issue: sharded training).
MESH_GAP = {"soap/reference"}


@pytest.mark.parametrize("label", LABELS)
def test_state_built_with_the_promised_shardings_and_matching_one_device(report, label):
    row = report[label]
    assert row["wrong"] == []
    # the layouts change rounding only: as close to the compiler's own layouts as to one device
    assert row["relative_error_vs_free_layouts"] <= row["tol"], row
    if label in MESH_GAP:
        assert row["relative_error"] <= 1.2 * row["free_layouts_vs_one_device"], row
    else:
        assert row["relative_error"] <= row["tol"], row


def test_the_rule_for_moments_matrices_and_scalars(report):
    soap = report["soap/reference"]["specs"]
    assert soap["[1][0].mu['up']"] == "P('fsdp',)"  # a moment: its parameter's
    assert soap["[1][0].stats[0]['up']"] == "P('fsdp',)"  # (64, 64): split rows
    assert soap["[1][0].bases[1]['o']"] == "P('fsdp',)"  # (16, 16)
    assert soap["[1][0].count"] == "P()"
    kron = report["kron_psgd/reference"]["specs"]
    assert any(k.endswith(".key") and v == "P()" for k, v in kron.items())


def test_matrix_state_is_split_about_evenly(report):
    for label in ("soap/reference", "kron_psgd/reference", "muon", "adamw"):
        assert report[label]["largest_share_over_ideal"] <= 1.2, (label, report[label])
