"""Tests of the ``.bcz`` compressed-model format (pyro_bc.bcz.codec: version 2 written, versions 1 and 2 read) and of
``pyro_bc.load``: round trips, rebuilt modules, and fuzzed files of both versions (truncations, bit flips,
lying sizes) that must each give one FormatError line naming the path."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import pyro_bc
from pyro_bc.bcz import code_storage, codec
from pyro_bc.bcz import model as bcz_model
from pyro_bc.bcz import v1 as bcz_v1
from pyro_bc.bcz import v2 as bcz_v2
from pyro_bc.bcz.bayesian import CompressedBayesianNet
from pyro_bc.bcz.binary import BadData, Reader, svarint, uvarint, uvarints
from pyro_bc.bcz.codec import (
    CompressedModel,
    FloatLayer,
    NormLayer,
    Op,
    QuantizedLayer,
    decode,
    encode,
    load,
    read_bcz,
    write_bcz,
)
from pyro_bc.bcz.model import LayerVariance, Variances
from pyro_bc.bcz.modules import Graph, to_module
from pyro_bc.bcz.v2 import kept_metadata
from pyro_bc.data.datasets import load_mnist
from pyro_bc.errors import FormatError
from pyro_bc.metrics.evaluate import error_percent
from pyro_bc.nn import layout

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
    assert a.input_shape == b.input_shape and kept_metadata(a.metadata) == b.metadata
    assert a.input_dtype == b.input_dtype and len(a.items) == len(b.items)
    for x, y in zip(a.items, b.items):
        assert type(x) is type(y) and x.inputs == y.inputs
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
    conv = layout.Conv2dChannelsLast(channels, 4, 3, padding=1)
    x = torch.randn(5, channels, 9, 9, generator=g)
    with torch.no_grad():
        out = conv(x)
        expected = nn.functional.conv2d(x, conv.weight, conv.bias, padding=1)
    assert out.is_contiguous(memory_format=torch.channels_last) and out.stride()[1] == 1
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_storage_follows_the_codes(tmp_path: Path) -> None:
    """A layer's codes take the smallest of packed, coded and sparse: sparse codes are not packed, random
    full-width codes are, and the file is smaller than version 1's."""
    rng = np.random.default_rng(1)
    sparse = np.zeros((64, 256), np.int64)
    mask = rng.random(sparse.shape) < 0.02
    sparse[mask] = rng.integers(1, 4, size=int(mask.sum()))
    dense = rng.integers(-(2**31), 2**31, size=(8, 8), dtype=np.int64)
    for codes, packed_is_best in ((sparse, False), (dense, True)):
        model = CompressedModel([QuantizedLayer("linear", "fc", codes, 4)], (codes.shape[1],))
        storage, block = code_storage.encode_codes(codes)
        assert (storage == code_storage.PACKED) == packed_is_best
        blocks = [code_storage.encode_as(storage, codes) for storage in range(3)]
        assert len(block) == min(len(b) for b in blocks if b is not None)
        size = write_bcz(tmp_path / "m.bcz", model)
        assert size < len(bcz_v1.encode(model)) and size == os.path.getsize(tmp_path / "m.bcz")
        assert_same(model, read_bcz(tmp_path / "m.bcz"))


def test_committed_lenet5_header_is_small() -> None:
    """The version-2 header of lenet5-gnj (version 1's JSON header: 1,669 bytes) fits in 200 bytes."""
    data = (RESULTS / "lenet5-gnj" / "MODEL.bcz").read_bytes()
    assert data[4:6] == struct.pack("<H", 2)
    reader = Reader(data, 7)
    reader.uvarint("header length")
    assert reader.uvarint("stored header length") < 200


def residual(seed: int = 0) -> CompressedModel:
    """A small graph: a residual block (add), a concatenation (cat), padded pooling and an adaptive pool."""
    rng = np.random.default_rng(seed)

    def conv(name: str, out: int, inp: int, inputs: tuple[int, ...] | None = None) -> QuantizedLayer:
        codes = np.where(rng.random((out, inp, 3, 3)) < 0.3, rng.integers(-20, 21, size=(out, inp, 3, 3)), 0)
        return QuantizedLayer("conv2d", name, codes, 6, rng.normal(size=out).astype(np.float32), padding=1,
                              inputs=inputs)

    items = [
        conv("stem", 4, 1),                                            # 0
        Op("relu"),                                                    # 1
        conv("a", 4, 4),                                               # 2
        Op("add", inputs=(2, 1)),                                      # 3: residual
        Op("maxpool2d", {"kernel_size": 3, "stride": 2, "padding": 1}),  # 4
        conv("b", 2, 4, inputs=(3,)),                                  # 5: reads the sum, not the pool
        Op("avgpool2d", {"kernel_size": 3, "stride": 2, "padding": 1}),  # 6
        Op("cat", inputs=(4, 4, 6)),                                   # 7: channels 4 + 4 + 2
        Op("adaptive_avgpool2d", {"output_size": (1, 1)}),             # 8
        Op("flatten"),                                                 # 9
        QuantizedLayer("linear", "fc", rng.integers(-100, 100, size=(10, 10)), 7, None),  # 10
    ]
    return CompressedModel(items, (1, 8, 8), {"model": "toy", "prior": "gnj", "thresholds": [-3.0], "run": "x"})


def newer_kinds(seed: int = 0) -> CompressedModel:
    """A graph of the kinds with wire ids 12-21: a 1-D convolution, the newer activations, a gather (a channel
    shuffle), ceil-mode pooling, a per-channel product and a spatial mean."""
    rng = np.random.default_rng(seed)
    items = [
        QuantizedLayer("conv1d", "seq", rng.integers(-9, 10, size=(4, 2, 3)), 4, rng.normal(size=4).astype(np.float32),
                       padding=(0, 1)),                                 # 0: (4, 6), stored over a height of one
        Op("gelu"),                                                    # 1
        Op("gather", {"index": [3, 0, 2, 1, 0]}),                      # 2: (5, 6), a reordering with a repeat
        Op("relu6"),                                                   # 3
        Op("hardswish"),                                               # 4
        Op("silu"),                                                    # 5
        Op("hardsigmoid", inputs=(5,)),                                # 6
        Op("mul", inputs=(5, 6)),                                      # 7
        Op("flatten"),                                                 # 8
        QuantizedLayer("linear", "fc", rng.integers(-50, 50, size=(3, 30)), 6, None),  # 9
    ]
    return CompressedModel(items, (2, 6), {"model": "toy", "prior": "gnj"})


def pooled_kinds(seed: int = 0) -> CompressedModel:
    """Ceil-mode max pooling and a spatial mean on images."""
    rng = np.random.default_rng(seed)
    items = [QuantizedLayer("conv2d", "c", rng.integers(-9, 10, size=(3, 1, 3, 3)), 4, None),  # (3, 5, 5)
             Op("maxpool2d_ceil", {"kernel_size": 2, "stride": 2}),    # (3, 3, 3): the ceil keeps the edge
             Op("spatial_mean"),                                       # (3,)
             QuantizedLayer("linear", "fc", rng.integers(-50, 50, size=(2, 3)), 5, None)]
    return CompressedModel(items, (1, 7, 7), {})


def test_the_newer_kinds_round_trip_and_compute_what_torch_does() -> None:
    for model, x in ((newer_kinds(), torch.randn(4, 2, 6)), (pooled_kinds(), torch.randn(4, 1, 7, 7))):
        again = codec.decode(codec.encode(model))
        assert [i.kind for i in again.items] == [i.kind for i in model.items]
        assert [i.params for i in again.items if isinstance(i, Op)] == [i.params for i in model.items if isinstance(i, Op)]
        with torch.no_grad():
            torch.testing.assert_close(to_module(again)(x), to_module(model)(x))
    # by hand, the 1-D graph: conv1d, GELU, channels 3 0 2 1 0, ReLU6, Hardswish, SiLU * hardsigmoid(SiLU), linear
    model, x = newer_kinds(), torch.randn(4, 2, 6, generator=torch.Generator().manual_seed(1))
    conv, fc = model.items[0], model.items[9]
    h = nn.functional.conv1d(x, torch.from_numpy(conv.weight()), torch.from_numpy(conv.bias), padding=1)
    h = nn.functional.gelu(h)[:, [3, 0, 2, 1, 0]]
    h = nn.functional.silu(nn.functional.hardswish(nn.functional.relu6(h)))
    h = (h * nn.functional.hardsigmoid(h)).flatten(1)
    with torch.no_grad():
        torch.testing.assert_close(to_module(model)(x), h @ torch.from_numpy(fc.weight()).t())
        pooled, images = pooled_kinds(), torch.randn(2, 1, 7, 7)
        y = nn.functional.conv2d(images, torch.from_numpy(pooled.items[0].weight()))
        y = nn.functional.max_pool2d(y, 2, 2, ceil_mode=True).mean((2, 3))
        torch.testing.assert_close(to_module(pooled)(images), y @ torch.from_numpy(pooled.items[3].weight()).t())


