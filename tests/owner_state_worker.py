"""Owner-resident state (``state_placement="owner"``) on meshes of fake CPU devices (subprocess).

Run by `tests/test_owner_state.py` in a fresh process with 8 fake CPU devices:
``python tests/owner_state_worker.py --cases soap@8,kron@4x2``. For every family and mesh
it trains 3 steps of the small GPT-shaped tree of `tests/owner_worker.py` with one jitted
update: on one device (the oracle), on the mesh with the state kept per parameter, and on the
mesh with the state kept on its owners. It reports the differences, the collectives of the
compiled step and the bytes its all-to-alls move, where the state's buffers lie, a step with
owner compute switched off, a step on a mesh of another size, and an orbax save and restore.
Prints one line ``OWNER_STATE_REPORT <json>``.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import math
import re
import sys
import tempfile
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import rlx_optax
from tests import owner_worker as ow  # gives JAX its 8 fake devices (before they start)

FAMILIES = {
    "soap": lambda **kw: rlx_optax.soap(3e-3, precond_freq=2, **kw),
    "soap_reference": lambda **kw: rlx_optax.soap(
        3e-3, behaviour="reference", precond_freq=2, **kw
    ),
    # 8-bit moments and bfloat16 statistics and bases: read and stored on the owner
    "soap_lowbit": lambda **kw: rlx_optax.soap(
        3e-3,
        behaviour="reference",
        precond_freq=2,
        mu_dtype="q8",
        nu_dtype="q8",
        precond_dtype=jnp.bfloat16,
        **kw,
    ),
    "kron": lambda **kw: rlx_optax.kron_psgd(3e-3, **kw),
    "kron_reference": lambda **kw: rlx_optax.kron_psgd(3e-3, behaviour="reference", **kw),
    # its momentum, projected and retracted with each matrix
    "stiefel": lambda **kw: rlx_optax.stiefel(0.1, momentum=0.9, **kw),
}
BYTES = {"f64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s8": 1, "u8": 1}


def all_to_all_bytes(hlo: str) -> int:
    """Bytes one device's all-to-alls move per step (their operands: the device's buffer)."""
    total = 0
    for result in re.findall(r"= (.*?) all-to-all\(", hlo):  # one array, or a tuple of them
        for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", result):
            total += BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def shard_bytes(tree) -> int:
    per_device: dict = {}
    for x in jax.tree.leaves(tree):
        for shard in x.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return max(per_device.values())


def rows_on_owners(owned, mesh) -> bool:
    """Every buffer split along its first axis over all mesh axes: device d holds row d."""
    axes = tuple(mesh.axis_names)
    want = NamedSharding(mesh, P(axes if len(axes) > 1 else axes[0], None))
    for buf in owned.buffers:
        if not buf.sharding.is_equivalent_to(want, buf.ndim):
            return False
        whole = np.asarray(buf)
        order = {d: s for s, d in enumerate(mesh.devices.flat)}
        for shard in buf.addressable_shards:
            row = order[shard.device]
            if shard.data.shape[0] != 1 or not np.array_equal(
                np.asarray(shard.data)[0], whole[row]
            ):
                return False
    return True


def train(tx, params, mesh=None, steps=ow.STEPS, told=False):
    """`steps` jitted updates from `tx.init`; (updates, state, compiled HLO, params placed).
    With `told`, traced with the parameters' layouts given to owner compute."""
    out = ow.train(tx, params, mesh, steps=steps, told=told)
    return [jax.device_get(u) for u in out["updates"]], out["state"], out["hlo"], out["params"]


def place_on(mesh, tree):
    return jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, ow.spec_of(x, mesh))), tree)


def owned_buffers(state):
    """The `OwnedBuffers` inside an optimizer state (a chain's)."""
    from rlx_optax._src.transforms._resident import OwnedBuffers

    found = [
        x
        for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, OwnedBuffers))
        if isinstance(x, OwnedBuffers)
    ]
    if len(found) != 1:
        raise AssertionError(f"expected one OwnedBuffers in the state, found {len(found)}")
    return found[0]


def max_abs(a, b) -> float:
    return max(
        (float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b, strict=True)),
        default=0.0,
    )


def checkpoint_resume(tx, params, mesh) -> dict:
    """Save the owner-placed state with orbax after 2 steps, restore it into the layout that
    `state_shardings` gives, and take a third step from both: the same bits."""
    import orbax.checkpoint as ocp

    shardings = jax.tree.map(lambda p: NamedSharding(mesh, ow.spec_of(p, mesh)), params)
    _, state, _, p = train(tx, params, mesh, steps=2)
    target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        state,
        rlx_optax.state_shardings(tx, params, shardings),
    )
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = ocp.StandardCheckpointer()
        ckpt.save(f"{tmp}/state", state)
        ckpt.wait_until_finished()
        restored = ckpt.restore(f"{tmp}/state", target)
    g = jax.device_put(ow.gradients(params, 2), shardings)
    step = jax.jit(tx.update)
    u1, s1 = step(g, state, p)
    u2, s2 = step(g, restored, p)
    return {
        "same_structure": jax.tree.structure(restored) == jax.tree.structure(state),
        "updates": max_abs(jax.tree.leaves(u1), jax.tree.leaves(u2)),
        "state": max_abs(jax.tree.leaves(s1), jax.tree.leaves(s2)),
    }


