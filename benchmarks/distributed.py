"""Sharded training: what the compiled per-device programs cost on 8 devices.

Each optimizer configuration's ``update`` (gradients, state and parameters in, one jitted
function) is compiled for 8 fake CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count
=8``, ``OPENBLAS_NUM_THREADS=1``, both set before JAX starts) on a GPT-shaped tree: width 256, 6
layers of qkv (256, 768), o (256, 256), up (256, 1024), down (1024, 256) with their biases and
two norms' scale and bias, a (2048, 256) embedding, a (256, 2048) head and a final norm. Meshes:
``fsdp8`` (every 2-D weight ``P("fsdp", None)``, vectors ``P("fsdp")``) and ``fsdp4tp2`` (2-D
weights ``P("fsdp", "tp")``, vectors ``P(("fsdp", "tp"))``), both Auto. Wall time on fake
devices means nothing, so every figure comes from the compiled programs:

- ``flops/ideal``: XLA's ``cost_analysis()["flops"]`` of one device's program over a eighth of
  the same update compiled for one device. XLA counts a while body once and does not count
  custom calls (LAPACK: eigh, QR, triangular solves), so ``dot flops/ideal`` counts the dot
  FLOPs of the optimized HLO by hand (2 x result elements x contracted size), multiplying while
  bodies by their ``known_trip_count`` and taking the costliest branch of a conditional; a
  ``>=`` marks a figure where a loop had no known trip count (counted once: a lower bound).
- ``coll bytes/shard``: bytes moved by the collectives of one device's program per step over
  that device's parameter bytes. Convention per collective: all-gather its result (the
  gathered buffer), all-reduce, reduce-scatter, all-to-all and collective-permute their
  operands (the buffer the device contributes); async ``-start``/``-done`` pairs count once
  (at ``-start``); collectives in a while body are multiplied by its trip count and a
  conditional contributes its costliest branch.
- ``colls/step``: collectives executed per step (same counting); ``in loops``: collective
  instructions in any computation reachable from a while loop's body or condition.
- ``state/ideal``: the largest per-device optimizer-state bytes (``addressable_shards`` of the
  state built by ``jax.jit(tx.init, out_shardings=rlx_optax.state_shardings(tx, params))``)
  over the total state bytes / 8; ``temp/shard``: the compiled step's temporary bytes
  (``memory_analysis()``) over the device's parameter bytes.
- ``max rel diff``: after 3 steps in float32 (``highest`` matmul precision), the largest over
  leaves of ``max|sharded - single| / max|single|`` for the updates of every step and for the
  state after the last.

Main figures: the update jitted under ``jax.set_mesh(mesh)`` with sharded inputs (the way
docs/scaling.md trains); the JSON also holds the figures of the same update jitted with
``in_shardings`` only, no mesh context (``input_shardings``). When ``rlx_optax.owner_compute``
exists, every rlx_optax configuration runs twice: ``compiler`` (``owner_compute(False)``: the
compiler partitions the whole-matrix work) and ``owner`` (the default). Each (mesh,
configuration, mode) runs in its own process with a timeout: a crash is recorded as
``aborts``, a timeout as ``hangs``, and the figures measured before it (compilation comes
first) are kept.

Run: ``python -m benchmarks.distributed [--quick] [--mesh fsdp8 fsdp4tp2] [--config muon ...]``;
writes ``benchmarks/results/distributed.{md,json}`` (``--quick``: ``benchmarks/out/``) and
``benchmarks/out/distributed.json`` (read by ``benchmarks/run.py``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
N_DEVICES = 8
TARGETS = {
    "flops/ideal": 1.2,
    "coll bytes/shard": 3.0,
    "in loops": 0,
    "state/ideal": 1.2,
    "max rel diff": 1e-4,
}
MESHES = ("fsdp8", "fsdp4tp2")
# name -> (factory expression, whether it is an rlx_optax configuration: measured in both
# owner-compute modes when the library has them)
CONFIGS: dict[str, tuple[str, bool]] = {
    "muon": ("rlx_optax.muon(LR)", True),
    "mars/shampoo": ('rlx_optax.mars(LR, variant="shampoo")', True),
    "stiefel": ("rlx_optax.stiefel(LR, momentum=0.9)", True),
    "soap": ("rlx_optax.soap(LR)", True),
    "soap/freq1": ("rlx_optax.soap(LR, precond_freq=1)", True),
    "kron_psgd/p1": ("rlx_optax.kron_psgd(LR, update_probability=1.0)", True),
    "kron_psgd/reference": ('rlx_optax.kron_psgd(LR, behaviour="reference")', True),
    # the matrix state kept on the owner devices (state_placement="owner")
    "stiefel/owner-state": (
        'rlx_optax.stiefel(LR, momentum=0.9, state_placement="owner")',
        True,
    ),
    "soap/owner-state": ('rlx_optax.soap(LR, state_placement="owner")', True),
    "kron_psgd/p1/owner-state": (
        'rlx_optax.kron_psgd(LR, update_probability=1.0, state_placement="owner")',
        True,
    ),
    "kron_psgd/reference/owner-state": (
        'rlx_optax.kron_psgd(LR, behaviour="reference", state_placement="owner")',
        True,
    ),
    "adamw": ("rlx_optax.adamw(LR)", True),
    "adafactor": ("rlx_optax.adafactor(LR)", True),
    "optax.contrib.muon": ("optax.contrib.muon(LR)", False),
    "psgd_jax.kron": ("load_psgd_kron()(LR, preconditioner_update_probability=1.0)", False),
}
LR = 1e-2
STEPS = 3
RESULT_TAG = "DISTRIBUTED_PART "


# --------------------------------------------------------------------------- the tree


def tree_shapes(quick: bool) -> dict[str, tuple[int, ...]]:
    """The GPT-shaped tree (``quick``: width 64, 2 layers, 256 tokens)."""
    d, layers, vocab = (64, 2, 256) if quick else (256, 6, 2048)
    shapes: dict[str, tuple[int, ...]] = {"embed": (vocab, d)}
    for i in range(layers):
        p = f"layer{i}/"
        shapes.update(
            {
                p + "ln1_scale": (d,),
                p + "ln1_bias": (d,),
                p + "qkv": (d, 3 * d),
                p + "qkv_bias": (3 * d,),
                p + "o": (d, d),
                p + "o_bias": (d,),
                p + "ln2_scale": (d,),
                p + "ln2_bias": (d,),
                p + "up": (d, 4 * d),
                p + "up_bias": (4 * d,),
                p + "down": (4 * d, d),
                p + "down_bias": (d,),
            }
        )
    shapes.update({"ln_f_scale": (d,), "ln_f_bias": (d,), "head": (d, vocab)})
    return shapes


# --------------------------------------------------------------------------- HLO reading

_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
    "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1,
}  # fmt: skip
_ARRAY = re.compile(r"([a-z][a-z0-9]*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(ENTRY )?%([\w.\-]+) \(.*\) -> .*\{$")
COLLECTIVES = (
    "all-gather",
    "all-reduce",
    "reduce-scatter",
    "all-to-all",
    "collective-permute",
    "ragged-all-to-all",
)


def _arrays(type_text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [
        (dt, tuple(int(x) for x in dims.split(",") if x))
        for dt, dims in _ARRAY.findall(type_text)
        if dt in _DTYPE_BYTES
    ]


def _bytes(type_text: str) -> int:
    total = 0
    for dt, dims in _arrays(type_text):
        n = 1
        for x in dims:
            n *= x
        total += n * _DTYPE_BYTES[dt]
    return total


def _matching(text: str, start: int) -> int:
    """Index just past the bracket closing the one at `start`."""
    depth = 0
    pairs = {"(": ")", "{": "}", "[": "]"}
    closers = set(pairs.values())
    for i in range(start, len(text)):
        c = text[i]
        if c in pairs:
            depth += 1
        elif c in closers:
            depth -= 1
            if depth == 0:
                return i + 1
    return len(text)


def parse_instruction(line: str) -> dict[str, Any] | None:
    s = line.strip()
    if s.startswith("ROOT "):
        s = s[5:]
    if not s.startswith("%") or " = " not in s:
        return None
    name, rest = s[1:].split(" = ", 1)
    if rest.startswith("("):
        end = _matching(rest, 0)
    else:
        end = rest.find(" ")
    type_text, rest = rest[:end], rest[end:].lstrip()
    paren = rest.find("(")
    if paren < 0:
        return None
    opcode = rest[:paren]
    close = _matching(rest, paren)
    operands = re.findall(r"%([\w.\-]+)", rest[paren:close])
    return {
        "name": name,
        "type": type_text,
        "opcode": opcode,
        "operands": operands,
        "attrs": rest[close:],
    }


def parse_hlo(text: str) -> tuple[dict[str, list[dict[str, Any]]], str | None]:
    """Computations of an HLO module: name -> instructions; and the entry's name."""
    comps: dict[str, list[dict[str, Any]]] = {}
    entry, current = None, None
    for line in text.splitlines():
        m = _HEADER.match(line)
        if m:
            current = m.group(2)
            comps[current] = []
            if m.group(1):
                entry = current
            continue
        if line.startswith("}"):
            current = None
            continue
        if current is not None:
            inst = parse_instruction(line)
            if inst is not None:
                comps[current].append(inst)
    return comps, entry


