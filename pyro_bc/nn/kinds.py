"""The kinds of layer pyro-bc makes Bayesian and compresses, one entry each in :data:`LAYER_KINDS`.

An entry says what every part of the pipeline needs to know about a kind and nothing else does: the torch layer
it replaces, the dimensions of its weight, where its input's features are, its multiply-accumulates and the plain
module that computes a stored layer. Its Bayesian layer (:data:`pyro_bc.nn.layers.BAYES_LAYERS`) and its local
reparameterisation (:data:`pyro_bc.infer.reparam.OPS`) are found by the kind's name, and so is its byte in a ``.bcz``
file (:data:`pyro_bc.bcz.model.WIRE_IDS`). This module imports torch only, so the codec can use it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pyro_bc.nn.layout import Conv2dChannelsLast


@dataclass(frozen=True)
class LayerKind:
    """One kind of layer: ``spatial_dims`` 0 for a linear layer (on inputs of any leading shape, features last),
    else the number of dimensions a convolution slides over (channels in dimension 1); ``function(x, weight, bias,
    *args)`` computes it (``args``: a convolution's stride, padding, dilation and groups)."""

    name: str
    dense: type[nn.Module]
    spatial_dims: int
    function: Callable[..., torch.Tensor]

    @property
    def weight_dims(self) -> int:
        """Dimensions of the weight: ``(out, in)`` or ``(out, in / groups, *kernel)``."""
        return 2 + self.spatial_dims

    @property
    def is_conv(self) -> bool:
        return self.spatial_dims > 0

    @property
    def feature_axis(self) -> int:
        """The input's axis that holds the features the weight's dimension 1 reads."""
        return 1 if self.is_conv else -1

    def macs(self, module: nn.Module, output: torch.Tensor) -> int:
        """Multiply-accumulates of ``module`` for one example, given its output (batch of one)."""
        if not self.is_conv:
            return module.in_features * module.out_features * math.prod(output.shape[1:-1])
        per_output = (module.in_channels // module.groups) * math.prod(module.kernel_size)
        return module.out_channels * per_output * math.prod(output.shape[2:])

    def to_pairs(self, stride, padding, dilation) -> tuple[tuple[int, int], ...]:
        """Stride, padding and dilation as the pairs a ``.bcz`` file stores, a 1-D convolution's as a 2-D one's over
        a height of one (stride 1, padding 0, dilation 1 in front)."""
        def pairs(value, identity: int) -> tuple[int, int]:
            values = (value,) * self.spatial_dims if isinstance(value, int) else tuple(int(v) for v in value)
            return ((identity,) * (2 - len(values)) + values)[-2:]

        return pairs(stride, 1), pairs(padding, 0), pairs(dilation, 1)

    def from_pairs(self, *pairs: tuple[int, int]) -> list[tuple[int, ...]]:
        """The arguments of this kind from a file's pairs (:meth:`to_pairs` undone)."""
        return [tuple(pair[2 - self.spatial_dims:]) for pair in pairs]

    def module(self, weight_shape: tuple[int, ...], bias: bool, stride=1, padding=0, dilation=1, groups: int = 1,
               device: torch.device | None = None, channels_last: bool = True) -> nn.Module:
        """An uninitialised plain module of this kind for a weight of ``weight_shape`` (no random draw); a 2-D
        convolution gives channels-last outputs unless ``channels_last`` is False."""
        where = {} if device is None else {"device": device}
        if not self.is_conv:
            return nn.utils.skip_init(nn.Linear, weight_shape[1], weight_shape[0], bias=bias, **where)
        # channels-last: faster evaluation, same values
        dense = Conv2dChannelsLast if self.spatial_dims == 2 and channels_last else self.dense
        return nn.utils.skip_init(dense, weight_shape[1] * groups, weight_shape[0], tuple(weight_shape[2:]),
                                  stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias, **where)


def padding_stored(module: nn.Module) -> bool:
    """Whether a layer's padding is numbers of zeros, as a ``.bcz`` layer node stores it: not a linear layer's
    question; a convolution's ``padding_mode`` other than ``"zeros"`` (reflect, replicate, circular) or a ``"same"``
    that pads one side more is not."""
    if not kind_of(module).is_conv:
        return True
    padding = explicit_padding(module.padding, module.kernel_size, module.stride, module.dilation)
    return module.padding_mode == "zeros" and not isinstance(padding, str)


def explicit_padding(padding, kernel_size: tuple[int, ...], stride, dilation) -> int | tuple[int, ...] | str:
    """A convolution's ``padding`` as numbers where a string names an even padding: ``"valid"`` is 0, ``"same"``
    (stride 1) pads ``dilation * (kernel - 1) / 2`` on each side. ``"same"`` over an even span pads one side more
    than the other, which a symmetric padding cannot say, and torch refuses it with a stride: those strings are
    returned unchanged."""
    if not isinstance(padding, str):
        return padding
    if padding == "valid":
        return (0,) * len(kernel_size)

    def per_dim(value) -> tuple[int, ...]:
        return (value,) * len(kernel_size) if isinstance(value, int) else tuple(value)
    spans = [d * (k - 1) for d, k in zip(per_dim(dilation), kernel_size, strict=True)]
    if padding != "same" or any(s != 1 for s in per_dim(stride)) or any(span % 2 for span in spans):
        return padding
    return tuple(span // 2 for span in spans)


LAYER_KINDS: tuple[LayerKind, ...] = (
    LayerKind("linear", nn.Linear, 0, F.linear),
    LayerKind("conv1d", nn.Conv1d, 1, F.conv1d),
    LayerKind("conv2d", nn.Conv2d, 2, F.conv2d),
)
KIND: dict[str, LayerKind] = {kind.name: kind for kind in LAYER_KINDS}


#: Subclasses of a kind's torch layer whose own forward computes the same values (the layout aside).
SAME_VALUES: tuple[type[nn.Module], ...] = (Conv2dChannelsLast,)


def kind_of(module: nn.Module) -> LayerKind | None:
    """The kind of a plain torch layer, or None for any other module. A subclass is of its base's kind where it
    keeps the base's forward: one with a forward of its own (a weight standardised, padding computed per input, as
    timm's ``StdConv2d`` and ``Conv2dSame``) computes something else from its weight, so it is another module."""
    kind = next((kind for kind in LAYER_KINDS if isinstance(module, kind.dense)), None)
    if kind is None or type(module).forward is kind.dense.forward or isinstance(module, SAME_VALUES):
        return kind
    return None


def dense_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """``module``'s layers of every kind, by path, in ``named_modules`` order."""
    return [(name, m) for name, m in module.named_modules() if kind_of(m) is not None]
