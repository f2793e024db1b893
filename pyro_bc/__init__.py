"""pyro-bc: Bayesian compression of neural networks (Louizos, Ullrich & Welling 2017) in Pyro."""

from pyro_bc import distributions  # noqa: F401  (registers the KL divergences)

__version__ = "0.1.0"