def _called(attrs: str, key: str) -> list[str]:
    m = re.search(key + r"=\{([^}]*)\}", attrs)
    if m:
        return re.findall(r"%([\w.\-]+)", m.group(1))
    m = re.search(key + r"=%([\w.\-]+)", attrs)
    return [m.group(1)] if m else []


def _collective_kind(opcode: str) -> str | None:
    base = opcode[: -len("-start")] if opcode.endswith("-start") else opcode
    return base if base in COLLECTIVES else None


def hlo_figures(text: str) -> dict[str, Any]:
    """Dot FLOPs, collectives and their bytes per step of one device's optimized program."""
    comps, entry = parse_hlo(text)
    types = {i["name"]: i["type"] for insts in comps.values() for i in insts}
    memo: dict[str, dict[str, Any]] = {}
    unknown_trip = [0]

    def zero() -> dict[str, Any]:
        return {"dot_flops": 0.0, "collectives": 0.0, "collective_bytes": 0.0, "by_kind": {}}

    def add(acc, other, times=1.0):
        acc["dot_flops"] += times * other["dot_flops"]
        acc["collectives"] += times * other["collectives"]
        acc["collective_bytes"] += times * other["collective_bytes"]
        for k, v in other["by_kind"].items():
            row = acc["by_kind"].setdefault(k, [0.0, 0.0])
            row[0] += times * v[0]
            row[1] += times * v[1]

    def cost(comp: str) -> dict[str, Any]:
        if comp in memo:
            return memo[comp]
        memo[comp] = zero()  # recursion guard
        acc = zero()
        for inst in comps.get(comp, []):
            op, attrs = inst["opcode"], inst["attrs"]
            if op == "dot":
                out = 1
                for _, dims in _arrays(inst["type"]):
                    for x in dims:
                        out *= x
                lhs = _arrays(types.get(inst["operands"][0], ""))
                m = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", attrs)
                contracted = 1
                if lhs and m:
                    for d in (int(x) for x in m.group(1).split(",") if x):
                        contracted *= lhs[0][1][d]
                acc["dot_flops"] += 2.0 * out * contracted
            kind = _collective_kind(op)
            if kind is not None:
                if kind == "all-gather":
                    moved = _bytes(inst["type"])
                    if op.endswith("-start"):  # (operand, result) tuple
                        moved -= sum(_bytes(types.get(o, "")) for o in inst["operands"])
                else:
                    moved = sum(_bytes(types.get(o, "")) for o in inst["operands"])
                acc["collectives"] += 1
                acc["collective_bytes"] += moved
                row = acc["by_kind"].setdefault(kind, [0.0, 0.0])
                row[0] += 1
                row[1] += moved
            if op == "while":
                m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', attrs)
                trips = int(m.group(1)) if m else 1
                if not m:
                    unknown_trip[0] += 1
                for c in _called(attrs, "body") + _called(attrs, "condition"):
                    add(acc, cost(c), trips)
            elif op == "conditional":
                branches = (
                    _called(attrs, "branch_computations")
                    + _called(attrs, "true_computation")
                    + _called(attrs, "false_computation")
                )
                costs = [cost(c) for c in branches]
                if costs:
                    add(acc, max(costs, key=lambda c: (c["dot_flops"], c["collective_bytes"])))
            else:
                for key in ("calls", "to_apply"):
                    for c in _called(attrs, key):
                        add(acc, cost(c))
        memo[comp] = acc
        return acc

    total = cost(entry) if entry else zero()

    # collective instructions anywhere reachable from a while loop's body or condition
    def reachable(start: list[str]) -> set[str]:
        seen: set[str] = set()
        todo = list(start)
        while todo:
            c = todo.pop()
            if c in seen:
                continue
            seen.add(c)
            for inst in comps.get(c, []):
                for key in (
                    "calls",
                    "to_apply",
                    "body",
                    "condition",
                    "branch_computations",
                    "true_computation",
                    "false_computation",
                ):
                    todo += _called(inst["attrs"], key)
        return seen

    loop_roots = [
        c
        for insts in comps.values()
        for i in insts
        if i["opcode"] == "while"
        for c in _called(i["attrs"], "body") + _called(i["attrs"], "condition")
    ]
    in_loops = sum(
        1
        for c in reachable(loop_roots)
        for i in comps.get(c, [])
        if _collective_kind(i["opcode"]) is not None
    )
    static = sum(
        1 for insts in comps.values() for i in insts if _collective_kind(i["opcode"]) is not None
    )
    return {
        "dot_flops": total["dot_flops"],
        "collectives_per_step": total["collectives"],
        "collective_bytes": total["collective_bytes"],
        "collectives_by_kind": {
            k: {"count": v[0], "bytes": v[1]} for k, v in total["by_kind"].items()
        },
        "collective_instructions": static,
        "collectives_in_loops": in_loops,
        "while_loops": sum(1 for insts in comps.values() for i in insts if i["opcode"] == "while"),
        "while_loops_unknown_trip_count": unknown_trip[0],
        "custom_calls": sorted(
            {
                m.group(1)
                for insts in comps.values()
                for i in insts
                if i["opcode"] == "custom-call"
                for m in [re.search(r'custom_call_target="([^"]+)"', i["attrs"])]
                if m
            }
        ),
    }


