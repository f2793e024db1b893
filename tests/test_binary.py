"""The bounded primitives of the .bcz format (pyro_bc.bcz.binary): LEB128 and zig-zag varints against bytes
worked out by hand, the cursor's bounds and whole messages, and deflate decoding to exactly the declared size."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from pyro_bc.bcz.binary import BadData, Reader, check_inflated, inflate, svarint, uvarint, uvarints

# value, its LEB128 bytes (7 bits a byte, low group first, high bit on all but the last)
_UVARINTS = [(0, b"\x00"), (1, b"\x01"), (127, b"\x7f"), (128, b"\x80\x01"), (300, b"\xac\x02"),
             (2**14, b"\x80\x80\x01"), (2**63 - 1, b"\xff" * 8 + b"\x7f"), (2**64 - 1, b"\xff" * 9 + b"\x01")]
# zig-zag: 0, -1, 1, -2, ... -> 0, 1, 2, 3, ...
_SVARINTS = [(0, b"\x00"), (-1, b"\x01"), (1, b"\x02"), (-2, b"\x03"), (63, b"\x7e"), (-64, b"\x7f"),
             (64, b"\x80\x01"), (-65, b"\x81\x01")]


def _bad(call) -> str:
    with pytest.raises(BadData) as info:
        call()
    return str(info.value)


def test_varints_are_the_bytes_worked_out_by_hand() -> None:
    for value, data in _UVARINTS:
        assert uvarint(value) == data
        reader = Reader(data)
        assert reader.uvarint("v") == value and reader.left == 0
    assert uvarints(np.array([v for v, _ in _UVARINTS], dtype=np.uint64)) == b"".join(d for _, d in _UVARINTS)
    assert uvarints(np.array([2**63], dtype=np.uint64)) == b"\x80" * 9 + b"\x01"  # 63 zero bits, then a 1
    assert uvarints(np.zeros(0, dtype=np.uint64)) == b""
    for value, data in _SVARINTS:
        assert svarint(value) == data
        assert Reader(data).svarint("s", -65, 64) == value
    assert _bad(lambda: uvarint(-1)) == "uvarint of negative value -1"


def test_the_cursor_reads_only_its_window() -> None:
    reader = Reader(b"abcdef", 1, 4, "blk")
    assert reader.left == 3 and bytes(reader.take(2, "x")) == b"bc" and reader.left == 1
    assert _bad(lambda: reader.take(2, "y")) == "blk: y needs 2 bytes but only 1 are left"
    assert _bad(reader.done) == "blk: 1 unexpected bytes at the end"
    assert bytes(reader.take(1, "z")) == b"d" and reader.left == 0
    reader.done()
    assert _bad(lambda: Reader(b"").take(1, "t")) == "data: t needs 1 bytes but only 0 are left"


def test_bytes_and_varints_outside_their_ranges_whole_messages() -> None:
    assert Reader(b"\x05").byte("k", 5) == 5 and Reader(b"\xff").byte("k") == 255
    assert _bad(lambda: Reader(b"\x05").byte("k", 4)) == "data: k=5 outside [0, 4]"
    assert _bad(lambda: Reader(b"").byte("k")) == "data: k needs 1 bytes but only 0 are left"
    assert _bad(lambda: Reader(b"\x80").uvarint("n")) == "data: n needs 1 bytes but only 0 are left"
    assert _bad(lambda: Reader(b"").svarint("s", 0, 1)) == "data: s needs 1 bytes but only 0 are left"
    assert Reader(b"\x05").uvarint("n", 5, 5) == 5
    assert _bad(lambda: Reader(b"\x05").uvarint("n", 6, 9)) == "data: n=5 outside [6, 9]"
    assert _bad(lambda: Reader(b"\x05").uvarint("n", 0, 4)) == "data: n=5 outside [0, 4]"
    assert _bad(lambda: Reader(b"\xff" * 9 + b"\x02").uvarint("n")) == \
        f"data: n={2**64 + 2**63 - 1} outside [0, {2**64 - 1}]"  # ten bytes: 63 bits set, then 2 << 63
    assert _bad(lambda: Reader(b"\x80" * 10 + b"\x01").uvarint("n")) == "data: n is a varint longer than 10 bytes"
    assert _bad(lambda: Reader(b"\x80" * 9 + b"\x00").uvarint("n")) == "data: n is not a minimal varint"
    assert _bad(lambda: Reader(b"\x85\x00").uvarint("n")) == "data: n is not a minimal varint"
    assert Reader(b"\x05").svarint("s", -3, -3) == -3 and Reader(b"\x06").svarint("s", 3, 3) == 3
    assert _bad(lambda: Reader(b"\x05").svarint("s", -2, 3)) == "data: s=-3 outside [-2, 3]"
    assert _bad(lambda: Reader(b"\x06").svarint("s", -3, 2)) == "data: s=3 outside [-3, 2]"


def test_vectorised_varints_start_at_the_cursor_and_are_bounded() -> None:
    reader = Reader(b"\xff\x05\xac\x02\x07", 1)  # a byte before the window, then 5, 300 and a byte 7
    empty = reader.uvarints(0, "none", 10)
    assert empty.dtype == np.int64 and empty.size == 0 and reader.pos == 1
    values = reader.uvarints(2, "v", 300)
    assert values.dtype == np.int64 and values.tolist() == [5, 300] and reader.byte("t") == 7
    assert Reader(b"\x00\x00").uvarints(2, "v", 0).tolist() == [0, 0]  # a bound of 0: one-byte varints
    assert Reader(b"\x80\x01").uvarints(1, "v", 128).tolist() == [128]  # 128 needs two bytes
    # a bound below 2**14: two bytes each at most, so 2**14 (three bytes) then 5 fill the four bytes of two
    assert _bad(lambda: Reader(b"\x80\x80\x01\x05").uvarints(2, "v", 2**14 - 1)) == \
        "data: v holds a varint longer than 2 bytes"
    assert _bad(lambda: Reader(b"\x80\x01").uvarints(1, "v", 127)) == \
        "data: v needs 1 varints but the data ends first"  # 128 does not fit the one byte a bound of 127 allows
    assert _bad(lambda: Reader(b"\x05\x06", 0, 1).uvarints(2, "v", 10)) == \
        "data: v needs 2 varints but the data ends first"  # the second lies past the end
    assert _bad(lambda: Reader(b"\x01\x85\x00").uvarints(2, "v", 1000)) == \
        "data: v holds a varint that is not minimal"
    assert _bad(lambda: Reader(b"\x05\x07").uvarints(2, "v", 6)) == "data: v holds a value above 6"
    big = Reader(b"\xff" * 8 + b"\x7f").uvarints(1, "v", 2**63 - 1)
    assert big.tolist() == [2**63 - 1]


def test_check_inflated_whole_messages() -> None:
    assert check_inflated(b"abcd", True, False, 4, "w") == b"abcd"
    assert _bad(lambda: check_inflated(b"abcde", True, False, 4, "w")) == \
        "w decompresses to more than the declared 4 bytes"
    assert _bad(lambda: check_inflated(b"abc", True, False, 4, "w")) == "w is truncated: 3 of 4 bytes"
    assert _bad(lambda: check_inflated(b"abcd", False, False, 4, "w")) == "w is truncated: 4 of 4 bytes"
    assert _bad(lambda: check_inflated(b"abcd", True, True, 4, "w")) == \
        "w has trailing bytes after the compressed stream"


@pytest.mark.parametrize("wbits", [15, -15])
def test_inflate_gives_exactly_the_declared_bytes(wbits: int) -> None:
    def deflate(data: bytes) -> bytes:
        c = zlib.compressobj(wbits=wbits)
        return c.compress(data) + c.flush()

    text = bytes(range(256)) * 3
    assert inflate(deflate(text), len(text), wbits, "w") == text
    assert inflate(memoryview(deflate(text)), len(text), wbits, "w") == text
    assert inflate(deflate(b""), 0, wbits, "w") == b""
    assert _bad(lambda: inflate(deflate(b"a"), 0, wbits, "w")) == "w decompresses to more than the declared 0 bytes"
    assert _bad(lambda: inflate(deflate(b"\0" * 10**6), 10, wbits, "w")) == \
        "w decompresses to more than the declared 10 bytes"
    assert _bad(lambda: inflate(deflate(text), len(text) + 1, wbits, "w")) == \
        f"w is truncated: {len(text)} of {len(text) + 1} bytes"
    assert _bad(lambda: inflate(deflate(text)[:-6], len(text), wbits, "w")).startswith("w is truncated: ")
    for size, data in ((len(text), text), (0, b"")):
        assert _bad(lambda size=size, data=data: inflate(deflate(data) + b"z", size, wbits, "w")) == \
            "w has trailing bytes after the compressed stream"
    with pytest.raises(zlib.error) as expected:
        zlib.decompress(b"\xff\xff\xff", wbits)
    assert _bad(lambda: inflate(b"\xff\xff\xff", 4, wbits, "w")) == f"w decompression failed: {expected.value}"


@pytest.mark.parametrize("size", [0, 10])
def test_inflate_never_produces_more_than_one_byte_past_the_declared_size(monkeypatch, size: int) -> None:
    """A deflate bomb (a megabyte of zeros in about a kilobyte) is stopped at ``size`` + 1 bytes, not inflated whole:
    a spy on the decompressor adds up what each call gives back."""
    real, produced = zlib.decompressobj, []

    class Spy:
        def __init__(self, wbits: int) -> None:
            self.dec = real(wbits)

        def decompress(self, data, max_length: int = 0) -> bytes:
            out = self.dec.decompress(data, max_length)
            produced.append(len(out))
            return out

        def __getattr__(self, name: str):
            return getattr(self.dec, name)

    monkeypatch.setattr(zlib, "decompressobj", Spy)
    bomb = zlib.compress(b"\0" * 10**6)
    assert _bad(lambda: inflate(bomb, size, 15, "w")) == f"w decompresses to more than the declared {size} bytes"
    assert sum(produced) == size + 1
