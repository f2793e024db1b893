"""The legacy version-1 .bcz reader and writer (pyro_bc.bcz.v1) on files built by hand from docs/FORMAT.md: a
JSON header, a payload of packed codes and float32 biases, a CRC; the bytes of a small model, each payload codec,
and a whole message for every header field the reader refuses."""

from __future__ import annotations

import copy
import json
import lzma
import struct
import zlib

import numpy as np
import pytest

from pyro_bc.bcz import v1
from pyro_bc.bcz.binary import BadData
from pyro_bc.bcz.model import MAX_PARAM, CompressedModel, Op, QuantizedLayer

# codes [[1, -1, 0], [-4, 3, 2]] at 3 bits: 001 111 000 100 011 010, padded: 00111100 01000110 10000000
_CODES = b"\x3c\x46\x80"
_BIAS = struct.pack("<2f", 0.5, -1.25)
_LAYER = {"kind": "linear", "name": "fc", "shape": [2, 3], "frac_bits": 4, "code_bits": 3, "has_bias": True,
          "codes_offset": 0, "codes_length": 3, "bias_offset": 3, "bias_length": 8}
_HEADER = {"input_shape": [3], "metadata": {"m": 1}, "codec": "none", "payload_size": 11, "stored_size": 11,
           "items": [{"kind": "relu", "params": {}}, _LAYER]}


def _file(header: dict | bytes, stored: bytes = _CODES + _BIAS) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    body = b"BCZ1" + struct.pack("<HI", 1, len(raw)) + raw + stored
    return body + struct.pack("<I", zlib.crc32(body))


def _bad(data: bytes) -> str:
    with pytest.raises(BadData) as info:
        v1.decode(data)
    return str(info.value)


def _model() -> CompressedModel:
    fc = QuantizedLayer("linear", "fc", np.array([[1, -1, 0], [-4, 3, 2]]), 4, np.array([0.5, -1.25], np.float32))
    return CompressedModel([Op("relu"), fc], (3,), {"m": 1})


def test_a_small_model_is_the_bytes_worked_out_by_hand() -> None:
    assert v1.encode(_model()) == _file(_HEADER)  # 11 bytes: neither zlib nor lzma makes them smaller
    back = v1.decode(_file(_HEADER))
    assert back.input_shape == (3,) and back.metadata == {"m": 1} and back.items[0] == Op("relu")
    fc = back.items[1]
    assert fc.weight_codes.tolist() == [[1, -1, 0], [-4, 3, 2]] and fc.frac_bits == 4 and fc.name == "fc"
    assert fc.kind == "linear" and fc.bias.dtype == np.float32 and fc.bias.tolist() == [0.5, -1.25]
    wide = _model()
    wide.items[1].bias = np.array([0.5, -1.25])  # float64: still stored as float32
    assert v1.encode(wide) == _file(_HEADER)


def test_ops_layers_in_a_row_and_the_ends_of_the_ranges() -> None:
    ops = [{"kind": "flatten", "params": {"start_dim": 8}}, {"kind": "maxpool2d",
           "params": {"kernel_size": [1, 2], "stride": [2, 1]}}, {"kind": "select", "params": {"index": [0, 2]}}]
    header = {**_HEADER, "input_shape": [2**16], "items": [*ops, {**_LAYER, "frac_bits": 64}]}
    back = v1.decode(_file(header))
    assert back.items[:3] == [Op("flatten", {"start_dim": 8}), Op("maxpool2d", {"kernel_size": (1, 2), "stride": (2, 1)}),
                              Op("select", {"index": [0, 2]})]
    assert back.input_shape == (2**16,) and back.items[3].frac_bits == 64
    two = CompressedModel([QuantizedLayer("linear", "a", np.array([[1, -2, 3], [0, 1, -1]]), 2, None), Op("relu"),
                           QuantizedLayer("linear", "b", np.array([[5, 0], [-6, 7]]), 1, np.ones(2, np.float32))],
                          (3,), {})
    back = v1.decode(v1.encode(two))  # the second layer's codes start after the first's
    assert [i.weight_codes.tolist() for i in back.items[::2]] == [[[1, -2, 3], [0, 1, -1]], [[5, 0], [-6, 7]]]
    assert back.items[0].bias is None and back.items[2].bias.tolist() == [1, 1]
    empty = {**_HEADER, "items": [{"kind": "relu", "params": {}}], "payload_size": 0, "stored_size": 0}
    assert v1.decode(_file(empty, b"")).items == [Op("relu")]
    zlib_file = _file({**_HEADER, "codec": "zlib", "stored_size": len(zlib.compress(_CODES + _BIAS)) + 1},
                      zlib.compress(_CODES + _BIAS) + b"\0")
    assert _bad(zlib_file) == "zlib payload has trailing bytes after the compressed stream"


