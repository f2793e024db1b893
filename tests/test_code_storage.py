"""The three storages of a code array (pyro_bc.bcz.code_storage) and the varints under them (pyro_bc.bcz.binary):
decoding gives back every code bit for bit, and a block is refused unless it is exactly one valid block."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyro_bc.bcz.binary import BadData, Reader, svarint, uvarint, uvarints
from pyro_bc.bcz.code_storage import (
    CODED,
    PACKED,
    SPARSE,
    STORAGES,
    _estimated_bits,
    _quantized_counts,
    code_bits,
    decode_codes,
    encode_as,
    encode_codes,
    pack_codes,
    unpack_codes,
)

INT64 = (-(2**63), 2**63 - 1)


@st.composite
def code_arrays(draw: st.DrawFn) -> np.ndarray:
    """Code arrays as layers have them: Gaussian-ish, sparse, constant, or anywhere in int64."""
    count = draw(st.integers(1, 400))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shape = draw(st.sampled_from(["gauss", "sparse", "constant", "wide"]))
    if shape == "gauss":
        codes = np.rint(rng.normal(0, draw(st.floats(0.1, 3000)), count)).astype(np.int64)
    elif shape == "sparse":
        codes = np.where(rng.random(count) < draw(st.floats(0, 0.3)), rng.integers(-40, 40, count), 0)
    elif shape == "constant":
        codes = np.full(count, draw(st.integers(*INT64)), dtype=np.int64)
    else:
        codes = rng.integers(*INT64, size=count, endpoint=True, dtype=np.int64)
    extremes = draw(st.lists(st.sampled_from(INT64), max_size=2))
    codes[: min(count, len(extremes))] = extremes[:count]
    return codes.astype(np.int64)


@settings(max_examples=150, deadline=None)
@given(codes=code_arrays())
def test_every_storage_decodes_bit_for_bit(codes: np.ndarray) -> None:
    for storage in (PACKED, CODED, SPARSE):
        block = encode_as(storage, codes)
        if block is None:  # coded: an alphabet wider than MAX_SYMBOLS
            assert storage == CODED and int(codes.max()) - int(codes.min()) >= 2**16 - 1
            continue
        back = decode_codes(storage, Reader(block), codes.size)
        assert back.dtype == np.int64 and np.array_equal(back, codes), STORAGES[storage]
    storage, block = encode_codes(codes)
    assert len(block) == min(len(b) for s in (PACKED, CODED, SPARSE) if (b := encode_as(s, codes)) is not None)


def test_coded_beats_packed_on_peaked_codes() -> None:
    codes = np.rint(np.random.default_rng(0).laplace(0, 2, 5000)).astype(np.int64)
    assert encode_codes(codes)[0] == CODED
    assert len(encode_as(CODED, codes)) < 0.75 * len(encode_as(PACKED, codes))


@settings(max_examples=60, deadline=None)
@given(codes=code_arrays(), cut=st.integers(1, 8))
def test_a_shortened_or_lengthened_block_is_refused(codes: np.ndarray, cut: int) -> None:
    """Blocks are exact: a missing or extra byte is BadData (or, for a coded stream, other codes), never
    another exception."""
    for storage in (PACKED, CODED, SPARSE):
        block = encode_as(storage, codes)
        if block is None:
            continue
        for broken in (block[: max(0, len(block) - cut)], block + b"\x01" * cut):
            try:
                back = decode_codes(storage, Reader(broken), codes.size)
            except BadData:
                continue
            assert storage in (CODED, SPARSE) and not np.array_equal(back, codes)


@given(values=st.lists(st.integers(0, 2**63 - 1), max_size=50), signed=st.integers(*INT64))
def test_varints_round_trip(values: list[int], signed: int) -> None:
    data = uvarints(np.array(values, dtype=np.uint64)) + svarint(signed)
    assert data[: len(data) - len(svarint(signed))] == b"".join(uvarint(v) for v in values)
    reader = Reader(data)
    assert reader.uvarints(len(values), "values", 2**63 - 1).tolist() == values
    assert reader.svarint("signed", *INT64) == signed
    reader.done()


def test_varint_limits() -> None:
    with pytest.raises(BadData, match="not a minimal"):
        Reader(b"\x80\x00").uvarint("x")
    with pytest.raises(BadData, match="longer than"):
        Reader(b"\xff" * 11).uvarint("x")
    with pytest.raises(BadData, match="outside"):
        Reader(uvarint(300)).uvarint("x", 0, 299)
    with pytest.raises(BadData, match="only 0"):
        Reader(b"\x80").uvarint("x")
    with pytest.raises(BadData, match="not minimal"):
        Reader(b"\x01\x80\x00").uvarints(2, "x", 1000)
    with pytest.raises(BadData, match="above"):
        Reader(uvarints(np.array([5, 7]))).uvarints(2, "x", 6)


# ------------------------------------------------------------------------ blocks worked out by hand (FORMAT.md)
def test_packed_blocks_are_the_bits_worked_out_by_hand() -> None:
    # -4..1 needs 3 bits: 001 111 000 100, padded with zeros to 0011 1100 0100 0000
    assert encode_as(PACKED, np.array([1, -1, 0, -4])) == b"\x03\x3c\x40"
    assert pack_codes(np.array([1, -1, 0, -4], dtype=np.int8), 3) == b"\x3c\x40"  # any integer dtype
    assert unpack_codes(b"\x3c\x40", 3, (2, 2)).tolist() == [[1, -1], [0, -4]]
    assert encode_as(PACKED, np.zeros(3, dtype=np.int64)) == b"\x01\x00"  # zeros take one bit
    assert code_bits(np.zeros(0, dtype=np.int64)) == 1


def test_sparse_blocks_and_the_choice_of_their_values_storage() -> None:
    # ten 5s after a 0: positions 1..10 (gaps 1, 0 x 9); coded (min 5 = svarint 0a, one symbol, count 10) is
    # 3 bytes against packed's 1 + 5, so the values are coded
    codes = np.array([0] + [5] * 10)
    assert encode_as(SPARSE, codes) == b"\x0a\x01" + b"\x00" * 9 + bytes([CODED]) + b"\x0a\x01\x0a"
    # three 7s: coded (0e 01 03) and packed (4 bits: 04 77 70) are both 3 bytes; a tie is packed
    sevens = np.array([7, 7, 7])
    assert encode_as(SPARSE, sevens) == b"\x03\x00\x00\x00" + bytes([PACKED]) + b"\x04\x77\x70"
    assert encode_as(CODED, sevens) == b"\x0e\x01\x03"
    assert encode_codes(sevens) == (PACKED, b"\x04\x77\x70")
    back = decode_codes(CODED, Reader(b"\x03\x01\x03"), 3)  # min -2, one symbol
    assert back.dtype == np.int64 and back.tolist() == [-2, -2, -2]


def test_a_coded_block_is_the_constriction_stream_the_format_specifies() -> None:
    import constriction

    codes = np.array([-1, 0, 0, 1, 0])  # symbols 0 1 1 2 1; counts 1 3 1 are already the best model
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(np.array([0, 1, 1, 2, 1], dtype=np.int32),
                         constriction.stream.model.Categorical(np.array([1.0, 3.0, 1.0]), perfect=False))
    stream = coder.get_compressed().astype("<u4").tobytes().rstrip(b"\0")
    assert encode_as(CODED, codes) == svarint(-1) + uvarint(3) + bytes([1, 3, 1]) + stream
    int8 = np.array([-128, 127, 127], dtype=np.int8)  # codes of a narrow dtype are widened before min is taken
    assert decode_codes(CODED, Reader(encode_as(CODED, int8)), 3).tolist() == [-128, 127, 127]


def test_a_coded_stream_ending_in_the_byte_x_keeps_it() -> None:
    rng = np.random.default_rng(0)
    for _ in range(5000):  # a stream ending in 0x58 ("X"), which only zero bytes may be stripped from
        codes = rng.integers(-3, 4, 40)
        block = encode_as(CODED, codes)
        if block[-1:] == b"X":
            break
    assert block[-1:] == b"X"
    assert decode_codes(CODED, Reader(block), codes.size).tolist() == codes.tolist()


def test_the_coded_alphabet_is_at_most_two_to_the_sixteen() -> None:
    widest = np.array([0, 2**16 - 1])
    assert decode_codes(CODED, Reader(encode_as(CODED, widest)), 2).tolist() == [0, 2**16 - 1]
    assert encode_as(CODED, np.array([0, 2**16])) is None


def test_the_model_counts_are_rounded_and_their_cost_is_the_cross_entropy() -> None:
    counts = np.array([0, 1, 2, 3, 5, 6, 100])
    assert _quantized_counts(counts, 0).tolist() == counts.tolist()
    # divided by 4 and rounded half up; a symbol that occurs keeps at least 1
    assert _quantized_counts(counts, 2).tolist() == [0, 1, 1, 1, 1, 2, 25]
    # 3 symbols at 2/3 and 1 at 1/3 (the third never occurs), plus 3 one-byte counts
    expected = 3 * np.log2(3 / 2) + np.log2(3) + 8 * 3
    assert _estimated_bits(np.array([3, 1, 0]), np.array([2, 1, 0])) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("storage, block, count, message", [
    (PACKED, b"\x41", 1, "packed code bits=65 outside [0, 64]"),
    (PACKED, b"\x00", 1, "packed code bits 0"),
    (PACKED, b"\x03\x3c", 4, "1 packed bytes for 4 codes of 3 bits (expected 2)"),
    (CODED, b"", 1, "coded min code needs 1 bytes but only 0 are left"),
    (CODED, svarint(0) + uvarint(2**16 + 1), 1, "coded alphabet size=65537 outside [1, 65536]"),
    (CODED, svarint(2**63 - 1) + uvarint(2), 1, "coded alphabet size=2 outside [1, 1]"),
    (CODED, svarint(0) + uvarint(2) + b"\x01", 1, "coded counts needs 2 varints but the data ends first"),
    (CODED, svarint(0) + uvarint(2) + b"\x00\x00", 1, "coded counts are all zero"),
    (CODED, svarint(0) + uvarint(1) + uvarint(3) + b"\x07", 3, "a one-symbol coded block has 1 stream bytes"),
    (CODED, svarint(0) + uvarint(2) + b"\x01\x01\x05\x06\x00", 3, "coded stream ends in a zero byte"),
    (CODED, encode_as(CODED, np.array([-1, 0, 0, 1, 0])), 4, "coded stream holds more than 4 codes"),
    (SPARSE, b"", 3, "sparse count needs 1 bytes but only 0 are left"),
    (SPARSE, uvarint(4), 3, "sparse count=4 outside [0, 3]"),
    (SPARSE, uvarint(2) + b"\x00", 3, "sparse gaps needs 2 varints but the data ends first"),
    (SPARSE, uvarint(1) + uvarint(3), 3, "sparse position 3 outside 3 codes"),
    (SPARSE, uvarint(3) + bytes([0, 0, 5]), 5, "sparse position 7 outside 5 codes"),
    (SPARSE, uvarint(1) + b"\x00", 3, "sparse value storage needs 1 bytes but only 0 are left"),
    (SPARSE, uvarint(1) + b"\x00\x02", 3, "sparse value storage=2 outside [0, 1]"),
], ids=["bits-65", "bits-0", "packed-length", "no-min", "alphabet", "alphabet-at-max", "counts", "zero-counts",
        "one-symbol", "zero-end", "more-codes", "no-count", "count", "gaps", "position", "last-position",
        "no-storage", "storage"])
def test_bad_blocks_whole_messages(storage: int, block: bytes, count: int, message: str) -> None:
    with pytest.raises(BadData) as info:
        decode_codes(storage, Reader(block), count)
    assert str(info.value) == f"data: {message}"
