"""LeNet-300-100's structure (three Bayesian linear layers, ReLUs) at widths 784-8-8-10.

With so little arithmetic, a training step's time is the per-step bookkeeping (Python, Pyro's
messengers, autograd nodes, the optimiser); ``analysis/bench.py`` times it at batch 2 to show how much
of the full-size gap between a ``pyro_bc`` step and plain PyTorch that bookkeeping is.
"""

from collections import OrderedDict

from torch import nn

from pyro_bc.network import BayesianNet
from pyro_bc.nn import BayesLinear


def build(prior: str = "gnj", tau0: float = 1e-5) -> BayesianNet:
    body = nn.Sequential(OrderedDict(
        flatten=nn.Flatten(),
        fc1=BayesLinear(784, 8, prior, tau0, clip_var=0.04),
        relu1=nn.ReLU(),
        fc2=BayesLinear(8, 8, prior, tau0),
        relu2=nn.ReLU(),
        fc3=BayesLinear(8, 10, prior, tau0),
    ))
    return BayesianNet(body, input_shape=(1, 28, 28))
