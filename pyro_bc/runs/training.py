"""``pyro-bc train`` and ``pyro-bc finetune``: a config to a run directory, and a run's pruning fine-tuned into a new one."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import pyro
import torch

from models import build_network
from pyro_bc.compression.finetuning import (
    PruningMask,
    apply_pruning,
    check_masks,
    finetune_record,
    freeze_batchnorm,
    load_masks,
    pruning_masks,
    save_masks,
)
from pyro_bc.compression.pruned import summary_pruning
from pyro_bc.data.datasets import load_data
from pyro_bc.errors import ConfigError
from pyro_bc.nn.network import check_forward
from pyro_bc.runs.compressing import compress_run
from pyro_bc.runs.load import load_run
from pyro_bc.train.checkpoint import load_checkpoint
from pyro_bc.train.loop import run_training, set_clip_var
from pyro_bc.train.run_dir import CHECKPOINT, FINETUNE_FILE, TrainConfig


def setup_from_config(state: dict | None, config: TrainConfig) -> tuple:
    """The command line's set-up of a run (see :func:`run_training`): the config's data, the network it names
    (seeded, shape-checked, started from ``init_from`` when not resumed) and the config's extras."""
    data = load_data(config.data, val_size=config.val_size, seed=config.seed, subset=config.subset)  # numpy's RNG
    pyro.set_rng_seed(config.seed)  # the same stream in every process (see pyro_bc.train.distributed)
    net = build_network(config.model, config.prior, input_shape=tuple(data.train.x.shape[1:]),
                        width=config.width, **config.prior_options)
    set_clip_var(net, config.clip_var)
    try:
        check_forward(net, data.train.x[:2], *(split.y for split in (data.train, data.val) if split is not None))
    except ConfigError as e:
        source = config.data or "the embedded MNIST"
        raise ConfigError(f"{e} ({source}): give data of the network's input shape with --data DIR")
    if config.init_from and state is None:
        try:
            init_state = torch.load(config.init_from, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001  (any failure of user or file code is reported the same way)
            raise ConfigError(f"--init-from {config.init_from}: not a readable state_dict ({type(e).__name__})")
        if not isinstance(init_state, dict):
            raise ConfigError(f"--init-from {config.init_from}: holds a {type(init_state).__name__}, not a "
                              "state_dict (save one with torch.save(model.state_dict(), path))")
        net.init_from(init_state)
    return net, data.train, data.validation, {"data_format": data.format, "normalisation": data.normalisation}


def train(config: TrainConfig, out: str | Path, resume: bool = False, progress: bool = True) -> dict:
    """Train ``config`` into run directory ``out``; returns the last epoch's metrics.

    Builds the network and loads the data the config names, then runs the one training loop
    (:func:`run_training`, which :func:`pyro_bc.fit` also runs). Under ``torchrun`` this is one process of a
    data-parallel run (:mod:`pyro_bc.train.distributed`): ``config.batch_size`` is then the batch of each process,
    and only rank 0 writes.
    """

    if resume and out is not None and (Path(out) / FINETUNE_FILE).is_file():
        raise ConfigError(f"{out} is a fine-tuning run: resume it with pyro-bc finetune SOURCE_RUN --out {out} "
                          "--resume")
    metrics = run_training(config, out, resume, progress, setup_from_config)
    return metrics[-1] if metrics else {}


def finetune_run(source: str | Path, out: str | Path, *, epochs: int, lr: float = 1e-4, lr_schedule: str = "constant",
                 warmup_epochs: int = 0, eval_every: int = 1, threads: int = 1, device: str = "cpu",
                 rule=None, fold: bool | None = None, resume: bool = False, progress: bool = True) -> dict:
    """``pyro-bc finetune``: compress run ``source`` by ``rule`` (a threshold rule; the priors' defaults when None)
    into a temporary folder, then fine-tune that decision into the new run directory ``out``: the source's config
    (data, split, seed, batch size, clipping) with these epochs, learning rate, schedule and KL warm-up. Returns the
    last epoch's metrics. ``resume=True`` continues ``out`` from its checkpoint and masks (``source`` unused)."""
    out = Path(out)
    layers, graph, source_state = None, None, None
    if resume:
        masks, record = load_masks(out)
        config = dataclasses.replace(TrainConfig.from_dict(load_checkpoint(out / CHECKPOINT)["config"]), epochs=epochs,
                                     threads=threads, device=device, eval_every=eval_every)
    else:
        if Path(source).resolve() == out.resolve():
            raise ConfigError("finetune writes a new run directory: --out must differ from the source run")
        if (out / CHECKPOINT).exists() or (out / FINETUNE_FILE).exists():
            raise ConfigError(f"{out} already holds a run: give a new --out, or add --resume to continue it")
        net, source_config, _ = load_run(source)
        with tempfile.TemporaryDirectory() as tmp:
            summary = compress_run(source, Path(tmp) / "MODEL.bcz", rule=rule, fold=fold)
        data = load_data(source_config.data, val_size=source_config.val_size, seed=source_config.seed,
                         subset=source_config.subset)
        layers, graph = summary_pruning(net, summary, data.train.x)
        masks, record = pruning_masks(layers), finetune_record(str(source), summary, epochs)
        config = dataclasses.replace(source_config, epochs=epochs, lr=lr, lr_schedule=lr_schedule,
                                     warmup_epochs=warmup_epochs, eval_every=eval_every, threads=threads,
                                     device=device, init_from=None)
        source_state = net.state_dict()
    record = {**record, "epochs": epochs}

    def setup(state: dict | None, config: TrainConfig) -> tuple:
        net, train_split, val_split, extras = setup_from_config(state, config)
        check_masks(net, masks)
        freeze_batchnorm(net)  # for the process's life: this network is the run's own
        if state is None:
            net.load_state_dict(source_state)
            apply_pruning(net, layers, graph)
            save_masks(out / FINETUNE_FILE, masks, record)  # inside the run directory's lock, once it is set up
        return net, train_split, val_split, {**extras, "finetune": record}

    metrics = run_training(config, out, resume, progress, setup, handler=PruningMask(masks))
    return metrics[-1] if metrics else {}
