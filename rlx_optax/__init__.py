"""rlx_optax: every modern optimizer family as pure `optax.GradientTransformation`s.

A JAX port of the `rlx-optim` crate: with default arguments each algorithm computes what the
crate computes; arguments switch to the authors' reference behaviour.
"""

from rlx_optax._src import registry as registry
from rlx_optax._src import stateful as _stateful
from rlx_optax._src.linalg.newton_schulz import newton_schulz as newton_schulz
from rlx_optax._src.schedules import CosineAnnealingLR as CosineAnnealingLR
from rlx_optax._src.schedules import EpochScheduler as EpochScheduler
from rlx_optax._src.schedules import StepLR as StepLR
from rlx_optax._src.schedules import set_learning_rate as set_learning_rate
from rlx_optax._src.sharding import state_shardings as state_shardings
from rlx_optax._src.stateful import Optimizer as Optimizer
from rlx_optax._src.transforms._lowbit import QuantizedArray as QuantizedArray
from rlx_optax._src.transforms._lowbit import (
    QuantizedArrayUnsigned4 as QuantizedArrayUnsigned4,
)
from rlx_optax._src.transforms._lowbit import apply_updates_stochastic as apply_updates_stochastic
from rlx_optax._src.transforms._lowbit import dequantize_blockwise as dequantize_blockwise
from rlx_optax._src.transforms._lowbit import quantize_blockwise as quantize_blockwise
from rlx_optax._src.transforms._lowbit import stochastic_round as stochastic_round
from rlx_optax._src.transforms._owner import owner_compute as owner_compute
from rlx_optax._src.transforms._resident import OwnerPlacedState as OwnerPlacedState
from rlx_optax._src.transforms.adafactor import AdafactorState as AdafactorState
from rlx_optax._src.transforms.adafactor import adafactor as adafactor
from rlx_optax._src.transforms.adafactor import scale_by_adafactor as scale_by_adafactor
from rlx_optax._src.transforms.adafactor import (
    scale_by_adafactor_step_size as scale_by_adafactor_step_size,
)
from rlx_optax._src.transforms.adam import AdamState as AdamState
from rlx_optax._src.transforms.adam import adam as adam
from rlx_optax._src.transforms.adam import adamw as adamw
from rlx_optax._src.transforms.adam import scale_by_adam as scale_by_adam
from rlx_optax._src.transforms.clipping import ClipByGlobalNormState as ClipByGlobalNormState
from rlx_optax._src.transforms.clipping import (
    clip_by_global_norm_logged as clip_by_global_norm_logged,
)
from rlx_optax._src.transforms.clipping import clip_grad_norm as clip_grad_norm
from rlx_optax._src.transforms.clipping import global_grad_clip_scale as global_grad_clip_scale
from rlx_optax._src.transforms.clipping import l2_norm as l2_norm
from rlx_optax._src.transforms.hessian import constant_hessian_diag as constant_hessian_diag
from rlx_optax._src.transforms.hessian import (
    gauss_newton_bartlett_diag as gauss_newton_bartlett_diag,
)
from rlx_optax._src.transforms.hessian import hutchinson_diag as hutchinson_diag
from rlx_optax._src.transforms.kron_psgd import KronPsgdState as KronPsgdState
from rlx_optax._src.transforms.kron_psgd import kron_psgd as kron_psgd
from rlx_optax._src.transforms.kron_psgd import scale_by_kron_psgd as scale_by_kron_psgd
from rlx_optax._src.transforms.labels import MatrixAxes as MatrixAxes
from rlx_optax._src.transforms.labels import MuonLabels as MuonLabels
from rlx_optax._src.transforms.lamb import LambState as LambState
from rlx_optax._src.transforms.lamb import lamb as lamb
from rlx_optax._src.transforms.lamb import scale_by_lamb as scale_by_lamb
from rlx_optax._src.transforms.lion import LionState as LionState
from rlx_optax._src.transforms.lion import lion as lion
from rlx_optax._src.transforms.lion import scale_by_lion as scale_by_lion
from rlx_optax._src.transforms.mars import MarsState as MarsState
from rlx_optax._src.transforms.mars import mars as mars
from rlx_optax._src.transforms.mars import scale_by_mars as scale_by_mars
from rlx_optax._src.transforms.muon import MuonState as MuonState
from rlx_optax._src.transforms.muon import muon as muon
from rlx_optax._src.transforms.muon import scale_by_muon as scale_by_muon
from rlx_optax._src.transforms.nadamw import NAdamWState as NAdamWState
from rlx_optax._src.transforms.nadamw import nadamw as nadamw
from rlx_optax._src.transforms.nadamw import scale_by_nadamw as scale_by_nadamw
from rlx_optax._src.transforms.qhadamw import QHAdamWState as QHAdamWState
from rlx_optax._src.transforms.qhadamw import qhadamw as qhadamw
from rlx_optax._src.transforms.qhadamw import scale_by_qhadam as scale_by_qhadam
from rlx_optax._src.transforms.qhadamw import scale_by_qhadamw as scale_by_qhadamw
from rlx_optax._src.transforms.radam import RAdamState as RAdamState
from rlx_optax._src.transforms.radam import radam as radam
from rlx_optax._src.transforms.radam import scale_by_radam as scale_by_radam
from rlx_optax._src.transforms.sgd import SgdState as SgdState
from rlx_optax._src.transforms.sgd import scale_by_sgd as scale_by_sgd
from rlx_optax._src.transforms.sgd import sgd as sgd
from rlx_optax._src.transforms.soap import SoapState as SoapState
from rlx_optax._src.transforms.soap import scale_by_soap as scale_by_soap
from rlx_optax._src.transforms.soap import soap as soap
from rlx_optax._src.transforms.sophia import SophiaState as SophiaState
from rlx_optax._src.transforms.sophia import scale_by_sophia as scale_by_sophia
from rlx_optax._src.transforms.sophia import sophia as sophia
from rlx_optax._src.transforms.sophia import sophia_update_hessian as sophia_update_hessian
from rlx_optax._src.transforms.stiefel import StiefelState as StiefelState
from rlx_optax._src.transforms.stiefel import retract_stiefel as retract_stiefel
from rlx_optax._src.transforms.stiefel import scale_by_stiefel as scale_by_stiefel
from rlx_optax._src.transforms.stiefel import stiefel as stiefel

