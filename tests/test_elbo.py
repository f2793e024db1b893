"""MeanFieldELBO equals Pyro's TraceMeanField_ELBO; the weight KL that the fused LRT ops hand to it is counted
once; the minibatch ELBO is unbiased for the full batch."""

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceMeanField_ELBO
from torch import nn

from pyro_bc.infer.distributions import NormalLogVar, StandardNormal, summed_kl
from pyro_bc.infer.elbo import MeanFieldELBO
from pyro_bc.infer.reparam import LocalReparameterization
from pyro_bc.nn.layers import BayesLinear
from pyro_bc.nn.network import BayesianNet
from pyro_bc.priors import known_options, make_prior


def _net(prior, likelihood="categorical"):
    pyro.set_rng_seed(11)
    n_out = 3 if likelihood == "categorical" else 1
    prior = make_prior(prior, **known_options(prior, {"tau0": 1e-2}))
    body = nn.Sequential(BayesLinear(4, 5, prior), nn.ReLU(), BayesLinear(5, n_out, prior))
    net = BayesianNet(body, input_shape=(4,), likelihood=likelihood, noise_scale=0.5)
    with torch.no_grad():  # non-trivial guide: visible variances, so draws differ from the means
        for name, p in net.named_parameters():
            if name.endswith("logvar"):
                p.add_(7.0)
    return net


def _data(n, likelihood="categorical"):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, 4, generator=g)
    y = torch.randint(0, 3, (n,), generator=g) if likelihood == "categorical" else torch.randn(n, generator=g)
    return x, y


@pytest.fixture
def validation():
    yield
    pyro.enable_validation(True)


@pytest.mark.parametrize("lrt", [False, True])
@pytest.mark.parametrize("validate", [True, False])
@pytest.mark.parametrize("prior", ["gnj", "ghs", "lu"])
def test_matches_trace_mean_field_elbo(prior, validate, lrt, validation):
    net = _net(prior)
    x, y = _data(8)
    pyro.enable_validation(validate)
    losses = []
    for elbo in (MeanFieldELBO(), TraceMeanField_ELBO()):
        pyro.set_rng_seed(123)
        if lrt:
            with LocalReparameterization():
                losses.append(elbo.differentiable_loss(net.model, net.guide, x, y, 100))
        else:
            losses.append(elbo.differentiable_loss(net.model, net.guide, x, y, 100))
    assert torch.isfinite(losses[0])
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-4)
    # and the gradients agree too
    grads = []
    for elbo in (MeanFieldELBO(), TraceMeanField_ELBO()):
        pyro.set_rng_seed(123)
        net.zero_grad()
        elbo.differentiable_loss(net.model, net.guide, x, y, 100).backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _loss_and_grads(net, x, y) -> tuple[torch.Tensor, list[torch.Tensor]]:
    pyro.set_rng_seed(123)
    net.zero_grad()
    with LocalReparameterization():
        loss = MeanFieldELBO().differentiable_loss(net.model, net.guide, x, y, 100)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in net.parameters()]


@pytest.mark.parametrize("prior", ["gnj", "ghs", "lu"])
def test_fused_weight_kl_is_counted_once(prior, monkeypatch):
    """Under the handler the ELBO takes the weight KL from the fused op; it equals the ELBO that computes the
    KL in closed form from the guide (loss and gradients), which it would miss by the weight KL's size if that
    were counted twice or not at all."""
    net = _net(prior)
    x, y = _data(8)
    with LocalReparameterization():
        guide_trace = poutine.trace(net.guide).get_trace()
        model_trace = poutine.trace(poutine.replay(net.model, trace=guide_trace)).get_trace(x, y, 100)
    weight_kl = 0.0
    for name, site in guide_trace.nodes.items():
        if name.endswith(".w"):
            q, p = site["fn"].base_dist, model_trace.nodes[name]["fn"]
            assert isinstance(q, NormalLogVar) and q.standard_normal_kl is not None  # handed over by the op
            if isinstance(p.base_dist, StandardNormal):
                assert summed_kl(site["fn"], p) is q.standard_normal_kl
                weight_kl += q.standard_normal_kl.item()
            else:  # the lu prior: not a N(0, 1) weight prior, so its own KL
                assert summed_kl(site["fn"], p) is None
    fused_loss, fused_grads = _loss_and_grads(net, x, y)
    # the same ELBO with the hand-over switched off: summed_kl computes the weight KL in closed form
    monkeypatch.setattr(NormalLogVar, "standard_normal_kl", property(lambda self: None, lambda self, value: None))
    closed_loss, closed_grads = _loss_and_grads(net, x, y)
    torch.testing.assert_close(fused_loss, closed_loss, rtol=1e-6, atol=1e-4)
    for a, b in zip(fused_grads, closed_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if prior != "lu":
        assert weight_kl > 100 * (1e-4 + 1e-6 * abs(closed_loss.item()))  # counting it twice or never would show


@pytest.mark.parametrize("prior", ["gnj", "ghs", "lu"])
def test_minibatch_elbo_unbiased(prior):
    n, batch = 64, 16
    net = _net(prior, "normal")
    x, y = _data(n, "normal")
    elbo = MeanFieldELBO()
    with torch.no_grad():
        pyro.set_rng_seed(0)
        guide = poutine.replay(net.guide, trace=poutine.trace(net.guide).get_trace())

        def loss(idx):
            return elbo.differentiable_loss(net.model, guide, x[idx], y[idx], n).double()

        full = loss(torch.arange(n))
        # independent reference for the full-batch loss: KL terms + hand-computed Gaussian NLL
        trace = poutine.trace(poutine.replay(net.model, trace=poutine.trace(guide).get_trace())).get_trace(x, y, n)
        out = trace.nodes["_RETURN"]["value"].squeeze(-1).double()
        nll = (0.5 * ((y.double() - out) / 0.5) ** 2 + torch.log(torch.tensor(0.5 * (2 * torch.pi) ** 0.5))).sum()
        partition = torch.randperm(n).reshape(-1, batch)
        parts = torch.stack([loss(idx) for idx in partition])
        torch.testing.assert_close(parts.mean(), full, rtol=1e-4, atol=0)
        # the full loss minus the NLL is the same (data-free) KL whatever the batch
        kl_full = full - nll
        kl_batch = parts[0] - n / batch * (
            0.5 * ((y[partition[0]].double() - out[partition[0]]) / 0.5) ** 2
            + torch.log(torch.tensor(0.5 * (2 * torch.pi) ** 0.5))).sum()
        torch.testing.assert_close(kl_full, kl_batch, rtol=1e-4, atol=1e-3)
        assert kl_full > 0
        # uniform random minibatches: the mean approaches the full loss within 3 standard errors
        draws = torch.stack([loss(torch.randperm(n)[:batch]) for _ in range(250)])
        se = draws.std() / len(draws) ** 0.5
        assert (draws.mean() - full).abs() < 3 * se, (draws.mean(), full, se)
        assert draws.std() > 0
