"""Quality of predicted class probabilities: error, negative log-likelihood, Brier score and expected
calibration error. They take probabilities (not a network), so the same code scores a point network, a
posterior predictive averaged over draws, or probabilities computed elsewhere.

Every metric is a mean over the examples (over every labelled position, where a network classifies each token or
pixel):

* ``error``: percent of examples whose most probable class is not the label (ties: the lowest class index);
* ``nll``: ``-log p(label)`` in nats, with ``p`` clamped below at :data:`MIN_PROB` (so a probability that
  underflowed to 0 in float32 costs about 87 nats, not infinity);
* ``brier``: ``sum_k (p_k - [k = label])^2`` (between 0 and 2);
* ``ece``: ``sum_b (n_b / N) |accuracy_b - confidence_b|`` over :data:`ECE_BINS` equal-width bins of the
  top-class probability ``c``; bin ``b`` (0-based) holds ``b / B < c <= (b + 1) / B``, and ``c = 0`` joins bin 0.
"""

from __future__ import annotations

import torch

from pyro_bc.defaults import IGNORED_LABEL
from pyro_bc.errors import ConfigError

ECE_BINS = 15
MIN_PROB = torch.finfo(torch.float32).tiny  # about 1.2e-38: -log gives at most about 87.3 nats
METRICS = ("error", "nll", "brier", "ece")


def as_rows(probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``probs`` ``[N, K]`` and ``labels`` ``[N]`` as they are; probabilities ``[examples, positions..., classes]``
    with labels ``[examples, positions...]`` (a network classifying each token or pixel) as one row per position;
    rows labelled :data:`~pyro_bc.defaults.IGNORED_LABEL` left out. ConfigError where the labels do not match."""
    if probs.dim() < 2:
        raise ConfigError(f"class probabilities must be [examples, classes], got shape {tuple(probs.shape)}")
    if tuple(labels.shape) != tuple(probs.shape[:-1]):
        raise ConfigError(f"labels of shape {tuple(labels.shape)} do not match probabilities of shape "
                          f"{tuple(probs.shape)} (one label per row of classes)")
    probs, labels = probs.reshape(-1, probs.shape[-1]), labels.reshape(-1)
    labelled = labels != IGNORED_LABEL  # a padding token, a void pixel
    return (probs, labels) if bool(labelled.all()) else (probs[labelled], labels[labelled])


def _checked(probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``probs`` as float64 ``[rows, K]`` and ``labels`` as int64 ``[rows]`` (:func:`as_rows`); ConfigError naming the
    problem."""
    probs, labels = as_rows(probs, labels)
    if labels.is_floating_point() or labels.is_complex():
        raise ConfigError("labels must be integer class indices")
    labels = labels.long()
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= probs.shape[1]):
        raise ConfigError(f"labels must lie in 0..{probs.shape[1] - 1}")
    return probs.double(), labels


def error(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Percent of examples whose most probable class is not their label (0 for no examples)."""
    probs, labels = _checked(probs, labels)
    return 100.0 * float((probs.argmax(-1) != labels).double().mean()) if len(labels) else 0.0


def nll(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-probability of the labels, in nats."""
    probs, labels = _checked(probs, labels)
    if not len(labels):
        return 0.0
    return float(-probs.gather(1, labels[:, None]).clamp_min(MIN_PROB).log().mean())


def brier(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean squared distance between the probabilities and the one-hot label (summed over classes)."""
    probs, labels = _checked(probs, labels)
    if not len(labels):
        return 0.0
    one_hot = torch.nn.functional.one_hot(labels, probs.shape[1]).double()
    return float(((probs - one_hot) ** 2).sum(-1).mean())


def ece(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Expected calibration error over ``bins`` equal-width bins of the top-class probability (see the module)."""
    probs, labels = _checked(probs, labels)
    if bins < 1:
        raise ConfigError(f"ECE needs at least one bin, got {bins}")
    if not len(labels):
        return 0.0
    confidence, predicted = probs.max(-1)
    correct = (predicted == labels).double()
    index = (torch.ceil(confidence * bins).long() - 1).clamp(0, bins - 1)
    conf_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, confidence)
    correct_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, correct)
    return float((conf_sum - correct_sum).abs().sum() / len(labels))


def classification_metrics(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """All of :data:`METRICS` of ``probs`` against ``labels``, by name."""
    return {"error": error(probs, labels), "nll": nll(probs, labels), "brier": brier(probs, labels),
            "ece": ece(probs, labels)}