__version__ = "0.1.0"

# Names whose modules need an optional extra (flax: `rlx_optax[flax]`, grain and array-record:
# `rlx_optax[data]`) are imported on first use, so `import rlx_optax` works without them. They
# are in __all__ when their extra is installed (so `from rlx_optax import *` never fails).
_LAZY = {
    "Trainer": ("rlx_optax._src.trainer", "flax"),
    "UpdateContext": ("rlx_optax._src.trainer", "flax"),
    "DataLoader": ("rlx_optax._src.data", "data"),
    "RecordWriter": ("rlx_optax._src.data", "data"),
    "RecordDataset": ("rlx_optax._src.data", "data"),
    "RecordFileError": ("rlx_optax._src.data", "data"),
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'rlx_optax' has no attribute {name!r}")
    import importlib

    module, extra = _LAZY[name]
    try:
        return getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as err:
        raise ImportError(
            f"rlx_optax.{name} needs the optional extra: pip install 'rlx_optax[{extra}]' ({err})"
        ) from err


def __dir__():
    return sorted([*globals(), *_LAZY])


__all__ = [
    "AdafactorState",
    "AdamState",
    "ClipByGlobalNormState",
    "CosineAnnealingLR",
    "EpochScheduler",
    "KronPsgdState",
    "LambState",
    "LionState",
    "MarsState",
    "MatrixAxes",
    "MuonLabels",
    "MuonState",
    "NAdamWState",
    "OwnerPlacedState",
    "QHAdamWState",
    "RAdamState",
    "QuantizedArray",
    "QuantizedArrayUnsigned4",
    "SgdState",
    "SoapState",
    "SophiaState",
    "StepLR",
    "StiefelState",
    "adafactor",
    "adam",
    "adamw",
    "apply_updates_stochastic",
    "state_shardings",
    "owner_compute",
    "clip_by_global_norm_logged",
    "clip_grad_norm",
    "constant_hessian_diag",
    "dequantize_blockwise",
    "gauss_newton_bartlett_diag",
    "global_grad_clip_scale",
    "hutchinson_diag",
    "l2_norm",
    "kron_psgd",
    "lamb",
    "lion",
    "mars",
    "muon",
    "nadamw",
    "newton_schulz",
    "qhadamw",
    "quantize_blockwise",
    "radam",
    "registry",
    "retract_stiefel",
    "scale_by_adafactor",
    "scale_by_adafactor_step_size",
    "scale_by_adam",
    "scale_by_kron_psgd",
    "scale_by_lamb",
    "scale_by_lion",
    "scale_by_mars",
    "scale_by_muon",
    "scale_by_nadamw",
    "scale_by_qhadam",
    "scale_by_qhadamw",
    "scale_by_radam",
    "scale_by_sgd",
    "scale_by_soap",
    "scale_by_sophia",
    "scale_by_stiefel",
    "set_learning_rate",
    "sgd",
    "soap",
    "sophia",
    "sophia_update_hessian",
    "stiefel",
    "stochastic_round",
]

# The crate-style classes (Sgd, AdamW, Muon, ...): one per registered algorithm, generated.
globals().update(_stateful.CLASSES)
__all__ += ["Optimizer", *_stateful.CLASSES]


def _installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


_EXTRA_MODULES = {"flax": ("flax",), "data": ()}  # data.py imports grain lazily
__all__ += [
    name for name, (_, extra) in _LAZY.items() if all(_installed(m) for m in _EXTRA_MODULES[extra])
]
