"""The public namespace: `__all__` lists every public name, star-import never needs extras,
and renamed functions keep their old name as a deprecated alias."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

import rlx_optax

_EXTRAS = ("Trainer", "UpdateContext", "DataLoader", "RecordWriter", "RecordDataset")


def test_all_lists_the_trainer_and_data_names_and_every_name_resolves():
    for name in (*_EXTRAS, "RecordFileError", "Optimizer", "scale_by_qhadamw"):
        assert name in rlx_optax.__all__, name
    for name in rlx_optax.__all__:
        assert getattr(rlx_optax, name) is not None, name
    assert len(set(rlx_optax.__all__)) == len(rlx_optax.__all__)


def test_star_import_without_flax_leaves_the_trainer_out():
    code = textwrap.dedent(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "flax" or name.startswith("flax."):
                    raise ModuleNotFoundError(name)
        sys.meta_path.insert(0, Block())
        import rlx_optax
        ns = {}
        exec("from rlx_optax import *", ns)
        assert "Trainer" not in rlx_optax.__all__ and "DataLoader" in ns
        try:
            rlx_optax.Trainer
        except ImportError as e:
            assert "rlx_optax[flax]" in str(e)
        else:
            raise AssertionError("Trainer imported without flax")
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_scale_by_qhadam_is_a_deprecated_alias_of_scale_by_qhadamw():
    g = {"w": jnp.array([0.5, -1.0, 2.0])}
    new = rlx_optax.scale_by_qhadamw(nu1=0.5)
    with pytest.warns(DeprecationWarning, match="scale_by_qhadamw"):
        old = rlx_optax.scale_by_qhadam(nu1=0.5)
    a, _ = new.update(g, new.init(g))
    b, _ = old.update(g, old.init(g))
    np.testing.assert_array_equal(a["w"], b["w"])
