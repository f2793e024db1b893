"""The local reparameterisation (LRT) path agrees in distribution with explicit weight sampling.

Reference: weights drawn directly from the guide's Normal/LogNormal factors in one batch and the
outputs computed by hand (einsum over input patches), independent of ``pyro_bc.infer.reparam``.
"""

import math

import pyro
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine

from pyro_bc.infer.reparam import LocalReparameterization
from pyro_bc.nn.layers import BayesConv1d, BayesConv2d, BayesLinear
from pyro_bc.priors import known_options, make_prior

S = 50000
TAU0 = 1e-3


def _set_params(layer):
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        layer.weight_mu.copy_(torch.randn(layer.weight_mu.shape, generator=g))
        layer.weight_logvar.copy_(-3 + 0.3 * torch.randn(layer.weight_logvar.shape, generator=g))
        layer.bias_mu.copy_(torch.randn(layer.bias_mu.shape, generator=g))
        layer.bias_logvar.copy_(-3 + 0.3 * torch.randn(layer.bias_logvar.shape, generator=g))
        prior = layer.prior
        if prior.name == "gnj":
            prior.z_mu.copy_(0.5 + torch.rand(prior.z_mu.shape, generator=g))
            prior.z_logvar.copy_(-2 + 0.3 * torch.randn(prior.z_logvar.shape, generator=g))
        elif prior.name in ("ghs", "rhs"):
            prior.sa_mu.fill_(2 * math.log(TAU0) + 0.1)
            prior.sb_mu.fill_(-2 * math.log(TAU0) - 0.2)
            prior.sa_logvar.fill_(-2.0)
            prior.sb_logvar.fill_(-2.5)
            for name in ("za", "zb"):
                getattr(prior, f"{name}_mu").copy_(0.3 * torch.randn(layer.n_groups, generator=g))
                getattr(prior, f"{name}_logvar").copy_(-2 + 0.3 * torch.randn(layer.n_groups, generator=g))


def _make(kind, prior):
    prior = make_prior(prior, **known_options(prior, {"tau0": TAU0}))
    layer = {"linear": lambda: BayesLinear(5, 3, prior), "conv": lambda: BayesConv2d(2, 3, 3, prior=prior),
             "conv1d": lambda: BayesConv1d(2, 3, 3, prior=prior)}[kind]()
    _set_params(layer)
    return layer


def _input(kind):
    g = torch.Generator().manual_seed(3)
    return torch.randn({"linear": (1, 5), "conv": (1, 2, 5, 5), "conv1d": (1, 2, 7)}[kind], generator=g)


def _normal(mu, logvar, n):
    return mu + (0.5 * logvar).exp() * torch.randn((n,) + tuple(mu.shape))


def _draw_explicit(layer, n):
    """n independent draws (z, w~, b) from the guide factors, straight from their definitions."""
    with torch.no_grad():
        w = _normal(layer.weight_mu, layer.weight_logvar, n)
        b = _normal(layer.bias_mu, layer.bias_logvar, n)
        p = layer.prior
        if p.name == "gnj":
            z = _normal(p.z_mu, p.z_logvar, n)
        elif p.name in ("ghs", "rhs"):
            log_sa = _normal(p.sa_mu, p.sa_logvar, n)
            log_sb = _normal(p.sb_mu, p.sb_logvar, n)
            log_za = _normal(p.za_mu, p.za_logvar, n)
            log_zb = _normal(p.zb_mu, p.zb_logvar, n)
            z = torch.exp(0.5 * (log_sa[:, None] + log_sb[:, None] + log_za + log_zb))
            if p.name == "rhs":  # the slab, written out: c z / sqrt(c^2 + z^2)
                z = p.slab_scale * z / torch.sqrt(p.slab_scale**2 + z**2)
        else:
            z = None
    return z, w, b


