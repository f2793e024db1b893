"""Per-weight log-uniform prior: Sparse variational dropout (Molchanov et al. 2017; docs/METHOD.md 3.4)."""

from __future__ import annotations

from pyro_bc.infer.distributions import LogUniform, log_alpha
from pyro_bc.priors.base import Prior


class LogUniformWeights(Prior):
    """``w ~ LogUniform`` for every weight, no group scale; guide ``w ~ N(mu, sigma^2)``.

    The paper's Sparse VD baseline. Log alpha is per weight, so the customary cut is ``3`` and the means of
    pruned weights are noise, not worth folding into the biases (measured: analysis/RESULTS.md).
    """

    name = "lu"
    per_weight = True
    default_threshold = 3.0
    folds_pruned_inputs = False

    def weight_prior(self, like):
        return LogUniform()

    def log_alpha(self, weight_mu, weight_logvar):
        return log_alpha(weight_logvar, weight_mu)
