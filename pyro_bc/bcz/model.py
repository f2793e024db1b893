"""What a ``.bcz`` file holds, independent of its version: quantized layers and parameter-free ops as the
nodes of a graph (each node reads the network input or earlier nodes' outputs), the input shape and metadata.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pyro_bc.bcz.binary import BadData
from pyro_bc.bcz.code_storage import code_bits
from pyro_bc.bcz.program import Program

MAGIC = b"BCZ1"  # every version starts with these four bytes, then its uint16 LE version number
# Every node kind and its byte in a version-2 file, fixed for good: a new kind takes the next free number and no
# number is ever reused or moved (tests/test_codec.py pins them).
WIRE_IDS = {"linear": 0, "conv2d": 1, "relu": 2, "tanh": 3, "sigmoid": 4, "flatten": 5, "maxpool2d": 6,
            "avgpool2d": 7, "select": 8, "add": 9, "cat": 10, "adaptive_avgpool2d": 11, "relu6": 12, "hardswish": 13,
            "silu": 14, "gelu": 15, "hardsigmoid": 16, "mul": 17, "maxpool2d_ceil": 18, "spatial_mean": 19, "conv1d": 20,
            "gather": 21, "layer_norm": 22, "program": 23}
WEIGHT_DIMS = {"linear": 2, "conv1d": 3, "conv2d": 4}  # a layer kind's weight: (out, in) or (out, in / groups, *k)
LAYER_KINDS = tuple(WEIGHT_DIMS)
NORM_KINDS = ("layer_norm",)  # deterministic nodes with float tensors of their own shape
OP_KINDS = tuple(kind for kind in WIRE_IDS if kind not in LAYER_KINDS + NORM_KINDS + ("program",))
POOL_KINDS = ("maxpool2d", "avgpool2d", "maxpool2d_ceil")  # kernel_size, stride, padding
MULTI_INPUT = ("add", "cat", "mul")  # mul: the product of two inputs, the second broadcast (squeeze-excitation)
FRAC_BITS_RANGE = (-64, 64)
MAX_PARAM = 1 << 16  # cap on strides, kernel sizes, groups, ... and on each input_shape entry
MAX_NORM_RANK = 8  # dimensions a layer_norm normalises over
NETWORK_INPUT = -1  # the source index that names the network input
# The integer input types (token ids into an embedding) and their bytes in a version-2 header, fixed for good as
# WIRE_IDS are; a network of floating-point inputs records none (0 is never written).
INPUT_DTYPE_IDS = {"int64": 1, "int32": 2, "int16": 3, "int8": 4, "uint8": 5}

Pair = tuple[int, int]


def pair(value: Any) -> Pair:
    """Normalise an int or a 2-sequence to a 2-tuple of ints."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return (int(value), int(value))
    a, b = value
    return (int(a), int(b))


def _normalise_geometry(layer) -> None:
    """A layer node's stride, padding and dilation as pairs, groups as an int, inputs as a tuple (or None)."""
    layer.stride, layer.padding, layer.dilation = pair(layer.stride), pair(layer.padding), pair(layer.dilation)
    layer.groups = int(layer.groups)
    layer.inputs = _inputs(layer.inputs)


def _inputs(value: Any) -> tuple[int, ...] | None:
    return None if value is None else tuple(int(i) for i in value)


@dataclass
class QuantizedLayer:
    """A pruned, fixed-point layer: weight = weight_codes * 2**-frac_bits.

    ``inputs``: the node it reads (see :class:`CompressedModel`); None reads the previous node.
    """

    kind: str
    name: str
    weight_codes: np.ndarray
    frac_bits: int
    bias: np.ndarray | None = None
    stride: Pair = (1, 1)
    padding: Pair = (0, 0)
    dilation: Pair = (1, 1)
    groups: int = 1
    inputs: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        _normalise_geometry(self)
        self.frac_bits = int(self.frac_bits)

    @property
    def out_features(self) -> int:
        """Number of output units / channels (first weight dimension)."""
        return int(self.weight_codes.shape[0])

    @property
    def code_bits(self) -> int:
        """Packing width: smallest two's-complement width (>= 1) that holds every code."""
        return code_bits(self.weight_codes)

    def weight(self) -> np.ndarray:
        """The float32 weight, ``codes * 2**-frac_bits``."""
        return (np.asarray(self.weight_codes, dtype=np.float64) * 2.0 ** -self.frac_bits).astype(np.float32)


