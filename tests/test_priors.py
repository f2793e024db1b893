"""Sparsity priors (pyro_bc.priors): moments, log alpha and draws against Monte Carlo, attach, the registry, and a
prior written in this file against the ``Prior`` interface alone.

Monte Carlo uses numpy's generator (not the library's code paths) with 2e5 draws; every tolerance is five
standard errors estimated from the draws themselves.
"""

import math
from collections import OrderedDict

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine
from pyro.distributions import LogNormal
from torch import nn

from pyro_bc.errors import ConfigError
from pyro_bc.infer.distributions import LogNormalLogVar, StandardNormal
from pyro_bc.infer.reparam import LRT_ONLY, group_scale
from pyro_bc.nn.layers import BayesConv2d, BayesLinear
from pyro_bc.nn.network import BayesianNet
from pyro_bc.priors import (
    PRIORS,
    GroupHorseshoe,
    GroupNormalJeffreys,
    LogUniformWeights,
    Prior,
    RegularizedHorseshoe,
    known_options,
    make_prior,
    option_names,
)
from pyro_bc.priors.base import Noise, logvar_init, normal_init
from pyro_bc.train.loop import NegativeELBO, svi_step

N_DRAWS = 200_000
GROUPS = 4
K = 5.0  # tolerance in standard errors


def _stats(draws: np.ndarray):
    """Per column: sample mean and variance with their standard errors (the variance's from the 4th moment)."""
    n = draws.shape[0]
    mean = draws.mean(0)
    centred = draws - mean
    var = (centred**2).mean(0)
    m4 = (centred**4).mean(0)
    return mean, var, np.sqrt(var / n), np.sqrt((m4 - var**2) / n)


def _assert_moments(draws: np.ndarray, mean: torch.Tensor, var: torch.Tensor) -> None:
    m, v, se_m, se_v = _stats(draws)
    np.testing.assert_array_less(np.abs(mean.detach().double().numpy() - m), K * se_m)
    np.testing.assert_array_less(np.abs(var.detach().double().numpy() - v), K * se_v)


def _assert_log_alpha(draws: np.ndarray, log_alpha: torch.Tensor) -> None:
    m, v, se_m, se_v = _stats(draws)
    mc = np.log(v) - 2 * np.log(np.abs(m))
    se = se_v / v + 2 * se_m / np.abs(m)  # delta method, the two terms' errors added
    np.testing.assert_array_less(np.abs(log_alpha.detach().double().numpy() - mc), K * se)


def _set(prior: Prior, **values) -> Prior:
    with torch.no_grad():
        for name, value in values.items():
            getattr(prior, name).copy_(torch.as_tensor(value, dtype=torch.float64))
    return prior


def _gnj() -> GroupNormalJeffreys:
    return _set(GroupNormalJeffreys().attach(GROUPS).double(), z_mu=[0.4, 1.0, -1.5, 2.0],
                z_logvar=np.log([0.05, 0.3, 0.8, 0.1]))


def _horseshoe(prior: GroupHorseshoe) -> GroupHorseshoe:
    """Guide parameters with log z ~ N(m, v), v between 0.09 and 0.45 and m around 0."""
    return _set(prior.attach(GROUPS).double(), sa_mu=-0.4, sa_logvar=math.log(0.2), sb_mu=0.3,
                sb_logvar=math.log(0.1), za_mu=[-1.0, 0.0, 0.5, 1.2], za_logvar=np.log([0.05, 0.3, 0.6, 0.4]),
                zb_mu=[0.2, -0.3, 0.1, 0.4], zb_logvar=np.log([0.01, 0.2, 0.5, 0.6]))


def _horseshoe_z(prior: GroupHorseshoe, rng: np.random.Generator, n: int = N_DRAWS) -> np.ndarray:
    """Draws of z = sqrt(s_a s_b z_a z_b) from the four log-normal guide factors, drawn one by one."""

    def lognormal(mu, logvar, shape):
        mu, sd = mu.detach().double().numpy(), np.exp(0.5 * logvar.detach().double().numpy())
        return np.exp(mu + sd * rng.standard_normal(shape))

    s_a = lognormal(prior.sa_mu, prior.sa_logvar, (n, 1))
    s_b = lognormal(prior.sb_mu, prior.sb_logvar, (n, 1))
    z_a = lognormal(prior.za_mu, prior.za_logvar, (n, GROUPS))
    z_b = lognormal(prior.zb_mu, prior.zb_logvar, (n, GROUPS))
    return np.sqrt(s_a * s_b * z_a * z_b)


