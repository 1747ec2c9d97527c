"""Owner compute on meshes of fake CPU devices: results, collectives and loops (subprocess).

Run by `tests/test_owner_compute.py` in a fresh process (JAX fixes the device count when it
starts): ``python tests/owner_worker.py --meshes 8,4x2 --families muon,soap``. For
every family and mesh it trains 3 steps of a small GPT-shaped tree with one jitted update,
on one device and on the mesh (weights sharded over their first axis, FSDP; on 2-D meshes
``P("fsdp", "tp")``), and reports ``max|sharded - single| / max|single|`` of the updates and
the state, and from the compiled mesh program: the collectives per step, those inside a
while loop, and whether the matrix work ran on owners (an ``all-to-all`` there and back).
Prints one line ``OWNER_REPORT <json>``.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import os
import re
import sys
import traceback

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import rlx_optax  # noqa: E402

FAMILIES = {
    "muon": lambda: rlx_optax.muon(3e-3),
    "muon_reference": lambda: rlx_optax.muon(0.02, behaviour="reference"),
    # scanned layers: a (layers, rows, cols) leaf is a stack of matrices (axis 0 batch)
    "muon_scanned": lambda: rlx_optax.muon(3e-3, matrix_axes=_last_two_axes),
    "mars_shampoo": lambda: rlx_optax.mars(3e-3, variant="shampoo"),
    "stiefel": lambda: rlx_optax.stiefel(0.1, momentum=0.9),
    "soap": lambda: rlx_optax.soap(3e-3, precond_freq=2),
    "soap_reference": lambda: rlx_optax.soap(3e-3, behaviour="reference", precond_freq=2),
    "kron": lambda: rlx_optax.kron_psgd(3e-3),
    "kron_reference": lambda: rlx_optax.kron_psgd(3e-3, behaviour="reference"),
    # hyperparameters in the state: traced values the per-leaf function closes over
    "soap_injected": lambda: optax.inject_hyperparams(rlx_optax.soap)(3e-3, b1=0.9, precond_freq=2),
    # 8-bit state (issue 21): block-wise codes along the last axis, under owner compute
    # (Muon's momentum) and under the compiler's partitioning (AdamW's moments)
    "muon_q8": lambda: rlx_optax.muon(3e-3, mu_dtype="q8"),
    "adamw_q8": lambda: rlx_optax.adamw(3e-3, mu_dtype="q8", nu_dtype="q8"),
}


def _last_two_axes(tree):
    return jax.tree.map(
        lambda p: rlx_optax.MatrixAxes(p.ndim - 2, p.ndim - 1) if p.ndim >= 2 else None, tree
    )


COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
STEPS = 3


def gpt_tree(width: int, layers: int, vocab: int) -> dict:
    """A GPT-shaped parameter tree (float32, small random values)."""
    rng = np.random.default_rng(0)
    shapes: dict = {"embed": (vocab, width), "head": (width, vocab)}
    for k in range(layers):
        shapes[f"layer{k}"] = {
            "qkv": (width, 3 * width),
            "out": (width, width),
            "up": (width, 4 * width),
            "down": (4 * width, width),
            "norm": (width,),
            "up_bias": (4 * width,),
        }
    return jax.tree.map(
        lambda s: jnp.asarray(0.02 * rng.standard_normal(s), jnp.float32),
        shapes,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def gradients(params: dict, step: int) -> dict:
    rng = np.random.default_rng(100 + step)
    return jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)


def make_mesh(name: str) -> jax.sharding.Mesh:
    """'8', '4x2', '2' (the first devices): Auto axes; '8e', '4x2e': Explicit axes; '4x2m':
    `fsdp` Explicit and `tp` Auto; a trailing 'l' ('4x2l', '4x2ml'): the step traced with the
    parameters' layouts given to owner compute (`rlx_optax.owner_compute(layouts=...)`)."""
    kind = name.lstrip("0123456789x").removesuffix("l") or ""  # "l": told, any axis types
    dims = tuple(int(d) for d in name.rstrip("eml").split("x"))
    axes = ("fsdp", "tp")[: len(dims)]
    types = {
        "": (AxisType.Auto,) * len(dims),
        "e": (AxisType.Explicit,) * len(dims),
        "m": (AxisType.Explicit, AxisType.Auto)[: len(dims)],
    }[kind]
    return jax.make_mesh(dims, axes, axis_types=types, devices=jax.devices()[: int(np.prod(dims))])