def nnx_loop(mesh_name: str, steps: int = 3) -> dict:
    """A Flax NNX model with FSDP kernels trained by `nnx.Optimizer` under one `nnx.jit`
    (`owner_worker.nnx_train`), with the reference SOAP's state kept per parameter and on its
    owners: the losses, and where the buffers lie."""
    from flax import nnx

    mesh = ow.make_mesh(mesh_name)
    out: dict = {}
    for placement in ("parameter", "owner"):

        def make(placement=placement):
            return rlx_optax.soap(
                1e-2, behaviour="reference", precond_freq=1, state_placement=placement
            )

        out[placement], _, opt = ow.nnx_train(mesh, make, ("fsdp", None), steps + 1)
        if placement == "owner":
            found = [
                v
                for v in jax.tree.leaves(nnx.state(opt))
                if getattr(v, "ndim", 0) == 2 and v.shape[0] == mesh.size
            ]
            out["buffers"] = len(found)
            out["rows_on_owners"] = all(
                v.sharding.is_equivalent_to(NamedSharding(mesh, P("fsdp", None)), 2) for v in found
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default="soap_reference@8,kron_reference@4x2")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=128)
    parser.add_argument("--extras", default="soap_reference@8")
    parser.add_argument("--nnx", action="store_true", help="also the Flax NNX loop")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    faulthandler.dump_traceback_later(args.timeout, exit=True)
    params = ow.gpt_tree(args.width, args.layers, args.vocab)
    extras = set(args.extras.split(",")) if args.extras else set()
    report: dict = {}
    cases = [c.split("@") for c in args.cases.split(",")]
    for name in dict.fromkeys(n for n, _ in cases):
        make = FAMILIES[name]
        single, _, _, _ = train(make(), params)
        for mesh_name in [m for n, m in cases if n == name]:
            key = f"{name}@{mesh_name}"
            try:
                mesh = ow.make_mesh(mesh_name)
                tx = make(state_placement="owner")
                told = mesh_name.endswith("l")  # the parameters' layouts given
                updates, state, hlo, p = train(tx, params, mesh, told=told)
                plain, _, plain_hlo, _ = train(make(), params, mesh, told=told)
                total, in_loops, all_to_all = ow.collectives(hlo)
                owned = owned_buffers(state)
                entry = {
                    "ok": True,
                    "placed": type(owned).__name__,
                    "single": ow.relative(jax.tree.leaves(single), jax.tree.leaves(updates)),
                    "parameter_placement": ow.relative(
                        jax.tree.leaves(plain), jax.tree.leaves(updates)
                    ),
                    "collectives": total,
                    "in_loops": in_loops,
                    "all_to_all": all_to_all,
                    "bytes_per_shard": all_to_all_bytes(hlo) / shard_bytes(p),
                    "parameter_bytes_per_shard": all_to_all_bytes(plain_hlo) / shard_bytes(p),
                    "state_share": ow.state_share(state),
                    "rows_on_owners": rows_on_owners(owned, mesh),
                }
                if key in extras:
                    # the same state stepped without owner compute: read out and written back
                    with rlx_optax.owner_compute(False):
                        off, _, _, _ = train(tx, params, mesh)
                    entry["owner_compute_off"] = ow.relative(
                        jax.tree.leaves(updates), jax.tree.leaves(off)
                    )
                    # a step on a mesh of another size is refused, naming the placement
                    g = place_on(ow.make_mesh("4"), ow.gradients(params, 0))
                    try:
                        jax.jit(tx.update)(g, jax.device_get(state))
                        entry["other_mesh"] = "accepted"
                    except ValueError as exc:
                        entry["other_mesh"] = str(exc)
                    entry["checkpoint"] = checkpoint_resume(tx, params, mesh)
                report[key] = entry
            except Exception as exc:  # reported, the other runs go on
                report[key] = {
                    "ok": False,
                    "error": f"{type(exc).__name__}: {exc}"[:2000],
                    "traceback": traceback.format_exc()[-3000:],
                }
            print(key, json.dumps(report[key])[:400], flush=True, file=sys.stderr)
    if args.nnx:
        try:
            report["nnx"] = {"ok": True, **nnx_loop("8")}
        except Exception as exc:
            report["nnx"] = {"ok": False, "traceback": traceback.format_exc()[-3000:]}
            print(exc, file=sys.stderr)
    print("OWNER_STATE_REPORT " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