def _slab(z: np.ndarray, c: float) -> np.ndarray:
    return c * z / np.sqrt(c * c + z * z)


# -- moments and log alpha against Monte Carlo -----------------------------------------------------------


def test_gnj_moments_and_log_alpha():
    prior = _gnj()
    rng = np.random.default_rng(1)
    mu, sd = prior.z_mu.detach().numpy(), np.exp(0.5 * prior.z_logvar.detach().numpy())
    z = mu + sd * rng.standard_normal((N_DRAWS, GROUPS))
    _assert_moments(z, *prior.scale_moments())
    _assert_log_alpha(z, prior.log_alpha(None, None))


def test_ghs_moments_and_log_alpha():
    prior = _horseshoe(GroupHorseshoe(tau0=1e-3))
    z = _horseshoe_z(prior, np.random.default_rng(2))
    _assert_moments(z, *prior.scale_moments())
    _assert_log_alpha(z, prior.log_alpha(None, None))


@pytest.mark.parametrize("slab_scale", [0.5, 2.0])
def test_rhs_quadrature_moments_and_log_alpha_against_monte_carlo_of_the_slab(slab_scale):
    prior = _horseshoe(RegularizedHorseshoe(tau0=1e-3, slab_scale=slab_scale))
    z = _slab(_horseshoe_z(prior, np.random.default_rng(3)), slab_scale)
    assert z.max() < slab_scale  # the slab bounds every scale
    mean, var = prior.scale_moments()
    _assert_moments(z, mean, var)
    _assert_log_alpha(z, prior.log_alpha(None, None))
    # the slab matters here: the horseshoe's own moments are off by far more than the tolerance
    assert torch.all((GroupHorseshoe.scale_moments(prior)[0] - mean).abs() > 0.04)


def test_lu_log_alpha_per_weight_and_no_group_scale():
    prior = LogUniformWeights().attach(3)
    assert prior.scale_moments() is None and list(prior.parameters()) == [] and prior.per_weight
    mu = torch.tensor([[0.5, -1.0, 2.0], [0.1, 1.5, -0.3]], dtype=torch.float64)
    logvar = torch.log(torch.tensor([[0.1, 0.5, 2.0], [0.02, 0.9, 0.05]], dtype=torch.float64))
    la = prior.log_alpha(mu, logvar)
    assert la.shape == mu.shape
    w = mu.numpy().ravel() + np.exp(0.5 * logvar.numpy().ravel()) * np.random.default_rng(4).standard_normal(
        (N_DRAWS, 6))
    _assert_log_alpha(w, la.ravel())


# -- per-example draws of the local reparameterisation ----------------------------------------------------


def _guides(prior: Prior) -> list:
    """The guide distributions of the prior's scale sites, as the LRT handler sees them (events stripped)."""
    trace = poutine.trace(prior.guide).get_trace("layer")
    guides = []
    for site in trace.nodes.values():
        if site["type"] == "sample":
            fn = site["fn"]
            while isinstance(fn, torch.distributions.Independent):
                fn = fn.base_dist
            guides.append(fn)
    return guides


def _noise(seed: int) -> Noise:
    gen = torch.Generator().manual_seed(seed)
    return lambda shape, like: torch.randn(shape, generator=gen, dtype=like.dtype)


@pytest.mark.parametrize("make", [_gnj, lambda: _horseshoe(GroupHorseshoe(1e-3)),
                                  lambda: _horseshoe(RegularizedHorseshoe(1e-3, slab_scale=1.0))],
                         ids=["gnj", "ghs", "rhs"])
