"""Version 3 of the ``.bcz`` format (``docs/FORMAT.md``): a version-2 file that also keeps the posterior variances
of its kept weights, so that it rebuilds the compressed *Bayesian* network.

The bytes are those of version 2 (with version number 3) followed, before the checksum, by a variance section:
per layer node, the weights' log-variance codes and, where the layer has group scales, theirs, each block in the
smallest of the storages of :mod:`pyro_bc.bcz.code_storage` (the ``coded`` one entropy-codes them with
``constriction``); then the section's length. A file without variances is written as version 2, unchanged.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

from pyro_bc.bcz import v2 as bcz_v2
from pyro_bc.bcz.binary import BadData, Reader, svarint, uvarint
from pyro_bc.bcz.code_storage import STORAGES, decode_codes, encode_codes
from pyro_bc.bcz.model import MAGIC, CompressedModel, LayerVariance, QuantizedLayer, Variances

VERSION = 3
STEP_BITS_RANGE = (-4, 16)  # the log-variance step is 2**-step_bits nats
MAX_LOG_VARIANCE = 128.0  # |code * step| of a stored log-variance (nats) at most this
_PREFIX = struct.Struct("<4sHB")
_LENGTH = struct.Struct("<I")
_CRC = struct.Struct("<I")
MIN_SIZE = bcz_v2.MIN_SIZE + _LENGTH.size + 1  # a version-2 file, a one-byte section and its length


def _block(codes: np.ndarray | None) -> bytes:
    """storage byte, uvarint length, block; an empty block (storage 0, length 0) for no codes."""
    if codes is None or not np.size(codes):
        return bytes([0]) + uvarint(0)
    storage, block = encode_codes(np.asarray(codes, dtype=np.int64))
    return bytes([storage]) + uvarint(len(block)) + block


def _check_codes(codes: np.ndarray, step: float, what: str) -> None:
    if codes.size and float(np.abs(codes).max()) * step > MAX_LOG_VARIANCE:
        raise BadData(f"{what}: a log-variance beyond ±{MAX_LOG_VARIANCE:g} nats")


def _section(model: CompressedModel) -> bytes:
    variances = model.variances
    layers = [item for item in model.items if isinstance(item, QuantizedLayer)]
    if not STEP_BITS_RANGE[0] <= variances.step_bits <= STEP_BITS_RANGE[1]:
        raise BadData(f"variance step_bits {variances.step_bits} outside {STEP_BITS_RANGE}")
    if len(variances.layers) != len(layers):
        raise BadData(f"{len(variances.layers)} layer variances for {len(layers)} layers")
    out = [svarint(variances.step_bits)]
    for layer, var in zip(layers, variances.layers):
        count = _weight_count(layer, var.every_weight)
        weight = np.asarray(var.weight_codes, dtype=np.int64).ravel()
        if len(weight) != count:
            raise BadData(f"layer {layer.name!r}: {len(weight)} weight log-variances for {count} "
                          f"{'weights' if var.every_weight else 'non-zero weights'}")
        _check_codes(weight, variances.step, f"layer {layer.name!r}")
        out += [bytes([(var.scale_codes is not None) | 2 * bool(var.every_weight)]), _block(weight)]
        if var.scale_codes is not None:
            scale = np.asarray(var.scale_codes, dtype=np.int64).ravel()
            if len(scale) != _groups(layer):
                raise BadData(f"layer {layer.name!r}: {len(scale)} group-scale variances for {_groups(layer)} groups")
            _check_codes(scale, variances.step, f"layer {layer.name!r}")
            out.append(_block(scale))
    return b"".join(out)


def _weight_count(layer: QuantizedLayer, every_weight: bool) -> int:
    return int(np.size(layer.weight_codes) if every_weight else np.count_nonzero(layer.weight_codes))


def _groups(layer: QuantizedLayer) -> int:
    """A layer's groups: a linear layer's inputs, a convolution's output channels."""
    return int(layer.weight_codes.shape[1] if layer.kind == "linear" else layer.weight_codes.shape[0])


def encode(model: CompressedModel) -> bytes:
    """The complete version-3 bytes of ``model``, which has variances (BadData if it cannot be stored)."""
    v2 = bcz_v2.encode(model)
    section = _section(model)
    body = _PREFIX.pack(MAGIC, VERSION, v2[6]) + v2[_PREFIX.size:-_CRC.size] + section + _LENGTH.pack(len(section))
    return body + _CRC.pack(zlib.crc32(body))


def _read_block(r: Reader, count: int, what: str) -> np.ndarray:
    storage = r.byte(f"{what} storage", len(STORAGES) - 1)
    length = r.uvarint(f"{what} length")
    if length > r.left:  # the bytes after the length itself: a block never reaches past the section
        raise BadData(f"{r.what}: {what} length={length} outside [0, {r.left}]")
    block = Reader(r.data, r.pos, r.pos + length, what)
    r.pos = block.end
    if count == 0:
        if length:
            raise BadData(f"{what}: {length} bytes for no codes")
        return np.zeros(0, dtype=np.int64)
    return decode_codes(storage, block, count)


def decode(data: bytes) -> CompressedModel:
    """Parse complete version-3 bytes whose magic and version were checked (BadData on any problem)."""
    if len(data) < MIN_SIZE:
        raise BadData(f"file too short ({len(data)} bytes; a version-3 .bcz file has at least {MIN_SIZE})")
    (crc,) = _CRC.unpack_from(data, len(data) - _CRC.size)
    if zlib.crc32(memoryview(data)[: -_CRC.size]) != crc:
        raise BadData("checksum mismatch: file is corrupt")
    end = len(data) - _CRC.size - _LENGTH.size
    (length,) = _LENGTH.unpack_from(data, end)
    if length > end - bcz_v2.MIN_SIZE + _CRC.size:
        raise BadData(f"variance section of {length} bytes is longer than the file allows")
    v2_body = _PREFIX.pack(MAGIC, bcz_v2.VERSION, data[6]) + bytes(data[_PREFIX.size:end - length])
    model = bcz_v2.decode(v2_body + _CRC.pack(zlib.crc32(v2_body)))
    r = Reader(data, end - length, end, "variance section")
    step_bits = r.svarint("step_bits", *STEP_BITS_RANGE)
    step = 2.0 ** -step_bits
    layers = []
    for layer in (item for item in model.items if isinstance(item, QuantizedLayer)):
        where = f"layer {layer.name!r} "
        flags = r.byte(f"{where}variance flags", 3)
        has_scales, every_weight = flags & 1, bool(flags & 2)
        weight = _read_block(r, _weight_count(layer, every_weight), f"{where}weight log-variances")
        _check_codes(weight, step, f"variance section: {where.strip()}")
        scale = _read_block(r, _groups(layer), f"{where}group-scale log-variances") if has_scales else None
        if scale is not None:
            _check_codes(scale, step, f"variance section: {where.strip()}")
        layers.append(LayerVariance(weight, scale, every_weight))
    r.done()
    model.variances = Variances(step_bits, layers)
    return model
