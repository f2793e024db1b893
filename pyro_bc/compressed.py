"""From a pruned, quantized posterior to the compressed network: the :class:`~pyro_bc.codec.CompressedModel`
that the codec writes as a ``.bcz`` file, and the torch module it computes.

:mod:`pyro_bc.posterior` decides what is kept and at which precision; this module lays the kept weights out
as the smaller layers (with ``select`` ops where a layer reads only some of its inputs).
"""

from __future__ import annotations

import torch
from torch import nn

from pyro_bc import codec
from pyro_bc.codec import CompressedModel, Op, QuantizedLayer
from pyro_bc.errors import ConfigError
from pyro_bc.network import BayesianNet
from pyro_bc.nn import BayesLayer
from pyro_bc.posterior import Precision, PrunedLayer, quantize


def _op(module: nn.Module) -> Op:
    """The codec op of a parameter-free module of the body; ConfigError for anything else."""
    if isinstance(module, nn.ReLU):
        return Op("relu")
    if isinstance(module, nn.Tanh):
        return Op("tanh")
    if isinstance(module, nn.Sigmoid):
        return Op("sigmoid")
    if isinstance(module, nn.Flatten):
        return Op("flatten", {"start_dim": module.start_dim})
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)) and not module.padding:
        kind = "maxpool2d" if isinstance(module, nn.MaxPool2d) else "avgpool2d"
        return Op(kind, {"kernel_size": module.kernel_size, "stride": module.stride})
    raise ConfigError(f"cannot compress a network holding {type(module).__name__}: only Bayesian layers, ReLU, "
                      "Tanh, Sigmoid, Flatten and unpadded Max/AvgPool2d are supported")


def compressed_model(net: BayesianNet, layers: list[PrunedLayer], precision: Precision | None,
                     metadata: dict | None = None) -> CompressedModel:
    """The physically pruned network; weights rounded to each layer's grid (``precision``), or, with
    ``precision=None``, kept at float32 precision (codes on a 2^-40 grid) for the pruned-only error."""
    items: list = []
    by_layer = iter(enumerate(layers))
    reaching = None  # bool over the previous layer's outputs that reach the next layer
    for module in net.body:
        if not isinstance(module, BayesLayer):
            items.append(_op(module))
            continue
        i, layer = next(by_layer)
        available = torch.ones_like(layer.keep_in) if reaching is None else \
            reaching.repeat_interleave(len(layer.keep_in) // len(reaching))
        if not torch.equal(layer.keep_in, available):
            position = torch.cumsum(available.long(), 0) - 1
            items.append(Op("select", {"index": position[layer.keep_in].tolist()}))
        frac = precision.mantissa_bits[i] if precision else 40
        codes = torch.where(layer.mask, quantize(layer.post.mean, frac), 0)
        codes = codes[layer.keep_out][:, layer.keep_in]
        bias = layer.post.bias[layer.keep_out].float().numpy()
        stride, padding, dilation, groups = layer.post.conv_args or (1, 0, 1, 1)
        items.append(QuantizedLayer(layer.post.kind, layer.post.name, codes.numpy(), frac, bias, stride, padding,
                                    dilation, groups))
        reaching = layer.keep_out
    return CompressedModel(items, net.input_shape, metadata or {})


def compressed_module(net: BayesianNet, layers: list[PrunedLayer], precision: Precision | None) -> nn.Sequential:
    """The torch module of :func:`compressed_model` (as :func:`pyro_bc.codec.load` would rebuild it)."""
    return codec.to_module(compressed_model(net, layers, precision))
