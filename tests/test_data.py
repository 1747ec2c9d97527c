"""DataLoader (seeded shuffle, determinism across workers) and ArrayRecord record files."""

import itertools
import math
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import rlx_optax
from rlx_optax._src import data as data_lib


class SquareDataset:
    """Item i = (float32 vector [i, i*i], int64 target i % 3). Module level: picklable."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return np.array([i, i * i], np.float32), np.int64(i % 3)


def batches_of(iterable):
    return [(x.copy(), y.copy()) for x, y in iterable]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
        assert xa.dtype == xb.dtype and ya.dtype == yb.dtype


# ---------------------------------------------------------------- batching


@pytest.mark.parametrize("drop_last, sizes", [(False, [4, 4, 2]), (True, [4, 4])])
def test_batches_cover_dataset_in_order(drop_last, sizes):
    loader = rlx_optax.DataLoader(SquareDataset(10), 4, drop_last=drop_last)
    got = batches_of(loader)
    assert [len(y) for _, y in got] == sizes == [4] * (len(sizes) - 1) + [sizes[-1]]
    assert len(loader) == len(sizes)
    xs = np.concatenate([x for x, _ in got])
    np.testing.assert_array_equal(xs[:, 0], np.arange(sum(sizes)))
    assert got[0][0].shape == (4, 2) and got[0][0].dtype == np.float32
    assert got[0][1].dtype == np.int64


def test_dict_items_and_custom_collate():
    items = [{"x": np.ones(3) * i, "y": i} for i in range(5)]
    (first, second) = list(rlx_optax.DataLoader(items, 3))
    assert first["x"].shape == (3, 3) and second["y"].tolist() == [3, 4]
    lists = list(rlx_optax.DataLoader(list(range(5)), 2, collate_fn=list))
    assert lists == [[0, 1], [2, 3], [4]]


def test_empty_dataset_gives_no_batches():
    assert list(rlx_optax.DataLoader([], 4)) == []


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 2, "prefetch": 0}, "prefetch"),
        ({"batch_size": 2, "num_workers": -1}, "num_workers"),
        ({"batch_size": 2, "worker_type": "fiber"}, "worker_type"),
    ],
)
def test_bad_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        rlx_optax.DataLoader(SquareDataset(4), **kwargs)


# ---------------------------------------------------------------- shuffle


def test_shuffle_is_seeded_reproducible_and_differs_per_epoch():
    a = rlx_optax.DataLoader(SquareDataset(50), 8, shuffle=True, seed=3)
    b = rlx_optax.DataLoader(SquareDataset(50), 8, shuffle=True, seed=3)
    epochs_a = [np.concatenate([x[:, 0] for x, _ in a]) for _ in range(3)]
    epochs_b = [np.concatenate([x[:, 0] for x, _ in b]) for _ in range(3)]
    for ea, eb in zip(epochs_a, epochs_b, strict=True):
        np.testing.assert_array_equal(ea, eb)  # same seed, same stream in a fresh loader
        np.testing.assert_array_equal(np.sort(ea), np.arange(50))  # a permutation
    assert not np.array_equal(epochs_a[0], epochs_a[1])  # reshuffled per epoch
    assert not np.array_equal(epochs_a[0], np.arange(50))
    other = rlx_optax.DataLoader(SquareDataset(50), 8, shuffle=True, seed=4)
    assert not np.array_equal(a.order(0), other.order(0))
    # iter_epoch replays an epoch without moving the counter.
    replay = np.concatenate([x[:, 0] for x, _ in a.iter_epoch(1)])
    np.testing.assert_array_equal(replay, epochs_a[1])
    assert a.epoch == 3


def test_shuffle_is_unbiased():
    """RUMUS's LCG reaches 12 of the 24 orderings of 4 items; ours must be uniform."""
    loader = rlx_optax.DataLoader(list(range(4)), 4, shuffle=True, seed=0)
    epochs = 24 * 500
    counts = {}
    for e in range(epochs):
        key = tuple(loader.order(e))
        counts[key] = counts.get(key, 0) + 1
    assert len(counts) == 24
    observed = np.array([counts[p] for p in itertools.permutations(range(4))])
    expected = epochs / 24
    chi2 = float(np.sum((observed - expected) ** 2 / expected))
    assert chi2 < 49.73  # chi-square, 23 degrees of freedom, p = 0.001
    # and each item lands in each position equally often
    positions = np.zeros((4, 4))
    for e in range(2000):
        positions[np.arange(4), loader.order(e)] += 1
    assert np.all(np.abs(positions - 500) < 5 * math.sqrt(500 * 0.75))


