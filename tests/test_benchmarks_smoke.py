"""The benchmark scripts run at tiny sizes and write well-formed JSON (no timing asserted)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from tests.session_cache import once_per_session

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytest.importorskip("sklearn")
pytest.importorskip("flax")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One `run.py --small` over the element-wise, memory, convergence, state-precision
    convergence and state-precision step-time modules (`--algorithms` reaches the first
    three)."""

    def run():
        out = tmp_path_factory.mktemp("bench")
        results = out / "RESULTS.md"
        env = {**__import__("os").environ, "RLX_OPTAX_BENCH_OUT": str(out / "json")}
        cmd = [sys.executable, "benchmarks/run.py", "--small", "--results", str(results)]
        cmd += ["--modules", "elementwise", "memory", "convergence", "precision_convergence"]
        cmd += ["precision_speed"]
        cmd += ["--algorithms", "adamw", "lion"]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return out / "json", results

    return once_per_session(tmp_path_factory, "benchmarks_smoke", run)


def test_elementwise_json(smoke):
    data = json.loads((smoke[0] / "elementwise.json").read_text())
    assert {"machine", "n_params", "copy_bandwidth_GBps", "results"} <= set(data)
    rows = {r["name"]: r for r in data["results"]}
    assert set(rows) == {"adamw", "lion"}
    for r in rows.values():
        assert r["ours_over_floor"] > 0 and r["ours_over_optax"] > 0
        assert r["compiled_traffic_over_floor"] >= 1.0
        assert r["max_rel_diff_vs_optax"] < 1e-3  # the optax peer is the same rule


def test_memory_json(smoke):
    data = json.loads((smoke[0] / "memory.json").read_text())
    rows = {r["name"]: r for r in data["results"]}
    assert rows["adamw"]["state_bytes_per_param"] == pytest.approx(8.0, rel=1e-3)
    assert rows["lion"]["state_bytes_per_param"] == pytest.approx(4.0, rel=1e-3)
    assert rows["adamw"]["peak_over_params"] >= 4.0


def test_convergence_json_and_plots(smoke):
    data = json.loads((smoke[0] / "convergence.json").read_text())
    assert set(data["problems"]) == {"charlm", "digits", "quadratic"}
    for name, problem in data["problems"].items():
        assert set(problem["results"]) == {"adamw", "lion"}
        for r in problem["results"].values():
            assert len(r["sweep"]) == len(problem["lr_factors"])
            assert len(r["curve_mean"]) == problem["steps"] // problem["eval_every"] + 1
        assert (smoke[0] / f"convergence_{name}.png").stat().st_size > 0


def test_results_markdown(smoke):
    text = smoke[1].read_text()
    assert text.startswith("# Benchmark results")
    assert "Machine:" in text and "jax" in text
    for title in ("Element-wise", "Memory", "Convergence"):
        assert f"## {title}" in text
    assert "| adamw |" in text and "| lion |" in text
    assert (smoke[1].parent / "plots" / "convergence_digits.png").is_file()


def test_generic_renderer_keeps_ratios_only():
    sys.path.insert(0, str(ROOT))
    from benchmarks import run

    text = run.render_generic(
        {
            "machine": {},
            "results": [{"shape": [4, 8], "ours_s": 1.0, "ours/floor": 2.0}],
            "batch": {"adamw": {"pure_ms": 3.0, "ratio_jax": 1.1}},
            "note": "noisy",
        }
    )
    assert "4x8" in text and "ours/floor" in text and "ratio_jax" in text and "noisy" in text
    assert "ours_s" not in text and "pure_ms" not in text