def test_the_codecs_and_the_choice_of_the_smallest() -> None:
    payload = _CODES + _BIAS
    for codec, stored in (("zlib", zlib.compress(payload)), ("lzma", lzma.compress(payload))):
        back = v1.decode(_file({**_HEADER, "codec": codec, "stored_size": len(stored)}, stored))
        assert back.items[1].weight_codes.tolist() == [[1, -1, 0], [-4, 3, 2]]
    payload = bytes(range(256)) * 40  # lzma's stream is the smaller here
    smallest = min((len(zlib.compress(payload, 9)), "zlib"), (len(lzma.compress(payload, preset=9)), "lzma"))
    assert v1._compress(payload) == (smallest[1], zlib.compress(payload, 9) if smallest[1] == "zlib"
                                     else lzma.compress(payload, preset=9))
    assert v1._compress(b"ab") == ("none", b"ab")  # a codec is used only where strictly smaller


def test_lzma_payloads_are_exactly_their_declared_size() -> None:
    payload = _CODES + _BIAS

    def lzma_file(stored: bytes, size: int = 11) -> bytes:
        return _file({**_HEADER, "codec": "lzma", "payload_size": size, "stored_size": len(stored)}, stored)

    good = lzma.compress(payload)
    assert _bad(lzma_file(good + b"\0")) == "lzma payload has trailing bytes after the compressed stream"
    assert _bad(lzma_file(lzma.compress(payload + b"\0"))) == "lzma payload decompresses to more than the declared " \
        "11 bytes"
    assert _bad(lzma_file(good[:-4])).startswith("lzma payload is truncated: ")
    assert _bad(lzma_file(b"\0" * 20)).startswith("lzma decompression failed: ")
    header = {**_HEADER, "items": [{"kind": "relu", "params": {}}], "payload_size": 0}
    assert v1.decode(_file({**header, "codec": "lzma", "stored_size": len(lzma.compress(b""))},
                           lzma.compress(b""))).items == [Op("relu")]
    assert _bad(_file({**header, "codec": "lzma", "stored_size": len(lzma.compress(b"a"))}, lzma.compress(b"a"))) \
        == "lzma payload decompresses to more than the declared 0 bytes"


def _edit(path: tuple, value) -> dict:
    """_HEADER with one entry replaced (or removed, for the value ``...``)."""
    header = copy.deepcopy(_HEADER)
    target = header
    for key in path[:-1]:
        target = target[key]
    if value is ...:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return header


