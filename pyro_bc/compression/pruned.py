"""The pruned network at full size: the posterior-mean network with a compression's pruning applied, float32.

It is the reference the compressed file is measured against (``error_pruned``): the same architecture as the
original, the pruned weights zeroed, each pruned output channel's bias zeroed, BatchNorm that follows a layer folded
into it, and the biases shifted by the fold of pruned inputs where the compression folded. The ``.bcz`` network
computes the same function on fewer channels, up to the rounding of its weights and biases.
"""

from __future__ import annotations

import torch
from torch import nn

from pyro_bc.compression.graph import BodyGraph, analyse_network, prune_network
from pyro_bc.compression.posterior import PrunedLayer, analyse
from pyro_bc.compression.tracer import is_batchnorm
from pyro_bc.errors import ConfigError
from pyro_bc.nn.network import BayesianNet

FOLD_EXAMPLES = 10_000  # training examples whose layer inputs give the means that pruned weights are folded with


@torch.no_grad()
def layer_input_means(net: BayesianNet, x: torch.Tensor, batch_size: int = 1000) -> list[torch.Tensor]:
    """Mean of every Bayesian layer's input in the posterior-mean network over the examples ``x``: per feature
    for linear layers; per channel for convolutions, averaged over examples *and* positions (the per-position
    mean that :func:`~pyro_bc.compression.posterior.fold_pruned_inputs` multiplies by each filter's summed weights). Any body:
    read by forward pre-hooks."""
    mean_net = net.posterior_mean_network()
    sums = [torch.zeros((), dtype=torch.float64) for _ in net.layers]
    counts = [0] * len(net.layers)

    modules = [mean_net.get_submodule(layer.site) for layer in net.layers]
    feature_axes = [layer.kind.feature_axis for layer in net.layers]

    def add(i: int, h: torch.Tensor) -> None:
        axis = feature_axes[i] % h.dim()
        sums[i] = sums[i] + h.double().sum(tuple(d for d in range(h.dim()) if d != axis))
        counts[i] += h.numel() // h.shape[axis]

    handles = [m.register_forward_pre_hook(lambda _m, args, i=i: add(i, args[0])) for i, m in enumerate(modules)]
    try:
        for start in range(0, len(x), batch_size):
            mean_net(x[start:start + batch_size])
    finally:
        for handle in handles:
            handle.remove()
    return [total / max(count, 1) for total, count in zip(sums, counts)]


@torch.no_grad()
def masked_network(net: BayesianNet, layers: list[PrunedLayer], graph: BodyGraph | None = None) -> nn.Module:
    """``net``'s posterior-mean network with each Bayesian layer holding ``layers``' kept ``E[w]`` (the rest
    zero) and bias (BatchNorm and any fold included, pruned outputs zero); the folded BatchNorm modules become
    identities (a subclass with a forward of its own keeps it, normalising by the identity)."""
    mean = net.posterior_mean_network()
    for name in (graph or BodyGraph(net)).batchnorm_names.values():
        parent, _, child = name.rpartition(".")
        norm = mean.get_submodule(name)
        if is_batchnorm(norm):
            setattr(mean.get_submodule(parent) if parent else mean, child, nn.Identity())
        else:  # a subclass with a forward of its own (an activation after it): its normalisation made the identity
            norm.running_mean.zero_()
            norm.running_var.fill_(1.0 - norm.eps)
            for tensor, value in ((norm.weight, 1.0), (norm.bias, 0.0)):
                if tensor is not None:
                    tensor.fill_(value)
    for bayes, layer in zip(net.layers, layers):
        module = mean.get_submodule(bayes.site)
        weight = torch.where(layer.mask, layer.post.mean, torch.zeros((), dtype=layer.post.mean.dtype))
        bias = torch.where(layer.keep_out, layer.post.bias, torch.zeros((), dtype=layer.post.bias.dtype))
        module.weight.copy_(weight.to(module.weight))
        if module.bias is None:  # a layer without bias (BatchNorm followed it, or the fold gives it one)
            module.bias = nn.Parameter(module.weight.new_zeros(module.weight.shape[0]))
        module.bias.copy_(bias.to(module.bias))
    return mean.eval()


def check_pruning(layers: list[PrunedLayer], summary: dict) -> None:
    """ConfigError unless ``layers`` keep exactly the groups the summary's layers record."""
    recorded = summary.get("layers", [])
    if [row.get("name") for row in recorded] != [layer.post.name for layer in layers]:
        raise ConfigError(f"the summary's layers ({', '.join(str(r.get('name')) for r in recorded)}) are not the "
                          f"network's ({', '.join(layer.post.name for layer in layers)})")
    for row, layer in zip(recorded, layers):
        kept = torch.nonzero(layer.keep_groups).flatten().tolist()
        if kept != row.get("kept_groups"):
            raise ConfigError(f"{layer.post.name}: the summary keeps groups {row.get('kept_groups')} but its "
                              f"threshold keeps {kept} in this network: is it the network that was compressed?")


def summary_pruning(net: BayesianNet, summary: dict,
                    train: tuple[torch.Tensor, torch.Tensor] | torch.Tensor | None = None
                    ) -> tuple[list[PrunedLayer], BodyGraph]:
    """``summary``'s pruning decision (``MODEL.json``, or what :func:`pyro_bc.compress` returned for ``net``) as
    ``net``'s :class:`~pyro_bc.compression.posterior.PrunedLayer` s (masks, and biases with any fold), and the network's graph.

    Where the summary folded pruned inputs into the biases, the fold's means come from the first
    :data:`FOLD_EXAMPLES` of ``train`` (``(x, y)`` or ``x``: the training examples the compression was given),
    which is then required. ConfigError if the summary's thresholds keep other groups in ``net`` than it records.
    """
    if net.input_shape is None:
        raise ConfigError("the network's input shape is unknown: train it or compress it first")
    thresholds = [float(row["threshold"]) for row in summary.get("layers", [])]
    if len(thresholds) != len(net.layers):
        raise ConfigError(f"the summary has {len(thresholds)} layers, the network {len(net.layers)}")
    means = None
    if summary.get("fold_pruned_inputs"):
        if train is None:
            raise ConfigError("the summary folded pruned inputs into the biases: give the training examples the "
                              "compression was given, train=(x, y)")
        x = train[0] if isinstance(train, (tuple, list)) else train
        was_training = net.training
        means = layer_input_means(net.eval(), x[:FOLD_EXAMPLES].to(next(net.parameters()).device))
        net.train(was_training)
    graph = BodyGraph(net)
    layers = prune_network(net, analyse_network(net, analyse(net), graph), thresholds, means, graph)
    check_pruning(layers, summary)
    return layers, graph


def pruned_network(net: BayesianNet, summary: dict,
                   train: tuple[torch.Tensor, torch.Tensor] | torch.Tensor | None = None) -> nn.Module:
    """The network ``error_pruned`` measures: ``net``'s posterior-mean network with exactly ``summary``'s pruning
    (``MODEL.json``, or what :func:`pyro_bc.compress` returned for ``net``) applied, at full size and float32
    (:func:`masked_network`). ``train``: the training examples the compression was given, needed where it folded
    (:func:`summary_pruning`)."""
    layers, graph = summary_pruning(net, summary, train)
    return masked_network(net, layers, graph)