# --------------------------------------------------------------------------- the worker


def _emit(part: str, payload: dict[str, Any]) -> None:
    print(RESULT_TAG + json.dumps({"part": part, **payload}, default=float), flush=True)


def load_psgd_kron():
    """psgd-jax's kron (``pip install .[bench]``). psgd-jax 0.2.9 imports a moved optax module."""
    import optax

    sys.modules.setdefault("optax._src.clipping", optax.transforms._clipping)
    from psgd_jax.kron import kron

    return kron


def worker(mesh_name: str, config: str, mode: str, quick: bool) -> None:
    """Measure one (mesh, configuration, mode) and print its parts as they are measured."""
    import contextlib

    import jax
    import numpy as np
    import optax
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    import rlx_optax

    jax.config.update("jax_default_matmul_precision", "highest")
    assert jax.device_count() == N_DEVICES, jax.devices()
    if mesh_name == "fsdp8":
        mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Auto,))
        mat_spec, vec_spec = P("fsdp", None), P("fsdp")
    else:
        mesh = jax.make_mesh((4, 2), ("fsdp", "tp"), axis_types=(AxisType.Auto,) * 2)
        mat_spec, vec_spec = P("fsdp", "tp"), P(("fsdp", "tp"))
    shapes = tree_shapes(quick)
    rng = np.random.default_rng(0)
    host = {k: (0.02 * rng.normal(size=s)).astype(np.float32) for k, s in shapes.items()}
    grads_host = [
        {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()} for _ in range(STEPS)
    ]
    param_sh = {
        k: NamedSharding(mesh, mat_spec if len(s) == 2 else vec_spec) for k, s in shapes.items()
    }
    params = {k: jax.device_put(v, param_sh[k]) for k, v in host.items()}
    grads = [{k: jax.device_put(v, param_sh[k]) for k, v in g.items()} for g in grads_host]

    switch = owner_switch()
    if mode == "compiler":
        ctx = switch(False)
    elif mode == "owner":
        ctx = switch(True)
    elif mode == "layouts":  # owner compute told the parameters' layouts (Auto meshes)
        ctx = switch(True, layouts=param_sh)
    else:
        ctx = contextlib.nullcontext()
    tx = eval(CONFIGS[config][0], {"rlx_optax": rlx_optax, "optax": optax, "LR": LR,
                                   "load_psgd_kron": load_psgd_kron})  # fmt: skip

    def update(g, s, p):
        return tx.update(g, s, p)

    def per_device_bytes(tree) -> dict[int, int]:
        out: dict[int, int] = {}
        for x in jax.tree.leaves(tree):
            if hasattr(x, "addressable_shards"):
                for shard in x.addressable_shards:
                    out[shard.device.id] = out.get(shard.device.id, 0) + shard.data.nbytes
        return out

    def total_bytes(tree) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(tree) if hasattr(x, "nbytes"))

    param_shard = max(per_device_bytes(params).values())
    with ctx:
        # --- state where state_shardings puts it
        state_sh = rlx_optax.state_shardings(tx, params)
        state = jax.jit(tx.init, out_shardings=state_sh)(params)
        state_dev = per_device_bytes(state)
        state_total = total_bytes(state)
        _emit(
            "state",
            {
                "param_bytes": total_bytes(params),
                "param_shard_bytes": param_shard,
                "state_bytes": state_total,
                "largest_state_bytes": max(state_dev.values()),
                "state/ideal": max(state_dev.values()) / (state_total / N_DEVICES),
            },
        )

        # --- one device: the reference program
        dev0 = jax.devices()[0]
        p0 = {k: jax.device_put(v, dev0) for k, v in host.items()}
        s0 = jax.jit(tx.init)(p0)
        g0 = [{k: jax.device_put(v, dev0) for k, v in g.items()} for g in grads_host]
        t0 = time.perf_counter()
        single = jax.jit(update).lower(g0[0], s0, p0).compile()
        single_hlo = hlo_figures(single.as_text())
        single_cost = single.cost_analysis()
        _emit(
            "single",
            {
                "flops": single_cost.get("flops", float("nan")),
                "dot_flops": single_hlo["dot_flops"],
                "hlo": single_hlo,
                "compile_s": time.perf_counter() - t0,
            },
        )

        # --- 8 devices: main (set_mesh) and input shardings only
        def compiled_figures(compiled) -> dict[str, Any]:
            hlo = hlo_figures(compiled.as_text())
            cost = compiled.cost_analysis()
            mem = compiled.memory_analysis()
            flops = cost.get("flops", float("nan"))
            return {
                "flops": flops,
                "flops/ideal": flops / (single_cost.get("flops", float("nan")) / N_DEVICES),
                "dot flops/ideal": hlo["dot_flops"] / (single_hlo["dot_flops"] / N_DEVICES)
                if single_hlo["dot_flops"]
                else None,
                "dot_flops_lower_bound": bool(
                    hlo["while_loops_unknown_trip_count"]
                    or single_hlo["while_loops_unknown_trip_count"]
                ),
                "coll bytes/shard": hlo["collective_bytes"] / param_shard,
                "colls/step": hlo["collectives_per_step"],
                "in loops": hlo["collectives_in_loops"],
                "temp_bytes": mem.temp_size_in_bytes,
                "temp/shard": mem.temp_size_in_bytes / param_shard,
                "hlo": hlo,
            }

        t0 = time.perf_counter()
        with jax.set_mesh(mesh):
            sharded = jax.jit(update).lower(grads[0], state, params).compile()
        main = compiled_figures(sharded)
        main["compile_s"] = time.perf_counter() - t0
        _emit("set_mesh", main)

        t0 = time.perf_counter()
        plain = (
            jax.jit(update, in_shardings=(param_sh, state_sh, param_sh))
            .lower(grads[0], state, params)
            .compile()
        )
        other = compiled_figures(plain)
        other["compile_s"] = time.perf_counter() - t0
        _emit("input_shardings", other)

        # --- 3 steps each way, compared
        t0 = time.perf_counter()
        worst_updates, worst_state = 0.0, 0.0

        def rel(a, b) -> float:
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            scale = float(np.max(np.abs(b))) if b.size else 0.0
            diff = float(np.max(np.abs(a - b))) if b.size else 0.0
            if scale == 0.0:
                return 0.0 if diff == 0.0 else float("inf")
            return diff / scale

        p_s, s_s, p_1, s_1 = params, state, p0, s0
        for g_s, g_1 in zip(grads, g0, strict=True):
            # the compiled program takes the state as laid out by `state_shardings`; where the
            # compiler lays out its output state otherwise (psgd-jax), move it back first
            s_s = jax.device_put(s_s, state_sh)
            with jax.set_mesh(mesh):
                u_s, s_s = sharded(g_s, s_s, p_s)
            u_1, s_1 = single(g_1, s_1, p_1)
            worst_updates = max(
                worst_updates,
                max(rel(u_s[k], u_1[k]) for k in shapes),
            )
            # as a pinned train step would: the parameters back in their own layout (an
            # unpinned update may come out in owner compute's exchange layout)
            p_s = jax.device_put(optax.apply_updates(p_s, u_s), param_sh)
            p_1 = optax.apply_updates(p_1, u_1)
        # a state kept on its owners (state_placement="owner") is laid out by the mesh: only
        # the updates are compared there (those of steps 2 and 3 read all of the state)
        placed = jax.tree.structure(s_s) != jax.tree.structure(s_1)
        pairs = [] if placed else zip(jax.tree.leaves(s_s), jax.tree.leaves(s_1), strict=True)
        for a, b in pairs:
            if hasattr(b, "dtype") and np.issubdtype(b.dtype, np.floating):
                worst_state = max(worst_state, rel(a, b))
        state_after = per_device_bytes(s_s)
        _emit(
            "values",
            {
                "updates rel diff": worst_updates,
                "state rel diff": None if placed else worst_state,
                "max rel diff": max(worst_updates, worst_state),
                "state/ideal after steps": max(state_after.values())
                / (total_bytes(s_s) / N_DEVICES),
                "run_s": time.perf_counter() - t0,
            },
        )


