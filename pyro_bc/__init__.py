"""pyro-bc: Bayesian compression of neural networks (Louizos, Ullrich & Welling 2017) in Pyro."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from pyro_bc import distributions  # noqa: F401  (registers the KL divergences)
from pyro_bc.convert import bayesianize

__all__ = ["bayesianize", "load"]

if TYPE_CHECKING:
    from torch import nn

__version__ = "0.1.0"


def load(path: str | os.PathLike[str]) -> nn.Module:
    """The compressed network of a ``.bcz`` file: a plain ``torch.nn.Sequential`` in eval mode
    (:func:`pyro_bc.codec.load`; the codec is imported on the first call, not with the package)."""
    from pyro_bc import codec

    return codec.load(path)
