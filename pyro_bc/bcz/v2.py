"""Version 2 of the ``.bcz`` format (``docs/FORMAT.md``): a compact binary header (raw-deflated when that is
smaller) describing a graph of nodes, then one block per layer holding its codes in the smallest of three
storages (:mod:`pyro_bc.bcz.code_storage`) and its bias (float32, float16 or fixed-point codes, whichever is the
smallest that keeps the bias exactly). A deterministic layer (:class:`~pyro_bc.bcz.model.FloatLayer`) stores its
weights as floats instead of codes, and a ``layer_norm`` node its weight and bias, each at float16 where that keeps
them exactly, else at float32.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from typing import Any

import numpy as np

from pyro_bc.bcz.binary import BadData, Reader, inflate, svarint, uvarint, uvarints
from pyro_bc.bcz.code_storage import STORAGES, decode_codes, encode_codes
from pyro_bc.bcz.model import (
    FRAC_BITS_RANGE,
    INPUT_DTYPE_IDS,
    LAYER_KINDS,
    MAGIC,
    MAX_NORM_RANK,
    MAX_PARAM,
    MULTI_INPUT,
    POOL_KINDS,
    WEIGHT_DIMS,
    WIRE_IDS,
    CompressedModel,
    FloatLayer,
    NormLayer,
    Op,
    ProgramNode,
    QuantizedLayer,
    check_float_layer,
    check_layer,
    check_norm,
    check_op,
    check_shape,
    float16_exact,
    sources,
)
from pyro_bc.bcz.program import MAX_PROGRAM_NODES, MAX_RANK, Program, check_program

VERSION = 2
KIND_OF_WIRE_ID = {wire_id: kind for kind, wire_id in WIRE_IDS.items()}
DTYPE_OF_INPUT_ID = {wire_id: name for name, wire_id in INPUT_DTYPE_IDS.items()}
BIAS_STORAGES = ("none", "float32", "float16", "fixed")
NONE, FLOAT32, FLOAT16, FIXED = range(4)
WEIGHT_STORAGES = (*STORAGES, "float32", "float16")  # the code storages, then a FloatLayer's weights as floats
FLOAT32_WEIGHTS, FLOAT16_WEIGHTS = len(STORAGES), len(STORAGES) + 1
FLOAT_BYTES = {FLOAT32: 4, FLOAT16: 2}  # a float tensor's storage id (the bias storages') -> bytes per value
_EPS = struct.Struct("<d")  # a layer_norm's eps
HEADER_CODECS = ("none", "deflate")  # deflate: raw deflate (RFC 1951), zlib.compressobj(9, wbits=-15)
MAX_HEADER = 1 << 24  # decoded header bytes
MAX_NODES = 1 << 16
MAX_NAME = 255  # layer name, UTF-8 bytes
MAX_DIM = 1 << 28  # a weight dimension
MAX_CODES = 1 << 28  # codes in all layers together (2 GiB as int64)
MAX_BLOCK = 1 << 40  # bytes of one block
METADATA_KEYS = ("model", "prior", "width", "thresholds", "val_size", "seed")  # the writer keeps only these keys ...
MAX_KEPT_VALUE = 80  # ... and each only if its compact JSON is at most this long
_PREFIX = struct.Struct("<4sHB")  # magic, version, header codec
_CRC = struct.Struct("<I")
MIN_SIZE = _PREFIX.size + 2 + _CRC.size  # prefix, two one-byte varints, CRC
VARIABLE_ARITY = (*MULTI_INPUT, "program")  # node kinds whose input count is written
# a program constant's storage: its bytes' dtype and the dtype it is read back as (float32 values at float32, or at
# float16 where exact; int64; bool, one byte each)
CONSTANT_STORAGES = {"float32": ("<f4", "float32"), "float16": ("<f2", "float32"), "int64": ("<i8", "int64"),
                     "bool": ("u1", "bool")}


def kept_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """The metadata a version-2 file keeps: :data:`METADATA_KEYS` whose values are short."""
    def short(value: Any) -> bool:
        try:
            return len(json.dumps(value, allow_nan=False, separators=(",", ":"))) <= MAX_KEPT_VALUE
        except (TypeError, ValueError):
            return False
    return {k: metadata[k] for k in METADATA_KEYS if k in metadata and short(metadata[k])}


# ---------------------------------------------------------------- writing


def _exact_fixed(bias: np.ndarray, frac_bits: int) -> np.ndarray | None:
    """Codes c with float32(c * 2**-frac_bits) == bias bit for bit, or None if there are none."""
    with np.errstate(all="ignore"):
        codes = np.rint(bias.astype(np.float64) * 2.0**frac_bits)
        if not np.all(np.abs(codes) < 2.0**62):
            return None
    codes = codes.astype(np.int64)
    back = _fixed_bias(codes, frac_bits)  # from the integers, so -0.0 (code 0 reads back as +0.0) is not exact
    return codes if np.array_equal(back.view(np.uint32), bias.view(np.uint32)) else None


def _fixed_bias(codes: np.ndarray, frac_bits: int) -> np.ndarray:
    """float32(codes * 2**-frac_bits), computed in float64 (as weights are)."""
    return (codes * 2.0**-frac_bits).astype(np.float32)


def _bias_block(bias: np.ndarray | None, frac_bits: int) -> tuple[int, bytes]:
    """The smallest storage that keeps the bias bit for bit: (bias storage id, block)."""
    if bias is None:
        return NONE, b""
    b32 = np.ascontiguousarray(bias, dtype=np.float32)
    options = [(FLOAT32, b32.astype("<f4").tobytes())]
    with np.errstate(all="ignore"):
        b16 = b32.astype(np.float16)
    if np.array_equal(b16.astype(np.float32).view(np.uint32), b32.view(np.uint32)):
        options.append((FLOAT16, b16.astype("<f2").tobytes()))
    codes = _exact_fixed(b32, frac_bits)
    if codes is not None:
        storage, block = encode_codes(codes)
        options.append((FIXED, bytes([storage]) + block))
    return min(options, key=lambda option: len(option[1]))


def _float_block(values: np.ndarray | None) -> tuple[int, bytes]:
    """A float tensor at float16 where that keeps it bit for bit, else float32: (storage id, block)."""
    if values is None:
        return NONE, b""
    if float16_exact(values):
        return FLOAT16, np.ascontiguousarray(values, dtype=np.float32).astype("<f2").tobytes()
    return FLOAT32, np.ascontiguousarray(values, dtype="<f4").tobytes()


def _name(name: str) -> bytes:
    raw = name.encode()
    if len(raw) > MAX_NAME:
        raise BadData(f"layer name {name[:20]!r}... is longer than {MAX_NAME} bytes")
    return uvarint(len(raw)) + raw


def _layer(layer: QuantizedLayer) -> tuple[bytes, bytes]:
    """A layer's header fields and its payload block (codes, then bias)."""
    codes = check_layer(layer)
    if max(codes.shape) > MAX_DIM:
        raise BadData(f"layer {layer.name!r}: a dimension of {list(codes.shape)} exceeds {MAX_DIM}")
    head = _name(layer.name) + uvarints(codes.shape)
    if layer.kind != "linear":  # a convolution's pairs (a 1-D one's: over a height of one)
        head += uvarints([*layer.stride, *layer.padding, *layer.dilation, layer.groups])
    storage, weights = encode_codes(codes)
    bias_storage, bias = _bias_block(layer.bias, layer.frac_bits)
    head += (svarint(layer.frac_bits) + bytes([storage]) + uvarint(len(weights)) + bytes([bias_storage])
             + uvarint(len(bias)))
    return head, weights + bias