def test_memory_precision_section(tmp_path):
    """`memory.py --precision`'s JSON becomes its own RESULTS.md section (state bytes; the
    peak table only when the payload has the peaks)."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import memory, run

    payload = memory.run_precision(32, 2)
    (tmp_path / "memory_precision.json").write_text(json.dumps(payload))
    text = run.render(tmp_path, [], "")
    assert "## State precision: state bytes per parameter and the peak of a donated step" in text
    assert memory.precision_table(payload) in text and "Peak memory" not in text
    adamw = next(r for r in payload["results"] if r["name"] == "adamw")
    peaks = {"float32_peak": 4.0, "bf16_peak": 4.0, "q8_peak": 3.69, "q4_peak": 3.64}
    payload["results"] = [{**adamw, **peaks}]
    assert "| adamw | 4.00 | 4.00 | 3.69 | 3.64 |" in memory.precision_table(payload)


def test_model_benchmark_json_and_section(tmp_path):
    """`benchmarks/model.py --small` on two algorithms: a peer ratio, a floor ratio, the
    batched/per-leaf ratio of Muon, kernel counts, and a RESULTS.md section naming the device."""
    env = {**__import__("os").environ, "RLX_OPTAX_BENCH_OUT": str(tmp_path)}
    cmd = [sys.executable, "-m", "benchmarks.model", "--small", "--only", "adamw", "muon"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "model.json").read_text())
    assert data["device"] and data["n_leaves"] == 12
    rows = {(r["name"], r["variant"]): r for r in data["results"]}
    adamw = rows[("adamw", "weight_decay=0.01")]
    assert adamw["peer"] == "optax.adamw" and adamw["ours/peer"] > 0 and adamw["ours/floor"] > 0
    assert adamw["kernels/leaf"] > 0 and adamw["peer_kernels/leaf"] > 0
    muon = rows[("muon", "default (float32, HIGHEST)")]
    assert muon["peer"] == "optax.contrib.muon" and muon["batched/per-leaf"] > 0
    assert muon["floor_kind"] in ("memory", "matmul (highest)")
    assert data["adamw_one_flat_leaf/tree"] > 0

    sys.path.insert(0, str(ROOT))
    from benchmarks import run

    text = run.render(tmp_path, [], "plots")
    assert "## Whole model" in text and f"Device: {data['device']}" in text
    assert "| muon | default (float32, HIGHEST) |" in text


#: The configurations of the lr sweep in CI: an element-wise default, a matrix default and a
#: reference preset (every configuration trains in the contract tests; all 21: -m slow).
LR_SWEEP_CI = ["adamw", "muon", "kron_psgd/reference"]


@pytest.mark.parametrize(
    "subset", [pytest.param(True, id="ci"), pytest.param(False, id="all", marks=pytest.mark.slow)]
)
def test_lr_sweep_json_has_every_configuration(tmp_path, subset):
    """`benchmarks/lr_sweep.py --small` on the digits MLP: a row per configuration (the 15
    defaults and the presets; in CI the three of `LR_SWEEP_CI`), every (rate, seed) final
    loss, the best rate one of the grid, and the RESULTS.md table with a row per
    configuration."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import run
    from rlx_optax._src import registry

    path = tmp_path / "lr_sweep.json"
    cmd = [sys.executable, "-m", "benchmarks.lr_sweep", "--small", "--problems", "digits"]
    cmd += ["--max-rates", "3", "--json", str(path)]
    cmd += ["--only", *LR_SWEEP_CI] if subset else []
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(path.read_text())
    labels = [c.label for c in registry.configurations()]
    assert len(labels) == 21 and "kron_psgd/reference" in labels
    if subset:
        labels = [label for label in labels if label in LR_SWEEP_CI]
    results = data["problems"]["digits"]["results"]
    assert list(results) == labels
    for r in results.values():
        lrs = [s["lr"] for s in r["sweep"]]
        assert len(lrs) == 3 and lrs == sorted(lrs)
        assert r["best_lr"] in lrs and r["edge"] in ("", "+", "-")
        assert all(len(s["final_losses"]) == data["seeds"] for s in r["sweep"])
        assert r["final_loss_se"] >= 0
    text = run.render_lr_sweep(data)
    assert all(f"| {label} |" in text for label in labels)


def test_distributed_quick_muon_and_adamw(tmp_path):
    """`benchmarks/distributed.py --quick` on 8 fake devices for Muon and AdamW: every
    (configuration, mode) completes, the figures of the compiled programs are there, AdamW's
    step has no collective and matches one device, and RESULTS.md gets its section."""
    env = {**__import__("os").environ, "RLX_OPTAX_BENCH_OUT": str(tmp_path)}
    cmd = [sys.executable, "-m", "benchmarks.distributed", "--quick", "--mesh", "fsdp8"]
    cmd += ["--config", "muon", "adamw", "--timeout", "120", "--leaf-bound"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "distributed.json").read_text())
    rows = data["results"]
    assert {r["config"] for r in rows} == {"muon", "adamw"}
    for r in rows:
        assert r["outcome"] == "ok", r
        assert r["flops/ideal"] > 0 and r["state/ideal"] >= 1.0
        assert r["max rel diff"] <= 1e-4 and r["in loops"] >= 0
    for adamw in (r for r in rows if r["config"] == "adamw"):  # one row per mode
        assert adamw["colls/step"] == 0 and adamw["coll bytes/shard"] == 0
        assert adamw["state/ideal"] <= 1.2
    assert (tmp_path / "distributed.md").read_text().startswith("# Sharded training")
    # the whole-leaf bound (one-device compiles of each leaf alone): no owner assignment of
    # whole leaves does better, so the sharded program's busiest device is at or above it
    bound = data["leaf_bounds"]["muon"]
    assert set(data["leaf_bounds"]) == {"muon"} and 0 < bound["leaf bound"] <= 8
    owner = next(r for r in rows if r["config"] == "muon" and r["mode"] == "owner")
    assert owner["dot flops/ideal"] >= bound["leaf bound"] * (1 - 1e-6), (owner, bound)

    sys.path.insert(0, str(ROOT))
    from benchmarks import run

    text = run.render(tmp_path, [], "plots")
    assert "## Sharded training" in text and "| fsdp8 | adamw |" in text


