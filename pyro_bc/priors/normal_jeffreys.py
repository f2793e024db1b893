"""Group normal-Jeffreys prior (paper section 3.1; docs/METHOD.md 3.2, 4.1, 4.2)."""

from __future__ import annotations

import pyro
import torch

from pyro_bc.infer.distributions import LogUniform, NormalLogVar, StandardNormal, log_alpha
from pyro_bc.infer.reparam import LRT_ONLY, group_scale
from pyro_bc.priors.base import Noise, Prior, logvar_init, normal_init


class GroupNormalJeffreys(Prior):
    """``z ~ LogUniform`` per group (``p(z) ∝ 1/|z|``), ``w~ ~ N(0, 1)``; guide ``z ~ N(mu_z, sigma_z^2)``.

    Model site ``<layer>.z``; log alpha of a group is ``log sigma_z^2 - log mu_z^2``.
    """

    name = "gnj"

    def reset_parameters(self) -> None:
        self.z_mu = normal_init((self.n_groups,), 1.0)
        self.z_logvar = logvar_init((self.n_groups,))

    def weight_prior(self, like):
        return StandardNormal(like)

    def site_priors(self, like):
        return {"z": LogUniform().expand([self.n_groups]).to_event(1)}

    def model(self, site, priors):
        return group_scale(self, pyro.sample(f"{site}.z", priors["z"]))

    def guide(self, site):
        # z feeds only the layer op, which the local reparameterisation replaces by per-example draws
        pyro.sample(f"{site}.z", NormalLogVar(self.z_mu, self.z_logvar).to_event(1), infer=LRT_ONLY)

    def per_example_scale(self, guides, n, noise: Noise):
        (q,) = guides
        return q.loc + q.scale * noise(torch.Size((n,)) + q.loc.shape, q.loc)

    def scale_moments(self):
        return self.z_mu, self.z_logvar.exp()

    def log_alpha(self, weight_mu, weight_logvar):
        return log_alpha(self.z_logvar, self.z_mu)

    def posterior_draws(self, n, generator):
        eps = torch.randn((n, self.n_groups), generator=generator, dtype=torch.float64)
        return {"z": self.z_mu.detach().double() + (0.5 * self.z_logvar.detach().double()).exp() * eps}
