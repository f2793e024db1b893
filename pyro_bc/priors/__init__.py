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
           "known_options", "make_prior", "option_names"]


def option_names(prior: str) -> tuple[str, ...]:
    """The options prior ``prior`` takes: its constructor's parameters (``tau0`` for ``ghs``; none for ``gnj``)."""
    if prior not in PRIORS:
        raise ConfigError(f"unknown prior {prior!r}: choose one of {', '.join(PRIORS)}")
    return tuple(name for name in inspect.signature(PRIORS[prior].__init__).parameters if name != "self")


def known_options(prior: str, options: dict) -> dict:
    """``options`` less those prior ``prior`` does not take (none for a name outside :data:`PRIORS`): for records
    written when every run stored ``tau0`` and ``slab_scale`` whatever its prior."""
    accepted = option_names(prior) if prior in PRIORS else ()
    return {name: value for name, value in options.items() if name in accepted}


def make_prior(prior: str | Prior, **options) -> Prior:
    """The prior named ``prior`` (``gnj``, ``ghs``, ``lu``, ``rhs``) with ``options``, each one the prior takes
    (:func:`option_names`; ConfigError naming an option it does not take, or a value out of range); a
    :class:`Prior` object is returned as it is, and takes no options here."""
    if isinstance(prior, Prior):
        if options:
            raise ConfigError(f"options {', '.join(sorted(options))} given with a {type(prior).__name__} object: "
                              "set them on the object")
        return prior
    accepted = option_names(prior)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        takes = f"its options: {', '.join(accepted)}" if accepted else "it takes none"
        raise ConfigError(f"prior {prior} has no option {unknown[0]!r} ({takes})")
    try:
        return PRIORS[prior](**options)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"prior {prior}: {e}")
