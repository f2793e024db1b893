"""LeNet-300-100's structure (three Bayesian linear layers, ReLUs) at widths 784-8-8-10.

With so little arithmetic, a training step's time is the per-step bookkeeping (Python, Pyro's
messengers, autograd nodes, the optimiser); ``analysis/bench.py`` times it at batch 2 to show how much
of the full-size gap between a ``pyro_bc`` step and plain PyTorch that bookkeeping is.
"""

from models import lenet300
from pyro_bc.nn.network import BayesianNet
from pyro_bc.priors import Prior


def build(prior: Prior | str = "gnj", **prior_options) -> BayesianNet:
    return lenet300.build(prior, hidden=(8, 8), **prior_options)
