"""The paper's CIFAR-10 VGG-like network: 13 3x3 convolutions (padding 1) with BatchNorm2d and ReLU,
64-64-M-128-128-M-256-256-256-M-512-512-512-M-512-512-512-M, then FC 512-512-10 with BatchNorm1d and ReLU
between the FC layers; every width times ``width``.

Each ``M`` is a 2x2 max-pool of stride 2, padded by one where its input's side is odd: the output size of
``ceil_mode`` pooling, which ``.bcz`` files cannot store, and a padded max-pool they can. On 3x32x32 no pool
is padded (32 -> 1); on 1x28x28 the third is (28 -> 14 -> 7 -> 4 -> 2 -> 1). An ``AdaptiveAvgPool2d(1)``
before the head makes any input size end in ``512 x width`` features (it is the identity on 32 and 28).
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from pyro_bc.nn.layers import BayesConv2d, BayesLinear
from pyro_bc.nn.network import BayesianNet
from pyro_bc.priors import Prior, make_prior

CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
HIDDEN = 512


def scaled(channels: int, width: float) -> int:
    """``channels * width``, at least 1."""
    return max(1, round(channels * width))


def build(prior: Prior | str = "gnj", width: float = 1.0, input_shape: tuple[int, int, int] = (3, 32, 32),
          num_classes: int = 10, **prior_options) -> BayesianNet:
    """The network for inputs of ``input_shape`` (channels, height, width)."""
    prior = make_prior(prior, **prior_options)
    channels, side = input_shape[0], min(input_shape[1:])
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    conv = pool = 0
    for item in CONFIG:
        if item == "M":
            pool += 1
            layers[f"pool{pool}"] = nn.MaxPool2d(2, 2, padding=side % 2)
            side = side // 2 + side % 2
            continue
        conv += 1
        out = scaled(item, width)
        layers[f"conv{conv}"] = BayesConv2d(channels, out, 3, padding=1, prior=prior, bias=False)
        layers[f"bn{conv}"] = nn.BatchNorm2d(out)
        layers[f"relu{conv}"] = nn.ReLU()
        channels = out
    hidden = scaled(HIDDEN, width)
    layers.update(avgpool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(),
                  fc1=BayesLinear(channels, hidden, prior, bias=False), bn_fc1=nn.BatchNorm1d(hidden),
                  relu_fc1=nn.ReLU(), fc2=BayesLinear(hidden, num_classes, prior))
    return BayesianNet(nn.Sequential(layers), input_shape=tuple(input_shape))
