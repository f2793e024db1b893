"""A run directory's network (:func:`load_run`), a file's original network, and what ``pyro_bc.predictive`` takes
as its source."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from models import build_network
from pyro_bc.bcz import codec
from pyro_bc.compression.finetuning import check_masks, load_masks
from pyro_bc.errors import CheckpointError, ConfigError
from pyro_bc.metrics import predict
from pyro_bc.nn.network import BayesianNet
from pyro_bc.priors import known_options
from pyro_bc.train.checkpoint import load_checkpoint
from pyro_bc.train.run_dir import CHECKPOINT, FINETUNE_FILE, PYTHON_MODEL, TrainConfig

Source = BayesianNet | torch.nn.Module | str | os.PathLike[str]


def load_run(run_dir: str | Path) -> tuple[BayesianNet, TrainConfig, dict]:
    """The trained network of a run directory (from its checkpoint), its config and the checkpoint."""
    state = load_checkpoint(Path(run_dir) / CHECKPOINT)
    config = TrainConfig.from_dict(state["config"])
    if config.model == PYTHON_MODEL:
        raise CheckpointError(f"{Path(run_dir) / CHECKPOINT} is a run of pyro_bc.fit from Python (its network is not "
                              f"in the config): give the network itself, pyro_bc.compress(net, ...) or "
                              f"pyro_bc.runs.report.write_report(run_dir, net=net)")
    net = build_network(config.model, config.prior, input_shape=state.get("input_shape"), width=config.width,
                        **config.prior_options)
    net.load_state_dict(state["network"])
    if net.input_shape is None:  # a converted plain network: its input shape is the data's
        net.input_shape = tuple(state["input_shape"])
    if (Path(run_dir) / FINETUNE_FILE).is_file():  # a run of pyro-bc finetune: its pruned groups are held at zero
        net.pruning_masks = load_masks(run_dir)[0]
        check_masks(net, net.pruning_masks)
    return net.eval(), config, state


def original_network(metadata: dict, input_shape: tuple[int, ...] | None = None) -> torch.nn.Module | None:
    """The dense original network (posterior means of a fresh build, for inputs of ``input_shape``) of a
    ``.bcz`` file's metadata; None where the metadata does not name a buildable model."""
    try:
        options = known_options(metadata["prior"], metadata.get("prior_options", {}))  # older files: every option
        return build_network(metadata["model"], metadata["prior"], input_shape=input_shape,
                             width=metadata.get("width"), **options).posterior_mean_network()
    except (KeyError, ConfigError):
        return None


def as_network(source: Source, samples: int) -> torch.nn.Module:
    """``source`` as a module: a network as it is, a run directory's trained network, a ``.bcz`` file's compressed
    Bayesian network (its deterministic one for ``samples=0``)."""
    if isinstance(source, torch.nn.Module):
        return source
    path = Path(source)
    if path.is_dir():
        return load_run(path)[0]
    if path.is_file():
        return codec.load(path, bayesian=samples > 0)
    raise ConfigError(f"{path}: neither a run directory nor a .bcz file")


def predictive(source: Source, x: torch.Tensor, samples: int = 30, batch_size: int = 1000,
               seed: int = 0) -> torch.Tensor:
    """``pyro_bc.predictive``: :func:`pyro_bc.metrics.predict.predictive` of a network, a run directory of
    ``pyro-bc train`` or a ``.bcz`` file (written with ``keep_variance`` for ``samples`` > 0)."""
    return predict.predictive(as_network(source, samples), x, samples, batch_size, seed)
