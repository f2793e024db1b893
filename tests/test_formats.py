"""The data formats beyond MNIST: CIFAR-10's python batches (read without running code), npz archives, format
detection, per-channel normalisation, and one-line errors for corrupt, truncated or inconsistent files."""

import codecs
import io
import os
import pickle
import struct
import subprocess
import zipfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numpy.lib import format as npy
from tiny_data import SIDE, cifar_batch, write_cifar, write_npz

from pyro_bc.data.cifar import META_FILE, TEST_BATCH, TRAIN_BATCHES, read_batch, read_cifar10
from pyro_bc.data.datafile import MAX_DEFLATE_RATIO
from pyro_bc.data.datasets import MNIST_FILES, channel_stats, detect_format, load_data, load_mnist, write_idx
from pyro_bc.data.npz import read_npz, read_npz_pair
from pyro_bc.data.safe_pickle import load_pickle
from pyro_bc.errors import ConfigError, DataError


def _raw_cifar(d):
    """The folder's training images and labels, batches concatenated, straight from the pickles."""
    batches = [pickle.loads((d / name).read_bytes()) for name in TRAIN_BATCHES]
    return (np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, SIDE, SIDE),
            np.concatenate([b[b"labels"] for b in batches]))


def _denormalise(x: torch.Tensor, normalisation: dict) -> np.ndarray:
    mean, std = (np.asarray(normalisation[k]).reshape(1, -1, 1, 1) for k in ("mean", "std"))
    return np.rint((x.double().numpy() * std + mean) * 255)


# ------------------------------------------------------------------------------------------------------ CIFAR-10
@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_folder_loads_with_the_seeded_split(tmp_path, protocol):
    d = write_cifar(tmp_path / "cifar", protocol=protocol)
    ds = load_data(d, val_size=10, seed=3)
    assert ds.format == "cifar10-python" and detect_format(d) == "cifar10-python"
    assert (len(ds.train), len(ds.val), len(ds.test), ds.n_classes, ds.image_shape) == (50, 10, 8, 10, (3, 8, 8))
    x, y = _raw_cifar(d)
    perm = np.random.default_rng(3).permutation(60)
    assert ds.train.y.tolist() == y[perm[:50]].tolist() and ds.val.y.tolist() == y[perm[50:]].tolist()
    np.testing.assert_array_equal(_denormalise(ds.train.x, ds.normalisation), x[perm[:50]])
    np.testing.assert_array_equal(_denormalise(ds.val.x, ds.normalisation), x[perm[50:]])
    test = pickle.loads((d / TEST_BATCH).read_bytes())
    np.testing.assert_array_equal(_denormalise(ds.test.x, ds.normalisation),
                                  test[b"data"].reshape(-1, 3, SIDE, SIDE))
    assert ds.train.x.dtype == torch.float32 and ds.train.y.dtype == torch.int64


