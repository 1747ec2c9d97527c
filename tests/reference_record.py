"""Record float64 reference trajectories from torch.optim and pytorch-optimizer (run by hand).

Not collected by pytest and not run in CI (it needs torch). In an environment with
``torch==2.13.0`` and ``pytorch-optimizer==4.1.0``::

    python tests/reference_record.py            # every case
    python tests/reference_record.py radam_po   # some cases

writes ``tests/reference_data/<case>.npz``: the parameters after the steps in
`reference_problem.CHECKPOINTS` and after the last step, with the reference's name, its
arguments and the library versions in ``meta`` (a JSON string). ``tests/test_reference.py``
replays each case through rlx_optax's reference preset in float64 and compares.

Closed loop: at every step the reference gets the NumPy gradient of its own current
parameters (`reference_problem.gradient`), in float64.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference_problem as rp  # noqa: E402

torch.set_default_dtype(torch.float64)  # float64 step counters and scalars in torch.optim


def _po(name):
    import pytorch_optimizer

    return getattr(pytorch_optimizer, name)


@contextlib.contextmanager
def _float64_newton_schulz():
    """Run the references' Newton-Schulz in float64 instead of their hard-coded bfloat16.

    torch.optim.Muon casts with ``Tensor.bfloat16()`` and pytorch-optimizer passes
    ``dtype=torch.bfloat16``; only that cast changes, every other operation is theirs.
    """
    import pytorch_optimizer.optimizer.muon.base as po_muon_base
    from pytorch_optimizer.optimizer.utils import matrix as po_matrix

    original_ns = po_muon_base.zero_power_via_newton_schulz_5
    original_bf16 = torch.Tensor.bfloat16

    def ns64(*args, **kwargs):
        kwargs["dtype"] = torch.float64
        return po_matrix.zero_power_via_newton_schulz_5(*args, **kwargs)

    po_muon_base.zero_power_via_newton_schulz_5 = ns64
    torch.Tensor.bfloat16 = lambda self: self.clone()
    try:
        yield
    finally:
        po_muon_base.zero_power_via_newton_schulz_5 = original_ns
        torch.Tensor.bfloat16 = original_bf16


@contextlib.contextmanager
def _no_root_eps():
    """pytorch-optimizer's MARS adds 1e-15 under the square root of v (its `apply_ams_bound`
    default), which neither the authors' MARS nor rlx_optax has; the recording sets it to 0."""
    from pytorch_optimizer.base.optimizer import BaseOptimizer

    original = BaseOptimizer.apply_ams_bound

    def patched(ams_bound, exp_avg_sq, max_exp_avg_sq, eps, exp_avg_sq_eps=1e-15):
        return original(ams_bound, exp_avg_sq, max_exp_avg_sq, eps, 0.0)

    BaseOptimizer.apply_ams_bound = staticmethod(patched)
    try:
        yield
    finally:
        BaseOptimizer.apply_ams_bound = staticmethod(original)


@contextlib.contextmanager
def _float64_soap_qr():
    """pytorch-optimizer's SOAP casts the power-iteration matrix to float32 for its QR
    (``.to(torch.float32)``); the recording keeps it float64. Only that cast changes."""
    import types

    import pytorch_optimizer.optimizer.soap as po_soap

    proxy = types.SimpleNamespace(**{k: getattr(torch, k) for k in dir(torch) if k != "float32"})
    proxy.float32 = torch.float64
    po_soap.torch = proxy
    try:
        yield
    finally:
        po_soap.torch = torch


def _qhadam_float64_weights(opt, params):
    """pytorch-optimizer keeps QHAdam's bias-correction weights in float32 (a 2e-9 drift in
    float64); seed the state with float64 weights so the recording is float64 throughout."""
    for p in params.values():
        opt.state[p] = {
            "beta1_weight": torch.zeros((1,), dtype=torch.float64),
            "beta2_weight": torch.zeros((1,), dtype=torch.float64),
            "exp_avg": torch.zeros_like(p),
            "exp_avg_sq": torch.zeros_like(p),
        }
    return opt


