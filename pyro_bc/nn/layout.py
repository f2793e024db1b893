"""Memory layouts that make CPU inference faster without changing any value."""

from __future__ import annotations

import torch
from torch import nn

from pyro_bc.infer.reparam import channels_last


class Conv2dChannelsLast(nn.Conv2d):
    """An ``nn.Conv2d`` that returns its output in channels-last memory format (the same values).

    On the CPU, max-pooling and the next convolution run about twice as fast on channels-last tensors,
    and a convolution with one input channel always returns the default layout.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channels_last(super().forward(x))
