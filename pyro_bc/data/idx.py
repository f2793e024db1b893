"""The IDX file format (MNIST's): a validating numpy reader and an atomic writer.

:func:`read_idx` parses the IDX header itself and checks the declared size against the bytes present before
allocating anything, so a truncated, corrupt or lying file ends in a one-line :class:`DataError` naming the file,
never in a numpy or zlib traceback.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np

from pyro_bc.atomic import atomic_write_bytes
from pyro_bc.data.datafile import CHUNK, MAX_DEFLATE_RATIO, require_file
from pyro_bc.errors import DataError, first_line

__all__ = ["read_idx", "write_idx"]

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
            if nbytes > (csize + 1024) * MAX_DEFLATE_RATIO:
                raise DataError(
                    f"{path}: size mismatch: header declares shape {shape} ({nbytes} data bytes), "
                    f"more than a {csize}-byte gzip file can hold"
                )
            chunks: list[bytes] = []
            got = 0
            limit = nbytes + 1  # never decompress more than one byte past the declared size
            while got < limit:
                chunk = f.read(min(CHUNK, limit - got))
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
            if got == nbytes:
                f.read(1)  # reach the end of the member so that its CRC and length are checked
    except DataError:
        raise
    except (OSError, EOFError, zlib.error, ValueError) as e:
        raise DataError(f"{path}: corrupt gzip: {first_line(e)}") from None
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
    require_file(path)
    try:
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