# name -> (reference description, steps, builder(params) -> list of optimizers, context)
# Each builder also returns the arguments it used, stored in the metadata.
def _cases():
    cases = {}

    def case(name, reference, steps, build, context=contextlib.nullcontext):
        cases[name] = (reference, steps, build, context)

    def all_(p):
        return list(p.values())

    def torch_opt(cls_name, **kw):
        return lambda p: ([getattr(torch.optim, cls_name)(all_(p), **kw)], kw)

    def po_opt(cls_name, fix=None, **kw):
        def build(p):
            opt = _po(cls_name)(all_(p), foreach=False, **kw)
            return [fix(opt, p) if fix else opt], kw

        return build

    case(
        "sgd_torch",
        "torch.optim.SGD",
        40,
        torch_opt("SGD", lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01, foreach=False),
    )
    case(
        "adam_torch",
        "torch.optim.Adam",
        40,
        torch_opt("Adam", lr=0.02, weight_decay=0.01, foreach=False),
    )
    case(
        "adamw_torch",
        "torch.optim.AdamW",
        40,
        torch_opt("AdamW", lr=0.02, weight_decay=0.1, foreach=False),
    )
    case(
        "radam_po",
        "pytorch_optimizer.RAdam (the authors' rule: no step and no decay during warm-up)",
        40,
        po_opt("RAdam", lr=0.02, weight_decay=0.1, weight_decouple=True),
    )
    case(
        "radam_torch",
        "torch.optim.RAdam (momentum steps during warm-up)",
        40,
        torch_opt("RAdam", lr=0.02, weight_decay=0.1, decoupled_weight_decay=True, foreach=False),
    )
    case(
        "qhadamw_po",
        "pytorch_optimizer.QHAdam (decoupled decay, float64 bias-correction weights)",
        40,
        po_opt(
            "QHAdam",
            fix=_qhadam_float64_weights,
            lr=0.02,
            betas=(0.995, 0.999),
            nus=(0.7, 1.0),
            weight_decay=0.01,
            weight_decouple=True,
        ),
    )
    case(
        "lion_po",
        "pytorch_optimizer.Lion",
        40,
        po_opt("Lion", lr=3e-3, betas=(0.9, 0.99), weight_decay=0.1),
    )
    case(
        "adafactor_torch",
        "torch.optim.Adafactor (relative step 1e-2, parameter scale, no decay)",
        40,
        torch_opt("Adafactor", lr=1e-2, foreach=False),
    )
    case(
        "adafactor_po",
        "pytorch_optimizer.AdaFactor (relative step, parameter scale, momentum 0.9, decay)",
        40,
        po_opt(
            "AdaFactor",
            lr=None,
            betas=(0.9, 0.999),
            weight_decay=0.01,
            momentum_dtype=torch.float64,
        ),
    )

    def muon_torch(p):
        kw = dict(lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.1, eps=1e-7)
        adam_kw = dict(lr=0.02, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.0, foreach=False)
        muon = torch.optim.Muon([p["w"]], **kw)
        adam = torch.optim.AdamW([p["b"], p["k"]], **adam_kw)
        return [muon, adam], {"muon": kw, "adamw (b, k)": adam_kw}

    case(
        "muon_torch",
        "torch.optim.Muon on w (float64 Newton-Schulz) + torch.optim.AdamW on b, k",
        30,
        muon_torch,
        _float64_newton_schulz,
    )

    def muon_po(p):
        kw = dict(lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.1, ns_steps=5)
        adam_kw = dict(adamw_lr=0.02, adamw_betas=(0.9, 0.95), adamw_eps=1e-10, adamw_wd=0.0)
        groups = [
            {"params": [p["w"], p["k"]], "use_muon": True},
            {"params": [p["b"]], "use_muon": False},
        ]
        return [_po("Muon")(groups, foreach=False, **kw, **adam_kw)], {**kw, **adam_kw}

    case(
        "muon_po",
        "pytorch_optimizer.Muon on w, k (k flattened to (out, -1); float64 Newton-Schulz), "
        "its AdamW on b",
        30,
        muon_po,
        _float64_newton_schulz,
    )
    case(
        "mars_po",
        "pytorch_optimizer.MARS (mars-adamw, approximate; AdamW with betas_1d for ndim < 2)",
        40,
        po_opt(
            "MARS",
            lr=3e-3,
            betas=(0.95, 0.99),
            gamma=0.025,
            lr_1d=3e-3,
            betas_1d=(0.9, 0.95),
            weight_decay=0.1,
            weight_decay_1d=0.1,
        ),
        _no_root_eps,
    )
    case(
        "mars_lion_po",
        "pytorch_optimizer.MARS (mars-lion)",
        40,
        po_opt(
            "MARS",
            lr=1e-3,
            mars_type="lion",
            lr_1d=1e-3,
            weight_decay=0.1,
            weight_decay_1d=0.1,
        ),
        _no_root_eps,
    )
    case(
        "soap_po",
        "pytorch_optimizer.SOAP (the authors' soap.py; float64 QR; axes above 60 not rotated, so "
        "the 48x80 matrix is rotated on its well-posed 48 side)",
        30,
        po_opt(
            "SOAP",
            lr=3e-3,
            betas=(0.95, 0.95),
            shampoo_beta=0.95,
            weight_decay=0.01,
            precondition_frequency=5,
            max_precondition_dim=60,
            eps=1e-8,
        ),
        _float64_soap_qr,
    )
    return cases


def _versions():
    return {
        "torch": torch.__version__,
        "pytorch_optimizer": importlib.metadata.version("pytorch_optimizer"),
        "numpy": np.__version__,
    }