def _float_layer(layer: FloatLayer) -> tuple[bytes, bytes]:
    """A float layer's header fields (frac_bits 0, a float weight storage) and its payload block."""
    check_float_layer(layer)
    shape = layer.weight.shape
    if max(shape) > MAX_DIM:
        raise BadData(f"layer {layer.name!r}: a dimension of {list(shape)} exceeds {MAX_DIM}")
    head = _name(layer.name) + uvarints(shape)
    if layer.kind != "linear":
        head += uvarints([*layer.stride, *layer.padding, *layer.dilation, layer.groups])
    storage, weights = _float_block(layer.weight)
    bias_storage, bias = _bias_block(layer.bias, 0)
    head += (svarint(0) + bytes([FLOAT16_WEIGHTS if storage == FLOAT16 else FLOAT32_WEIGHTS]) + uvarint(len(weights))
             + bytes([bias_storage]) + uvarint(len(bias)))
    return head, weights + bias


def _norm(norm: NormLayer) -> tuple[bytes, bytes]:
    """A layer_norm node's header fields and its payload block (weight, then bias)."""
    check_norm(norm)
    if max(norm.normalized_shape) > MAX_DIM:
        raise BadData(f"layer_norm {norm.name!r}: a dimension of {list(norm.normalized_shape)} exceeds {MAX_DIM}")
    head = [_name(norm.name), uvarint(len(norm.normalized_shape)), uvarints(norm.normalized_shape), _EPS.pack(norm.eps)]
    blocks = []
    for values in (norm.weight, norm.bias):
        storage, block = _float_block(values)
        head += [bytes([storage]), uvarint(len(block))]
        blocks.append(block)
    return b"".join(head), b"".join(blocks)


