"""The restricted unpickler (pyro_bc.data.safe_pickle) on pickles built by hand: what numpy writes for arrays,
dtypes and scalars (byte orders, Fortran order, protocols 2 and 5), what it must refuse, and whole messages.

Each pickle here is a tree of ``_Call`` objects (a function, its arguments and an optional state, as numpy's
``__reduce__`` gives them), so the stream holds exactly the globals named; the expected arrays come from
``struct.pack`` of the values written in the test, not from numpy's own unpickling."""

import codecs
import errno
import pickle
import pickletools
import struct
from pathlib import Path

import numpy as np
import pytest

from pyro_bc.data import safe_pickle
from pyro_bc.data.safe_pickle import load_pickle
from pyro_bc.errors import DataError

_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(0))[0]  # numpy._core.multiarray._reconstruct
_SCALAR = np.float32(0).__reduce__()[0]  # numpy._core.multiarray.scalar
_FROMBUFFER = np.asfortranarray(np.zeros((2, 2))).__reduce_ex__(5)[0]  # numpy._core.numeric._frombuffer
_ALLOWED_KINDS = "only numeric numpy arrays, bytes, strings, numbers, lists, tuples and dicts"


class _Call:
    """Pickles as ``func(*args)`` then, with a state, ``__setstate__(state)`` (pickle's REDUCE and BUILD)."""

    def __init__(self, func, *args, state=None):
        self.func, self.args, self.state = func, args, state

    def __reduce__(self):
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)


def _dtype(spec: str, order: str = "<", extra=(None, None, None)) -> _Call:
    """A pickled numpy.dtype as numpy writes it: ``dtype(spec, False, True)`` with state version 3."""
    return _Call(np.dtype, spec, False, True, state=(3, order, *extra, -1, -1, 0))


def _array(shape, dtype, raw: bytes, fortran: bool = False) -> _Call:
    """A pickled ndarray as numpy writes it at protocols below 5: ``_reconstruct`` of an empty array, then its
    state ``(1, shape, dtype, fortran, raw)``."""
    return _Call(_RECONSTRUCT, np.ndarray, (0,), b"b", state=(1, shape, dtype, fortran, raw))


def _load(tmp_path: Path, obj, protocol: int = 2):
    path = tmp_path / "p.pkl"
    path.write_bytes(obj if isinstance(obj, bytes) else pickle.dumps(obj, protocol=protocol))
    return load_pickle(path)


def _message(tmp_path: Path, obj, protocol: int = 2) -> str:
    with pytest.raises(DataError) as info:
        _load(tmp_path, obj, protocol)
    return str(info.value).removeprefix(f"{tmp_path / 'p.pkl'}: ")


@pytest.mark.parametrize("protocol", [2, 5])
def test_byte_orders_and_fortran_order_are_those_the_state_declares(tmp_path, protocol):
    big = _array((2, 3), _dtype("i4", ">"), struct.pack(">6i", 1, -2, 3, -4, 5, 70000))
    native = _array((3,), _dtype("u2", "="), struct.pack("=3H", 1, 2, 65535))
    one_byte = _array((2,), _dtype("u1", "|"), bytes([7, 255]))
    # column-major: the raw values run down the columns of [[0, 1, 2], [3, 4, 5]]
    fortran = _array((2, 3), _dtype("f8"), struct.pack("<6d", 0, 3, 1, 4, 2, 5), fortran=True)
    got = _load(tmp_path, [big, native, one_byte, fortran], protocol)
    assert got[0].tolist() == [[1, -2, 3], [-4, 5, 70000]] and got[0].dtype == np.dtype(">i4")
    assert got[1].tolist() == [1, 2, 65535] and got[1].dtype == np.dtype("=u2")
    assert got[2].tolist() == [7, 255]
    assert got[3].tolist() == [[0, 1, 2], [3, 4, 5]]


def test_protocol_5_frombuffer_keeps_its_order(tmp_path):
    raw = bytearray(struct.pack("<6i", 0, 3, 1, 4, 2, 5))  # column-major [[0, 1, 2], [3, 4, 5]]
    got = _load(tmp_path, [_Call(_FROMBUFFER, raw, _dtype("i4"), (2, 3), "F"),
                           _Call(_FROMBUFFER, bytes(raw), _dtype("i4"), (3, 2), "C")], protocol=5)
    assert got[0].tolist() == [[0, 1, 2], [3, 4, 5]] and got[1].tolist() == [[0, 3], [1, 4], [2, 5]]


def test_sixteen_byte_floats_are_numeric(tmp_path):
    if np.dtype("g").itemsize != 16:
        pytest.skip("long double is not 16 bytes here")
    value = np.longdouble(1) / 3
    got = _load(tmp_path, _array((1,), _dtype("f16"), value.tobytes()))
    assert got.dtype == np.dtype("f16") and got[0] == value


def test_numpy_scalars_and_latin1_bytes(tmp_path):
    got = _load(tmp_path, {b"f": _Call(_SCALAR, _dtype("f4"), struct.pack("<f", 1.5)),
                           b"i": _Call(_SCALAR, _dtype("i8", ">"), struct.pack(">q", -3)),
                           b"e": _Call(bytes),
                           b"l": _Call(codecs.encode, "\xe9\xff", "latin-1")})
    assert got[b"f"] == 1.5 and got[b"f"].dtype == np.float32
    assert got[b"i"] == -3 and got[b"i"].dtype == np.int64  # a scalar is native-endian
    assert got[b"e"] == b"" and got[b"l"] == b"\xe9\xff"