@dataclass
class Op:
    """A parameter-free node: activation, flatten, pooling, select, add (sum of its inputs), mul (product of two,
    broadcast) or cat (along dim 1).

    ``inputs``: the nodes it reads (see :class:`CompressedModel`); None reads the previous node.
    """

    kind: str
    params: dict[str, Any] = field(default_factory=dict)
    inputs: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        params = dict(self.params)
        if self.kind == "flatten":
            params = {"start_dim": int(params.get("start_dim", 1))}
        elif self.kind in POOL_KINDS:
            kernel = pair(params["kernel_size"])
            stride = params.get("stride")
            params = {"kernel_size": kernel, "stride": kernel if stride is None else pair(stride),
                      "padding": pair(params.get("padding", 0))}
        elif self.kind == "adaptive_avgpool2d":
            params = {"output_size": pair(params["output_size"])}
        elif self.kind in ("select", "gather"):
            params = {"index": [int(i) for i in params["index"]]}
        self.params = params
        self.inputs = _inputs(self.inputs)


def float16_exact(values: np.ndarray | None) -> bool:
    """Whether float32 ``values`` are float16 values, each given back bit for bit by a float16 (the writer then
    stores them at float16); True for None."""
    if values is None:
        return True
    b32 = np.ascontiguousarray(values, dtype=np.float32)
    with np.errstate(all="ignore"):
        back = b32.astype(np.float16).astype(np.float32)
    return bool(np.array_equal(back.view(np.uint32), b32.view(np.uint32)))


def _floats(values: Any) -> np.ndarray | None:
    return None if values is None else np.asarray(values, dtype=np.float32)


@dataclass
class FloatLayer:
    """A deterministic layer that is not quantized: a plain linear or convolution of the network, or BatchNorm on
    its own as the depthwise 1x1 convolution it is. ``weight`` and ``bias`` hold float32 values; the writer stores
    each at float16 where that gives them back bit for bit (:func:`float16_exact`), else at float32.

    ``inputs``: as :class:`QuantizedLayer`'s.
    """

    kind: str
    name: str
    weight: np.ndarray
    bias: np.ndarray | None = None
    stride: Pair = (1, 1)
    padding: Pair = (0, 0)
    dilation: Pair = (1, 1)
    groups: int = 1
    inputs: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        self.weight, self.bias = _floats(self.weight), _floats(self.bias)
        _normalise_geometry(self)

    @property
    def out_features(self) -> int:
        """Number of output units / channels (first weight dimension)."""
        return int(self.weight.shape[0])


@dataclass
class NormLayer:
    """``nn.LayerNorm`` over the last ``len(normalized_shape)`` dimensions: deterministic, with its elementwise
    ``weight`` and ``bias`` (float32 values of ``normalized_shape``, None where the module has none; stored as
    :class:`FloatLayer`'s are).

    ``inputs``: as :class:`QuantizedLayer`'s.
    """

    name: str
    normalized_shape: tuple[int, ...]
    eps: float
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    inputs: tuple[int, ...] | None = None

    kind = "layer_norm"

    def __post_init__(self) -> None:
        self.normalized_shape = tuple(int(d) for d in self.normalized_shape)
        self.eps = float(self.eps)
        self.weight, self.bias = _floats(self.weight), _floats(self.bias)
        self.inputs = _inputs(self.inputs)


@dataclass
class ProgramNode:
    """A deterministic computation the other kinds cannot express (an attention, a class token, a reshape that
    mixes channels with positions), as a core-ATen :class:`~pyro_bc.bcz.program.Program` reading one or more
    earlier nodes; its constant tensors are stored as :class:`FloatLayer`'s are.

    ``inputs``: as :class:`QuantizedLayer`'s (their number is the program's ``n_inputs``).
    """

    name: str
    program: Program
    inputs: tuple[int, ...] | None = None

    kind = "program"

    def __post_init__(self) -> None:
        self.inputs = _inputs(self.inputs)