def _program(node: ProgramNode) -> tuple[bytes, bytes]:
    """A program node's header fields (name, its graph as compact JSON, its constants' storages and shapes) and its
    payload block (the constants' values)."""
    program = node.program
    check_program(program)
    graph = json.dumps([program.nodes, program.output], separators=(",", ":"), allow_nan=False).encode()
    head = [_name(node.name), uvarint(len(graph)), graph, uvarint(len(program.constants))]
    blocks = []
    for array in program.constants:
        if array.ndim and max(array.shape) > MAX_DIM:
            raise BadData(f"program {node.name!r}: a constant's dimension of {list(array.shape)} exceeds {MAX_DIM}")
        storage = array.dtype.name if array.dtype.name != "float32" or not float16_exact(array) else "float16"
        head += [bytes([list(CONSTANT_STORAGES).index(storage)]), uvarint(array.ndim), uvarints(array.shape)]
        blocks.append(np.ascontiguousarray(array).astype(CONSTANT_STORAGES[storage][0]).tobytes())
    return b"".join(head), b"".join(blocks)


_NODE_WRITERS = {QuantizedLayer: _layer, FloatLayer: _float_layer, NormLayer: _norm, ProgramNode: _program}


def _select(index: list[int]) -> bytes:
    """A select op's index: as a gap list (mode 0) or a bitmap (mode 1), whichever is smaller."""
    as_list = bytes([0]) + uvarint(len(index)) + uvarints(np.diff(index, prepend=-1) - 1)
    bits = np.zeros(index[-1] + 1, dtype=np.uint8)
    bits[index] = 1
    as_bitmap = bytes([1]) + uvarint(len(bits)) + np.packbits(bits).tobytes()
    return min(as_list, as_bitmap, key=len)


def _op(op: Op) -> bytes:
    """An op's header fields."""
    check_op(op)
    p = op.params
    if op.kind == "flatten":
        return svarint(p["start_dim"])
    if op.kind in POOL_KINDS:
        return uvarints([*p["kernel_size"], *p["stride"], *p["padding"]])
    if op.kind == "adaptive_avgpool2d":
        return uvarints(p["output_size"])
    if op.kind == "select":
        return _select(p["index"])
    if op.kind == "gather":  # any order, repeats allowed: a channel shuffle, a chunk
        return uvarint(len(p["index"])) + uvarints(p["index"])
    return b""


def _header(model: CompressedModel) -> tuple[bytes, bytes]:
    """The decoded header and the payload."""
    if not isinstance(model.metadata, dict):
        raise BadData("metadata must be a dict")
    shape = [int(d) for d in model.input_shape]
    if not 1 <= len(shape) <= 8 or not all(1 <= d <= MAX_PARAM for d in shape):
        raise BadData(f"input_shape {shape} must have 1 to 8 entries in [1, {MAX_PARAM}]")
    if len(model.items) > MAX_NODES:
        raise BadData(f"{len(model.items)} items: at most {MAX_NODES}")
    meta = json.dumps(kept_metadata(model.metadata), separators=(",", ":")).encode() if model.metadata else b""
    head = [uvarint(len(shape)), uvarints(shape), uvarint(len(meta)), meta, uvarint(len(model.items))]
    blocks = []
    for index, (item, wanted) in enumerate(zip(model.items, sources(model))):
        if not isinstance(item, (QuantizedLayer, FloatLayer, NormLayer, ProgramNode, Op)) or item.kind not in WIRE_IDS:
            raise BadData(f"item {index} is not a QuantizedLayer, FloatLayer, NormLayer, ProgramNode or an Op of a "
                          "known kind")
        head.append(bytes([WIRE_IDS[item.kind]]))
        if item.kind in VARIABLE_ARITY:
            head.append(uvarint(len(wanted)))
        head.append(uvarints([index - source for source in wanted]))
        if not isinstance(item, Op):
            fields, block = next(write for kind, write in _NODE_WRITERS.items() if isinstance(item, kind))(item)
            head.append(fields)
            blocks.append(block)
        else:
            head.append(_op(item))
    if model.input_dtype is not None:  # integer ids; a float network's header ends with its nodes, as it always has
        if model.input_dtype not in INPUT_DTYPE_IDS:
            raise BadData(f"input_dtype {model.input_dtype!r}: one of {', '.join(INPUT_DTYPE_IDS)}, or None for floats")
        head.append(bytes([INPUT_DTYPE_IDS[model.input_dtype]]))
    return b"".join(head), b"".join(blocks)


