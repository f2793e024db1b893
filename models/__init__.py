"""The networks pyro-bc ships (one file each, ``build(prior, **options) -> BayesianNet``) and the registry
that builds them, or a user's network file, by name."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from pathlib import Path

from torch import nn

from pyro_bc.convert import bayesianize
from pyro_bc.errors import ConfigError
from pyro_bc.network import BayesianNet
from pyro_bc.priors import Prior, make_prior

BUILTIN_MODELS = ("lenet300", "lenet5")


def build_network(model: str, prior: Prior | str = "gnj", **prior_options) -> BayesianNet:
    """A built-in network by name, or a user's file defining ``build(prior) -> BayesianNet`` or
    ``build() -> torch.nn.Module`` (a plain network, converted by :func:`pyro_bc.bayesianize`), with the prior
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
    takes_prior = "prior" in inspect.signature(build).parameters
    net = build(prior=prior) if takes_prior else build()
    if isinstance(net, BayesianNet):
        return net
    if isinstance(net, nn.Module):  # a plain PyTorch network: its Linear and Conv2d layers made Bayesian
        try:
            return bayesianize(net, prior)
        except ConfigError as e:
            raise ConfigError(f"model {model}: {e}")
    raise ConfigError(f"model {model}: build() returned {type(net).__name__}, not a torch module or a BayesianNet")
