"""ResNet-20 for CIFAR (He et al. 2016, section 4.2): a 3x3 convolution of 16 channels, three stages of three
basic blocks of 16, 32 and 64 channels (times ``width``), global average pooling and one FC layer.

A basic block is conv3x3-BN-ReLU-conv3x3-BN plus its shortcut, then ReLU. The first block of stages 2 and 3
halves the resolution with a stride-2 first convolution; its shortcut is a 1x1 stride-2 convolution with
BatchNorm (option B, a projection), the other shortcuts are identities. Convolutions followed by BatchNorm
have no bias.
"""

from __future__ import annotations

from torch import nn

from models.vgg import scaled
from pyro_bc.nn.layers import BayesConv2d, BayesLinear
from pyro_bc.nn.network import BayesianNet
from pyro_bc.priors import Prior, make_prior

STAGES = (16, 32, 64)
BLOCKS_PER_STAGE = 3


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a residual addition (a projection where the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, prior: Prior):
        super().__init__()
        self.conv1 = BayesConv2d(in_channels, out_channels, 3, stride, padding=1, prior=prior, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = BayesConv2d(out_channels, out_channels, 3, padding=1, prior=prior, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(BayesConv2d(in_channels, out_channels, 1, stride, prior=prior, bias=False),
                                          nn.BatchNorm2d(out_channels))
        self.relu2 = nn.ReLU()

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class ResNet(nn.Module):
    """The stem, the stages of basic blocks, global average pooling and the classifier."""

    def __init__(self, prior: Prior, width: float, in_channels: int, num_classes: int):
        super().__init__()
        channels = scaled(STAGES[0], width)
        self.conv1 = BayesConv2d(in_channels, channels, 3, padding=1, prior=prior, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        blocks = []
        for stage, base in enumerate(STAGES):
            out = scaled(base, width)
            for block in range(BLOCKS_PER_STAGE):
                stride = 2 if stage > 0 and block == 0 else 1
                blocks.append(BasicBlock(channels, out, stride, prior))
                channels = out
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = BayesLinear(channels, num_classes, prior)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.blocks(self.relu(self.bn1(self.conv1(x)))))))


def build(prior: Prior | str = "gnj", width: float = 1.0, input_shape: tuple[int, int, int] = (3, 32, 32),
          num_classes: int = 10, **prior_options) -> BayesianNet:
    """ResNet-20 for inputs of ``input_shape`` (channels, height, width); 0.27 M weights at width 1."""
    prior = make_prior(prior, **prior_options)
    return BayesianNet(ResNet(prior, width, input_shape[0], num_classes), input_shape=tuple(input_shape))
