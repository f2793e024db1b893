"""The compressed *Bayesian* network of a ``.bcz`` file that keeps variances (:func:`to_bayesian_module`, what
``pyro_bc.load(path, bayesian=True)`` returns); :mod:`pyro_bc.compression.variances` writes them.

A kept weight is ``w = z' w'``: ``w' ~ N(m, c)`` per weight, ``z' ~ N(1, r)`` per group (docs/FORMAT.md). A forward
draws once per call by the local reparameterisation, every example its own noise (Kingma et al. 2015): ``z'`` per
example and group, then the pre-activation from its Gaussian.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pyro_bc.bcz.model import CompressedModel, LayerVariance, QuantizedLayer, is_chain, sources
from pyro_bc.bcz.modules import Graph, node_module, to_module
from pyro_bc.nn.kinds import KIND

LOG_VARIANCE_RANGE = (-100.0, 20.0)  # log-variances are clamped to this range (nats) before quantisation


def layer_variances(layer: QuantizedLayer, variance: LayerVariance, step: float) -> tuple[np.ndarray, np.ndarray | None]:
    """A layer's decoded weight variances (weight-shaped; 0 at pruned weights) and group-scale relative variances."""
    codes = np.asarray(layer.weight_codes)
    weight = np.zeros(codes.shape, dtype=np.float64)
    stored = np.exp(np.asarray(variance.weight_codes, dtype=np.float64) * step)
    if variance.every_weight:
        weight[...] = stored.reshape(codes.shape)
    else:
        weight[codes != 0] = stored
    scale = None if variance.scale_codes is None else np.exp(np.asarray(variance.scale_codes, dtype=np.float64) * step)
    return weight, scale


class SampledLayer(nn.Module):
    """A linear or convolutional layer whose forward draws its output for weights ``z' w'`` (see the module)."""

    def __init__(self, layer: QuantizedLayer, weight_var: np.ndarray, scale_var: np.ndarray | None):
        super().__init__()
        self.kind = KIND[layer.kind]
        self.conv_args = (*self.kind.from_pairs(layer.stride, layer.padding, layer.dilation), layer.groups) \
            if self.kind.is_conv else ()
        self.register_buffer("weight", torch.from_numpy(layer.weight()))
        self.register_buffer("weight_var", torch.from_numpy(weight_var.astype(np.float32)))
        self.register_buffer("bias", None if layer.bias is None else
                             torch.from_numpy(np.asarray(layer.bias, dtype=np.float32)))
        self.register_buffer("scale_sd", None if scale_var is None else
                             torch.from_numpy(np.sqrt(scale_var).astype(np.float32)))

    def _apply_op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.kind.function(x, weight, bias, *self.conv_args)

    def _group_noise(self, like: torch.Tensor) -> torch.Tensor:
        """Draws of ``z'``, one per example and group (shared by an example's positions), shaped to scale ``like``'s
        features: its last dimension for a linear layer (inputs of any leading shape), dimension 1 for a
        convolution."""
        z = 1 + self.scale_sd * torch.randn(len(like), len(self.scale_sd), dtype=like.dtype, device=like.device)
        if not self.kind.is_conv:
            return z.reshape((len(like),) + (1,) * (like.dim() - 2) + (len(self.scale_sd),))
        return z.reshape(z.shape + (1,) * (like.dim() - 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale_sd is not None and not self.kind.is_conv:  # linear groups are inputs
            x = x * self._group_noise(x)
        mean = self._apply_op(x, self.weight, self.bias)
        std = self._apply_op(x * x, self.weight_var, None).clamp_min(0).sqrt()
        y = mean + std * torch.randn_like(mean)
        if self.scale_sd is not None and self.kind.is_conv:  # convolution groups are output channels
            y = y * self._group_noise(y)
        return y


class CompressedBayesianNet(nn.Module):
    """The compressed Bayesian network of a ``.bcz`` file that keeps variances: ``forward`` draws once per call;
    :meth:`posterior_mean_network` is the file's deterministic network."""

    def __init__(self, model: CompressedModel):
        super().__init__()
        if model.variances is None:
            raise ValueError("the model keeps no variances")
        self.model = model
        variances = iter(model.variances.layers)
        modules = []
        for item in model.items:
            if isinstance(item, QuantizedLayer):
                modules.append(SampledLayer(item, *layer_variances(item, next(variances), model.variances.step)))
            else:
                modules.append(node_module(item))  # an op, or a deterministic layer: as the file's
        self.net = nn.Sequential(*modules) if is_chain(model) else Graph(modules, sources(model))
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def posterior_mean_network(self) -> nn.Module:
        """The deterministic network (the weights' means), as :func:`pyro_bc.load` rebuilds it."""
        return to_module(self.model)


def to_bayesian_module(model: CompressedModel) -> CompressedBayesianNet:
    """The module drawing from ``model``'s compressed Bayesian network (``model.variances`` must be set)."""
    return CompressedBayesianNet(model)
