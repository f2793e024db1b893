"""The three storages of a code array (pyro_bc.bcz.code_storage) and the varints under them (pyro_bc.bcz.binary):
decoding gives back every code bit for bit, and a block is refused unless it is exactly one valid block."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyro_bc.bcz.binary import BadData, Reader, svarint, uvarint, uvarints
from pyro_bc.bcz.code_storage import CODED, PACKED, SPARSE, STORAGES, decode_codes, encode_as, encode_codes

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
