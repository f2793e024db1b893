"""Multiply-accumulates per example of a network's linear and convolutional layers, counted from their shapes.

A linear layer costs ``in * out`` per position it is applied at; a convolution ``out_channels *
(in_channels / groups) * kh * kw * out_h * out_w``. The output sizes come from the input shape, propagated
through the network by running it once on a zero example, so any ``nn.Module`` (a sequence or a graph) is
counted alike. Activations, pooling, selections and biases are not counted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


def layer_macs(module: nn.Module, output: torch.Tensor) -> int:
    """MACs of one ``nn.Linear`` or ``nn.Conv2d`` for one example, given its output (batch of one)."""
    if isinstance(module, nn.Linear):
        positions = math.prod(output.shape[1:-1])  # 1 for a (batch, features) output
        return module.in_features * module.out_features * positions
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        out_h, out_w = output.shape[-2:]
        return module.out_channels * (module.in_channels // module.groups) * kh * kw * out_h * out_w
    raise TypeError(f"no MAC count for {type(module).__name__}")


@torch.no_grad()
def count_macs(network: nn.Module, input_shape: Sequence[int], layers: Sequence[nn.Module] | None = None) -> list[int]:
    """MACs per example of each ``nn.Linear`` / ``nn.Conv2d`` of ``network`` (or of those in ``layers``), in the
    order they run."""
    counts: list[int] = []

    def hook(module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        counts.append(layer_macs(module, output))

    layers = [m for m in network.modules() if isinstance(m, (nn.Linear, nn.Conv2d))] if layers is None else layers
    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        network(torch.zeros(1, *input_shape))
    finally:
        for handle in handles:
            handle.remove()
    return counts


def add_macs(summary: dict, original: nn.Module, compressed: nn.Module, input_shape: Sequence[int],
             compressed_layers: Sequence[nn.Module] | None = None) -> dict:
    """Put ``macs_original`` and ``macs_compressed`` into each entry of ``summary["layers"]`` and their totals
    at the top level (in place); returns ``summary``. The networks' layers (``compressed_layers``: those of the
    compressed network that are Bayesian layers, where it has others) match the entries in order."""
    columns = {"macs_original": count_macs(original, input_shape),
               "macs_compressed": count_macs(compressed, input_shape, compressed_layers)}
    for key, counts in columns.items():
        if len(counts) != len(summary["layers"]):
            raise ValueError(f"{key}: {len(counts)} linear/conv layers ran, but the summary has "
                             f"{len(summary['layers'])} layers")
        for row, count in zip(summary["layers"], counts):
            row[key] = count
    for key, counts in columns.items():
        summary[key] = sum(counts)
    return summary