def deterministic_kinds(seed: int = 0) -> CompressedModel:
    """Deterministic nodes among quantized ones: float layers (weights at float32, and at float16 where exact), a
    standalone BatchNorm as a depthwise 1x1 convolution, a layer_norm with and one without its affine tensors."""
    rng = np.random.default_rng(seed)
    halves = lambda *shape: rng.normal(size=shape).astype(np.float16).astype(np.float32)
    items = [
        QuantizedLayer("conv2d", "c", rng.integers(-9, 10, size=(3, 2, 3, 3)), 4, None, padding=1),   # 0: (3, 5, 5)
        FloatLayer("conv2d", "bn", halves(3, 1, 1, 1), halves(3), groups=3),                          # 1
        NormLayer("ln2d", (3, 5, 5), 1e-5, rng.normal(size=(3, 5, 5)), halves(3, 5, 5)),             # 2
        Op("relu"),                                                                                   # 3
        Op("flatten"),                                                                                # 4
        FloatLayer("linear", "head", rng.normal(size=(6, 75)), rng.normal(size=6)),                   # 5: float32
        NormLayer("ln", (6,), 0.25),                                                                  # 6: no affine
        QuantizedLayer("linear", "fc", rng.integers(-50, 50, size=(4, 6)), 5, rng.normal(size=4).astype(np.float32)),
    ]
    return CompressedModel(items, (2, 5, 5), {"model": "toy"})


@pytest.fixture(scope="module", params=["v2-chain", "v2-graph", "v2-newer-kinds", "v2-deterministic", "v1"])
def good_bytes(request: pytest.FixtureRequest) -> bytes:
    """Valid files: version 2 of a chain, of a graph, of the newer kinds and of deterministic nodes, and version 1
    of the chain."""
    return {"v2-chain": lambda: codec.encode(lenet()), "v2-graph": lambda: codec.encode(residual()),
            "v2-newer-kinds": lambda: codec.encode(newer_kinds()),
            "v2-deterministic": lambda: codec.encode(deterministic_kinds()),
            "v1": lambda: bcz_v1.encode(lenet())}[request.param]()


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
    expect_format_error(tmp_path / "v.bcz", good_bytes[:4] + struct.pack("<H", 4) + good_bytes[6:], "version")
    expect_format_error(tmp_path / "c.bcz", good_bytes[:-1] + bytes([good_bytes[-1] ^ 1]), "corrupt")
    if good_bytes[4] == 1:
        lying = good_bytes[:6] + struct.pack("<I", 2**32 - 1) + good_bytes[10:]
    else:
        reader = Reader(good_bytes, 7)
        reader.uvarint("header length")
        lying = good_bytes[:7] + uvarint(2**35) + good_bytes[reader.pos :]
    expect_format_error(tmp_path / "h.bcz", lying, "header")


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
    short.update(codec="lzma", stored_size=len(bcz_v1.lzma.compress(b"\0")))
    expect_format_error(path, craft(short, bcz_v1.lzma.compress(b"\0")), "truncated")
    expect_format_error(path, craft({"items": []}, b""), "missing key")
    body = b"BCZ1" + struct.pack("<HI", 1, 5) + b"{bad}"
    expect_format_error(path, body + struct.pack("<I", zlib.crc32(body)), "JSON")
    with pytest.raises(FormatError, match="missing.bcz"):
        read_bcz(tmp_path / "missing.bcz")


def frame_v2(header: bytes, payload: bytes, deflate: bool = False, size: int | None = None) -> bytes:
    """A version-2 file with a valid CRC around an arbitrary decoded header and payload."""
    stored = zlib.compress(header, 9)[2:-4] if deflate else header  # raw deflate: zlib minus its 2+4 bytes
    body = (b"BCZ1" + struct.pack("<HB", 2, int(deflate)) + uvarint(len(header) if size is None else size)
            + uvarint(len(stored)) + stored + payload)
    return body + struct.pack("<I", zlib.crc32(body))


def linear_v2(shape: tuple[int, int] = (2, 3), storage: int = 0, length: int = 4, bias: int = 0,
              bias_length: int = 0, kind: int = 0, back: int = 1, meta: bytes = b"", frac: int = 0) -> bytes:
    """The decoded header of one linear layer reading the input (3,)."""
    return (uvarint(1) + uvarint(3) + uvarint(len(meta)) + meta + uvarint(1) + bytes([kind]) + uvarint(back)
            + uvarint(2) + b"fc" + uvarints(shape) + svarint(frac) + bytes([storage]) + uvarint(length)
            + bytes([bias]) + uvarint(bias_length))


def norm_v2(shape: tuple[int, ...] = (3,), eps: float = 0.5, weight: tuple[int, int] = (2, 6),
            bias: tuple[int, int] = (0, 0)) -> bytes:
    """The decoded header of one layer_norm node reading the input (3,): weight and bias (storage, length)."""
    return (uvarint(1) + uvarint(3) + uvarint(0) + uvarint(1) + bytes([22]) + uvarint(1) + uvarint(2) + b"ln"
            + uvarint(len(shape)) + uvarints(shape) + struct.pack("<d", eps) + bytes([weight[0]]) + uvarint(weight[1])
            + bytes([bias[0]]) + uvarint(bias[1]))


PACKED_BLOCK = bytes([4, 0x12, 0x34, 0x56])  # 4-bit codes 1 2 3 4 5 6


def test_crafted_v2_files(tmp_path: Path) -> None:
    """Lying sizes and malformed fields of a version-2 file: each one line naming the problem."""
    path = tmp_path / "x.bcz"
    path.write_bytes(frame_v2(linear_v2(), PACKED_BLOCK))
    assert read_bcz(path).items[0].weight_codes.tolist() == [[1, 2, 3], [4, 5, 6]]
    path.write_bytes(frame_v2(linear_v2(), PACKED_BLOCK, deflate=True))
    assert read_bcz(path).items[0].weight_codes.tolist() == [[1, 2, 3], [4, 5, 6]]
    assert read_bcz(path).input_dtype is None  # a header that ends with its nodes: floating-point inputs
    for wire_id, name in ((1, "int64"), (2, "int32"), (5, "uint8")):  # the fixed bytes of docs/FORMAT.md
        path.write_bytes(frame_v2(linear_v2() + bytes([wire_id]), PACKED_BLOCK))
        assert read_bcz(path).input_dtype == name
    cases = [
        (frame_v2(linear_v2(shape=(2**14, 2**14 + 1)), PACKED_BLOCK), "larger than this reader accepts"),
        (frame_v2(linear_v2(shape=(2**29, 1)), PACKED_BLOCK), "shape"),
        (frame_v2(linear_v2(length=2**40), PACKED_BLOCK), "payload bytes"),
        (frame_v2(linear_v2(length=5), PACKED_BLOCK), "payload bytes"),
        (frame_v2(linear_v2(length=3), PACKED_BLOCK[:3]), "packed bytes"),
        (frame_v2(linear_v2(), bytes([0]) + PACKED_BLOCK[1:]), "packed code bits"),
        (frame_v2(linear_v2(back=2), PACKED_BLOCK), "input"),
        (frame_v2(linear_v2(kind=99), PACKED_BLOCK), "kind"),
        (frame_v2(linear_v2(storage=5), PACKED_BLOCK), "weight storage"),
        (frame_v2(linear_v2(storage=3), PACKED_BLOCK), "float32 weights need frac_bits 0 and length 24"),
        (frame_v2(linear_v2(storage=4, length=12, frac=1), b"\0" * 12), "float16 weights need frac_bits 0"),
        (frame_v2(linear_v2(storage=4, length=12), b"\0" * 11), "payload bytes"),
        (frame_v2(linear_v2(bias=1, bias_length=4), PACKED_BLOCK + b"\0" * 4), "bias length"),
        (frame_v2(linear_v2(meta=b"[1]"), PACKED_BLOCK), "metadata"),
        (frame_v2(linear_v2(meta=b"{bad"), PACKED_BLOCK), "JSON"),
        (frame_v2(linear_v2()[:-1] + b"\x80\x00", PACKED_BLOCK), "minimal"),
        (frame_v2(linear_v2() + b"\0", PACKED_BLOCK), "input dtype 0 is none of"),  # 0 is never written
        (frame_v2(linear_v2() + b"\6", PACKED_BLOCK), "input dtype 6 is none of"),
        (frame_v2(linear_v2() + b"\1\0", PACKED_BLOCK), "unexpected bytes"),
        (frame_v2(linear_v2(), PACKED_BLOCK, deflate=True, size=3), "more than"),
        (frame_v2(linear_v2(), PACKED_BLOCK, deflate=True, size=200), "truncated"),
        (frame_v2(linear_v2(), PACKED_BLOCK, size=2**30), "header length"),
        (frame_v2(linear_v2(), PACKED_BLOCK)[:6] + b"\x07" + frame_v2(linear_v2(), PACKED_BLOCK)[7:], "header codec"),
    ]
    coded = [  # coded blocks: min, alphabet size, counts, stream
        (svarint(0) + uvarint(2**17), "alphabet size"),
        (svarint(0) + uvarint(2) + uvarints([0, 0]) + b"\x01", "all zero"),
        (svarint(0) + uvarint(1) + uvarints([6]) + b"\x01", "one-symbol"),
        (svarint(0) + uvarint(2) + uvarints([1, 1]) + b"\x01\x00", "zero byte"),
        (svarint(2**63 - 1) + uvarint(2) + uvarints([1, 1]) + b"\x01", "alphabet size"),
    ]
    cases += [(frame_v2(linear_v2(storage=1, length=len(b)), b), m) for b, m in coded]
    sparse = [(uvarint(7), "sparse count"), (uvarint(1) + uvarint(6), "sparse position"),
              (uvarint(1) + uvarint(0) + bytes([2]), "sparse value storage")]
    cases += [(frame_v2(linear_v2(storage=2, length=len(b)), b), m) for b, m in sparse]
    select = uvarint(1) + uvarint(3) + uvarint(0) + uvarint(1) + bytes([bcz_model.WIRE_IDS["select"]]) + uvarint(1)
    cases += [(frame_v2(select + bytes([1]) + uvarint(3) + bytes([0b11110000]), b""), "bitmap"),
              (frame_v2(select + bytes([0]) + uvarint(2) + uvarints([2**16, 0]), b""), "select")]
    pool = uvarint(1) + uvarint(3) + uvarint(0) + uvarint(1) + bytes([bcz_model.WIRE_IDS["maxpool2d"]]) + uvarint(1)
    cases.append((frame_v2(pool + uvarints([2, 2, 2, 2, 2, 0]), b""), "padding"))
    cases += [
        (frame_v2(norm_v2(shape=()), b"\0" * 6), "layer_norm rank"),
        (frame_v2(norm_v2(shape=(1,) * 9), b"\0" * 6), "layer_norm rank"),
        (frame_v2(norm_v2(shape=(0,)), b"\0" * 6), "normalized_shape"),
        (frame_v2(norm_v2(shape=(2**14, 2**14, 2)), b"\0" * 6), "weight length"),
        (frame_v2(norm_v2(shape=(2**14, 2**14, 2), weight=(2, 2**30)), b"\0" * 6), "larger than this reader accepts"),
        (frame_v2(norm_v2(eps=float("nan")), b"\0" * 6), "eps"),
        (frame_v2(norm_v2(eps=-1.0), b"\0" * 6), "eps"),
        (frame_v2(norm_v2(weight=(3, 6)), b"\0" * 6), "weight storage"),
        (frame_v2(norm_v2(weight=(1, 6)), b"\0" * 6), "weight length 6 does not match float32"),
        (frame_v2(norm_v2(weight=(0, 0), bias=(2, 6)), b"\0" * 6), "a bias but no weight"),
        (frame_v2(norm_v2(), b"\0" * 5), "payload bytes"),
        (frame_v2(norm_v2()[:-12], b""), "eps"),
    ]
    for data, fragment in cases:
        expect_format_error(path, data, fragment)


