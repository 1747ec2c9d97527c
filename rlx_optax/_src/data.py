"""Data loading: a seeded, deterministic `DataLoader` and ArrayRecord files of array tuples.

The RUMUS page's `DataLoader`, `RecordWriter` and `RecordDataset`, rebuilt on grain and
ArrayRecord (the optional extra ``rlx_optax[data]``, imported only when used) and keeping
none of RUMUS's pitfalls:

* the shuffle is NumPy's unbiased Fisher-Yates, seeded by ``(seed, epoch)``: every epoch gets
  its own permutation, and the same seed gives the same epochs in any process;
* batch `b` of an epoch is always the same items in the same order, whatever `num_workers`
  (grain's order-preserving prefetch; RUMUS hands batches out in completion order);
* `num_workers=0` is plain NumPy on the calling thread (easy to debug, no extra needed);
* a record file that was never finished, truncated or corrupted raises `RecordFileError`
  instead of reading as an empty dataset.
"""

from __future__ import annotations

import io
import os
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, Protocol

import jax
import numpy as np

from rlx_optax._src import common


class Dataset(Protocol):
    """Anything with `__len__` and `__getitem__(int)`: a list, an array, `RecordDataset`."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...


def stack_items(items: Sequence[Any]) -> Any:
    """The default collate: stack each leaf of the items along a new first axis.

    Items are usually ``(input, target)`` pairs, as in RUMUS, but any pytree of arrays works
    (dicts, tuples, scalars).
    """
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *items)


def _import_grain():
    try:
        import grain
    except ModuleNotFoundError as err:
        raise ImportError(
            "DataLoader with num_workers > 0 needs grain: pip install 'rlx_optax[data]' "
            "(or use num_workers=0)"
        ) from err
    return grain


def _absl_flags_workaround() -> None:
    # grain 0.2.18 reads an absl flag in its worker processes and raises
    # UnparsedFlagAccessError when the program never parsed flags (google/grain#1355, fixed
    # after 0.2.18). Marking flags as parsed is harmless for programs that do not use absl.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class _MakeBatch:
    """Batch `b` of one epoch: items ``order[b*B:(b+1)*B]`` collated. Picklable for workers."""

    def __init__(self, dataset: Dataset, order: np.ndarray, batch_size: int, collate: Callable):
        self.dataset, self.order, self.batch_size, self.collate = (
            dataset,
            order,
            batch_size,
            collate,
        )

    def __call__(self, b: int) -> Any:
        idx = self.order[b * self.batch_size : (b + 1) * self.batch_size]
        return self.collate([self.dataset[int(i)] for i in idx])


class DataLoader:
    """Batches of a dataset, one epoch per `iter()`; seeded shuffle, deterministic with workers.

    Args:
      dataset: any object with `__len__` and `__getitem__(int)`.
      batch_size: items per batch (>= 1).
      shuffle: reshuffle every epoch with the permutation of ``(seed, epoch)``.
      drop_last: drop a short final batch (``len(loader)`` is then ⌊N/B⌋, else ⌈N/B⌉).
      num_workers: 0 builds batches on the calling thread with NumPy only; ``k > 0`` builds
        them in `k` grain workers with prefetch (needs ``rlx_optax[data]``).
      prefetch: batches buffered per worker (>= 1; unused when `num_workers=0`).
      seed: shuffle seed.
      worker_type: ``"thread"`` (default, like RUMUS; fine for NumPy and file reads, which
        release the GIL) or ``"process"`` (grain's `mp_prefetch`; the dataset and
        `collate_fn` must be picklable, each epoch starts its processes, about 1-3 s, and a
        script needs the usual ``if __name__ == "__main__":`` guard).
      collate_fn: list of items -> batch; default `stack_items`.

    Each ``iter(loader)`` runs epoch `loader.epoch` and then advances the counter, so a
    ``for`` loop per epoch sees a new order each time. ``iter_epoch(e)`` runs a given epoch
    without touching the counter; `state_dict`/`load_state_dict` carry the counter across a
    checkpoint. The permutation is NumPy's `Generator.permutation` (unbiased Fisher-Yates on
    PCG64), stable for a given NumPy release.

    Example:
      >>> import numpy as np, rlx_optax
      >>> data = [(np.float32(i), np.int32(i % 2)) for i in range(10)]
      >>> loader = rlx_optax.DataLoader(data, batch_size=4, shuffle=True, seed=0)
      >>> [x.shape for x, _ in loader]
      [(4,), (4,), (2,)]
      >>> sorted(np.concatenate([x for x, _ in loader.iter_epoch(0)]).tolist()) == list(range(10))
      True
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        shuffle: bool = False,
        drop_last: bool = False,
        num_workers: int = 0,
        prefetch: int = 2,
        seed: int = 0,
        *,
        worker_type: Literal["thread", "process"] = "thread",
        collate_fn: Callable[[list[Any]], Any] | None = None,
    ):
        common.check_positive_int("batch_size", batch_size)
        common.check_positive_int("prefetch", prefetch)
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an integer >= 0, got {num_workers!r}")
        common.check_choice("worker_type", worker_type, ("thread", "process"))
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.num_workers = num_workers
        self.prefetch = prefetch
        self.seed = int(seed)
        self.worker_type = worker_type
        self.collate_fn = collate_fn or stack_items
        self.epoch = 0

    def __len__(self) -> int:
        n, b = len(self.dataset), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def order(self, epoch: int) -> np.ndarray:
        """The item indices of epoch `epoch`, in the order they are batched."""
        n = len(self.dataset)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def __iter__(self) -> Iterator[Any]:
        epoch = self.epoch
        self.epoch += 1
        return self.iter_epoch(epoch)

    def iter_epoch(self, epoch: int) -> Iterator[Any]:
        """Iterate the batches of epoch `epoch` (0-based) without changing `self.epoch`."""
        make = _MakeBatch(self.dataset, self.order(epoch), self.batch_size, self.collate_fn)
        if self.num_workers == 0:
            return (make(b) for b in range(len(self)))
        return self._grain_iter(make)

    def _grain_iter(self, make: _MakeBatch) -> Iterator[Any]:
        grain = _import_grain()
        batches = grain.MapDataset.range(len(self)).map(make)
        if self.worker_type == "thread":
            options = grain.ReadOptions(
                num_threads=self.num_workers, prefetch_buffer_size=self.prefetch * self.num_workers
            )
            return iter(batches.to_iter_dataset(options))
        _absl_flags_workaround()
        batches = batches.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
        return iter(
            batches.mp_prefetch(
                grain.MultiprocessingOptions(
                    num_workers=self.num_workers, per_worker_buffer_size=self.prefetch
                )
            )
        )

    def state_dict(self) -> dict[str, int]:
        """The epoch counter (JSON-friendly); the order is a function of (seed, epoch)."""
        return {"epoch": self.epoch, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.seed = int(state["seed"])


# --------------------------------------------------------------------------- record files

_RECORD_MAGIC = b"RLXA"
_END_MAGIC = b"RLXEND\x00\x00"
_HEADER = struct.Struct("<4sI")  # magic, number of arrays
_LENGTH = struct.Struct("<Q")
_END = struct.Struct("<8sQ")  # magic, number of data records


class RecordFileError(OSError):
    """A record file that was not finished, was truncated, or is corrupt."""


def _encode(arrays: Sequence[Any]) -> bytes:
    out = io.BytesIO()
    out.write(_HEADER.pack(_RECORD_MAGIC, len(arrays)))
    for k, a in enumerate(arrays):
        a = np.asarray(a)
        if a.dtype.hasobject:
            raise ValueError(f"array {k} has dtype {a.dtype}; records hold numeric arrays only")
        blob = io.BytesIO()
        np.lib.format.write_array(blob, a, allow_pickle=False)
        out.write(_LENGTH.pack(blob.tell()))
        out.write(blob.getvalue())
    return out.getvalue()


def _decode(record: bytes) -> tuple[np.ndarray, ...]:
    magic, count = _HEADER.unpack_from(record)
    if magic != _RECORD_MAGIC:
        raise ValueError("not a data record")
    pos, arrays = _HEADER.size, []
    for _ in range(count):
        (length,) = _LENGTH.unpack_from(record, pos)
        pos += _LENGTH.size
        blob = io.BytesIO(record[pos : pos + length])
        arrays.append(np.lib.format.read_array(blob, allow_pickle=False))
        pos += length
    return tuple(arrays)


def _array_record_module():
    try:
        from array_record.python import array_record_module
    except ModuleNotFoundError as err:
        raise ImportError("record files need array-record: pip install 'rlx_optax[data]'") from err
    return array_record_module


class RecordWriter:
    """Write tuples of arrays to an ArrayRecord file (RUMUS's `RecordWriter`).

    Each `append(input, target, ...)` is one record: the arrays as `.npy` bytes (no pickle).
    `finish()` writes an end marker holding the record count; `RecordDataset` refuses a file
    without it, so an interrupted write is an error, never a short or empty dataset. As a
    context manager, the file is finished only when the block exits without an exception.
    Records are written with ``group_size:1`` (one record per chunk) for fast random access.

    Example:
      >>> import os, tempfile, numpy as np, rlx_optax
      >>> path = os.path.join(tempfile.mkdtemp(), "train.arrayrecord")
      >>> with rlx_optax.RecordWriter(path) as writer:
      ...     for i in range(3):
      ...         writer.append(np.full(2, i, np.float32), np.int64(i))
      >>> data = rlx_optax.RecordDataset(path)
      >>> len(data), data[2]
      (3, (array([2., 2.], dtype=float32), array(2)))
    """

    def __init__(self, path: str, *, options: str = "group_size:1"):
        self.path = str(path)
        self._writer = _array_record_module().ArrayRecordWriter(self.path, options)
        self.count = 0
        self._closed = False

    def append(self, *arrays: Any) -> None:
        """Append one record made of `arrays` (any number, any numeric dtypes and shapes)."""
        if self._closed:
            raise ValueError(f"{self.path}: append after finish()")
        self._writer.write(_encode(arrays))
        self.count += 1

    def finish(self) -> None:
        """Write the end marker and close the file. Idempotent."""
        if self._closed:
            return
        self._writer.write(_END.pack(_END_MAGIC, self.count))
        self._writer.close()
        self._closed = True

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish()
        else:  # leave the file unfinished: reading it raises RecordFileError
            self._writer.close()
            self._closed = True


class RecordDataset:
    """Random access to a file written by `RecordWriter`: ``dataset[i]`` is a tuple of arrays.

    Opening checks the end marker and the record count, so a file whose writer never
    finished, a truncated file or one with a damaged index raises `RecordFileError` naming the
    file. Records are checksummed by ArrayRecord; a damaged record raises `RecordFileError`
    when read. Each thread gets its own reader, and the dataset pickles by path, so
    `DataLoader` workers (threads or processes) can share it.
    """

    def __init__(self, path: str):
        self.path = str(path)
        _array_record_module()  # a missing extra is reported before a missing file
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"no record file at {self.path}")
        self._local = threading.local()
        reader = self._reader()
        total = reader.num_records()
        if total == 0:
            raise RecordFileError(
                f"{self.path}: no records and no end marker: the writer never called finish() "
                f"(or the file is truncated)"
            )
        try:
            (last,) = reader.read([total - 1])
        except RuntimeError as err:
            raise RecordFileError(f"{self.path}: the end marker is unreadable: {err}") from err
        ok = len(last) == _END.size and last[: len(_END_MAGIC)] == _END_MAGIC
        if not ok or _END.unpack(last)[1] != total - 1:
            raise RecordFileError(
                f"{self.path}: no valid end marker: the writer never called finish(), or the "
                f"file is truncated or corrupt"
            )
        self._len = total - 1

    def _reader(self):
        reader = getattr(self._local, "reader", None)
        if reader is None:
            module = _array_record_module()
            try:
                reader = module.ArrayRecordReader(
                    self.path, "readahead_buffer_size:0,max_parallelism:0"
                )
            except RuntimeError as err:
                raise RecordFileError(
                    f"{self.path}: not a finished record file (unfinished, truncated or "
                    f"corrupt): {err}"
                ) from err
            self._local.reader = reader
        return reader

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> tuple[np.ndarray, ...]:
        index = int(index)
        if not -self._len <= index < self._len:
            raise IndexError(f"record index {index} out of range for {self._len} records")
        index %= self._len
        try:
            (record,) = self._reader().read([index])
            return _decode(record)
        except (RuntimeError, ValueError, struct.error) as err:
            raise RecordFileError(f"{self.path}: record {index} is corrupt: {err}") from err

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "_len": self._len}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path, self._len = state["path"], state["_len"]
        self._local = threading.local()
