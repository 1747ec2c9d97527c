"""The state-size targets of 8-bit and bfloat16 moments, counted from the state pytree of the
model benchmark's transformer tree (shapes only: nothing is allocated)."""

from __future__ import annotations

import pytest

from benchmarks import memory


@pytest.fixture(scope="module")
def table():
    payload = memory.run_precision(256, 4)
    return {r["name"]: r for r in payload["results"]}


def test_adamw_state_bytes_per_parameter(table):
    adamw = table["adamw"]
    assert 8.0 < adamw["float32"] < 8.0001  # two float32 moments and the int32 step count
    assert adamw["bf16"] <= 4.1
    assert adamw["q8"] <= 2.2


def test_every_family_is_listed_with_what_it_supports(table):
    assert set(table) >= {"sgd", "adam", "lamb", "lion", "sophia", "muon", "soap", "adafactor"}
    for name in ("adam", "nadamw", "radam", "qhadamw", "lamb"):
        assert table[name]["q8"] < table[name]["bf16"] < table[name]["float32"]
    for name in ("sgd", "lion", "muon"):  # one buffer: 1 byte plus a float32 scale per 256
        assert table[name]["q8"] < 1.05
    # SOAP: the moments shrink (8 -> 4 -> about 2 bytes); the statistics and bases (about 30
    # bytes/param here) stay float32
    assert table["soap"]["bf16"] == pytest.approx(table["soap"]["float32"] - 4.0, abs=1e-3)
    assert table["soap"]["q8"] == pytest.approx(table["soap"]["float32"] - 6.0, abs=0.05)
    # Kron: the momentum shrinks to ~1 byte, the factors stay float32
    assert table["kron_psgd"]["q8"] == pytest.approx(table["kron_psgd"]["float32"] - 3, abs=0.05)


def test_peak_of_a_donated_step():
    """`memory.measure` on the same tree, AdamW: in float32 the donated step holds exactly the
    parameters, the gradients and the two moments (4 parameter sizes, every output written in
    place, no temporary); with 8-bit moments it holds at least those at their sizes (2.51) and
    stays below float32, and 4-bit below 8-bit. The bfloat16 peak is not bounded here: on a CPU
    XLA copies the stored moments (docs/guides/state_precision.md)."""
    import jax
    import jax.numpy as jnp

    from benchmarks import model
    from rlx_optax._src import registry

    shapes = model.model_shapes(256, 4)
    params = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}
    n = sum(p.size for p in params.values())
    adamw = registry.get("adamw").factory
    peak, state = {}, {}
    for label, kw in [("float32", {})] + [(q, memory._TWO_MOMENTS[q]) for q in ("q8", "q4")]:
        tx = adamw(1e-3, **kw)
        peak[label] = memory.measure(tx, params, params, {})["peak_over_params"]
        state[label] = memory.state_bytes(tx, params) / n / 4  # in parameter sizes
    assert peak["float32"] == pytest.approx(4.0, abs=1e-4)
    for label in ("q8", "q4"):
        assert peak[label] >= 2 + state[label] - 1e-4, label
    assert peak["q4"] < peak["q8"] < peak["float32"]