def test_an_input_dtype_is_one_byte_after_the_nodes_and_floats_keep_the_header_they_had() -> None:
    model = residual()
    for name, wire_id in (("int64", 1), ("int16", 3)):
        ids = dataclasses.replace(model, input_dtype=name)
        assert bcz_v2._header(ids)[0] == bcz_v2._header(model)[0] + bytes([wire_id])
        assert_same(ids, decode(encode(ids)))
        with_variances = dataclasses.replace(lenet(1), input_dtype=name, variances=Variances(
            4, [LayerVariance(np.zeros(item.weight_codes.size, np.int64))
                for item in lenet(1).items if isinstance(item, QuantizedLayer)]))
        assert decode(encode(with_variances)).input_dtype == name  # version 3 carries it too


def test_graphs_round_trip_and_run_their_nodes(tmp_path: Path) -> None:
    """A residual add and a concatenation load as a Graph module computing the hand-written reference."""
    model = residual()
    path = tmp_path / "graph.bcz"
    write_bcz(path, model)
    back = read_bcz(path)
    assert_same(model, back)
    assert back.metadata == {"model": "toy", "prior": "gnj", "thresholds": [-3.0]}  # "run" is not kept
    net = load(path)
    assert isinstance(net, Graph) and not net.training
    stem, _, a, _, _, b, _, _, _, _, fc = net.nodes
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = torch.relu(stem(x))
        s = a(h) + h
        pooled = nn.functional.max_pool2d(s, 3, 2, 1)
        other = nn.functional.avg_pool2d(b(s), 3, 2, 1)
        expected = fc(torch.cat([pooled, pooled, other], 1).mean((2, 3)))
        assert torch.allclose(net(x), expected, atol=1e-6)
    for layer, module in zip([i for i in back.items if isinstance(i, QuantizedLayer)], (stem, a, b, fc)):
        assert torch.equal(module.weight, torch.from_numpy(layer.weight()))


def test_a_chain_with_explicit_inputs_is_sequential(tmp_path: Path) -> None:
    items = [QuantizedLayer("linear", "fc", np.ones((2, 3), np.int64), 0, inputs=(-1,)), Op("relu", inputs=(0,))]
    write_bcz(tmp_path / "c.bcz", CompressedModel(items, (3,)))
    assert [i.inputs for i in read_bcz(tmp_path / "c.bcz").items] == [None, None]
    assert isinstance(load(tmp_path / "c.bcz"), nn.Sequential)


BIASES = [1 / 3, 0.1, -2.5, -0.3, 7.06]
# worked by hand: "fixed" to multiples of 2^-3 = 0.125 (fc1) and 2^-5 = 0.03125 (fc2), to the nearest; "float16"
# to the nearest of 2^10 steps per binade: 0.1 in [2^-4, 2^-3) has steps of 2^-14, 0.1 * 2^14 = 1638.4 -> 1638
ROUNDED = {
    "float32": (BIASES, BIASES[:2]),
    "fixed": ([3 / 8, 1 / 8, -20 / 8, -2 / 8, 56 / 8], [11 / 32, 3 / 32]),  # 2.67 0.8 -20 -2.4 56.48; 10.67 3.2
    "float16": ([1365 / 4096, 0.0999755859375, -2.5, -1229 / 4096, 1807 / 256], [1365 / 4096, 1638 / 2**14]),
}


@pytest.mark.parametrize("rounding", sorted(ROUNDED))
def test_round_biases_hand_worked(rounding: str) -> None:
    """Each layer's biases on its own grid (fixed) or to the nearest half-precision value; codes, ops and a layer
    without a bias unchanged."""
    rng = np.random.default_rng(0)
    fc1 = QuantizedLayer("linear", "fc1", rng.integers(-9, 10, (5, 4)), 3, np.array(BIASES, np.float32))
    fc2 = QuantizedLayer("linear", "fc2", rng.integers(-9, 10, (2, 5)), 5, np.array(BIASES[:2], np.float32))
    fc3 = QuantizedLayer("linear", "fc3", rng.integers(-9, 10, (3, 2)), 4, None)
    model = CompressedModel([fc1, Op("relu"), fc2, Op("relu"), fc3], (4,), {})
    rounded = codec.round_biases(model, rounding)
    want1, want2 = ROUNDED[rounding]
    assert rounded.items[0].bias.tolist() == np.array(want1, np.float32).tolist()
    assert rounded.items[2].bias.tolist() == np.array(want2, np.float32).tolist()
    assert rounded.items[4].bias is None and rounded.items[1] == Op("relu")
    for new, old in zip(rounded.items[::2], model.items[::2]):
        assert np.array_equal(new.weight_codes, old.weight_codes) and new.frac_bits == old.frac_bits
    assert ROUNDED["float16"][0][1] == 0.0999755859375 and ROUNDED["fixed"][0][0] == 0.375
    with pytest.raises(ValueError, match="int8"):
        codec.round_biases(model, "int8")


