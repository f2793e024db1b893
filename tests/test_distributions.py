"""Tests for :mod:`pyro_bc.infer.distributions`: priors, KL rules and their dispatch, checked against independent numerics."""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Predictive, TraceMeanField_ELBO
from torch.distributions import kl_divergence
from torch.distributions.kl import _dispatch_kl

from pyro_bc.infer.distributions import (
    LogNormalLogVar,
    LogUniform,
    NormalLogVar,
    StandardNormal,
    half_cauchy_gamma,
    half_cauchy_inverse_gamma,
    kl_lognormal_gamma,
    kl_lognormal_inverse_gamma,
    kl_normal_log_uniform,
    log_alpha,
    summed_kl,
)

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    pyro.set_rng_seed(0)
    np.random.seed(0)


def _expected_log_abs_normal(sigma: float, n: int = 400_001) -> float:
    """``E[log|z|]`` for ``z ~ N(1, sigma^2)`` by quadrature, with the log singularity removed analytically.

    With ``z = 1 + sigma u``, ``log|z| = log sigma + log|u - u0|`` where ``u0 = -1 / sigma``. On each side of
    ``u0`` substitute ``u = u0 +- t^2``: the integrand ``4 t log(t) phi(u)`` is then continuous at ``t = 0``.
    """
    u0 = -1.0 / sigma
    lo, hi = -12.0, 12.0
    total = 0.0
    for sign, length in ((1.0, hi - u0), (-1.0, u0 - lo)):
        if length <= 0:
            continue
        t = np.linspace(0.0, math.sqrt(length), n)
        u = u0 + sign * t**2
        f = 4.0 * t * np.log(np.where(t > 0, t, 1.0)) * np.exp(-0.5 * u**2) / math.sqrt(2 * math.pi)
        total += np.trapezoid(f, t)
    return math.log(sigma) + total


def test_quadrature_against_closed_form() -> None:
    # For sigma -> infinity, E[log|z|] - log sigma -> E[log|u|] = -(euler_gamma + log 2) / 2 for u ~ N(0, 1).
    assert _expected_log_abs_normal(1e8) - math.log(1e8) == pytest.approx(-(np.euler_gamma + math.log(2)) / 2, abs=1e-6)
    # For sigma -> 0, E[log|z|] = E[log(1 + sigma u)] -> -sigma^2 / 2.
    assert _expected_log_abs_normal(1e-2) == pytest.approx(-0.5e-4, rel=1e-3)


def test_normal_log_uniform_matches_numerical_kl() -> None:
    log_alphas = np.linspace(-8.0, 8.0, 17)
    # Exact KL(N(1, alpha) || 1/|z|) up to a constant: -H(q) + E[log|z|] = -0.5 log alpha + E[log|z|] + const.
    exact = np.array([-0.5 * la + _expected_log_abs_normal(math.exp(0.5 * la)) for la in log_alphas])
    scale = torch.tensor(np.exp(0.5 * log_alphas))
    approx = kl_divergence(dist.Normal(torch.ones_like(scale), scale), LogUniform().expand([len(log_alphas)]))
    approx = approx.numpy()
    np.testing.assert_allclose(approx - approx[-1], exact - exact[-1], atol=0.02)
    np.testing.assert_allclose(approx[0] - approx[8], exact[0] - exact[8], atol=0.02)
    assert abs(approx[-1]) < 0.01  # the constant makes KL -> 0 as alpha -> infinity


def test_log_alpha_and_broadcasting() -> None:
    loc, scale = torch.tensor([2.0, -0.5]), torch.tensor([1.0, 0.25])
    torch.testing.assert_close(log_alpha(2 * torch.log(scale), loc), torch.log(scale**2 / (loc**2 + 1e-8)))
    kl = kl_divergence(dist.Normal(loc, scale), LogUniform().expand([3, 2]))
    assert kl.shape == (3, 2)
    torch.testing.assert_close(kl[1], kl_normal_log_uniform(dist.Normal(loc, scale), LogUniform()))
    assert kl_divergence(dist.Normal(loc[:1], scale[:1]), LogUniform().expand([4])).shape == (4,)


def _mc_kl(p: torch.distributions.Distribution, q: torch.distributions.Distribution, n: int) -> tuple[float, float]:
    x = p.sample((n,))
    d = p.log_prob(x) - q.log_prob(x)
    return d.mean().item(), (d.std() / math.sqrt(n)).item()