def test_per_example_scale_draws_match_the_moments(make):
    prior = make()
    z = prior.per_example_scale(_guides(prior), N_DRAWS, _noise(5)).detach()
    assert z.shape == (N_DRAWS, GROUPS)
    _assert_moments(z.numpy(), *prior.scale_moments())


def test_ghs_per_example_draws_share_the_global_scale_across_groups():
    """log z[n, i] = log s[n] + log z~[n, i]: two groups' logs covary by Var[log s] = (v_sa + v_sb) / 4."""
    prior = _horseshoe(GroupHorseshoe(1e-3))
    log_z = prior.per_example_scale(_guides(prior), N_DRAWS, _noise(6)).detach().log().numpy()
    v_s = 0.25 * (prior.sa_logvar.exp() + prior.sb_logvar.exp()).item()
    a, b = log_z[:, 0] - log_z[:, 0].mean(), log_z[:, 3] - log_z[:, 3].mean()
    cov, se = (a * b).mean(), (a * b).std() / math.sqrt(N_DRAWS)
    assert abs(cov - v_s) < K * se


# -- posterior and prior draws (the DataTree's) -----------------------------------------------------------


@pytest.mark.parametrize("name", ["gnj", "ghs", "rhs", "lu"])
def test_posterior_draws_shapes_and_moments(name):
    prior = {"gnj": _gnj, "lu": lambda: LogUniformWeights().attach(GROUPS),
             "ghs": lambda: _horseshoe(GroupHorseshoe(1e-3)),
             "rhs": lambda: _horseshoe(RegularizedHorseshoe(1e-3, 1.0))}[name]()
    draws = prior.posterior_draws(N_DRAWS, torch.Generator().manual_seed(7))
    expected = {"gnj": {"z"}, "ghs": {"z", "tau"}, "rhs": {"z", "tau"}, "lu": set()}[name]
    assert set(draws) == expected
    assert all(d.dtype == torch.float64 for d in draws.values())
    if "z" in draws:
        assert draws["z"].shape == (N_DRAWS, GROUPS)
        _assert_moments(draws["z"].numpy(), *prior.scale_moments())
    if "tau" in draws:
        assert draws["tau"].shape == (N_DRAWS,)


@pytest.mark.parametrize("name", ["gnj", "lu"])
def test_improper_priors_have_no_prior_draws(name):
    assert make_prior(name).attach(3).prior_draws(10, torch.Generator().manual_seed(0)) == {}


@pytest.mark.parametrize("tau0", [1e-5, 1e-3, 0.3])
def test_ghs_prior_draws_have_median_tau0(tau0):
    """The median of C+(0, tau0) is tau0, and log z = log tau + log|C(0, 1)| is symmetric about log tau0,
    so a fraction 1/2 of the tau draws and of the z draws lies below tau0 (binomial standard error)."""
    prior = GroupHorseshoe(tau0=tau0).attach(GROUPS)
    draws = prior.prior_draws(N_DRAWS, torch.Generator().manual_seed(8))
    assert draws["tau"].shape == (N_DRAWS,) and draws["z"].shape == (N_DRAWS, GROUPS)
    assert draws["tau"].dtype == draws["z"].dtype == torch.float64
    se = 0.5 / math.sqrt(N_DRAWS)
    assert abs((draws["tau"] < tau0).double().mean().item() - 0.5) < K * se
    below = (draws["z"] < tau0).double().mean(0)
    assert torch.all((below - 0.5).abs() < K * se), below


def test_rhs_prior_draws_are_the_slab_of_the_horseshoe():
    prior = RegularizedHorseshoe(tau0=0.5, slab_scale=1.0).attach(GROUPS)
    draws = prior.prior_draws(N_DRAWS, torch.Generator().manual_seed(9))
    assert draws["z"].max() < 1.0
    se = 0.5 / math.sqrt(N_DRAWS)
    assert abs((draws["tau"] < 0.5).double().mean().item() - 0.5) < K * se
    cut = 1.0 * 0.5 / math.sqrt(1.0 + 0.25)  # the slab is increasing: the median of z_c is slab(tau0)
    below = (draws["z"] < cut).double().mean(0)
    assert torch.all((below - 0.5).abs() < K * se), below


