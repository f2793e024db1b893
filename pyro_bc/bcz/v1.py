"""Version 1 of the ``.bcz`` format (``docs/FORMAT.md``): a JSON header and one zlib/lzma-compressed payload of
bit-packed codes and float32 biases, for sequential networks. Files of this version are still read; the
writer is kept for tests and for comparison (``pyro-bc`` writes version 2).
"""

from __future__ import annotations

import json
import lzma
import math
import struct
import zlib
from typing import Any

import numpy as np

from pyro_bc.bcz.binary import BadData, check_inflated, inflate
from pyro_bc.bcz.code_storage import pack_codes, packed_len, unpack_codes
from pyro_bc.bcz.model import (
    FRAC_BITS_RANGE,
    MAGIC,
    MAX_PARAM,
    CompressedModel,
    Op,
    QuantizedLayer,
    check_layer,
    check_shape,
    is_chain,
)

VERSION = 1
CODECS = ("none", "zlib", "lzma")
LAYER_KINDS = ("linear", "conv2d")  # version 1 knows these kinds only
OP_KINDS = ("relu", "tanh", "sigmoid", "flatten", "maxpool2d", "avgpool2d", "select")
MAX_PAYLOAD = 1 << 32  # decoded payload cap (4 GiB); anything larger is treated as corrupt
LZMA_MEMLIMIT = 1 << 28
_PREFIX = struct.Struct("<4sHI")  # magic, version, header length
_CRC = struct.Struct("<I")
_MIN_SIZE = _PREFIX.size + _CRC.size


# ---------------------------------------------------------------- writing


def _layer_entry(layer: QuantizedLayer, offset: int) -> tuple[dict[str, Any], bytes]:
    """Header entry and payload bytes of one layer, its payload starting at ``offset``."""
    if layer.kind not in LAYER_KINDS:
        raise BadData(f"version 1 cannot store a {layer.kind} layer")
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
    """Header entry of one op (validated by re-parsing it); version 1 has no pool padding."""
    if op.kind not in OP_KINDS or op.params.get("padding", (0, 0)) != (0, 0):
        raise BadData(f"version 1 cannot store a {op.kind} op with params {op.params}")
    params = {k: list(v) if isinstance(v, tuple) else v for k, v in op.params.items() if k != "padding"}
    entry = {"kind": op.kind, "params": params}
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
    """The complete version-1 bytes of ``model`` (raises BadData if it cannot be stored)."""
    if not is_chain(model):
        raise BadData("version 1 stores only sequential networks")
    entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    offset = 0
    for index, item in enumerate(model.items):
        if isinstance(item, QuantizedLayer):
            check_layer(item)
            entry, chunk = _layer_entry(item, offset)
            offset += len(chunk)
            chunks.append(chunk)
        elif isinstance(item, Op):
            entry = _op_entry(item)
        else:
            raise BadData(f"item {index} is a {type(item).__name__}, not a QuantizedLayer or Op")
        entries.append(entry)
    if not isinstance(model.metadata, dict):
        raise BadData("metadata must be a dict")
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
        raise BadData(f"header is not JSON-serialisable: {exc}") from None
    body = _PREFIX.pack(MAGIC, VERSION, len(header_bytes)) + header_bytes + stored
    return body + _CRC.pack(zlib.crc32(body))


# ---------------------------------------------------------------- reading


def _int(obj: dict[str, Any], key: str, lo: int, hi: int, where: str) -> int:
    """obj[key] as an int in [lo, hi], else BadData."""
    value = obj.get(key)
    if type(value) is not int:
        raise BadData(f"header: {where}{key!r} missing or not an integer")
    if not lo <= value <= hi:
        raise BadData(f"header: {where}{key!r}={value} outside [{lo}, {hi}]")
    return value


def _ints(value: Any, length: int | None, lo: int, hi: int, what: str) -> tuple[int, ...]:
    """A list of ints in [lo, hi] (of ``length`` if given) as a tuple, else BadData."""
    if not isinstance(value, list) or any(type(v) is not int for v in value):
        raise BadData(f"header: {what} is not a list of integers")
    if length is not None and len(value) != length:
        raise BadData(f"header: {what} must have {length} entries")
    if any(not lo <= v <= hi for v in value):
        raise BadData(f"header: {what} has an entry outside [{lo}, {hi}]")
    return tuple(value)