def spec_of(p: jax.Array, mesh: jax.sharding.Mesh) -> P:
    """Matrices (and stacks of them) on their rows, and columns on a 2-D mesh; vectors (and
    stacks of them) on their last axis; replicated where the mesh does not divide."""
    axes = mesh.axis_names
    sizes = [mesh.shape[a] for a in axes]
    lead = (None,) * (p.ndim - 2)
    if p.ndim >= 2 and p.shape[-2] % sizes[0] == 0:
        if len(axes) == 1:
            return P(*lead, axes[0], None)
        if p.shape[-1] % sizes[1] == 0:
            return P(*lead, axes[0], axes[1])
    if p.ndim >= 1 and p.shape[-1] % mesh.size == 0:
        return P(*((None,) * (p.ndim - 1)), axes if len(axes) > 1 else axes[0])
    return P()


def collectives(hlo: str) -> tuple[int, int, int]:
    """(collectives, those in computations a while loop runs, all-to-alls) in optimized HLO."""
    bodies: dict[str, str] = {}
    for match in re.finditer(r"^(?:ENTRY )?%?([\w.\-]+) .*?\{\n(.*?)\n\}", hlo, re.S | re.M):
        bodies[match.group(1)] = match.group(2)
    loops: set[str] = set()
    for text in bodies.values():
        for m in re.finditer(r"while\(.*?condition=%?([\w.\-]+), body=%?([\w.\-]+)", text):
            loops.update(m.groups())
    # everything a loop body calls runs in the loop too
    changed = True
    while changed:
        changed = False
        for name in list(loops):
            for callee in re.findall(
                r"(?:calls|to_apply|body|condition|branch_computations)="
                r"\{?%?([\w.\-, %]+)\}?",
                bodies.get(name, ""),
            ):
                for c in re.split(r"[, %]+", callee):
                    if c and c in bodies and c not in loops:
                        loops.add(c)
                        changed = True
    pattern = re.compile(r"\s(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
    total = in_loops = all_to_all = 0
    for name, text in bodies.items():
        found = pattern.findall(text)
        total += len(found)
        all_to_all += sum(f == "all-to-all" for f in found)
        if name in loops:
            in_loops += len(found)
    return total, in_loops, all_to_all


def state_share(state) -> float:
    """Largest per-device bytes of the state / (total bytes / devices)."""
    per_device: dict = {}
    total = 0
    for x in jax.tree.leaves(state):
        total += x.nbytes
        for shard in x.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return max(per_device.values()) / (total / len(per_device))


SHARES: dict[str, float] = {}
KEPT: dict[str, bool] = {}


def kept(values, shardings) -> bool:
    """Whether every array of `values` has the sharding given for it in `shardings`."""
    pairs = zip(jax.tree.leaves(values), jax.tree.leaves(shardings), strict=True)
    return all(x.sharding.is_equivalent_to(s, x.ndim) for x, s in pairs)


def train(
    tx, params: dict, mesh=None, nudge: float = 1.0, steps: int = STEPS, told: bool = False
) -> dict:
    """`steps` updates of `tx` in one jitted function from its `init`, on one device or on
    `mesh` (parameters placed by `spec_of`, the state by `rlx_optax.state_shardings`): the
    updates, the final state, the compiled mesh program's HLO, the placed parameters, and on
    a mesh the state's share at init and whether every layout was kept. With `told` the step
    is traced with the parameters' layouts given to owner compute."""
    grads = [jax.tree.map(lambda g: g * nudge, gradients(params, k)) for k in range(steps)]
    out: dict = {}
    if mesh is None:
        place = lambda t: t  # noqa: E731
        state = tx.init(params)
    else:
        shardings = jax.tree.map(lambda p: NamedSharding(mesh, spec_of(p, mesh)), params)
        place = lambda t: jax.device_put(t, shardings)  # noqa: E731
        state_shardings = rlx_optax.state_shardings(tx, params, shardings)
        state = jax.jit(tx.init, out_shardings=state_shardings)(place(params))
        out["share"] = state_share(state)
    step = jax.jit(tx.update)
    p = place(params)
    told_ctx = rlx_optax.owner_compute(layouts=shardings) if told else contextlib.nullcontext()
    with told_ctx:  # the trace (the first call) is where the layouts act
        hlo = step.lower(place(grads[0]), state, p).compile().as_text() if mesh is not None else ""
        updates = []
        for g in grads:
            u, state = step(place(g), state, p)
            updates.append(u)
    if mesh is not None:  # every update in its parameter's layout, every state leaf in its own
        out["kept"] = kept(updates[-1], shardings) and kept(state, state_shardings)
    return {**out, "updates": updates, "state": state, "hlo": hlo, "params": p}


def run(
    name: str, params: dict, mesh=None, nudge: float = 1.0, told: bool = False
) -> tuple[list, object, str]:
    out = train(FAMILIES[name](), params, mesh, nudge, told=told)
    if mesh is not None:
        SHARES[name], KEPT[name] = out["share"], out["kept"]
    return out["updates"], out["state"], out["hlo"]


def loop_probe() -> list[int]:
    """`collectives` of a program with a psum inside a `fori_loop`: shows the parser sees one."""
    mesh = make_mesh("8")

    def body(x):
        return jax.lax.fori_loop(0, 3, lambda i, y: jax.lax.psum(y, "fsdp") * 0.5 + y, x)

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("fsdp"), out_specs=P("fsdp")))
    x = jax.device_put(jnp.ones((8, 4)), NamedSharding(mesh, P("fsdp")))
    return list(collectives(f.lower(x).compile().as_text()))