# --------------------------------------------------------------------------- the driver


def owner_switch() -> Any:
    """`rlx_optax.owner_compute`, or None. Until it is exported, the private switch of the
    owner-compute path (``_owner.owner_compute``) where the library has one."""
    import rlx_optax

    switch = getattr(rlx_optax, "owner_compute", None)
    if switch is None:
        try:
            from rlx_optax._src.transforms import _owner  # type: ignore[attr-defined]
        except ImportError:
            return None
        switch = getattr(_owner, "owner_compute", None)
    return switch


#: the configurations of a matrix family (owner compute acts on them)
MATRIX_FAMILIES = ("muon", "mars/", "stiefel", "soap", "kron_psgd")


def modes_for(config: str, mesh: str = "fsdp8") -> list[str]:
    """Modes measured for a configuration: both owner-compute modes where the library has them,
    and on the 2-D mesh owner compute told the parameters' layouts (``layouts``: on fsdp8 the
    layout it takes without them already is the parameters')."""
    if not CONFIGS[config][1]:
        return ["-"]
    if owner_switch() is None:
        return ["-"]
    told = ["layouts"] if mesh != "fsdp8" and config.startswith(MATRIX_FAMILIES) else []
    if config.endswith("/owner-state"):  # a layout of owner compute: nothing to compare
        return ["owner", *told]
    return ["compiler", "owner", *told]