def test_shared_and_self_referencing_containers_keep_their_identity(tmp_path):
    arr = _array((1,), _dtype("u1", "|"), b"\x05")
    pair = (arr, 1)
    loop = [arr]
    loop.append(loop)
    got = _load(tmp_path, [pair, pair, loop])
    assert got[0] is got[1] and isinstance(got[0], tuple) and got[0][0].tolist() == [5] and got[0][1] == 1
    assert got[2][1] is got[2] and got[2][0].tolist() == [5]


@pytest.mark.parametrize("obj, message", [
    (_Call(eval, "1+1"), f"refused: the pickle asks for __builtin__.eval; a data pickle may hold {_ALLOWED_KINDS}"),
    (_Call(np.ndarray, (3,)), "refused: numpy.ndarray called directly"),
    (_Call(np.dtype, 4), "refused: numpy.dtype of int"),
    (_Call(np.dtype, "O"), "refused: numpy.dtype 'O' (only booleans, integers and floats)"),
    (_dtype("i4", "?"), "refused: a numpy.dtype state other than a byte order"),
    (_dtype("i4", "<", (None, ("a",), None)), "refused: a numpy.dtype state other than a byte order"),
    (_dtype("i4", "<", (_dtype("i4"), None, None)), "refused: a numpy.dtype state other than a byte order"),
    (_Call(_RECONSTRUCT, np.dtype, (0,), b"b"), "refused: _reconstruct of anything but an empty numpy.ndarray"),
    (_Call(_RECONSTRUCT, np.ndarray, [0], b"b"), "refused: _reconstruct of anything but an empty numpy.ndarray"),
    (_Call(_RECONSTRUCT, np.ndarray, (0,), b"b"), "corrupt pickle: ValueError: a numpy array without its state"),
    (_array((2,), "i4", b"\0" * 8), "refused: a numpy array state without a numeric dtype and raw bytes"),
    (_array((2,), _dtype("i4"), "\0" * 8), "refused: a numpy array state without a numeric dtype and raw bytes"),
    (_array((2, 3), _dtype("i4"), b"\0" * 20),
     "corrupt pickle: ValueError: array of shape (2, 3) and dtype int32 with 20 bytes"),
    (_array((-2, -3), _dtype("i4"), b"\0" * 24),
     "corrupt pickle: ValueError: array of shape (-2, -3) and dtype int32 with 24 bytes"),
    (_Call(_FROMBUFFER, "text", _dtype("i4"), (1,), "C"),
     "refused: _frombuffer of anything but bytes and a numeric dtype"),
    (_Call(_FROMBUFFER, b"\0" * 4, "i4", (1,), "C"), "refused: _frombuffer of anything but bytes and a numeric dtype"),
    (_Call(_SCALAR, _dtype("i4"), b"\0" * 8), "refused: numpy scalar of anything but its bytes"),
    (_Call(_SCALAR, "i4", b"\0" * 4), "refused: numpy scalar of anything but its bytes"),
    (_Call(_SCALAR, _dtype("i4"), "\0" * 4), "refused: numpy scalar of anything but its bytes"),
    (_Call(codecs.encode, "a", "zlib"), "refused: _codecs.encode with encoding 'zlib'"),
    (_Call(codecs.encode, "\xe9"), "refused: _codecs.encode with encoding 'utf-8'"),  # its default
    (_Call(codecs.encode, b"a", "latin1"), "refused: _codecs.encode with encoding 'latin1'"),
], ids=["global", "ndarray", "dtype-int", "dtype-O", "order", "names", "subarray", "reconstruct-cls",
        "reconstruct-list", "no-state", "state-dtype", "state-raw", "size", "negative", "frombuffer-text",
        "frombuffer-dtype", "scalar-size", "scalar-dtype", "scalar-text", "codec", "codec-default", "codec-bytes"])
def test_refusals_and_corrupt_streams_whole_messages(tmp_path, obj, message):
    assert _message(tmp_path, obj) == message


def test_a_declared_length_past_the_end_is_named_as_pickletools_reads_it(tmp_path):
    liar = b"\x80\x04\x8e" + struct.pack("<Q", 1 << 50) + b"abc."  # BINBYTES8 declaring 1 PiB
    with pytest.raises(ValueError) as expected:
        list(pickletools.genops(liar))
    assert _message(tmp_path, liar) == f"corrupt pickle: {expected.value}"


def test_the_size_limit_and_unreadable_files(tmp_path, monkeypatch):
    data = pickle.dumps([1, 2], protocol=2)
    monkeypatch.setattr(safe_pickle, "MAX_FILE_BYTES", len(data))  # exactly at the limit: read
    assert _load(tmp_path, data) == [1, 2]
    monkeypatch.setattr(safe_pickle, "MAX_FILE_BYTES", len(data) - 1)
    assert _message(tmp_path, data) == f"{len(data)} bytes, more than the {len(data) - 1} a data pickle may have"
    monkeypatch.undo()

    def fail(self):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(Path, "read_bytes", fail)
    path = tmp_path / "p.pkl"
    with pytest.raises(DataError) as info:
        load_pickle(path)
    assert str(info.value) == f"{path}: cannot read: Input/output error"
