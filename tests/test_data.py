"""IDX reader/writer, the embedded MNIST, load_mnist and its error handling."""

import gzip
import shutil
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pyro_bc.data import idx
from pyro_bc.data.datafile import CHUNK, MAX_DEFLATE_RATIO
from pyro_bc.data.datasets import (
    DEFAULT_DATA_DIR,
    MNIST_FILES,
    Split,
    iterate_minibatches,
    load_mnist,
    read_idx,
    write_idx,
)
from pyro_bc.errors import ConfigError, DataError

TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
DTYPES = [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64]
HYP = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# ------------------------------------------------------------------------------------------------------- round trip
@HYP
@given(
    arr=st.sampled_from(DTYPES).flatmap(
        lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=5))
    ),
    gz=st.booleans(),
)
def test_idx_round_trip(tmp_path, arr, gz):
    path = tmp_path / ("a.idx.gz" if gz else "a.idx")
    write_idx(path, arr)
    back = read_idx(path)
    assert back.dtype == arr.dtype and back.shape == arr.shape
    np.testing.assert_array_equal(back, arr)
    assert back.flags.writeable
    assert not list(tmp_path.glob("*.tmp"))


def test_gzip_detected_by_magic_without_suffix(tmp_path):
    arr = np.arange(24, dtype=np.int32).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", arr)
    (tmp_path / "a.gz").rename(tmp_path / "plain")
    np.testing.assert_array_equal(read_idx(tmp_path / "plain"), arr)


def test_write_idx_rejects_unsupported_dtype(tmp_path):
    with pytest.raises(DataError):
        write_idx(tmp_path / "x", np.zeros(3, dtype=np.complex64))


# ----------------------------------------------------------------------------------------------- embedded MNIST, raw
@pytest.fixture(scope="module")
def raw_mnist():
    return {k: read_idx(DEFAULT_DATA_DIR / (v + ".gz")) for k, v in MNIST_FILES.items()}


def test_embedded_mnist_shapes_and_counts(raw_mnist):
    assert raw_mnist["train_images"].shape == (60000, 28, 28)
    assert raw_mnist["test_images"].shape == (10000, 28, 28)
    assert raw_mnist["train_images"].dtype == np.uint8
    assert np.bincount(raw_mnist["train_labels"]).tolist() == TRAIN_COUNTS
    assert np.bincount(raw_mnist["test_labels"]).tolist() == TEST_COUNTS
    assert raw_mnist["train_labels"][:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    x = raw_mnist["train_images"].astype(np.float64) / 255.0
    assert round(float(x.mean()), 4) == 0.1307
    assert round(float(x.std()), 4) == 0.3081


# ------------------------------------------------------------------------------------------------------- load_mnist
@pytest.fixture(scope="module")
def mnist():
    return load_mnist()


def test_load_mnist_splits(mnist):
    assert (len(mnist.train), len(mnist.val), len(mnist.test)) == (55000, 5000, 10000)
    assert mnist.n_classes == 10 and mnist.image_shape == (1, 28, 28)
    for s in (mnist.train, mnist.val, mnist.test):
        assert s.x.dtype == torch.float32 and s.y.dtype == torch.int64
        assert s.x.shape[1:] == (1, 28, 28)
    assert float(mnist.train.x.min()) == -1.0 and float(mnist.train.x.max()) == 1.0
    assert float(mnist.test.x.min()) >= -1.0 and float(mnist.test.x.max()) <= 1.0
    assert torch.bincount(mnist.test.y).tolist() == TEST_COUNTS
    counts = torch.bincount(mnist.train.y, minlength=10) + torch.bincount(mnist.val.y, minlength=10)
    assert counts.tolist() == TRAIN_COUNTS


def test_split_disjoint_and_seeded(mnist, raw_mnist):
    perm = np.random.default_rng(0).permutation(60000)
    val_idx = perm[55000:]
    expected = 2 * (raw_mnist["train_images"][val_idx].astype(np.float32) / 255 - 0.5)
    np.testing.assert_allclose(mnist.val.x[:, 0].numpy(), expected, atol=1e-6)
    assert set(perm[:55000].tolist()).isdisjoint(val_idx.tolist())
    tr = torch.from_numpy(raw_mnist["train_labels"][perm[:55000]].astype(np.int64))
    assert torch.equal(mnist.train.y, tr)


def test_val_size_0_trains_on_every_training_example(mnist, raw_mnist):
    """Every one of the 60,000 training images once (the raw files' label counts), nothing held out, so
    ``validation`` is None; the held-out split of the default is its ``validation``."""
    everything = load_mnist(val_size=0)
    assert (len(everything.train), len(everything.val), everything.validation) == (60000, 0, None)
    assert torch.bincount(everything.train.y).tolist() == np.bincount(raw_mnist["train_labels"]).tolist()
    assert mnist.validation is mnist.val


def test_split_determinism_and_subset():
    a = load_mnist(val_size=1000, seed=3, subset=2000)
    b = load_mnist(val_size=1000, seed=3, subset=2000)
    c = load_mnist(val_size=1000, seed=4, subset=2000)
    assert (len(a.train), len(a.val)) == (2000, 1000)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.val.y, b.val.y)
    assert not torch.equal(a.val.x, c.val.x)


