"""From a pruned, quantized posterior to the compressed network: the :class:`~pyro_bc.bcz.codec.CompressedModel`
that the codec writes as a ``.bcz`` file, and the torch module it computes.

:mod:`pyro_bc.compression.graph` decides what is kept and :mod:`pyro_bc.compression.posterior` at which precision; this module lays the
kept weights out as the smaller layers, one item per node of the body's graph (with ``select`` ops where a layer
reads only some of its inputs). Deterministic modules become float nodes at float32: BatchNorm that follows no layer
as a depthwise 1x1 convolution, a plain layer as itself, ``nn.LayerNorm`` as a ``layer_norm`` node. A flat
sequence's items each read the one before, so the file loads as an ``nn.Sequential``.
"""

from __future__ import annotations

import torch
from torch import nn

from pyro_bc.bcz.codec import CompressedModel, FloatLayer, NormLayer, Op, ProgramNode, QuantizedLayer
from pyro_bc.bcz.modules import to_module
from pyro_bc.compression.graph import NETWORK_INPUT, BodyGraph, Node
from pyro_bc.compression.posterior import Precision, PrunedLayer, quantize
from pyro_bc.errors import ConfigError
from pyro_bc.nn.kinds import KIND, explicit_padding, kind_of
from pyro_bc.nn.network import BayesianNet, input_dtype_name


def _select(available: torch.Tensor, keep_in: torch.Tensor, inputs: tuple[int, ...] | None = None) -> Op | None:
    """The ``select`` op keeping positions ``keep_in`` of those ``available`` (None if it keeps them all)."""
    if torch.equal(keep_in, available):
        return None
    position = torch.cumsum(available.long(), 0) - 1
    return Op("select", {"index": position[keep_in].tolist()}, inputs)


def _layer(i: int, layer: PrunedLayer, precision: Precision | None, inputs: tuple[int, ...] | None = None,
           depthwise: bool = False) -> QuantizedLayer:
    """Layer ``i``'s kept weights on its grid (``precision``; None: float32 precision, a 2^-40 grid)."""
    frac = precision.mantissa_bits[i] if precision else 40
    codes = torch.where(layer.mask, quantize(layer.post.mean, frac), 0)[layer.keep_out]
    codes = codes if depthwise else codes[:, layer.keep_in]
    bias = layer.post.bias[layer.keep_out].float().numpy()
    stride, padding, dilation, groups = layer.post.conv_args or (1, 0, 1, 1)
    if isinstance(padding, str):
        raise ConfigError(f"cannot compress {layer.post.name}: padding {padding!r} over an even kernel span pads one "
                          "side more than the other, which a .bcz convolution cannot store; give it numeric padding")
    stride, padding, dilation = KIND[layer.post.kind].to_pairs(stride, padding, dilation)
    groups = int(layer.keep_out.sum()) if depthwise else groups
    return QuantizedLayer(layer.post.kind, layer.post.name, codes.numpy(), frac, bias, stride, padding, dilation,
                          groups, inputs)


def _affine(name: str, affine: tuple[torch.Tensor, torch.Tensor], keep: torch.Tensor,
            inputs: tuple[int, ...]) -> FloatLayer:
    """BatchNorm on its own over the kept channels, as the depthwise 1x1 convolution it is: weight ``scale``, bias
    ``shift`` (float32)."""
    scale, shift = (t[keep].float().numpy() for t in affine)
    return FloatLayer("conv2d", name, scale.reshape(-1, 1, 1, 1), shift, groups=len(scale), inputs=inputs)


@torch.no_grad()
def _deterministic(node: Node, inputs: tuple[int, ...]) -> FloatLayer | NormLayer:
    """A deterministic module of the network, whole, at float32: a plain layer, or LayerNorm."""
    module = node.module

    def values(tensor: torch.Tensor | None):
        return None if tensor is None else tensor.detach().float().cpu().numpy()

    kind = kind_of(module)
    if kind is None:
        return NormLayer(node.name, module.normalized_shape, module.eps, values(module.weight), values(module.bias),
                         inputs)
    conv = {}
    if kind.is_conv:
        padding = explicit_padding(module.padding, module.kernel_size, module.stride, module.dilation)
        if module.padding_mode != "zeros" or isinstance(padding, str):
            raise ConfigError(f"cannot compress {node.name}: a convolution with padding {module.padding!r} "
                              f"({module.padding_mode}) has no .bcz node; give it numeric zero padding")
        stride, padding, dilation = kind.to_pairs(module.stride, padding, module.dilation)
        conv = {"stride": stride, "padding": padding, "dilation": dilation, "groups": module.groups}
    return FloatLayer(kind.name, node.name, values(module.weight), values(module.bias), inputs=inputs, **conv)


def _items(graph: BodyGraph, layers: list[PrunedLayer], precision: Precision | None) -> list:
    """The items of the compressed network, one per node of the body's graph (plus ``select`` ops)."""
    kept = graph.kept_positions(layers)
    items: list = []
    item_of = {NETWORK_INPUT: NETWORK_INPUT}  # node index -> the item computing its output
    every = torch.ones(len(graph.input_variables), dtype=torch.bool)
    for index, node in enumerate(graph.nodes):
        sources = tuple(item_of[s] for s in node.inputs)
        if node.layer is not None:
            layer = layers[node.layer]
            available = every if node.inputs[0] == NETWORK_INPUT else kept[node.inputs[0]]
            reads_all = node.depthwise or node.grouped or node.reads_last_axis or node.reads_whole
            select = None if reads_all or available is None else _select(available, layer.keep_in, sources)
            if select is not None:
                items.append(select)
                sources = (len(items) - 1,)
            items.append(_layer(node.layer, layer, precision, sources, node.depthwise))
        elif node.op is not None and node.op.kind == "gather":  # the kept positions, renumbered among the kept
            rank = torch.cumsum(kept[node.inputs[0]].long(), 0) - 1 if node.inputs[0] != NETWORK_INPUT else \
                torch.arange(len(graph.input_variables))
            reads = torch.tensor(node.op.params["index"])[kept[index]]
            items.append(Op("gather", {"index": rank[reads].tolist()}, sources))
        elif node.program is not None:
            items.append(ProgramNode(node.name, graph.exported(node), sources))
        elif node.affine is not None:
            items.append(_affine(node.name, node.affine, kept[index], sources))
        elif node.module is not None:
            items.append(_deterministic(node, sources))
        else:
            items.append(Op(node.op.kind, node.op.params, sources))
        item_of[index] = len(items) - 1
    return items


def compressed_model(net: BayesianNet, layers: list[PrunedLayer], precision: Precision | None,
                     metadata: dict | None = None, graph: BodyGraph | None = None) -> CompressedModel:
    """The physically pruned network; weights rounded to each layer's grid (``precision``), or, with
    ``precision=None``, kept at float32 precision (codes on a 2^-40 grid) for the pruned-only error.
    ``graph``: ``net``'s, where the caller has built it."""
    items = _items(graph or BodyGraph(net), layers, precision)
    return CompressedModel(items, net.input_shape, metadata or {}, input_dtype=input_dtype_name(net.input_dtype))


def compressed_module(net: BayesianNet, layers: list[PrunedLayer], precision: Precision | None,
                      graph: BodyGraph | None = None) -> nn.Module:
    """The torch module of :func:`compressed_model` (as :func:`pyro_bc.bcz.codec.load` would rebuild it)."""
    return to_module(compressed_model(net, layers, precision, graph=graph))
