"""Regularised horseshoe (Piironen & Vehtari 2017): the group horseshoe with a slab of width ``c``.

pyro-bc's fourth prior, written against :class:`~pyro_bc.priors.base.Prior` alone (docs/METHOD.md 3.5). The
horseshoe leaves its largest scales unregularised, which is why the official code clips LeNet's fc1
variances by hand; here the scale passes through ``z_c = c z / sqrt(c^2 + z^2)``, which keeps the horseshoe's
shrinkage of small groups (``z_c ~ z`` for ``z << c``) and bounds every group's prior scale by ``c``. The
sites, guides and KL terms are the horseshoe's; only the scale, and so its moments, change.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pyro_bc.defaults import SLAB_SCALE, TAU0
from pyro_bc.priors.horseshoe import GroupHorseshoe

#: Gauss-Hermite nodes and weights for ``E[f(z)]`` over ``log z ~ N(m, v)``; exact to float64 for the smooth,
#: bounded slab at 40 nodes (checked against Monte Carlo in the tests).
_NODES, _WEIGHTS = np.polynomial.hermite.hermgauss(40)


class RegularizedHorseshoe(GroupHorseshoe):
    """``z_c = c z / sqrt(c^2 + z^2)`` with ``z`` a group horseshoe scale (``tau0``) and ``c`` the slab width."""

    name = "rhs"

    def __init__(self, tau0: float = TAU0, slab_scale: float = SLAB_SCALE):
        super().__init__(tau0)
        if not (slab_scale > 0 and math.isfinite(slab_scale)):
            raise ValueError(f"slab_scale must be a positive number, got {slab_scale}")
        self.slab_scale = float(slab_scale)

    def options(self):
        return {"tau0": self.tau0, "slab_scale": self.slab_scale}

    def slab(self, z: torch.Tensor) -> torch.Tensor:
        c = self.slab_scale
        return c * z * torch.rsqrt(c * c + z * z)

    def scale(self, *values):
        return self.slab(super().scale(*values))

    def per_example_scale(self, guides, n, noise):
        return self.slab(super().per_example_scale(guides, n, noise))

    def _quadrature(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per group, the slab at the quadrature nodes of ``log z`` ``(groups, K)`` and the weights ``(K,)``."""
        m, v = (t.double() for t in self.log_scale_moments())
        nodes = torch.from_numpy(_NODES).to(m.device)
        weights = torch.from_numpy(_WEIGHTS).to(m.device) / math.sqrt(math.pi)
        return self.slab(torch.exp(m[..., None] + torch.sqrt(2 * v)[..., None] * nodes)), weights

    def scale_moments(self):
        f, w = self._quadrature()
        mean = f @ w
        var = ((f - mean[..., None]) ** 2) @ w
        dtype = self.za_mu.dtype
        return mean.to(dtype), var.to(dtype)

    def log_alpha(self, weight_mu, weight_logvar):
        f, w = self._quadrature()
        mean = f @ w
        return (torch.log(((f - mean[..., None]) ** 2) @ w) - 2 * torch.log(mean)).to(self.za_mu.dtype)

    def posterior_draws(self, n, generator):
        draws = super().posterior_draws(n, generator)
        return {**draws, "z": self.slab(draws["z"])}

    def prior_draws(self, n, generator):
        draws = super().prior_draws(n, generator)
        return {**draws, "z": self.slab(draws["z"])}
