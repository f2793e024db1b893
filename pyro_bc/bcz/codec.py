"""The ``.bcz`` compressed-model format: write, read, recode and rebuild a pruned, quantized network.

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
import torch
from torch import nn

from pyro_bc.atomic import atomic_write_bytes
from pyro_bc.bcz import v1 as bcz_v1
from pyro_bc.bcz import v2 as bcz_v2
from pyro_bc.bcz import v3 as bcz_v3
from pyro_bc.bcz.binary import BadData
from pyro_bc.bcz.model import (
    DETERMINISTIC,
    MAGIC,
    CompressedModel,
    FloatLayer,
    NormLayer,
    Op,
    QuantizedLayer,
    float16_exact,
    is_chain,
    sources,
)
from pyro_bc.errors import FormatError
from pyro_bc.nn.kinds import KIND
from pyro_bc.nn.ops import ELEMENTWISE_KINDS, Mul, SpatialMean, elementwise_module

__all__ = [
    "VERSION",
    "CompressedModel",
    "FloatLayer",
    "NormLayer",
    "Op",
    "QuantizedLayer",
    "decode",
    "encode",
    "float16_exact",
    "half_deterministic",
    "load",
    "read_bcz",
    "recode",
    "round_biases",
    "to_module",
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


def decode(data: bytes) -> CompressedModel:
    """Parse complete ``.bcz`` bytes of any supported version (BadData on any problem)."""
    if len(data) < bcz_v2.MIN_SIZE:
        raise BadData(f"file too short ({len(data)} bytes; a .bcz file has at least {bcz_v2.MIN_SIZE})")
    magic, version = _MAGIC_VERSION.unpack_from(data)
    if magic != MAGIC:
        raise BadData(f"bad magic {magic!r} (expected {MAGIC!r}): not a .bcz file")
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
    try:
        with open(path, "rb") as handle:
            data = handle.read()
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
    return CompressedModel(items, model.input_shape, model.metadata, model.variances)


def _half(values: np.ndarray | None) -> np.ndarray | None:
    """float32 values rounded to the nearest float16 values; unchanged where one would leave float16's range."""
    if values is None:
        return None
    with np.errstate(over="ignore"):
        half = np.asarray(values, dtype=np.float32).astype(np.float16).astype(np.float32)
    return half if np.array_equal(np.isfinite(half), np.isfinite(values)) else values


def half_deterministic(model: CompressedModel) -> CompressedModel:
    """``model`` with the tensors of its deterministic nodes (:class:`FloatLayer`, :class:`NormLayer`) rounded to
    the nearest float16 values, which the writer then stores at float16 (a tensor with a value beyond float16's
    range stays as it is, at float32). Quantized layers are unchanged."""
    items = [dataclasses.replace(item, weight=_half(item.weight), bias=_half(item.bias))
             if isinstance(item, DETERMINISTIC) else item for item in model.items]
    return CompressedModel(items, model.input_shape, model.metadata, model.variances)


def recode(old: str | os.PathLike[str], new: str | os.PathLike[str], bias: str = "float32") -> int:
    """Rewrite the ``.bcz`` file ``old`` as ``new`` in the newest version with the same codes (biases rounded
    as :func:`round_biases` says; ``float32`` keeps them); atomic; returns the bytes written."""
    return write_bcz(new, round_biases(read_bcz(old), bias))


# ---------------------------------------------------------------- torch