@pytest.mark.parametrize("kw", [{"val_size": 60000}, {"val_size": -1}, {"subset": 0}, {"subset": 55001}])
def test_bad_options(kw):
    with pytest.raises(ConfigError):
        load_mnist(**kw)


def test_iterate_minibatches():
    split = Split(torch.arange(10, dtype=torch.float32).view(10, 1, 1, 1), torch.arange(10))
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    batches = list(iterate_minibatches(split, 4, g))
    assert [len(y) for _, y in batches] == [4, 4, 2]
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == list(range(10))
    g.set_state(state)
    again = list(iterate_minibatches(split, 4, g))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    assert [len(y) for _, y in iterate_minibatches(split, 4, g, drop_last=True)] == [4, 4]
    ordered = torch.cat([y for _, y in iterate_minibatches(split, 3, g, shuffle=False)])
    assert ordered.tolist() == list(range(10))
    for bad in (0, -1, 1.5):
        with pytest.raises(ConfigError):
            list(iterate_minibatches(split, bad, g))


# ------------------------------------------------------------------------------------------------------- bad inputs
def _small_dir(tmp_path, gz=False, n_train=50, n_test=20):
    """A small MNIST-like folder with the four files (no SHA256SUMS)."""
    rng = np.random.default_rng(0)
    d = tmp_path / "data"
    d.mkdir()
    ext = ".gz" if gz else ""
    write_idx(d / (MNIST_FILES["train_images"] + ext), rng.integers(0, 256, (n_train, 4, 4), dtype=np.uint8))
    write_idx(d / (MNIST_FILES["train_labels"] + ext), (np.arange(n_train) % 10).astype(np.uint8))
    write_idx(d / (MNIST_FILES["test_images"] + ext), rng.integers(0, 256, (n_test, 4, 4), dtype=np.uint8))
    write_idx(d / (MNIST_FILES["test_labels"] + ext), (np.arange(n_test) % 10).astype(np.uint8))
    return d


def test_small_dir_loads(tmp_path):
    m = load_mnist(_small_dir(tmp_path, gz=True), val_size=10)
    assert (len(m.train), len(m.val), len(m.test), m.n_classes, m.image_shape) == (40, 10, 20, 10, (1, 4, 4))


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="nowhere"):
        load_mnist(tmp_path / "nowhere")


def test_missing_file(tmp_path):
    d = _small_dir(tmp_path)
    (d / MNIST_FILES["test_labels"]).unlink()
    with pytest.raises(DataError, match=MNIST_FILES["test_labels"]):
        load_mnist(d, val_size=10)
    with pytest.raises(DataError, match="missing-file"):
        read_idx(tmp_path / "missing-file")


def test_truncated_file(tmp_path):
    d = _small_dir(tmp_path)
    p = d / MNIST_FILES["train_images"]
    p.write_bytes(p.read_bytes()[:-7])
    with pytest.raises(DataError, match=f"{p.name}.*truncated"):
        load_mnist(d, val_size=10)
    p.write_bytes(b"\x00\x00")
    with pytest.raises(DataError, match="truncated"):
        read_idx(p)
    p.write_bytes(b"\x00\x00\x08\x03\x00\x00")
    with pytest.raises(DataError, match="truncated"):
        read_idx(p)


def test_wrong_magic(tmp_path):
    p = tmp_path / "bad-magic"
    p.write_bytes(b"\x01\x00\x08\x01" + (3).to_bytes(4, "big") + b"abc")
    with pytest.raises(DataError, match="bad-magic.*magic"):
        read_idx(p)
    p.write_bytes(b"\x00\x00\x07\x01" + (3).to_bytes(4, "big") + b"abc")
    with pytest.raises(DataError, match="type byte"):
        read_idx(p)