# -- attach: templates and copies --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gnj", "ghs", "rhs"])
def test_attach_gives_each_layer_its_own_parameters(name):
    template = make_prior(name, **known_options(name, {"tau0": 1e-3}))
    assert list(template.parameters()) == [] and template.n_groups == 0
    template.priors(torch.zeros(()))  # a cached prior of the template must not leak into the copies
    a, b = BayesLinear(4, 3, template), BayesLinear(4, 3, template)
    conv = BayesConv2d(2, 5, 3, prior=template)
    assert a.prior is not b.prior and a.prior is not template
    assert (a.prior.n_groups, conv.prior.n_groups) == (4, 5)
    assert a.prior.options() == template.options()
    pa, pb = dict(a.prior.named_parameters()), dict(b.prior.named_parameters())
    assert pa.keys() == pb.keys() and pa
    assert all(pa[k].data_ptr() != pb[k].data_ptr() for k in pa)
    before = {k: v.clone() for k, v in pb.items()}
    with torch.no_grad():
        for p in pa.values():
            p.add_(1.0)
    assert all(torch.equal(pb[k], before[k]) for k in pb)
    assert list(template.parameters()) == []
    for site, dist in a.prior.priors(torch.zeros(())).items():
        if dist.event_shape:
            assert dist.event_shape == (4,), site


# -- the registry ----------------------------------------------------------------------------------------


def test_registry_names_and_classes():
    assert PRIORS == {"gnj": GroupNormalJeffreys, "ghs": GroupHorseshoe, "lu": LogUniformWeights,
                      "rhs": RegularizedHorseshoe}
    assert all(cls.name == name for name, cls in PRIORS.items())
    assert {name: cls.default_threshold for name, cls in PRIORS.items()} == {"gnj": -3.0, "ghs": -3.0, "lu": 3.0,
                                                                          "rhs": -3.0}


