"""Reading data pickles without running their code: a restricted unpickler for numeric numpy arrays and plain data.

A pickle can call any importable function; :class:`RestrictedUnpickler` resolves only the few globals that a
pickled numeric numpy array needs (``numpy.core.multiarray._reconstruct`` and its ``numpy._core`` spelling,
``_frombuffer``, ``scalar``, ``numpy.ndarray``, ``numpy.dtype``) and Python 3's protocol-2 spelling of bytes
(``_codecs.encode(text, "latin1")``, ``builtins.bytes()``), each replaced by a stand-in that accepts only what
such a pickle passes and builds the array from checked raw bytes itself (numpy's own ``__setstate__`` never sees
a pickled state). Dicts, lists, tuples, strings, bytes and numbers are pickle opcodes and need no global.
Anything else (``os.system``, ``builtins.eval``, ...) is refused with one line naming the file.

Sizes are bounded before anything is allocated: the file is read whole only below :data:`MAX_FILE_BYTES`, and
every length the stream declares is checked against the bytes that follow it (by :func:`pickletools.genops`,
which reads without allocating declared sizes) before the real unpickler, which would allocate them, runs.
"""

from __future__ import annotations

import io
import math
import pickle
import pickletools
from pathlib import Path

import numpy as np

from pyro_bc.data.datafile import MAX_FILE_BYTES, require_file
from pyro_bc.errors import DataError, first_line

__all__ = ["RestrictedUnpickler", "load_pickle"]

_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")
_NUMERIC_MODULES = ("numpy.core.numeric", "numpy._core.numeric")
_BUILTINS = ("builtins", "__builtin__")


class _Refused(Exception):
    """A global or an argument no data pickle needs."""


class _NDArrayClass:
    """Stands for ``numpy.ndarray`` in a pickle: an argument of ``_reconstruct``, never called itself (calling
    ``numpy.ndarray(shape)`` would allocate whatever the pickle declares)."""

    def __call__(self, *args, **kwargs):
        raise _Refused("numpy.ndarray called directly")


_NDARRAY = _NDArrayClass()


class _DType:
    """A pickled ``numpy.dtype``: a boolean, integer or float of at most 16 bytes, whose pickled state may set its
    byte order only (numpy's own ``__setstate__`` would accept flags that make raw bytes count as objects)."""

    def __init__(self, spec, align=False, copy=False):
        if isinstance(spec, bytes):  # a Python 2 pickle read with encoding="bytes"
            spec = spec.decode("latin1")
        if not isinstance(spec, str):
            raise _Refused(f"numpy.dtype of {type(spec).__name__}")
        self.dtype = np.dtype(spec)
        if self.dtype.kind not in "biuf" or self.dtype.itemsize > 16:
            raise _Refused(f"numpy.dtype {spec!r} (only booleans, integers and floats)")

    def __setstate__(self, state) -> None:
        order = state[1].decode("latin1") if isinstance(state, tuple) and isinstance(state[1], bytes) else state[1]
        if order not in ("<", ">", "|", "=") or any(v is not None for v in state[2:5]):
            raise _Refused("a numpy.dtype state other than a byte order")
        if order in "<>":
            self.dtype = self.dtype.newbyteorder(order)


class _Array:
    """A pickled ``numpy.ndarray`` (``_reconstruct`` then its state), built from its state's raw bytes once these
    are checked against its shape and dtype."""

    def __init__(self, cls, shape, typecode):
        if cls is not _NDARRAY or not isinstance(shape, tuple) or math.prod(shape) != 0:
            raise _Refused("_reconstruct of anything but an empty numpy.ndarray")
        self.array: np.ndarray | None = None

    def __setstate__(self, state) -> None:
        _, shape, dtype, fortran, raw = state
        if not isinstance(dtype, _DType) or not isinstance(raw, bytes):
            raise _Refused("a numpy array state without a numeric dtype and raw bytes")
        if not all(isinstance(d, int) and d >= 0 for d in shape) or \
                len(raw) != math.prod(shape) * dtype.dtype.itemsize:
            raise ValueError(f"array of shape {shape} and dtype {dtype.dtype} with {len(raw)} bytes")
        self.array = np.frombuffer(raw, dtype.dtype).reshape(shape, order="F" if fortran else "C")