@pytest.mark.parametrize("gz", [False, True])
def test_declared_size_mismatch(tmp_path, gz):
    p = tmp_path / ("sizes.gz" if gz else "sizes")
    opener = gzip.open if gz else open
    with opener(p, "wb") as f:
        f.write(b"\x00\x00\x08\x01" + (10).to_bytes(4, "big") + bytes(5))
    with pytest.raises(DataError, match="sizes.*declares"):
        read_idx(p)
    with opener(p, "wb") as f:  # more data than declared
        f.write(b"\x00\x00\x08\x01" + (3).to_bytes(4, "big") + bytes(5))
    with pytest.raises(DataError, match="sizes.*size mismatch"):
        read_idx(p)
    with opener(p, "wb") as f:  # 2**31 float64 items (16 GiB) declared in a tiny file: must fail fast
        f.write(b"\x00\x00\x0e\x01" + (2**31).to_bytes(4, "big") + bytes(8))
    with pytest.raises(DataError, match="sizes"):
        read_idx(p)
    with opener(p, "wb") as f:  # 2**32-1 x 2**32-1 items
        f.write(b"\x00\x00\x08\x02" + (2**32 - 1).to_bytes(4, "big") * 2 + bytes(8))
    with pytest.raises(DataError, match="sizes"):
        read_idx(p)


def test_corrupt_gzip(tmp_path):
    d = _small_dir(tmp_path, gz=True)
    p = d / (MNIST_FILES["train_images"] + ".gz")
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"{p.name}"):
        load_mnist(d, val_size=10)
    p.write_bytes(b"\x1f\x8b" + b"garbage" * 3)
    with pytest.raises(DataError, match=f"{p.name}.*corrupt gzip"):
        read_idx(p)
    good = gzip.compress(b"\x00\x00\x08\x01" + (4).to_bytes(4, "big") + b"abcd")
    p.write_bytes(good[:-3])  # cut inside the trailer
    with pytest.raises(DataError, match="corrupt gzip"):
        read_idx(p)
    p.write_bytes(good[:-8] + (zlib.crc32(b"x")).to_bytes(4, "little") + good[-4:])  # wrong CRC
    with pytest.raises(DataError, match="corrupt gzip"):
        read_idx(p)


def test_count_mismatch(tmp_path):
    d = _small_dir(tmp_path)
    write_idx(d / MNIST_FILES["train_labels"], np.zeros(49, dtype=np.uint8))
    with pytest.raises(DataError, match=f"{MNIST_FILES['train_labels']}.*count mismatch"):
        load_mnist(d, val_size=10)


def test_label_out_of_range(tmp_path):
    d = _small_dir(tmp_path)
    labels = (np.arange(50) % 10).astype(np.int8)
    labels[3] = -1
    write_idx(d / MNIST_FILES["train_labels"], labels)
    with pytest.raises(DataError, match=f"{MNIST_FILES['train_labels']}.*out of range"):
        load_mnist(d, val_size=10)
    write_idx(d / MNIST_FILES["train_labels"], (np.arange(50) % 5).astype(np.uint8))  # test labels reach 9
    with pytest.raises(DataError, match=f"{MNIST_FILES['test_labels']}.*out of range"):
        load_mnist(d, val_size=10)


def test_images_not_3d(tmp_path):
    d = _small_dir(tmp_path)
    write_idx(d / MNIST_FILES["test_images"], np.zeros((20, 16), dtype=np.uint8))
    with pytest.raises(DataError, match=MNIST_FILES["test_images"]):
        load_mnist(d, val_size=10)


def test_checksum_mismatch(tmp_path):
    d = tmp_path / "copy"
    shutil.copytree(DEFAULT_DATA_DIR, d)
    p = d / (MNIST_FILES["test_labels"] + ".gz")
    arr = read_idx(p)
    arr[0] = (arr[0] + 1) % 10
    write_idx(p, arr)  # valid IDX, wrong checksum
    with pytest.raises(DataError, match=f"{p.name}.*checksum mismatch"):
        load_mnist(d)
    load_mnist(d, verify=False, subset=10)  # skipping verification loads it


