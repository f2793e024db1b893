"""Tests of the ``.bcz`` compressed-model format (pyro_bc.codec) and of ``pyro_bc.load``."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import pyro_bc
from pyro_bc import codec
from pyro_bc.codec import CompressedModel, Op, QuantizedLayer, load, read_bcz, to_module, write_bcz
from pyro_bc.data import load_mnist
from pyro_bc.errors import FormatError
from pyro_bc.evaluate import error_percent

torch.set_num_threads(1)
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def lenet(seed: int = 0) -> CompressedModel:
    """A LeNet-5-like pruned network with a few bit widths."""
    rng = np.random.default_rng(seed)

    def layer(kind: str, name: str, shape: tuple[int, ...], bits: int, frac: int, bias: bool = True) -> QuantizedLayer:
        lim = 2 ** (bits - 1)
        codes = rng.integers(-lim, lim, size=shape)
        b = rng.normal(size=shape[0]).astype(np.float32) if bias else None
        return QuantizedLayer(kind, name, codes, frac, b)

    items = [
        layer("conv2d", "conv1", (3, 1, 5, 5), 5, 4),
        Op("relu"),
        Op("maxpool2d", {"kernel_size": 2}),
        layer("conv2d", "conv2", (4, 3, 5, 5), 3, 2, bias=False),
        Op("relu"),
        Op("maxpool2d", {"kernel_size": 2, "stride": 2}),
        Op("flatten"),
        layer("linear", "fc1", (7, 64), 8, 7),
        Op("relu"),
        layer("linear", "fc2", (10, 7), 22, 20),
    ]
    return CompressedModel(items, (1, 28, 28), {"prior": "log-uniform", "thresholds": [-3.0, -2.5]})


def assert_same(a: CompressedModel, b: CompressedModel) -> None:
    """Models equal item by item, codes and biases bit for bit."""
    assert a.input_shape == b.input_shape and a.metadata == b.metadata and len(a.items) == len(b.items)
    for x, y in zip(a.items, b.items):
        assert type(x) is type(y)
        if isinstance(x, Op):
            assert x == y
            continue
        assert (x.kind, x.name, x.frac_bits, x.stride, x.padding, x.dilation, x.groups) == (
            y.kind, y.name, y.frac_bits, y.stride, y.padding, y.dilation, y.groups)
        assert y.weight_codes.dtype == np.int64 and np.array_equal(x.weight_codes, y.weight_codes)
        assert x.code_bits == y.code_bits
        if x.bias is None:
            assert y.bias is None
        else:
            assert y.bias.dtype == np.float32 and y.bias.tobytes() == np.asarray(x.bias, np.float32).tobytes()


def test_code_bits_twos_complement() -> None:
    def bits(*codes: int) -> int:
        return QuantizedLayer("linear", "l", np.array([codes]), 0).code_bits

    assert bits(0) == 1 and bits(-1) == 1 and bits(1) == 2 and bits(-2) == 2 and bits(2) == 3
    assert bits(127, -128) == 8 and bits(128) == 9 and bits(-(2**63)) == 64 and bits(2**63 - 1) == 64


@SETTINGS
@given(
    kind=st.sampled_from(["linear", "conv2d"]),
    dims=st.lists(st.integers(1, 6), min_size=4, max_size=4),
    bits=st.integers(1, 64),
    frac=st.integers(-64, 64),
    zero=st.booleans(),
    has_bias=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_round_trip_bit_exact(tmp_path: Path, kind, dims, bits, frac, zero, has_bias, seed) -> None:
    rng = np.random.default_rng(seed)
    shape = tuple(dims) if kind == "conv2d" else tuple(dims[:2])
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    codes = np.zeros(shape, np.int64) if zero else rng.integers(lo, hi, size=shape, endpoint=True, dtype=np.int64)
    codes.flat[0] = 0 if zero else lo  # force the full width
    bias = rng.normal(size=shape[0]).astype(np.float32) if has_bias else None
    conv = {"stride": (1, 2), "padding": 1, "dilation": (2, 1)} if kind == "conv2d" else {}
    layer = QuantizedLayer(kind, "layer", codes, frac, bias, **conv)
    assert layer.code_bits == (1 if zero else bits)
    model = CompressedModel([layer, Op("tanh")], (dims[1], 9, 9), {"k": [1, 2.5, None, "x"]})
    path = tmp_path / "m.bcz"
    size = write_bcz(path, model)
    assert size == os.path.getsize(path)
    assert_same(model, read_bcz(path))


def test_lenet_module_matches_reference(tmp_path: Path) -> None:
    model = lenet()
    path = tmp_path / "lenet.bcz"
    assert write_bcz(path, model) == os.path.getsize(path)
    back = read_bcz(path)
    assert_same(model, back)
    layers = [i for i in model.items if isinstance(i, QuantizedLayer)]
    ref = nn.Sequential(
        nn.Conv2d(1, 3, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 4, 5, bias=False), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64, 7), nn.ReLU(), nn.Linear(7, 10),
    ).eval()
    ref_layers = [m for m in ref if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.no_grad():
        for mod, q in zip(ref_layers, layers):
            mod.weight.copy_(torch.from_numpy(q.weight_codes.astype(np.float64) * 2.0**-q.frac_bits).float())
            if q.bias is not None:
                mod.bias.copy_(torch.from_numpy(q.bias))
    for net in (to_module(back), load(path), pyro_bc.load(path)):
        assert not net.training
        assert len(net) == len(ref) and all(isinstance(m, type(r)) for m, r in zip(net, ref))  # plain torch modules
        for mine, theirs in zip(net.state_dict().items(), ref.state_dict().items()):
            assert mine[0] == theirs[0] and mine[1].dtype == torch.float32 and torch.equal(mine[1], theirs[1])
        x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            out = net(x)
            assert out.shape == (2, 10) and torch.equal(out, ref(x))


def test_to_module_conv_params_and_ops() -> None:
    codes = np.arange(-8, 8).reshape(4, 1, 2, 2)
    layer = QuantizedLayer("conv2d", "dw", codes, 3, None, stride=2, padding=(1, 0), dilation=1, groups=2)
    model = CompressedModel([layer, Op("sigmoid"), Op("avgpool2d", {"kernel_size": (2, 1)}), Op("flatten")],
                            (2, 6, 6))
    net = to_module(model)
    conv = net[0]
    assert (conv.in_channels, conv.out_channels, conv.groups, conv.stride, conv.padding) == (2, 4, 2, (2, 2), (1, 0))
    assert conv.bias is None and torch.equal(conv.weight, torch.from_numpy(codes / 8.0).float())
    assert isinstance(net[2], nn.AvgPool2d) and net[2].kernel_size == (2, 1) and net[2].stride == (2, 1)
    assert net(torch.ones(1, 2, 6, 6)).shape == (1, 4 * 2 * 3)


@pytest.mark.parametrize("channels", [1, 3])
def test_loaded_convolution_is_channels_last_with_the_same_values(channels: int) -> None:
    """The loader's convolutions return channels-last tensors equal to ``F.conv2d`` on the default layout."""
    g = torch.Generator().manual_seed(3)
    conv = codec.Conv2dChannelsLast(channels, 4, 3, padding=1)
    x = torch.randn(5, channels, 9, 9, generator=g)
    with torch.no_grad():
        out = conv(x)
        expected = nn.functional.conv2d(x, conv.weight, conv.bias, padding=1)
    assert out.is_contiguous(memory_format=torch.channels_last) and out.stride()[1] == 1
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_entropy_coding_only_where_it_pays(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    sparse = np.zeros((64, 256), np.int64)
    sparse[rng.random(sparse.shape) < 0.02] = 5
    dense = rng.integers(-(2**31), 2**31, size=(8, 8), dtype=np.int64)
    for codes, expect_compressed in ((sparse, True), (dense, False)):
        model = CompressedModel([QuantizedLayer("linear", "fc", codes, 4)], (codes.shape[1],))
        size = write_bcz(tmp_path / "m.bcz", model)
        data = (tmp_path / "m.bcz").read_bytes()
        header = json.loads(data[10 : 10 + struct.unpack_from("<I", data, 6)[0]])
        assert (header["codec"] != "none") == expect_compressed
        raw = codec.pack_codes(codes, QuantizedLayer("linear", "fc", codes, 4).code_bits)
        assert header["payload_size"] == len(raw)
        assert (header["stored_size"] < len(raw)) == expect_compressed and size == len(data)
        assert_same(model, read_bcz(tmp_path / "m.bcz"))


@pytest.fixture(scope="module")
def good_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("good") / "lenet.bcz"
    write_bcz(path, lenet())
    return path.read_bytes()


def expect_format_error(path: Path, data: bytes, fragment: str = "") -> str:
    path.write_bytes(data)
    with pytest.raises(FormatError) as info:
        read_bcz(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message and fragment in message
    return message


def test_truncated_every_offset(tmp_path: Path, good_bytes: bytes) -> None:
    for cut in list(range(40)) + list(range(40, len(good_bytes), 7)):
        expect_format_error(tmp_path / "t.bcz", good_bytes[:cut])
    expect_format_error(tmp_path / "t.bcz", good_bytes[:5], "too short")
    expect_format_error(tmp_path / "t.bcz", good_bytes + b"\0")


@SETTINGS
@given(data=st.data())
def test_single_bit_flip(tmp_path: Path, good_bytes: bytes, data: st.DataObject) -> None:
    position = data.draw(st.integers(0, len(good_bytes) * 8 - 1))
    broken = bytearray(good_bytes)
    broken[position // 8] ^= 1 << (position % 8)
    expect_format_error(tmp_path / "f.bcz", bytes(broken))


def test_bad_magic_and_version(tmp_path: Path, good_bytes: bytes) -> None:
    expect_format_error(tmp_path / "m.bcz", b"PK\x03\x04" + good_bytes[4:], "magic")
    expect_format_error(tmp_path / "v.bcz", good_bytes[:4] + struct.pack("<H", 2) + good_bytes[6:], "version")
    expect_format_error(tmp_path / "c.bcz", good_bytes[:-1] + bytes([good_bytes[-1] ^ 1]), "corrupt")
    expect_format_error(tmp_path / "h.bcz", good_bytes[:6] + struct.pack("<I", 2**32 - 1) + good_bytes[10:], "header")


def craft(header: dict, payload: bytes) -> bytes:
    """A file with a valid CRC around an arbitrary header and payload."""
    raw = json.dumps(header).encode()
    body = b"BCZ1" + struct.pack("<HI", 1, len(raw)) + raw + payload
    return body + struct.pack("<I", zlib.crc32(body))


def small_header(**layer: object) -> dict:
    entry = {"kind": "linear", "name": "fc", "shape": [2, 3], "frac_bits": 0, "code_bits": 4, "has_bias": False,
             "codes_offset": 0, "codes_length": 3, "bias_offset": 3, "bias_length": 0}
    entry.update(layer)
    return {"input_shape": [3], "metadata": {}, "codec": "none", "payload_size": 3, "stored_size": 3,
            "items": [entry]}


def test_crafted_headers(tmp_path: Path) -> None:
    path = tmp_path / "x.bcz"
    path.write_bytes(craft(small_header(), bytes([0x12, 0x34, 0x56])))
    assert read_bcz(path).items[0].weight_codes.tolist() == [[1, 2, 3], [4, 5, 6]]
    huge = small_header(shape=[2**40, 2**40], codes_length=2**79)
    expect_format_error(path, craft(huge, b"\0" * 3), "shape")
    wide = small_header(shape=[2**20, 2**20, 2**20, 2**20], kind="conv2d", stride=[1, 1], padding=[0, 0],
                        dilation=[1, 1], groups=1)
    expect_format_error(path, craft(wide, b"\0" * 3), "larger than any payload")
    expect_format_error(path, craft(small_header(shape=[2**10, 2**10]), b"\0" * 3), "does not match")
    expect_format_error(path, craft(small_header(shape=[-2, 3]), b"\0" * 3), "shape")
    expect_format_error(path, craft(small_header(code_bits=65), b"\0" * 3), "code_bits")
    expect_format_error(path, craft(small_header(frac_bits=True), b"\0" * 3), "frac_bits")
    expect_format_error(path, craft(small_header(kind="lstm"), b"\0" * 3), "kind")
    big = small_header()
    big.update(codec="zlib", payload_size=2**33)
    expect_format_error(path, craft(big, zlib.compress(b"\0" * 3)))
    bomb = small_header()
    bomb.update(codec="zlib", stored_size=len(zlib.compress(b"\0" * 10**6)))
    expect_format_error(path, craft(bomb, zlib.compress(b"\0" * 10**6)), "more than")
    short = small_header()
    short.update(codec="lzma", stored_size=len(codec.lzma.compress(b"\0")))
    expect_format_error(path, craft(short, codec.lzma.compress(b"\0")), "truncated")
    expect_format_error(path, craft({"items": []}, b""), "missing key")
    body = b"BCZ1" + struct.pack("<HI", 1, 5) + b"{bad}"
    expect_format_error(path, body + struct.pack("<I", zlib.crc32(body)), "JSON")
    with pytest.raises(FormatError, match="missing.bcz"):
        read_bcz(tmp_path / "missing.bcz")


def test_write_unwritable_directory(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    for target in (blocker / "m.bcz", tmp_path / "nope" / "m.bcz"):
        with pytest.raises(FormatError, match=str(target)):
            write_bcz(target, lenet())
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.bcz"
    write_bcz(path, lenet(0))
    before = path.read_bytes()

    def fail(*_: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(codec.os, "replace", fail)
    with pytest.raises(FormatError, match="No space left"):
        write_bcz(path, lenet(1))
    assert os.listdir(tmp_path) == ["m.bcz"] and path.read_bytes() == before


def test_write_rejects_bad_models(tmp_path: Path) -> None:
    path = tmp_path / "m.bcz"
    bad = [
        QuantizedLayer("linear", "f", np.ones((2, 3)), 0),
        QuantizedLayer("linear", "f", np.ones((2, 3, 1), np.int64), 0),
        QuantizedLayer("linear", "f", np.ones((2, 3), np.int64), 0, np.zeros(3, np.float32)),
        QuantizedLayer("conv2d", "c", np.ones((3, 1, 1, 1), np.int64), 0, groups=2),
        QuantizedLayer("linear", "f", np.ones((2, 3), np.int64), 99),
    ]
    for layer in bad:
        with pytest.raises(FormatError, match="cannot write"):
            write_bcz(path, CompressedModel([layer], (3,)))
    with pytest.raises(FormatError, match="JSON"):
        write_bcz(path, CompressedModel([], (3,), {"x": float("nan")}))
    assert not os.listdir(tmp_path)


@SETTINGS
@given(data=st.data())
def test_recrc_flip_never_other_exception(tmp_path: Path, good_bytes: bytes, data: st.DataObject) -> None:
    """A flip with a repaired checksum (plain or lzma/zlib payload) reads fine or raises FormatError."""
    sparse = np.zeros((32, 64), np.int64)
    sparse[::5, ::3] = -3
    packed = codec.encode(CompressedModel([QuantizedLayer("linear", "fc", sparse, 2), Op("relu")], (64,)))
    assert b'"codec":"none"' not in packed
    good_bytes = data.draw(st.sampled_from([good_bytes, packed]))
    position = data.draw(st.integers(10, len(good_bytes) - 5))
    body = bytearray(good_bytes[:-4])
    body[position] ^= data.draw(st.integers(1, 255))
    path = tmp_path / "r.bcz"
    path.write_bytes(bytes(body) + struct.pack("<I", zlib.crc32(bytes(body))))
    try:
        read_bcz(path)
    except FormatError as exc:
        assert str(path) in str(exc)


# ---------------------------------------------------------------- pyro_bc.load

RESULTS = Path(__file__).resolve().parents[1] / "analysis" / "results"
COMMITTED = [RESULTS / f"{model}-{prior}" / "MODEL.bcz" for model in ("lenet300", "lenet5") for prior in ("gnj", "ghs", "lu")]


def test_importing_the_package_leaves_the_codec_for_load() -> None:
    code = "import sys, pyro_bc; print('pyro_bc.codec' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_load_reports_a_missing_file_as_a_format_error(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="cannot read"):
        pyro_bc.load(tmp_path / "missing.bcz")


def test_committed_results_load_and_reproduce_their_test_error() -> None:
    test = load_mnist(None).test
    for path in COMMITTED:
        net = pyro_bc.load(path)
        assert isinstance(net, nn.Sequential) and not net.training
        recorded = json.loads(path.with_suffix(".json").read_text())["error_compressed"]
        assert error_percent(net, test.x, test.y) == pytest.approx(recorded, abs=1e-9), path