def run_one(mesh: str, config: str, mode: str, quick: bool, timeout: float) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={N_DEVICES}",
        OPENBLAS_NUM_THREADS="1",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    )
    cmd = [sys.executable, "-m", "benchmarks.distributed", "--worker"]
    cmd += ["--mesh", mesh, "--config", config, "--mode", mode] + (["--quick"] if quick else [])
    row: dict[str, Any] = {"mesh": mesh, "config": config, "mode": mode}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
        stdout, stderr, rc = proc.stdout, proc.stderr, proc.returncode
        outcome = "ok" if rc == 0 else "aborts"
    except subprocess.TimeoutExpired as e:

        def text(b):
            return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")

        stdout, stderr, rc = text(e.stdout), text(e.stderr), None
        outcome = "hangs"
    row["seconds"] = round(time.perf_counter() - t0, 1)
    parts = {}
    for line in stdout.splitlines():
        if line.startswith(RESULT_TAG):
            part = json.loads(line[len(RESULT_TAG) :])
            parts[part.pop("part")] = part
    row["parts"] = parts
    if outcome == "ok" and "values" not in parts:
        outcome = "aborts"
    if outcome != "ok":
        lines = [ln for ln in stderr.splitlines() if ln.strip()]
        # the cause where XLA states one (a collective's rendezvous timeout), else the last lines
        lines = [ln for ln in lines if "rendezvous" in ln or "Error" in ln] or lines
        if "ModuleNotFoundError: No module named 'psgd_jax'" in stderr:
            outcome = "not installed"
        row["error"] = " | ".join(lines[-3:])[-600:]
        row["exit"] = rc
        row["stage"] = "after " + (list(parts)[-1] if parts else "start")
    row["outcome"] = outcome
    main = parts.get("set_mesh", {})
    values = parts.get("values", {})
    row.update(
        {
            "flops/ideal": main.get("flops/ideal"),
            "dot flops/ideal": main.get("dot flops/ideal"),
            "dot_flops_lower_bound": main.get("dot_flops_lower_bound"),
            "coll bytes/shard": main.get("coll bytes/shard"),
            "colls/step": main.get("colls/step"),
            "in loops": main.get("in loops"),
            "state/ideal": parts.get("state", {}).get("state/ideal"),
            "temp/shard": main.get("temp/shard"),
            "max rel diff": values.get("max rel diff"),
        }
    )
    return row


