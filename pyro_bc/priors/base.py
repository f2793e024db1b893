"""The interface every sparsity prior implements, and the bookkeeping they share."""

from __future__ import annotations

import copy
from abc import ABCMeta, abstractmethod
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from pyro_bc.defaults import INIT_LOGVAR

#: ``noise(shape, like)``: standard-normal draws of ``shape`` on ``like``'s device and dtype (examples first).
Noise = Callable[[torch.Size, torch.Tensor], torch.Tensor]


def normal_init(shape, mean: float, sd: float = 0.01) -> nn.Parameter:
    """A parameter drawn from ``N(mean, sd^2)``: the official code's initialisation of means and log-variances."""
    return nn.Parameter(torch.randn(shape) * sd + mean)


def logvar_init(shape) -> nn.Parameter:
    """Initial log-variances, ``N(-9, 0.01^2)`` (docs/METHOD.md 4.1)."""
    return normal_init(shape, INIT_LOGVAR)


class Prior(nn.Module, metaclass=ABCMeta):
    """A layer's sparsity prior on its weights ``w = z w~`` and the matching guide.

    The object a user makes, e.g. ``GroupHorseshoe(tau0=1e-5)``, holds only hyperparameters and serves
    as a template: each layer calls :meth:`attach` and gets its own copy, which owns the variational
    parameters of the layer's group scales ``z`` and samples their model and guide sites. The layer
    owns the weights ``w~`` and the bias, asks the prior for the prior of ``w~``, and delegates every
    summary (``E[z]``, ``Var[z]``, log alpha) to it.

    A subclass sets :attr:`name` (the command line's name) and implements the abstract methods
    (:meth:`weight_prior` and :meth:`log_alpha`; a prior with group scales also its sites, :meth:`model`,
    :meth:`guide`, :meth:`per_example_scale` and :meth:`scale_moments`); registering it is one line in
    :mod:`pyro_bc.priors`.
    """

    name: ClassVar[str]
    #: Log alpha is per weight (``True``, Sparse VD) or per group.
    per_weight: ClassVar[bool] = False
    #: The log alpha cut that ``compress`` uses when no rule is given.
    default_threshold: ClassVar[float] = -3.0
    #: Whether ``compress`` folds the average of pruned inputs into the biases by default.
    folds_pruned_inputs: ClassVar[bool] = True

    def __init__(self):
        super().__init__()
        self.n_groups = 0
        self._constant_priors: dict[tuple[torch.device, torch.dtype], dict] = {}

    def attach(self, n_groups: int) -> Prior:
        """A copy of this template with fresh variational parameters for ``n_groups`` group scales."""
        new = copy.deepcopy(self)
        new.n_groups = n_groups
        new.reset_parameters()
        return new

    def options(self) -> dict:
        """The hyperparameters, as the constructor takes them (recorded in configs and reports)."""
        return {}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v:g}" for k, v in self.options().items())

    # -- what a subclass provides -------------------------------------------------------------

    def reset_parameters(self) -> None:
        """Create the variational parameters of the ``n_groups`` scales (none for per-weight priors)."""

    @abstractmethod
    def weight_prior(self, like: torch.Tensor) -> torch.distributions.Distribution:
        """The elementwise prior of the weights ``w~`` (a scalar distribution the layer expands)."""

    def site_priors(self, like: torch.Tensor) -> dict[str, torch.distributions.Distribution]:
        """The priors of the scale sites, by site suffix; constants (see :meth:`priors`)."""
        return {}

    def model(self, site: str, priors: dict[str, torch.distributions.Distribution]) -> torch.Tensor | None:
        """Sample the scale sites ``<site>.<suffix>`` from ``priors``; return ``z`` (``None``: no group scale)."""
        return None

    def guide(self, site: str) -> None:
        """Sample the same scale sites from the guide, in the same order."""

    def scale(self, *values: torch.Tensor) -> torch.Tensor:
        """``z`` from the values of the scale sites (the identity for one site)."""
        (value,) = values
        return value

    def per_example_scale(self, guides: list, n: int, noise: Noise) -> torch.Tensor:
        """Draws ``(n, groups)`` of ``z``, one per example, from the guide distributions of the scale sites
        (the local reparameterisation's group-scale noise, docs/METHOD.md 5)."""
        raise NotImplementedError(f"{type(self).__name__} has no group scales to draw")

    def scale_moments(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(E[z], Var[z])`` per group under the guide; ``None`` without group scales."""
        return None

    @abstractmethod
    def log_alpha(self, weight_mu: torch.Tensor, weight_logvar: torch.Tensor) -> torch.Tensor:
        """Log dropout rate ``log Var/E^2``: per group, or per weight where :attr:`per_weight`."""

    def posterior_draws(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Guide draws for the DataTree, float64: ``z`` ``(n, groups)`` and any other named scale ``(n,)``."""
        return {}

    def prior_draws(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Prior draws of the same variables; empty where the prior is improper."""
        return {}

    # -- shared ---------------------------------------------------------------------------------

    def priors(self, like: torch.Tensor) -> dict[str, torch.distributions.Distribution]:
        """:meth:`site_priors` built once per device and dtype and reused by every step (they are constants)."""
        key = (like.device, like.dtype)
        if key not in self._constant_priors:
            self._constant_priors[key] = self.site_priors(like)
        return self._constant_priors[key]

    def __getstate__(self):  # the cache holds distributions: rebuilt after a copy or unpickling
        state = self.__dict__.copy()
        state["_constant_priors"] = {}
        return state