@pytest.mark.parametrize(
    ("mu", "s", "a", "b"),
    [
        (0.1, 0.5, 2.0, 3.0),
        (-0.7, 1.0, 0.5, 1.0),
        (math.log(0.5 * 0.3**2), 0.6, 0.5, 1.0 / 0.3**2),  # horseshoe: Gamma(1/2, rate 1/tau0^2), tau0 = 0.3
    ],
)
def test_lognormal_gamma_vs_monte_carlo(mu: float, s: float, a: float, b: float) -> None:
    p = dist.LogNormal(torch.tensor(mu, dtype=torch.float64), torch.tensor(s, dtype=torch.float64))
    q = dist.Gamma(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64))
    assert _dispatch_kl(type(p), type(q)) is kl_lognormal_gamma
    mc, se = _mc_kl(p, q, 1_000_000)
    assert abs(kl_divergence(p, q).item() - mc) < 3 * se


@pytest.mark.parametrize(
    ("mu", "s", "a", "b"),
    [
        (0.3, 0.4, 0.5, 1.0),  # horseshoe: InverseGamma(1/2, 1)
        (-1.0, 0.8, 0.5, 1.0),
        (0.5, 0.3, 3.0, 2.0),
    ],
)
def test_lognormal_inverse_gamma_vs_monte_carlo(mu: float, s: float, a: float, b: float) -> None:
    p = dist.LogNormal(torch.tensor(mu, dtype=torch.float64), torch.tensor(s, dtype=torch.float64))
    q = dist.InverseGamma(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64))
    assert _dispatch_kl(type(p), type(q)) is kl_lognormal_inverse_gamma
    mc, se = _mc_kl(p, q, 1_000_000)
    assert abs(kl_divergence(p, q).item() - mc) < 3 * se


def test_kl_dispatch_through_to_event() -> None:
    p = dist.LogNormal(torch.tensor([0.1, -0.3, 0.2]), torch.tensor([0.3, 0.5, 0.7]))
    ig = half_cauchy_inverse_gamma(p.loc, [3])
    ga = half_cauchy_gamma(0.3, p.loc, [3])
    assert isinstance(ig, dist.InverseGamma) and ig.batch_shape == (3,)
    assert isinstance(ga, dist.Gamma) and ga.batch_shape == (3,)
    torch.testing.assert_close(kl_divergence(p.to_event(1), ig.to_event(1)), kl_lognormal_inverse_gamma(p, ig).sum())
    torch.testing.assert_close(kl_divergence(p.to_event(1), ga.to_event(1)), kl_lognormal_gamma(p, ga).sum())


def test_lognormal_logvar_is_lognormal() -> None:
    loc, logvar = torch.tensor([0.2, -1.0, 0.5], dtype=torch.float64), torch.tensor([-2.0, 0.3, -0.7], dtype=torch.float64)
    p, ref = LogNormalLogVar(loc, logvar), dist.LogNormal(loc, (0.5 * logvar).exp())
    x = torch.tensor([0.5, 1.3, 2.0], dtype=torch.float64)
    torch.testing.assert_close(p.log_prob(x), ref.log_prob(x))
    torch.testing.assert_close(p.mean, ref.mean)
    torch.testing.assert_close(p.variance, ref.variance)
    assert p.batch_shape == ref.batch_shape and p.event_shape == ref.event_shape == ()
    torch.manual_seed(0)
    draws = p.rsample((200_000,))
    torch.testing.assert_close(draws.log().mean(0), loc, atol=0.02, rtol=0)  # E[log x] = loc
    torch.testing.assert_close(draws.log().var(0), logvar.exp(), atol=0.02, rtol=0.02)
    wide = p.expand((4, 3))
    assert isinstance(wide, LogNormalLogVar) and wide.batch_shape == (4, 3)
    torch.testing.assert_close(wide.log_prob(x), ref.log_prob(x).expand(4, 3))


