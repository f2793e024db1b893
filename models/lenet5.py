"""LeNet-5-Caffe: conv 1->20 (5x5), max-pool 2, conv 20->50 (5x5), max-pool 2, FC 800-500-10, ReLU.

430,500 weights. Convolutions have one scale per output channel, FC layers one per input neuron;
at the flatten each of conv2's 50 channels owns 4*4 = 16 consecutive fc1 inputs.
"""

from collections import OrderedDict

from torch import nn

from pyro_bc.nn.layers import BayesConv2d, BayesLinear
from pyro_bc.nn.network import BayesianNet
from pyro_bc.priors import Prior, make_prior


def build(prior: Prior | str = "gnj", **prior_options) -> BayesianNet:
    prior = make_prior(prior, **prior_options)
    body = nn.Sequential(OrderedDict(
        conv1=BayesConv2d(1, 20, 5, prior=prior),
        relu1=nn.ReLU(),
        pool1=nn.MaxPool2d(2),
        conv2=BayesConv2d(20, 50, 5, prior=prior),
        relu2=nn.ReLU(),
        pool2=nn.MaxPool2d(2),
        flatten=nn.Flatten(),
        fc1=BayesLinear(800, 500, prior),
        relu3=nn.ReLU(),
        fc2=BayesLinear(500, 10, prior),
    ))
    return BayesianNet(body, input_shape=(1, 28, 28))
