"""A mean-field ELBO that evaluates only what it uses.

Pyro's :class:`~pyro.infer.TraceMeanField_ELBO` computes the log density of every model site and
the score parts of every guide site before it looks for analytic KLs; with weight-sized sites most
of that work is thrown away. :class:`MeanFieldELBO` gives the same loss, computing log densities
only for observed sites and for latent sites without a registered KL, and summing the KL of a
``NormalLogVar`` guide against a constant ``Normal`` prior in closed form
(:func:`~pyro_bc.infer.distributions.summed_kl`), or, against ``N(0, 1)`` under the local reparameterisation,
taking the sum that the fused layer op already computed (its gradient then joins the op's backward pass);
both are checked against Pyro's loss by the tests.
"""

from __future__ import annotations

import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer import TraceMeanField_ELBO
from pyro.infer.util import is_validation_enabled
from pyro.poutine.util import prune_subsample_sites
from torch.distributions import kl_divergence

from pyro_bc.infer.distributions import summed_kl


class MeanFieldELBO(TraceMeanField_ELBO):
    """``TraceMeanField_ELBO`` with lazy log densities; one particle, no enumeration."""

    def loss(self, model, guide, *args, **kwargs) -> float:
        """``-ELBO`` as a number (what ``SVI.evaluate_loss`` reads)."""
        with torch.no_grad():
            return self.differentiable_loss(model, guide, *args, **kwargs).item()

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """``-ELBO``, its gradients accumulated into the parameters (what ``SVI.step`` calls)."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward()
        return loss.item()

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """``-ELBO`` from one draw of the guide, differentiable. With Pyro's validation on (its default outside
        ``fit``), Pyro's own ``TraceMeanField_ELBO`` computes it, with its checks of the model against the guide:
        the same value, at Pyro's cost."""
        if is_validation_enabled():
            return super().differentiable_loss(model, guide, *args, **kwargs)
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
        model_trace, guide_trace = prune_subsample_sites(model_trace), prune_subsample_sites(guide_trace)
        elbo = 0.0
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample":
                continue
            if site["is_observed"]:
                elbo = elbo + scale_and_mask(site["fn"].log_prob(site["value"]), site["scale"], site["mask"]).sum()
                continue
            q = guide_trace.nodes[name]
            total = summed_kl(q["fn"], site["fn"]) if q["mask"] is None else None
            if total is not None:  # a closed-form sum: no weight-sized KL tensor
                elbo = elbo - total * q["scale"]
                continue
            try:
                kl = kl_divergence(q["fn"], site["fn"])
            except NotImplementedError:  # Monte Carlo: log p(z) - log q(z) at the guide's draw
                kl = q["fn"].log_prob(q["value"]) - site["fn"].log_prob(q["value"])
            elbo = elbo - scale_and_mask(kl, q["scale"], q["mask"]).sum()
        return -elbo