Node = QuantizedLayer | FloatLayer | NormLayer | ProgramNode | Op
DETERMINISTIC = (FloatLayer, NormLayer, ProgramNode)  # the nodes whose tensors are floats, kept as the network had them


@dataclass
class LayerVariance:
    """A quantized layer's posterior variances as integer codes of natural-log values (step: :class:`Variances`).

    ``weight_codes``: the log-variance of each weight given its group scale, in row-major order: one per weight
    where ``every_weight``, else one per non-zero weight code (the zero codes are pruned weights, exactly zero:
    a layer pruned weight by weight). ``scale_codes``: one per group (a linear layer's inputs, a convolution's
    output channels), the log of the group scale's relative variance ``Var[z] / E[z]^2``; None for a layer
    without group scales."""

    weight_codes: np.ndarray
    scale_codes: np.ndarray | None = None
    every_weight: bool = True


@dataclass
class Variances:
    """The posterior variances of every quantized layer of a model, in node order; log-variances are their codes
    times ``2**-step_bits`` nats."""

    step_bits: int
    layers: list[LayerVariance]

    @property
    def step(self) -> float:
        """The quantisation step of the log-variances, in nats."""
        return 2.0 ** -self.step_bits


@dataclass
class CompressedModel:
    """A network of quantized layers and ops, plus free-form JSON metadata.

    ``items`` run in order; item ``i`` reads the outputs of the items named by its ``inputs`` (indices below
    ``i``, or -1 for the network input), or, when ``inputs`` is None, item ``i - 1`` (the network input for
    item 0). The network's output is the last item's (the input itself if there are no items).
    """

    items: list[Node]
    input_shape: tuple[int, ...]
    metadata: dict[str, Any] = field(default_factory=dict)
    variances: Variances | None = None  # the posterior variances (a version-3 file); None: a deterministic network
    input_dtype: str | None = None  # a key of INPUT_DTYPE_IDS where the inputs are integer ids; None: floats


def sources(model: CompressedModel) -> list[tuple[int, ...]]:
    """Each item's input indices, explicit (-1 is the network input); BadData if they are not a valid graph."""
    out = []
    for index, item in enumerate(model.items):
        given = getattr(item, "inputs", None)
        wanted = given if given is not None else (index - 1,)
        kind = getattr(item, "kind", None)
        arity_ok = len(wanted) >= 2 if kind in MULTI_INPUT else len(wanted) == (
            item.program.n_inputs if kind == "program" else 1)
        if not arity_ok:
            raise BadData(f"item {index} ({getattr(item, 'kind', None)}) reads {len(wanted)} inputs")
        if any(not NETWORK_INPUT <= source < index for source in wanted):
            raise BadData(f"item {index} reads {list(wanted)}: inputs must be earlier items or -1")
        out.append(tuple(wanted))
    return out


def is_chain(model: CompressedModel) -> bool:
    """Whether every item reads the previous one (the network runs as an ``nn.Sequential``)."""
    return all(wanted == (index - 1,) for index, wanted in enumerate(sources(model)))