def test_state_dict_resumes_epoch_stream():
    a = rlx_optax.DataLoader(SquareDataset(20), 6, shuffle=True, seed=7)
    for _ in a:
        pass
    b = rlx_optax.DataLoader(SquareDataset(20), 6, shuffle=True, seed=0)
    b.load_state_dict(a.state_dict())
    assert_same_batches(batches_of(a), batches_of(b))


# ---------------------------------------------------------------- workers


@pytest.mark.parametrize("drop_last", [False, True])
def test_same_batches_for_0_1_2_thread_workers(drop_last):
    def run(workers):
        loader = rlx_optax.DataLoader(
            SquareDataset(37), 5, True, drop_last, num_workers=workers, prefetch=2, seed=11
        )
        return [batches_of(loader) for _ in range(3)]

    reference = run(0)
    for workers in (1, 2):
        for got, want in zip(run(workers), reference, strict=True):
            assert_same_batches(got, want)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_same_batches_for_process_workers(tmp_path, workers):
    """grain's multiprocess prefetch. Slow (about 5-15 s: it starts worker processes)."""
    path = str(tmp_path / "squares.arrayrecord")
    with rlx_optax.RecordWriter(path) as writer:
        for i in range(23):
            writer.append(*SquareDataset(23)[i])
    records = rlx_optax.RecordDataset(path)
    want = batches_of(rlx_optax.DataLoader(records, 4, True, seed=5).iter_epoch(1))
    loader = rlx_optax.DataLoader(
        records, 4, True, num_workers=workers, seed=5, worker_type="process"
    )
    assert_same_batches(batches_of(loader.iter_epoch(1)), want)


class BrokenItem(SquareDataset):
    def __getitem__(self, i):
        if i == 6:
            raise KeyError("item 6 is broken")
        return super().__getitem__(i)


@pytest.mark.parametrize("workers", [0, 2])
def test_item_errors_reach_the_caller(workers):
    """RUMUS's workers drop a failing batch silently; here the error reaches the loop."""
    loader = rlx_optax.DataLoader(BrokenItem(10), 4, num_workers=workers)
    with pytest.raises(KeyError, match="item 6"):
        list(loader)


# ---------------------------------------------------------------- record files


def write_records(path, n, finish=True):
    writer = rlx_optax.RecordWriter(path)
    for i in range(n):
        writer.append(np.arange(i + 1, dtype=np.float32), np.int64(i), np.eye(2, dtype=np.float16))
    if finish:
        writer.finish()
    return writer


def test_records_round_trip_with_random_access(tmp_path):
    path = str(tmp_path / "a.arrayrecord")
    write_records(path, 30)
    ds = rlx_optax.RecordDataset(path)
    assert len(ds) == 30
    for i in [17, 0, 29, 3, -1]:
        x, y, m = ds[i]
        j = i % 30
        np.testing.assert_array_equal(x, np.arange(j + 1, dtype=np.float32))
        assert x.dtype == np.float32 and int(y) == j and m.dtype == np.float16
    with pytest.raises(IndexError):
        ds[30]


def test_empty_finished_file_is_valid(tmp_path):
    path = str(tmp_path / "empty.arrayrecord")
    rlx_optax.RecordWriter(path).finish()
    assert len(rlx_optax.RecordDataset(path)) == 0