# ------------------------------------------------------------------------------------------------------------- fuzz
def _valid_bytes(gz: bool) -> bytes:
    raw = b"\x00\x00\x0b\x02" + (3).to_bytes(4, "big") + (4).to_bytes(4, "big")
    raw += np.arange(12, dtype=">i2").tobytes()
    return gzip.compress(raw, mtime=0) if gz else raw


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    gz=st.booleans(),
    cut=st.one_of(st.none(), st.integers(min_value=0, max_value=80)),
    flips=st.lists(st.tuples(st.integers(0, 79), st.integers(0, 7)), max_size=4),
)
def test_fuzz_truncation_and_bit_flips(tmp_path, gz, cut, flips):
    data = bytearray(_valid_bytes(gz))
    for pos, bit in flips:
        if pos < len(data):
            data[pos] ^= 1 << bit
    if cut is not None:
        data = data[:cut]
    p = tmp_path / ("f.gz" if gz else "f")
    p.write_bytes(bytes(data))
    try:
        arr = read_idx(p)
    except DataError as e:
        assert "\n" not in str(e) and str(p) in str(e)
    else:
        assert isinstance(arr, np.ndarray)


# ------------------------------------------------------------- IDX bytes by hand, whole messages (analysis/MUTATION.md)
def _u1(n: int, data: bytes) -> bytes:
    """A one-dimensional uint8 IDX file declaring ``n`` values, followed by ``data``."""
    return b"\x00\x00\x08\x01" + n.to_bytes(4, "big") + data


@pytest.mark.parametrize("gz, content, message", [
    (False, _u1(10, bytes(5)), "truncated: header declares shape (10,) (10 data bytes) but the file holds 5 data bytes"),
    (False, _u1(3, bytes(5)), "size mismatch: header declares shape (3,) (3 data bytes) but the file holds 5 data bytes"),
    (False, b"\x00\x00\x0b\x02" + (2).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes(11),
     "truncated: header declares shape (2, 3) (12 data bytes) but the file holds 11 data bytes"),
    (True, _u1(10, bytes(5)), "truncated: header declares shape (10,) (10 data bytes) but the file holds 5 data bytes"),
    (True, _u1(3, bytes(5)),  # gzip: never decompressed past 3 + 1 bytes, so "more than"
     "size mismatch: header declares shape (3,) (3 data bytes) but the file holds more than 3 data bytes"),
    (True, b"\x00\x00\x0d\x01" + (2).to_bytes(4, "big") + bytes(7),
     "truncated: header declares shape (2,) (8 data bytes) but the file holds 7 data bytes"),
    (False, b"\x00\x00\x07\x01" + (3).to_bytes(4, "big") + b"abc", "wrong magic 00000701: unknown IDX type byte 0x07"),
    (False, b"\x00\x00\x08\x00", "wrong magic 00000800: zero dimensions"),
    (False, b"\x00\x00\x08\x03" + bytes(2), "truncated: header declares 3 dimensions but the file ends inside them"),
    (False, b"\x00\x00\x08\x02" + (1).to_bytes(4, "big") + (2**24).to_bytes(4, "big"),  # a size's top byte set
     "truncated: header declares shape (1, 16777216) (16777216 data bytes) but the file holds 0 data bytes"),
])
def test_idx_reader_names_the_file_the_sizes_and_the_problem(tmp_path, gz, content, message):
    p = tmp_path / "x"
    p.write_bytes(gzip.compress(content) if gz else content)
    with pytest.raises(DataError) as info:
        read_idx(p)
    assert str(info.value) == f"{p}: {message}"


def test_idx_gzip_size_cap_is_the_deflate_ratio(tmp_path):
    """A gzip file declaring more than (its size + 1024) * MAX_DEFLATE_RATIO bytes is refused before decompressing;
    exactly that many are decompressed (and found missing)."""
    p = tmp_path / "cap.gz"
    for extra, refused in ((0, False), (1, True)):
        n = 1
        for _ in range(5):  # the file's size depends (a little) on the declared count: settle it
            data = gzip.compress(_u1(n, bytes(4)), mtime=0)
            n = (len(data) + 1024) * MAX_DEFLATE_RATIO + extra
        data = gzip.compress(_u1(n, bytes(4)), mtime=0)
        assert n == (len(data) + 1024) * MAX_DEFLATE_RATIO + extra
        p.write_bytes(data)
        with pytest.raises(DataError) as info:
            read_idx(p)
        cap = f"more than a {len(data)}-byte gzip file can hold"
        held = f"{p}: truncated: header declares shape ({n},) ({n} data bytes) but the file holds 4 data bytes"
        assert str(info.value) == (f"{p}: size mismatch: header declares shape ({n},) ({n} data bytes), {cap}"
                                   if refused else held)