@pytest.mark.parametrize("prior", ["gamma", "inverse_gamma"])
def test_lognormal_logvar_kl_vs_monte_carlo(prior: str) -> None:
    loc, logvar = torch.tensor(0.3, dtype=torch.float64), torch.tensor(math.log(0.4**2), dtype=torch.float64)
    half, one = torch.tensor(0.5, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    q = dist.Gamma(half, one / 0.3**2) if prior == "gamma" else dist.InverseGamma(half, one)
    p = LogNormalLogVar(loc, logvar)
    mc, se = _mc_kl(dist.LogNormal(loc, (0.5 * logvar).exp()), q, 1_000_000)
    assert abs(kl_divergence(p, q).item() - mc) < 3 * se


def test_gamma_prior_constant_cached_only_for_constants() -> None:
    """The KL's prior constant is kept on a constant prior (reused each step) and recomputed for a learnt one."""
    p = LogNormalLogVar(torch.zeros(3), torch.full((3,), -1.0))
    fixed = dist.Gamma(torch.tensor(0.5), torch.tensor(4.0)).expand([3])
    first = kl_divergence(p, fixed)
    torch.testing.assert_close(kl_divergence(p, fixed), first)
    torch.testing.assert_close(first, kl_divergence(dist.LogNormal(p.loc, p.scale), dist.Gamma(0.5, 4.0)).expand(3))
    rate = torch.tensor(4.0, requires_grad=True)
    learnt = dist.Gamma(torch.tensor(0.5), rate)
    kl_divergence(p, learnt).sum().backward()
    # d/db of 3 * (-a log b + b E[x]) at a = 1/2, E[x] = exp(mu + s^2 / 2)
    torch.testing.assert_close(rate.grad, torch.tensor(3 * (-0.5 / 4.0 + math.exp(0.5 * math.exp(-1.0)))))
    with torch.no_grad():
        rate.fill_(2.0)
    torch.testing.assert_close(kl_divergence(p, learnt), kl_divergence(dist.LogNormal(p.loc, p.scale), dist.Gamma(0.5, 2.0)))


@pytest.mark.parametrize("tau", [0.3, 1e-5])
def test_gamma_inverse_gamma_gives_half_cauchy(tau: float) -> None:
    n = 2_000_000
    tau_t = torch.tensor(tau, dtype=torch.float64)
    s_a = dist.Gamma(torch.tensor(0.5, dtype=torch.float64), tau_t**-2).sample((n,))
    s_b = dist.InverseGamma(torch.tensor(0.5, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)).sample((n,))
    s = torch.sqrt(s_a * s_b).numpy()
    qs = np.array([0.1, 0.25, 0.5, 0.75, 0.9])
    np.testing.assert_allclose(np.quantile(s, qs), tau * np.tan(np.pi * qs / 2), rtol=0.01)
    # The helpers use exactly this parametrisation.
    like = torch.zeros(())
    ga, ig = half_cauchy_gamma(tau, like), half_cauchy_inverse_gamma(like)
    torch.testing.assert_close(ga.concentration, torch.tensor(0.5))
    torch.testing.assert_close(ga.rate, torch.tensor(tau**-2, dtype=torch.float32))
    torch.testing.assert_close((ig.concentration, ig.rate), (torch.tensor(0.5), torch.tensor(1.0)))


def test_log_uniform_basics() -> None:
    z = torch.tensor([0.5, -2.0, 3.0])
    lu = LogUniform()
    torch.testing.assert_close(lu.log_prob(z), torch.tensor([math.log(2.0), -math.log(2.0), -math.log(3.0)]))
    expanded = lu.expand([3])
    assert type(expanded) is LogUniform and expanded.batch_shape == (3,)
    ind = expanded.to_event(1)
    torch.testing.assert_close(ind.log_prob(z), -z.abs().log().sum())
    ev = LogUniform(event_shape=(3,))
    torch.testing.assert_close(ev.log_prob(z), -z.abs().log().sum())
    x = LogUniform().expand([2, 3]).sample((4,))
    assert x.shape == (4, 2, 3) and torch.isfinite(x).all()
    assert ind.sample().shape == (3,)
    assert torch.isnan(lu.mean) and torch.isnan(lu.variance)
    loc, scale = torch.tensor([1.0, -0.2, 0.05]), torch.tensor([0.1, 0.3, 1.0])
    kl = kl_divergence(dist.Normal(loc, scale).to_event(1), ind)
    elementwise = torch.stack([kl_divergence(dist.Normal(m, s), LogUniform()) for m, s in zip(loc, scale)])
    torch.testing.assert_close(kl, elementwise.sum())


def _model() -> None:
    pyro.sample("z", LogUniform().expand([4]).to_event(1))


def _guide() -> None:
    pyro.sample("z", dist.Normal(torch.full((4,), 0.5), 0.1).to_event(1))


def test_predictive_with_guide_and_prior() -> None:
    post = Predictive(_model, guide=_guide, num_samples=5)()
    assert post["z"].shape == (5, 4)
    assert torch.isfinite(post["z"]).all()
    prior = Predictive(_model, num_samples=3)()
    assert prior["z"].shape[0] == 3 and torch.isfinite(prior["z"]).all()


def test_mean_field_elbo_uses_registered_kls() -> None:
    y = torch.tensor([0.3, -1.2, 2.0])
    w_loc, w_scale = torch.tensor([0.4, -0.1, 1.5]), torch.tensor([0.2, 0.5, 0.05])
    a_loc, a_scale = torch.tensor(-2.0), torch.tensor(0.4)
    b_loc, b_scale = torch.tensor(0.2), torch.tensor(0.7)
    tau0 = 0.3

    def model() -> None:
        w = pyro.sample("w", LogUniform().expand([3]).to_event(1))
        s_a = pyro.sample("s_a", half_cauchy_gamma(tau0, torch.zeros(())))
        s_b = pyro.sample("s_b", half_cauchy_inverse_gamma(torch.zeros(())))
        pyro.sample("y", dist.Normal(w * torch.sqrt(s_a * s_b), 1.0).to_event(1), obs=y)

    def guide() -> None:
        pyro.sample("w", dist.Normal(w_loc, w_scale).to_event(1))
        pyro.sample("s_a", dist.LogNormal(a_loc, a_scale))
        pyro.sample("s_b", dist.LogNormal(b_loc, b_scale))

    pyro.set_rng_seed(123)
    loss = TraceMeanField_ELBO().loss(model, guide)
    pyro.set_rng_seed(123)
    tr = poutine.trace(guide).get_trace()
    w, s_a, s_b = (tr.nodes[k]["value"] for k in ("w", "s_a", "s_b"))
    mean = (w * torch.sqrt(s_a * s_b)).double()
    log_lik = (-0.5 * (y.double() - mean) ** 2 - 0.5 * math.log(2 * math.pi)).sum().item()

    # Independent reference values for the KLs, written out from the closed forms.
    la = np.log(w_scale.double().numpy() ** 2 / (w_loc.double().numpy() ** 2 + 1e-8))
    kl_w = np.sum(0.63576 - 0.63576 / (1 + np.exp(-(1.87320 + 1.48695 * la))) + 0.5 * np.log1p(np.exp(-la)))

    def kl_ln(mu: float, s: float, a: float, b: float, sign: int) -> float:
        return (
            -0.5 * math.log(2 * math.pi * math.e * s**2)
            - a * math.log(b)
            + math.lgamma(a)
            - sign * a * mu
            + b * math.exp(sign * mu + s**2 / 2)
        )

    kl_a = kl_ln(a_loc.item(), a_scale.item(), 0.5, tau0**-2, 1)
    kl_b = kl_ln(b_loc.item(), b_scale.item(), 0.5, 1.0, -1)
    assert loss == pytest.approx(kl_w + kl_a + kl_b - log_lik, abs=1e-5, rel=1e-6)


def test_normal_logvar_matches_normal_and_its_kl():
    """NormalLogVar is Normal(loc, exp(logvar/2)); its fast KL equals torch's generic Normal rule."""
    torch.manual_seed(11)
    from pyro_bc.infer.distributions import NormalLogVar

    loc, logvar = torch.randn(4, 5), torch.randn(4, 5) - 2
    p, ref = NormalLogVar(loc, logvar), dist.Normal(loc, (0.5 * logvar).exp())
    x = torch.randn(4, 5)
    assert torch.allclose(p.log_prob(x), ref.log_prob(x), atol=1e-6)
    assert torch.allclose(p.scale, ref.scale) and torch.allclose(p.variance, ref.variance)
    assert p.expand([3, 4, 5]).logvar.shape == (3, 4, 5)
    generic = torch.distributions.kl._kl_normal_normal
    for q in (dist.Normal(0.0, 1.0).expand([4, 5]), dist.Normal(torch.randn(4, 5), torch.rand(4, 5) + 0.5),
              dist.Normal(torch.tensor(0.3), torch.tensor(2.0)).expand([4, 5])):
        assert torch.allclose(kl_divergence(p, q), generic(ref, q), atol=1e-5)
    q = dist.LogNormal(0.0, 1.0)  # unrelated pair: no rule, as for Normal
    with pytest.raises(NotImplementedError):
        kl_divergence(p, q)


@pytest.mark.parametrize("m, s, standard", [(0.0, 1.0, False), (0.3, 2.5, False), (0.0, 1.0, True)])
def test_summed_kl_matches_torch_normal_kl(m, s, standard):
    """The closed-form sum equals torch's own Normal-Normal KL summed elementwise, value and gradients."""
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(7, 5, generator=g).requires_grad_()
    logvar = (torch.randn(7, 5, generator=g) - 3).requires_grad_()
    base = StandardNormal(mu) if standard else dist.Normal(torch.tensor(m), torch.tensor(s))
    prior = base.expand([7, 5]).to_event(2)
    fast = summed_kl(NormalLogVar(mu, logvar).to_event(2), prior)
    fast_grads = torch.autograd.grad(fast, (mu, logvar))
    reference = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu, (0.5 * logvar).exp()), torch.distributions.Normal(m, s)).sum()
    reference_grads = torch.autograd.grad(reference, (mu, logvar))
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)
    for a, b in zip(fast_grads, reference_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_standard_normal_is_normal_0_1():
    """Same log density and moments as ``Normal(0, 1)``; keeps its type through ``expand``; follows ``like``."""
    x = torch.linspace(-3, 3, 11, dtype=torch.float64)
    standard = StandardNormal(x).expand([11])
    assert isinstance(standard, StandardNormal) and standard.batch_shape == (11,)
    assert standard.loc.dtype == torch.float64 and not standard.loc.requires_grad
    torch.testing.assert_close(standard.log_prob(x), -0.5 * x**2 - 0.5 * math.log(2 * math.pi))
    assert torch.equal(standard.mean, torch.zeros(11, dtype=torch.float64))
    assert torch.equal(standard.stddev, torch.ones(11, dtype=torch.float64))


def test_summed_kl_declines_what_it_cannot_sum():
    mu, logvar = torch.zeros(3, 4), torch.zeros(3, 4)
    q = NormalLogVar(mu, logvar)
    assert summed_kl(q, dist.Normal(torch.randn(3, 4), 1.0)) is None  # prior loc varies per element
    assert summed_kl(q.to_event(2), dist.Normal(0.0, 1.0).expand([3, 4]).to_event(1)) is None  # event dims differ
    assert summed_kl(dist.Normal(mu, 1.0), dist.Normal(0.0, 1.0).expand([3, 4])) is None  # not a NormalLogVar
    assert summed_kl(q, LogUniform().expand([3, 4])) is None


def _validating_kinds(validate: bool):
    """Each of the module's distributions built with ``validate_args=validate``, and a value outside its support."""
    nan = torch.tensor(math.nan)
    return [
        (LogUniform((2,), validate_args=validate), nan),
        (LogUniform(validate_args=validate).expand((2,)), nan),  # expand keeps the setting
        (NormalLogVar(torch.zeros(2), torch.zeros(2), validate_args=validate), nan),
        (LogNormalLogVar(torch.zeros(2), torch.zeros(2), validate_args=validate), torch.tensor(-1.0)),
        (StandardNormal(torch.zeros(2), validate_args=validate).expand((2,)), nan),
    ]


def test_validate_args_is_honoured_both_ways():
    """``validate_args=False`` scores a value outside the support (NaN); ``True`` refuses it, whatever the default."""
    for d, bad in _validating_kinds(False):
        assert torch.isnan(d.log_prob(bad)).all(), type(d).__name__
    for d, bad in _validating_kinds(True):
        with pytest.raises(ValueError, match="support"):
            d.log_prob(bad)


@pytest.mark.parametrize("base", [LogUniform, NormalLogVar, LogNormalLogVar, StandardNormal])
def test_subclasses_extend_expand_through_the_instance_argument(base):
    """torch's ``expand(batch_shape, _instance)`` protocol: a subclass with its own ``__init__`` and state
    passes its instance down, and each class fills that instance rather than making one of its own type."""

    class Tagged(base):
        def __init__(self, *args, tag: str = "", **kwargs):
            super().__init__(*args, **kwargs)
            self.tag = tag

        def expand(self, batch_shape, _instance=None):
            new = self._get_checked_instance(Tagged, _instance)
            new.tag = self.tag
            return super().expand(batch_shape, _instance=new)

    args = {LogUniform: ((2,),), StandardNormal: (torch.zeros(()),)}.get(base, (torch.zeros(2), torch.zeros(2)))
    wide = Tagged(*args, tag="t").expand((3, 2))
    assert type(wide) is Tagged and wide.tag == "t" and wide.batch_shape == (3, 2)
    x = torch.tensor([0.5, 2.0])
    standard = -0.5 * x**2 - 0.5 * math.log(2 * math.pi)  # N(0, 1); LogNormal(0, 1): N(0, 1) of log x, over x
    lognormal = -0.5 * x.log() ** 2 - 0.5 * math.log(2 * math.pi) - x.log()
    expected = {LogUniform: -x.log(), LogNormalLogVar: lognormal}.get(base, standard)
    torch.testing.assert_close(wide.log_prob(x), expected.expand(3, 2))


def test_log_uniform_log_prob_sums_only_the_event_dims_and_fills_the_batch():
    """Rows of a batch of events keep their own sums; a scalar value fills the batch; expand keeps the event."""
    z = torch.tensor([[0.5, 2.0, 4.0], [1.0, 3.0, 0.25]])
    rows = torch.tensor([-math.log(4.0), math.log(4.0 / 3.0)])  # -(log 0.5 + log 2 + log 4), -(0 + log 3 + log 0.25)
    torch.testing.assert_close(LogUniform((2,), (3,)).log_prob(z), rows)
    expanded = LogUniform(event_shape=(3,)).expand((2,))
    assert expanded.batch_shape == (2,) and expanded.event_shape == (3,)
    torch.testing.assert_close(expanded.log_prob(z), rows)
    torch.testing.assert_close(LogUniform((2, 3)).log_prob(torch.tensor(2.0)), torch.full((2, 3), -math.log(2.0)))
    assert torch.equal(LogUniform((2,)).rsample((4,)), torch.ones(4, 2))


def test_summed_kl_declines_when_only_one_side_is_independent():
    q = NormalLogVar(torch.zeros(3), torch.zeros(3))
    prior = dist.Normal(0.0, 1.0).expand([3])
    assert summed_kl(q.to_event(1), prior) is None
    assert summed_kl(q, prior.to_event(1)) is None


def test_log_alpha_of_a_zero_mean_is_finite():
    """``eps`` is added to the squared mean: a zero mean gives ``logvar - log eps``."""
    torch.testing.assert_close(log_alpha(torch.tensor(-1.0), torch.tensor(0.0), eps=1e-6),
                               torch.tensor(-1.0 - math.log(1e-6)))


@pytest.mark.parametrize("prior", ["gamma", "inverse_gamma"])
def test_lognormal_logvar_kl_stays_finite_below_float32_variances(prior):
    """A log-variance of -220 has a scale ``exp(-110)`` that float32 rounds to 0; the KL uses ``logvar / 2``
    instead of ``log(scale)``, so it is the closed form ``lgamma(a) - a log b - log(2 pi e) / 2 + 110 + b``
    (``mu = 0``, ``exp(s^2 / 2) = 1``)."""
    p = LogNormalLogVar(torch.zeros(2), torch.full((2,), -220.0), validate_args=False)  # (its scale 0 is not > 0)
    a, b = 0.5, 3.0
    q = dist.Gamma(a, b) if prior == "gamma" else dist.InverseGamma(a, b)
    expected = math.lgamma(a) - a * math.log(b) - 0.5 * math.log(2 * math.pi * math.e) + 110.0 + b
    torch.testing.assert_close(kl_divergence(p, q.expand([2])), torch.full((2,), expected))


def test_gamma_prior_constant_is_computed_once_for_a_constant_prior(monkeypatch):
    """The prior's ``lgamma`` term is computed on the first KL of a constant prior only, every time for a learnt one."""
    calls = []
    lgamma = torch.lgamma
    monkeypatch.setattr(torch, "lgamma", lambda t: calls.append(1) or lgamma(t))
    p = LogNormalLogVar(torch.zeros(3), torch.full((3,), -1.0))
    fixed = dist.Gamma(torch.tensor(0.5), torch.tensor(4.0)).expand([3])
    first, second = kl_divergence(p, fixed), kl_divergence(p, fixed)
    assert len(calls) == 1
    torch.testing.assert_close(second, first)
    learnt = dist.InverseGamma(torch.tensor(0.5), torch.tensor(4.0, requires_grad=True))
    kl_divergence(p, learnt), kl_divergence(p, learnt)
    assert len(calls) == 3


def test_half_cauchy_gamma_takes_an_integer_scale():
    """``tau0 = 2`` (an int) is ``Gamma(1/2, rate=1/4)`` in ``like``'s float type, as ``tau0 = 2.0`` is."""
    ga = half_cauchy_gamma(2, torch.zeros(()))
    assert ga.rate.dtype == torch.get_default_dtype()
    assert half_cauchy_gamma(2, torch.zeros((), dtype=torch.float64)).rate.dtype == torch.float64
    torch.testing.assert_close((ga.concentration, ga.rate), (torch.tensor(0.5), torch.tensor(0.25)))
