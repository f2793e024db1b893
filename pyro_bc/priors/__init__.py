"""Sparsity priors as objects, registered under the command line's names.

A prior is one class implementing :class:`~pyro_bc.priors.base.Prior`; adding one is its file plus one
line in :data:`PRIORS`.
"""

from __future__ import annotations

import inspect

from pyro_bc.errors import ConfigError
from pyro_bc.priors.base import Prior
from pyro_bc.priors.horseshoe import GroupHorseshoe
from pyro_bc.priors.log_uniform import LogUniformWeights
from pyro_bc.priors.normal_jeffreys import GroupNormalJeffreys
from pyro_bc.priors.regularized_horseshoe import RegularizedHorseshoe

PRIORS: dict[str, type[Prior]] = {
    "gnj": GroupNormalJeffreys,
    "ghs": GroupHorseshoe,
    "lu": LogUniformWeights,
    "rhs": RegularizedHorseshoe,
}

__all__ = ["PRIORS", "GroupHorseshoe", "GroupNormalJeffreys", "LogUniformWeights", "Prior", "RegularizedHorseshoe",
           "make_prior"]


def make_prior(prior: str | Prior, **options) -> Prior:
    """The prior named ``prior`` (``gnj``, ``ghs``, ``lu``, ``rhs``), given the options its constructor takes
    (others, such as ``tau0`` for ``gnj``, are ignored); a :class:`Prior` is returned as it is."""
    if isinstance(prior, Prior):
        return prior
    if prior not in PRIORS:
        raise ConfigError(f"unknown prior {prior!r}: choose one of {', '.join(PRIORS)}")
    cls = PRIORS[prior]
    accepted = inspect.signature(cls.__init__).parameters
    try:
        return cls(**{k: v for k, v in options.items() if k in accepted})
    except ValueError as e:
        raise ConfigError(f"prior {prior}: {e}")