def test_a_float_layer_and_a_layer_norm_by_hand(tmp_path: Path) -> None:
    """The bytes of a float layer (weights exactly float16: storage 4) and a layer_norm, written out by hand from
    docs/FORMAT.md; the module they load as computes the layer and the normalisation worked out here."""
    layer = FloatLayer("linear", "d", [[1.5, -2.0], [0.5, 3.0]], [0.25, 1 / 3])  # 1/3: not a float16, float32 bias
    norm = NormLayer("ln", (2,), 0.5, [2.0, -1.0])                             # a weight (float16), no bias
    model = CompressedModel([layer, norm], (2,), {})
    header = (uvarint(1) + uvarint(2) + uvarint(0) + uvarint(2)
              + bytes([0]) + uvarint(1) + uvarint(1) + b"d" + uvarints([2, 2]) + svarint(0) + bytes([4]) + uvarint(8)
              + bytes([1]) + uvarint(8)
              + bytes([22]) + uvarint(1) + uvarint(2) + b"ln" + uvarint(1) + uvarint(2) + struct.pack("<d", 0.5)
              + bytes([2]) + uvarint(4) + bytes([0]) + uvarint(0))
    payload = (np.array([1.5, -2.0, 0.5, 3.0], "<f2").tobytes() + np.array([0.25, 1 / 3], "<f4").tobytes()
               + np.array([2.0, -1.0], "<f2").tobytes())
    assert codec.encode(model) == frame_v2(header, payload, deflate=True)  # the header deflates smaller
    back = codec.decode(frame_v2(header, payload))
    assert [type(i) for i in back.items] == [FloatLayer, NormLayer] and back.items[1].bias is None
    assert back.items[0].weight.tolist() == [[1.5, -2.0], [0.5, 3.0]] and back.items[1].eps == 0.5
    assert back.items[0].bias.tobytes() == np.array([0.25, 1 / 3], np.float32).tobytes()
    x = np.array([[1.0, 2.0], [-1.0, 0.5]])
    h = x @ np.array([[1.5, -2.0], [0.5, 3.0]]).T + np.array([0.25, np.float32(1 / 3)])  # [-2.25, 6.83], ...
    normalised = (h - h.mean(1, keepdims=True)) / np.sqrt(h.var(1, keepdims=True) + 0.5) * [2.0, -1.0]
    with torch.no_grad():
        got = to_module(back)(torch.tensor(x, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(got, normalised, rtol=1e-5)


def payload_bytes(data: bytes) -> int:
    """The layer blocks' bytes of a version-2 file: what follows the stored header, less the checksum."""
    reader = Reader(data, 7)
    reader.uvarint("header length")
    reader.take(reader.uvarint("stored header length"), "header")
    return len(data) - 4 - reader.pos


def test_deterministic_nodes_round_trip_at_their_precision(tmp_path: Path) -> None:
    """Float tensors come back bit for bit; each is stored at float16 exactly where its values are float16 values
    (the file is then smaller by two bytes a value); the loaded module computes what the nodes compute."""
    model = deterministic_kinds()
    back = codec.decode(codec.encode(model))
    for a, b in zip(model.items, back.items):
        assert type(a) is type(b) and a.kind == b.kind and a.inputs == b.inputs
        if isinstance(a, (FloatLayer, NormLayer)):
            for x, y in ((a.weight, b.weight), (a.bias, b.bias)):
                assert (x is None and y is None) or x.tobytes() == y.tobytes()
    assert back.items[6].weight is None and back.items[6].eps == 0.25 and back.items[2].normalized_shape == (3, 5, 5)
    halved = codec.half_deterministic(model)
    floats = [t for i in model.items if isinstance(i, (FloatLayer, NormLayer)) for t in (i.weight, i.bias)
              if t is not None and not codec.float16_exact(t)]
    assert [t.size for t in floats] == [75, 6 * 75, 6]  # ln2d's weight, the head's weight and bias
    assert payload_bytes(codec.encode(model)) - payload_bytes(codec.encode(halved)) == 2 * (75 + 6 * 75 + 6)
    x = torch.randn(3, 2, 5, 5, generator=torch.Generator().manual_seed(0))
    conv, bn, ln2d, head, fc = (model.items[i] for i in (0, 1, 2, 5, 7))
    t = torch.from_numpy
    h = nn.functional.conv2d(x, t(conv.weight()), padding=1) * t(bn.weight).reshape(1, 3, 1, 1) + \
        t(bn.bias).reshape(1, 3, 1, 1)
    mean, var = h.mean((1, 2, 3), keepdim=True), h.var((1, 2, 3), unbiased=False, keepdim=True)
    h = torch.relu((h - mean) / torch.sqrt(var + 1e-5) * t(ln2d.weight) + t(ln2d.bias)).flatten(1)
    h = h @ t(head.weight).T + t(head.bias)
    h = (h - h.mean(1, keepdim=True)) / torch.sqrt(h.var(1, unbiased=False, keepdim=True) + 0.25)
    with torch.no_grad():
        torch.testing.assert_close(to_module(back)(x), h @ t(fc.weight()).T + t(fc.bias))


def test_half_deterministic_hand_worked() -> None:
    """Float tensors to the nearest float16 (0.1 -> 1638 * 2^-14, 1/3 -> 1365 * 2^-12), a tensor with a value beyond
    float16's range (70000 > 65504) unchanged; quantized layers and their biases unchanged."""
    fc = QuantizedLayer("linear", "fc", np.ones((1, 2), np.int64), 3, np.array([0.1], np.float32))
    dense = FloatLayer("linear", "d", [[0.1, 1 / 3]], [70000.0])
    norm = NormLayer("ln", (2,), 1e-5, [1 / 3, -2.5], [0.1, 0.0])
    halved = codec.half_deterministic(CompressedModel([dense, norm, fc], (2,)))
    d, n, q = halved.items
    assert d.weight.tolist() == [[np.float32(1638 / 2**14), np.float32(1365 / 4096)]]
    assert d.bias.tolist() == [70000.0] and not codec.float16_exact(d.bias)
    assert n.weight.tolist() == [np.float32(1365 / 4096), -2.5] and n.bias.tolist() == [np.float32(1638 / 2**14), 0]
    assert q is fc and q.bias.tolist() == [np.float32(0.1)]


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
        FloatLayer("linear", "f", np.ones((2, 3)), np.zeros(3)),
        FloatLayer("conv2d", "f", np.ones((2, 3))),
        NormLayer("n", (), 1e-5),
        NormLayer("n", (3,), -1.0),
        NormLayer("n", (3,), 1e-5, np.ones(2)),
        NormLayer("n", (3,), 1e-5, None, np.ones(3)),
    ]
    for layer in bad:
        with pytest.raises(FormatError, match="cannot write"):
            write_bcz(path, CompressedModel([layer], (3,)))
    with pytest.raises(FormatError, match="metadata"):
        write_bcz(path, CompressedModel([], (3,), ["not", "a", "dict"]))
    with pytest.raises(FormatError, match="inputs"):
        write_bcz(path, CompressedModel([Op("relu", inputs=(0,))], (3,)))
    with pytest.raises(FormatError, match="inputs"):
        write_bcz(path, CompressedModel([Op("add", inputs=(-1,))], (3,)))
    with pytest.raises(FormatError, match="padding"):
        write_bcz(path, CompressedModel([Op("maxpool2d", {"kernel_size": 2, "padding": 2})], (1, 4, 4)))
    with pytest.raises(FormatError, match="input_dtype 'float64'"):  # floats are recorded by recording nothing
        write_bcz(path, CompressedModel([Op("relu")], (3,), input_dtype="float64"))
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
COMMITTED = sorted(RESULTS.rglob("MODEL.bcz"))  # every run's file, seeds and the CNNs included (all on MNIST)


@pytest.mark.slow
def test_importing_the_package_leaves_the_codec_for_load() -> None:
    code = "import sys, pyro_bc; print('pyro_bc.bcz.codec' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_load_reports_a_missing_file_as_a_format_error(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="cannot read"):
        pyro_bc.load(tmp_path / "missing.bcz")


@pytest.mark.slow
def test_committed_results_load_and_reproduce_their_test_error() -> None:
    test = load_mnist(None).test
    assert len(COMMITTED) >= 20
    for path in COMMITTED:
        net = pyro_bc.load(path)
        assert isinstance(net, nn.Module) and not net.training
        recorded = json.loads(path.with_suffix(".json").read_text())["error_compressed"]
        assert error_percent(net, test.x, test.y) == pytest.approx(recorded, abs=1e-9), path


def test_wire_ids_are_fixed():
    """A node's kind byte never moves: these numbers are in files people keep (docs/FORMAT.md lists them)."""
    assert bcz_model.WIRE_IDS == {
        "linear": 0, "conv2d": 1, "relu": 2, "tanh": 3, "sigmoid": 4, "flatten": 5, "maxpool2d": 6, "avgpool2d": 7,
        "select": 8, "add": 9, "cat": 10, "adaptive_avgpool2d": 11, "relu6": 12, "hardswish": 13, "silu": 14,
        "gelu": 15, "hardsigmoid": 16, "mul": 17, "maxpool2d_ceil": 18, "spatial_mean": 19, "conv1d": 20,
        "gather": 21, "layer_norm": 22, "program": 23}
    assert sorted(bcz_model.WIRE_IDS.values()) == list(range(len(bcz_model.WIRE_IDS)))  # no gaps (the reader's bound)


# ---------------------------------------------------------------- codec's own paths, one by one


def _with_variances() -> CompressedModel:
    """A two-layer chain keeping posterior variances (one log-variance code per weight, one per group)."""
    rng = np.random.default_rng(0)
    fc1 = QuantizedLayer("linear", "fc1", rng.integers(-8, 8, (3, 4)), 3, np.ones(3, np.float32))
    fc2 = QuantizedLayer("linear", "fc2", rng.integers(-8, 8, (2, 3)), 3, None)
    variances = Variances(2, [LayerVariance(rng.integers(-30, 0, 12), rng.integers(-20, -5, 4)),
                              LayerVariance(rng.integers(-30, 0, 6), rng.integers(-20, -5, 3))])
    return CompressedModel([fc1, Op("relu"), fc2], (4,), {}, variances)


def test_a_model_with_variances_is_written_as_version_3_and_loads_bayesian(tmp_path: Path) -> None:
    model = _with_variances()
    data = codec.encode(model)
    assert struct.unpack_from("<H", data, 4) == (3,)
    back = codec.decode(data).variances
    assert back.step_bits == 2 and all(np.array_equal(a.weight_codes, b.weight_codes) and
                                       np.array_equal(a.scale_codes, b.scale_codes)
                                       for a, b in zip(model.variances.layers, back.layers))
    write_bcz(tmp_path / "v.bcz", model)
    assert isinstance(load(tmp_path / "v.bcz", bayesian=True), CompressedBayesianNet)
    plain = tmp_path / "p.bcz"
    write_bcz(plain, CompressedModel(model.items, model.input_shape))
    message = (f"{plain}: keeps no posterior variances, so it has no Bayesian network (write it with pyro-bc "
               "compress --keep-variance)")
    with pytest.raises(FormatError, match=f"^{re.escape(message)}$"):
        load(plain, bayesian=True)


def test_decode_from_the_smallest_size_on_names_the_magic_or_the_version() -> None:
    """A file of exactly the smallest size is read as far as its magic and version; one byte less is too short."""
    n = bcz_v2.MIN_SIZE
    with pytest.raises(BadData, match=rf"^file too short \({n - 1} bytes; a .bcz file has at least {n}\)$"):
        codec.decode(bytes(n - 1))
    with pytest.raises(BadData, match=re.escape("bad magic b'ABCD' (expected b'BCZ1'): not a .bcz file")):
        codec.decode(b"ABCD" + bytes(n - 4))
    with pytest.raises(BadData, match=re.escape("unsupported .bcz version 9 (this reader supports [1, 2, 3])")):
        codec.decode(b"BCZ1" + struct.pack("<H", 9) + bytes(n - 6))


def test_read_and_write_errors_give_the_systems_reason(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "m.bcz"
    with pytest.raises(FormatError, match=f"^{re.escape(str(missing))}: cannot read: No such file or directory$"):
        read_bcz(missing)
    with pytest.raises(FormatError, match=f"^{re.escape(str(missing))}: cannot write: No such file or directory$"):
        write_bcz(missing, lenet())


@pytest.mark.parametrize("rounding", ["float16", "fixed"])
def test_round_biases_keeps_everything_but_the_biases(rounding: str) -> None:
    """Graph inputs, names, kinds, the input shape, the metadata and the variances are kept; the rounded biases are
    float32, as a file's are, and a float64 bias is rounded from its float32 value: ``1/128 + 1e-12`` is
    ``1/128`` in float32, half a step of ``2**-6``, which rounds to the even multiple 0 (fixed), and is a
    half-precision number (float16)."""
    model = residual()
    model.metadata, model.variances = {"model": "toy"}, _with_variances().variances
    model.items[0].bias = np.array([1 / 128 + 1e-12, 0.5, -0.25, 1.0])  # float64; frac_bits 6
    rounded = codec.round_biases(model, rounding)
    assert rounded.items[0].bias.dtype == np.float32
    assert rounded.items[0].bias.tolist() == [0.0 if rounding == "fixed" else 1 / 128, 0.5, -0.25, 1.0]
    assert (rounded.input_shape, rounded.metadata, rounded.variances) == (model.input_shape, model.metadata,
                                                                          model.variances)
    for new, old in zip(rounded.items, model.items):
        assert type(new) is type(old) and new.inputs == old.inputs
        if isinstance(old, QuantizedLayer):
            assert (new.kind, new.name, new.stride, new.padding, new.dilation, new.groups) == (
                old.kind, old.name, old.stride, old.padding, old.dilation, old.groups)
            assert new.bias is None or new.bias.dtype == np.float32
    with pytest.raises(ValueError, match=re.escape("unknown bias rounding 'int8': choose float32, float16, fixed")):
        codec.round_biases(model, "int8")


def test_recode_keeps_the_codes_and_rounds_the_biases_as_asked(tmp_path: Path) -> None:
    old, same, half = tmp_path / "old.bcz", tmp_path / "same.bcz", tmp_path / "half.bcz"
    model = lenet()
    write_bcz(old, model)
    assert codec.recode(old, same) == same.stat().st_size
    assert_same(model, read_bcz(same))
    codec.recode(old, half, "float16")
    for a, b in zip(model.items, read_bcz(half).items):
        if isinstance(a, QuantizedLayer):
            assert np.array_equal(a.weight_codes, b.weight_codes)
            assert (a.bias is None and b.bias is None) or b.bias.tolist() == a.bias.astype(np.float16).tolist()


def test_select_and_an_empty_graph_compute_what_they_say() -> None:
    codes = np.arange(12).reshape(3, 4) - 6
    net = to_module(CompressedModel([QuantizedLayer("linear", "fc", codes, 1), Op("select", {"index": [0, 2]})], (4,)))
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(net(x), (x @ torch.tensor(codes, dtype=torch.float32).T / 2)[:, [0, 2]])
    assert Graph([], [])(x) is x


# ------------------------------------------------- version 2, every reader bound and message (analysis/MUTATION.md)


def v2_file(header: bytes, payload: bytes = b"", codec: int = 0, size: int | None = None,
            stored_length: int | None = None) -> bytes:
    """A version-2 file around a decoded header (docs/FORMAT.md, "Byte layout"), its sizes overridable."""
    stored = zlib.compress(header, 9)[2:-4] if codec == 1 else header
    body = (b"BCZ1" + struct.pack("<HB", 2, codec) + uvarint(len(header) if size is None else size)
            + uvarint(len(stored) if stored_length is None else stored_length) + stored + payload)
    return body + struct.pack("<I", zlib.crc32(body))


def v2_header(*nodes: bytes, shape: tuple[int, ...] = (3,), meta: bytes = b"") -> bytes:
    """A decoded header: rank, input_shape, metadata, node count, the nodes."""
    return uvarint(len(shape)) + uvarints(shape) + uvarint(len(meta)) + meta + uvarint(len(nodes)) + b"".join(nodes)


def v2_node(kind: str, *fields: bytes, back: tuple[int, ...] = (1,)) -> bytes:
    """A node: wire id, input count (multi-input kinds), input distances, then its fields."""
    count = uvarint(len(back)) if kind in bcz_model.MULTI_INPUT else b""
    return bytes([bcz_model.WIRE_IDS[kind]]) + count + uvarints(back) + b"".join(fields)


def program_v2(graph: bytes = b'[[["aten.relu.default",[{"v":0}],{}]],1]', constants: bytes = b"",
               inputs: int = 1) -> bytes:
    """A program node: wire id, input count, input distances, name, its graph's JSON, its constants' fields
    (``constants``: the count 1 and their fields, or nothing for none)."""
    count = uvarint(1) + constants if constants else uvarint(0)
    return (bytes([bcz_model.WIRE_IDS["program"]]) + uvarint(inputs) + uvarints([1] * inputs) + uvarint(1) + b"p"
            + uvarint(len(graph)) + graph + count)


def v2_layer(shape: tuple[int, ...] = (2, 3), name: bytes = b"fc", conv: tuple[int, ...] = (), frac: int = 0,
             storage: int = 0, length: int = 4, bias: int = 0, bias_length: int = 0) -> bytes:
    """A layer's fields: name, shape, a convolution's pairs and groups, then the layer tail."""
    return (uvarint(len(name)) + name + uvarints(shape) + uvarints(conv) + svarint(frac) + bytes([storage])
            + uvarint(length) + bytes([bias]) + uvarint(bias_length))


def v2_refusal(data: bytes) -> str:
    with pytest.raises(BadData) as info:
        bcz_v2.decode(data)
    return str(info.value)


CONV = (1, 1, 0, 0, 1, 1, 1)  # stride, padding, dilation pairs, groups
LIN = v2_node("linear", v2_layer())
N0 = "header: node 0 "
SELECT = "select index must be non-empty, strictly increasing and in [0, 65536]"
V2_REFUSED = [  # (file, the whole message): each bound of docs/FORMAT.md one past its end
    (b"BCZ1" + struct.pack("<HB", 2, 0) + bytes(5), "file too short (12 bytes; a version-2 .bcz file has at least 13)"),
    (v2_file(b""), "header: input rank needs 1 bytes but only 0 are left"),  # 13 bytes: not too short
    (v2_file(v2_header(), codec=2), "unknown header codec 2"),
    (v2_file(v2_header(), size=2**24 + 1), "file: header length=16777217 outside [0, 16777216]"),
    (v2_file(v2_header(), size=2**24), "uncompressed header of 4 bytes but header length 16777216"),
    (v2_file(v2_header(), stored_length=5), "file: header needs 5 bytes but only 4 are left"),
    (v2_file(v2_header(), stored_length=2**20), "file: stored header length=1048576 outside [0, 7]"),  # 3 + 4 bytes
    (v2_file(v2_header(LIN), PACKED_BLOCK, codec=1, size=len(v2_header(LIN)) + 1),
     f"header is truncated: {len(v2_header(LIN))} of {len(v2_header(LIN)) + 1} bytes"),
    (v2_file(v2_header(LIN), PACKED_BLOCK + b"\0"), "layer blocks need 4 payload bytes but the file holds 5"),
    (v2_file(v2_header(shape=())), "header: input rank=0 outside [1, 8]"),
    (v2_file(v2_header(shape=(1,) * 9)), "header: input rank=9 outside [1, 8]"),
    (v2_file(v2_header(shape=(0,))), "header: input_shape=0 outside [1, 65536]"),
    (v2_file(v2_header(shape=(2**16 + 1,))), "header: input_shape=65537 outside [1, 65536]"),
    (v2_file(uvarint(1) + uvarint(3) + uvarint(3) + b"{}"), "header: metadata needs 3 bytes but only 2 are left"),
    (v2_file(uvarint(1) + uvarint(3) + uvarint(2**20)), "header: metadata length=1048576 outside [0, 3]"),  # 3 bytes
    (v2_file(v2_header(meta=b"\xff")), "header: metadata is not valid JSON (UnicodeDecodeError)"),
    (v2_file(v2_header(meta=b"{")), "header: metadata is not valid JSON (JSONDecodeError)"),
    (v2_file(v2_header(meta=b"[1]")), "header: metadata is not a JSON object"),
    (v2_file(v2_header(meta=b"[" * 10**5)), "header: metadata is not valid JSON (RecursionError)"),
    (v2_file(norm_v2(eps=float("inf"))), N0 + "layer_norm eps inf must be finite and >= 0"),
    (v2_file(uvarint(1) + uvarint(3) + uvarint(0) + uvarint(2**16 + 1)), "header: node count=65537 outside [0, 65536]"),
    (v2_file(v2_header(bytes([24, 1]))), "header: node 0 kind=24 outside [0, 23]"),
    (v2_file(v2_header(program_v2(b"{]"))), "header: node 0 program is not [nodes, output] in JSON (JSONDecodeError)"),
    (v2_file(v2_header(program_v2(b"[]"))), "header: node 0 program is not [nodes, output] in JSON (ValueError)"),
    (v2_file(v2_header(program_v2(b'[[["os.system",[{"v":0}],{}]],1]'))),
     "header: node 0 program: 'os.system' is not a core ATen operator"),
    (v2_file(v2_header(program_v2(constants=bytes([0]) + uvarint(9)))), "header: node 0 constant 0 rank=9 outside [0, 8]"),
    (v2_file(v2_header(program_v2(constants=bytes([4])))), "header: node 0 constant 0 storage=4 outside [0, 3]"),
    (v2_file(v2_header(program_v2(constants=bytes([0]) + uvarint(1) + uvarint(2)))),
     "layer blocks need 8 payload bytes but the file holds 0"),
    (v2_file(v2_header(program_v2(inputs=0))), "header: node 0 input count=0 outside [1, 65536]"),
    (v2_file(v2_header(v2_node("relu"), v2_node("add", back=(1,)))), "header: node 1 input count=1 outside [2, 65536]"),
    (v2_file(v2_header(v2_node("relu"), bytes([9]) + uvarint(2**16 + 1))), "header: node 1 input count=65537 outside [2, 65536]"),
    (v2_file(v2_header(v2_node("relu", back=(0,)))), "header: node 0 input=0 outside [1, 1]"),
    (v2_file(v2_header(v2_node("relu"), v2_node("relu", back=(3,)))), "header: node 1 input=3 outside [1, 2]"),
    (v2_file(v2_header(v2_node("linear", v2_layer((2**14, 2**13))), v2_node("linear", v2_layer((2**14, 2**13 + 1))))),
     "header: the layers hold more than 268435456 codes, larger than this reader accepts"),
    (v2_file(v2_header(v2_node("linear", v2_layer((2**14, 2**14))))),  # 2**28 codes are accepted
     "layer blocks need 4 payload bytes but the file holds 0"),
    (v2_file(v2_header() + b"\0"), "header: input dtype 0 is none of [1, 2, 3, 4, 5]"),
    (v2_file(v2_header() + b"\1\0"), "header: 1 unexpected bytes at the end"),
    (v2_file(v2_header(v2_node("linear", v2_layer(name=b"a" * 256)))), N0 + "name length=256 outside [0, 255]"),
    (v2_file(v2_header(v2_node("linear", uvarint(5) + b"ab"))), N0 + "name needs 5 bytes but only 2 are left"),
    (v2_file(v2_header(v2_node("linear", v2_layer(name=b"\xff")))), N0 + "name is not UTF-8"),
    (v2_file(v2_header(v2_node("linear", v2_layer((0, 3))))), N0 + "shape=0 outside [1, 268435456]"),
    (v2_file(v2_header(v2_node("linear", v2_layer((2, 2**28 + 1))))), N0 + "shape=268435457 outside [1, 268435456]"),
    (v2_file(v2_header(v2_node("conv2d", v2_layer((2, 1, 1, 3), conv=(0, 1, 0, 0, 1, 1, 1))))),
     N0 + "stride=0 outside [1, 65536]"),
    (v2_file(v2_header(v2_node("conv2d", v2_layer((2, 1, 1, 3), conv=(1, 2**16 + 1, 0, 0, 1, 1, 1))))),
     N0 + "stride=65537 outside [1, 65536]"),
    (v2_file(v2_header(v2_node("conv2d", v2_layer((2, 1, 1, 3), conv=(1, 1, 0, 0, 2**16 + 1, 1, 1))))),
     N0 + "dilation=65537 outside [1, 65536]"),
    (v2_file(v2_header(v2_node("conv2d", v2_layer((2, 1, 1, 3), conv=(1, 1, 0, 2**16 + 1, 1, 1, 1))))),
     N0 + "padding=65537 outside [0, 65536]"),
    (v2_file(v2_header(v2_node("conv2d", v2_layer((2, 1, 1, 3), conv=(1, 1, 0, 0, 1, 0, 1))))),
     N0 + "dilation=0 outside [1, 65536]"),
    (v2_file(v2_header(v2_node("conv2d", v2_layer((2, 1, 1, 3), conv=(1, 1, 0, 0, 1, 1, 0))))),
     N0 + "groups=0 outside [1, 65536]"),
    (v2_file(v2_header(v2_node("conv2d", v2_layer((2, 1, 1, 3), conv=(1, 1, 0, 0, 1, 1, 2**16 + 1))))),
     N0 + "groups=65537 outside [1, 65536]"),
    (v2_file(v2_header(v2_node("conv2d", v2_layer((2, 1, 1, 3), conv=(1, 1, 0, 0, 1, 1, 3))))),
     N0 + "groups=3 does not divide 2 output channels"),
    (v2_file(v2_header(v2_node("linear", v2_layer(frac=65)))), N0 + "frac_bits=65 outside [-64, 64]"),
    (v2_file(v2_header(v2_node("linear", v2_layer(frac=-65)))), N0 + "frac_bits=-65 outside [-64, 64]"),
    (v2_file(v2_header(v2_node("linear", v2_layer(storage=5)))), N0 + "weight storage=5 outside [0, 4]"),
    (v2_file(v2_header(v2_node("linear", v2_layer(length=0)))), N0 + "weights length=0 outside [1, 1099511627776]"),
    (v2_file(v2_header(v2_node("linear", v2_layer(length=2**40 + 1)))),
     N0 + "weights length=1099511627777 outside [1, 1099511627776]"),
    (v2_file(v2_header(v2_node("linear", v2_layer(length=2**40)))),
     "layer blocks need 1099511627776 payload bytes but the file holds 0"),
    (v2_file(v2_header(v2_node("linear", v2_layer(storage=3)))),
     N0 + "float32 weights need frac_bits 0 and length 24, not 0 and 4"),
    (v2_file(v2_header(v2_node("linear", v2_layer(storage=4, frac=1, length=12)))),
     N0 + "float16 weights need frac_bits 0 and length 12, not 1 and 12"),
    (v2_file(v2_header(v2_node("linear", v2_layer(bias=4)))), N0 + "bias storage=4 outside [0, 3]"),
    (v2_file(v2_header(v2_node("linear", v2_layer(bias=3, bias_length=2**40 + 1)))),
     N0 + "bias length=1099511627777 outside [0, 1099511627776]"),
    (v2_file(v2_header(v2_node("linear", v2_layer(bias_length=1)))),
     N0 + "bias length 1 does not match none for 2 outputs (expected 0)"),
    (v2_file(v2_header(v2_node("linear", v2_layer(bias=1, bias_length=4)))),
     N0 + "bias length 4 does not match float32 for 2 outputs (expected 8)"),
    (v2_file(v2_header(v2_node("linear", v2_layer(bias=2, bias_length=8)))),
     N0 + "bias length 8 does not match float16 for 2 outputs (expected 4)"),
    (v2_file(v2_header(v2_node("linear", v2_layer(bias=3, bias_length=1))), PACKED_BLOCK + bytes([3])),
     "layer 'fc' bias: bias code storage=3 outside [0, 2]"),
    (v2_file(v2_header(v2_node("linear", v2_layer(length=3))), PACKED_BLOCK[:3]),
     "layer 'fc' weights: 2 packed bytes for 6 codes of 4 bits (expected 3)"),
    (v2_file(norm_v2(shape=())), N0 + "layer_norm rank=0 outside [1, 8]"),
    (v2_file(norm_v2(shape=(0,))), N0 + "normalized_shape=0 outside [1, 268435456]"),
    (v2_file(norm_v2(shape=(2**28 + 1,))), N0 + "normalized_shape=268435457 outside [1, 268435456]"),
    (v2_file(norm_v2().replace(b"\x02ln", uvarint(256) + b"n" * 256)), N0 + "name length=256 outside [0, 255]"),
    (v2_file(norm_v2().replace(b"\x02ln", b"\x02\xffn")), N0 + "name is not UTF-8"),
    (v2_file(norm_v2()[:8]), N0 + "name needs 2 bytes but only 1 are left"),
    (v2_file(norm_v2()[:-8]), N0 + "eps needs 8 bytes but only 4 are left"),
    (v2_file(norm_v2(eps=float("nan"))), N0 + "layer_norm eps nan must be finite and >= 0"),
    (v2_file(norm_v2(weight=(3, 6))), N0 + "weight storage=3 outside [0, 2]"),
    (v2_file(norm_v2(weight=(1, 6))), N0 + "weight length 6 does not match float32 for normalized_shape [3] (expected 12)"),
    (v2_file(norm_v2(weight=(2, 2**40 + 1))), N0 + "weight length=1099511627777 outside [0, 1099511627776]"),
    (v2_file(norm_v2(bias=(1, 6))), N0 + "bias length 6 does not match float32 for normalized_shape [3] (expected 12)"),
    (v2_file(norm_v2(weight=(0, 0), bias=(2, 6))), N0 + "layer_norm has a bias but no weight"),
    (v2_file(v2_header(v2_node("flatten", svarint(9)))), N0 + "start_dim=9 outside [-8, 8]"),
    (v2_file(v2_header(v2_node("flatten", svarint(-9)))), N0 + "start_dim=-9 outside [-8, 8]"),
    (v2_file(v2_header(v2_node("maxpool2d", uvarints([0, 2, 2, 2, 0, 0])))), N0 + "maxpool2d kh=0 outside [1, 65536]"),
    (v2_file(v2_header(v2_node("avgpool2d", uvarints([2, 0, 2, 2, 0, 0])))), N0 + "avgpool2d kw=0 outside [1, 65536]"),
    (v2_file(v2_header(v2_node("maxpool2d", uvarints([2, 2, 0, 2, 0, 0])))), N0 + "maxpool2d sh=0 outside [1, 65536]"),
    (v2_file(v2_header(v2_node("maxpool2d_ceil", uvarints([2, 2, 2, 2**16 + 1, 0, 0])))),
     N0 + "maxpool2d_ceil sw=65537 outside [1, 65536]"),
    (v2_file(v2_header(v2_node("maxpool2d", uvarints([2, 2, 2, 2, 2**16 + 1, 0])))),
     N0 + "maxpool2d ph=65537 outside [0, 65536]"),
    (v2_file(v2_header(v2_node("maxpool2d", uvarints([2, 2, 2, 2, 0, 2**16 + 1])))),
     N0 + "maxpool2d pw=65537 outside [0, 65536]"),
    (v2_file(v2_header(v2_node("maxpool2d", uvarints([2, 2, 2, 2, 0, 2])))),
     N0 + "maxpool2d padding (0, 2) must be in [0, kernel_size // 2]"),
    (v2_file(v2_header(v2_node("adaptive_avgpool2d", uvarints([1, 0])))), N0 + "output size=0 outside [1, 65536]"),
    (v2_file(v2_header(v2_node("adaptive_avgpool2d", uvarints([2**16 + 1, 1])))),
     N0 + "output size=65537 outside [1, 65536]"),
    (v2_file(v2_header(v2_node("gather", uvarint(0)))), N0 + "gather count=0 outside [1, 65537]"),
    (v2_file(v2_header(v2_node("gather", uvarint(2**16 + 2)))), N0 + "gather count=65538 outside [1, 65537]"),
    (v2_file(v2_header(v2_node("gather", uvarint(1) + uvarint(2**16 + 1)))),
     N0 + "gather index holds a value above 65536"),
    (v2_file(v2_header(v2_node("gather", uvarint(2) + uvarint(1)))),
     N0 + "gather index needs 2 varints but the data ends first"),
    (v2_file(v2_header(v2_node("select", bytes([2])))), N0 + "select mode=2 outside [0, 1]"),
    (v2_file(v2_header(v2_node("select", bytes([0]) + uvarint(0)))), N0 + "select count=0 outside [1, 65537]"),
    (v2_file(v2_header(v2_node("select", bytes([0]) + uvarint(2**16 + 2)))), N0 + "select count=65538 outside [1, 65537]"),
    (v2_file(v2_header(v2_node("select", bytes([0]) + uvarint(1) + uvarint(2**16 + 1)))),
     N0 + "select gaps holds a value above 65536"),
    (v2_file(v2_header(v2_node("select", bytes([0]) + uvarint(2) + uvarints([2**16, 0])))), N0 + SELECT),
    (v2_file(v2_header(v2_node("select", bytes([1]) + uvarint(0)))), N0 + "select bitmap size=0 outside [1, 65537]"),
    (v2_file(v2_header(v2_node("select", bytes([1]) + uvarint(2**16 + 2)))),
     N0 + "select bitmap size=65538 outside [1, 65537]"),
    (v2_file(v2_header(v2_node("select", bytes([1]) + uvarint(9) + bytes([1])))),
     N0 + "select bitmap needs 2 bytes but only 1 are left"),
    (v2_file(v2_header(v2_node("select", bytes([1]) + uvarint(3) + bytes([0b11000000])))),
     N0 + "select bitmap must end with its last set bit"),
    (v2_file(v2_header(v2_node("select", bytes([1]) + uvarint(3) + bytes([0b00110000])))),
     N0 + "select bitmap must end with its last set bit"),
]


@pytest.mark.parametrize("data, message", V2_REFUSED)
def test_v2_reader_refuses_each_bound_with_its_whole_message(data: bytes, message: str) -> None:
    """Hand-built files one past each range of docs/FORMAT.md: the reader names the field, its value and range."""
    assert v2_refusal(data) == message


def test_v2_reader_accepts_each_bound() -> None:
    """The ends of each range are read, and read as the values written by hand."""
    good = bcz_v2.decode(v2_file(v2_header(shape=(1,) * 7 + (2**16,), meta=b'{"a":[1]}')))
    assert good.input_shape == (1,) * 7 + (2**16,) and good.metadata == {"a": [1]} and good.items == []
    assert bcz_v2.decode(v2_file(v2_header(), codec=1)).input_shape == (3,)
    corrupt = bytearray(v2_file(v2_header()))
    corrupt[-1] ^= 1
    assert v2_refusal(bytes(corrupt)) == "checksum mismatch: file is corrupt"
    name = "é" * 127 + "x"  # 255 UTF-8 bytes
    conv = (2, 3, 0, 2**16, 2**16, 1, 2)
    nodes = [
        v2_node("conv2d", v2_layer((2, 1, 1, 3), name=name.encode(), conv=conv, frac=64)),
        v2_node("linear", v2_layer(frac=-64, bias=2, bias_length=4), back=(2,)),  # reads the network input
        v2_node("add", back=(1, 2)),
        v2_node("linear", v2_layer(frac=2, bias=3, bias_length=3)),  # fixed bias: packed 3-bit codes 1, -4
        v2_node("flatten", svarint(-8)), v2_node("flatten", svarint(8)),
        v2_node("maxpool2d", uvarints([2**16, 1, 1, 2**16, 2**15, 0])),
        v2_node("adaptive_avgpool2d", uvarints([1, 2**16])),
        v2_node("gather", uvarint(3) + uvarints([2, 0, 2**16])),
        v2_node("select", bytes([0]) + uvarint(3) + uvarints([1, 0, 2])),
        v2_node("select", bytes([1]) + uvarint(6) + bytes([0b01100100])),
        v2_node("select", bytes([1]) + uvarint(2**16 + 1) + bytes(8192) + bytes([0x80])),
        v2_node("select", bytes([1]) + uvarint(8) + bytes([0b00000001])),
        v2_node("select", bytes([0]) + uvarint(2**16 + 1) + bytes(2**16 + 1)),  # 0, 1, ..., 65536
        v2_node("gather", uvarint(2**16 + 1) + bytes(2**16 + 1)),
        v2_node("relu", back=(16,)),
    ]
    half = np.array([0.5, -3.0], "<f2").tobytes()
    model = bcz_v2.decode(v2_file(v2_header(*nodes), PACKED_BLOCK * 2 + half + PACKED_BLOCK + bytes([0, 3, 0x30])))
    conv2d, lin, add, fixed, f1, f2, pool, adaptive, gather, s0, s1, s2, s3, s4, g1, relu = model.items
    assert (conv2d.name, conv2d.stride, conv2d.padding, conv2d.dilation, conv2d.groups) == (
        name, (2, 3), (0, 2**16), (2**16, 1), 2)
    assert conv2d.frac_bits == 64 and conv2d.weight_codes.tolist() == [[[[1, 2, 3]]], [[[4, 5, 6]]]]
    assert conv2d.bias is None and conv2d.inputs is None
    assert lin.frac_bits == -64 and lin.inputs == (-1,) and lin.bias.tolist() == [0.5, -3.0]
    assert lin.bias.dtype == np.float32  # a float16 bias widened
    assert add.inputs == (1, 0) and fixed.inputs is None
    assert fixed.bias.dtype == np.float32 and fixed.bias.tolist() == [0.25, -1.0]  # codes 1, -4 times 2**-2
    assert [f1.params, f2.params] == [{"start_dim": -8}, {"start_dim": 8}]
    assert pool.params == {"kernel_size": (2**16, 1), "stride": (1, 2**16), "padding": (2**15, 0)}
    assert adaptive.params == {"output_size": (1, 2**16)}
    assert gather.params == {"index": [2, 0, 2**16]}
    assert s0.params == s1.params == {"index": [1, 2, 5]} and s2.params == {"index": [2**16]}
    assert s3.params == {"index": [7]}  # a bitmap of 8 bits is one byte
    assert s4.params == {"index": list(range(2**16 + 1))} and g1.params == {"index": [0] * (2**16 + 1)}
    assert relu.kind == "relu" and relu.inputs == (-1,)
    norm = bcz_v2.decode(v2_file(norm_v2(bias=(1, 12)), bytes(6) + np.array([1, 2, 3], "<f4").tobytes())).items[0]
    assert norm.name == "ln" and norm.eps == 0.5 and norm.weight.tolist() == [0, 0, 0] and norm.bias.tolist() == [1, 2, 3]
    assert bcz_v2.decode(v2_file(norm_v2(weight=(0, 0)))).items[0].weight is None
    assert bcz_v2.decode(v2_file(norm_v2(eps=0.0), bytes(6))).items[0].eps == 0.0
    unnamed = bcz_v2.decode(v2_file(norm_v2(shape=(1,), weight=(2, 2)).replace(b"\x02ln", b"\x00"), bytes(2)))
    assert unnamed.items[0].name == "" and unnamed.items[0].normalized_shape == (1,)


def v2_decoded_header(data: bytes) -> bytes:
    """The decoded header of a version-2 file (inflated where its codec is 1)."""
    reader = Reader(data, 7)
    reader.uvarint("header length")
    stored = bytes(reader.take(reader.uvarint("stored header length"), "header"))
    return zlib.decompress(stored, -15) if data[6] else stored


def fc(bias: list[float] | None, frac: int = 2, codes: list[list[int]] | None = None,
       dtype: type = np.float32) -> CompressedModel:
    codes = [[1, 2, 3], [4, 5, 6]] if codes is None else codes
    bias = None if bias is None else np.array(bias, dtype)
    return CompressedModel([QuantizedLayer("linear", "fc", np.array(codes), frac, bias)], (3,))


@pytest.mark.parametrize("model, tail, bias_block", [  # the layer tail's (frac_bits, bias storage), the bias block
    (fc([0.25, -1.0]), (2, 3), bytes([0, 3, 0b001_100_00])),        # fixed: codes 1, -4 (2**-2 steps) as 3 bits
    (fc([8.0, -16.0], frac=-2), (-2, 3), bytes([0, 3, 0b010_100_00])),  # fixed: codes 2, -4 (2**2 steps)
    (fc([0.25, -1.0], dtype=np.float64), (2, 3), bytes([0, 3, 0b001_100_00])),  # a float64 bias: as its float32
    (fc([64.0, -64.0, 64.0, 64.0], frac=1, codes=[[1], [2], [3], [4]]), (1, 3),  # codes 128, -128: 9 bits each
     bytes([0, 9]) + int("010000000" "110000000" "010000000" "010000000" "0000", 2).to_bytes(5, "big")),
    (fc([0.5, -3.0], frac=0), (0, 2), np.array([0.5, -3.0], "<f2").tobytes()),  # not whole numbers: float16
    (fc([0.1, 0.2]), (2, 1), np.array([0.1, 0.2], "<f4").tobytes()),  # neither float16 nor on the grid: float32
    (fc([70000.0, 0.1]), (2, 1), np.array([70000.0, 0.1], "<f4").tobytes()),  # beyond float16, not on the grid
    (fc([0.0] * 4, codes=[[1], [2], [3], [4]]), (2, 3), bytes([2, 0])),  # fixed: sparse, no non-zero code
    (fc([-0.0, 0.0, 0.0, 0.0], codes=[[1], [2], [3], [4]]), (2, 2), np.array([-0.0, 0, 0, 0], "<f2").tobytes()),
    (fc(None), (2, 0), b""),
])
def test_v2_writer_layer_bytes_by_hand(model: CompressedModel, tail: tuple[int, int], bias_block: bytes) -> None:
    """A layer's bytes written out from docs/FORMAT.md: the packed codes and the smallest bias storage that gives the
    bias back bit for bit (fixed never for -0.0, whose code 0 reads back as +0.0); numpy stays silent."""
    codes = model.items[0].weight_codes
    packed = {6: PACKED_BLOCK, 4: bytes([4, 0x12, 0x34])}[codes.size]
    frac, storage = tail
    layer = v2_layer(codes.shape, frac=frac, length=len(packed), bias=storage, bias_length=len(bias_block))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = bcz_v2.encode(model)
    assert data == v2_file(v2_header(v2_node("linear", layer)), packed + bias_block)
    back = bcz_v2.decode(data).items[0]
    bias = model.items[0].bias
    assert (back.bias is None and bias is None) or back.bias.tobytes() == bias.astype(np.float32).tobytes()


def test_v2_writer_header_bytes_by_hand() -> None:
    """The ops' fields, a graph's input distances and the kept metadata, written out from docs/FORMAT.md; each select
    in the shorter of its two modes (the gap list on a tie)."""
    items = [Op("select", {"index": [1, 2, 5]}), Op("select", {"index": [0, 100]}), Op("select", {"index": [0]}),
             Op("gather", {"index": [2, 0, 2]}), Op("flatten", {"start_dim": -1}),
             Op("maxpool2d", {"kernel_size": (3, 2), "stride": (1, 2), "padding": (1, 0)}),
             Op("adaptive_avgpool2d", {"output_size": (1, 4)}), Op("add", inputs=(6, -1)), Op("relu", inputs=(-1,))]
    meta = {"seed": 1, "run": "x", "model": "a" * 79, "prior": "b" * 78, "thresholds": [float("nan")], "width": {1}}
    model = CompressedModel(items, (1,) * 7 + (2**16,), meta)  # kept: seed, and prior (80 bytes of JSON, not 81)
    nodes = [v2_node("select", bytes([1]) + uvarint(6) + bytes([0b01100100])),  # 3 bytes; the list takes 5
             v2_node("select", bytes([0]) + uvarint(2) + uvarints([0, 99])),  # 4 bytes; the bitmap takes 15
             v2_node("select", bytes([0]) + uvarint(1) + uvarint(0)),  # 3 bytes, the bitmap too
             v2_node("gather", uvarint(3) + uvarints([2, 0, 2])), v2_node("flatten", svarint(-1)),
             v2_node("maxpool2d", uvarints([3, 2, 1, 2, 1, 0])), v2_node("adaptive_avgpool2d", uvarints([1, 4])),
             v2_node("add", back=(1, 8)), v2_node("relu", back=(9,))]
    data = bcz_v2.encode(model)
    kept = b'{"prior":"' + b"b" * 78 + b'","seed":1}'
    assert v2_decoded_header(data) == v2_header(*nodes, shape=(1,) * 7 + (2**16,), meta=kept)
    assert bcz_v2.decode(data).items == items
    assert v2_decoded_header(bcz_v2.encode(CompressedModel([], (3,), {}))) == v2_header()
    header = v2_header(meta=b'{"seed":1111}')  # raw deflate makes it no shorter (17 bytes): kept as it is
    assert len(zlib.compress(header, 9)) - 6 == len(header) == 17
    assert bcz_v2.encode(CompressedModel([], (3,), {"seed": 1111})) == v2_file(header)


def test_v2_writer_refuses_what_the_format_cannot_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each writer bound, one past its end, refused in one line; its end written. (The node cap lowered to 3:
    65536 nodes take seconds.)"""
    monkeypatch.setattr(bcz_v2, "MAX_NODES", 3)
    monkeypatch.setattr(bcz_v2, "MAX_DIM", 3)  # as for the weight dimensions (2**28: a 2 GiB array of codes)
    fits = [QuantizedLayer("linear", "q", np.ones((3, 3), np.int64), 0),
            FloatLayer("linear", "f", np.ones((3, 3)), [0.5] * 3),  # a float layer's bias on the grid of frac_bits 0
            NormLayer("n", (3, 3), 0.5)]
    back = bcz_v2.decode(bcz_v2.encode(CompressedModel(fits, (3,)))).items
    assert [type(i) for i in back] == [QuantizedLayer, FloatLayer, NormLayer] and back[1].bias.tolist() == [0.5] * 3
    assert [i.name for i in back] == ["q", "f", "n"]
    relus = [Op("relu")] * 3
    assert len(bcz_v2.decode(bcz_v2.encode(CompressedModel(relus, (3,)))).items) == 3
    name = "é" * 127 + "x"  # 255 UTF-8 bytes
    named = CompressedModel([QuantizedLayer("linear", name, np.ones((1, 1), np.int64), 0)], (1,))
    assert bcz_v2.decode(bcz_v2.encode(named)).items[0].name == name
    assert bcz_v2.decode(bcz_v2.encode(CompressedModel([], (1,) * 8))).input_shape == (1,) * 8
    cases = [
        (CompressedModel([], (3,), [1]), "metadata must be a dict"),
        (CompressedModel([], ()), "input_shape [] must have 1 to 8 entries in [1, 65536]"),
        (CompressedModel([], (1,) * 9), f"input_shape {[1] * 9} must have 1 to 8 entries in [1, 65536]"),
        (CompressedModel([], (0,)), "input_shape [0] must have 1 to 8 entries in [1, 65536]"),
        (CompressedModel([], (2**16 + 1,)), "input_shape [65537] must have 1 to 8 entries in [1, 65536]"),
        (CompressedModel(relus + [Op("relu")], (3,)), "4 items: at most 3"),
        (CompressedModel([object()], (3,)),
         "item 0 is not a QuantizedLayer, FloatLayer, NormLayer, ProgramNode or an Op of a known kind"),
        (CompressedModel([QuantizedLayer("linear", "é" * 128, np.ones((1, 1), np.int64), 0)], (1,)),
         f"layer name {'é' * 20!r}... is longer than 255 bytes"),
        (CompressedModel([QuantizedLayer("linear", "q", np.ones((1, 4), np.int64), 0)], (1,)),
         "layer 'q': a dimension of [1, 4] exceeds 3"),
        (CompressedModel([FloatLayer("linear", "f", np.ones((4, 1)))], (1,)), "layer 'f': a dimension of [4, 1] exceeds 3"),
        (CompressedModel([NormLayer("n", (1, 4), 0.5)], (1,)), "layer_norm 'n': a dimension of [1, 4] exceeds 3"),
    ]
    for model, message in cases:
        with pytest.raises(BadData) as info:
            bcz_v2.encode(model)
        assert str(info.value) == message


def test_folders_and_other_files_are_refused_in_one_line_before_a_whole_read(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match=r": a folder, not a \.bcz file$"):
        codec.read_bcz(tmp_path)
    (tmp_path / "checkpoint.pt").write_bytes(b"PK\x03\x04")
    with pytest.raises(FormatError, match=r": a folder, not a \.bcz file \(a run directory: compress it into a \.bcz "
                                          r"first\)$"):
        codec.read_bcz(tmp_path)
    with pytest.raises(FormatError, match=r"checkpoint.pt: bad magic b'PK\\x03\\x04' \(expected b'BCZ1'\)"):
        codec.read_bcz(tmp_path / "checkpoint.pt")
    other = tmp_path / "zeros.bin"
    other.write_bytes(bytes(1 << 20))
    with pytest.raises(FormatError, match=r"zeros.bin: bad magic b'\\x00\\x00\\x00\\x00'"):
        codec.read_bcz(other)
