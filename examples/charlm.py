"""A small character-level transformer on Python's own standard library sources.

The data ships with every Python: a fixed list of standard-library modules (`STDLIB_FILES`),
read as UTF-8 bytes from the running interpreter's library directory and concatenated in
that order. The byte stream is the token stream (vocabulary 256); the last `VAL_FRACTION` of
it is the validation split. For a given Python version the run is deterministic (the sources
differ a little between versions).

Used by `examples/demo.py`, `benchmarks/convergence.py` and the notebooks.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import sysconfig
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

# Pure-Python modules present in every CPython 3.10+ build, in a fixed order (~420 KB).
STDLIB_FILES: tuple[str, ...] = (
    "argparse.py",
    "textwrap.py",
    "json/__init__.py",
    "json/decoder.py",
    "json/encoder.py",
    "string.py",
    "functools.py",
    "heapq.py",
    "bisect.py",
    "contextlib.py",
    "abc.py",
    "fractions.py",
    "statistics.py",
    "random.py",
)
VAL_FRACTION = 0.1
VOCAB = 256


def load_corpus(files: tuple[str, ...] = STDLIB_FILES) -> np.ndarray:
    """The concatenated sources as a uint8 array (missing files raise, naming the file)."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for name in files:
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(f"standard-library source {name!r} not found under the stdlib")
        parts.append(path.read_bytes())
    return np.frombuffer(b"\n".join(parts), dtype=np.uint8)


def split(data: np.ndarray, val_fraction: float = VAL_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation): the last `val_fraction` of the stream is held out."""
    cut = int(len(data) * (1.0 - val_fraction))
    return data[:cut], data[cut:]


def windows(data: np.ndarray, starts: np.ndarray, context: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs ``data[s : s + context]`` and next-byte targets, as int32 (batch, context)."""
    idx = starts[:, None] + np.arange(context)[None, :]
    return data[idx].astype(np.int32), data[idx + 1].astype(np.int32)


def train_batches(
    data: np.ndarray, batch_size: int, context: int, seed: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """An endless stream of uniformly drawn windows, reproducible from `seed`."""
    rng = np.random.default_rng(seed)
    while True:
        yield windows(data, rng.integers(0, len(data) - context - 1, batch_size), context)


def eval_batches(
    data: np.ndarray, batch_size: int, context: int, n_batches: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Fixed, evenly spaced validation windows (the same for every optimizer)."""
    starts = np.linspace(0, len(data) - context - 2, batch_size * n_batches).astype(np.int64)
    return [windows(data, s, context) for s in np.split(starts, n_batches) if len(s) == batch_size]


@dataclasses.dataclass(frozen=True)
class Config:
    """Model size. The defaults are the demo's: about 0.46M parameters."""

    context: int = 128
    width: int = 128
    layers: int = 2
    heads: int = 4
    mlp_ratio: int = 4


class Block(nnx.Module):
    """Pre-norm causal self-attention and MLP. Every kernel is rank 2, so matrix-aware
    optimizers (Muon, SOAP, Kron) see all of them as matrices."""

    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        d = cfg.width
        self.heads = cfg.heads
        self.norm1 = nnx.LayerNorm(d, rngs=rngs)
        self.qkv = nnx.Linear(d, 3 * d, use_bias=False, rngs=rngs)
        self.proj = nnx.Linear(d, d, use_bias=False, rngs=rngs)
        self.norm2 = nnx.LayerNorm(d, rngs=rngs)
        self.mlp_in = nnx.Linear(d, cfg.mlp_ratio * d, rngs=rngs)
        self.mlp_out = nnx.Linear(cfg.mlp_ratio * d, d, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        h = self.heads
        q, k, v = jnp.split(self.qkv(self.norm1(x)), 3, axis=-1)
        q, k, v = (a.reshape(b, t, h, d // h) for a in (q, k, v))
        att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // h)
        mask = jnp.tril(jnp.ones((t, t), bool))
        att = jax.nn.softmax(jnp.where(mask[None, None], att, -1e9), axis=-1)
        y = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.norm2(x))))


class CharTransformer(nnx.Module):
    """Byte embedding + learned positions, `cfg.layers` blocks, a final norm and a linear head."""

    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, cfg.width, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (cfg.context, cfg.width)))
        self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.layers)])
        self.norm = nnx.LayerNorm(cfg.width, rngs=rngs)
        self.head = nnx.Linear(cfg.width, VOCAB, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.embed(tokens) + self.pos[...][None, : tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def loss_fn(model: CharTransformer, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Mean next-byte cross-entropy in nats."""
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@functools.partial(jax.jit, static_argnums=0)
def _eval_loss(graphdef: Any, state: Any, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
    return loss_fn(nnx.merge(graphdef, state), batch)


def validation_loss(model: CharTransformer, batches: list) -> float:
    """Mean loss over `batches` (one compiled forward pass, reused across calls)."""
    graphdef, state = nnx.split(model)
    return float(np.mean([float(_eval_loss(graphdef, state, b)) for b in batches]))


def n_params(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