def test_idx_gzip_reads_at_most_one_byte_past_the_declared_size(tmp_path, monkeypatch):
    """Docstring of read_idx: decompression never goes more than one byte past the declared size (here two chunks
    more are present)."""
    p = tmp_path / "long.gz"
    p.write_bytes(gzip.compress(_u1(CHUNK + 1, bytes(3 * CHUNK)), mtime=0))
    got = []
    real_open = gzip.open

    class Counting:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def read(self, n=-1):
            out = self.f.read(n)
            got.append(len(out))
            return out

    monkeypatch.setattr(idx.gzip, "open", lambda *a, **k: Counting(real_open(*a, **k)))
    with pytest.raises(DataError, match="more than"):
        read_idx(p)
    assert sum(got) == 8 + CHUNK + 2


def test_idx_raw_file_shorter_when_read_than_when_measured(tmp_path, monkeypatch):
    """A file that changes between its size check and its read: the bytes read are counted, not the size seen, and
    no more than the declared bytes are read."""
    p, shrunk = tmp_path / "grows", tmp_path / "shrunk"
    p.write_bytes(_u1(10, bytes(10)))
    shrunk.write_bytes(_u1(10, bytes(6)))
    monkeypatch.setattr(idx, "open", lambda path, mode: shrunk.open(mode), raising=False)  # idx closes it
    with pytest.raises(DataError) as info:
        read_idx(p)
    assert str(info.value) == f"{p}: truncated: header declares shape (10,) (10 data bytes) but the file holds 6 data bytes"
    shrunk.write_bytes(_u1(10, bytes(range(14))))  # grown instead: the declared 10 values are read, no more
    assert read_idx(p).tolist() == list(range(10))


def test_idx_gz_name_means_gzip_and_corrupt_gzip_names_zlibs_reason(tmp_path):
    p = tmp_path / "a.idx.gz"
    p.write_bytes(_u1(3, b"abc"))  # a raw IDX file under a .gz name is read as gzip
    try:
        gzip.decompress(_u1(3, b"abc"))
    except OSError as exc:
        reason = str(exc).splitlines()[0]
    with pytest.raises(DataError) as info:
        read_idx(p)
    assert str(info.value) == f"{p}: corrupt gzip: {reason}"


def test_idx_writer_bytes_by_hand(tmp_path):
    """The header and big-endian values of docs' IDX layout; a gzip member with MTIME 0 (RFC 1952), so the same array
    gives the same file."""
    arr = np.array([[1, -2, 3], [256, 5, -32768]], dtype=np.int16)
    expected = (b"\x00\x00\x0b\x02" + (2).to_bytes(4, "big") + (3).to_bytes(4, "big")
                + b"".join(int(v).to_bytes(2, "big", signed=True) for v in arr.ravel()))
    write_idx(tmp_path / "a", arr)
    assert (tmp_path / "a").read_bytes() == expected
    write_idx(tmp_path / "a.gz", arr)
    data = (tmp_path / "a.gz").read_bytes()
    assert data[:4] == b"\x1f\x8b\x08\x00" and data[4:8] == bytes(4) and gzip.decompress(data) == expected


def test_idx_writer_refuses_with_whole_messages(tmp_path):
    p = tmp_path / "w"
    huge = np.broadcast_to(np.uint8(0), (2**32,))  # no memory: one value seen 2**32 times
    cases = [
        (np.zeros(3, np.complex64),
         "cannot write dtype complex64 as IDX (supported: uint8, int8, int16, int32, float32, float64)"),
        (np.uint8(7), f"{p}: cannot write a 0-dimensional array as IDX (1 to 255 dimensions)"),
        (huge, f"{p}: cannot write shape (4294967296,) as IDX (each size must be < 2**32)"),
    ]
    for array, message in cases:
        with pytest.raises(DataError) as info:
            write_idx(p, array)
        assert str(info.value) == message
    assert not p.exists()


@pytest.mark.parametrize("error, reason", [(OSError(5, "Input/output error"), "Input/output error"), (OSError("boom"), "boom")])
def test_idx_read_error_gives_the_systems_reason(tmp_path, monkeypatch, error, reason):
    p = tmp_path / "x"
    p.write_bytes(_u1(1, b"a"))

    def fail(path):
        raise error

    monkeypatch.setattr(idx, "_read_raw", fail)
    with pytest.raises(DataError) as info:
        read_idx(p)
    assert str(info.value) == f"{p}: cannot read: {reason}"