def test_precision_convergence_section(smoke):
    """`run.py` runs the state-precision convergence module and renders its verdicts."""
    text = smoke[1].read_text()
    assert "## State precision: convergence" in text
    data = json.loads((smoke[0] / "precision_convergence.json").read_text())
    rows = data["problems"]["digits"]
    assert rows, "no digits results"


def _floor_step(p, m, v, g, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8):
    """One float64 NumPy step of AdamW without bias correction (the rule `xla_floor_adamw`
    times) from moments `m`, `v`: the update and the new moments."""
    m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
    return -lr * (m / (np.sqrt(v) + eps) + 1e-4 * p), m, v


@pytest.mark.parametrize(
    "switches",
    [{}, {"exact_second_max": True}, {"library_codes": True, "exact_second_max": True}],
    ids=["floor", "exact_max", "library_codes"],
)
def test_precision_speed_floor_is_the_rule_it_times(switches):
    """The 8-bit floor of `benchmarks/precision_speed.py` computes uncorrected AdamW on its
    stored moments. Against a float64 NumPy transcription, over two steps: each update is the
    transcription's step from the moments the state stands for (zero at the first step, the
    decoded codes at the second), and the moments it stores decode to the transcription's new
    moments within half a code step of their block scale (linear codes) or the library codes'
    relative spacing; a second-moment scale bounds its block, and is its maximum when exact."""
    from benchmarks import precision_speed
    from rlx_optax._src.transforms import _lowbit

    rng = np.random.default_rng(0)
    p = rng.normal(size=(16, 512)).astype(np.float32)
    tx = precision_speed.xla_floor_adamw(1e-3, **switches)
    state = tx.init({"w": p})
    blocks = lambda x: x.reshape(16, 2, 256)  # noqa: E731
    m = v = np.zeros(p.shape)  # what the stored moments stand for
    for scale_g in (1.0, 0.3):
        g = (scale_g * rng.normal(size=p.shape)).astype(np.float32)
        u, state = tx.update({"w": g}, state, {"w": p})
        want_u, want_m, want_v = _floor_step(p.astype(np.float64), m, v, g.astype(np.float64))
        # float32 rounding: relative, and at most a few ulps of the leaf's largest update
        # where `m` is a difference of larger terms
        atol = 1e-6 * np.abs(want_u).max()
        np.testing.assert_allclose(np.asarray(u["w"]), want_u, rtol=2e-5, atol=atol)
        mc, ms, vc, vs = (np.asarray(x) for x in state.moments["w"])
        assert mc.dtype == np.int8 and vc.dtype == np.uint8 and ms.shape == vs.shape == (16, 2)
        if switches.get("library_codes"):
            m_dec = np.asarray(_lowbit._decode(blocks(mc), True), np.float64) * ms[..., None]
            v_dec = np.asarray(_lowbit._decode(blocks(vc), False), np.float64) * vs[..., None]
            # the codes' coarsest relative spacing above 1/16 of the scale is 1/8 (3 bits)
            for dec, ref, scale in ((m_dec, want_m, ms), (v_dec, want_v, vs)):
                ref = blocks(ref)
                big = np.abs(ref) > scale[..., None] / 16
                np.testing.assert_allclose(dec[big], ref[big], rtol=1 / 16)
        else:
            m_dec = blocks(mc).astype(np.float64) / 127 * ms[..., None]
            v_dec = blocks(vc).astype(np.float64) / 255 * vs[..., None]
            assert np.all(np.abs(m_dec - blocks(want_m)) <= ms[..., None] / 254 * 1.0001)
            assert np.all(np.abs(v_dec - blocks(want_v)) <= vs[..., None] / 510 * 1.0001)
        assert np.all(vs >= blocks(want_v).max(-1) * (1 - 1e-6))
        if switches.get("exact_second_max"):
            np.testing.assert_allclose(vs, blocks(want_v).max(-1), rtol=1e-6)
        m, v = m_dec.reshape(p.shape), v_dec.reshape(p.shape)


def test_precision_speed_json_and_section(smoke):
    from benchmarks import precision_speed

    payload = json.loads((smoke[0] / "precision_speed.json").read_text())
    (row,) = payload["results"]
    assert row["name"] == "adamw"
    for label in ("bf16", "q8", "q4", *precision_speed.FLOORS):
        assert row[f"{label}_over_float32"] > 0, label
    text = smoke[1].read_text()
    assert "## State precision: step time against float32" in text
    assert precision_speed.table(payload) in text
