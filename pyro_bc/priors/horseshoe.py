"""Group horseshoe prior (paper section 3.2; docs/METHOD.md 3.3, 4.3, 5.3)."""

from __future__ import annotations

import math

import numpy as np
import pyro
import torch

from pyro_bc.defaults import TAU0
from pyro_bc.infer.distributions import (
    LogNormalLogVar,
    StandardNormal,
    half_cauchy_gamma,
    half_cauchy_inverse_gamma,
    log_moments,
)
from pyro_bc.infer.reparam import LRT_ONLY, group_scale
from pyro_bc.priors.base import Noise, Prior, logvar_init, normal_init

SITES = ("s_a", "s_b", "z_a", "z_b")


def horseshoe_log_moments(moments: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    """Mean and variance of ``log s`` and ``log z~`` from the ``(mean, variance)`` of the logs of the four
    factors ``s_a, s_b, z_a, z_b`` (``s = sqrt(s_a s_b)``, ``z~ = sqrt(z_a z_b)``): ``(m_s, v_s, m_i, v_i)``."""
    (m_sa, v_sa), (m_sb, v_sb), (m_za, v_za), (m_zb, v_zb) = moments
    return 0.5 * (m_sa + m_sb), 0.25 * (v_sa + v_sb), 0.5 * (m_za + m_zb), 0.25 * (v_za + v_zb)


def _gamma(concentration: float, rate: float, shape: tuple, generator: torch.Generator) -> torch.Tensor:
    # torch's Gamma sampler takes no generator: draw through a numpy generator seeded from it
    rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
    return torch.from_numpy(rng.gamma(concentration, 1.0 / rate, size=shape))


class GroupHorseshoe(Prior):
    """``z = s z~`` with ``s ~ C+(0, tau0)`` per layer and ``z~ ~ C+(0, 1)`` per group, ``w~ ~ N(0, 1)``.

    Each half-Cauchy is a product of a Gamma and an inverse-Gamma factor: model sites ``<layer>.s_a ~
    Gamma(1/2, rate tau0^-2)``, ``.s_b ~ InvGamma(1/2, 1)``, ``.z_a ~ Gamma(1/2, 1)``, ``.z_b ~ InvGamma(1/2, 1)``,
    ``z = sqrt(s_a s_b z_a z_b)``; the guides are log-normal, so ``log z`` is normal under the guide.
    Initialised so that ``E[z] ~ 1`` and ``tau0^-2 E[s_a] ~ 1`` (docs/METHOD.md 11).
    """

    name = "ghs"

    def __init__(self, tau0: float = TAU0):
        super().__init__()
        if not (tau0 > 0 and math.isfinite(tau0)):
            raise ValueError(f"tau0 must be a positive number, got {tau0}")
        self.tau0 = float(tau0)

    def options(self):
        return {"tau0": self.tau0}

    def reset_parameters(self):
        log_tau0 = math.log(self.tau0)
        self.sa_mu, self.sa_logvar = normal_init((), 2 * log_tau0), logvar_init(())
        self.sb_mu, self.sb_logvar = normal_init((), -2 * log_tau0), logvar_init(())
        self.za_mu, self.za_logvar = normal_init((self.n_groups,), 0.0), logvar_init((self.n_groups,))
        self.zb_mu, self.zb_logvar = normal_init((self.n_groups,), 0.0), logvar_init((self.n_groups,))

    def weight_prior(self, like):
        return StandardNormal(like)

    def site_priors(self, like):
        return {"s_a": half_cauchy_gamma(self.tau0, like), "s_b": half_cauchy_inverse_gamma(like),
                "z_a": half_cauchy_gamma(1.0, like, [self.n_groups]).to_event(1),
                "z_b": half_cauchy_inverse_gamma(like, [self.n_groups]).to_event(1)}

    def _guides(self) -> list[LogNormalLogVar]:
        return [LogNormalLogVar(self.sa_mu, self.sa_logvar), LogNormalLogVar(self.sb_mu, self.sb_logvar),
                LogNormalLogVar(self.za_mu, self.za_logvar), LogNormalLogVar(self.zb_mu, self.zb_logvar)]

    def model(self, site, priors):
        return group_scale(self, *(pyro.sample(f"{site}.{name}", priors[name]) for name in SITES))

    def guide(self, site):
        # the four factors feed only the scale, which the local reparameterisation draws per example
        s_a, s_b, z_a, z_b = self._guides()
        pyro.sample(f"{site}.s_a", s_a, infer=LRT_ONLY)
        pyro.sample(f"{site}.s_b", s_b, infer=LRT_ONLY)
        pyro.sample(f"{site}.z_a", z_a.to_event(1), infer=LRT_ONLY)
        pyro.sample(f"{site}.z_b", z_b.to_event(1), infer=LRT_ONLY)

    def scale(self, s_a, s_b, z_a, z_b):
        return torch.sqrt(s_a * s_b * z_a * z_b)

    def log_scale_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of ``log z`` per group under the guide (docs/METHOD.md 4.3)."""
        m_s, v_s, m_i, v_i = horseshoe_log_moments([(q.loc, q.base_dist.variance) for q in self._guides()])
        return m_s + m_i, v_s + v_i

    def per_example_scale(self, guides, n, noise: Noise):
        # log z[n, i] = m_s + sqrt(v_s) xi[n] + m_i + sqrt(v_i) xi[n, i]: one global draw per example shared by
        # the layer's groups, one local draw per example and group
        m_s, v_s, m_i, v_i = horseshoe_log_moments([log_moments(q) for q in guides])
        loc = m_s + m_i
        xi_s = noise(torch.Size((n,)) + (1,) * loc.dim(), loc)
        xi_i = noise(torch.Size((n,)) + loc.shape, loc)
        return torch.exp(loc + v_s.sqrt() * xi_s + v_i.sqrt() * xi_i)

    def scale_moments(self):
        m, v = self.log_scale_moments()
        return torch.exp(m + v / 2), torch.expm1(v) * torch.exp(2 * m + v)

    def log_alpha(self, weight_mu, weight_logvar):
        return torch.log(torch.expm1(self.log_scale_moments()[1]))  # Var/E^2 of a log-normal

    def posterior_draws(self, n, generator):
        def draw(q: LogNormalLogVar) -> torch.Tensor:
            eps = torch.randn((n,) + tuple(q.loc.shape), generator=generator, dtype=torch.float64)
            return torch.exp(q.loc.detach().double() + (0.5 * q.logvar.detach().double()).exp() * eps)

        s_a, s_b, z_a, z_b = (draw(q) for q in self._guides())
        tau = torch.sqrt(s_a * s_b)
        return {"z": tau[:, None] * torch.sqrt(z_a * z_b), "tau": tau}

    def prior_draws(self, n, generator):
        s_a = _gamma(0.5, self.tau0**-2, (n,), generator)
        s_b = 1.0 / _gamma(0.5, 1.0, (n,), generator)
        z_a = _gamma(0.5, 1.0, (n, self.n_groups), generator)
        z_b = 1.0 / _gamma(0.5, 1.0, (n, self.n_groups), generator)
        tau = torch.sqrt(s_a * s_b)
        return {"z": tau[:, None] * torch.sqrt(z_a * z_b), "tau": tau}