def encode(model: CompressedModel) -> bytes:
    """The complete version-2 bytes of ``model`` (BadData if it cannot be stored)."""
    header, payload = _header(model)
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    deflated = packer.compress(header) + packer.flush()
    codec, stored = (1, deflated) if len(deflated) < len(header) else (0, header)
    body = _PREFIX.pack(MAGIC, VERSION, codec) + uvarint(len(header)) + uvarint(len(stored)) + stored + payload
    return body + _CRC.pack(zlib.crc32(body))


# ---------------------------------------------------------------- reading


def _read_select(r: Reader, where: str) -> Op:
    mode = r.byte(f"{where}select mode", 1)
    if mode == 0:
        count = r.uvarint(f"{where}select count", 1, MAX_PARAM + 1)
        index = np.cumsum(r.uvarints(count, f"{where}select gaps", MAX_PARAM) + 1) - 1
    else:
        size = r.uvarint(f"{where}select bitmap size", 1, MAX_PARAM + 1)
        packed = np.frombuffer(r.take((size + 7) // 8, f"{where}select bitmap"), dtype=np.uint8)
        bits = np.unpackbits(packed)
        if bits[size:].any() or not bits[size - 1]:
            raise BadData(f"header: {where}select bitmap must end with its last set bit")
        index = np.flatnonzero(bits)
    op = Op("select", {"index": index.tolist()})
    try:
        check_op(op)
    except BadData as exc:
        raise BadData(f"header: {where}{exc}") from None
    return op


def _read_op(r: Reader, kind: str, where: str) -> Op:
    if kind == "flatten":
        return Op(kind, {"start_dim": r.svarint(f"{where}start_dim", -8, 8)})
    if kind in POOL_KINDS:
        kh, kw, sh, sw = (r.uvarint(f"{where}{kind} {n}", 1, MAX_PARAM) for n in ("kh", "kw", "sh", "sw"))
        ph, pw = (r.uvarint(f"{where}{kind} {n}", 0, MAX_PARAM) for n in ("ph", "pw"))
        op = Op(kind, {"kernel_size": (kh, kw), "stride": (sh, sw), "padding": (ph, pw)})
    elif kind == "adaptive_avgpool2d":
        op = Op(kind, {"output_size": tuple(r.uvarint(f"{where}output size", 1, MAX_PARAM) for _ in range(2))})
    elif kind == "select":
        return _read_select(r, where)
    elif kind == "gather":
        count = r.uvarint(f"{where}gather count", 1, MAX_PARAM + 1)
        op = Op(kind, {"index": r.uvarints(count, f"{where}gather index", MAX_PARAM).tolist()})
    else:
        op = Op(kind)
    try:
        check_op(op)
    except BadData as exc:
        raise BadData(f"header: {where}{exc}") from None
    return op


def _read_name(r: Reader, where: str) -> str:
    try:
        return bytes(r.take(r.uvarint(f"{where}name length", 0, MAX_NAME), f"{where}name")).decode()
    except UnicodeDecodeError:
        raise BadData(f"header: {where}name is not UTF-8") from None


def _read_layer(r: Reader, kind: str, where: str) -> dict[str, Any]:
    """A layer's validated header fields (no arrays yet)."""
    name = _read_name(r, where)
    shape = tuple(r.uvarint(f"{where}shape", 1, MAX_DIM) for _ in range(WEIGHT_DIMS[kind]))
    spec: dict[str, Any] = {"kind": kind, "name": name, "shape": shape}
    if kind != "linear":
        spec["stride"] = tuple(r.uvarint(f"{where}stride", 1, MAX_PARAM) for _ in range(2))
        spec["padding"] = tuple(r.uvarint(f"{where}padding", 0, MAX_PARAM) for _ in range(2))
        spec["dilation"] = tuple(r.uvarint(f"{where}dilation", 1, MAX_PARAM) for _ in range(2))
        spec["groups"] = r.uvarint(f"{where}groups", 1, MAX_PARAM)
        try:
            check_shape(kind, shape, spec["groups"])
        except BadData as exc:
            raise BadData(f"header: {where}{exc}") from None
    spec["frac_bits"] = r.svarint(f"{where}frac_bits", *FRAC_BITS_RANGE)
    spec["storage"] = r.byte(f"{where}weight storage", len(WEIGHT_STORAGES) - 1)
    spec["weights_length"] = r.uvarint(f"{where}weights length", 1, MAX_BLOCK)
    if spec["storage"] >= FLOAT32_WEIGHTS:  # weights as floats: a deterministic layer
        expected = (4 if spec["storage"] == FLOAT32_WEIGHTS else 2) * math.prod(shape)
        if spec["frac_bits"] != 0 or spec["weights_length"] != expected:
            raise BadData(f"header: {where}{WEIGHT_STORAGES[spec['storage']]} weights need frac_bits 0 and length "
                          f"{expected}, not {spec['frac_bits']} and {spec['weights_length']}")
    spec["bias_storage"] = r.byte(f"{where}bias storage", len(BIAS_STORAGES) - 1)
    spec["bias_length"] = r.uvarint(f"{where}bias length", 0, MAX_BLOCK)
    expected = {NONE: 0, FLOAT32: 4 * shape[0], FLOAT16: 2 * shape[0]}.get(spec["bias_storage"])
    if expected is not None and spec["bias_length"] != expected:
        raise BadData(f"header: {where}bias length {spec['bias_length']} does not match "
                      f"{BIAS_STORAGES[spec['bias_storage']]} for {shape[0]} outputs (expected {expected})")
    return spec


def _read_norm(r: Reader, where: str) -> dict[str, Any]:
    """A layer_norm node's validated header fields (no arrays yet)."""
    name = _read_name(r, where)
    rank = r.uvarint(f"{where}layer_norm rank", 1, MAX_NORM_RANK)
    shape = tuple(r.uvarint(f"{where}normalized_shape", 1, MAX_DIM) for _ in range(rank))
    (eps,) = _EPS.unpack(r.take(_EPS.size, f"{where}eps"))
    if not (math.isfinite(eps) and eps >= 0):
        raise BadData(f"header: {where}layer_norm eps {eps} must be finite and >= 0")
    spec: dict[str, Any] = {"kind": "layer_norm", "name": name, "shape": shape, "eps": eps}
    for part in ("weight", "bias"):
        storage = r.byte(f"{where}{part} storage", FLOAT16)
        length = r.uvarint(f"{where}{part} length", 0, MAX_BLOCK)
        expected = FLOAT_BYTES.get(storage, 0) * math.prod(shape)
        if length != expected:
            raise BadData(f"header: {where}{part} length {length} does not match {BIAS_STORAGES[storage]} for "
                          f"normalized_shape {list(shape)} (expected {expected})")
        spec[f"{part}_storage"] = storage
    if spec["bias_storage"] != NONE and spec["weight_storage"] == NONE:
        raise BadData(f"header: {where}layer_norm has a bias but no weight")
    spec["weights_length"] = FLOAT_BYTES.get(spec["weight_storage"], 0) * math.prod(shape)
    spec["bias_length"] = FLOAT_BYTES.get(spec["bias_storage"], 0) * math.prod(shape)
    return spec


def _read_program(r: Reader, arity: int, where: str) -> dict[str, Any]:
    """A program node's validated header fields: its graph checked, its constants' shapes (no values yet)."""
    name = _read_name(r, where)
    graph = bytes(r.take(r.uvarint(f"{where}program length", 2, r.left), f"{where}program"))
    try:
        nodes, output = json.loads(graph.decode())
    except (UnicodeDecodeError, ValueError, RecursionError, TypeError) as exc:
        raise BadData(f"header: {where}program is not [nodes, output] in JSON ({type(exc).__name__})") from None
    if not isinstance(nodes, list) or len(nodes) > MAX_PROGRAM_NODES:
        raise BadData(f"header: {where}program nodes must be a list of at most {MAX_PROGRAM_NODES}")
    storages, shapes = [], []
    for i in range(r.uvarint(f"{where}constant count", 0, MAX_PROGRAM_NODES)):
        storages.append(list(CONSTANT_STORAGES)[r.byte(f"{where}constant {i} storage", len(CONSTANT_STORAGES) - 1)])
        shapes.append(tuple(r.uvarint(f"{where}constant {i} shape", 0, MAX_DIM)  # 0: an empty tensor
                            for _ in range(r.uvarint(f"{where}constant {i} rank", 0, MAX_RANK))))
    placeholders = [np.zeros(0, dtype=CONSTANT_STORAGES[s][1]) for s in storages]
    try:  # targets and references, with empty stand-ins for the constants
        check_program(Program(arity, placeholders, nodes, output))
    except BadData as exc:
        raise BadData(f"header: {where}{exc}") from None
    lengths = [np.dtype(CONSTANT_STORAGES[s][0]).itemsize * math.prod(shape) for s, shape in zip(storages, shapes)]
    return {"kind": "program", "name": name, "arity": arity, "nodes": nodes, "output": output,
            "storages": storages, "shapes": shapes, "size": sum(math.prod(shape) for shape in shapes),
            "weights_length": sum(lengths), "bias_length": 0}


def _build_program(spec: dict[str, Any], payload: Reader) -> ProgramNode:
    """The program node of a validated spec, its constants read from ``payload``."""
    constants = []
    for i, (storage, shape) in enumerate(zip(spec["storages"], spec["shapes"])):
        stored, read = CONSTANT_STORAGES[storage]
        data = payload.take(np.dtype(stored).itemsize * math.prod(shape), f"program {spec['name']!r} constant {i}")
        constants.append(np.frombuffer(data, dtype=stored).reshape(shape).astype(read))
    return ProgramNode(spec["name"], Program(spec["arity"], constants, spec["nodes"], spec["output"]))


def _read_input_dtype(r: Reader) -> str:
    wire_id = r.byte("input dtype")
    if wire_id not in DTYPE_OF_INPUT_ID:
        raise BadData(f"header: input dtype {wire_id} is none of {sorted(DTYPE_OF_INPUT_ID)}")
    return DTYPE_OF_INPUT_ID[wire_id]


def _parse_header(r: Reader) -> tuple[tuple[int, ...], dict[str, Any], list[Any], list[tuple[int, ...]], str | None]:
    """Input shape, metadata, node specs (Op or layer dict), node inputs and the input dtype (None: floats); every
    size bounded."""
    input_shape = tuple(r.uvarint("input_shape", 1, MAX_PARAM) for _ in range(r.uvarint("input rank", 1, 8)))
    raw_meta = bytes(r.take(r.uvarint("metadata length", 0, r.left), "metadata"))
    try:
        metadata = json.loads(raw_meta.decode()) if raw_meta else {}
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BadData(f"header: metadata is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(metadata, dict):
        raise BadData("header: metadata is not a JSON object")
    specs, inputs, codes = [], [], 0
    for index in range(r.uvarint("node count", 0, MAX_NODES)):
        where = f"node {index} "
        kind = KIND_OF_WIRE_ID[r.byte(f"{where}kind", len(KIND_OF_WIRE_ID) - 1)]  # ids are 0, 1, ... (no gaps)
        arity = r.uvarint(f"{where}input count", 2 if kind in MULTI_INPUT else 1, MAX_PARAM) \
            if kind in VARIABLE_ARITY else 1
        inputs.append(tuple(index - r.uvarint(f"{where}input", 1, index + 1) for _ in range(arity)))
        if kind in LAYER_KINDS or kind in ("layer_norm", "program"):
            spec = _read_layer(r, kind, where) if kind in LAYER_KINDS else _read_norm(r, where) \
                if kind == "layer_norm" else _read_program(r, arity, where)
            codes += spec["size"] if kind == "program" else math.prod(spec["shape"])
            if codes > MAX_CODES:
                raise BadData(f"header: the layers hold more than {MAX_CODES} codes, larger than this reader accepts")
        else:
            spec = _read_op(r, kind, where)
        specs.append(spec)
    input_dtype = _read_input_dtype(r) if r.left else None
    r.done()
    return input_shape, metadata, specs, inputs, input_dtype


def _floats(data: memoryview, storage: int, shape: tuple[int, ...]) -> np.ndarray:
    """float32 values of a float block (float32 or float16 little-endian)."""
    return np.frombuffer(data, dtype="<f4" if storage == FLOAT32 else "<f2").astype(np.float32).reshape(shape)


def _build_norm(spec: dict[str, Any], payload: Reader) -> NormLayer:
    """The layer_norm node of a validated spec, its block read from ``payload``."""
    where = f"layer_norm {spec['name']!r} "
    weight, bias = (None if spec[f"{part}_storage"] == NONE else
                    _floats(payload.take(spec[f"{key}_length"], f"{where}{part}"), spec[f"{part}_storage"], spec["shape"])
                    for part, key in (("weight", "weights"), ("bias", "bias")))
    return NormLayer(spec["name"], spec["shape"], spec["eps"], weight, bias)


def _build_layer(spec: dict[str, Any], payload: Reader) -> QuantizedLayer | FloatLayer | NormLayer | ProgramNode:
    """The layer of a validated spec, its block read from ``payload``."""
    if spec["kind"] == "layer_norm":
        return _build_norm(spec, payload)
    if spec["kind"] == "program":
        return _build_program(spec, payload)
    shape = spec["shape"]
    where = f"layer {spec['name']!r} "
    if spec["storage"] >= FLOAT32_WEIGHTS:
        weight = _floats(payload.take(spec["weights_length"], f"{where}weights"),
                         FLOAT32 if spec["storage"] == FLOAT32_WEIGHTS else FLOAT16, shape)
    else:
        block = Reader(payload.data, payload.pos, payload.pos + spec["weights_length"], f"{where}weights")
        codes = decode_codes(spec["storage"], block, math.prod(shape)).reshape(shape)
        payload.pos = block.end
    bias_bytes = payload.take(spec["bias_length"], f"{where}bias")
    bias = None
    if spec["bias_storage"] == FLOAT32:
        bias = np.frombuffer(bias_bytes, dtype="<f4").astype(np.float32)
    elif spec["bias_storage"] == FLOAT16:
        bias = np.frombuffer(bias_bytes, dtype="<f2").astype(np.float32)
    elif spec["bias_storage"] == FIXED:
        r = Reader(bias_bytes, what=f"{where}bias")
        storage = r.byte("bias code storage", len(STORAGES) - 1)
        bias = _fixed_bias(decode_codes(storage, r, shape[0]), spec["frac_bits"])
    conv = {k: spec[k] for k in ("stride", "padding", "dilation", "groups") if k in spec}
    if spec["storage"] >= FLOAT32_WEIGHTS:
        return FloatLayer(spec["kind"], spec["name"], weight, bias, **conv)
    return QuantizedLayer(spec["kind"], spec["name"], codes, spec["frac_bits"], bias, **conv)


def decode(data: bytes) -> CompressedModel:
    """Parse complete version-2 bytes whose magic and version were checked (BadData on any problem)."""
    if len(data) < MIN_SIZE:
        raise BadData(f"file too short ({len(data)} bytes; a version-2 .bcz file has at least {MIN_SIZE})")
    r = Reader(data, _PREFIX.size, len(data) - _CRC.size, "file")
    codec = data[_PREFIX.size - 1]
    if codec >= len(HEADER_CODECS):
        raise BadData(f"unknown header codec {codec}")
    size = r.uvarint("header length", 0, MAX_HEADER)
    stored = r.take(r.uvarint("stored header length", 0, r.left), "header")
    if codec == 0 and len(stored) != size:
        raise BadData(f"uncompressed header of {len(stored)} bytes but header length {size}")
    (crc,) = _CRC.unpack_from(data, len(data) - _CRC.size)
    if zlib.crc32(memoryview(data)[: -_CRC.size]) != crc:
        raise BadData("checksum mismatch: file is corrupt")
    header = inflate(stored, size, -15, "header") if codec else bytes(stored)
    input_shape, metadata, specs, inputs, input_dtype = _parse_header(Reader(header, what="header"))
    lengths = sum(s["weights_length"] + s["bias_length"] for s in specs if isinstance(s, dict))
    if lengths != r.left:
        raise BadData(f"layer blocks need {lengths} payload bytes but the file holds {r.left}")
    items = [spec if isinstance(spec, Op) else _build_layer(spec, r) for spec in specs]
    for index, (item, wanted) in enumerate(zip(items, inputs)):
        item.inputs = None if wanted == (index - 1,) else wanted
    return CompressedModel(items, input_shape, metadata, input_dtype=input_dtype)
