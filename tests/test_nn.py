"""Bayesian layers (pyro_bc.nn): the model's prior distributions."""

import pyro
import pytest
import torch
from pyro import poutine
from torch import nn

from pyro_bc.distributions import LogUniform, StandardNormal
from pyro_bc.elbo import MeanFieldELBO
from pyro_bc.network import BayesianNet
from pyro_bc.nn import BayesLinear
from pyro_bc.priors import make_prior
from pyro_bc.reparam import LocalReparameterization


@pytest.mark.parametrize("prior", ["gnj", "ghs", "lu", "rhs"])
def test_priors_are_built_once_per_dtype_and_used_by_the_model(prior):
    pyro.set_rng_seed(0)
    layer = BayesLinear(4, 3, make_prior(prior, tau0=1e-2))
    net = BayesianNet(nn.Sequential(layer), input_shape=(4,))
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    priors = layer.priors()
    assert layer.priors() is priors  # reused by every step
    trace = poutine.trace(net.model).get_trace(x, y, 6)
    for suffix, prior_dist in priors.items():
        assert trace.nodes[f"{layer.site}.{suffix}"]["fn"] is prior_dist
    w = priors["w"].base_dist
    assert isinstance(w, LogUniform) if prior == "lu" else isinstance(w, StandardNormal)
    if prior in ("ghs", "rhs"):  # s_a ~ Gamma(1/2, rate tau0^-2)
        assert priors["s_a"].rate.item() == pytest.approx(1e4)

    net.double()  # a new dtype gets its own priors, and the ELBO runs in it
    assert layer.priors() is not priors and layer.priors()["b"].base_dist.loc.dtype == torch.float64
    with LocalReparameterization():
        loss = MeanFieldELBO().differentiable_loss(net.model, net.guide, x.double(), y, 6)
    assert loss.dtype == torch.float64 and torch.isfinite(loss)