class _Box:
    """An object `_owner` does not look into (a closure through it is not rebound)."""

    def __init__(self, value):
        self.value = value


def closure_probe() -> dict:
    """One matrix through `grouped_map` on the Explicit mesh of 8 devices, with a traced scalar
    typed on the mesh given to the per-leaf function as an argument ('passed'), closed over
    ('closing'), or closed over inside an object ('boxed'): the error against NumPy, the
    all-to-alls of each program, and whether the result has the matrix's sharding."""
    from rlx_optax._src.transforms import _batching

    mesh = make_mesh("8e")
    rng = np.random.default_rng(1)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    expected = w * 6.0 / np.sqrt(np.sum(w * w))
    x = jax.device_put(jnp.asarray(w), NamedSharding(mesh, P("fsdp", None)))
    s = jax.device_put(jnp.float32(3.0), NamedSharding(mesh, P()))

    def passed(x, s):
        scale = 2 * s
        fn = lambda a, c: (a * c / jnp.sqrt(jnp.sum(a * a)),)  # noqa: E731
        return _batching.grouped_map(fn, 1, {"w": x}, {"w": scale})[0]["w"]

    def closing(x, s):
        scale = 2 * s
        fn = lambda a: (a * scale / jnp.sqrt(jnp.sum(a * a)),)  # noqa: E731
        return _batching.grouped_map(fn, 1, {"w": x})[0]["w"]

    def boxed(x, s):
        box = _Box(2 * s)
        fn = lambda a: (a * box.value / jnp.sqrt(jnp.sum(a * a)),)  # noqa: E731
        return _batching.grouped_map(fn, 1, {"w": x})[0]["w"]

    out = {}
    for name, f in (("passed", passed), ("closing", closing), ("boxed", boxed)):
        step = jax.jit(f)
        y = step(x, s)
        out[name] = {
            "error": float(np.max(np.abs(np.asarray(y) - expected)) / np.max(np.abs(expected))),
            "all_to_all": collectives(step.lower(x, s).compile().as_text())[2],
            "sharding_kept": y.sharding.is_equivalent_to(x.sharding, 2),
        }
    return out