@pytest.mark.parametrize("path, value, message", [
    (("input_shape",), [0], f"header: input_shape has an entry outside [1, {MAX_PARAM}]"),
    (("input_shape",), [3.0], "header: input_shape is not a list of integers"),
    (("input_shape",), ..., "header: missing key 'input_shape'"),
    (("items",), ..., "header: missing key 'items'"),
    (("metadata",), [], "header: 'metadata' is not an object"),
    (("codec",), "gzip", "header: unknown codec 'gzip'"),
    (("payload_size",), -1, "header: 'payload_size'=-1 outside [0, 4294967296]"),
    (("payload_size",), True, "header: 'payload_size' missing or not an integer"),
    (("payload_size",), 12, "layers need 11 payload bytes but header declares payload_size=12"),
    (("stored_size",), 12, "header declares stored_size=12 but the file holds 11 bytes"),
    (("items",), {}, "header: 'items' is not a list"),
    (("items", 0), 5, "header: item 0 is not an object with a known 'kind'"),
    (("items", 0, "kind"), "conv1d", "header: item 0 is not an object with a known 'kind'"),
    (("items", 0, "params"), ..., "header: item 0 'params' missing or not an object"),
    (("items", 0, "params"), {"a": 1}, "header: item 0 relu takes no params"),
    (("items", 0), {"kind": "flatten", "params": {"start_dim": 1, "x": 0}},
     "header: item 0 flatten needs exactly 'start_dim'"),
    (("items", 0), {"kind": "flatten", "params": {"start_dim": 9}}, "header: item 0 'start_dim'=9 outside [-8, 8]"),
    (("items", 0), {"kind": "maxpool2d", "params": {"kernel_size": [2, 2]}},
     "header: item 0 maxpool2d needs exactly 'kernel_size' and 'stride'"),
    (("items", 0), {"kind": "avgpool2d", "params": {"kernel_size": [2], "stride": [1, 1]}},
     "header: item 0 kernel_size must have 2 entries"),
    (("items", 0), {"kind": "maxpool2d", "params": {"kernel_size": [2, 2], "stride": [0, 1]}},
     f"header: item 0 stride has an entry outside [1, {MAX_PARAM}]"),
    (("items", 0), {"kind": "select", "params": {"index": [0], "x": 1}}, "header: item 0 select needs exactly 'index'"),
    (("items", 0), {"kind": "select", "params": {"index": []}},
     "header: item 0 select index must be non-empty and strictly increasing"),
    (("items", 0), {"kind": "select", "params": {"index": [1, 1]}},
     "header: item 0 select index must be non-empty and strictly increasing"),
    (("items", 0), {"kind": "select", "params": {"index": [-1]}},
     f"header: item 0 index has an entry outside [0, {MAX_PARAM}]"),
    (("items", 0), {"kind": "maxpool2d", "params": {"kernel_size": [2, 2], "stride": [1, 1, 1]}},
     "header: item 0 stride must have 2 entries"),
    (("stored_size",), "11", "header: 'stored_size' missing or not an integer"),
    (("items", 1, "shape"), [2**35 + 1, 1], f"header: item 1 shape has an entry outside [1, {2**35}]"),
    (("items", 1, "name"), 5, "header: item 1 'name' missing or not a string"),
    (("items", 1, "shape"), [6], "header: item 1 shape must have 2 entries"),
    (("items", 1, "frac_bits"), 65, "header: item 1 'frac_bits'=65 outside [-64, 64]"),
    (("items", 1, "frac_bits"), -65, "header: item 1 'frac_bits'=-65 outside [-64, 64]"),
    (("items", 1, "code_bits"), 0, "header: item 1 'code_bits'=0 outside [1, 64]"),
    (("items", 1, "code_bits"), 65, "header: item 1 'code_bits'=65 outside [1, 64]"),
    (("items", 1, "has_bias"), 1, "header: item 1 'has_bias' missing or not a boolean"),
    (("items", 1, "codes_offset"), 1, "item 1 codes_offset=1 does not match shape [2, 3] and code_bits 3 (expected 0)"),
    (("items", 1, "codes_length"), 4, "item 1 codes_length=4 does not match shape [2, 3] and code_bits 3 (expected 3)"),
    (("items", 1, "bias_offset"), 2, "item 1 bias_offset=2 does not match shape [2, 3] and code_bits 3 (expected 3)"),
    (("items", 1, "bias_length"), 4, "item 1 bias_length=4 does not match shape [2, 3] and code_bits 3 (expected 8)"),
    (("items", 1, "bias_length"), ..., "header: item 1 'bias_length' missing or not an integer"),
])
def test_bad_headers_whole_messages(path: tuple, value, message: str) -> None:
    assert _bad(_file(_edit(path, value))) == message


def test_a_layer_larger_than_any_payload() -> None:
    def layer(shape: list[int]) -> dict:
        return {**_HEADER, "items": [{**_LAYER, "shape": shape, "code_bits": 8}]}

    # 2**32 codes of 8 bits are 2**35 bits, the most a payload may hold: only the lengths are then wrong
    assert _bad(_file(layer([2**16, 2**16]))) == \
        "item 0 codes_length=3 does not match shape [65536, 65536] and code_bits 8 (expected 4294967296)"
    assert _bad(_file(layer([2**16, 2**16 + 1]))) == \
        "item 0 shape [65536, 65537] at 8 bits is larger than any payload this reader accepts"


