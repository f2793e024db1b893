"""Evaluation of a network on data: classification error, groups kept."""

from __future__ import annotations

import torch

from pyro_bc.defaults import IGNORED_LABEL, KEPT_LOG_ALPHA
from pyro_bc.nn.network import BayesianNet, layers_called_as_modules


@torch.no_grad()
@layers_called_as_modules()
def error_percent(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 250) -> float:
    """Classification error of ``module`` on ``(x, y)``, in percent of the labels (one per example, or per position
    where ``y`` labels each token or pixel, the logits' classes on their last axis; a label
    :data:`~pyro_bc.defaults.IGNORED_LABEL` does not count), computed as training computes: PyTorch's transformer
    layers off their fused inference path, which at padded positions gives zeros where training (and a compressed
    file) gives values.

    Batches of 250: a LeNet-5 evaluates 1.5 times faster than in batches of 1000, whose activations glibc's
    malloc maps and page-faults afresh on every call (measured, analysis/BENCHMARKS.md).
    """
    labelled = y != IGNORED_LABEL
    wrong = sum(int(((module(x[i:i + batch_size]).argmax(-1) != y[i:i + batch_size]) & labelled[i:i + batch_size]).sum())
                for i in range(0, len(x), batch_size))
    return 100.0 * wrong / max(int(labelled.sum()), 1)


@torch.no_grad()
@layers_called_as_modules()
def binary_error_percent(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 250) -> float:
    """Percent of the binary labels (0 or 1, one per output: a binary or multi-label classifier's) that ``module``'s
    logits get wrong, a positive logit predicting 1."""
    wrong = sum(int(((module(x[i:i + batch_size]).reshape(y[i:i + batch_size].shape) > 0) != (y[i:i + batch_size] > 0))
                    .sum()) for i in range(0, len(x), batch_size))
    return 100.0 * wrong / max(y.numel(), 1)


@torch.no_grad()
@layers_called_as_modules()
def rmse(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 250) -> float:
    """Root mean squared error of a regression ``module``'s predictions on ``(x, y)``, over every target value."""
    squared = sum(float(((module(x[i:i + batch_size]).reshape(y[i:i + batch_size].shape) - y[i:i + batch_size]) ** 2)
                        .sum()) for i in range(0, len(x), batch_size))
    return (squared / max(y.numel(), 1)) ** 0.5


def groups_below(net: BayesianNet, threshold: float = KEPT_LOG_ALPHA) -> dict[str, int]:
    """Number of groups (weights, for ``lu``) per layer with log alpha below ``threshold``."""
    with torch.no_grad():
        return {layer.site: int((layer.log_alpha() < threshold).sum()) for layer in net.layers}