class Select(nn.Module):
    """Keep the given features (or channels) along dim 1: the inputs a pruned layer still reads."""

    def __init__(self, index: list[int]):
        super().__init__()
        self.register_buffer("index", torch.tensor(index, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(1, self.index)


class Add(nn.Module):
    """The elementwise sum of its inputs."""

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        out = xs[0]
        for x in xs[1:]:
            out = out + x
        return out


class Cat(nn.Module):
    """Its inputs concatenated along dim 1 (features or channels)."""

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return torch.cat(xs, dim=1)


class Graph(nn.Module):
    """Runs its nodes in order; node ``i`` reads the outputs named by ``inputs[i]`` (-1: the network input)
    and the last node's output is the result."""

    def __init__(self, nodes: list[nn.Module], inputs: list[tuple[int, ...]]):
        super().__init__()
        self.nodes = nn.ModuleList(nodes)
        self.inputs = inputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs: list[torch.Tensor] = []
        for node, wanted in zip(self.nodes, self.inputs):
            outputs.append(node(*(x if source < 0 else outputs[source] for source in wanted)))
        return outputs[-1] if outputs else x


def _layer_module(layer: QuantizedLayer) -> nn.Module:
    """The plain layer of the layer's kind with its (pruned) shape, weights and bias; no random init."""
    kind = KIND[layer.kind]
    has_bias = layer.bias is not None
    module = kind.module(tuple(layer.weight_codes.shape), has_bias, *kind.from_pairs(
        layer.stride, layer.padding, layer.dilation), layer.groups)
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(layer.weight()))
        if has_bias:
            module.bias.copy_(torch.from_numpy(np.asarray(layer.bias, dtype=np.float32)))
    return module


def _float_layer_module(layer: FloatLayer) -> nn.Module:
    """The plain layer of a float layer's kind, with its weight and bias."""
    kind = KIND[layer.kind]
    module = kind.module(tuple(layer.weight.shape), layer.bias is not None, *kind.from_pairs(
        layer.stride, layer.padding, layer.dilation), layer.groups)
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(layer.weight))
        if layer.bias is not None:
            module.bias.copy_(torch.from_numpy(layer.bias))
    return module


def _norm_module(norm: NormLayer) -> nn.Module:
    """``nn.LayerNorm`` with the node's shape, eps, weight and bias."""
    module = nn.LayerNorm(norm.normalized_shape, norm.eps, elementwise_affine=norm.weight is not None,
                          bias=norm.bias is not None)
    with torch.no_grad():
        for param, values in ((module.weight, norm.weight), (module.bias, norm.bias)):
            if values is not None:
                param.copy_(torch.from_numpy(values))
    return module.eval()


def node_module(item: QuantizedLayer | FloatLayer | NormLayer | Op) -> nn.Module:
    """The torch module of one node of a compressed model."""
    if isinstance(item, QuantizedLayer):
        return _layer_module(item)
    if isinstance(item, FloatLayer):
        return _float_layer_module(item)
    if isinstance(item, NormLayer):
        return _norm_module(item)
    return _op_module(item)


def _op_module(op: Op) -> nn.Module:
    """The torch module of a parameter-free op."""
    simple = {"add": Add, "cat": Cat, "mul": Mul, "spatial_mean": SpatialMean}
    if op.kind in simple:
        return simple[op.kind]()
    if op.kind in ELEMENTWISE_KINDS:
        return elementwise_module(op.kind)
    if op.kind == "flatten":
        return nn.Flatten(start_dim=op.params["start_dim"])
    if op.kind in ("select", "gather"):
        return Select(op.params["index"])
    if op.kind == "adaptive_avgpool2d":
        return nn.AdaptiveAvgPool2d(op.params["output_size"])
    pool = nn.AvgPool2d if op.kind == "avgpool2d" else nn.MaxPool2d
    ceil = {"ceil_mode": True} if op.kind == "maxpool2d_ceil" else {}
    return pool(kernel_size=op.params["kernel_size"], stride=op.params["stride"], padding=op.params["padding"], **ceil)


def to_module(model: CompressedModel) -> nn.Module:
    """A plain float32 module in eval mode computing the compressed network: an ``nn.Sequential`` for a chain,
    else a :class:`Graph`."""
    modules = [node_module(i) for i in model.items]
    if is_chain(model):
        return nn.Sequential(*modules).eval()
    return Graph(modules, sources(model)).eval()


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
    from pyro_bc.bcz.bayesian import to_bayesian_module

    return to_bayesian_module(model)
