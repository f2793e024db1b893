"""Version 3 of the .bcz format (pyro_bc.bcz.v3) on a one-layer model: the variance section against bytes worked
out by hand from docs/FORMAT.md, its bounds, and whole messages for each field a reader refuses. The version-2
part and the code blocks are their modules' (tested in test_codec.py and test_code_storage.py)."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from pyro_bc.bcz import v2 as bcz_v2
from pyro_bc.bcz import v3
from pyro_bc.bcz.binary import BadData, svarint, uvarint
from pyro_bc.bcz.code_storage import PACKED, SPARSE, encode_as
from pyro_bc.bcz.model import CompressedModel, LayerVariance, QuantizedLayer, Variances

_CODES = np.array([[1, 0, 2, 0, 0, 0], [0, 0, -1, 0, 0, 0]])  # 12 weights, 3 non-zero, 6 groups (inputs)


def _model(variances: Variances | None = None, codes: np.ndarray = _CODES) -> CompressedModel:
    return CompressedModel([QuantizedLayer("linear", "fc", codes.copy(), 3, None)], (codes.shape[1],), {}, variances)


def _file(section: bytes, codes: np.ndarray = _CODES) -> bytes:
    """Version-2 bytes with version 3, the section and its length before a new checksum (FORMAT.md)."""
    two = bcz_v2.encode(_model(None, codes))
    body = two[:4] + struct.pack("<H", 3) + two[6:-4] + section + struct.pack("<I", len(section))
    return body + struct.pack("<I", zlib.crc32(body))


def _packed(codes) -> bytes:
    """A section block of packed codes: storage 0, length, block."""
    block = encode_as(PACKED, np.array(codes))
    return bytes([PACKED]) + uvarint(len(block)) + block


def _bad(call) -> str:
    with pytest.raises(BadData) as info:
        call()
    return str(info.value)


# weight log-variances -3 -5 -4 need 4 bits: 1101 1011 1100 (pad 0000); scales -1 -2 -3 -1 -2 -3 need 3 bits:
# 11111010 11111101 01 (pad 000000)
_SECTION = (svarint(2) + b"\x01" + b"\x00" + uvarint(3) + b"\x04\xdb\xc0"
            + b"\x00" + uvarint(4) + b"\x03\xfa\xfd\x40")


def test_the_variance_section_is_the_bytes_worked_out_by_hand() -> None:
    model = _model(Variances(2, [LayerVariance(np.array([-3, -5, -4]), np.array([-1, -2, -3] * 2), False)]))
    assert v3.encode(model) == _file(_SECTION)
    back = v3.decode(_file(_SECTION)).variances
    assert back.step_bits == 2 and len(back.layers) == 1
    layer = back.layers[0]
    assert layer.weight_codes.tolist() == [-3, -5, -4] and layer.scale_codes.tolist() == [-1, -2, -3] * 2
    assert layer.every_weight is False


@pytest.mark.parametrize("step_bits", [-4, 16])
def test_every_weight_sparse_blocks_and_the_ends_of_the_step_range(step_bits: int) -> None:
    weight = np.zeros(12, dtype=np.int64)
    weight[7] = -8  # one non-zero log-variance of 12: sparse is the smallest storage
    model = _model(Variances(step_bits, [LayerVariance(weight, None, True)]))
    data = v3.encode(model)
    section = svarint(step_bits) + b"\x02" + bytes([SPARSE])  # flags: every weight, no scales
    assert section in data
    back = v3.decode(data).variances
    assert back.step_bits == step_bits and back.layers[0].weight_codes.tolist() == weight.tolist()
    assert back.layers[0].every_weight is True and back.layers[0].scale_codes is None


def test_a_layer_without_non_zero_weights_has_an_empty_block() -> None:
    zero = np.zeros((2, 6), dtype=np.int64)
    model = _model(Variances(2, [LayerVariance(np.zeros(0, dtype=np.int64), None, False)]), zero)
    section = svarint(2) + b"\x00" + b"\x00\x00"  # flags 0; storage 0, length 0
    assert v3.encode(model) == _file(section, zero)
    weight = v3.decode(_file(section, zero)).variances.layers[0].weight_codes
    assert weight.dtype == np.int64 and weight.shape == (0,)
    assert _bad(lambda: v3.decode(_file(svarint(2) + b"\x00\x00\x01\x07", zero))) == \
        "layer 'fc' weight log-variances: 1 bytes for no codes"
    one = np.zeros((2, 6), dtype=np.int64)
    one[1, 5] = 4
    section = svarint(2) + b"\x00" + _packed([-6])
    assert v3.decode(_file(section, one)).variances.layers[0].weight_codes.tolist() == [-6]


def test_the_writer_refuses_whole_messages() -> None:
    def message(variances: Variances) -> str:
        return _bad(lambda: v3.encode(_model(variances)))

    assert message(Variances(17, [LayerVariance(np.zeros(12), None, True)])) == "variance step_bits 17 outside (-4, 16)"
    assert message(Variances(-5, [LayerVariance(np.zeros(12), None, True)])) == "variance step_bits -5 outside (-4, 16)"
    assert message(Variances(2, [])) == "0 layer variances for 1 layers"
    assert message(Variances(2, [LayerVariance(np.zeros(11), None, True)])) == \
        "layer 'fc': 11 weight log-variances for 12 weights"
    assert message(Variances(2, [LayerVariance(np.zeros(2), None, False)])) == \
        "layer 'fc': 2 weight log-variances for 3 non-zero weights"
    assert message(Variances(0, [LayerVariance(np.array([0, 129, 0]), None, False)])) == \
        "layer 'fc': a log-variance beyond ±128 nats"
    assert message(Variances(0, [LayerVariance(np.zeros(3), np.array([0, 0, -129, 0, 0, 0]), False)])) == \
        "layer 'fc': a log-variance beyond ±128 nats"


def test_the_reader_refuses_whole_messages() -> None:
    weight = _packed([-3, -5, -4])

    def message(section: bytes) -> str:
        return _bad(lambda: v3.decode(_file(section)))

    assert message(svarint(17)) == "variance section: step_bits=17 outside [-4, 16]"
    assert message(svarint(2) + b"\x04") == "variance section: layer 'fc' variance flags=4 outside [0, 3]"
    assert message(svarint(2) + b"\x00\x03") == \
        "variance section: layer 'fc' weight log-variances storage=3 outside [0, 2]"
    assert message(svarint(2) + b"\x00\x00") == \
        "variance section: layer 'fc' weight log-variances length needs 1 bytes but only 0 are left"
    assert message(svarint(2) + b"\x00\x00" + uvarint(9) + b"\x04") == \
        "variance section: layer 'fc' weight log-variances length=9 outside [0, 1]"
    # one byte more than is left after the length: the block would have read the section's length field
    assert message(svarint(2) + b"\x00\x00" + uvarint(2) + b"\x04") == \
        "variance section: layer 'fc' weight log-variances length=2 outside [0, 1]"
    assert message(svarint(2) + b"\x00\x00" + uvarint(2) + b"\x04\xdb") == \
        "layer 'fc' weight log-variances: 1 packed bytes for 3 codes of 4 bits (expected 2)"
    assert message(svarint(2) + b"\x01" + weight + b"\x00" + uvarint(1) + b"\x03") == \
        "layer 'fc' group-scale log-variances: 0 packed bytes for 6 codes of 3 bits (expected 3)"
    # step 2**-1: 256 is 128 nats, the most a log-variance may be; 257 is beyond
    assert v3.decode(_file(svarint(1) + b"\x00" + _packed([256, 0, 0]))).variances.layers[0].weight_codes[0] == 256
    assert message(svarint(1) + b"\x00" + _packed([257, 0, 0])) == \
        "variance section: layer 'fc': a log-variance beyond ±128 nats"
    assert message(svarint(1) + b"\x01" + weight + _packed([0, 0, 0, 0, 0, -257])) == \
        "variance section: layer 'fc': a log-variance beyond ±128 nats"


def test_the_file_size_checksum_and_section_length_bounds() -> None:
    assert _bad(lambda: v3.decode(bytes(v3.MIN_SIZE - 1))) == \
        f"file too short ({v3.MIN_SIZE - 1} bytes; a version-3 .bcz file has at least {v3.MIN_SIZE})"
    assert _bad(lambda: v3.decode(bytes(v3.MIN_SIZE))) == "checksum mismatch: file is corrupt"
    body = _file(_SECTION)[:-8]
    end = len(body)  # where the length field starts
    bound = end - bcz_v2.MIN_SIZE + 4  # the longest section the file leaves room for

    def with_length(length: int) -> bytes:
        crafted = body + struct.pack("<I", length)
        return crafted + struct.pack("<I", zlib.crc32(crafted))

    too_long = f"variance section of {bound + 1} bytes is longer than the file allows"
    assert _bad(lambda: v3.decode(with_length(bound + 1))) == too_long
    assert "longer than the file allows" not in _bad(lambda: v3.decode(with_length(bound)))
