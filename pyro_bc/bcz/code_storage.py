"""Storing an array of integer codes in few bytes: ``packed`` (two's-complement bit packing), ``coded`` (ANS
entropy coding with ``constriction`` under a categorical model of the codes' own frequencies) and ``sparse``
(positions of the non-zero codes as delta varints, then their values). :func:`encode_codes` tries all three
and keeps the smallest; the byte layouts are specified in ``docs/FORMAT.md`` (version 2).
"""

from __future__ import annotations

import math

import numpy as np

from pyro_bc.bcz.binary import BadData, Reader, svarint, uvarint, uvarints

PACKED, CODED, SPARSE = 0, 1, 2
STORAGES = ("packed", "coded", "sparse")
MAX_SYMBOLS = 1 << 16  # largest alphabet (max code - min code + 1) of a coded block
MAX_COUNT = (1 << 32) - 1  # largest stored symbol count
INT64 = (-(1 << 63), (1 << 63) - 1)


def twos_width(value: int) -> int:
    """Bits needed to hold ``value`` in two's complement (at least 1)."""
    return (value if value >= 0 else ~value).bit_length() + 1


def code_bits(codes: np.ndarray) -> int:
    """Packing width: the smallest two's-complement width (>= 1) that holds every code."""
    codes = np.asarray(codes)
    if codes.size == 0:
        return 1
    return max(twos_width(int(codes.min())), twos_width(int(codes.max())))


def pack_codes(codes: np.ndarray, bits: int) -> bytes:
    """Pack int64 codes row-major, ``bits`` each, two's complement, MSB first, zero-padded to a byte."""
    flat = np.ascontiguousarray(codes, dtype=np.int64).ravel()
    as_bytes = flat.view(np.uint64).astype(">u8").view(np.uint8).reshape(-1, 8)
    bit_matrix = np.unpackbits(as_bytes, axis=1)[:, 64 - bits :]
    return np.packbits(bit_matrix.ravel()).tobytes()


def unpack_codes(data: bytes | memoryview, bits: int, shape: tuple[int, ...]) -> np.ndarray:
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


def packed_len(count: int, bits: int) -> int:
    """Bytes of ``count`` codes packed at ``bits`` each."""
    return (count * bits + 7) // 8


# ---------------------------------------------------------------- coded (ANS, categorical model)


def _quantized_counts(counts: np.ndarray, shift: int) -> np.ndarray:
    """Counts divided by 2**shift and rounded; a symbol that occurs keeps a count of at least 1."""
    scaled = (counts + ((1 << shift) >> 1)) >> shift
    return np.where(counts > 0, np.maximum(scaled, 1), 0)


def _estimated_bits(counts: np.ndarray, model: np.ndarray) -> float:
    """Bits to code symbols with ``counts`` under the model ``model`` (cross-entropy) plus the table's bits."""
    used = counts > 0
    stream = -(counts[used] * np.log2(model[used] / model.sum())).sum()
    return float(stream) + 8 * len(uvarints(model))


def _categorical(counts: np.ndarray):
    """constriction's categorical model of the (quantised) counts; symbols 0 .. len(counts) - 1."""
    import constriction

    return constriction.stream.model.Categorical(counts.astype(np.float64), perfect=False)


def _encode_coded(flat: np.ndarray) -> bytes | None:
    """A coded block (min, alphabet size, counts, ANS words without trailing zero bytes); None if the
    alphabet is larger than :data:`MAX_SYMBOLS`."""
    import constriction

    lo, hi = int(flat.min()), int(flat.max())
    if hi - lo + 1 > MAX_SYMBOLS:
        return None
    symbols = (flat - lo).astype(np.int32)
    counts = np.bincount(symbols, minlength=hi - lo + 1).astype(np.int64)
    shifts = range(max(0, int(counts.max()).bit_length() - 31), int(counts.max()).bit_length())
    model = min((_quantized_counts(counts, s) for s in shifts), key=lambda m: _estimated_bits(counts, m))
    head = svarint(lo) + uvarint(len(counts)) + uvarints(model)
    if len(counts) == 1:
        return head  # one symbol: nothing to code
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(symbols, _categorical(model))
    return head + coder.get_compressed().astype("<u4").tobytes().rstrip(b"\0")


