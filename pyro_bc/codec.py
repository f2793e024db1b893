"""The ``.bcz`` compressed-model format: write, read and rebuild a pruned, quantized sequential network.

The byte layout is specified in ``docs/FORMAT.md``.  Every problem with a file (unreadable, truncated,
corrupt, inconsistent, unknown version) raises :class:`pyro_bc.errors.FormatError` with a one-line message
that names the path.
"""

from __future__ import annotations

import json
import lzma
import math
import os
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from pyro_bc.atomic import atomic_write_bytes
from pyro_bc.errors import FormatError

MAGIC = b"BCZ1"
VERSION = 1
CODECS = ("none", "zlib", "lzma")
LAYER_KINDS = ("linear", "conv2d")
OP_KINDS = ("relu", "tanh", "sigmoid", "flatten", "maxpool2d", "avgpool2d", "select")
FRAC_BITS_RANGE = (-64, 64)
MAX_PAYLOAD = 1 << 32  # decoded payload cap (4 GiB); anything larger is treated as corrupt
MAX_PARAM = 1 << 16  # cap on strides, kernel sizes, groups, ... and on each input_shape entry
LZMA_MEMLIMIT = 1 << 28
_PREFIX = struct.Struct("<4sHI")  # magic, version, header length
_CRC = struct.Struct("<I")
_MIN_SIZE = _PREFIX.size + _CRC.size

Pair = tuple[int, int]


class _Bad(Exception):
    """Internal: a problem with the file; turned into a FormatError naming the path."""


def _pair(value: Any) -> Pair:
    """Normalise an int or a 2-sequence to a 2-tuple of ints."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return (int(value), int(value))
    a, b = value
    return (int(a), int(b))


@dataclass
class QuantizedLayer:
    """A pruned, fixed-point layer: weight = weight_codes * 2**-frac_bits."""

    kind: str
    name: str
    weight_codes: np.ndarray
    frac_bits: int
    bias: np.ndarray | None = None
    stride: Pair = (1, 1)
    padding: Pair = (0, 0)
    dilation: Pair = (1, 1)
    groups: int = 1

    def __post_init__(self) -> None:
        self.stride = _pair(self.stride)
        self.padding = _pair(self.padding)
        self.dilation = _pair(self.dilation)
        self.groups = int(self.groups)
        self.frac_bits = int(self.frac_bits)

    @property
    def out_features(self) -> int:
        """Number of output units / channels (first weight dimension)."""
        return int(self.weight_codes.shape[0])

    @property
    def code_bits(self) -> int:
        """Packing width: smallest two's-complement width (>= 1) that holds every code."""
        codes = np.asarray(self.weight_codes)
        if codes.size == 0:
            return 1
        return max(_twos_width(int(codes.min())), _twos_width(int(codes.max())))

    def weight(self) -> np.ndarray:
        """The float32 weight, ``codes * 2**-frac_bits``."""
        return (np.asarray(self.weight_codes, dtype=np.float64) * 2.0 ** -self.frac_bits).astype(np.float32)


@dataclass
class Op:
    """A parameter-free op between layers (activation, flatten or pooling)."""

    kind: str
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        params = dict(self.params)
        if self.kind == "flatten":
            params = {"start_dim": int(params.get("start_dim", 1))}
        elif self.kind in ("maxpool2d", "avgpool2d"):
            kernel = _pair(params["kernel_size"])
            stride = params.get("stride")
            params = {"kernel_size": kernel, "stride": kernel if stride is None else _pair(stride)}
        elif self.kind == "select":
            params = {"index": [int(i) for i in params["index"]]}
        self.params = params


@dataclass
class CompressedModel:
    """A sequential network of quantized layers and ops, plus free-form JSON metadata."""

    items: list[QuantizedLayer | Op]
    input_shape: tuple[int, ...]
    metadata: dict[str, Any] = field(default_factory=dict)


def _twos_width(value: int) -> int:
    """Bits needed to hold ``value`` in two's complement (at least 1)."""
    return (value if value >= 0 else ~value).bit_length() + 1


