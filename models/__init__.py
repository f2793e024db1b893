"""The networks pyro-bc ships (one file each, ``build(prior, **options) -> BayesianNet``) and the registry
that builds them, or a user's network file, by name."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from pyro_bc.errors import ConfigError
from pyro_bc.network import BayesianNet
from pyro_bc.priors import Prior, make_prior

BUILTIN_MODELS = ("lenet300", "lenet5")


def build_network(model: str, prior: Prior | str = "gnj", **prior_options) -> BayesianNet:
    """A built-in network by name, or a user's file defining ``build(prior) -> BayesianNet``, with the prior
    ``prior`` (a :class:`~pyro_bc.priors.Prior`, or a name and the options it takes)."""
    prior = make_prior(prior, **prior_options)
    if model in BUILTIN_MODELS:
        module = importlib.import_module(f"models.{model}")
    elif model.endswith(".py"):
        path = Path(model)
        if not path.is_file():
            raise ConfigError(f"model file {model} does not exist")
        spec = importlib.util.spec_from_file_location(f"pyro_bc_user_model_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001  (any failure of user or file code is reported the same way)
            raise ConfigError(f"model file {model} failed to import: {type(e).__name__}: {e}")
    else:
        raise ConfigError(f"unknown model {model!r}: choose {', '.join(BUILTIN_MODELS)} or a path to a .py file")
    build = getattr(module, "build", None)
    if not callable(build):
        raise ConfigError(f"model {model} defines no build(prior) function returning a BayesianNet")
    net = build(prior=prior)
    if not isinstance(net, BayesianNet):
        raise ConfigError(f"model {model}: build() returned {type(net).__name__}, not a pyro_bc BayesianNet")
    return net
