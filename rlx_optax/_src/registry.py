"""The one table of algorithms.

Every other part of the project that needs "all the optimizers" reads `ALGORITHMS`: the
contract tests, the golden parity tests, the stateful classes, the benchmarks and the demo.
Adding an algorithm is adding one row here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import optax

from rlx_optax._src.transforms import adafactor as _adafactor
from rlx_optax._src.transforms import adam as _adam
from rlx_optax._src.transforms import hessian as _hessian
from rlx_optax._src.transforms import kron_psgd as _kron_psgd
from rlx_optax._src.transforms import lamb as _lamb
from rlx_optax._src.transforms import lion as _lion
from rlx_optax._src.transforms import mars as _mars
from rlx_optax._src.transforms import muon as _muon
from rlx_optax._src.transforms import nadamw as _nadamw
from rlx_optax._src.transforms import qhadamw as _qhadamw
from rlx_optax._src.transforms import radam as _radam
from rlx_optax._src.transforms import sgd as _sgd
from rlx_optax._src.transforms import soap as _soap
from rlx_optax._src.transforms import sophia as _sophia
from rlx_optax._src.transforms import stiefel as _stiefel


def _frozen(d: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(d))


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """One row of the table.

    Attributes:
      name: the pure factory's name (`rlx_optax.<name>`).
      factory: the pure factory, ``factory(learning_rate, ...)``.
      stateful: the name of the seed-API class (the crate's struct name).
      crate_name: the crate struct's lower-case name (the `optimizer` of the golden files).
      crate_fields: the crate's public field names mapped to the factory's argument names.
      crate_defaults: the crate's defaults, by crate field name (the factory defaults agree).
      matrix: True when rank-2 leaves take a matrix path.
      contract_lr: a learning rate at which the contract problems converge.
      contract_kwargs: factory arguments the contract tests add (crate names are not used).
      update_extra: optional ``fn(params, grads) -> dict`` of extra `update` arguments the
        algorithm needs in the contract tests (for example a Hessian estimate).
      needs_params: `update` must be given `params`.
      golden_tol: tolerance of the golden parity tests (relative to the displacement).
      train_lr: a learning rate that trains small networks from scratch (the demo's rate and
        the centre of the benchmarks' sweeps; measured on the char-level transformer of
        `examples/charlm.py` by `benchmarks/lr_sweep.py`: the smallest rate of its grid within
        one standard error of the best). None: a tenth of `contract_lr`.
    """

    name: str
    factory: Callable[..., optax.GradientTransformationExtraArgs]
    stateful: str
    crate_name: str
    crate_fields: Mapping[str, str]
    crate_defaults: Mapping[str, Any]
    matrix: bool = False
    contract_lr: float = 0.05
    contract_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    update_extra: Callable[[Any, Any], dict[str, Any]] | None = None
    needs_params: bool = True
    golden_tol: float = 1e-5
    crate_counter: bool = False
    crate_builders: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    crate_inert_fields: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    lr_optional: bool = False
    first_sight_fields: tuple[str, ...] = ()
    stateful_methods: tuple[str, ...] = ()
    train_lr: float | None = None

    def factory_kwargs(self, **crate_hparams: Any) -> dict[str, Any]:
        """Translate crate field names (as in the golden manifest) to factory arguments."""
        out = {}
        for field, value in crate_hparams.items():
            if field not in self.crate_fields:
                raise ValueError(
                    f"{self.stateful} has no field {field!r}; fields: {sorted(self.crate_fields)}"
                )
            out[self.crate_fields[field]] = value
        return out

    def from_crate(self, **crate_hparams: Any) -> optax.GradientTransformationExtraArgs:
        """The pure transform from crate field names: ``from_crate(lr=0.01, beta1=0.8)``."""
        return self.factory(**self.factory_kwargs(**crate_hparams))


_ADAM_FIELDS = {
    "lr": "learning_rate",
    "beta1": "b1",
    "beta2": "b2",
    "eps": "eps",
    "weight_decay": "weight_decay",
}
_ADAM_DEFAULTS = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8}


_BETAS_WD = _frozen({"with_betas": ("beta1", "beta2"), "with_weight_decay": ("weight_decay",)})


ALGORITHMS: tuple[Algorithm, ...] = (
    Algorithm(
        name="sgd",
        train_lr=0.3,
        factory=_sgd.sgd,
        stateful="Sgd",
        crate_builders=_frozen(
            {"with_momentum": ("momentum", "nesterov"), "with_weight_decay": ("weight_decay",)}
        ),
        crate_name="sgd",
        crate_fields=_frozen(
            {
                "lr": "learning_rate",
                "momentum": "momentum",
                "nesterov": "nesterov",
                "weight_decay": "weight_decay",
            }
        ),
        crate_defaults=_frozen({"momentum": 0.0, "nesterov": False, "weight_decay": 0.0}),
        contract_lr=0.2,
        contract_kwargs=_frozen({"momentum": 0.5}),
        needs_params=False,
    ),
    Algorithm(
        name="adam",
        train_lr=0.003,
        factory=_adam.adam,
        stateful="Adam",
        crate_counter=True,
        crate_builders=_frozen({**_BETAS_WD, "with_eps": ("eps",), "with_f32_math": ("f32_math",)}),
        crate_inert_fields=_frozen({"f32_math": False}),
        crate_name="adam",
        crate_fields=_frozen(_ADAM_FIELDS),
        crate_defaults=_frozen({**_ADAM_DEFAULTS, "weight_decay": 0.0}),
        needs_params=False,
    ),
    Algorithm(
        name="adamw",
        train_lr=0.003,
        factory=_adam.adamw,
        stateful="AdamW",
        crate_counter=True,
        crate_builders=_frozen({**_BETAS_WD, "with_eps": ("eps",), "with_f32_math": ("f32_math",)}),
        crate_inert_fields=_frozen({"f32_math": False}),
        crate_name="adamw",
        crate_fields=_frozen(_ADAM_FIELDS),
        crate_defaults=_frozen({**_ADAM_DEFAULTS, "weight_decay": 0.01}),
    ),
    Algorithm(
        name="nadamw",
        train_lr=0.003,
        factory=_nadamw.nadamw,
        stateful="NAdamW",
        crate_counter=True,
        crate_builders=_BETAS_WD,
        crate_name="nadamw",
        crate_fields=_frozen(_ADAM_FIELDS),
        crate_defaults=_frozen({**_ADAM_DEFAULTS, "weight_decay": 0.01}),
    ),
    Algorithm(
        name="radam",
        train_lr=0.027,
        factory=_radam.radam,
        stateful="RAdam",
        crate_counter=True,
        crate_builders=_BETAS_WD,
        crate_name="radam",
        crate_fields=_frozen(_ADAM_FIELDS),
        crate_defaults=_frozen({**_ADAM_DEFAULTS, "weight_decay": 0.0}),
        needs_params=False,
    ),
    Algorithm(
        name="qhadamw",
        train_lr=0.003,
        factory=_qhadamw.qhadamw,
        stateful="QHAdamW",
        crate_counter=True,
        crate_builders=_frozen({**_BETAS_WD, "with_nus": ("nu1", "nu2")}),
        crate_name="qhadamw",
        crate_fields=_frozen({**_ADAM_FIELDS, "nu1": "nu1", "nu2": "nu2"}),
        crate_defaults=_frozen(
            {
                "beta1": 0.995,
                "beta2": 0.999,
                "eps": 1e-8,
                "weight_decay": 0.01,
                "nu1": 0.7,
                "nu2": 1.0,
            }
        ),
    ),
    Algorithm(
        name="lamb",
        train_lr=0.0033,
        factory=_lamb.lamb,
        stateful="Lamb",
        crate_counter=True,
        crate_builders=_BETAS_WD,
        crate_name="lamb",
        crate_fields=_frozen({**_ADAM_FIELDS, "bias_correction": "bias_correction"}),
        crate_defaults=_frozen(
            {
                "beta1": 0.9,
                "beta2": 0.999,
                "eps": 1e-6,
                "weight_decay": 0.01,
                "bias_correction": True,
            }
        ),
        contract_lr=0.02,
    ),
    Algorithm(
        name="lion",
        train_lr=0.001,
        factory=_lion.lion,
        stateful="Lion",
        crate_builders=_BETAS_WD,
        crate_name="lion",
        crate_fields=_frozen(
            {"lr": "learning_rate", "beta1": "b1", "beta2": "b2", "weight_decay": "weight_decay"}
        ),
        crate_defaults=_frozen({"beta1": 0.9, "beta2": 0.99, "weight_decay": 0.0}),
        contract_lr=0.03,
    ),
    Algorithm(
        name="sophia",
        factory=_sophia.sophia,
        stateful="Sophia",
        crate_counter=True,
        crate_builders=_BETAS_WD,
        stateful_methods=("update_hessian",),
        crate_name="sophia",
        crate_fields=_frozen(
            {
                "lr": "learning_rate",
                "beta1": "b1",
                "beta2": "b2",
                "gamma": "gamma",
                "rho": "rho",
                "eps": "eps",
                "weight_decay": "weight_decay",
            }
        ),
        crate_defaults=_frozen(
            {
                "beta1": 0.965,
                "beta2": 0.99,
                "gamma": 0.01,
                "rho": 0.04,
                "eps": 1e-12,
                "weight_decay": 0.1,
            }
        ),
        contract_lr=0.1,
        contract_kwargs=_frozen({"gamma": 0.1, "rho": 1.0, "weight_decay": 0.0}),
        update_extra=lambda params, grads: {"hessian_diag": _hessian.constant_hessian_diag(params)},
    ),
    Algorithm(
        name="muon",
        train_lr=0.003,
        factory=_muon.muon,
        stateful="Muon",
        crate_builders=_frozen(
            {
                "with_momentum": ("momentum",),
                "with_weight_decay": ("weight_decay",),
                "with_ns_steps": ("ns_steps",),
            }
        ),
        crate_name="muon",
        crate_fields=_frozen(
            {
                "lr": "learning_rate",
                "momentum": "momentum",
                "nesterov": "nesterov",
                "weight_decay": "weight_decay",
                "ns_steps": "ns_steps",
                "ns_coeffs": "ns_coeffs",
            }
        ),
        crate_defaults=_frozen(
            {
                "momentum": 0.95,
                "nesterov": True,
                "weight_decay": 0.0,
                "ns_steps": 5,
                "ns_coeffs": (3.4445, -4.7750, 2.0315),
            }
        ),
        matrix=True,
        contract_lr=0.02,
        needs_params=False,
        golden_tol=1e-4,
    ),
    Algorithm(
        name="soap",
        train_lr=0.01,
        factory=_soap.soap,
        stateful="Soap",
        crate_counter=True,
        first_sight_fields=("bases",),
        crate_builders=_frozen({"with_weight_decay": ("weight_decay",)}),
        crate_name="soap",
        crate_fields=_frozen(
            {
                "lr": "learning_rate",
                "beta1": "b1",
                "beta2": "b2",
                "shampoo_beta": "shampoo_beta",
                "eps": "eps",
                "weight_decay": "weight_decay",
                "precond_freq": "precond_freq",
                "jacobi_sweeps": "jacobi_sweeps",
            }
        ),
        crate_defaults=_frozen(
            {
                "beta1": 0.95,
                "beta2": 0.95,
                "shampoo_beta": 0.95,
                "eps": 1e-8,
                "weight_decay": 0.01,
                "precond_freq": 10,
                "jacobi_sweeps": 30,
            }
        ),
        matrix=True,
        contract_lr=0.05,
        # SOAP's basis inside a degenerate eigenspace is arbitrary (any eigensolver): the
        # contract's (8, 6) leaf has a rank-deficient 8x8 left statistic, so two roundings of
        # one computation (chain, MultiSteps) pick different bases there, and the crate's first
        # step turns the rounding noise of a diagonal rotated gradient into +-1 entries. The
        # contract rotates only the full-rank right side (see tests/test_soap.py).
        contract_kwargs=_frozen({"max_precond_dim": 6}),
        golden_tol=1e-4,
    ),
    Algorithm(
        name="adafactor",
        train_lr=0.0017,
        factory=_adafactor.adafactor,
        stateful="Adafactor",
        crate_counter=True,
        lr_optional=True,
        crate_builders=_frozen({"with_lr": ("lr",), "with_weight_decay": ("weight_decay",)}),
        crate_name="adafactor",
        crate_fields=_frozen(
            {
                "lr": "learning_rate",
                "beta2_decay": "beta2_decay",
                "eps1": "eps",
                "eps2": "eps_scale",
                "clip_threshold": "clipping_threshold",
                "weight_decay": "weight_decay",
            }
        ),
        crate_defaults=_frozen(
            {
                "lr": None,
                "beta2_decay": -0.8,
                "eps1": 1e-30,
                "eps2": 1e-3,
                "clip_threshold": 1.0,
                "weight_decay": 0.0,
            }
        ),
        contract_lr=0.05,
    ),
    Algorithm(
        name="mars",
        train_lr=0.005,
        factory=_mars.mars,
        stateful="Mars",
        crate_counter=True,
        crate_builders=_BETAS_WD,
        crate_name="mars",
        crate_fields=_frozen(
            {
                "lr": "learning_rate",
                "beta1": "b1",
                "beta2": "b2",
                "eps": "eps",
                "weight_decay": "weight_decay",
                "gamma": "gamma",
                "clip_c": "clip_c",
            }
        ),
        crate_defaults=_frozen(
            {
                "beta1": 0.95,
                "beta2": 0.99,
                "eps": 1e-8,
                "weight_decay": 0.0,
                "gamma": 0.025,
                "clip_c": True,
            }
        ),
        needs_params=False,
    ),
    Algorithm(
        name="stiefel",
        train_lr=0.81,
        factory=_stiefel.stiefel,
        stateful="Stiefel",
        crate_builders=_frozen({"with_momentum": ("momentum",)}),
        crate_name="stiefel",
        crate_fields=_frozen({"lr": "learning_rate", "momentum": "momentum"}),
        crate_defaults=_frozen({"momentum": 0.0}),
        matrix=True,
        contract_lr=0.1,
        golden_tol=1e-4,
    ),
    Algorithm(
        name="kron_psgd",
        train_lr=0.09,
        factory=_kron_psgd.kron_psgd,
        stateful="KronPsgd",
        crate_builders=_frozen(
            {"with_momentum": ("momentum",), "with_weight_decay": ("weight_decay",)}
        ),
        crate_name="kronpsgd",
        crate_fields=_frozen(
            {
                "lr": "learning_rate",
                "precond_lr": "precond_lr",
                "momentum": "momentum",
                "weight_decay": "weight_decay",
                "eps": "eps",
                "clip": "clip",
            }
        ),
        crate_defaults=_frozen(
            {"precond_lr": 0.1, "momentum": 0.9, "weight_decay": 0.0, "eps": 1e-8, "clip": 1.0}
        ),
        matrix=True,
        contract_lr=0.05,
        needs_params=False,
        golden_tol=1e-4,
    ),
)

_BY_NAME = {a.name: a for a in ALGORITHMS}
_BY_CRATE = {a.crate_name: a for a in ALGORITHMS}


@dataclasses.dataclass(frozen=True)
class Configuration:
    """One way users run an algorithm: its defaults, or a preset.

    Attributes:
      label: ``"<name>"`` for the defaults, ``"<name>/<preset>"`` for a preset.
      algorithm: the row's factory name.
      kwargs: factory arguments besides the learning rate.
      train_lr: the preset's own `Algorithm.train_lr` when its rate differs from the
        defaults' (measured the same way, by `benchmarks/lr_sweep.py`); None: the row's.
    """

    label: str
    algorithm: str
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    train_lr: float | None = None

    @property
    def row(self) -> Algorithm:
        return get(self.algorithm)

    def make(self, learning_rate: Any, **kwargs: Any) -> optax.GradientTransformationExtraArgs:
        """The transform at `learning_rate` (further arguments override the preset's)."""
        return self.row.factory(learning_rate, **{**self.kwargs, **kwargs})


#: The presets that switch a family to its authors' reference behaviour (or to the variant
#: users run), each a configuration of its own in the tests and benchmarks.
PRESETS: tuple[Configuration, ...] = (
    Configuration("radam/reference", "radam", _frozen({"behaviour": "reference"})),
    Configuration(
        "adafactor/reference", "adafactor", _frozen({"behaviour": "reference"}), train_lr=0.015
    ),
    Configuration("muon/reference", "muon", _frozen({"behaviour": "reference"}), train_lr=0.02),
    Configuration("mars/shampoo", "mars", _frozen({"variant": "shampoo"}), train_lr=0.015),
    Configuration("soap/reference", "soap", _frozen({"behaviour": "reference"})),
    Configuration(
        "kron_psgd/reference", "kron_psgd", _frozen({"behaviour": "reference"}), train_lr=0.003
    ),
)


def configurations() -> tuple[Configuration, ...]:
    """Every algorithm with its defaults, then every preset (21 in all)."""
    return tuple(Configuration(a.name, a.name) for a in ALGORITHMS) + PRESETS


def get(name: str) -> Algorithm:
    """The row for a factory name (``"adamw"``) or a crate struct name (``"kronpsgd"``)."""
    row = _BY_NAME.get(name) or _BY_CRATE.get(name)
    if row is None:
        raise ValueError(f"unknown algorithm {name!r}; known: {sorted(_BY_NAME)}")
    return row


def names() -> tuple[str, ...]:
    """Factory names of every registered algorithm, in table order."""
    return tuple(a.name for a in ALGORITHMS)
