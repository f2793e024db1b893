"""pyro-bc: Bayesian compression of neural networks (Louizos, Ullrich & Welling 2017) in Pyro."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from pyro_bc.infer import distributions  # noqa: F401  (registers the KL divergences)
from pyro_bc.nn.convert import bayesianize

__all__ = ["bayesianize", "compress", "finetune", "fit", "load", "predictive", "pruned_network"]

if TYPE_CHECKING:
    from torch import nn

__version__ = "0.1.0"


def load(path: str | os.PathLike[str], bayesian: bool = False) -> nn.Module:
    """The compressed network of a ``.bcz`` file: a plain ``torch.nn.Sequential`` in eval mode; with ``bayesian``,
    the compressed Bayesian network, whose forward draws once per call (a file written with ``keep_variance``)
    (:func:`pyro_bc.bcz.codec.load`; the codec is imported on the first call, not with the package)."""
    from pyro_bc.bcz import codec

    return codec.load(path, bayesian)


def __getattr__(name: str):
    """``fit`` (:func:`pyro_bc.train.loop.fit`), ``finetune`` (:func:`pyro_bc.compression.finetuning.finetune`), ``compress``
    (:func:`pyro_bc.compression.pipeline.compress`), ``pruned_network`` (:func:`pyro_bc.compression.pruned.pruned_network`) and
    ``predictive`` (:func:`pyro_bc.runs.load.predictive`), imported on first use so that ``import pyro_bc`` stays
    light."""
    if name == "fit":
        from pyro_bc.train.loop import fit

        return fit
    if name == "compress":
        from pyro_bc.compression.pipeline import compress

        return compress
    if name == "finetune":
        from pyro_bc.compression.finetuning import finetune

        return finetune
    if name == "pruned_network":
        from pyro_bc.compression.pruned import pruned_network

        return pruned_network
    if name == "predictive":
        from pyro_bc.runs.load import predictive

        return predictive
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
