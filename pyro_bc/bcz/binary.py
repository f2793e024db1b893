"""Bounded binary reading and writing for the ``.bcz`` codec: LEB128 varints and a cursor that never reads
past its end. Every problem raises :class:`BadData`, which the codec turns into a one-line ``FormatError``."""

from __future__ import annotations

import zlib

import numpy as np

MAX_VARINT_BYTES = 10  # enough for any value below 2**70; longer encodings are refused


class BadData(Exception):
    """A problem with the bytes being read (or a model that cannot be written)."""


def uvarint(value: int) -> bytes:
    """Unsigned LEB128: 7 bits per byte, least significant group first, high bit set on all but the last."""
    if value < 0:
        raise BadData(f"uvarint of negative value {value}")
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def svarint(value: int) -> bytes:
    """Signed varint: the zig-zag map (0, -1, 1, -2, ... -> 0, 1, 2, 3, ...) written as a uvarint."""
    return uvarint(2 * value if value >= 0 else -2 * value - 1)


class Reader:
    """A cursor over ``data[start:end]``; each read checks the bytes are there and the value is in range."""

    def __init__(self, data: bytes | memoryview, start: int = 0, end: int | None = None, what: str = "data"):
        self.data = memoryview(data)
        self.pos = start
        self.end = len(data) if end is None else end
        self.what = what

    @property
    def left(self) -> int:
        """Bytes not read yet."""
        return self.end - self.pos

    def take(self, n: int, what: str) -> memoryview:
        """The next ``n`` bytes."""
        if n > self.left:
            raise BadData(f"{self.what}: {what} needs {n} bytes but only {self.left} are left")
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def byte(self, what: str, hi: int = 255) -> int:
        """One byte as an int in [0, hi]."""
        value = self.take(1, what)[0]
        if value > hi:
            raise BadData(f"{self.what}: {what}={value} outside [0, {hi}]")
        return value

    def uvarint(self, what: str, lo: int = 0, hi: int = (1 << 64) - 1) -> int:
        """A canonical unsigned LEB128 varint in [lo, hi]."""
        value = shift = 0
        for count in range(1, MAX_VARINT_BYTES + 1):
            byte = self.take(1, what)[0]
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                if byte == 0 and count > 1:
                    raise BadData(f"{self.what}: {what} is not a minimal varint")
                break
        else:
            raise BadData(f"{self.what}: {what} is a varint longer than {MAX_VARINT_BYTES} bytes")
        if not lo <= value <= hi:
            raise BadData(f"{self.what}: {what}={value} outside [{lo}, {hi}]")
        return value

    def svarint(self, what: str, lo: int, hi: int) -> int:
        """A zig-zag signed varint in [lo, hi]."""
        raw = self.uvarint(what)
        value = raw >> 1 if not raw & 1 else -((raw + 1) >> 1)
        if not lo <= value <= hi:
            raise BadData(f"{self.what}: {what}={value} outside [{lo}, {hi}]")
        return value

    def uvarints(self, count: int, what: str, hi: int) -> np.ndarray:
        """``count`` canonical uvarints, each in [0, hi] (hi < 2**63), as an int64 array; vectorised."""
        if count == 0:
            return np.zeros(0, dtype=np.int64)
        width = max(1, (hi.bit_length() + 6) // 7)
        window = np.frombuffer(self.data[self.pos : self.pos + min(self.left, count * width)], dtype=np.uint8)
        ends = np.flatnonzero(window < 0x80)[:count] + 1
        if len(ends) < count:
            raise BadData(f"{self.what}: {what} needs {count} varints but the data ends first")
        starts = np.concatenate(([0], ends[:-1]))
        lengths = ends - starts
        if lengths.max() > width:
            raise BadData(f"{self.what}: {what} holds a varint longer than {width} bytes")
        if np.any((window[ends - 1] == 0) & (lengths > 1)):
            raise BadData(f"{self.what}: {what} holds a varint that is not minimal")
        used = window[: ends[-1]]
        index = np.arange(len(used)) - np.repeat(starts, lengths)
        parts = (used & 0x7F).astype(np.uint64) << (7 * index).astype(np.uint64)
        values = np.add.reduceat(parts, starts)
        if values.max() > hi:
            raise BadData(f"{self.what}: {what} holds a value above {hi}")
        self.pos += int(ends[-1])
        return values.astype(np.int64)

    def done(self) -> None:
        """Raise unless every byte was read."""
        if self.left:
            raise BadData(f"{self.what}: {self.left} unexpected bytes at the end")


def uvarints(values: np.ndarray) -> bytes:
    """Many non-negative integers (below 2**64) as concatenated uvarints, vectorised."""
    values = np.asarray(values, dtype=np.uint64).ravel()
    if not values.size:
        return b""
    lengths = np.ones(values.size, dtype=np.int64)
    for k in range(1, 10):  # up to ten bytes: 2**63 and above need the tenth
        lengths += values >= np.uint64(1 << (7 * k))
    ends = np.cumsum(lengths)
    index = np.arange(int(ends[-1])) - np.repeat(ends - lengths, lengths)  # byte number within its varint
    groups = (np.repeat(values, lengths) >> (7 * index).astype(np.uint64)) & np.uint64(0x7F)
    more = index < np.repeat(lengths, lengths) - 1
    return (groups.astype(np.uint8) | (more.astype(np.uint8) << 7)).tobytes()


def check_inflated(out: bytes, complete: bool, extra: bool, size: int, what: str) -> bytes:
    """``out`` if a decompressor that stopped after ``size`` + 1 bytes produced exactly ``size`` bytes, reached
    the end of its stream and left nothing over; BadData otherwise."""
    if len(out) > size:
        raise BadData(f"{what} decompresses to more than the declared {size} bytes")
    if not complete or len(out) != size:
        raise BadData(f"{what} is truncated: {len(out)} of {size} bytes")
    if extra:
        raise BadData(f"{what} has trailing bytes after the compressed stream")
    return out


def inflate(stored: bytes | memoryview, size: int, wbits: int, what: str) -> bytes:
    """Deflate-decode ``stored`` (a zlib stream for ``wbits`` 15, raw deflate for -15) into exactly ``size``
    bytes, never producing more than ``size`` + 1 (:func:`check_inflated`)."""
    dec = zlib.decompressobj(wbits)
    try:
        out = dec.decompress(stored, size) if size else b""
        if not dec.eof:
            out += dec.decompress(dec.unconsumed_tail if size else stored, 1)
    except zlib.error as exc:
        raise BadData(f"{what} decompression failed: {exc}") from None
    return check_inflated(out, dec.eof, bool(dec.unconsumed_tail or dec.unused_data), size, what)
