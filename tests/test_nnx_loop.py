"""The loop Flax NNX users write, for every registered configuration (defaults and presets).

An NNX transformer (`nnx.Embed`, `nnx.MultiHeadAttention`, `nnx.LayerNorm`,
`nnx.Linear`), `nnx.Optimizer`, one `nnx.jit` over gradient and update. Run `SPLIT` steps,
checkpoint, run `SPLIT` more: that is the uninterrupted run. Then restore the checkpoint into
fresh objects (a new model and optimizer, moved one step on another batch) by each path users
take (orbax `StandardCheckpointer` and `CheckpointManager` on `nnx.state`, `nnx.to_pure_dict`,
the library's `Trainer`), run the same `SPLIT` steps and require the model and optimizer state
of the uninterrupted run bit for bit.
"""

from __future__ import annotations

import functools
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import rlx_optax
from rlx_optax._src import registry

CONFIGS = registry.configurations()
IDS = [c.label for c in CONFIGS]
BY_LABEL = {c.label: c for c in CONFIGS}
SPLIT = 2
VOCAB, WIDTH, HEADS, SEQ, BATCH, LAYERS = 11, 8, 2, 5, 3, 1
LEARNING_RATE = 1e-3


class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(WIDTH, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=HEADS, in_features=WIDTH, decode=False, rngs=rngs
        )
        self.norm2 = nnx.LayerNorm(WIDTH, rngs=rngs)
        self.up = nnx.Linear(WIDTH, 2 * WIDTH, rngs=rngs)
        self.down = nnx.Linear(2 * WIDTH, WIDTH, rngs=rngs)

    def __call__(self, x, mask):
        x = x + self.attn(self.norm1(x), mask=mask)
        return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class TinyLM(nnx.Module):
    def __init__(self, seed: int):
        rngs = nnx.Rngs(seed)
        self.embed = nnx.Embed(VOCAB, WIDTH, rngs=rngs)
        self.blocks = nnx.List([Block(rngs) for _ in range(LAYERS)])
        self.norm = nnx.LayerNorm(WIDTH, rngs=rngs)
        self.head = nnx.Linear(WIDTH, VOCAB, rngs=rngs)

    def __call__(self, tokens):
        mask = nnx.make_causal_mask(tokens)
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.norm(x))


def loss_fn(model, tokens):
    logits = model(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def batch(i: int) -> jax.Array:
    rng = np.random.default_rng(1000 + i)
    return jnp.asarray(rng.integers(0, VOCAB, size=(BATCH, SEQ + 1)), jnp.int32)


def update_kwargs(label: str, model, grads) -> dict:
    row = BY_LABEL[label].row
    if row.update_extra is None:
        return {}
    return row.update_extra(nnx.state(model, nnx.Param), grads)


@nnx.jit(static_argnums=0)
def train_step(label: str, model, optimizer, tokens):
    loss, grads = nnx.value_and_grad(loss_fn)(model, tokens)
    optimizer.update(model, grads, **update_kwargs(label, model, grads))
    return loss


@functools.cache
def transform(label: str) -> optax.GradientTransformation:
    """One transform per configuration: fresh optimizers built on it share the compiled step."""
    return BY_LABEL[label].make(LEARNING_RATE)


def committed(*objects) -> None:
    """Commit the objects' arrays to the device, as arrays restored by orbax are: the jitted
    step then sees one signature before and after a restore (committed arrays are another
    cache key, so a user's first step after a restore compiles once more; the tests spare it)."""
    device = jax.devices()[0]
    for obj in objects:
        nnx.update(obj, jax.device_put(nnx.state(obj), device))


def fresh(config, moved: bool = False):
    """A new model and optimizer; `moved`: after one step on another batch, so that neither
    equals the checkpoint nor the initial state (same seed: the compiled step is reused)."""
    model = TinyLM(0)
    optimizer = nnx.Optimizer(model, transform(config.label), wrt=nnx.Param)
    committed(model, optimizer)
    if moved:
        run(config, model, optimizer, [99])
    return model, optimizer


def run(config, model, optimizer, steps) -> None:
    for i in steps:
        loss = train_step(config.label, model, optimizer, batch(i))
        assert np.isfinite(float(loss)), f"{config.label}: loss {float(loss)} at step {i}"


def assert_same(got, want, what: str) -> None:
    got, want = nnx.to_pure_dict(got), nnx.to_pure_dict(want)
    paths_got = jax.tree_util.tree_flatten_with_path(got)[0]
    paths_want = jax.tree_util.tree_flatten_with_path(want)[0]
    assert [p for p, _ in paths_got] == [p for p, _ in paths_want], what
    for (path, a), (_, b) in zip(paths_got, paths_want, strict=True):
        if jnp.issubdtype(jnp.asarray(b).dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(
            np.asarray(a), np.asarray(b), err_msg=f"{what}: {jax.tree_util.keystr(path)}"
        )


def restore_standard(directory, model, optimizer) -> None:
    target = {"model": nnx.state(model), "opt": nnx.state(optimizer)}
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(directory / "standard", target)
    nnx.update(model, restored["model"])
    nnx.update(optimizer, restored["opt"])


def restore_manager(directory, model, optimizer) -> None:
    target = {"model": nnx.state(model), "opt": nnx.state(optimizer)}
    with ocp.CheckpointManager(directory / "manager") as manager:
        restored = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(target))
    nnx.update(model, restored["model"])
    nnx.update(optimizer, restored["opt"])


def restore_pure_dict(directory, model, optimizer) -> None:
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(directory / "pure")
    for obj, key in ((model, "model"), (optimizer, "opt")):
        state = nnx.state(obj)
        nnx.replace_by_pure_dict(state, restored[key])
        nnx.update(obj, state)


def save_all(directory, model, optimizer) -> None:
    state = {"model": nnx.state(model), "opt": nnx.state(optimizer)}
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / "standard", state)
        pure = {"model": nnx.to_pure_dict(state["model"]), "opt": nnx.to_pure_dict(state["opt"])}
        checkpointer.save(directory / "pure", pure)
    with ocp.CheckpointManager(directory / "manager") as manager:
        manager.save(SPLIT, args=ocp.args.StandardSave(state))
        manager.wait_until_finished()


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_nnx_loop_checkpoints_resume_bit_exactly(config, tmp_path):
    model, optimizer = fresh(config)
    run(config, model, optimizer, range(SPLIT))
    save_all(tmp_path, model, optimizer)
    run(config, model, optimizer, range(SPLIT, 2 * SPLIT))

    for restore in (restore_standard, restore_manager, restore_pure_dict):
        resumed_model, resumed_opt = fresh(config, moved=True)
        restore(tmp_path, resumed_model, resumed_opt)
        run(config, resumed_model, resumed_opt, range(SPLIT, 2 * SPLIT))
        what = f"{config.label} via {restore.__name__}"
        assert_same(nnx.state(resumed_model), nnx.state(model), what)
        assert_same(nnx.state(resumed_opt), nnx.state(optimizer), what)