def record(name, problem):
    reference, steps, build, context = _cases()[name]
    params = {k: torch.tensor(v, dtype=torch.float64) for k, v in rp.init_params(problem).items()}
    opts, kwargs = build(params)
    out = {}
    with context(), torch.no_grad():
        for step in range(1, steps + 1):
            grads = rp.gradient(problem, {k: v.numpy() for k, v in params.items()})
            for k, v in params.items():
                v.grad = torch.from_numpy(grads[k]).clone()
            for opt in opts:
                opt.step()
            if step in rp.CHECKPOINTS or step == steps:
                for k, v in params.items():
                    out[f"step{step}/{k}"] = v.detach().numpy().copy()
    meta = {
        "reference": reference,
        "arguments": json.loads(json.dumps(kwargs, default=str)),
        "steps": steps,
        "versions": _versions(),
    }
    out["meta"] = np.asarray(json.dumps(meta, sort_keys=True))
    path = os.path.join(rp.DATA_DIR, f"{name}.npz")
    np.savez_compressed(path, **out)
    print(f"{name}: {steps} steps -> {os.path.relpath(path)}")


def record_newton_schulz_bf16(problem):
    """torch.optim.Muon's and pytorch-optimizer's bfloat16 Newton-Schulz on fixed matrices."""
    from pytorch_optimizer.optimizer.utils.matrix import zero_power_via_newton_schulz_5
    from torch.optim._muon import _zeropower_via_newtonschulz

    rng = np.random.default_rng(7)
    out = {}
    coeffs = (3.4445, -4.7750, 2.0315)
    for shape in ((48, 80), (96, 192)):
        x = rng.normal(size=shape).astype(np.float32)
        key = f"{shape[0]}x{shape[1]}"
        out[f"{key}/x"] = x
        t = _zeropower_via_newtonschulz(torch.from_numpy(x), coeffs, 5, 1e-7)
        out[f"{key}/torch"] = t.view(torch.int16).numpy().view(np.uint16)
        q = zero_power_via_newton_schulz_5(torch.from_numpy(x), num_steps=5)
        out[f"{key}/po"] = q.view(torch.int16).numpy().view(np.uint16)
    meta = {
        "reference": "torch.optim._muon._zeropower_via_newtonschulz and pytorch_optimizer's "
        "zero_power_via_newton_schulz_5, bfloat16, 5 steps, outputs as bfloat16 bits",
        "versions": _versions(),
    }
    out["meta"] = np.asarray(json.dumps(meta, sort_keys=True))
    path = os.path.join(rp.DATA_DIR, "newton_schulz_bf16.npz")
    np.savez_compressed(path, **out)
    print(f"newton_schulz_bf16 -> {os.path.relpath(path)}")


def record_kron_statistics(problem, seeds=16, steps=20):
    """pytorch-optimizer's Kron draws its probes from torch's generator: compare statistics.

    Final loss after `steps` float32 steps for each seed (lr 0.05, momentum 0.9, no decay).
    """
    kw = dict(lr=0.05, momentum=0.9, weight_decay=0.0)
    losses = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        np.random.seed(seed)  # its balancing coin
        params = {
            k: torch.tensor(v, dtype=torch.float32) for k, v in rp.init_params(problem).items()
        }
        opt = _po("Kron")(list(params.values()), **kw)
        with torch.no_grad():
            for _ in range(steps):
                grads = rp.gradient(problem, {k: v.numpy() for k, v in params.items()})
                for k, v in params.items():
                    v.grad = torch.from_numpy(grads[k].astype(np.float32))
                opt.step()
        losses.append(rp.loss(problem, {k: v.numpy() for k, v in params.items()}))
    meta = {
        "reference": "pytorch_optimizer.Kron, float32, final loss per seed",
        "arguments": kw,
        "steps": steps,
        "versions": _versions(),
    }
    path = os.path.join(rp.DATA_DIR, "kron_po_statistics.npz")
    np.savez_compressed(
        path, final_loss=np.asarray(losses), meta=np.asarray(json.dumps(meta, sort_keys=True))
    )
    print(f"kron_po_statistics: {seeds} seeds -> {os.path.relpath(path)}")


def main(argv):
    os.makedirs(rp.DATA_DIR, exist_ok=True)
    if not os.path.exists(rp.PROBLEM_FILE):
        np.savez_compressed(rp.PROBLEM_FILE, **rp.make_problem())
    problem = rp.load_problem()
    torch.set_num_threads(1)
    names = argv or [*_cases(), "newton_schulz_bf16", "kron_po_statistics"]
    for name in names:
        if name == "newton_schulz_bf16":
            record_newton_schulz_bf16(problem)
        elif name == "kron_po_statistics":
            record_kron_statistics(problem)
        else:
            record(name, problem)


if __name__ == "__main__":
    main(sys.argv[1:])
