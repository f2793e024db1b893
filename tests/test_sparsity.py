"""Group sparsity on synthetic regression: only 3 of 20 inputs matter, and the priors find them."""

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Predictive
from torch import nn

from pyro_bc.infer.elbo import MeanFieldELBO
from pyro_bc.infer.reparam import LocalReparameterization
from pyro_bc.nn.layers import BayesLinear
from pyro_bc.nn.network import BayesianNet
from pyro_bc.priors import known_options, make_prior

N, D = 1000, 20
RELEVANT = [0, 1, 2]


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g)
    beta = torch.zeros(D)
    beta[RELEVANT] = torch.tensor([2.0, -3.0, 1.5])
    return x, x @ beta + 0.1 * torch.randn(N, generator=g)


def _net(prior, tau0=1e-5):
    layer = BayesLinear(D, 1, make_prior(prior, **known_options(prior, {"tau0": tau0})))
    return layer, BayesianNet(nn.Sequential(layer), input_shape=(D,), likelihood="normal", noise_scale=0.1)


@pytest.fixture
def no_validation():
    pyro.enable_validation(False)
    yield
    pyro.enable_validation(True)


@pytest.mark.slow
@pytest.mark.parametrize("prior", ["gnj", "ghs"])
def test_irrelevant_inputs_are_pruned(prior, no_validation):
    pyro.set_rng_seed(0)
    x, y = _data()
    layer, net = _net(prior)
    opt = torch.optim.Adam(net.parameters(), lr=3e-2)
    elbo = MeanFieldELBO()
    model, guide = poutine.scale(net.model, scale=1 / N), poutine.scale(net.guide, scale=1 / N)
    for _ in range(1200):
        with LocalReparameterization():
            loss = elbo.differentiable_loss(model, guide, x, y, N)
        opt.zero_grad()
        loss.backward()
        opt.step()
    log_alpha = layer.log_alpha().detach()
    assert log_alpha.shape == (D,)
    relevant = torch.zeros(D, dtype=torch.bool)
    relevant[RELEVANT] = True
    assert (log_alpha[relevant] < -3).all(), log_alpha
    assert (log_alpha[~relevant] > -3).all(), log_alpha
    # the posterior-mean weights recover beta on the kept inputs
    w = net.posterior_mean_network()[0].weight.detach()[0]
    torch.testing.assert_close(w[RELEVANT], torch.tensor([2.0, -3.0, 1.5]), atol=0.05, rtol=0)


@pytest.mark.parametrize("prior, latents", [
    ("gnj", ["z", "w", "b"]),
    ("ghs", ["s_a", "s_b", "z_a", "z_b", "w", "b"]),
    ("lu", ["w", "b"]),
])
def test_predictive_returns_every_latent(prior, latents):
    pyro.set_rng_seed(1)
    x, _ = _data()
    layer, net = _net(prior)
    samples = Predictive(net.model, guide=net.guide, num_samples=5)(x[:7])
    guide_sites = [n for n, s in poutine.trace(net.guide).get_trace().nodes.items() if s["type"] == "sample"]
    assert guide_sites == [f"{layer.site}.{name}" for name in latents]
    for name in guide_sites:
        assert name in samples, (name, sorted(samples))
        assert samples[name].shape[0] == 5
    assert samples["y"].shape == (5, 7)
    assert samples[f"{layer.site}.w"].shape[-2:] == (1, D)
