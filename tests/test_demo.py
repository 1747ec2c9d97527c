"""`make demo` code path on a tiny model: it trains, prints the table and writes its files."""

from __future__ import annotations

import json
import pathlib
import sys

import pytest

pytest.importorskip("flax")
pytest.importorskip("matplotlib")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))

import charlm  # noqa: E402
import demo  # noqa: E402

from rlx_optax._src import registry  # noqa: E402

TINY = ["--steps", "3", "--eval-every", "2", "--batch-size", "2", "--eval-batches", "1"]
TINY += ["--context", "16", "--width", "16", "--layers", "1", "--no-progress"]


def test_defaults_are_registered():
    assert set(demo.DEFAULT_OPTIMIZERS) <= set(registry.names())


def test_corpus_is_the_fixed_stdlib_list():
    data = charlm.load_corpus()
    train, val = charlm.split(data)
    assert data.dtype.name == "uint8" and len(data) > 100_000
    assert len(val) == len(data) - len(train) and 0.09 < len(val) / len(data) < 0.11
    assert (charlm.load_corpus() == data).all()  # deterministic


def test_tiny_run_writes_table_and_plot(tmp_path, capsys):
    results = demo.main(["--optimizers", "adamw", "lion", "--out", str(tmp_path), *TINY])
    assert [r["name"] for r in results] == ["adamw", "lion"]
    for r in results:
        assert [s for s, _ in r["curve"]] == [0, 2, 3]
        assert r["state_bytes"] > 0 and r["ms_per_step"] > 0
    out = capsys.readouterr().out
    assert "| adamw |" in out and "| lion |" in out and "steps to" in out
    assert (tmp_path / "val_loss.png").stat().st_size > 0
    assert json.loads((tmp_path / "results.json").read_text())[0]["name"] == "adamw"


def test_lr_override():
    assert demo.parse_args(["--lr", "sgd=0.5"]).lr == {"sgd": 0.5}
    assert demo.train_lr(registry.get("adamw")) > 0


@pytest.mark.parametrize(
    "argv", [["--optimizers", "adamw", "nope"], ["--lr", "nope=1"], ["--lr", "adamw"]]
)
def test_unknown_names_fail_clearly(argv, capsys):
    with pytest.raises(SystemExit):
        demo.parse_args(argv)
    err = capsys.readouterr().err
    assert "nope" in err or "NAME=VALUE" in err
