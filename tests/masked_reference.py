"""An independent reference for a compressed sequence of ``gnj`` layers, built by the tests from the network's
parameters and ``MODEL.json`` alone (none of pyro_bc's pruning, folding, rounding or codec code).

The reference is the posterior-mean network (``E[w] = E[z] mu_W``; a convolution's bias scaled by ``E[z]``) in
float64 with every weight outside the kept groups set to zero: a layer keeps the weights whose input and output both
stay, where a linear layer's groups are its inputs and a convolution's its output channels (the next layer's kept
inputs are this layer's kept outputs; the last layer keeps every output). With a fold, each layer's bias gains
``sum over its zeroed weights of E[w] x mean(input)``, the mean taken over the fold examples in the *unpruned*
network: per feature for a linear layer, per channel over examples and positions for an unpadded, ungrouped
convolution (whose zeroed filters are summed over their taps); padded or grouped convolutions are not folded. The
rounded reference then puts each kept weight on its layer's grid, ``floor(E[w] 2^m + 1/2) 2^-m`` with ``m`` the
layer's ``mantissa_bits``, and each bias on the nearest float16.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

import pyro_bc
from pyro_bc.nn.layers import BayesConv2d, BayesLayer
from pyro_bc.nn.network import BayesianNet


def posterior_means(layer: BayesLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """``E[w]`` and the bias of a gnj layer, float64, from its parameters."""
    z = layer.prior.z_mu.detach().double()
    shape = [1] * layer.weight_mu.dim()
    shape[layer.group_axis] = -1
    bias = layer.bias_mu.detach().double()
    return z.reshape(shape) * layer.weight_mu.detach().double(), bias * z if layer.group_axis == 0 else bias


def _run(net: BayesianNet, params: list[tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor,
         seen: list[list[torch.Tensor]] | None = None) -> torch.Tensor:
    """The body with the Bayesian layers' weights and biases replaced by ``params``; ``seen`` collects each layer's
    inputs."""
    h, i = x.double(), 0
    for module in net.body:
        if not isinstance(module, BayesLayer):
            h = module(h)
            continue
        if seen is not None:
            seen[i].append(h)
        w, b = params[i]
        if isinstance(module, BayesConv2d):
            stride, padding, dilation, groups = module.conv_args
            h = F.conv2d(h, w, b, stride, padding, dilation, groups)
        else:
            h = F.linear(h, w, b)
        i += 1
    return h


def input_means(net: BayesianNet, x: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's input mean in the unpruned network over ``x``: per feature, or per channel for convolutions."""
    seen: list[list[torch.Tensor]] = [[] for _ in net.layers]
    with torch.no_grad():
        _run(net, [posterior_means(layer) for layer in net.layers], x, seen)
    means = []
    for inputs in seen:
        h = torch.cat(inputs)
        means.append(h.mean(0) if h.dim() == 2 else h.mean((0, 2, 3)))
    return means


def masks(net: BayesianNet, summary: dict) -> list[torch.Tensor]:
    """Weight-shaped bool masks from the summary's ``kept_groups``."""
    kept = [torch.zeros(layer.n_groups, dtype=torch.bool).index_fill_(0, torch.tensor(row["kept_groups"],
                                                                                      dtype=torch.long), True)
            for layer, row in zip(net.layers, summary["layers"])]
    out, previous_out = [], None
    for i, layer in enumerate(net.layers):
        n_out, n_in = layer.weight_mu.shape[:2]
        if layer.group_axis == 0:  # a convolution: its groups are its outputs, its inputs the last layer's outputs
            keep_out = kept[i]
            keep_in = torch.ones(n_in, dtype=torch.bool) if previous_out is None else previous_out
        else:
            keep_in = kept[i]
            last = i == len(net.layers) - 1
            keep_out = torch.ones(n_out, dtype=torch.bool) if last else kept[i + 1]
        mask = keep_out[:, None] & keep_in[None, :]
        out.append(mask.reshape(mask.shape + (1,) * (layer.weight_mu.dim() - 2)).expand_as(layer.weight_mu))
        previous_out = keep_out
    return out


def reference_params(net: BayesianNet, summary: dict, means: list[torch.Tensor] | None,
                     rounded: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The masked weights and biases: folded with the layers' input ``means`` (:func:`input_means`; None: no fold),
    and rounded, if asked."""
    params = []
    for i, (layer, mask, row) in enumerate(zip(net.layers, masks(net, summary), summary["layers"])):
        w, b = posterior_means(layer)
        dropped = torch.where(mask, 0.0, w)
        conv = isinstance(layer, BayesConv2d)
        folds = not conv or (all(p == 0 for p in _pair(layer.conv_args[1])) and layer.conv_args[3] == 1)
        if means is not None and folds:
            b = b + (dropped.sum((2, 3)) if conv else dropped) @ means[i]
        w = torch.where(mask, w, 0.0)
        if rounded:
            m = row["mantissa_bits"]
            w = torch.floor(w * 2.0**m + 0.5) * 2.0**-m
            b = b.to(torch.float16).double()
        params.append((w, b))
    return params


def _pair(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def logits(net: BayesianNet, params: list[tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return _run(net, params, x)


def error_percent(scores: torch.Tensor, y: torch.Tensor) -> float:
    """Percentage of examples whose largest score is not the label, counted here."""
    wrong = 0
    for s, label in zip(scores.argmax(1).tolist(), y.tolist()):
        wrong += s != label
    return 100.0 * wrong / len(y)


def unambiguous_threshold(log_alpha: torch.Tensor, lo: float = 0.4, hi: float = 0.6) -> float:
    """A threshold that keeps between ``lo`` and ``hi`` of the values and equals none of them: the middle of the widest
    gap between neighbouring sorted values in that range, as a float32 strictly between them (a median can equal
    a value, and ties at it are common: the log alphas of a barely trained layer sit within 0.2 nats)."""
    values = log_alpha.flatten().double().sort().values
    n = len(values)
    first, last = max(int(lo * n), 1), min(int(hi * n), n - 1)
    gaps = values[first:last + 1] - values[first - 1:last]
    k = first + int(gaps.argmax())
    left, right = float(values[k - 1]), float(values[k])
    threshold = float(torch.tensor((left + right) / 2, dtype=torch.float32))
    assert left < threshold < right, (left, threshold, right)
    return threshold


def assert_matches(path: Path, summary: dict, net: BayesianNet, fold_x: torch.Tensor,
                   sets: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """A summary's errors (``sets``: ``"test"`` and ``"val"`` examples) are those of the reference counted here, to one
    example (float32 against float64 may flip a near tie), and the file at ``path`` computes the rounded reference's
    logits; returns the reference's errors."""
    means = input_means(net, fold_x)
    params = {"error_posterior_mean": [posterior_means(layer) for layer in net.layers],
              "error_pruned": reference_params(net, summary, means, rounded=False),
              "error_compressed": reference_params(net, summary, means, rounded=True)}
    params["val_error_compressed"] = params["error_compressed"]
    errors, scores = {}, {}
    for key, p in params.items():
        x, y = sets["val" if key.startswith("val") else "test"]
        scores[key] = logits(net, p, x)
        errors[key] = error_percent(scores[key], y)
        assert abs(summary[key] - errors[key]) <= 100.0 / len(y) + 1e-9, (key, summary[key], errors[key])
    want = scores["error_compressed"]
    with torch.no_grad():
        got = pyro_bc.load(path)(sets["test"][0]).double()
    assert (got - want).abs().max().item() < 1e-4 * want.abs().max().item()
    return errors
