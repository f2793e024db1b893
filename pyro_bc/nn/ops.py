"""The parameter-free ops a compressed network is made of, on the torch side: which modules, functions and methods
each ``.bcz`` op kind stands for (read by the graph tracer, :mod:`pyro_bc.compression.graph`) and the module that computes it
(built by the codec, :func:`pyro_bc.bcz.modules.to_module`).

An elementwise op (an activation) acts on each position alone, so channels pass through it unchanged: adding one is
one entry of :data:`ELEMENTWISE` and one wire id in :data:`pyro_bc.bcz.model.WIRE_IDS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Elementwise:
    """An activation: its ``.bcz`` kind, its module, and the functions and tensor methods that compute it."""

    kind: str
    module: type[nn.Module]
    functions: tuple[Callable, ...] = ()
    methods: tuple[str, ...] = ()

    def matches(self, module: nn.Module) -> bool:
        """Whether ``module`` computes this op (GELU only in its exact form: the tanh approximation differs)."""
        return type(module) is self.module and getattr(module, "approximate", "none") == "none"


ELEMENTWISE: tuple[Elementwise, ...] = (
    Elementwise("relu", nn.ReLU, (F.relu, torch.relu), ("relu",)),
    Elementwise("tanh", nn.Tanh, (torch.tanh, F.tanh), ("tanh",)),
    Elementwise("sigmoid", nn.Sigmoid, (torch.sigmoid, F.sigmoid), ("sigmoid",)),
    Elementwise("relu6", nn.ReLU6, (F.relu6,)),
    Elementwise("hardswish", nn.Hardswish, (F.hardswish,)),
    Elementwise("silu", nn.SiLU, (F.silu,)),
    Elementwise("gelu", nn.GELU, (F.gelu,)),
    Elementwise("hardsigmoid", nn.Hardsigmoid, (F.hardsigmoid,)),
)
_BY_KIND = {op.kind: op for op in ELEMENTWISE}
ELEMENTWISE_KINDS = tuple(_BY_KIND)


def elementwise_of_module(module: nn.Module) -> str | None:
    """The elementwise kind ``module`` computes, or None."""
    return next((op.kind for op in ELEMENTWISE if op.matches(module)), None)


def elementwise_of_function(function: Callable, kwargs: dict) -> str | None:
    """The elementwise kind of a call of ``function`` with keyword arguments ``kwargs``, or None."""
    if kwargs.get("approximate", "none") != "none":
        return None
    return next((op.kind for op in ELEMENTWISE if function in op.functions), None)


def elementwise_of_method(name: str) -> str | None:
    """The elementwise kind of the tensor method ``name`` (``x.relu()``), or None."""
    return next((op.kind for op in ELEMENTWISE if name in op.methods), None)


def elementwise_module(kind: str) -> nn.Module:
    """A fresh module computing the elementwise op ``kind``."""
    return _BY_KIND[kind].module()


class Mul(nn.Module):
    """The product of its two inputs, one broadcast over the other (a squeeze-excitation scale per channel)."""

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return x * scale


class SpatialMean(nn.Module):
    """The mean over every position of each channel: ``(N, C, H, W) -> (N, C)`` (``x.mean((2, 3))``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(tuple(range(2, x.dim())))
