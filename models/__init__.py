"""The networks pyro-bc ships (one file each, ``build(prior, **options) -> BayesianNet``) and the registry
that builds them, or a user's network file, by name."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import math
import sys
from pathlib import Path

from torch import nn

from pyro_bc.errors import ConfigError
from pyro_bc.nn.convert import bayesianize
from pyro_bc.nn.network import BayesianNet
from pyro_bc.priors import Prior, make_prior

MODULES = {"lenet300": "lenet300", "lenet5": "lenet5", "vgg": "vgg", "resnet20": "resnet"}  # name: file
BUILTIN_MODELS = tuple(MODULES)


def build_network(model: str, prior: Prior | str = "gnj", input_shape: tuple[int, ...] | None = None,
                  width: float | None = None, **prior_options) -> BayesianNet:
    """A built-in network by name, or a user's file defining ``build(prior) -> BayesianNet`` or
    ``build() -> torch.nn.Module`` (a plain network, converted by :func:`pyro_bc.bayesianize`), with the prior
    ``prior`` (a :class:`~pyro_bc.priors.Prior`, or a name and the options it takes).

    ``input_shape`` (one example's, from the data) goes to a ``build`` that takes an ``input_shape`` argument
    (``vgg``, ``resnet20``); networks fixed to one shape (LeNets, most user files) ignore it, and training
    checks it against theirs. ``width`` (a channel multiplier, ``vgg`` and ``resnet20``) goes to a ``build`` that
    takes one; None: the network's own.
    """
    prior = make_prior(prior, **prior_options)
    with _beside(model):
        return _build(model, prior, input_shape, width)


@contextlib.contextmanager
def _beside(model: str):
    """A model file's folder first on ``sys.path`` while it is imported and built, as Python runs a script, so that
    it imports the modules beside it."""
    if not model.endswith(".py"):
        yield
        return
    folder = str(Path(model).resolve().parent)
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        sys.path.remove(folder)


def _build(model: str, prior: Prior, input_shape: tuple[int, ...] | None, width: float | None) -> BayesianNet:
    if model in MODULES:
        module = importlib.import_module(f"models.{MODULES[model]}")
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
        raise ConfigError(f"model {model} defines no build() function (returning a BayesianNet or a torch module)")
    parameters = inspect.signature(build).parameters
    arguments = {"prior": prior} if "prior" in parameters else {}
    if input_shape is not None and "input_shape" in parameters:
        arguments["input_shape"] = tuple(input_shape)
    if width is not None:
        if "width" not in parameters:
            raise ConfigError(f"model {model} takes no width (vgg and resnet20 do)")
        if not (width > 0 and math.isfinite(width)):
            raise ConfigError(f"width must be a positive number, got {width}")
        arguments["width"] = float(width)
    try:
        net = build(**arguments)
    except ConfigError as e:
        raise ConfigError(f"model {model}: {e}")
    except Exception as e:  # noqa: BLE001  (any failure of user code is reported the same way)
        raise ConfigError(f"model {model}: build() failed: {type(e).__name__}: {e}")
    if isinstance(net, BayesianNet):
        return net
    if isinstance(net, nn.Module):  # a plain PyTorch network: its Linear and Conv2d layers made Bayesian
        try:
            return bayesianize(net, prior, input_shape=input_shape)
        except ConfigError as e:
            raise ConfigError(f"model {model}: {e}")
    raise ConfigError(f"model {model}: build() returned {type(net).__name__}, not a torch module or a BayesianNet")