def _f(v: Any, fmt: str = ".3g") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, (int, float)):
        if float(v).is_integer() and abs(v) < 1e6 and fmt == ".3g":
            return str(int(v))
        return format(v, fmt)
    return str(v)


def table(rows: list[dict[str, Any]]) -> str:
    cols = [
        "mesh", "config", "mode", "outcome", "flops/ideal", "dot flops/ideal",
        "coll bytes/shard", "colls/step", "in loops", "state/ideal", "temp/shard", "max rel diff",
    ]  # fmt: skip
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * 4 + "---:|" * (len(cols) - 4)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            if c == "dot flops/ideal" and v is not None and r.get("dot_flops_lower_bound"):
                cells.append(">=" + _f(v))
            elif c == "max rel diff":
                cells.append(_f(v, ".1e"))
            else:
                cells.append(_f(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def leaf_bounds(configs: list[str], quick: bool) -> dict[str, dict[str, Any]]:
    """Per matrix-family configuration, the least FLOPs/ideal any owner assignment of whole
    leaves can reach: the dot FLOPs of the update of the tree's costliest leaf alone, on one
    device (costliest branch), over an eighth of the sum over all leaves. Each distinct shape is
    compiled once (one device, this process)."""
    import jax
    import jax.numpy as jnp
    import optax

    import rlx_optax

    shapes = tree_shapes(quick)
    out = {}
    for config in configs:
        if not config.startswith(MATRIX_FAMILIES) or config.endswith("/owner-state"):
            continue  # owner placement does the same work as its base configuration
        tx = eval(CONFIGS[config][0], {"rlx_optax": rlx_optax, "optax": optax, "LR": LR})
        per_shape = {}
        with jax.default_matmul_precision("highest"):
            for shape in sorted(set(shapes.values())):
                p = {"w": jnp.zeros(shape, jnp.float32)}
                text = jax.jit(tx.update).lower(p, tx.init(p), p).compile().as_text()
                per_shape[shape] = hlo_figures(text)["dot_flops"]
        costs = {k: per_shape[s] for k, s in shapes.items()}
        largest = max(costs, key=costs.get)
        out[config] = {
            "leaf bound": costs[largest] / (sum(costs.values()) / N_DEVICES),
            "costliest leaf": largest,
            "leaf dot flops": {"x".join(map(str, s)): f for s, f in per_shape.items()},
        }
    return out


def render(payload: dict[str, Any]) -> str:
    """The Markdown section: targets, how it was counted, the table, the failures."""
    t = TARGETS
    head = (
        f"{payload['tree']} on {N_DEVICES} fake CPU devices, jax {payload['jax']}, "
        f"{payload['date']}, {payload['cpu_count']}-core CPU. Figures of the compiled "
        "per-device programs (wall time on fake devices means nothing); main figures from the "
        "update jitted under `jax.set_mesh(mesh)` (the `input_shardings` compile is in the "
        "JSON). Targets (issue: sharded training): per-device FLOPs <= "
        f"{t['flops/ideal']}x ideal, collective bytes <= {t['coll bytes/shard']}x the parameter "
        f"shard, no collective inside any loop, largest state <= {t['state/ideal']}x ideal, "
        f"sharded vs single <= {t['max rel diff']:g}.\n\n"
        "- `flops/ideal`: XLA `cost_analysis()` flops of one device's program / (one-device "
        "flops / 8); XLA counts a loop body once and no custom call (LAPACK).\n"
        "- `dot flops/ideal`: dot FLOPs counted from the optimized HLO, loop bodies times their "
        "known trip count, costliest branch of a conditional (`>=`: a loop without a known "
        "trip count, counted once).\n"
        "- `coll bytes/shard`: per step, all-gather results + operands of all-reduce, "
        "reduce-scatter, all-to-all and collective-permute (async pairs once, loop bodies times "
        "trip count) / the device's parameter bytes. `colls/step`: collectives executed per "
        "step; `in loops`: collective instructions reachable from a while body or condition.\n"
        "- `state/ideal`: largest per-device state (`state_shardings`) / (total / 8); "
        "`temp/shard`: compiled temporaries / parameter shard bytes.\n"
        "- `max rel diff`: max over leaves of max|sharded - single| / max|single| (updates of "
        f"{STEPS} steps and the final state, float32, highest matmul precision).\n"
        "- `aborts`: the worker process died (the stage it reached is in the JSON, with the "
        "figures measured before); `hangs`: it outlived the timeout.\n"
    )
    if payload.get("modes_note"):
        head += f"- {payload['modes_note']}\n"
    failures = [
        f"- {r['mesh']} {r['config']} {r['mode']}: {r['outcome']} {r.get('stage', '')}: "
        f"`{r.get('error', '')[-300:]}`"
        for r in payload["results"]
        if r["outcome"] != "ok"
    ]
    body = head + "\n" + table(payload["results"])
    bounds = payload.get("leaf_bounds") or {}
    if bounds:
        body += (
            "\n\nWhole-leaf bound (`--leaf-bound`): owner compute gives each leaf (each matrix of "
            "a stack) one owner, so no device can do less than the costliest leaf's work. Dot "
            "FLOPs of that leaf's update alone on one device (costliest branch) / (the sum over "
            "all leaves / 8):\n\n| config | costliest leaf | leaf bound |\n|---|---|---:|\n"
        )
        body += "\n".join(
            f"| {c} | {b['costliest leaf']} | {_f(b['leaf bound'])} |"
            for c, b in sorted(bounds.items(), key=lambda cb: list(CONFIGS).index(cb[0]))
        )
    if failures:
        body += "\n\nNot completed:\n\n" + "\n".join(failures)
    return body


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small tree (width 64, 2 layers)")
    ap.add_argument("--mesh", nargs="*", choices=MESHES, default=list(MESHES))
    ap.add_argument("--config", nargs="*", choices=list(CONFIGS), default=list(CONFIGS))
    ap.add_argument(
        "--mode", nargs="*", choices=["compiler", "owner", "layouts", "-"], default=None
    )
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per configuration")
    ap.add_argument(
        "--results-dir", default=None, help="default: benchmarks/results (--quick: benchmarks/out)"
    )
    ap.add_argument(
        "--update",
        action="store_true",
        help="keep the rows of the existing results that this run does not measure again",
    )
    ap.add_argument(
        "--leaf-bound",
        action="store_true",
        help="also the whole-leaf FLOPs bound of each matrix-family configuration (one device)",
    )
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.mesh[0], args.config[0], (args.mode or ["-"])[0], args.quick)
        return

    from benchmarks import harness

    results_dir = pathlib.Path(
        args.results_dir
        or (
            harness.OUT_DIR  # smoke runs leave the committed results alone
            if args.quick or os.environ.get("RLX_OPTAX_BENCH_OUT")
            else ROOT / "benchmarks" / "results"
        )
    )
    previous = results_dir / "distributed.json"
    kept: list[dict[str, Any]] = []
    if args.update and previous.is_file():
        kept = json.loads(previous.read_text())["results"]
    rows: list[dict[str, Any]] = []
    bounds = leaf_bounds(args.config, args.quick) if args.leaf_bound else None
    text = write(results_dir, args.quick, kept, rows, bounds) if bounds else ""
    for mesh in args.mesh:
        for config in args.config:
            for mode in modes_for(config, mesh):
                if args.mode and mode not in args.mode:
                    continue
                print(f"{mesh} {config} {mode} ...", flush=True)
                row = run_one(mesh, config, mode, args.quick, args.timeout)
                print(f"  {row['outcome']} ({row['seconds']} s)", flush=True)
                rows.append(row)
                text = write(results_dir, args.quick, kept, rows)  # after every row
    print(text)


_MODES = ("compiler", "owner", "layouts", "-")


def _key(row: dict[str, Any]) -> tuple[int, int, int]:
    return (
        MESHES.index(row["mesh"]),
        list(CONFIGS).index(row["config"]),
        _MODES.index(row["mode"]),
    )


def write(
    results_dir: pathlib.Path,
    quick: bool,
    kept: list[dict[str, Any]],
    rows: list[dict[str, Any]],
    bounds: dict[str, Any] | None = None,
) -> str:
    """Write the Markdown and JSON of the rows measured so far (and of `kept` rows that were
    not measured again) and of the whole-leaf bounds (`bounds` over those of the previous
    JSON in `results_dir`); return the Markdown."""
    import jax

    from benchmarks import harness

    new = {_key(r) for r in rows}
    rows = sorted([r for r in kept if _key(r) not in new] + rows, key=_key)
    shapes = tree_shapes(quick)
    n = sum(math.prod(s) for s in shapes.values())
    payload = {
        "benchmark": "distributed",
        "date": datetime.date.today().isoformat(),
        "jax": jax.__version__,
        "cpu_count": os.cpu_count(),
        "tree": (
            f"{'quick' if quick else 'GPT-shaped'} tree ({len(shapes)} leaves, "
            f"{n / 1e6:.2f}M parameters)"
        ),
        "modes_note": (
            "mode `compiler`: `rlx_optax.owner_compute(False)`; `owner`: the default (owner "
            "compute); `layouts`: owner compute told the parameters' layouts "
            "(`rlx_optax.owner_compute(layouts=param_shardings)`, for Auto meshes); `-`: a "
            "peer, or a library without `owner_compute`"
            if owner_switch() is not None
            else "mode `-`: this library version has no `rlx_optax.owner_compute` switch"
        ),
        "targets": TARGETS,
        "results": rows,
    }
    previous = results_dir / "distributed.json"
    known = json.loads(previous.read_text()).get("leaf_bounds", {}) if previous.is_file() else {}
    known.update(bounds or {})
    if known:
        payload["leaf_bounds"] = known
    text = render(payload)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "distributed.md").write_text("# Sharded training\n\n" + text + "\n")
    (results_dir / "distributed.json").write_text(json.dumps(payload, indent=2, default=float))
    harness.write_json("distributed", payload)
    return text


if __name__ == "__main__":
    main()