def test_unfinished_file_raises_never_reads_empty(tmp_path):
    path = str(tmp_path / "unfinished.arrayrecord")
    writer = write_records(path, 5, finish=False)  # still open: nothing flushed yet
    with pytest.raises(rlx_optax.RecordFileError, match="finish"):
        rlx_optax.RecordDataset(path)
    writer._writer.close()  # closed, but finish() never wrote the end marker
    with pytest.raises(rlx_optax.RecordFileError, match="finish"):
        rlx_optax.RecordDataset(path)


def test_exception_in_with_block_leaves_file_unfinished(tmp_path):
    path = str(tmp_path / "crashed.arrayrecord")
    with pytest.raises(KeyError):
        with rlx_optax.RecordWriter(path) as writer:
            writer.append(np.zeros(2))
            raise KeyError("simulated crash while writing")
    with pytest.raises(rlx_optax.RecordFileError):
        rlx_optax.RecordDataset(path)


@pytest.mark.parametrize("keep", ["64KiB", "half", "minus1", "zero"])
def test_truncated_file_raises(tmp_path, keep):
    path = str(tmp_path / "full.arrayrecord")
    write_records(path, 40)
    blob = pathlib.Path(path).read_bytes()
    cut = {"64KiB": 65536, "half": len(blob) // 2, "minus1": len(blob) - 1, "zero": 0}[keep]
    assert cut < len(blob)
    bad = str(tmp_path / "cut.arrayrecord")
    with open(bad, "wb") as f:
        f.write(blob[:cut])
    with pytest.raises(rlx_optax.RecordFileError):
        ds = rlx_optax.RecordDataset(bad)
        [ds[i] for i in range(len(ds))]


def test_corrupt_record_raises(tmp_path):
    path = str(tmp_path / "ok.arrayrecord")
    write_records(path, 10)
    blob = bytearray(pathlib.Path(path).read_bytes())
    blob[100] ^= 0xFF  # inside the first data chunk
    bad = str(tmp_path / "flipped.arrayrecord")
    with open(bad, "wb") as f:
        f.write(bytes(blob))
    with pytest.raises(rlx_optax.RecordFileError, match="corrupt"):
        ds = rlx_optax.RecordDataset(bad)
        [ds[i] for i in range(len(ds))]


def test_missing_file_and_object_arrays(tmp_path):
    with pytest.raises(FileNotFoundError):
        rlx_optax.RecordDataset(str(tmp_path / "nope.arrayrecord"))
    writer = rlx_optax.RecordWriter(str(tmp_path / "o.arrayrecord"))
    with pytest.raises(ValueError, match="numeric"):
        writer.append(np.array([{"a": 1}], dtype=object))
    writer.finish()
    with pytest.raises(ValueError, match="finish"):
        writer.append(np.zeros(1))


def test_record_codec_uses_npy_not_pickle():
    blob = data_lib._encode([np.arange(3, dtype=np.int16), np.float32(2.5)])
    assert blob.count(b"\x93NUMPY") == 2  # one .npy payload per array
    x, y = data_lib._decode(blob)
    np.testing.assert_array_equal(x, [0, 1, 2])
    assert x.dtype == np.int16 and y.dtype == np.float32 and float(y) == 2.5


# ---------------------------------------------------------------- optional extras


def test_import_without_extras():
    """`import rlx_optax` and the NumPy loader work with flax, grain, array_record missing."""
    code = textwrap.dedent(
        """
        import sys
        for name in ("flax", "grain", "array_record", "orbax"):
            sys.modules[name] = None  # make the import fail
        import numpy as np, rlx_optax
        batches = list(rlx_optax.DataLoader([np.float32(i) for i in range(5)], 2, shuffle=True))
        assert [len(b) for b in batches] == [2, 2, 1]
        for make in (lambda: rlx_optax.Trainer, lambda: rlx_optax.RecordDataset("x"),
                     lambda: list(rlx_optax.DataLoader([1, 2], 1, num_workers=1))):
            try:
                make()
            except ImportError as err:
                assert "rlx_optax[" in str(err), err
            else:
                raise AssertionError("no ImportError")
        print("ok")
        """
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"