def check_layouts() -> dict[str, bool]:
    """Each device's block from `_owner._Layout` against `NamedSharding.devices_indices_map`."""
    from rlx_optax._src.transforms import _owner

    out = {}
    whole = np.arange(16 * 8 * 4, dtype=np.float32).reshape(16, 8, 4)
    for mesh_name in ("8", "4x2"):
        mesh = make_mesh(mesh_name)
        if mesh_name == "8":
            specs = [P("fsdp"), P(None, "fsdp"), P()]
        else:
            specs = [P("fsdp"), P(None, "tp"), P("fsdp", None, "tp"), P(), P(("fsdp", "tp"))]
            specs += [P("tp", "fsdp"), P(None, ("tp", "fsdp"))]
        specs.append(_owner.canonical_spec(whole.shape, mesh))
        for spec in specs:
            layout = _owner._Layout(whole.shape, spec, mesh)
            rows = np.asarray(layout.split(jnp.asarray(whole)))
            indices = NamedSharding(mesh, spec).devices_indices_map(whole.shape)
            ok = all(
                np.array_equal(rows[s], whole[indices[d]].ravel())
                for s, d in enumerate(mesh.devices.flat)
            )
            back = np.asarray(layout.assemble(jnp.asarray(rows)))
            out[f"{mesh_name}:{spec}"] = ok and np.array_equal(back, whole)
    return out


def layouts_probe() -> dict[str, str]:
    """The errors of `owner_compute(layouts=...)` given a tree of another structure, and a spec
    naming an axis the mesh does not have (traced on an Auto 4 x 2 mesh)."""
    mesh = make_mesh("4x2")
    params = {"w": jnp.ones((16, 8)), "b": jnp.ones((8,))}
    shardings = {"w": NamedSharding(mesh, P("fsdp", "tp")), "b": NamedSharding(mesh, P())}
    placed = jax.device_put(params, shardings)
    tx = rlx_optax.muon(1e-2)
    state = tx.init(placed)
    out = {}
    for name, layouts in (
        ("structure", {"w": P("fsdp", "tp")}),
        ("axis", {"w": P("data", None), "b": None}),
    ):
        try:
            with rlx_optax.owner_compute(layouts=layouts):
                jax.jit(tx.update).lower(placed, state, placed)
            out[name] = "no error"
        except ValueError as exc:
            out[name] = str(exc)
    out["nnx"] = nnx_told()
    return out


def nnx_train(mesh, make_tx, kernel_axes, steps: int = 3, told: bool = False):
    """A two-layer Flax NNX model (kernels partitioned as `kernel_axes`) created sharded in one
    `nnx.jit` on `mesh` (set with `jax.set_mesh`) and trained `steps` steps by `make_tx()` under
    `nnx.Optimizer` in one `nnx.jit` (with `told`, traced with the layouts of
    `nnx.get_partition_spec`: ``nnx.Param`` wrappers around each spec): (losses, model,
    optimizer)."""
    from flax import nnx

    init = nnx.with_partitioning(nnx.initializers.lecun_normal(), kernel_axes)

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.Linear(32, 64, kernel_init=init, rngs=rngs)
            self.down = nnx.Linear(64, 16, kernel_init=init, rngs=rngs)

        def __call__(self, x):
            return self.down(jax.nn.relu(self.up(x)))

    x = jnp.asarray(np.random.default_rng(0).standard_normal((16, 32)), jnp.float32)
    y = jnp.asarray(np.random.default_rng(1).standard_normal((16, 16)), jnp.float32)
    with jax.set_mesh(mesh):

        @nnx.jit
        def create():
            model = Model(nnx.Rngs(0))
            state = nnx.state(model)
            nnx.update(
                model, jax.lax.with_sharding_constraint(state, nnx.get_partition_spec(state))
            )
            return model

        model = create()
        opt = nnx.Optimizer(model, make_tx(), wrt=nnx.Param)

        @nnx.jit
        def step(model, opt):
            loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
            opt.update(model, grads)
            return loss

        layouts = nnx.get_partition_spec(nnx.state(model, nnx.Param))
        ctx = rlx_optax.owner_compute(layouts=layouts) if told else contextlib.nullcontext()
        with ctx:
            losses = [float(step(model, opt)) for _ in range(steps)]
    return losses, model, opt