def _hand_output(kind, x, z, w, b):
    """Outputs (n, units) from per-draw values: linear y_o = sum_i x_i z_i w_oi + b_o;
    conv y_o,p = z_o (sum_k W_o,k patch_k,p + b_o)."""
    n = w.shape[0]
    if kind == "linear":
        xz = x[0].expand(n, -1) if z is None else x[0] * z
        return torch.einsum("si,soi->so", xz, w) + b
    # (in * kernel taps, positions): a 1-D input as an image of height one
    patches = F.unfold(x, kernel_size=3)[0] if x.dim() == 4 else F.unfold(x[:, :, None], kernel_size=(1, 3))[0]
    y = torch.einsum("sok,kp->sop", w.reshape(n, w.shape[1], -1), patches) + b[:, :, None]
    if z is not None:
        y = y * z[:, :, None]
    return y.reshape(n, -1)


def _moments(y):
    y = y.double()
    mean, var = y.mean(0), y.var(0)
    se_mean = (var / len(y)).sqrt()
    se_var = ((y - mean) ** 2).var(0).div(len(y)).sqrt()
    return mean, var, se_mean, se_var


@pytest.mark.parametrize("prior", ["gnj", "ghs", "lu", "rhs"])
@pytest.mark.parametrize("kind", ["linear", "conv", "conv1d"])
def test_lrt_matches_explicit_sampling_moments(kind, prior):
    pyro.set_rng_seed(0)
    layer, x = _make(kind, prior), _input(kind)
    ref = _hand_output(kind, x, *_draw_explicit(layer, S))
    with torch.no_grad(), LocalReparameterization():
        guide_trace = poutine.trace(layer.guide).get_trace()
        lrt = poutine.replay(layer, trace=guide_trace)(x.expand((S,) + x.shape[1:]).contiguous()).reshape(S, -1)
    m1, v1, sm1, sv1 = _moments(ref)
    m2, v2, sm2, sv2 = _moments(lrt)
    z_mean = (m1 - m2).abs() / (sm1**2 + sm2**2).sqrt()
    z_var = (v1 - v2).abs() / (sv1**2 + sv2**2).sqrt()
    assert z_mean.max() < 4, (kind, prior, m1, m2)
    assert z_var.max() < 4, (kind, prior, v1, v2)
    assert ((v1 - v2).abs() / v1).max() < 0.05


@pytest.mark.parametrize("prior", ["gnj", "ghs", "lu", "rhs"])
@pytest.mark.parametrize("kind", ["linear", "conv", "conv1d"])
def test_handler_off_is_explicit_sampling(kind, prior):
    pyro.set_rng_seed(1)
    layer = _make(kind, prior)
    x = _input(kind).repeat(4, *([1] * (_input(kind).dim() - 1)))
    x = x + torch.randn_like(x)
    with torch.no_grad():
        guide_trace = poutine.trace(layer.guide).get_trace()
        y = poutine.replay(layer, trace=guide_trace)(x)
    site = layer.site
    vals = {name.split(".")[-1]: node["value"] for name, node in guide_trace.nodes.items() if node["type"] == "sample"}
    w, b = vals["w"], vals["b"]
    # the draws are genuine draws, not the means
    assert not torch.equal(w, layer.weight_mu) and not torch.equal(b, layer.bias_mu)
    if prior == "gnj":
        z = vals["z"]
        assert not torch.equal(z, layer.prior.z_mu)  # drawn: lrt_only acts under the LRT only
    elif prior in ("ghs", "rhs"):
        assert not torch.equal(vals["z_a"], layer.prior.za_mu.exp())  # drawn: lrt_only acts under the LRT only
        z = torch.sqrt(vals["s_a"] * vals["s_b"] * vals["z_a"] * vals["z_b"])
        if prior == "rhs":
            z = z / torch.sqrt(1 + z**2)  # slab width 1
    else:
        z = None
        assert f"{site}.z" not in guide_trace.nodes
    for i in range(len(x)):
        expected = _hand_output(kind, x[i:i + 1], None if z is None else z[None], w[None], b[None])[0]
        torch.testing.assert_close(y[i].reshape(-1), expected, rtol=1e-5, atol=1e-5)
