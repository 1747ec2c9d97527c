"""One process of a 2-process FSDP training run on fake CPU devices (`tests/test_multiprocess.py`).

Each process joins a `jax.distributed` runtime on 127.0.0.1, contributes its local CPU devices
(4 each, from ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` set by the parent before
Python starts), and every process runs the same program over one global "fsdp" mesh of all
devices (Auto axis type): a small GPT-shaped model whose matrices are sharded on their first
axis, its optimizer state built by ``jax.jit(tx.init, out_shardings=state_shardings(tx, params))``
and `STEPS` calls of one jitted train step with pinned in/out shardings. Cross-process
collectives go through gloo over TCP, the CPU implementation this jaxlib offers.

The gradients come from the model's next-token loss on fixed token batches, identical in every
process, so the final parameters must agree with the same steps run in one process on one
device (`train_single`, which the parent calls) up to float32 reduction order.

After each optimizer finishes, all processes gather the final parameters
(`multihost_utils.process_allgather`) and process 0 writes ``<out>/<name>.npz``; lines
``DONE <name> <seconds>`` on stdout mark progress, so that a later optimizer that hangs does not
hide the earlier results. Usage (the parent builds these command lines)::

    python tests/multiprocess_worker.py --coordinator 127.0.0.1:PORT --num-processes 2 \
        --process-id 0 --out DIR --optimizers adamw,muon,soap,kron
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rlx_optax

WIDTH = 64
LAYERS = 2
VOCAB = 256
BATCH, SEQ = 8, 16
STEPS = 4
AXIS = "fsdp"
#: name -> factory of the optimizer; the parent parametrizes its tests over these names.
OPTIMIZERS: dict[str, Callable[[], optax.GradientTransformation]] = {
    "adamw": lambda: rlx_optax.adamw(1e-3),
    "muon": lambda: rlx_optax.muon(2e-2),
    # the reference preset orthogonalises in bfloat16; float32 here, so that the comparison
    # measures the sharded program, not bfloat16 rounding of differently ordered sums
    "muon_reference": lambda: rlx_optax.muon(2e-2, behaviour="reference", ns_dtype=jnp.float32),
    "soap": lambda: rlx_optax.soap(3e-3),
    "soap_reference": lambda: rlx_optax.soap(3e-3, behaviour="reference"),
    "kron": lambda: rlx_optax.kron_psgd(1e-3),
    "kron_reference": lambda: rlx_optax.kron_psgd(1e-3, behaviour="reference"),
}


def param_shapes() -> dict[str, tuple[int, ...]]:
    """The parameter tree, flat: name -> shape. The residual scales (2 * LAYERS + 1) do not divide
    by 8 devices and stay replicated; every other leaf is split on its first axis."""
    shapes = {"embed": (VOCAB, WIDTH), "pos": (SEQ, WIDTH), "head": (WIDTH, VOCAB)}
    for i in range(LAYERS):
        shapes |= {
            f"l{i}.ln1": (WIDTH,),
            f"l{i}.qkv": (WIDTH, 3 * WIDTH),
            f"l{i}.o": (WIDTH, WIDTH),
            f"l{i}.o_b": (WIDTH,),
            f"l{i}.ln2": (WIDTH,),
            f"l{i}.up": (WIDTH, 4 * WIDTH),
            f"l{i}.up_b": (4 * WIDTH,),
            f"l{i}.down": (4 * WIDTH, WIDTH),
        }
    shapes |= {"ln_f": (WIDTH,), "res_scale": (2 * LAYERS + 1,)}
    return shapes


def partition_spec(shape: tuple[int, ...], devices: int) -> jax.sharding.PartitionSpec:
    """``P("fsdp", None, ...)`` when the first axis divides the device count, else replicated."""
    if shape and shape[0] % devices == 0:
        return jax.sharding.PartitionSpec(AXIS, *([None] * (len(shape) - 1)))
    return jax.sharding.PartitionSpec()


def initial_params() -> dict[str, np.ndarray]:
    """Deterministic host values: scaled normal matrices, norms and residual scales near one."""
    rng = np.random.default_rng(0)
    params = {}
    for name, shape in param_shapes().items():
        if len(shape) == 2:
            value = rng.normal(size=shape) / math.sqrt(shape[0])
        elif name.endswith("_b"):
            value = 0.1 * rng.normal(size=shape)
        else:
            value = 1.0 + 0.1 * rng.normal(size=shape)
        params[name] = value.astype(np.float32)
    return params


def token_batches() -> np.ndarray:
    """`STEPS` fixed token batches of shape (BATCH, SEQ + 1): inputs and shifted targets."""
    rng = np.random.default_rng(1)
    return rng.integers(0, VOCAB, size=(STEPS, BATCH, SEQ + 1), dtype=np.int32)


def _rms_norm(x, scale):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * scale[None, None]


def loss_fn(params, tokens):
    """Mean next-token cross-entropy of a 2-layer, 4-head causal transformer."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    rs = params["res_scale"]
    x = params["embed"][inputs] + params["pos"][None]
    heads = 4
    mask = jnp.tril(jnp.ones((SEQ, SEQ), dtype=bool))
    for i in range(LAYERS):
        h = _rms_norm(x, params[f"l{i}.ln1"])
        qkv = h @ params[f"l{i}.qkv"]
        q, k, v = (t.reshape(BATCH, SEQ, heads, WIDTH // heads) for t in jnp.split(qkv, 3, -1))
        att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(WIDTH // heads)
        att = jax.nn.softmax(jnp.where(mask[None, None], att, -1e9), axis=-1)
        a = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(BATCH, SEQ, WIDTH)
        x = x + rs[2 * i] * (a @ params[f"l{i}.o"] + params[f"l{i}.o_b"][None, None])
        h = _rms_norm(x, params[f"l{i}.ln2"])
        m = (
            jax.nn.gelu(h @ params[f"l{i}.up"] + params[f"l{i}.up_b"][None, None])
            @ params[f"l{i}.down"]
        )
        x = x + rs[2 * i + 1] * m
    logits = _rms_norm(x, params["ln_f"]) @ params["head"] * rs[-1]
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


def make_step(tx: optax.GradientTransformation):
    def step(params, state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    return step


def train_single(name: str) -> tuple[dict[str, np.ndarray], list[float], dict[str, np.ndarray]]:
    """The reference: the same steps in this process on its default device, no mesh.

    Returns the final parameters, the losses, and the final parameters of a second run (same
    compiled step) whose initial parameters are scaled by ``1 + 2**-23`` (one float32 ulp):
    how far that moves the result is the run's own sensitivity to rounding.
    """
    tx = OPTIMIZERS[name]()
    step = jax.jit(make_step(tx))
    runs = []
    for scale in (np.float32(1), np.float32(1 + 2**-23)):
        params = {k: jnp.asarray(v * scale) for k, v in initial_params().items()}
        state = tx.init(params)
        losses = []
        for tokens in token_batches():
            params, state, loss = step(params, state, jnp.asarray(tokens))
            losses.append(float(loss))
        runs.append(({k: np.asarray(v) for k, v in params.items()}, losses))
    (params, losses), (perturbed, _) = runs
    return params, losses, perturbed


def _global(value: np.ndarray, sharding) -> jax.Array:
    """A global array from a host value every process holds in full."""
    return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])


def train_sharded(name: str, mesh) -> tuple[dict[str, np.ndarray], list[float]]:
    """`STEPS` steps on `mesh`; returns the gathered final parameters and the losses."""
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    tx = OPTIMIZERS[name]()
    host = initial_params()
    param_sh = {k: NamedSharding(mesh, partition_spec(v.shape, mesh.size)) for k, v in host.items()}
    params = {k: _global(v, param_sh[k]) for k, v in host.items()}
    state_sh = rlx_optax.state_shardings(tx, params)
    state = jax.jit(tx.init, out_shardings=state_sh)(params)
    replicated = NamedSharding(mesh, P())
    step = jax.jit(
        make_step(tx),
        in_shardings=(param_sh, state_sh, replicated),
        out_shardings=(param_sh, state_sh, replicated),
        donate_argnums=(0, 1),
    )
    losses = []
    for tokens in token_batches():
        params, state, loss = step(params, state, _global(tokens, replicated))
        losses.append(float(loss.addressable_data(0)))  # replicated: every process holds it
    gathered = multihost_utils.process_allgather(params, tiled=True)
    return {k: np.asarray(v) for k, v in gathered.items()}, losses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coordinator", required=True, help="127.0.0.1:PORT")
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--out", required=True, help="folder for process 0's .npz files")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    args = parser.parse_args(argv)

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_numpy_rank_promotion", "raise")
    # gloo over TCP: the cross-process CPU collectives of this jaxlib (also its default)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=args.coordinator,
        num_processes=args.num_processes,
        process_id=args.process_id,
        coordinator_bind_address=args.coordinator,
        initialization_timeout=60,
    )
    from jax.sharding import AxisType

    print(
        f"READY process {jax.process_index()}/{jax.process_count()} "
        f"local {jax.local_device_count()} global {jax.device_count()}",
        flush=True,
    )
    mesh = jax.make_mesh((jax.device_count(),), (AXIS,), axis_types=(AxisType.Auto,))
    for name in args.optimizers.split(","):
        start = time.perf_counter()
        params, losses = train_sharded(name, mesh)
        if jax.process_index() == 0:
            np.savez(os.path.join(args.out, f"{name}.npz"), __losses__=np.asarray(losses), **params)
        print(f"DONE {name} {time.perf_counter() - start:.2f}", flush=True)
    jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