def _one_line_config_error(match: str, *args, **kwargs) -> str:
    with pytest.raises(ConfigError, match=match) as info:
        make_prior(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_make_prior_unknown_name():
    message = _one_line_config_error("unknown prior 'bogus'", "bogus")
    assert all(name in message for name in PRIORS)


@pytest.mark.parametrize("name, option", [("ghs", {"tau0": 0.0}), ("ghs", {"tau0": -1e-5}), ("rhs", {"tau0": 0.0}),
                                          ("ghs", {"tau0": math.nan}), ("ghs", {"tau0": math.inf}),
                                          ("rhs", {"slab_scale": 0.0}), ("rhs", {"slab_scale": -2.0})])
def test_make_prior_bad_option(name, option):
    (key, value), = option.items()
    message = _one_line_config_error(key, name, **option)
    assert message.startswith(f"prior {name}: ") and str(value) in message


def test_make_prior_refuses_options_a_prior_does_not_take_and_passes_objects_through():
    with pytest.raises(ConfigError, match=r"^prior gnj has no option 'slab_scale' \(it takes none\)$"):
        make_prior("gnj", tau0=-1.0, slab_scale=0.0)
    assert option_names("rhs") == ("tau0", "slab_scale") and option_names("lu") == ()
    assert known_options("ghs", {"tau0": 1.0, "slab_scale": 2.0}) == {"tau0": 1.0}
    prior = GroupHorseshoe(tau0=2e-4)
    assert make_prior(prior) is prior


@pytest.mark.parametrize("name", list(PRIORS))
def test_options_round_trip_through_make_prior(name):
    expected = {"gnj": {}, "lu": {}, "ghs": {"tau0": 3e-4}, "rhs": {"tau0": 3e-4, "slab_scale": 2.5}}[name]
    prior = make_prior(name, **expected)
    assert prior.options() == expected
    again = make_prior(prior.name, **prior.options())
    assert type(again) is type(prior) and again.options() == prior.options()
    assert all(f"{k}={v:g}" in repr(prior) for k, v in expected.items())


# -- a new prior against the interface alone -------------------------------------------------------------


class GroupLogNormal(Prior):
    """A proper prior, not shipped: z ~ LogNormal(0, scale^2) per group, guide z ~ LogNormal(mu, exp(logvar))."""

    name = "test-lognormal"
    per_example_calls = 0

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.prior_scale = float(scale)

    def options(self):
        return {"scale": self.prior_scale}

    def reset_parameters(self):
        self.z_mu = normal_init((self.n_groups,), 0.0)
        self.z_logvar = logvar_init((self.n_groups,))

    def weight_prior(self, like):
        return StandardNormal(like)

    def site_priors(self, like):
        return {"z": LogNormal(like.new_zeros(()), like.new_full((), self.prior_scale))
                .expand([self.n_groups]).to_event(1)}

    def model(self, site, priors):
        return group_scale(self, pyro.sample(f"{site}.z", priors["z"]))

    def guide(self, site):
        pyro.sample(f"{site}.z", LogNormalLogVar(self.z_mu, self.z_logvar).to_event(1), infer=LRT_ONLY)

    def per_example_scale(self, guides, n, noise):
        GroupLogNormal.per_example_calls += 1
        (q,) = guides
        return torch.exp(q.loc + q.scale * noise(torch.Size((n,)) + q.loc.shape, q.loc))

    def scale_moments(self):
        m, v = self.z_mu, self.z_logvar.exp()
        return torch.exp(m + v / 2), torch.expm1(v) * torch.exp(2 * m + v)

    def log_alpha(self, weight_mu, weight_logvar):
        return torch.log(torch.expm1(self.z_logvar.exp()))


def test_a_prior_written_against_the_interface_trains_a_network():
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    net = BayesianNet(nn.Sequential(OrderedDict(fc=BayesLinear(4, 2, GroupLogNormal(scale=1.0)))), (4,))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 4, generator=gen)
    y = (x[:, 0] > 0).long()  # only input 0 matters
    sites = [n for n, s in poutine.trace(net.model).get_trace(x, y, 256).nodes.items() if s["type"] == "sample"]
    assert sites[:3] == ["fc.z", "fc.w", "fc.b"]
    start_mu = net.layers[0].prior.z_mu.detach().clone()
    calls = GroupLogNormal.per_example_calls

    loss, optimizer = NegativeELBO(net), torch.optim.Adam(net.parameters(), lr=0.05)  # the trainer's step
    losses = [svi_step(loss, optimizer, net, x, y, 256).item() for _ in range(150)]
    assert GroupLogNormal.per_example_calls == calls + 150  # the LRT drew z per example through the prior
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])  # -ELBO / N fell
    assert not torch.equal(net.layers[0].prior.z_mu, start_mu)  # the prior's parameters were trained
    net.guide()
    assert pyro.get_param_store().get_param("bc$$$body.fc.prior.z_mu") is net.layers[0].prior.z_mu
    mean_net = net.posterior_mean_network()
    assert (mean_net(x).argmax(-1) == y).float().mean() > 0.95
    la = net.layers[0].log_alpha()
    assert la.shape == (4,) and torch.isfinite(la).all()


def test_the_prior_contract_is_an_abstract_base():
    class Incomplete(Prior):
        name = "incomplete"

        def weight_prior(self, like):
            return StandardNormal(like)

    with pytest.raises(TypeError, match="abstract method.*log_alpha"):
        Incomplete()


def test_what_a_group_is_comes_from_the_prior_not_from_a_shape():
    from pyro_bc.compression.posterior import LayerPosterior, analyse

    for name, per_weight in (("lu", True), ("gnj", False)):
        torch.manual_seed(0)
        net = BayesianNet(nn.Sequential(nn.Flatten(), BayesLinear(3, 3, make_prior(name))), (3,))
        [post] = analyse(net)  # a 3 x 3 layer: per-group and per-weight log alpha are told apart by the prior
        assert post.per_weight is per_weight and post.log_alpha.shape == ((3, 3) if per_weight else (3,))
    with pytest.raises(ValueError, match=r"^l: log alpha of shape \(3,\), expected \(3, 3\) \(per weight\)"):
        LayerPosterior("l", "linear", torch.zeros(3), torch.zeros(3, 3), torch.zeros(3, 3), torch.zeros(3), 1,
                       per_weight=True)
