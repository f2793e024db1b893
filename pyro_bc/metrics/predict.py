"""The posterior predictive of a classifier: class probabilities averaged over posterior draws.

``predictive(source, x, samples)`` returns ``(1/S) sum_s softmax(f(x; w_s))``. A draw runs the guide and replays the
network's body on it under :class:`~pyro_bc.infer.reparam.LocalReparameterization`, so every example gets its own
pre-activation noise (and its own group scales ``z``): the examples of a batch are independent draws, each from
the predictive of a weight sample. For fully connected layers this is the same distribution per example as
sampling the weights explicitly; for convolutions it draws every output position independently (Kingma et al.
2015), an approximation of shared weights (docs/PYTHON.md). ``samples=0`` gives the deterministic
posterior-mean network's probabilities.
"""

from __future__ import annotations

import pyro
import torch
from pyro import poutine

from pyro_bc.errors import ConfigError
from pyro_bc.infer.reparam import LocalReparameterization
from pyro_bc.metrics.scores import classification_metrics
from pyro_bc.nn.likelihoods import CategoricalLikelihood
from pyro_bc.nn.network import BayesianNet, layers_called_as_modules


def draw_logits(net: BayesianNet, x: torch.Tensor) -> torch.Tensor:
    """One posterior draw of the body's outputs for the examples ``x`` (local reparameterisation, per-example
    noise). The guide runs in a scoped, empty param store, so the caller's store is left as it was."""
    with pyro.get_param_store().scope(), LocalReparameterization(), layers_called_as_modules():
        guide_trace = poutine.trace(net.guide).get_trace()
        return poutine.replay(net.body, trace=guide_trace)(x)


@torch.no_grad()
def predictive(net: torch.nn.Module, x: torch.Tensor, samples: int = 30, batch_size: int = 1000,
               seed: int = 0) -> torch.Tensor:
    """Class probabilities ``[N, classes]`` of the examples ``x`` (``[N, positions..., classes]`` for a network that
    classifies each position), averaged over ``samples`` posterior draws.

    ``net``: a :class:`~pyro_bc.nn.network.BayesianNet`, or any module whose forward draws once per call (e.g.
    ``pyro_bc.load(path, bayesian=True)``); a plain module gives its own probabilities for every ``samples``
    (``pyro_bc.predictive`` also takes a run directory or a ``.bcz`` file, :func:`pyro_bc.runs.load.predictive`).
    ``samples=0``: the deterministic network (a source's ``posterior_mean_network()`` where it has one).
    ``seed`` seeds the draws; torch's global random state is left as it was. Computed on the network's device,
    in eval mode (restored afterwards).
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
        raise ConfigError(f"samples must be a whole number >= 0, got {samples!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
    if not isinstance(net, torch.nn.Module):
        raise ConfigError(f"predictive needs a torch module, got {type(net).__name__} (pyro_bc.predictive also takes "
                          "a run directory or a .bcz path)")
    if isinstance(net, BayesianNet) and not isinstance(net.observation, CategoricalLikelihood):
        raise ConfigError(f"the predictive is of class probabilities: the network's likelihood is {net.likelihood!r}")
    x = torch.as_tensor(x)
    x = x.to(torch.get_default_dtype()) if x.is_floating_point() else x
    shape = getattr(net, "input_shape", None)
    if shape is not None and tuple(x.shape[1:]) != tuple(shape):
        single = " (one example? give x[None])" if tuple(x.shape) == tuple(shape) else ""
        raise ConfigError(f"examples have shape {tuple(x.shape[1:])}, the network expects {tuple(shape)}{single}")
    parameter = next(net.parameters(), None)
    device = parameter.device if parameter is not None else x.device
    was_training = net.training
    net.eval()
    try:
        if samples == 0 and hasattr(net, "posterior_mean_network"):
            mean_net = net.posterior_mean_network()
            return _batched(lambda b: torch.softmax(mean_net(b), -1), x, batch_size, device)
        forward = (lambda b: draw_logits(net, b)) if isinstance(net, BayesianNet) else net
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return _batched(lambda b: sum(torch.softmax(forward(b), -1) for _ in range(max(samples, 1)))
                            / max(samples, 1), x, batch_size, device)
    finally:
        net.train(was_training)


def _batched(fn, x: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    if not len(x):
        raise ConfigError("no examples to predict")
    return torch.cat([fn(x[i:i + batch_size].to(device)).float() for i in range(0, len(x), batch_size)])


#: Posterior draws behind the full-posterior and compressed-Bayesian metrics that ``compress`` records.
SUMMARY_SAMPLES = 30


def scored(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, samples: int = 30, batch_size: int = 1000,
           seed: int = 0) -> dict[str, float]:
    """Error (percent), NLL, Brier score and ECE (:mod:`pyro_bc.metrics.scores`) of :func:`predictive`'s probabilities."""
    return classification_metrics(predictive(net, x, samples, batch_size, seed).cpu(), y.cpu())


def predictive_summary(net: BayesianNet, compressed: torch.nn.Module, test: tuple[torch.Tensor, torch.Tensor],
                       bayesian: torch.nn.Module | None = None, samples: int = SUMMARY_SAMPLES) -> dict:
    """The metrics ``compress`` records in ``MODEL.json`` under ``predictive``: the full posterior (``samples``
    draws of ``net``), its posterior-mean network, the compressed deterministic network and, given ``bayesian`` (a
    module drawing once per call), the compressed Bayesian network (``samples`` draws)."""
    x, y = test
    out = {"samples": samples, "full_posterior": scored(net, x, y, samples), "posterior_mean": scored(net, x, y, 0),
           "compressed_deterministic": scored(compressed, x, y, 0)}
    if bayesian is not None:
        out["compressed_bayesian"] = scored(bayesian, x, y, samples)
    return out