def _frombuffer(buffer, dtype, shape, order) -> np.ndarray:
    if not isinstance(buffer, (bytes, bytearray)) or not isinstance(dtype, _DType):
        raise _Refused("_frombuffer of anything but bytes and a numeric dtype")
    return np.frombuffer(buffer, dtype.dtype).reshape(shape, order=order)


def _scalar(dtype, data):
    if not isinstance(dtype, _DType) or not isinstance(data, bytes) or len(data) != dtype.dtype.itemsize:
        raise _Refused("numpy scalar of anything but its bytes")
    return np.frombuffer(data, dtype.dtype)[0]


def _latin1(text, encoding="utf-8") -> bytes:
    """``_codecs.encode(text, "latin1")``: how Python 3 writes bytes at pickle protocol 2 (without an encoding
    ``_codecs.encode`` means UTF-8, which is refused like any encoding but latin1)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Refused(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _empty_bytes() -> bytes:
    """``builtins.bytes()``: Python 3's ``b""`` at protocol 2."""
    return b""


_ALLOWED = {
    **{(m, "_reconstruct"): _Array for m in _NUMPY_MODULES},
    **{(m, "scalar"): _scalar for m in _NUMPY_MODULES},
    **{(m, "_frombuffer"): _frombuffer for m in _NUMERIC_MODULES},
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _DType,
    ("_codecs", "encode"): _latin1,
    **{(m, "bytes"): _empty_bytes for m in _BUILTINS},
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler whose globals are only :data:`_ALLOWED`'s (numeric numpy arrays, bytes); ``path`` is named in
    its errors. Python 2 strings come as bytes (``encoding="bytes"``), as CIFAR's own loading code reads them."""

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise DataError(f"{self.path}: refused: the pickle asks for {module}.{name}; a data pickle may hold "
                            "only numeric numpy arrays, bytes, strings, numbers, lists, tuples and dicts") from None


def _check_lengths(path: Path, data: bytes) -> None:
    """Walk the opcodes: a length running past the end, an unknown opcode or a missing STOP raises DataError."""
    try:
        for _ in pickletools.genops(io.BytesIO(data)):
            pass
    except Exception as e:  # noqa: BLE001  (genops raises ValueError, but a crafted stream may raise others)
        raise DataError(f"{path}: corrupt pickle: {first_line(e)}") from None


def _resolve(obj, done: dict[int, object]):
    """``obj`` with every :class:`_Array` and :class:`_DType` replaced by its numpy object (lists and dicts in
    place, so that shared and self-referencing ones stay so)."""
    if isinstance(obj, _Array):
        if obj.array is None:
            raise ValueError("a numpy array without its state")
        return obj.array
    if isinstance(obj, _DType):
        return obj.dtype
    if id(obj) in done or not isinstance(obj, (list, dict, tuple)):
        return done.get(id(obj), obj)
    done[id(obj)] = obj
    if isinstance(obj, list):
        obj[:] = [_resolve(v, done) for v in obj]
    elif isinstance(obj, dict):
        for k in list(obj):
            obj[k] = _resolve(obj[k], done)
    else:
        done[id(obj)] = tuple(_resolve(v, done) for v in obj)
    return done[id(obj)]


def load_pickle(path: str | Path):
    """Unpickle ``path`` with :class:`RestrictedUnpickler`; every problem is a one-line :class:`DataError`."""
    path = Path(path)
    size = require_file(path)
    if size > MAX_FILE_BYTES:
        raise DataError(f"{path}: {size} bytes, more than the {MAX_FILE_BYTES} a data pickle may have")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    _check_lengths(path, data)
    try:
        return _resolve(RestrictedUnpickler(io.BytesIO(data), path).load(), {})
    except DataError:
        raise
    except _Refused as e:
        raise DataError(f"{path}: refused: {e}") from None
    except Exception as e:  # noqa: BLE001  (a corrupt stream raises many types: UnpicklingError, ValueError, ...)
        raise DataError(f"{path}: corrupt pickle: {type(e).__name__}: {first_line(e)}") from None
