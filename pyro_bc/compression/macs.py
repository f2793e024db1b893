"""Multiply-accumulates per example of a network's linear and convolutional layers, counted from their shapes.

A linear layer costs ``in * out`` per position it is applied at; a convolution ``out_channels *
(in_channels / groups) * kh * kw * out_h * out_w``. The output sizes come from the input shape, propagated
through the network by running it once on a zero example, so any ``nn.Module`` (a sequence or a graph) is
counted alike. Activations, pooling, selections and biases are not counted.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pyro_bc.nn.kinds import dense_layers, kind_of
from pyro_bc.nn.network import example_input, layers_called_as_modules


def layer_macs(module: nn.Module, output: torch.Tensor) -> int:
    """MACs of one layer (:data:`~pyro_bc.nn.kinds.LAYER_KINDS`) for one example, given its output (batch of one)."""
    kind = kind_of(module)
    if kind is None:
        raise TypeError(f"no MAC count for {type(module).__name__}")
    return kind.macs(module, output)


@torch.no_grad()
def count_macs(network: nn.Module, input_shape: Sequence[int], layers: Sequence[nn.Module] | None = None,
               input_dtype: torch.dtype | None = None) -> list[int]:
    """MACs per example of each ``nn.Linear`` / ``nn.Conv2d`` of ``network`` (or of those in ``layers``), in the
    order they run, on inputs of ``input_dtype`` (None: floating point; an integer type for token ids)."""
    counts: list[int] = []

    def hook(module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        counts.append(layer_macs(module, output))

    layers = [m for _, m in dense_layers(network)] if layers is None else layers
    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        with layers_called_as_modules():  # each layer's hook runs (PyTorch's fused transformer path calls none)
            network(example_input(network, tuple(input_shape), input_dtype))
    finally:
        for handle in handles:
            handle.remove()
    return counts


def add_macs(summary: dict, original: nn.Module, compressed: nn.Module, input_shape: Sequence[int],
             compressed_layers: Sequence[nn.Module] | None = None,
             original_layers: Sequence[nn.Module] | None = None, input_dtype: torch.dtype | None = None) -> dict:
    """Put ``macs_original`` and ``macs_compressed`` into each entry of ``summary["layers"]`` and their totals
    at the top level (in place); returns ``summary``. The networks' layers (``compressed_layers``,
    ``original_layers``: those that are Bayesian layers, where a network has others) match the entries in order."""
    columns = {"macs_original": count_macs(original, input_shape, original_layers, input_dtype),
               "macs_compressed": count_macs(compressed, input_shape, compressed_layers, input_dtype)}
    for key, counts in columns.items():
        if len(counts) != len(summary["layers"]):
            raise ValueError(f"{key}: {len(counts)} linear/conv layers ran, but the summary has "
                             f"{len(summary['layers'])} layers")
        for row, count in zip(summary["layers"], counts):
            row[key] = count
    for key, counts in columns.items():
        summary[key] = sum(counts)
    return summary