def test_per_channel_normalisation_uses_the_training_part_only(tmp_path):
    d = write_cifar(tmp_path / "cifar")
    ds = load_data(d, val_size=10, seed=1, subset=5)
    x, _ = _raw_cifar(d)
    fit = x[np.random.default_rng(1).permutation(60)[:50]] / 255.0  # all 50 trained on, whatever the subset
    assert ds.normalisation["kind"] == "per-channel"
    np.testing.assert_allclose(ds.normalisation["mean"], fit.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(ds.normalisation["std"], fit.std(axis=(0, 2, 3)), rtol=1e-12)
    full = load_data(d, val_size=10, seed=1)
    torch.testing.assert_close(full.train.x[:5], ds.train.x, rtol=0, atol=0)
    assert full.train.x.mean(dim=(0, 2, 3)).abs().max() < 1e-5
    torch.testing.assert_close(full.train.x.std(dim=(0, 2, 3), correction=0), torch.ones(3), rtol=1e-5, atol=1e-5)
    constant = np.zeros((4, 2, 3, 3), np.uint8)
    constant[:, 1] = np.arange(4)[:, None, None]
    mean, std = channel_stats(constant)
    assert mean.tolist() == [0.0, 1.5 / 255] and std[0] == 1.0  # a constant channel is not divided by zero


def test_mnist_keeps_its_normalisation(tmp_path):
    d = tmp_path / "mnist"
    d.mkdir()
    rng = np.random.default_rng(0)
    for key, shape in (("train_images", (30, 4, 4)), ("test_images", (10, 4, 4))):
        write_idx(d / MNIST_FILES[key], rng.integers(0, 256, shape, dtype=np.uint8))
    for key, n in (("train_labels", 30), ("test_labels", 10)):
        write_idx(d / MNIST_FILES[key], (np.arange(n) % 10).astype(np.uint8))
    ds = load_data(d, val_size=5)
    assert ds.format == "mnist-idx" and ds.normalisation == {"kind": "2*(x/255-0.5)"}
    reference = load_mnist(d, val_size=5)
    assert torch.equal(ds.train.x, reference.train.x) and torch.equal(ds.test.x, reference.test.x)
    assert float(ds.train.x.min()) >= -1.0 and float(ds.train.x.max()) <= 1.0


def _py2_batch(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch pickled as Python 2's cPickle wrote CIFAR-10 (protocol 2, strings as BINSTRING), by hand."""
    def text(b: bytes) -> bytes:
        return b"U" + bytes([len(b)]) + b

    raw = data.tobytes()
    return (b"\x80\x02}(" + text(b"data")
            + b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + text(b"b") + b"\x87R("
            + b"K\x01J" + struct.pack("<i", data.shape[0]) + b"J" + struct.pack("<i", data.shape[1]) + b"\x86"
            + b"cnumpy\ndtype\n" + text(b"u1") + b"K\x00K\x01\x87R(K\x03" + text(b"|")
            + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
            + b"\x89T" + struct.pack("<i", len(raw)) + raw + b"tb"
            + text(b"labels") + b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"eu.")


def test_python2_pickles_and_str_keys_load(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (4, 3 * SIDE * SIDE), dtype=np.uint8)
    (tmp_path / "py2").write_bytes(_py2_batch(data, [3, 1, 4, 1]))
    x, y = read_batch(tmp_path / "py2")
    np.testing.assert_array_equal(x, data.reshape(4, 3, SIDE, SIDE))
    assert y.tolist() == [3, 1, 4, 1] and y.dtype == np.int64
    batch = cifar_batch(rng, 3, str_keys=True)
    (tmp_path / "py3").write_bytes(pickle.dumps(batch))
    assert read_batch(tmp_path / "py3")[1].tolist() == batch["labels"]
    batch["labels"] = np.asarray(batch["labels"], dtype=np.int64)  # labels as an array (numpy scalars inside)
    (tmp_path / "arr").write_bytes(pickle.dumps(batch, protocol=2))
    assert read_batch(tmp_path / "arr")[1].tolist() == batch["labels"].tolist()


# ------------------------------------------------------------------------------------------ the restricted unpickler
class _Reduce:
    """Pickles as the call ``func(*args)``: what a crafted pickle can ask for."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def test_a_crafted_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "ran"
    d = write_cifar(tmp_path / "cifar")
    path = d / TRAIN_BATCHES[2]
    path.write_bytes(pickle.dumps({b"data": _Reduce(os.system, f"touch {marker}"), b"labels": [1]}, protocol=2))
    with pytest.raises(DataError, match=rf"^{path}: refused: .*(posix|os)\.system") as info:
        load_data(d, val_size=10)
    assert "\n" not in str(info.value) and not marker.exists()


@pytest.mark.parametrize("crafted", [
    _Reduce(eval, "1+1"),
    _Reduce(subprocess.Popen, ["true"]),
    _Reduce(np.ndarray, (1 << 40,)),  # numpy.ndarray called directly would allocate what it is told
    _Reduce(codecs.encode, "a", "zlib"),  # a codec other than latin1
    _Reduce(np.dtype, "O"),  # object arrays
    _Reduce(np.ndarray.__reduce__(np.zeros(0))[0], np.ndarray, (1 << 40,), b"b"),  # _reconstruct of a big shape
], ids=["eval", "Popen", "ndarray", "codec", "object-dtype", "reconstruct"])
@pytest.mark.parametrize("protocol", [2, 5])
def test_the_unpickler_refuses_what_a_data_file_never_needs(tmp_path, crafted, protocol):
    path = tmp_path / "crafted"
    path.write_bytes(pickle.dumps(crafted, protocol=protocol))
    with pytest.raises(DataError, match=rf"^{path}: refused") as info:
        load_pickle(path)
    assert "\n" not in str(info.value)


def test_declared_lengths_are_bounded_before_allocation(tmp_path):
    path = tmp_path / "liar"
    path.write_bytes(b"\x80\x04\x8e" + struct.pack("<Q", 1 << 50) + b"abc")  # BINBYTES8 declaring 1 PiB
    with pytest.raises(DataError, match=rf"^{path}: corrupt pickle"):
        load_pickle(path)


# ------------------------------------------------------------------------------------------------------- bad CIFAR
def _replace_batch(d, name, obj, protocol=2):
    (d / name).write_bytes(pickle.dumps(obj, protocol=protocol))
    return d / name


@pytest.mark.parametrize("change, message", [
    (lambda b: b.pop(b"labels"), "no 'labels' entry"),
    (lambda b: b.update({b"labels": b[b"labels"][:-1]}), "count mismatch"),
    (lambda b: b.update({b"labels": [300] * 12}), "out of range"),
    (lambda b: b.update({b"labels": ["cat"] * 12}), "list of integers"),
    (lambda b: b.update({b"data": b[b"data"].astype(np.int16)}), "uint8"),
    (lambda b: b.update({b"data": b[b"data"][:, :100]}), "not 3 x S x S"),
    (lambda b: b.update({b"data": b"raw bytes"}), "uint8 array"),
])
def test_inconsistent_batches_name_the_file(tmp_path, change, message):
    d = write_cifar(tmp_path / "cifar")
    batch = cifar_batch(np.random.default_rng(1), 12)
    change(batch)
    path = _replace_batch(d, TRAIN_BATCHES[1], batch)
    with pytest.raises(DataError, match=rf"^{path}.*{message}"):
        load_data(d, val_size=10)


def test_folder_level_inconsistencies(tmp_path):
    d = write_cifar(tmp_path / "cifar")
    path = _replace_batch(d, TEST_BATCH, cifar_batch(np.random.default_rng(1), 4, side=4))
    with pytest.raises(DataError, match=rf"^{path}: image size"):
        load_data(d, val_size=10)
    write_cifar(d)
    path = _replace_batch(d, META_FILE, {b"label_names": [b"a", b"b"]})
    with pytest.raises(DataError, match=rf"{TRAIN_BATCHES[0]}.*label out of range.*classes are 0..1"):
        load_data(d, val_size=10)
    _replace_batch(d, META_FILE, [1, 2])
    with pytest.raises(DataError, match=rf"^{path}: not a CIFAR file"):
        load_data(d, val_size=10)
    path.unlink()  # batches.meta is optional
    assert load_data(d, val_size=10).n_classes == 10
    (d / TRAIN_BATCHES[3]).unlink()
    with pytest.raises(DataError, match=rf"{TRAIN_BATCHES[3]}: file not found"):
        load_data(d, val_size=10)


def test_truncated_and_corrupt_batches(tmp_path):
    d = write_cifar(tmp_path / "cifar")
    path = d / TRAIN_BATCHES[0]
    good = path.read_bytes()
    for bad in (good[: len(good) // 2], good[:-1], b"", b"\x80\x02garbage", good.replace(b"\x80\x02", b"\x80\x09", 1)):
        path.write_bytes(bad)
        with pytest.raises(DataError, match=rf"^{path}: corrupt pickle") as info:
            load_data(d, val_size=10)
        assert "\n" not in str(info.value)



_GOOD = {b"data": np.zeros((2, 12), np.uint8), b"labels": [3, 1]}  # two 3 x 2 x 2 images


@pytest.mark.parametrize("obj, message", [
    ({f"k{i}".encode(): 0 for i in range(9)},
     "no 'data' entry (keys: b'k0', b'k1', b'k2', b'k3', b'k4', b'k5', b'k6', b'k7')"),  # the first 8 keys
    ([1, 2], "not a CIFAR file: a pickled list, not a dict"),
    ({**_GOOD, b"data": b"raw"}, "'data' must be an N x 3072 uint8 array, got a bytes"),
    ({**_GOOD, b"data": np.zeros((2, 12), np.int16)},
     "'data' must be an N x 3072 uint8 array, got a int16 array of shape (2, 12)"),
    ({**_GOOD, b"data": np.zeros((2, 0), np.uint8)},
     "'data' rows hold 0 values, not 3 x S x S (3072 for 32 x 32 images)"),
    ({**_GOOD, b"labels": [2**70, 1]}, "'labels': label out of range: must lie in 0..255"),
    ({**_GOOD, b"labels": [3]}, "'labels': count mismatch: 1 labels but 'data' has 2 images"),
    ({**_GOOD, b"labels": np.array(3)}, "'labels' must be a list of integers"),  # 0-d: was a TypeError
    ({**_GOOD, b"labels": np.array([[3], [1]])}, "'labels' must be a list of integers"),
], ids=["no-data", "list", "bytes", "int16", "width-0", "huge-label", "count", "0-d-labels", "2-d-labels"])
def test_bad_batches_whole_messages(tmp_path, obj, message):
    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(DataError) as info:
        read_batch(path)
    assert str(info.value) == f"{path}: {message}"


@pytest.mark.parametrize("labels", [[3, 1], (3, 1), np.array([3, 1], np.uint8), np.array([3, 1], np.int32)],
                         ids=["list", "tuple", "uint8", "int32"])
def test_batch_labels_are_int64_however_stored(tmp_path, labels):
    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps({**_GOOD, b"labels": labels}, protocol=2))
    x, y = read_batch(path)
    assert y.dtype == np.int64 and y.tolist() == [3, 1] and x.shape == (2, 3, 2, 2)
    path.write_bytes(pickle.dumps({b"data": np.zeros((0, 12), np.uint8), b"labels": []}, protocol=2))
    x, y = read_batch(path)  # an empty batch
    assert x.shape == (0, 3, 2, 2) and y.dtype == np.int64 and y.shape == (0,)


def test_cifar_folder_names_and_class_count(tmp_path):
    d = write_cifar(tmp_path / "cifar")
    for names in (["a"], [f"c{i}" for i in range(256)]):  # the ends of 1..256
        _replace_batch(d, META_FILE, {b"label_names": names})
        raw = read_cifar10(d)
        assert raw.n_classes == len(names)
    assert (raw.train_name, raw.test_name) == (str(d / "data_batch_1..5"), str(d / TEST_BATCH))
    bad = [({b"label_names": []}, "'label_names' must be a list of 1 to 256 names"),
           ({b"label_names": [f"c{i}" for i in range(257)]}, "'label_names' must be a list of 1 to 256 names"),
           ({b"label_names": tuple("abc")}, "'label_names' must be a list of 1 to 256 names"),
           ({b"num_cases_per_batch": 12}, "no 'label_names' entry (keys: b'num_cases_per_batch')")]
    for meta, message in bad:
        path = _replace_batch(d, META_FILE, meta)
        with pytest.raises(DataError) as info:
            read_cifar10(d)
        assert str(info.value) == f"{path}: {message}"
    path = _replace_batch(d, TRAIN_BATCHES[1], cifar_batch(np.random.default_rng(1), 4, side=4))
    with pytest.raises(DataError) as info:  # the second batch differs from the first (and the later ones)
        read_cifar10(d)
    assert str(info.value) == f"{path}: images of shape (3, 4, 4), but data_batch_1's are (3, {SIDE}, {SIDE})"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.one_of(st.none(), st.integers(0, 400)),
       flips=st.lists(st.tuples(st.integers(0, 399), st.integers(0, 7)), max_size=4))
def test_fuzz_batches(tmp_path, cut, flips):
    data = bytearray(pickle.dumps(cifar_batch(np.random.default_rng(0), 2, side=2), protocol=2))
    for pos, bit in flips:
        if pos < len(data):
            data[pos] ^= 1 << bit
    path = tmp_path / "batch"
    path.write_bytes(bytes(data if cut is None else data[:cut]))
    try:
        x, y = read_batch(path)
    except DataError as e:
        assert "\n" not in str(e) and str(e).startswith(str(path))
    else:
        assert x.dtype == np.uint8 and x.shape[0] == y.shape[0]


# ------------------------------------------------------------------------------------------------------------ npz
@pytest.mark.parametrize("shape, compressed", [((3, 8, 8), True), ((8, 8, 3), False), ((8, 8), True)])
def test_npz_layouts(tmp_path, shape, compressed):
    x, y = write_npz(tmp_path / "d" / "train.npz", 30, shape, compressed=compressed)
    write_npz(tmp_path / "d" / "test.npz", 6, shape, seed=1, compressed=compressed)
    ds = load_data(tmp_path / "d", val_size=6, seed=2)
    assert ds.format == "npz" and len(ds.train) == 24 and len(ds.test) == 6
    nchw = x.transpose(0, 3, 1, 2) if shape == (8, 8, 3) else x.reshape(30, -1, 8, 8)
    assert ds.image_shape == nchw.shape[1:]
    perm = np.random.default_rng(2).permutation(30)
    np.testing.assert_array_equal(_denormalise(ds.train.x, ds.normalisation), nchw[perm[:24]])
    assert ds.train.y.tolist() == y[perm[:24]].tolist()


def test_bad_npz_files_name_the_file(tmp_path):
    path = tmp_path / "train.npz"
    write_npz(path, 10)
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match=rf"^{path}: corrupt npz"):
        read_npz(path)
    np.savez(path, x=np.zeros((2, 3, 4, 4), np.uint8), labels=np.zeros(2, np.int64))
    with pytest.raises(DataError, match=rf"^{path}: no array 'y' \(holds x, labels\)"):
        read_npz(path)
    np.savez(path, x=np.zeros((2, 3, 4, 4), np.float32), y=np.zeros(2, np.int64))
    with pytest.raises(DataError, match=rf"^{path}: 'x' must hold uint8 pixels, got float32 \(a data folder holds "
                                        r"images; train features or token ids from Python: pyro_bc.fit\(net, \(x, y\)\)\)$"):
        read_npz(path)
    np.savez(path, x=np.zeros((2, 3, 4, 4), np.uint8), y=np.zeros(3, np.int64))
    with pytest.raises(DataError, match=rf"^{path}: 'y': count mismatch"):
        read_npz(path)
    np.savez(path, x=np.array([None, 1], dtype=object), y=np.zeros(2, np.int64))
    with pytest.raises(DataError, match=rf"^{path}: 'x' has dtype object"):
        read_npz(path)
    # a header declaring far more than the member holds: refused before allocating
    header = b"{'descr': '|u1', 'fortran_order': False, 'shape': (1000000000000, 3, 32, 32), }"
    member = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header) + 1) + header + b"\n" + bytes(16)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("x.npy", member)
        zf.writestr("y.npy", member)
    with pytest.raises(DataError, match=rf"^{path}: truncated: 'x' declares shape"):
        read_npz(path)



def _npy(array: np.ndarray, version=None) -> bytes:
    """``array`` as a ``.npy`` file's bytes, in the given format version."""
    buf = io.BytesIO()
    npy.write_array(buf, array, version=version)
    return buf.getvalue()


def _archive(path, **members: bytes):
    """A zip archive ``path`` holding each member's bytes as ``<key>.npy``, stored (not deflated)."""
    with zipfile.ZipFile(path, "w") as zf:
        for key, data in members.items():
            zf.writestr(f"{key}.npy", data)
    return path


@pytest.mark.parametrize("shape, nchw", [
    ((3, 8, 4), (0, 1, 2, 3)),  # channels-first, not square: kept as it is
    ((6, 2, 3), (0, 3, 1, 2)),  # channels-last, not square: the last axis (3) is shorter than the second (6)
    ((3, 5, 3), (0, 1, 2, 3)),  # the last axis as long as the second: channels-first
])
def test_npz_layout_rule_on_non_square_images(tmp_path, shape, nchw):
    x = np.random.default_rng(0).integers(0, 256, (2, *shape), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", x=x, y=np.array([1, 2]))
    got, y = read_npz(tmp_path / "a.npz")
    np.testing.assert_array_equal(got, x.transpose(nchw))
    assert y.tolist() == [1, 2]


@pytest.mark.parametrize("version", [(1, 0), (2, 0), (3, 0)])
@pytest.mark.parametrize("fortran", [False, True])
def test_npz_reads_every_npy_version_and_fortran_order(tmp_path, version, fortran):
    x = np.arange(2 * 3 * 4 * 5, dtype=np.uint8).reshape(2, 3, 4, 5)
    member = _npy(np.asfortranarray(x) if fortran else x, version=version)
    assert member[6:8] == bytes(version) and (b"'fortran_order': True" in member) == fortran
    got, y = read_npz(_archive(tmp_path / "a.npz", x=member, y=_npy(np.array([7, 255], np.int16))))
    np.testing.assert_array_equal(got, x)
    assert y.tolist() == [7, 255] and y.dtype == np.int16


def _declaring(path, member: bytes, declared: int):
    """An archive whose stored ``x.npy`` holds ``member`` but whose central directory declares ``declared``
    uncompressed bytes (zipfile takes the sizes from there)."""
    _archive(path, x=member, y=member)
    data = bytearray(path.read_bytes())
    entry = data.index(b"PK\x01\x02")  # x's central directory entry: the uncompressed size is at offset 24
    data[entry + 24: entry + 28] = struct.pack("<I", declared)
    path.write_bytes(bytes(data))


def test_npz_member_size_cap_is_the_deflate_ratio(tmp_path):
    """A member declaring more than (its compressed size + 1024) * MAX_DEFLATE_RATIO bytes is refused before it is
    read; one declaring exactly that many is read (and found not to hold them)."""
    path, member = tmp_path / "cap.npz", _npy(np.zeros(1, np.uint8))
    header = len(member) - 1  # the .npy header before the one data byte
    cap = (len(member) + 1024) * MAX_DEFLATE_RATIO  # stored: the compressed size is the member's
    _declaring(path, member, cap)
    with pytest.raises(DataError) as info:
        read_npz(path)
    assert str(info.value) == f"{path}: size mismatch: 'x' declares shape (1,) (1 bytes) but holds {cap - header}"
    _declaring(path, member, cap + 1)
    with pytest.raises(DataError) as info:
        read_npz(path)
    assert str(info.value) == f"{path}: 'x' declares {cap + 1} bytes, more than its {len(member)} compressed bytes can hold"


def test_bad_npz_members_whole_messages(tmp_path):
    path = tmp_path / "bad.npz"
    y = _npy(np.zeros(2, np.int64))
    future = bytearray(_npy(np.zeros((2, 1, 2, 2), np.uint8)))
    future[6] = 4  # major version 4, which numpy has not defined
    x5 = np.zeros((2, 1, 2, 2, 1), np.uint8)
    cases = [
        ({"x": bytes(future), "y": y}, "'x' is a .npy file of unknown version (4, 0)"),
        ({"x": _npy(np.array(["ab", "cd"])), "y": y}, "'x' has dtype <U2; only numbers are read (no pickled objects)"),
        ({"x": _npy(x5), "y": y}, "'x' must be N x C x H x W, N x H x W x C or N x H x W, got shape (2, 1, 2, 2, 1)"),
        ({"x": _npy(x5[..., 0]), "y": _npy(np.zeros(3, np.int64))},
         "'y': count mismatch: 3 labels but 'x' has 2 images"),
    ]
    for members, message in cases:
        with pytest.raises(DataError) as info:
            read_npz(_archive(path, **members))
        assert str(info.value) == f"{path}: {message}"
    path.write_bytes(b"PK\x03\x04 not an archive")
    try:
        zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        reason = f"BadZipFile: {str(exc).splitlines()[0]}"
    with pytest.raises(DataError) as info:
        read_npz(path)
    assert str(info.value) == f"{path}: corrupt npz: {reason}"


def test_npz_pair_names_its_files(tmp_path):
    write_npz(tmp_path / "train.npz", 4)
    write_npz(tmp_path / "test.npz", 2, seed=1)
    raw = read_npz_pair(tmp_path)
    assert (raw.train_name, raw.test_name) == (str(tmp_path / "train.npz"), str(tmp_path / "test.npz"))
    assert (raw.train_x.shape, raw.test_x.shape) == ((4, 3, SIDE, SIDE), (2, 3, SIDE, SIDE))


# ----------------------------------------------------------------------------------------------- format detection
def test_format_detection(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=rf"^{empty}: no data found"):
        load_data(empty)
    d = write_cifar(tmp_path / "both")
    write_npz(d / "train.npz", 10)
    with pytest.raises(DataError, match="several data formats \\(cifar10-python, npz\\)"):
        detect_format(d)
    write_npz(tmp_path / "half" / "train.npz", 10)
    with pytest.raises(DataError, match="test.npz: file not found"):
        load_data(tmp_path / "half")
    with pytest.raises(DataError, match="nowhere: data folder not found"):
        load_data(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="val_size"):
        load_data(write_cifar(tmp_path / "c"), val_size=60)