def _parse_op(entry: dict[str, Any], index: int) -> Op:
    """Op from its header entry, else BadData."""
    where = f"item {index} "
    kind, params = entry["kind"], entry.get("params")
    if not isinstance(params, dict):
        raise BadData(f"header: {where}'params' missing or not an object")
    if kind == "flatten":
        if set(params) != {"start_dim"}:
            raise BadData(f"header: {where}flatten needs exactly 'start_dim'")
        return Op(kind, {"start_dim": _int(params, "start_dim", -8, 8, where)})
    if kind in ("maxpool2d", "avgpool2d"):
        if set(params) != {"kernel_size", "stride"}:
            raise BadData(f"header: {where}{kind} needs exactly 'kernel_size' and 'stride'")
        kernel = _ints(params["kernel_size"], 2, 1, MAX_PARAM, f"{where}kernel_size")
        stride = _ints(params["stride"], 2, 1, MAX_PARAM, f"{where}stride")
        return Op(kind, {"kernel_size": kernel, "stride": stride})
    if kind == "select":
        if set(params) != {"index"}:
            raise BadData(f"header: {where}select needs exactly 'index'")
        index = _ints(params["index"], None, 0, MAX_PARAM, f"{where}index")
        if not index or list(index) != sorted(set(index)):
            raise BadData(f"header: {where}select index must be non-empty and strictly increasing")
        return Op(kind, {"index": list(index)})
    if params:
        raise BadData(f"header: {where}{kind} takes no params")
    return Op(kind, {})


def _parse_layer(entry: dict[str, Any], index: int, offset: int) -> tuple[dict[str, Any], int]:
    """Validated layer spec (no arrays yet) and the payload offset after it, else BadData."""
    where = f"item {index} "
    kind = entry["kind"]
    name = entry.get("name")
    if not isinstance(name, str):
        raise BadData(f"header: {where}'name' missing or not a string")
    shape = _ints(entry.get("shape"), 2 if kind == "linear" else 4, 1, MAX_PAYLOAD * 8, f"{where}shape")
    spec: dict[str, Any] = {"kind": kind, "name": name, "shape": shape, "codes_offset": offset}
    spec["frac_bits"] = _int(entry, "frac_bits", *FRAC_BITS_RANGE, where)
    spec["code_bits"] = bits = _int(entry, "code_bits", 1, 64, where)
    if type(entry.get("has_bias")) is not bool:
        raise BadData(f"header: {where}'has_bias' missing or not a boolean")
    spec["has_bias"] = entry["has_bias"]
    if kind == "conv2d":
        spec["stride"] = _ints(entry.get("stride"), 2, 1, MAX_PARAM, f"{where}stride")
        spec["padding"] = _ints(entry.get("padding"), 2, 0, MAX_PARAM, f"{where}padding")
        spec["dilation"] = _ints(entry.get("dilation"), 2, 1, MAX_PARAM, f"{where}dilation")
        spec["groups"] = _int(entry, "groups", 1, MAX_PARAM, where)
        check_shape(kind, shape, spec["groups"])
    count = math.prod(shape)
    if count * bits > MAX_PAYLOAD * 8:
        raise BadData(f"{where}shape {list(shape)} at {bits} bits is larger than any payload this reader accepts")
    expected = {
        "codes_offset": offset,
        "codes_length": packed_len(count, bits),
        "bias_offset": offset + packed_len(count, bits),
        "bias_length": 4 * shape[0] if spec["has_bias"] else 0,
    }
    for key, value in expected.items():
        if _int(entry, key, 0, MAX_PAYLOAD, where) != value:
            raise BadData(f"{where}{key}={entry[key]} does not match shape {list(shape)} and code_bits {bits} "
                       f"(expected {value})")
    return spec, expected["bias_offset"] + expected["bias_length"]


