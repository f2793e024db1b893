"""Evaluation of a network on data: its error as its likelihood measures it, groups kept."""

from __future__ import annotations

import torch

from pyro_bc.defaults import KEPT_LOG_ALPHA
from pyro_bc.nn.likelihoods import CategoricalLikelihood, Likelihood
from pyro_bc.nn.network import BayesianNet, layers_called_as_modules


@torch.no_grad()
@layers_called_as_modules()
def error(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, likelihood: Likelihood | None = None,
          batch_size: int = 250) -> float:
    """The error of ``module`` on ``(x, y)`` as ``likelihood`` measures it (:meth:`Likelihood.error_terms
    <pyro_bc.nn.likelihoods.Likelihood.error_terms>`; None: categorical): for classes, percent of the labels wrong
    (one per example, or per position where ``y`` labels each token or pixel, the logits' classes on their last axis;
    a label :data:`~pyro_bc.defaults.IGNORED_LABEL` does not count); for binary labels, percent of them wrong; for
    regression, the root mean squared error. Computed as training computes: PyTorch's transformer layers off their
    fused inference path, which at padded positions gives zeros where training (and a compressed file) gives values.

    Batches of 250: a LeNet-5 evaluates 1.5 times faster than in batches of 1000, whose activations glibc's
    malloc maps and page-faults afresh on every call (measured, analysis/BENCHMARKS.md).
    """
    likelihood = likelihood or CategoricalLikelihood()
    total, count = 0.0, 0
    for i in range(0, len(x), batch_size):
        batch_total, batch_count = likelihood.error_terms(module(x[i:i + batch_size]), y[i:i + batch_size])
        total, count = total + batch_total, count + batch_count
    return likelihood.error(total, count)


def error_percent(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 250) -> float:
    """Classification error of ``module`` on ``(x, y)``, in percent of the labels: :func:`error` of the categorical
    likelihood."""
    return error(module, x, y, CategoricalLikelihood(), batch_size)


def groups_below(net: BayesianNet, threshold: float = KEPT_LOG_ALPHA) -> dict[str, int]:
    """Number of groups (weights, for ``lu``) per layer with log alpha below ``threshold``."""
    with torch.no_grad():
        return {layer.site: int((layer.log_alpha() < threshold).sum()) for layer in net.layers}
