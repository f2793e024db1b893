"""Bayesian layers (pyro_bc.nn.layers): prior distributions, groups, weight moments, posterior-mean modules, clipping."""

import math

import pyro
import pytest
import torch
from pyro import poutine
from torch import nn

from pyro_bc.errors import ConfigError
from pyro_bc.infer.distributions import LogUniform, StandardNormal
from pyro_bc.infer.elbo import MeanFieldELBO
from pyro_bc.infer.reparam import LocalReparameterization
from pyro_bc.nn.layers import BayesConv2d, BayesLinear
from pyro_bc.nn.network import BayesianNet
from pyro_bc.priors import GroupNormalJeffreys, known_options, make_prior


@pytest.fixture(autouse=True)
def _seed():
    pyro.set_rng_seed(0)


@pytest.mark.parametrize("prior", ["gnj", "ghs", "lu", "rhs"])
def test_priors_are_built_once_per_dtype_and_used_by_the_model(prior):
    pyro.set_rng_seed(0)
    layer = BayesLinear(4, 3, make_prior(prior, **known_options(prior, {"tau0": 1e-2})))
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


@pytest.mark.parametrize("prior", ["gnj", "ghs", "lu", "rhs"])
def test_weight_moments_against_monte_carlo_of_z_times_w(prior):
    """E[w] and Var[w] of w = z w~ (docs/METHOD.md 7.1) against 2e5 draws of z (the prior's) times w~ (Normal)."""
    torch.manual_seed(0)
    layer = BayesConv2d(2, 3, 1, prior=make_prior(prior, **known_options(prior, {"tau0": 1.0}))).double()
    with torch.no_grad():
        layer.weight_logvar.fill_(math.log(0.2))
        for name, p in layer.prior.named_parameters():
            p.copy_(torch.full_like(p, math.log(0.1)) if "logvar" in name else p + 0.1 * torch.randn_like(p))
    n = 200_000
    gen = torch.Generator().manual_seed(1)
    draws = layer.prior.posterior_draws(n, gen)
    z = draws["z"][:, :, None, None, None] if "z" in draws else 1.0  # conv: one z per output channel
    w = z * (layer.weight_mu + layer.weight_logvar.mul(0.5).exp() * torch.randn((n, 3, 2, 1, 1), generator=gen,
                                                                                   dtype=torch.float64))
    mean, var = layer.weight_moments()
    se_mean = (w.var(0) / n).sqrt()
    se_var = (((w - w.mean(0)) ** 4).mean(0) - w.var(0) ** 2).div(n).sqrt()
    assert torch.all((mean - w.mean(0)).abs() < 5 * se_mean)
    assert torch.all((var - w.var(0)).abs() < 5 * se_var)


def test_groups_are_inputs_of_linear_layers_and_output_channels_of_convolutions():
    fc, conv = BayesLinear(5, 3), BayesConv2d(2, 4, 3, padding=1)
    assert (fc.group_axis, fc.n_groups, fc.prior.n_groups) == (1, 5, 5)
    assert (conv.group_axis, conv.n_groups, conv.prior.n_groups) == (0, 4, 4)
    assert isinstance(fc.prior, GroupNormalJeffreys)  # the default prior
    with pytest.raises(ConfigError, match=r"prior must be a pyro_bc.priors.Prior \(e.g. make_prior\('ghs'\)\)"):
        BayesLinear(2, 2, "ghs")


def test_posterior_mean_modules_hold_the_expected_weights():
    fc, conv = BayesLinear(5, 3, make_prior("ghs")), BayesConv2d(2, 4, 3, stride=2, padding=1, prior=make_prior("gnj"))
    for layer, kind in ((fc, nn.Linear), (conv, nn.Conv2d)):
        module = layer.posterior_mean_module()
        assert isinstance(module, kind)
        assert torch.equal(module.weight, layer.weight_moments()[0].detach())
        assert torch.equal(module.bias, layer.bias_mean().detach())
    assert torch.equal(fc.bias_mean(), fc.bias_mu)  # linear biases are not scaled
    torch.testing.assert_close(conv.bias_mean(), conv.prior.z_mu * conv.bias_mu)
    module = conv.posterior_mean_module()
    assert (module.stride, module.padding) == ((2, 2), (1, 1))


def test_clip_variances_projects_weight_and_bias_variances():
    layer, free = BayesLinear(3, 2, clip_var=0.04), BayesLinear(3, 2)
    for lyr in (layer, free):
        with torch.no_grad():
            lyr.weight_logvar.copy_(torch.tensor([[0.0, -5.0, -2.0], [-4.0, 1.0, -3.0]]))
            lyr.bias_logvar.fill_(2.0)
        lyr.clip_variances()
    limit = math.log(0.04)
    assert torch.equal(layer.weight_logvar, torch.tensor([[limit, -5.0, limit], [-4.0, limit, limit]]))
    assert torch.equal(layer.bias_logvar, torch.full((2,), limit))
    assert free.weight_logvar[0, 0] == 0.0 and free.bias_logvar[0] == 2.0
