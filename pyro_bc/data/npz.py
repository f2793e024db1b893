"""Data as two numpy archives, ``train.npz`` and ``test.npz``, each holding ``x`` (uint8 images) and ``y`` (labels).

``x`` is ``N x C x H x W`` or ``N x H x W x C`` (read as channels-last when its last axis is shorter than its
second, e.g. ``N x 32 x 32 x 3``; otherwise channels-first, e.g. ``N x 3 x 32 x 32``), or ``N x H x W`` (one
channel); ``y`` holds N integers in 0..255. Each member's ``.npy`` header is parsed and its declared size checked
against the member's size (itself bounded by the deflate ratio) before anything is allocated; pickled (object)
arrays are refused. Every problem is a one-line :class:`DataError` naming the file.
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np
from numpy.lib import format as npy

from pyro_bc.data.datafile import MAX_DEFLATE_RATIO, MAX_FILE_BYTES, RawData, check_labels, require_file
from pyro_bc.errors import DataError, first_line

__all__ = ["NPZ_FILES", "TEST_FILE", "TRAIN_FILE", "read_npz", "read_npz_pair"]

TRAIN_FILE, TEST_FILE = "train.npz", "test.npz"
NPZ_FILES = (TRAIN_FILE, TEST_FILE)


def _read_member(zf: zipfile.ZipFile, key: str, path: Path) -> np.ndarray:
    try:
        info = zf.getinfo(f"{key}.npy")
    except KeyError:
        raise DataError(f"{path}: no array {key!r} (holds {', '.join(n.removesuffix('.npy') for n in zf.namelist())})")
    limit = min(MAX_FILE_BYTES, (info.compress_size + 1024) * MAX_DEFLATE_RATIO)
    if info.file_size > limit:
        raise DataError(f"{path}: {key!r} declares {info.file_size} bytes, more than its "
                        f"{info.compress_size} compressed bytes can hold")
    with zf.open(info) as f:
        version = npy.read_magic(f)
        if version not in ((1, 0), (2, 0), (3, 0)):
            raise DataError(f"{path}: {key!r} is a .npy file of unknown version {version}")
        read_header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        if dtype.hasobject or dtype.kind not in "biuf":
            raise DataError(f"{path}: {key!r} has dtype {dtype}; only numbers are read (no pickled objects)")
        nbytes, have = math.prod(shape) * dtype.itemsize, info.file_size - f.tell()
        if nbytes != have:
            what = "truncated" if have < nbytes else "size mismatch"
            raise DataError(f"{path}: {what}: {key!r} declares shape {shape} ({nbytes} bytes) but holds {have}")
        data = f.read(nbytes)
        f.read(1)  # reach the member's end, so that its CRC is checked
    array = np.frombuffer(data, dtype).reshape(shape, order="F" if fortran else "C")
    return np.ascontiguousarray(array).astype(dtype.newbyteorder("="), copy=False)


def _channels_first(x: np.ndarray, path: Path) -> np.ndarray:
    if x.dtype != np.uint8:
        raise DataError(f"{path}: 'x' must hold uint8 pixels, got {x.dtype} (a data folder holds images; train "
                        "features or token ids from Python: pyro_bc.fit(net, (x, y)))")
    if x.ndim == 3:
        return x[:, None]
    if x.ndim != 4:
        raise DataError(f"{path}: 'x' must be N x C x H x W, N x H x W x C or N x H x W, got shape {x.shape}")
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if x.shape[3] < x.shape[1] else x


def read_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One archive: uint8 images ``(N, C, H, W)`` and its labels ``(N,)``."""
    path = Path(path)
    require_file(path)
    try:
        with zipfile.ZipFile(path) as zf:
            x, y = (_read_member(zf, key, path) for key in ("x", "y"))
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001  (zipfile, zlib and the .npy header parser raise many types)
        raise DataError(f"{path}: corrupt npz: {type(e).__name__}: {first_line(e)}") from None
    x = _channels_first(x, path)
    check_labels(y, x.shape[0], f"{path}: 'y'", "'x'")
    return x, y


def read_npz_pair(data_dir: Path) -> RawData:
    """``train.npz`` and ``test.npz`` of ``data_dir``."""
    (train_x, train_y), (test_x, test_y) = (read_npz(data_dir / name) for name in NPZ_FILES)
    return RawData(train_x, train_y, test_x, test_y, train_name=str(data_dir / TRAIN_FILE),
                   test_name=str(data_dir / TEST_FILE))
