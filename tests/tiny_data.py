"""Tiny data folders written by the tests themselves: CIFAR-10's python format and npz archives, 3 x 8 x 8 images."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from pyro_bc.data.cifar import META_FILE, TEST_BATCH, TRAIN_BATCHES

SIDE = 8  # images are 3 x SIDE x SIDE

#: A plain network for 3 x 8 x 8 inputs; models.build_network converts it with pyro_bc.bayesianize.
PLAIN_NET_3x8x8 = """
from torch import nn

def build():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
"""


def cifar_batch(rng: np.random.Generator, n: int, side: int = SIDE, str_keys: bool = False) -> dict:
    """One batch's dict: ``data`` n x 3 side^2 uint8, ``labels`` a list of n ints in 0..9."""
    data = rng.integers(0, 256, (n, 3 * side * side), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, n)]
    keys = ("data", "labels") if str_keys else (b"data", b"labels")
    return dict(zip(keys, (data, labels)))


def write_cifar(d: Path, n_per_batch: int = 12, n_test: int = 8, seed: int = 0, protocol: int = 2,
                meta: bool = True) -> Path:
    """A CIFAR-10-format folder ``d`` (created) with five training batches, the test batch and the meta file."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in TRAIN_BATCHES:
        (d / name).write_bytes(pickle.dumps(cifar_batch(rng, n_per_batch), protocol=protocol))
    (d / TEST_BATCH).write_bytes(pickle.dumps(cifar_batch(rng, n_test), protocol=protocol))
    if meta:
        names = {b"label_names": [f"class{i}".encode() for i in range(10)], b"num_cases_per_batch": n_per_batch}
        (d / META_FILE).write_bytes(pickle.dumps(names, protocol=protocol))
    return d


def write_npz(path: Path, n: int, shape: tuple[int, ...] = (3, SIDE, SIDE), seed: int = 0,
              compressed: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """An archive ``path`` with ``x`` (n x shape uint8) and ``y`` (n ints in 0..9); returns them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    y = (np.arange(n) % 10).astype(np.int64)
    (np.savez_compressed if compressed else np.savez)(path, x=x, y=y)
    return x, y
