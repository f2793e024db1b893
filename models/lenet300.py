"""LeNet-300-100 (784-300-100-10, ReLU): 266,200 weights, one scale per input neuron of each layer.

As in the official code, fc1's weight and bias variances are clipped at 0.04 (docs/METHOD.md 4.1).
"""

from collections import OrderedDict

from torch import nn

from pyro_bc.nn.layers import BayesLinear
from pyro_bc.nn.network import BayesianNet
from pyro_bc.priors import Prior, make_prior


def build(prior: Prior | str = "gnj", hidden: tuple[int, int] = (300, 100), **prior_options) -> BayesianNet:
    """The network; ``hidden`` sets the two hidden widths (other widths serve benchmarks)."""
    prior = make_prior(prior, **prior_options)
    h1, h2 = hidden
    body = nn.Sequential(OrderedDict(
        flatten=nn.Flatten(),
        fc1=BayesLinear(784, h1, prior, clip_var=0.04),
        relu1=nn.ReLU(),
        fc2=BayesLinear(h1, h2, prior),
        relu2=nn.ReLU(),
        fc3=BayesLinear(h2, 10, prior),
    ))
    return BayesianNet(body, input_shape=(1, 28, 28))