def check_op(op: Op) -> None:
    """BadData unless the op's kind and params are storable."""
    if op.kind not in OP_KINDS:
        raise BadData(f"unknown op kind {op.kind!r}")
    p = op.params
    pool = {"kernel_size", "stride", "padding"}
    expected = {"flatten": {"start_dim"}, "select": {"index"}, "gather": {"index"}, "adaptive_avgpool2d": {"output_size"},
                **dict.fromkeys(POOL_KINDS, pool)}.get(op.kind, set())
    if set(p) != expected:
        raise BadData(f"{op.kind} needs exactly the params {sorted(expected)}")
    if op.kind == "flatten" and not -8 <= p["start_dim"] <= 8:
        raise BadData(f"flatten start_dim {p['start_dim']} outside [-8, 8]")
    if op.kind in POOL_KINDS:
        if not all(1 <= v <= MAX_PARAM for v in p["kernel_size"] + p["stride"]):
            raise BadData(f"{op.kind} kernel_size and stride must be in [1, {MAX_PARAM}]")
        if not all(0 <= pad <= k // 2 for pad, k in zip(p["padding"], p["kernel_size"])):
            raise BadData(f"{op.kind} padding {p['padding']} must be in [0, kernel_size // 2]")
    if op.kind == "adaptive_avgpool2d" and not all(1 <= v <= MAX_PARAM for v in p["output_size"]):
        raise BadData(f"adaptive_avgpool2d output_size must be in [1, {MAX_PARAM}]")
    if op.kind == "gather" and not (p["index"] and all(0 <= i <= MAX_PARAM for i in p["index"])):
        raise BadData(f"gather index must be non-empty and in [0, {MAX_PARAM}]")
    if op.kind == "select":
        index = p["index"]
        if not index or index != sorted(set(index)) or not 0 <= index[0] <= index[-1] <= MAX_PARAM:
            raise BadData(f"select index must be non-empty, strictly increasing and in [0, {MAX_PARAM}]")


def check_layer(layer: QuantizedLayer) -> np.ndarray:
    """The layer's codes as int64, or BadData if the layer cannot be stored."""
    codes = np.asarray(layer.weight_codes)
    if layer.kind not in LAYER_KINDS:
        raise BadData(f"layer {layer.name!r}: unknown kind {layer.kind!r}")
    if not np.issubdtype(codes.dtype, np.integer):
        raise BadData(f"layer {layer.name!r}: weight_codes must be integers, not {codes.dtype}")
    if codes.size and codes.dtype == np.uint64 and int(codes.max()) > np.iinfo(np.int64).max:
        raise BadData(f"layer {layer.name!r}: codes do not fit in 64 bits")
    check_shape(layer.kind, tuple(codes.shape), layer.groups)
    if not FRAC_BITS_RANGE[0] <= layer.frac_bits <= FRAC_BITS_RANGE[1]:
        raise BadData(f"layer {layer.name!r}: frac_bits {layer.frac_bits} outside {FRAC_BITS_RANGE}")
    if layer.bias is not None and np.shape(layer.bias) != (codes.shape[0],):
        raise BadData(f"layer {layer.name!r}: bias shape {np.shape(layer.bias)} != ({codes.shape[0]},)")
    return codes.astype(np.int64)


def check_float_layer(layer: FloatLayer) -> None:
    """BadData unless the float layer can be stored."""
    if layer.kind not in LAYER_KINDS:
        raise BadData(f"layer {layer.name!r}: unknown kind {layer.kind!r}")
    check_shape(layer.kind, tuple(layer.weight.shape), layer.groups)
    if layer.bias is not None and layer.bias.shape != (layer.weight.shape[0],):
        raise BadData(f"layer {layer.name!r}: bias shape {list(layer.bias.shape)} != [{layer.weight.shape[0]}]")


def check_norm(norm: NormLayer) -> None:
    """BadData unless the layer_norm node can be stored."""
    shape = norm.normalized_shape
    if not 1 <= len(shape) <= MAX_NORM_RANK or any(d < 1 for d in shape):
        raise BadData(f"layer_norm {norm.name!r}: normalized_shape {list(shape)} must have 1 to {MAX_NORM_RANK} "
                      "entries >= 1")
    if not (np.isfinite(norm.eps) and norm.eps >= 0):
        raise BadData(f"layer_norm {norm.name!r}: eps {norm.eps} must be finite and >= 0")
    for what, values in (("weight", norm.weight), ("bias", norm.bias)):
        if values is not None and values.shape != shape:
            raise BadData(f"layer_norm {norm.name!r}: {what} shape {list(values.shape)} != {list(shape)}")
    if norm.bias is not None and norm.weight is None:
        raise BadData(f"layer_norm {norm.name!r}: a bias needs a weight (as nn.LayerNorm has)")


def check_shape(kind: str, shape: tuple[int, ...], groups: int) -> None:
    """BadData unless ``shape`` is a sane weight shape for ``kind``."""
    if len(shape) != WEIGHT_DIMS[kind]:
        raise BadData(f"{kind} weight must be {WEIGHT_DIMS[kind]}-D, got shape {list(shape)}")
    if any(d < 1 for d in shape):
        raise BadData(f"weight shape {list(shape)} has a dimension < 1")
    if not 1 <= groups <= MAX_PARAM or shape[0] % groups:
        raise BadData(f"groups={groups} does not divide {shape[0]} output channels")
