"""The ``.bcz`` compressed-model format: write, read and recode a pruned, quantized network, and load it back
(its torch modules: :mod:`pyro_bc.bcz.modules`).

Writers write version 2 (:mod:`pyro_bc.bcz.v2`), or version 3 (:mod:`pyro_bc.bcz.v3`: version 2 plus the posterior
variances) for a model that keeps variances; version 1 files (:mod:`pyro_bc.bcz.v1`) are still read. The
byte layouts are specified in ``docs/FORMAT.md``. Every problem with a file (unreadable, truncated, corrupt,
inconsistent, unknown version) raises :class:`pyro_bc.errors.FormatError` with a one-line message that names
the path.
"""

from __future__ import annotations

import dataclasses
import os
import struct

import numpy as np
from torch import nn

from pyro_bc.atomic import atomic_write_bytes
from pyro_bc.bcz import v1 as bcz_v1
from pyro_bc.bcz import v2 as bcz_v2
from pyro_bc.bcz import v3 as bcz_v3
from pyro_bc.bcz.bayesian import to_bayesian_module
from pyro_bc.bcz.binary import BadData
from pyro_bc.bcz.model import (
    DETERMINISTIC,
    MAGIC,
    CompressedModel,
    FloatLayer,
    NormLayer,
    Op,
    ProgramNode,
    QuantizedLayer,
    float16_exact,
)
from pyro_bc.bcz.modules import to_module
from pyro_bc.errors import FormatError

__all__ = [
    "VERSION",
    "CompressedModel",
    "FloatLayer",
    "NormLayer",
    "Op",
    "ProgramNode",
    "QuantizedLayer",
    "decode",
    "encode",
    "float16_exact",
    "half_deterministic",
    "load",
    "read_bcz",
    "recode",
    "round_biases",
    "write_bcz",
]

VERSION = bcz_v2.VERSION  # the version writers write (bcz_v3.VERSION for a model with variances)
READERS = {1: bcz_v1.decode, 2: bcz_v2.decode, 3: bcz_v3.decode}
BIAS_ROUNDING = ("float32", "float16", "fixed")
_MAGIC_VERSION = struct.Struct("<4sH")


def encode(model: CompressedModel) -> bytes:
    """The complete ``.bcz`` bytes of ``model`` in the newest version, 3 where it keeps variances (BadData if it
    cannot be stored)."""
    return bcz_v2.encode(model) if model.variances is None else bcz_v3.encode(model)


def _check_magic(magic: bytes) -> None:
    if magic != MAGIC:
        raise BadData(f"bad magic {magic!r} (expected {MAGIC!r}): not a .bcz file")


def decode(data: bytes) -> CompressedModel:
    """Parse complete ``.bcz`` bytes of any supported version (BadData on any problem)."""
    if len(data) < bcz_v2.MIN_SIZE:
        raise BadData(f"file too short ({len(data)} bytes; a .bcz file has at least {bcz_v2.MIN_SIZE})")
    magic, version = _MAGIC_VERSION.unpack_from(data)
    _check_magic(magic)
    if version not in READERS:
        raise BadData(f"unsupported .bcz version {version} (this reader supports {sorted(READERS)})")
    return READERS[version](data)


def write_bcz(path: str | os.PathLike[str], model: CompressedModel) -> int:
    """Atomically write ``model`` to ``path`` (newest version); returns the number of bytes written."""
    path = os.fspath(path)
    try:
        data = encode(model)
        atomic_write_bytes(path, data)
    except BadData as exc:
        raise FormatError(f"{path}: cannot write: {exc}") from None
    except OSError as exc:
        raise FormatError(f"{path}: cannot write: {exc.strerror or exc}") from exc
    return len(data)