def test_conv2d_entries_and_their_bounds() -> None:
    codes = np.arange(-4, 4).reshape(2, 1, 2, 2)  # 8 codes at 3 bits: 100 101 110 111 000 001 010 011
    conv = QuantizedLayer("conv2d", "c", codes, 0, None, stride=(2, 1), padding=(0, 1), dilation=(1, 2), groups=2)
    data = v1.encode(CompressedModel([conv], (2, 4, 4), {}))
    header = json.loads(data[10:-4 - 3])
    assert header["items"][0] == {"kind": "conv2d", "name": "c", "shape": [2, 1, 2, 2], "frac_bits": 0,
                                       "code_bits": 3, "has_bias": False, "codes_offset": 0, "codes_length": 3,
                                       "bias_offset": 3, "bias_length": 0, "stride": [2, 1], "padding": [0, 1],
                                       "dilation": [1, 2], "groups": 2}
    assert data[-7:-4] == b"\x97\x70\x53"  # 10010111 01110000 01010011
    back = v1.decode(data).items[0]
    assert back.kind == "conv2d" and back.weight_codes.tolist() == codes.tolist() and back.bias is None
    assert (back.stride, back.padding, back.dilation, back.groups) == ((2, 1), (0, 1), (1, 2), 2)
    entry = header["items"][0]
    for key, value, message in [
        ("shape", [2, 1, 2], "header: item 0 shape must have 4 entries"),
        ("stride", [0, 1], f"header: item 0 stride has an entry outside [1, {MAX_PARAM}]"),
        ("padding", [-1, 0], f"header: item 0 padding has an entry outside [0, {MAX_PARAM}]"),
        ("dilation", [1], "header: item 0 dilation must have 2 entries"),
        ("stride", [1, 1, 1], "header: item 0 stride must have 2 entries"),
        ("padding", [0, 0, 0], "header: item 0 padding must have 2 entries"),
        ("groups", 0, f"header: item 0 'groups'=0 outside [1, {MAX_PARAM}]"),
    ]:
        bad = {**header, "items": [{**entry, key: value}]}
        assert _bad(_file(bad, data[-7:-4])) == message
    padding_zero = {**header, "items": [{**entry, "padding": [0, 0]}]}
    assert v1.decode(_file(padding_zero, data[-7:-4])).items[0].padding == (0, 0)


def test_the_file_frame_whole_messages() -> None:
    good = _file(_HEADER)
    assert _bad(good[:13]) == "file too short (13 bytes; a version-1 .bcz file has at least 14)"
    assert _bad(good[:14]) == f"header length {len(good) - 14 - 11} runs past the end of the 14-byte file"
    raw_len = len(good) - 14 - 11
    lying = b"BCZ1" + struct.pack("<HI", 1, raw_len + 12) + good[10:]
    assert _bad(lying) == f"header length {raw_len + 12} runs past the end of the {len(good)}-byte file"
    broken = bytearray(good)
    broken[-5] ^= 1  # a payload byte
    assert _bad(bytes(broken)) == "checksum mismatch: file is corrupt"
    assert _bad(_file(b"{")) == "header is not valid JSON (JSONDecodeError)"
    assert _bad(_file(b"\xff")) == "header is not valid JSON (UnicodeDecodeError)"
    assert _bad(_file(b"[]")) == "header is not a JSON object"
    stored = (_CODES + _BIAS) + b"\0"
    uncompressed = {**_HEADER, "stored_size": 12}
    assert _bad(_file(uncompressed, stored)) == "uncompressed payload of 12 bytes but payload_size=11"


def test_the_writer_refuses_whole_messages() -> None:
    def message(model: CompressedModel) -> str:
        with pytest.raises(BadData) as info:
            v1.encode(model)
        return str(info.value)

    fc = _model().items[1]
    assert message(CompressedModel([Op("maxpool2d", {"kernel_size": (2, 2), "stride": (2, 2), "padding": (1, 0)})],
                                   (1, 4, 4), {})).startswith("version 1 cannot store a maxpool2d op with params ")
    assert message(CompressedModel([Op("gelu")], (3,), {})) == "version 1 cannot store a gelu op with params {}"
    assert message(CompressedModel([fc, Op("flatten", {"start_dim": 9})], (3,), {})) == \
        "header: item 0 'start_dim'=9 outside [-8, 8]"  # an op is checked as the reader would, as item 0
    conv1d = QuantizedLayer("conv1d", "s", np.ones((2, 1, 3), dtype=np.int64), 0, None)
    assert message(CompressedModel([conv1d], (1, 5), {})) == "version 1 cannot store a conv1d layer"
    assert message(CompressedModel([fc], (3,), [1])) == "metadata must be a dict"
    assert message(CompressedModel([fc], (3,), {"x": float("nan")})).startswith("header is not JSON-serialisable: ")
    assert message(CompressedModel([fc], (0,), {})) == f"header: input_shape has an entry outside [1, {MAX_PARAM}]"