@functools.cache
def trainer_extra(label: str):
    row = BY_LABEL[label].row
    if row.update_extra is None:
        return None
    return lambda ctx: row.update_extra(ctx.params, ctx.grads)


def trainer(config, moved: bool = False) -> rlx_optax.Trainer:
    extra = trainer_extra(config.label)
    out = rlx_optax.Trainer(TinyLM(0), transform(config.label), loss_fn, update_kwargs=extra)
    committed(out.model, out.optimizer)
    if moved:
        out.train_step(batch(99))
    return out


#: The Trainer's checkpoints are `nnx.to_pure_dict` through orbax (checked above for every
#: configuration); CI runs the Trainer path for one configuration of each kind of state (per-
#: axis matrices, a PRNG key, an AdamW partition, extra `update` arguments, moments only) and
#: `-m slow` for all 21.
TRAINER_IN_CI = {"adamw", "soap", "kron_psgd/reference", "muon/reference", "sophia", "mars/shampoo"}
TRAINER_CONFIGS = [
    pytest.param(c, id=c.label, marks=() if c.label in TRAINER_IN_CI else pytest.mark.slow)
    for c in CONFIGS
]


@pytest.mark.parametrize("config", TRAINER_CONFIGS)
def test_trainer_checkpoints_resume_bit_exactly(config, tmp_path):
    first = trainer(config)
    for i in range(SPLIT):
        first.train_step(batch(i))
    first.save(str(tmp_path / "trainer"))
    for i in range(SPLIT, 2 * SPLIT):
        first.train_step(batch(i))

    resumed = trainer(config, moved=True)
    resumed.restore(str(tmp_path / "trainer"))
    for i in range(SPLIT, 2 * SPLIT):
        resumed.train_step(batch(i))
    assert_same(nnx.state(resumed.model), nnx.state(first.model), f"{config.label} Trainer")
    assert_same(nnx.state(resumed.optimizer), nnx.state(first.optimizer), config.label)


RELEASE_0_1_0 = pathlib.Path(__file__).parent / "checkpoints" / "nnx_release_0_1_0"


def test_checkpoints_of_release_0_1_0_restore():
    """An orbax checkpoint of this loop written by release 0.1.0 (13 families: all but SOAP
    and Kron, whose per-axis state changed layout) restores into today's objects, value for
    value against the NumPy copy written beside it (`tests/nnx_checkpoint_record.py`), and
    training continues from it."""
    stored = np.load(RELEASE_0_1_0.with_suffix(".npz"))
    labels = sorted({key.split("[")[0] for key in stored.files})
    assert len(labels) == 13 and "soap" not in labels and "kron_psgd" not in labels
    objects = {label: fresh(BY_LABEL[label]) for label in labels}
    target = {
        label: {"model": nnx.state(model), "opt": nnx.state(optimizer)}
        for label, (model, optimizer) in objects.items()
    }
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(RELEASE_0_1_0.absolute(), target)
    for label, (model, optimizer) in objects.items():
        nnx.update(model, restored[label]["model"])
        nnx.update(optimizer, restored[label]["opt"])
        pure = {key: nnx.to_pure_dict(restored[label][key]) for key in ("model", "opt")}
        leaves = jax.tree_util.tree_flatten_with_path(pure)[0]
        assert len(leaves) == sum(key.startswith(label + "[") for key in stored.files)
        for path, value in leaves:
            key = label + jax.tree_util.keystr(path)
            np.testing.assert_array_equal(np.asarray(value), stored[key], err_msg=key)
        run(BY_LABEL[label], model, optimizer, range(SPLIT, 2 * SPLIT))


def test_checkpointing_guide_runs():
    """The examples of docs/checkpointing.md, in order, in one namespace."""
    text = (pathlib.Path(__file__).parents[1] / "docs" / "checkpointing.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 4
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/checkpointing.md", "exec"), namespace)  # noqa: S102
