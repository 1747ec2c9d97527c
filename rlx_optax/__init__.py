"""rlx_optax: every modern optimizer family as pure `optax.GradientTransformation`s.

A JAX port of the `rlx-optim` crate: with default arguments each algorithm computes what the
crate computes; arguments switch to the authors' reference behaviour.
"""

from rlx_optax._src import registry as registry
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
from rlx_optax._src.transforms.lamb import LambState as LambState
from rlx_optax._src.transforms.lamb import lamb as lamb
from rlx_optax._src.transforms.lamb import scale_by_lamb as scale_by_lamb
from rlx_optax._src.transforms.lion import LionState as LionState
from rlx_optax._src.transforms.lion import lion as lion
from rlx_optax._src.transforms.lion import scale_by_lion as scale_by_lion
from rlx_optax._src.transforms.nadamw import NAdamWState as NAdamWState
from rlx_optax._src.transforms.nadamw import nadamw as nadamw
from rlx_optax._src.transforms.nadamw import scale_by_nadamw as scale_by_nadamw
from rlx_optax._src.transforms.qhadamw import QHAdamWState as QHAdamWState
from rlx_optax._src.transforms.qhadamw import qhadamw as qhadamw
from rlx_optax._src.transforms.qhadamw import scale_by_qhadam as scale_by_qhadam
from rlx_optax._src.transforms.radam import RAdamState as RAdamState
from rlx_optax._src.transforms.radam import radam as radam
from rlx_optax._src.transforms.radam import scale_by_radam as scale_by_radam
from rlx_optax._src.transforms.sgd import SgdState as SgdState
from rlx_optax._src.transforms.sgd import scale_by_sgd as scale_by_sgd
from rlx_optax._src.transforms.sgd import sgd as sgd

__version__ = "0.1.0"

__all__ = [
    "AdamState",
    "ClipByGlobalNormState",
    "LambState",
    "LionState",
    "NAdamWState",
    "QHAdamWState",
    "RAdamState",
    "SgdState",
    "adam",
    "adamw",
    "clip_by_global_norm_logged",
    "clip_grad_norm",
    "global_grad_clip_scale",
    "l2_norm",
    "lamb",
    "lion",
    "nadamw",
    "qhadamw",
    "radam",
    "registry",
    "scale_by_adam",
    "scale_by_lamb",
    "scale_by_lion",
    "scale_by_nadamw",
    "scale_by_qhadam",
    "scale_by_radam",
    "scale_by_sgd",
    "sgd",
]
