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