def _parse_header(raw: bytes, stored_size: int) -> tuple[dict[str, Any], list[dict[str, Any] | Op]]:
    """Decode and validate the JSON header; sizes are checked against the shapes, nothing is allocated."""
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BadData(f"header is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise BadData("header is not a JSON object")
    for key in ("input_shape", "metadata", "codec", "payload_size", "stored_size", "items"):
        if key not in header:
            raise BadData(f"header: missing key {key!r}")
    _ints(header["input_shape"], None, 1, MAX_PARAM, "input_shape")
    if not isinstance(header["metadata"], dict):
        raise BadData("header: 'metadata' is not an object")
    if header["codec"] not in CODECS:
        raise BadData(f"header: unknown codec {header['codec']!r}")
    payload_size = _int(header, "payload_size", 0, MAX_PAYLOAD, "")
    if _int(header, "stored_size", 0, MAX_PAYLOAD, "") != stored_size:
        raise BadData(f"header declares stored_size={header['stored_size']} but the file holds {stored_size} bytes")
    if not isinstance(header["items"], list):
        raise BadData("header: 'items' is not a list")
    specs: list[dict[str, Any] | Op] = []
    offset = 0
    for index, entry in enumerate(header["items"]):
        if not isinstance(entry, dict) or entry.get("kind") not in LAYER_KINDS + OP_KINDS:
            raise BadData(f"header: item {index} is not an object with a known 'kind'")
        if entry["kind"] in OP_KINDS:
            specs.append(_parse_op(entry, index))
        else:
            spec, offset = _parse_layer(entry, index, offset)
            specs.append(spec)
    if offset != payload_size:
        raise BadData(f"layers need {offset} payload bytes but header declares payload_size={payload_size}")
    if header["codec"] == "none" and payload_size != stored_size:
        raise BadData(f"uncompressed payload of {stored_size} bytes but payload_size={payload_size}")
    return header, specs


def _inflate_lzma(stored: bytes, size: int) -> tuple[bytes, bool, bool]:
    """xz-decode at most ``size`` bytes (+1 probe): (output, reached end of stream, data left over)."""
    dec = lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=LZMA_MEMLIMIT)
    out = dec.decompress(stored, max_length=size) if size else b""
    if not dec.eof:
        out += dec.decompress(b"" if size else stored, max_length=1)
    return out, dec.eof, bool(dec.unused_data)


def _decompress(codec: str, stored: bytes, size: int) -> bytes:
    """Decode the payload, never producing more than ``size`` + 1 bytes; BadData unless exactly ``size``."""
    if codec == "none":
        return stored
    if codec == "zlib":
        return inflate(stored, size, 15, "zlib payload")
    try:
        out, complete, extra = _inflate_lzma(stored, size)
    except (lzma.LZMAError, EOFError) as exc:
        raise BadData(f"lzma decompression failed: {exc}") from None
    return check_inflated(out, complete, extra, size, "lzma payload")


def _build_layer(spec: dict[str, Any], payload: bytes) -> QuantizedLayer:
    """QuantizedLayer from a validated spec and the decoded payload."""
    start = spec["codes_offset"]
    codes_end = start + packed_len(math.prod(spec["shape"]), spec["code_bits"])
    codes = unpack_codes(payload[start:codes_end], spec["code_bits"], spec["shape"])
    bias = None
    if spec["has_bias"]:
        bias = np.frombuffer(payload, dtype="<f4", count=spec["shape"][0], offset=codes_end).astype(np.float32)
    conv = {k: spec[k] for k in ("stride", "padding", "dilation", "groups") if k in spec}
    return QuantizedLayer(spec["kind"], spec["name"], codes, spec["frac_bits"], bias, **conv)


def decode(data: bytes) -> CompressedModel:
    """Parse complete version-1 bytes whose magic and version were checked (BadData on any problem)."""
    if len(data) < _MIN_SIZE:
        raise BadData(f"file too short ({len(data)} bytes; a version-1 .bcz file has at least {_MIN_SIZE})")
    _, _, header_len = _PREFIX.unpack_from(data)
    if _PREFIX.size + header_len + _CRC.size > len(data):
        raise BadData(f"header length {header_len} runs past the end of the {len(data)}-byte file")
    payload_start = _PREFIX.size + header_len
    header, specs = _parse_header(data[_PREFIX.size : payload_start], len(data) - payload_start - _CRC.size)
    (crc,) = _CRC.unpack_from(data, len(data) - _CRC.size)
    if zlib.crc32(memoryview(data)[: -_CRC.size]) != crc:
        raise BadData("checksum mismatch: file is corrupt")
    payload = _decompress(header["codec"], data[payload_start : -_CRC.size], header["payload_size"])
    items = [spec if isinstance(spec, Op) else _build_layer(spec, payload) for spec in specs]
    return CompressedModel(items, tuple(header["input_shape"]), header["metadata"])


