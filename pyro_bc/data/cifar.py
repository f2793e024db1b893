"""CIFAR-10's python format: ``data_batch_1`` .. ``data_batch_5``, ``test_batch`` and ``batches.meta``.

Each batch is a pickled dict holding ``b"data"``, an ``N x 3072`` uint8 array (a row is the red, green and blue
32 x 32 planes, each row-major), and ``b"labels"``, N integers; any N is accepted, and any row width ``3 S^2`` is
read as ``3 x S x S`` images (so small test folders need no 32 x 32 images). ``batches.meta`` is optional; when
present, its ``b"label_names"`` give the number of classes. The pickles are read by
:func:`pyro_bc.data.safe_pickle.load_pickle`, which runs no code from them; every problem is a one-line
:class:`DataError` naming the file.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from pyro_bc.data.datafile import RawData, check_labels
from pyro_bc.data.safe_pickle import load_pickle
from pyro_bc.errors import DataError

__all__ = ["CIFAR_FILES", "META_FILE", "TEST_BATCH", "TRAIN_BATCHES", "read_batch", "read_cifar10"]

TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META_FILE = "batches.meta"
#: Every file of the format (the folder is recognised by any of them).
CIFAR_FILES = (*TRAIN_BATCHES, TEST_BATCH, META_FILE)


def _entry(obj: dict, key: str, path: Path):
    """``obj[b"key"]`` (Python 2 pickles, as CIFAR's) or ``obj["key"]`` (written by Python 3)."""
    for k in (key.encode(), key):
        if k in obj:
            return obj[k]
    raise DataError(f"{path}: no {key!r} entry (keys: {', '.join(repr(k) for k in list(obj)[:8])})")


def _load_dict(path: Path) -> dict:
    obj = load_pickle(path)
    if not isinstance(obj, dict):
        raise DataError(f"{path}: not a CIFAR file: a pickled {type(obj).__name__}, not a dict")
    return obj


def read_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file: uint8 images ``(N, 3, S, S)`` and int64 labels ``(N,)``."""
    path = Path(path)
    obj = _load_dict(path)
    data, labels = _entry(obj, "data", path), _entry(obj, "labels", path)
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.dtype != np.uint8:
        what = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' must be an N x 3072 uint8 array, got a {what}")
    side = math.isqrt(data.shape[1] // 3)
    if data.shape[1] == 0 or 3 * side * side != data.shape[1]:
        raise DataError(f"{path}: 'data' rows hold {data.shape[1]} values, not 3 x S x S (3072 for 32 x 32 images)")
    if not isinstance(labels, (list, tuple, np.ndarray)) or getattr(labels, "ndim", 1) != 1 or not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in labels):
        raise DataError(f"{path}: 'labels' must be a list of integers")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except OverflowError:
        raise DataError(f"{path}: 'labels': label out of range: must lie in 0..255") from None
    check_labels(labels, data.shape[0], f"{path}: 'labels'", "'data'")
    return data.reshape(-1, 3, side, side), labels


def _n_classes(path: Path) -> int:
    names = _entry(_load_dict(path), "label_names", path)
    if not isinstance(names, list) or not 1 <= len(names) <= 256:
        raise DataError(f"{path}: 'label_names' must be a list of 1 to 256 names")
    return len(names)


def read_cifar10(data_dir: Path) -> RawData:
    """The five training batches (concatenated, in order) and the test batch of ``data_dir``."""
    batches = [read_batch(data_dir / name) for name in TRAIN_BATCHES]
    shape = batches[0][0].shape[1:]
    for name, (x, _) in zip(TRAIN_BATCHES, batches):
        if x.shape[1:] != shape:
            raise DataError(f"{data_dir / name}: images of shape {x.shape[1:]}, but {TRAIN_BATCHES[0]}'s are {shape}")
    test_x, test_y = read_batch(data_dir / TEST_BATCH)
    meta = data_dir / META_FILE
    return RawData(train_x=np.concatenate([x for x, _ in batches]), train_y=np.concatenate([y for _, y in batches]),
                   test_x=test_x, test_y=test_y, train_name=str(data_dir / "data_batch_1..5"),
                   test_name=str(data_dir / TEST_BATCH), n_classes=_n_classes(meta) if meta.exists() else None)
