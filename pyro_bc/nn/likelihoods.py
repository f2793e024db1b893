"""How a :class:`~pyro_bc.nn.network.BayesianNet` observes its targets: one class per likelihood, in :data:`LIKELIHOODS`
by name. Each observes the targets ``y`` given the network's outputs (the ``"y"`` sample site, inside the data plate)
and checks, before training, that targets fit outputs of a given shape (one line naming the problem); it also says
how wrong outputs are (:meth:`Likelihood.error_terms`), which training records and compression budgets.

* ``categorical``: the outputs are logits, the classes on the last axis; a class index per example, or per position
  where the network classifies each token or pixel; :data:`~pyro_bc.defaults.IGNORED_LABEL` labels nothing;
* ``bernoulli``: each output is the logit of a label that is 0 or 1 (a binary classifier's one output, a
  multi-label classifier's K);
* ``normal``: each output is the mean of a target, with a fixed standard deviation (regression).

A new likelihood is a subclass plus one entry in :data:`LIKELIHOODS`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import pyro
import torch
from pyro.distributions import Bernoulli, Categorical, Normal

from pyro_bc.defaults import IGNORED_LABEL
from pyro_bc.errors import ConfigError


class Likelihood(ABC):
    """The distribution of the targets given the network's outputs."""

    name: ClassVar[str]
    #: What :meth:`error` measures, the records' keys (``train_error``, ``val_rmse``).
    error_name: ClassVar[str] = "error"

    @abstractmethod
    def observe(self, out: torch.Tensor, y: torch.Tensor | None) -> None:
        """The ``"y"`` site for outputs ``out`` (observed at ``y``; drawn where ``y`` is None), one event per example."""

    @abstractmethod
    def check_targets(self, y: torch.Tensor, out_shape: tuple[int, ...]) -> None:
        """ConfigError unless ``y`` (a split's targets) fits outputs of ``out_shape`` (two examples' worth)."""

    @abstractmethod
    def error_terms(self, out: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
        """The summed error of outputs ``out`` against targets ``y``, and how many targets it counts."""

    def error(self, total: float, count: int) -> float:
        """The error over a data set from its batches' summed :meth:`error_terms`: percent of the targets wrong."""
        return 100.0 * total / max(count, 1)


class CategoricalLikelihood(Likelihood):
    name = "categorical"

    def observe(self, out: torch.Tensor, y: torch.Tensor | None) -> None:
        fn = Categorical(logits=out)
        if y is not None and bool((y == IGNORED_LABEL).any()):  # positions labelled "nothing" leave the sum
            labelled = y != IGNORED_LABEL
            fn, y = fn.mask(labelled), torch.where(labelled, y, y.new_zeros(()))
        pyro.sample("y", fn.to_event(out.dim() - 2), obs=y)

    def check_targets(self, y: torch.Tensor, out_shape: tuple[int, ...]) -> None:
        classes, per_example = out_shape[-1], out_shape[1:-1]
        logits = f"logits of shape (N, {', '.join(map(str, out_shape[1:]))})"
        if tuple(y.shape[1:]) != per_example:
            if len(out_shape) > 2 and tuple(y.shape[1:]) == out_shape[2:]:
                raise ConfigError(f"class labels of shape {tuple(y.shape)} label the positions of {logits} whose "
                                  "classes are on axis 1, as F.cross_entropy takes them; pyro-bc reads the classes on "
                                  "the last axis, as Pyro's Categorical: end the forward with .movedim(1, -1)")
            expected = f"(N, {', '.join(map(str, per_example))})" if per_example else "(N,)"
            one_hot = y.dim() == 2 and y.shape[1] == classes and not per_example
            raise ConfigError(f"class labels must be one index per {'position' if per_example else 'example'}, shape "
                              f"{expected} for {logits}; got shape {tuple(y.shape)}"
                              f"{': one-hot labels? give y.argmax(1)' if one_hot else ''}")
        if y.is_floating_point() and not torch.equal(y, y.round()):
            raise ConfigError("class labels must be whole numbers (class indices); got fractional values such as "
                              f"{y[y != y.round()][0].item():g}")
        y = y[y != IGNORED_LABEL]
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= classes):
            hint = (" (a binary classifier's one logit? bayesianize it with likelihood='bernoulli', or give it two "
                    "outputs, one per class)") if classes == 1 else ""
            raise ConfigError(f"class labels run from {int(y.min())} to {int(y.max())}, but the network has {classes} "
                              f"outputs: labels must be 0 to {classes - 1}{hint}")

    def error_terms(self, out: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
        labelled = y != IGNORED_LABEL  # the arg max of the logits, wrong where it is not the label
        return int(((out.argmax(-1) != y) & labelled).sum()), int(labelled.sum())


def _per_output(out: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One value per output: a single output's trailing axis dropped, the targets in the outputs' shape."""
    value = out.squeeze(-1) if out.shape[-1] == 1 else out
    return value, (y if y is None or y.shape == value.shape else y.reshape(value.shape))


def _check_count(y: torch.Tensor, out_shape: tuple[int, ...], what: str) -> None:
    if y[:2].numel() != torch.Size(out_shape).numel():
        raise ConfigError(f"{what} of shape {tuple(y.shape[1:])} per example, but the network predicts "
                          f"{tuple(out_shape[1:])}")


class BernoulliLikelihood(Likelihood):
    name = "bernoulli"

    def observe(self, out: torch.Tensor, y: torch.Tensor | None) -> None:
        logits, y = _per_output(out, y)
        pyro.sample("y", Bernoulli(logits=logits).to_event(logits.dim() - 1),
                    obs=None if y is None else y.to(logits.dtype))

    def check_targets(self, y: torch.Tensor, out_shape: tuple[int, ...]) -> None:
        _check_count(y, out_shape, "binary labels")
        if not bool(((y == 0) | (y == 1)).all()):
            raise ConfigError(f"binary labels must be 0 or 1; got values such as {y[(y != 0) & (y != 1)][0].item():g}")

    def error_terms(self, out: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
        return int(((out.reshape(y.shape) > 0) != (y > 0)).sum()), y.numel()  # a positive logit predicts 1


class NormalLikelihood(Likelihood):
    name = "normal"
    error_name = "rmse"

    def __init__(self, noise_scale: float = 1.0):
        self.noise_scale = noise_scale

    def observe(self, out: torch.Tensor, y: torch.Tensor | None) -> None:
        loc, y = _per_output(out, y)  # one prediction or several per example, each independent given the weights
        pyro.sample("y", Normal(loc, self.noise_scale).to_event(loc.dim() - 1), obs=y)

    def check_targets(self, y: torch.Tensor, out_shape: tuple[int, ...]) -> None:
        _check_count(y, out_shape, "regression targets")

    def error_terms(self, out: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
        return float(((out.reshape(y.shape) - y) ** 2).sum()), y.numel()

    def error(self, total: float, count: int) -> float:
        """The root mean squared error over every target value."""
        return (total / max(count, 1)) ** 0.5


LIKELIHOODS: dict[str, type[Likelihood]] = {cls.name: cls for cls in
                                            (CategoricalLikelihood, BernoulliLikelihood, NormalLikelihood)}


def make_likelihood(name: str, noise_scale: float = 1.0) -> Likelihood:
    """The likelihood ``name`` (``noise_scale``: the normal likelihood's standard deviation); ConfigError if unknown."""
    if name not in LIKELIHOODS:
        raise ConfigError(f"unknown likelihood {name!r}: choose one of {', '.join(LIKELIHOODS)}")
    return NormalLikelihood(noise_scale) if name == NormalLikelihood.name else LIKELIHOODS[name]()