def _decode_coded(reader: Reader, count: int) -> np.ndarray:
    """Inverse of :func:`_encode_coded`; the block is the rest of ``reader``."""
    import constriction

    lo = reader.svarint("coded min code", *INT64)
    size = reader.uvarint("coded alphabet size", 1, min(MAX_SYMBOLS, INT64[1] - lo + 1))
    model = reader.uvarints(size, "coded counts", MAX_COUNT)
    if not model.any():
        raise BadData(f"{reader.what}: coded counts are all zero")
    stream = bytes(reader.take(reader.left, "coded stream"))
    if size == 1:
        if stream:
            raise BadData(f"{reader.what}: a one-symbol coded block has {len(stream)} stream bytes")
        return np.full(count, lo, dtype=np.int64)
    if stream[-1:] == b"\0":
        raise BadData(f"{reader.what}: coded stream ends in a zero byte")
    words = np.frombuffer(stream + b"\0" * (-len(stream) % 4), dtype="<u4").astype(np.uint32)
    try:
        coder = constriction.stream.stack.AnsCoder(words)
        symbols = coder.decode(_categorical(model), count)
    except (ValueError, KeyError, RuntimeError, OverflowError) as exc:  # how constriction refuses a stream
        raise BadData(f"{reader.what}: coded stream does not decode ({exc})") from None
    if not coder.is_empty():
        raise BadData(f"{reader.what}: coded stream holds more than {count} codes")
    return symbols.astype(np.int64) + lo


# ---------------------------------------------------------------- packed, sparse, choice


def _encode_packed(flat: np.ndarray) -> bytes:
    bits = code_bits(flat)
    return bytes([bits]) + pack_codes(flat, bits)


def _decode_packed(reader: Reader, count: int) -> np.ndarray:
    bits = reader.byte("packed code bits", 64)
    if bits < 1:
        raise BadData(f"{reader.what}: packed code bits 0")
    if reader.left != packed_len(count, bits):
        raise BadData(f"{reader.what}: {reader.left} packed bytes for {count} codes of {bits} bits "
                      f"(expected {packed_len(count, bits)})")
    return unpack_codes(reader.take(reader.left, "packed codes"), bits, (count,))


def _dense_choice(flat: np.ndarray) -> tuple[int, bytes]:
    """The smaller of packed and coded (packed on a tie)."""
    coded = _encode_coded(flat)
    packed = _encode_packed(flat)
    return (CODED, coded) if coded is not None and len(coded) < len(packed) else (PACKED, packed)


def _encode_sparse(flat: np.ndarray) -> bytes:
    positions = np.flatnonzero(flat)
    gaps = np.diff(positions, prepend=-1) - 1
    out = uvarint(len(positions)) + uvarints(gaps)
    if len(positions):
        storage, block = _dense_choice(flat[positions])
        out += bytes([storage]) + block
    return out


def _decode_sparse(reader: Reader, count: int) -> np.ndarray:
    nonzero = reader.uvarint("sparse count", 0, count)
    gaps = reader.uvarints(nonzero, "sparse gaps", count)
    positions = np.cumsum(gaps + 1) - 1
    if nonzero and positions[-1] >= count:
        raise BadData(f"{reader.what}: sparse position {positions[-1]} outside {count} codes")
    codes = np.zeros(count, dtype=np.int64)
    if nonzero:
        storage = reader.byte("sparse value storage", CODED)
        codes[positions] = (_decode_packed if storage == PACKED else _decode_coded)(reader, nonzero)
    reader.done()
    return codes


def encode_as(storage: int, codes: np.ndarray) -> bytes | None:
    """``codes`` (any shape, row-major, at least one) as a block of ``storage``; None where ``coded`` cannot
    hold them (an alphabet larger than :data:`MAX_SYMBOLS`)."""
    flat = np.ascontiguousarray(codes, dtype=np.int64).ravel()
    return (_encode_packed, _encode_coded, _encode_sparse)[storage](flat)


def encode_codes(codes: np.ndarray) -> tuple[int, bytes]:
    """The smallest storage of ``codes`` (any shape, row-major, at least one code): (storage id, block);
    packed, then coded, on a tie."""
    blocks = [(storage, encode_as(storage, codes)) for storage in (PACKED, CODED, SPARSE)]
    return min(((s, b) for s, b in blocks if b is not None), key=lambda option: len(option[1]))


def decode_codes(storage: int, reader: Reader, count: int) -> np.ndarray:
    """The ``count`` codes of a block (the rest of ``reader``) in storage ``storage``; BadData if it is not
    exactly one valid block."""
    codes = (_decode_packed, _decode_coded, _decode_sparse)[storage](reader, count)
    reader.done()
    return codes