def read_bcz(path: str | os.PathLike[str]) -> CompressedModel:
    """Read and fully validate a ``.bcz`` file."""
    path = os.fspath(path)
    if os.path.isdir(path):
        run = os.path.isfile(os.path.join(path, "checkpoint.pt"))
        raise FormatError(f"{path}: a folder, not a .bcz file" + (" (a run directory: compress it into a .bcz first)"
                                                                  if run else ""))
    try:
        with open(path, "rb") as handle:
            data = handle.read(len(MAGIC))
            if len(data) == len(MAGIC):  # another kind of file is refused before it is read whole
                try:
                    _check_magic(data)
                except BadData as exc:
                    raise FormatError(f"{path}: {exc}") from None
            data += handle.read()
    except OSError as exc:
        raise FormatError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        return decode(data)
    except BadData as exc:
        raise FormatError(f"{path}: {exc}") from None


def round_biases(model: CompressedModel, rounding: str) -> CompressedModel:
    """``model`` with every bias rounded: ``float32`` (unchanged), ``float16`` (to the nearest half-precision
    value) or ``fixed`` (to the layer's weight grid, a multiple of 2**-frac_bits). The writer then stores
    each bias in the smallest form that keeps it exactly."""
    if rounding not in BIAS_ROUNDING:
        raise ValueError(f"unknown bias rounding {rounding!r}: choose {', '.join(BIAS_ROUNDING)}")
    items = []
    for item in model.items:
        if isinstance(item, QuantizedLayer) and item.bias is not None and rounding != "float32":
            bias = np.asarray(item.bias, dtype=np.float32)
            if rounding == "float16":
                bias = bias.astype(np.float16).astype(np.float32)
            else:
                step = 2.0 ** -item.frac_bits
                bias = (np.rint(bias.astype(np.float64) / step) * step).astype(np.float32)
            item = QuantizedLayer(item.kind, item.name, item.weight_codes, item.frac_bits, bias, item.stride,
                                  item.padding, item.dilation, item.groups, item.inputs)
        items.append(item)
    return dataclasses.replace(model, items=items)


def _half(values: np.ndarray | None) -> np.ndarray | None:
    """float32 values rounded to the nearest float16 values; unchanged where one would leave float16's range."""
    if values is None:
        return None
    with np.errstate(over="ignore"):
        half = np.asarray(values, dtype=np.float32).astype(np.float16).astype(np.float32)
    return half if np.array_equal(np.isfinite(half), np.isfinite(values)) else values


def _half_node(item: FloatLayer | NormLayer | ProgramNode) -> FloatLayer | NormLayer | ProgramNode:
    """A deterministic node with its float tensors (a program's float constants) rounded by :func:`_half`."""
    if isinstance(item, ProgramNode):
        constants = [_half(c) if c.dtype == np.float32 else c for c in item.program.constants]
        return dataclasses.replace(item, program=dataclasses.replace(item.program, constants=constants))
    return dataclasses.replace(item, weight=_half(item.weight), bias=_half(item.bias))


def half_deterministic(model: CompressedModel) -> CompressedModel:
    """``model`` with the tensors of its deterministic nodes (:class:`FloatLayer`, :class:`NormLayer`, a
    :class:`ProgramNode`'s float constants) rounded to
    the nearest float16 values, which the writer then stores at float16 (a tensor with a value beyond float16's
    range stays as it is, at float32). Quantized layers are unchanged."""
    items = [_half_node(item) if isinstance(item, DETERMINISTIC) else item for item in model.items]
    return dataclasses.replace(model, items=items)


def recode(old: str | os.PathLike[str], new: str | os.PathLike[str], bias: str = "float32") -> int:
    """Rewrite the ``.bcz`` file ``old`` as ``new`` in the newest version with the same codes (biases rounded
    as :func:`round_biases` says; ``float32`` keeps them); atomic; returns the bytes written."""
    return write_bcz(new, round_biases(read_bcz(old), bias))


def load(path: str | os.PathLike[str], bayesian: bool = False) -> nn.Module:
    """Read a ``.bcz`` file and rebuild its torch module: the deterministic network, or with ``bayesian`` the
    compressed Bayesian network, whose forward draws once per call (a file written with ``keep_variance``;
    FormatError for any other)."""
    model = read_bcz(path)
    if not bayesian:
        return to_module(model)
    if model.variances is None:
        raise FormatError(f"{os.fspath(path)}: keeps no posterior variances, so it has no Bayesian network (write it "
                          "with pyro-bc compress --keep-variance)")
    return to_bayesian_module(model)