def nnx_told(steps: int = 3) -> dict:
    """Muon in `nnx_train` with ``("fsdp", "tp")`` kernels on an Auto 4 x 2 mesh, untold and
    told the layouts: the losses, and whether each kernel kept its layout."""
    mesh = make_mesh("4x2")
    out: dict = {}
    for told in (False, True):
        losses, model, _ = nnx_train(
            mesh, lambda: rlx_optax.muon(1e-2), ("fsdp", "tp"), steps, told
        )
        kept = all(
            k.value.sharding.is_equivalent_to(NamedSharding(mesh, P("fsdp", "tp")), 2)
            for k in (model.up.kernel, model.down.kernel)
        )
        out["told" if told else "untold"] = {"losses": losses, "kernels_kept": kept}
    return out


def floats(state) -> list:
    return [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]


def relative(a, b) -> float:
    num = max((float(jnp.max(jnp.abs(x - y))) for x, y in zip(a, b, strict=True)), default=0.0)
    den = max((float(jnp.max(jnp.abs(x))) for x in a), default=0.0)
    return num / den if den else num


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--meshes", default="8,4x2")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=128)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument(
        "--told", default="", help="the families run on the 'l' meshes (default: all)"
    )
    parser.add_argument(
        "--first-mesh-only", default="", help="families run on the first of --meshes only"
    )
    args = parser.parse_args()
    faulthandler.dump_traceback_later(args.timeout, exit=True)
    params = gpt_tree(args.width, args.layers, args.vocab)
    report: dict = {"layouts": check_layouts(), "loop_probe": loop_probe()}
    if any(m.endswith("e") for m in args.meshes.split(",")):
        report["closure_probe"] = closure_probe()
    if any(m.endswith("l") for m in args.meshes.split(",")):
        report["layouts_probe"] = layouts_probe()
    for name in args.families.split(","):
        tree = params
        if name == "muon_scanned":  # the layers as one stacked leaf, as a scanned model has
            layers = [params[f"layer{k}"] for k in range(args.layers)]
            tree = {
                "embed": params["embed"],
                "head": params["head"],
                "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *layers),
            }
        single_u, single_s, _ = run(name, tree)
        # the same run with every gradient one float32 ulp larger: how far rounding alone moves
        # this family's results (an eigenbasis of a rank-deficient statistic is not unique)
        nudged_u, nudged_s, _ = run(name, tree, nudge=1 + 2.0**-23)
        report[f"{name}@ulp"] = {
            "updates": relative(jax.tree.leaves(single_u), jax.tree.leaves(nudged_u)),
            "state": relative(floats(single_s), floats(nudged_s)),
        }
        for i, mesh_name in enumerate(args.meshes.split(",")):
            key = f"{name}@{mesh_name}"
            if mesh_name.endswith("l") and args.told and name not in args.told.split(","):
                continue
            if i > 0 and name in args.first_mesh_only.split(","):
                continue
            try:
                mesh = make_mesh(mesh_name)
                updates, state, hlo = run(name, tree, mesh, told=mesh_name.endswith("l"))
                total, in_loops, all_to_all = collectives(hlo)
                report[key] = {
                    "ok": True,
                    "updates": relative(
                        jax.tree.leaves(single_u), jax.tree.leaves(jax.device_get(updates))
                    ),
                    "updates_per_step": [
                        relative(jax.tree.leaves(a), jax.tree.leaves(jax.device_get(b)))
                        for a, b in zip(single_u, updates, strict=True)
                    ],
                    "state": relative(floats(single_s), floats(jax.device_get(state))),
                    "collectives": total,
                    "in_loops": in_loops,
                    "all_to_all": all_to_all,
                    "state_share": SHARES.pop(name),
                    "layouts_kept": KEPT.pop(name),
                }
            except Exception as exc:  # reported, the other runs go on
                report[key] = {
                    "ok": False,
                    "error": f"{type(exc).__name__}: {exc}"[:2000],
                    "traceback": traceback.format_exc()[-3000:],
                }
            print(
                key,
                report[key].get("updates", report[key].get("error")),
                flush=True,
                file=sys.stderr,
            )
    print("OWNER_REPORT " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