# ---------------------------------------------------------------- bit packing


def pack_codes(codes: np.ndarray, bits: int) -> bytes:
    """Pack int64 codes row-major, ``bits`` each, two's complement, MSB first, zero-padded to a byte."""
    flat = np.ascontiguousarray(codes, dtype=np.int64).ravel()
    as_bytes = flat.view(np.uint64).astype(">u8").view(np.uint8).reshape(-1, 8)
    bit_matrix = np.unpackbits(as_bytes, axis=1)[:, 64 - bits :]
    return np.packbits(bit_matrix.ravel()).tobytes()


def unpack_codes(data: bytes, bits: int, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`pack_codes`: int64 array of ``shape`` (``data`` must have the exact length)."""
    count = math.prod(shape)
    bit_matrix = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[: count * bits].reshape(count, bits)
    raw = np.zeros(count, dtype=np.uint64)
    one = np.uint64(1)
    for column in range(bits):
        raw <<= one
        raw |= bit_matrix[:, column]
    shift = 64 - bits
    return ((raw << np.uint64(shift)).view(np.int64) >> np.int64(shift)).reshape(shape)


def _packed_len(count: int, bits: int) -> int:
    """Bytes of a packed code block."""
    return (count * bits + 7) // 8


# ---------------------------------------------------------------- writing


def _check_layer(layer: QuantizedLayer) -> None:
    """Raise _Bad if a layer cannot be stored."""
    codes = np.asarray(layer.weight_codes)
    if layer.kind not in LAYER_KINDS:
        raise _Bad(f"layer {layer.name!r}: unknown kind {layer.kind!r}")
    if not np.issubdtype(codes.dtype, np.integer):
        raise _Bad(f"layer {layer.name!r}: weight_codes must be integers, not {codes.dtype}")
    if codes.size and codes.dtype == np.uint64 and int(codes.max()) > np.iinfo(np.int64).max:
        raise _Bad(f"layer {layer.name!r}: codes do not fit in 64 bits")
    _check_shape(layer.kind, tuple(codes.shape), layer.groups)
    if not FRAC_BITS_RANGE[0] <= layer.frac_bits <= FRAC_BITS_RANGE[1]:
        raise _Bad(f"layer {layer.name!r}: frac_bits {layer.frac_bits} outside {FRAC_BITS_RANGE}")
    if layer.bias is not None and np.shape(layer.bias) != (codes.shape[0],):
        raise _Bad(f"layer {layer.name!r}: bias shape {np.shape(layer.bias)} != ({codes.shape[0]},)")


def _check_shape(kind: str, shape: tuple[int, ...], groups: int) -> None:
    """Raise _Bad unless ``shape`` is a sane weight shape for ``kind``."""
    if len(shape) != (2 if kind == "linear" else 4):
        raise _Bad(f"{kind} weight must be {2 if kind == 'linear' else 4}-D, got shape {list(shape)}")
    if any(d < 1 for d in shape):
        raise _Bad(f"weight shape {list(shape)} has a dimension < 1")
    if not 1 <= groups <= MAX_PARAM or shape[0] % groups:
        raise _Bad(f"groups={groups} does not divide {shape[0]} output channels")


def _layer_entry(layer: QuantizedLayer, offset: int) -> tuple[dict[str, Any], bytes]:
    """Header entry and payload bytes of one layer, its payload starting at ``offset``."""
    codes = np.asarray(layer.weight_codes).astype(np.int64)
    bits = layer.code_bits
    packed = pack_codes(codes, bits)
    bias = b"" if layer.bias is None else np.asarray(layer.bias, dtype="<f4").tobytes()
    entry: dict[str, Any] = {
        "kind": layer.kind,
        "name": layer.name,
        "shape": list(codes.shape),
        "frac_bits": layer.frac_bits,
        "code_bits": bits,
        "has_bias": layer.bias is not None,
        "codes_offset": offset,
        "codes_length": len(packed),
        "bias_offset": offset + len(packed),
        "bias_length": len(bias),
    }
    if layer.kind == "conv2d":
        entry.update(stride=list(layer.stride), padding=list(layer.padding), dilation=list(layer.dilation),
                     groups=layer.groups)
    return entry, packed + bias


def _op_entry(op: Op) -> dict[str, Any]:
    """Header entry of one op (validated by re-parsing it)."""
    entry = {"kind": op.kind, "params": {k: list(v) if isinstance(v, tuple) else v for k, v in op.params.items()}}
    _parse_op(entry, 0)
    return entry


def _compress(payload: bytes) -> tuple[str, bytes]:
    """Smallest of {none, zlib -9, lzma -9}; a codec is used only where it is strictly smaller."""
    best = ("none", payload)
    for name, data in (("zlib", zlib.compress(payload, 9)), ("lzma", lzma.compress(payload, preset=9))):
        if len(data) < len(best[1]):
            best = (name, data)
    return best


def encode(model: CompressedModel) -> bytes:
    """The complete ``.bcz`` bytes of ``model`` (raises _Bad if it cannot be stored)."""
    entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    offset = 0
    for index, item in enumerate(model.items):
        if isinstance(item, QuantizedLayer):
            _check_layer(item)
            entry, chunk = _layer_entry(item, offset)
            offset += len(chunk)
            chunks.append(chunk)
        elif isinstance(item, Op):
            entry = _op_entry(item)
        else:
            raise _Bad(f"item {index} is a {type(item).__name__}, not a QuantizedLayer or Op")
        entries.append(entry)
    if not isinstance(model.metadata, dict):
        raise _Bad("metadata must be a dict")
    _ints([int(d) for d in model.input_shape], None, 1, MAX_PARAM, "input_shape")
    payload = b"".join(chunks)
    codec, stored = _compress(payload)
    header = {
        "input_shape": [int(d) for d in model.input_shape],
        "metadata": model.metadata,
        "codec": codec,
        "payload_size": len(payload),
        "stored_size": len(stored),
        "items": entries,
    }
    try:
        header_bytes = json.dumps(header, allow_nan=False, separators=(",", ":")).encode()
    except (TypeError, ValueError) as exc:
        raise _Bad(f"header is not JSON-serialisable: {exc}") from None
    body = _PREFIX.pack(MAGIC, VERSION, len(header_bytes)) + header_bytes + stored
    return body + _CRC.pack(zlib.crc32(body))


def write_bcz(path: str | os.PathLike[str], model: CompressedModel) -> int:
    """Atomically write ``model`` to ``path``; returns the number of bytes written."""
    path = os.fspath(path)
    try:
        data = encode(model)
        atomic_write_bytes(path, data)
    except _Bad as exc:
        raise FormatError(f"{path}: cannot write: {exc}") from None
    except OSError as exc:
        raise FormatError(f"{path}: cannot write: {exc.strerror or exc}") from exc
    return len(data)


# ---------------------------------------------------------------- reading


def _int(obj: dict[str, Any], key: str, lo: int, hi: int, where: str) -> int:
    """obj[key] as an int in [lo, hi], else _Bad."""
    value = obj.get(key)
    if type(value) is not int:
        raise _Bad(f"header: {where}{key!r} missing or not an integer")
    if not lo <= value <= hi:
        raise _Bad(f"header: {where}{key!r}={value} outside [{lo}, {hi}]")
    return value


def _ints(value: Any, length: int | None, lo: int, hi: int, what: str) -> tuple[int, ...]:
    """A list of ints in [lo, hi] (of ``length`` if given) as a tuple, else _Bad."""
    if not isinstance(value, list) or any(type(v) is not int for v in value):
        raise _Bad(f"header: {what} is not a list of integers")
    if length is not None and len(value) != length:
        raise _Bad(f"header: {what} must have {length} entries")
    if any(not lo <= v <= hi for v in value):
        raise _Bad(f"header: {what} has an entry outside [{lo}, {hi}]")
    return tuple(value)


def _parse_op(entry: dict[str, Any], index: int) -> Op:
    """Op from its header entry, else _Bad."""
    where = f"item {index} "
    kind, params = entry["kind"], entry.get("params")
    if not isinstance(params, dict):
        raise _Bad(f"header: {where}'params' missing or not an object")
    if kind == "flatten":
        if set(params) != {"start_dim"}:
            raise _Bad(f"header: {where}flatten needs exactly 'start_dim'")
        return Op(kind, {"start_dim": _int(params, "start_dim", -8, 8, where)})
    if kind in ("maxpool2d", "avgpool2d"):
        if set(params) != {"kernel_size", "stride"}:
            raise _Bad(f"header: {where}{kind} needs exactly 'kernel_size' and 'stride'")
        kernel = _ints(params["kernel_size"], 2, 1, MAX_PARAM, f"{where}kernel_size")
        stride = _ints(params["stride"], 2, 1, MAX_PARAM, f"{where}stride")
        return Op(kind, {"kernel_size": kernel, "stride": stride})
    if kind == "select":
        if set(params) != {"index"}:
            raise _Bad(f"header: {where}select needs exactly 'index'")
        index = _ints(params["index"], None, 0, MAX_PARAM, f"{where}index")
        if not index or list(index) != sorted(set(index)):
            raise _Bad(f"header: {where}select index must be non-empty and strictly increasing")
        return Op(kind, {"index": list(index)})
    if params:
        raise _Bad(f"header: {where}{kind} takes no params")
    return Op(kind, {})


def _parse_layer(entry: dict[str, Any], index: int, offset: int) -> tuple[dict[str, Any], int]:
    """Validated layer spec (no arrays yet) and the payload offset after it, else _Bad."""
    where = f"item {index} "
    kind = entry["kind"]
    name = entry.get("name")
    if not isinstance(name, str):
        raise _Bad(f"header: {where}'name' missing or not a string")
    shape = _ints(entry.get("shape"), 2 if kind == "linear" else 4, 1, MAX_PAYLOAD * 8, f"{where}shape")
    spec: dict[str, Any] = {"kind": kind, "name": name, "shape": shape, "codes_offset": offset}
    spec["frac_bits"] = _int(entry, "frac_bits", *FRAC_BITS_RANGE, where)
    spec["code_bits"] = bits = _int(entry, "code_bits", 1, 64, where)
    if type(entry.get("has_bias")) is not bool:
        raise _Bad(f"header: {where}'has_bias' missing or not a boolean")
    spec["has_bias"] = entry["has_bias"]
    if kind == "conv2d":
        spec["stride"] = _ints(entry.get("stride"), 2, 1, MAX_PARAM, f"{where}stride")
        spec["padding"] = _ints(entry.get("padding"), 2, 0, MAX_PARAM, f"{where}padding")
        spec["dilation"] = _ints(entry.get("dilation"), 2, 1, MAX_PARAM, f"{where}dilation")
        spec["groups"] = _int(entry, "groups", 1, MAX_PARAM, where)
        _check_shape(kind, shape, spec["groups"])
    count = math.prod(shape)
    if count * bits > MAX_PAYLOAD * 8:
        raise _Bad(f"{where}shape {list(shape)} at {bits} bits is larger than any payload this reader accepts")
    expected = {
        "codes_offset": offset,
        "codes_length": _packed_len(count, bits),
        "bias_offset": offset + _packed_len(count, bits),
        "bias_length": 4 * shape[0] if spec["has_bias"] else 0,
    }
    for key, value in expected.items():
        if _int(entry, key, 0, MAX_PAYLOAD, where) != value:
            raise _Bad(f"{where}{key}={entry[key]} does not match shape {list(shape)} and code_bits {bits} "
                       f"(expected {value})")
    return spec, expected["bias_offset"] + expected["bias_length"]


def _parse_header(raw: bytes, stored_size: int) -> tuple[dict[str, Any], list[dict[str, Any] | Op]]:
    """Decode and validate the JSON header; sizes are checked against the shapes, nothing is allocated."""
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _Bad(f"header is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise _Bad("header is not a JSON object")
    for key in ("input_shape", "metadata", "codec", "payload_size", "stored_size", "items"):
        if key not in header:
            raise _Bad(f"header: missing key {key!r}")
    _ints(header["input_shape"], None, 1, MAX_PARAM, "input_shape")
    if not isinstance(header["metadata"], dict):
        raise _Bad("header: 'metadata' is not an object")
    if header["codec"] not in CODECS:
        raise _Bad(f"header: unknown codec {header['codec']!r}")
    payload_size = _int(header, "payload_size", 0, MAX_PAYLOAD, "")
    if _int(header, "stored_size", 0, MAX_PAYLOAD, "") != stored_size:
        raise _Bad(f"header declares stored_size={header['stored_size']} but the file holds {stored_size} bytes")
    if not isinstance(header["items"], list):
        raise _Bad("header: 'items' is not a list")
    specs: list[dict[str, Any] | Op] = []
    offset = 0
    for index, entry in enumerate(header["items"]):
        if not isinstance(entry, dict) or entry.get("kind") not in LAYER_KINDS + OP_KINDS:
            raise _Bad(f"header: item {index} is not an object with a known 'kind'")
        if entry["kind"] in OP_KINDS:
            specs.append(_parse_op(entry, index))
        else:
            spec, offset = _parse_layer(entry, index, offset)
            specs.append(spec)
    if offset != payload_size:
        raise _Bad(f"layers need {offset} payload bytes but header declares payload_size={payload_size}")
    if header["codec"] == "none" and payload_size != stored_size:
        raise _Bad(f"uncompressed payload of {stored_size} bytes but payload_size={payload_size}")
    return header, specs


def _inflate_zlib(stored: bytes, size: int) -> tuple[bytes, bool, bool]:
    """zlib-decode at most ``size`` bytes (+1 probe): (output, reached end of stream, data left over)."""
    dec = zlib.decompressobj()
    out = dec.decompress(stored, size) if size else b""
    if not dec.eof:
        out += dec.decompress(dec.unconsumed_tail if size else stored, 1)
    return out, dec.eof, bool(dec.unconsumed_tail or dec.unused_data)


def _inflate_lzma(stored: bytes, size: int) -> tuple[bytes, bool, bool]:
    """xz-decode at most ``size`` bytes (+1 probe): (output, reached end of stream, data left over)."""
    dec = lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=LZMA_MEMLIMIT)
    out = dec.decompress(stored, max_length=size) if size else b""
    if not dec.eof:
        out += dec.decompress(b"" if size else stored, max_length=1)
    return out, dec.eof, bool(dec.unused_data)


def _decompress(codec: str, stored: bytes, size: int) -> bytes:
    """Decode the payload, never producing more than ``size`` + 1 bytes; _Bad unless exactly ``size``."""
    if codec == "none":
        return stored
    inflate = _inflate_zlib if codec == "zlib" else _inflate_lzma
    try:
        out, complete, extra = inflate(stored, size)
    except (zlib.error, lzma.LZMAError, EOFError) as exc:
        raise _Bad(f"{codec} decompression failed: {exc}") from None
    if len(out) > size:
        raise _Bad(f"{codec} payload decompresses to more than the declared {size} bytes")
    if not complete or len(out) != size:
        raise _Bad(f"{codec} payload is truncated: {len(out)} of {size} bytes")
    if extra:
        raise _Bad(f"{codec} payload has trailing bytes after the compressed stream")
    return out


def _build_layer(spec: dict[str, Any], payload: bytes) -> QuantizedLayer:
    """QuantizedLayer from a validated spec and the decoded payload."""
    start = spec["codes_offset"]
    codes_end = start + _packed_len(math.prod(spec["shape"]), spec["code_bits"])
    codes = unpack_codes(payload[start:codes_end], spec["code_bits"], spec["shape"])
    bias = None
    if spec["has_bias"]:
        bias = np.frombuffer(payload, dtype="<f4", count=spec["shape"][0], offset=codes_end).astype(np.float32)
    conv = {k: spec[k] for k in ("stride", "padding", "dilation", "groups") if k in spec}
    return QuantizedLayer(spec["kind"], spec["name"], codes, spec["frac_bits"], bias, **conv)


def decode(data: bytes) -> CompressedModel:
    """Parse complete ``.bcz`` bytes (raises _Bad on any problem)."""
    if len(data) < _MIN_SIZE:
        raise _Bad(f"file too short ({len(data)} bytes; a .bcz file has at least {_MIN_SIZE})")
    magic, version, header_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise _Bad(f"bad magic {magic!r} (expected {MAGIC!r}): not a .bcz file")
    if version != VERSION:
        raise _Bad(f"unsupported .bcz version {version} (this reader supports {VERSION})")
    if _PREFIX.size + header_len + _CRC.size > len(data):
        raise _Bad(f"header length {header_len} runs past the end of the {len(data)}-byte file")
    payload_start = _PREFIX.size + header_len
    header, specs = _parse_header(data[_PREFIX.size : payload_start], len(data) - payload_start - _CRC.size)
    (crc,) = _CRC.unpack_from(data, len(data) - _CRC.size)
    if zlib.crc32(memoryview(data)[: -_CRC.size]) != crc:
        raise _Bad("checksum mismatch: file is corrupt")
    payload = _decompress(header["codec"], data[payload_start : -_CRC.size], header["payload_size"])
    items = [spec if isinstance(spec, Op) else _build_layer(spec, payload) for spec in specs]
    return CompressedModel(items, tuple(header["input_shape"]), header["metadata"])


def read_bcz(path: str | os.PathLike[str]) -> CompressedModel:
    """Read and fully validate a ``.bcz`` file."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise FormatError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        return decode(data)
    except _Bad as exc:
        raise FormatError(f"{path}: {exc}") from None


# ---------------------------------------------------------------- torch


class Conv2dChannelsLast(nn.Conv2d):
    """An ``nn.Conv2d`` that returns its output in channels-last memory format (the same values).

    On the CPU, max-pooling and the next convolution run about twice as fast on channels-last tensors,
    and a convolution with one input channel always returns the default layout.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).contiguous(memory_format=torch.channels_last)


def _layer_module(layer: QuantizedLayer) -> nn.Module:
    """nn.Linear / nn.Conv2d with the layer's (pruned) shape, weights and bias; no random init."""
    shape = tuple(layer.weight_codes.shape)
    has_bias = layer.bias is not None
    if layer.kind == "linear":
        module = nn.utils.skip_init(nn.Linear, shape[1], shape[0], bias=has_bias)
    else:
        module = nn.utils.skip_init(Conv2dChannelsLast, shape[1] * layer.groups, shape[0], (shape[2], shape[3]),
                                    stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                                    groups=layer.groups, bias=has_bias)
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(layer.weight()))
        if has_bias:
            module.bias.copy_(torch.from_numpy(np.asarray(layer.bias, dtype=np.float32)))
    return module


class Select(nn.Module):
    """Keep the given features (or channels) along dim 1: the inputs a pruned layer still reads."""

    def __init__(self, index: list[int]):
        super().__init__()
        self.register_buffer("index", torch.tensor(index, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(1, self.index)


def _op_module(op: Op) -> nn.Module:
    """The torch module of a parameter-free op."""
    simple = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
    if op.kind in simple:
        return simple[op.kind]()
    if op.kind == "flatten":
        return nn.Flatten(start_dim=op.params["start_dim"])
    if op.kind == "select":
        return Select(op.params["index"])
    pool = nn.MaxPool2d if op.kind == "maxpool2d" else nn.AvgPool2d
    return pool(kernel_size=op.params["kernel_size"], stride=op.params["stride"])


def to_module(model: CompressedModel) -> nn.Sequential:
    """A plain float32 ``nn.Sequential`` in eval mode computing the compressed network."""
    modules = [_layer_module(i) if isinstance(i, QuantizedLayer) else _op_module(i) for i in model.items]
    return nn.Sequential(*modules).eval()


def load(path: str | os.PathLike[str]) -> nn.Module:
    """Read a ``.bcz`` file and rebuild its torch module."""
    return to_module(read_bcz(path))
