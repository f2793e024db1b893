"""The torch modules of a compressed model (:class:`~pyro_bc.bcz.model.CompressedModel`): a plain float32 network
in eval mode, an ``nn.Sequential`` for a chain of nodes, else a :class:`Graph` (residual sums, concatenations);
what :func:`pyro_bc.load` returns (:func:`to_module`)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pyro_bc.bcz.model import CompressedModel, FloatLayer, NormLayer, Op, ProgramNode, QuantizedLayer, is_chain, sources
from pyro_bc.bcz.program import program_module
from pyro_bc.nn.kinds import KIND
from pyro_bc.nn.ops import ELEMENTWISE_KINDS, Mul, SpatialMean, elementwise_module

__all__ = ["Add", "Cat", "Graph", "Select", "node_module", "op_module", "to_module"]


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


def node_module(item: QuantizedLayer | FloatLayer | NormLayer | ProgramNode | Op) -> nn.Module:
    """The torch module of one node of a compressed model."""
    if isinstance(item, ProgramNode):
        return program_module(item.program)
    if isinstance(item, QuantizedLayer):
        return _layer_module(item)
    if isinstance(item, FloatLayer):
        return _float_layer_module(item)
    if isinstance(item, NormLayer):
        return _norm_module(item)
    return op_module(item)


def op_module(op: Op) -> nn.Module:
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
