"""MNIST in the IDX format: a validating numpy reader/writer, the loader with a seeded validation split, minibatches.

No torchvision: :func:`read_idx` parses the IDX header itself and checks the declared size against the bytes present
before allocating anything, so a truncated, corrupt or lying file ends in a one-line :class:`DataError` naming the
file, never in a numpy or zlib traceback.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pyro_bc.atomic import atomic_write_bytes
from pyro_bc.errors import ConfigError, DataError

__all__ = [
    "DEFAULT_DATA_DIR",
    "MNIST",
    "MNIST_FILES",
    "Split",
    "iterate_minibatches",
    "load_mnist",
    "read_idx",
    "write_idx",
]

#: The MNIST copy embedded in the package (gzipped IDX files and their SHA256SUMS).
DEFAULT_DATA_DIR: Path = Path(__file__).resolve().parent / "datasets" / "mnist"

#: Base names of the four files :func:`load_mnist` looks for (each raw or with ``.gz``).
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# IDX type byte -> big-endian numpy dtype.
_IDX_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20
# Deflate cannot expand by more than ~1032:1; a gzip file declaring more than this much data must be lying.
_MAX_DEFLATE_RATIO = 1100


# ----------------------------------------------------------------------------------------------------------- reading
def _is_gzip(path: Path) -> bool:
    if path.name.endswith(".gz"):
        return True
    with open(path, "rb") as f:
        return f.read(2) == _GZIP_MAGIC


def _parse_header(path: Path, read) -> tuple[np.dtype, tuple[int, ...], int, int]:
    """Read and validate the header with ``read(n)``; return (dtype, shape, header bytes, data bytes)."""
    magic = read(4)
    if len(magic) < 4:
        raise DataError(f"{path}: truncated: {len(magic)} bytes, shorter than the 4-byte IDX magic")
    if magic[0] != 0 or magic[1] != 0:
        raise DataError(f"{path}: wrong magic {magic.hex()}: an IDX file starts with two zero bytes")
    if magic[2] not in _IDX_TYPES:
        raise DataError(f"{path}: wrong magic {magic.hex()}: unknown IDX type byte 0x{magic[2]:02x}")
    dtype = _IDX_TYPES[magic[2]]
    ndim = magic[3]
    if ndim == 0:
        raise DataError(f"{path}: wrong magic {magic.hex()}: zero dimensions")
    dims_raw = read(4 * ndim)
    if len(dims_raw) < 4 * ndim:
        raise DataError(f"{path}: truncated: header declares {ndim} dimensions but the file ends inside them")
    shape = tuple(int.from_bytes(dims_raw[4 * i : 4 * i + 4], "big") for i in range(ndim))
    nbytes = math.prod(shape) * dtype.itemsize
    return dtype, shape, 4 + 4 * ndim, nbytes


def _size_error(path: Path, shape: tuple[int, ...], nbytes: int, have: int, exact: bool = True) -> DataError:
    what = "truncated" if have < nbytes else "size mismatch"
    have_s = f"{have}" if exact else f"more than {nbytes}"
    return DataError(
        f"{path}: {what}: header declares shape {shape} ({nbytes} data bytes) but the file holds {have_s} data bytes"
    )


def _read_raw(path: Path) -> tuple[np.dtype, tuple[int, ...], bytes]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        dtype, shape, hbytes, nbytes = _parse_header(path, f.read)
        have = size - hbytes
        if have != nbytes:  # checked before anything of the declared size is allocated
            raise _size_error(path, shape, nbytes, have)
        data = f.read(nbytes)
    if len(data) != nbytes:  # the file changed under us
        raise _size_error(path, shape, nbytes, len(data))
    return dtype, shape, data


def _read_gz(path: Path) -> tuple[np.dtype, tuple[int, ...], bytes]:
    csize = path.stat().st_size
    try:
        with gzip.open(path, "rb") as f:
            dtype, shape, _, nbytes = _parse_header(path, f.read)
            if nbytes > (csize + 1024) * _MAX_DEFLATE_RATIO:
                raise DataError(
                    f"{path}: size mismatch: header declares shape {shape} ({nbytes} data bytes), "
                    f"more than a {csize}-byte gzip file can hold"
                )
            chunks: list[bytes] = []
            got = 0
            limit = nbytes + 1  # never decompress more than one byte past the declared size
            while got < limit:
                chunk = f.read(min(_CHUNK, limit - got))
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
            if got == nbytes:
                f.read(1)  # reach the end of the member so that its CRC and length are checked
    except DataError:
        raise
    except (OSError, EOFError, zlib.error, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{path}: corrupt gzip: {msg}") from None
    if got != nbytes:
        raise _size_error(path, shape, nbytes, got, exact=got < nbytes)
    return dtype, shape, b"".join(chunks)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file, raw or gzipped (recognised by the ``.gz`` suffix or the magic bytes ``1f 8b``).

    Supports the IDX types uint8 (0x08), int8 (0x09), and big-endian int16 (0x0B), int32 (0x0C), float32 (0x0D) and
    float64 (0x0E). Returns a writable, native-endian C-ordered array of the declared shape. The declared size is
    checked against the bytes present before any data buffer is allocated (for gzip: decompression never goes more
    than one byte past the declared size). Every problem raises :class:`DataError` with a one-line message naming
    the file.
    """
    path = Path(path)
    try:
        if not path.exists():
            raise DataError(f"{path}: file not found")
        if not path.is_file():
            raise DataError(f"{path}: not a regular file")
        dtype, shape, data = _read_gz(path) if _is_gzip(path) else _read_raw(path)
    except DataError:
        raise
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    return np.frombuffer(data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="), copy=True)


# ----------------------------------------------------------------------------------------------------------- writing
def _idx_type_byte(dtype: np.dtype) -> int:
    for code, dt in _IDX_TYPES.items():
        if dt.kind == dtype.kind and dt.itemsize == dtype.itemsize:
            return code
    raise DataError(f"cannot write dtype {dtype} as IDX (supported: uint8, int8, int16, int32, float32, float64)")


def write_idx(path: str | os.PathLike, array) -> None:
    """Write ``array`` as an IDX file, gzipped when ``path`` ends in ``.gz``, atomically.

    The data go to a temporary file in the same folder, are fsync'ed, and the file is moved into place with
    :func:`os.replace`, so a reader never sees a half-written file.
    """
    path = Path(path)
    arr = np.asarray(array)
    code = _idx_type_byte(arr.dtype)
    if not 1 <= arr.ndim <= 255:
        raise DataError(f"{path}: cannot write a {arr.ndim}-dimensional array as IDX (1 to 255 dimensions)")
    if any(d >= 2**32 for d in arr.shape):
        raise DataError(f"{path}: cannot write shape {arr.shape} as IDX (each size must be < 2**32)")
    header = bytes([0, 0, code, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    payload = np.ascontiguousarray(arr, dtype=_IDX_TYPES[code]).tobytes()
    data = header + payload
    if path.name.endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    atomic_write_bytes(path, data)


# ----------------------------------------------------------------------------------------------------------- MNIST
@dataclass
class Split:
    """One part of a data set: images ``x`` (float32, ``(N, 1, H, W)``) and labels ``y`` (int64, ``(N,)``)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass
class MNIST:
    """The loaded data: ``train``, ``val`` (held out from the training files) and ``test`` splits.

    ``n_classes`` is the largest training label + 1; ``image_shape`` is the shape of one example, ``(1, H, W)``.
    """

    train: Split
    val: Split
    test: Split
    n_classes: int
    image_shape: tuple[int, int, int]


def _find_file(data_dir: Path, base: str) -> Path:
    for name in (base, base + ".gz"):
        p = data_dir / name
        if p.is_file():
            return p
    raise DataError(f"{data_dir / base}: file not found (looked for {base} and {base}.gz in {data_dir})")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _verify_checksums(data_dir: Path) -> None:
    sums = data_dir / "SHA256SUMS"
    if not sums.is_file():
        return
    try:
        lines = sums.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{sums}: cannot read: {e}") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split(maxsplit=1)
        digest = parts[0].lower()
        name = parts[1].strip().lstrip("*") if len(parts) == 2 else ""
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest) or not name:
            raise DataError(f"{sums}: line {lineno} is not '<sha256>  <file name>'")
        if "/" in name or "\\" in name or name in (".", ".."):
            raise DataError(f"{sums}: line {lineno}: file name {name!r} must be a plain name in the same folder")
        target = data_dir / name
        if not target.is_file():
            continue  # only files that are present are checked; the needed ones are required elsewhere
        try:
            actual = _sha256(target)
        except OSError as e:
            raise DataError(f"{target}: cannot read: {e.strerror or e}") from None
        if actual != digest:
            raise DataError(f"{target}: checksum mismatch: sha256 {actual}, SHA256SUMS says {digest}")


def _check_pair(images: np.ndarray, labels: np.ndarray, img_path: Path, lab_path: Path) -> None:
    if images.ndim != 3:
        raise DataError(f"{img_path}: expected 3-D images (N, H, W), got shape {images.shape}")
    if images.dtype != np.uint8:
        raise DataError(f"{img_path}: expected uint8 pixels (IDX type 0x08), got {images.dtype}")
    if labels.ndim != 1:
        raise DataError(f"{lab_path}: expected 1-D labels (N,), got shape {labels.shape}")
    if labels.dtype.kind not in "iu":
        raise DataError(f"{lab_path}: expected integer labels, got {labels.dtype}")
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{lab_path}: count mismatch: {labels.shape[0]} labels but {img_path.name} has {images.shape[0]} images"
        )
    if labels.size:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi > 255:
            raise DataError(f"{lab_path}: label out of range: labels span {lo}..{hi}, must lie in 0..255")


def _normalise(images: np.ndarray) -> torch.Tensor:
    x = images.astype(np.float32)
    x /= 255.0
    x -= 0.5
    x *= 2.0
    return torch.from_numpy(x).unsqueeze(1)


def load_mnist(
    data_dir: str | os.PathLike | None = None,
    val_size: int = 5000,
    seed: int = 0,
    subset: int | None = None,
    verify: bool = True,
) -> MNIST:
    """Load MNIST from ``data_dir`` (default: the embedded copy, :data:`DEFAULT_DATA_DIR`).

    The folder must hold ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
    ``t10k-labels-idx1-ubyte``, each raw or gzipped (``.gz``). If it holds a ``SHA256SUMS`` file (the embedded copy
    does) and ``verify`` is true, every listed file present in the folder is checked against it.

    Normalisation, as in the official code of Louizos et al.: ``x / 255``, then ``2 * (x - 0.5)``, i.e. pixels in
    ``[-1, 1]``; images come as float32 ``(N, 1, H, W)``, labels as int64.

    Validation split: the training files are permuted with ``numpy.random.default_rng(seed).permutation``; the
    *last* ``val_size`` examples of that permutation form ``val`` and the others, in permutation order, ``train``.
    ``subset=N`` then keeps the first ``N`` of those training examples (``val`` is unaffected). The test set is
    returned as is and is never used for any choice.
    """
    data_dir = DEFAULT_DATA_DIR if data_dir is None else Path(data_dir)
    if not data_dir.exists():
        raise DataError(f"{data_dir}: data folder not found")
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: not a folder")
    paths = {key: _find_file(data_dir, base) for key, base in MNIST_FILES.items()}
    if verify:
        _verify_checksums(data_dir)
    arrays = {key: read_idx(p) for key, p in paths.items()}
    for part in ("train", "test"):
        _check_pair(
            arrays[f"{part}_images"], arrays[f"{part}_labels"], paths[f"{part}_images"], paths[f"{part}_labels"]
        )
    tr_x, tr_y = arrays["train_images"], arrays["train_labels"]
    te_x, te_y = arrays["test_images"], arrays["test_labels"]
    if te_x.shape[1:] != tr_x.shape[1:]:
        raise DataError(
            f"{paths['test_images']}: image size {te_x.shape[1:]} differs from the training images' {tr_x.shape[1:]}"
        )
    n_train = tr_y.shape[0]
    if n_train == 0:
        raise DataError(f"{paths['train_labels']}: no training examples")
    n_classes = int(tr_y.max()) + 1
    if te_y.size and int(te_y.max()) >= n_classes:
        raise DataError(
            f"{paths['test_labels']}: label out of range: test label {int(te_y.max())} but training labels are "
            f"0..{n_classes - 1}"
        )
    if isinstance(val_size, bool) or not isinstance(val_size, (int, np.integer)) or not 0 <= val_size < n_train:
        raise ConfigError(
            f"val_size must be an integer in 0..{n_train - 1} (training examples: {n_train}), got {val_size}"
        )
    n_fit = n_train - int(val_size)
    if subset is not None and (
        isinstance(subset, bool) or not isinstance(subset, (int, np.integer)) or not 1 <= subset <= n_fit
    ):
        raise ConfigError(f"subset must be an integer in 1..{n_fit} (training examples after validation), got {subset}")

    perm = np.random.default_rng(seed).permutation(n_train)
    train_idx, val_idx = perm[:n_fit], perm[n_fit:]
    if subset is not None:
        train_idx = train_idx[: int(subset)]

    x_all = _normalise(tr_x)
    y_all = torch.from_numpy(tr_y.astype(np.int64))
    ti, vi = torch.from_numpy(train_idx), torch.from_numpy(val_idx)
    train = Split(x_all[ti].contiguous(), y_all[ti].contiguous())
    val = Split(x_all[vi].contiguous(), y_all[vi].contiguous())
    test = Split(_normalise(te_x), torch.from_numpy(te_y.astype(np.int64)))
    h, w = tr_x.shape[1:]
    return MNIST(train=train, val=val, test=test, n_classes=n_classes, image_shape=(1, int(h), int(w)))


def iterate_minibatches(
    split: Split, batch_size: int, generator: torch.Generator, shuffle: bool = True, drop_last: bool = False
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` minibatches of ``split``.

    With ``shuffle`` the order is ``torch.randperm(len(split), generator=generator)``, so a training loop can save
    and restore ``generator.get_state()`` to resume exactly; without it the order is the stored one. The last,
    smaller batch is yielded unless ``drop_last``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size}")
    n = len(split)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        yield split.x[idx], split.y[idx]
