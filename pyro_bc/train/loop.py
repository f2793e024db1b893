"""SVI training: minibatch-scaled ELBO, local reparameterisation, warm-up, clipping, checkpoints.

The loss of a step is ``-ELBO / N`` for one minibatch: the mean negative log-likelihood of the batch
plus ``beta * KL / N`` (``beta`` ramps linearly from 0 to 1 over the warm-up epochs, else 1), which is
the official code's loss. Each epoch appends to ``RUN_DIR/metrics.jsonl`` and writes
``RUN_DIR/checkpoint.pt`` atomically; ``resume=True`` continues from it exactly: the minibatch order,
the augmentation draws and the learning rate of an epoch are functions of the seed and the epoch, and
the network, optimiser and torch random states come from the checkpoint.

One loop serves both entry points: :func:`train` (the command line: network and data from a config) and
:func:`fit` (``pyro_bc.fit``: a given network and data) set up and call :func:`run_training`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path

import pyro
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from pyro_bc.atomic import atomic_write_text
from pyro_bc.data.augment import augment, augment_generator
from pyro_bc.data.datasets import Split, as_split, iterate_minibatches
from pyro_bc.errors import CheckpointError, ConfigError, TrainingDiverged, first_line
from pyro_bc.infer import fused
from pyro_bc.infer.elbo import MeanFieldELBO
from pyro_bc.infer.estimators import DEFAULT, Estimation, EstimatorChoice
from pyro_bc.metrics.evaluate import error, groups_below
from pyro_bc.nn.network import BayesianNet, check_forward
from pyro_bc.train import distributed
from pyro_bc.train.checkpoint import load_checkpoint, save_checkpoint
from pyro_bc.train.run_dir import (
    CHECKPOINT,
    CONFIG,
    METRICS,
    PYTHON_MODEL,
    RunLock,
    TrainConfig,
    prepare_run_dir,
    removed_if_refused,
)
from pyro_bc.train.schedule import epoch_lr


def set_clip_var(net: BayesianNet, clip_var: dict[str, float | None]) -> None:
    """Override the variance clipping of the named layers (``None``: no clipping)."""
    layers = dict(zip(net.layer_names, net.layers))
    for name, value in clip_var.items():
        if name not in layers:
            raise ConfigError(f"clip_var names layer {name!r}, but the network's layers are {', '.join(layers)}")
        layers[name].clip_var = value


def _first_nonfinite(net: BayesianNet) -> str:
    for name, p in net.named_parameters():
        if not torch.isfinite(p).all():
            return f"parameter {name}"
    return "the loss"


class NegativeELBO(nn.Module):
    """``-ELBO / N`` of a minibatch (KL weighted by ``beta``) as a module over the network's parameters.

    Being an ``nn.Module`` lets ``DistributedDataParallel`` wrap it. ``estimators``: the gradient estimator of each
    layer kind (:class:`~pyro_bc.infer.estimators.EstimatorChoice` or its text; the local reparameterisation by default).
    ``handler``: an effect handler applied inside the estimators' (fine-tuning's
    :class:`~pyro_bc.compression.finetuning.PruningMask`). ``weight``
    multiplies the whole loss: a data-parallel rank holding ``b`` of a global batch's ``B`` rows uses ``K b / B``,
    so that the ranks' averaged gradient is the gradient of the global batch, KL counted once (``0`` for a
    rank with no rows: a zero loss over every parameter, so that the gradient all-reduce still runs).
    """

    def __init__(self, net: BayesianNet, handler: Messenger | None = None,
                 estimators: str | EstimatorChoice = DEFAULT):
        super().__init__()
        self.net, self.elbo, self.handler = net, MeanFieldELBO(), handler
        self.estimators = EstimatorChoice.parse(estimators)

    def forward(self, x: torch.Tensor, y: torch.Tensor, n_data: int, beta: float = 1.0, weight: float = 1.0,
                shard: tuple[int, int] | None = None) -> torch.Tensor:
        """``shard``: the rows of a data-parallel global batch that ``x`` is (see :class:`~pyro_bc.reparam.LayerDraws`)."""
        if weight == 0:  # an empty shard (a last global batch smaller than the world): zero gradients
            return sum(p.sum() for p in self.parameters()) * 0.0
        model = poutine.scale(self.net.model, scale=weight / n_data)
        guide = poutine.scale(self.net.guide, scale=weight * beta / n_data)
        with Estimation(self.estimators, shard), self.handler or contextlib.nullcontext():  # the handler inside
            return self.elbo.differentiable_loss(model, guide, x, y, n_data)


def make_optimizer(net: BayesianNet, lr: float, variance_lr_factor: float = 1.0) -> torch.optim.Optimizer:
    """The training loop's optimiser: Adam over the network's parameters, fused (one pass per tensor, ~10% faster).

    With ``variance_lr_factor`` other than 1 the layers' :meth:`~pyro_bc.nn.layers.BayesLayer.variance_parameters` form a
    second parameter group whose learning rate is ``lr`` times that factor (its ``lr_factor`` key, which the
    schedule keeps applying). At 1 there is one group, as before the option existed, so that the optimiser state
    of a checkpoint written then still loads.
    """
    if variance_lr_factor == 1.0:
        return torch.optim.Adam(net.parameters(), lr=lr, fused=True)
    variances = [p for layer in net.layers for p in layer.variance_parameters()]
    chosen = {id(p) for p in variances}
    rest = [p for p in net.parameters() if id(p) not in chosen]
    return torch.optim.Adam([{"params": rest, "lr": lr, "lr_factor": 1.0},
                             {"params": variances, "lr": lr * variance_lr_factor, "lr_factor": variance_lr_factor}],
                            lr=lr, fused=True)


def svi_step(loss: nn.Module, optimizer: torch.optim.Optimizer, net: BayesianNet, x: torch.Tensor,
             y: torch.Tensor, n_data: int, beta: float = 1.0, weight: float = 1.0,
             shard: tuple[int, int] | None = None, clip_grad_norm: float | None = None) -> torch.Tensor:
    """One optimiser step on ``loss`` (a :class:`NegativeELBO`, maybe wrapped), then variance clipping.

    Pyro validates every distribution's arguments by default, which makes this step about half as fast; the
    training loop (``fit``, ``pyro-bc train``) runs it inside ``pyro.validation_enabled(False)``, and so should a
    loop of your own once the model runs (``with pyro.validation_enabled(False): ...``).

    ``clip_grad_norm``: the gradients' total 2-norm is scaled down to at most this before the step
    (:func:`torch.nn.utils.clip_grad_norm_`; under data parallelism after the all-reduce, so alike in every process).
    """
    value = loss(x, y, n_data, beta, weight, shard)
    optimizer.zero_grad(set_to_none=True)
    value.backward()
    if clip_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(net.parameters(), clip_grad_norm)
    optimizer.step()
    net.clip_variances()
    return value.detach()


def run_training(config: TrainConfig, out: str | Path | None, resume: bool, progress: bool, setup,
                 handler: Messenger | None = None) -> list[dict]:
    """The training loop around its set-up: the process group, the run directory and its lock (none when ``out``
    is None), the resumed config, then ``setup(state, config) -> (net, train, val, run_config_extras)`` and
    :func:`_train` (``handler``: as :class:`NegativeELBO`'s). Returns every epoch's metrics (a resumed run's earlier
    ones first)."""
    config.validate()
    torch.set_num_threads(config.threads)
    with distributed.process_group(config.device) as group:
        run_dir = None if out is None else Path(out)
        writes = group.is_main and run_dir is not None
        with removed_if_refused(run_dir) if writes else contextlib.nullcontext(), \
                RunLock(prepare_run_dir(run_dir)) if writes else contextlib.nullcontext():
            group.barrier()  # the others start once rank 0 holds the run directory
            # distribution argument checks cost ~20% of a step, and the inputs are ours: off while training only
            with pyro.validation_enabled(False):
                if resume and run_dir is None:
                    raise ConfigError("resume needs the run directory (out) to resume from")
                if not resume and run_dir is not None and (run_dir / CHECKPOINT).exists():  # hours of training
                    raise ConfigError(f"{run_dir} already holds a run: give a new output directory, or resume it "
                                      "(--resume; resume=True in Python)")
                state = load_checkpoint(run_dir / CHECKPOINT) if resume else None
                config = _resumed_config(config, state, run_dir)
                net, train_split, val_split, extras = setup(state, config)
                return _train(net, train_split, val_split, config, run_dir, state, progress and group.is_main,
                              group, extras, handler)


def _same_model(a: str, b: str) -> bool:
    """The same model name, or the same model file by two paths (a run before model files were recorded
    absolute holds the path as given)."""
    return a == b or (a.endswith(".py") and Path(a).resolve() == Path(b).resolve())


def _resumed_config(config: TrainConfig, state: dict | None, run_dir: Path | None) -> TrainConfig:
    """The config of a resumed run: the checkpoint's, with this call's epochs, threads, device and eval_every."""
    if state is None:
        return config
    saved = state["config"]
    path = run_dir / CHECKPOINT
    if saved["model"] == PYTHON_MODEL and config.model != PYTHON_MODEL:
        raise CheckpointError(f"{path} is a run of pyro_bc.fit from Python (its network is not in the config): "
                              f"resume it with pyro_bc.fit(net, ..., out={str(run_dir)!r}, resume=True)")
    if config.model == PYTHON_MODEL and saved["model"] != PYTHON_MODEL:
        raise CheckpointError(f"{path} is a {saved['model']}/{saved['prior']} run of the command line, not of "
                              f"pyro_bc.fit: resume it with pyro-bc train --resume")
    if not _same_model(saved["model"], config.model) or saved["prior"] != config.prior:
        raise CheckpointError(f"{path} is a {saved['model']}/{saved['prior']} run, "
                              f"not {config.model}/{config.prior}")
    return dataclasses.replace(TrainConfig.from_dict(saved), epochs=config.epochs, threads=config.threads,
                               device=config.device, eval_every=config.eval_every)


def _device(config: TrainConfig, group: distributed.ProcessGroup) -> torch.device:
    device = torch.device(config.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for, but no CUDA device is available")
        if group.active:
            device = torch.device("cuda", group.local_rank)
    return device


def _restored(net: BayesianNet, optimizer: torch.optim.Optimizer, state: dict, checkpoint: Path | None) -> list[dict]:
    """The network, the optimiser and torch's random state as the checkpoint ``state`` left them; its metrics."""
    try:
        net.load_state_dict(state["network"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{checkpoint} does not fit the network: {first_line(e)}")
    torch.set_rng_state(state["rng"]["torch"])
    return state["metrics"]


def _epoch_line(record: dict) -> str:
    """The progress line of an epoch's record: ELBO per example, errors where evaluated, groups kept, seconds."""
    kept = "-".join(str(v) for v in record["groups_kept"].values())
    errors = ""
    for split in ("train", "val"):
        if f"{split}_error" in record:
            errors += f"{split} err {record[f'{split}_error']:.2f}%  "
        if f"{split}_rmse" in record:
            errors += f"{split} rmse {record[f'{split}_rmse']:.4g}  "
    return f"epoch {record['epoch']}: elbo/N {record['elbo']:.4f}  {errors}log alpha<-3: {kept}  ({record['seconds']:.1f}s)"


def _kl_weight(config: TrainConfig, steps_done: int, steps_per_epoch: int) -> float:
    """The KL's weight after ``steps_done`` steps: rising linearly to 1 over the warm-up epochs, then 1."""
    return min(1.0, steps_done / (config.warmup_epochs * steps_per_epoch)) if config.warmup_epochs else 1.0


def _diverged(net: BayesianNet, epoch: int, step: int, checkpoint: Path | None) -> TrainingDiverged:
    """The error for a non-finite ELBO at ``step`` of ``epoch`` (both from 0), saying what is left to resume from."""
    left = (f"last good checkpoint {checkpoint} is intact" if checkpoint is not None and checkpoint.is_file()
            else "no epoch finished, so there is no checkpoint")
    return TrainingDiverged(f"non-finite ELBO at epoch {epoch + 1}, step {step + 1} (first bad value: "
                            f"{_first_nonfinite(net)}); {left}")


def _evaluation(net: BayesianNet, epoch: int, config: TrainConfig, train: tuple, val: tuple) -> dict:
    """The posterior mean's errors where ``epoch`` (from 0) is evaluated, every ``eval_every`` and the last: on the
    training data and, where given (``val``'s tensors not None), the validation data. It draws nothing, so a resumed
    run follows the same random stream."""
    if (epoch + 1) % config.eval_every and epoch + 1 != config.epochs:
        return {}
    mean_net = net.posterior_mean_network()
    likelihood = net.observation
    errors = {f"train_{likelihood.error_name}": error(mean_net, *train, likelihood)}
    if val[0] is not None:
        errors[f"val_{likelihood.error_name}"] = error(mean_net, *val, likelihood)
    return errors


def _train(net: BayesianNet, train: Split, val: Split | None, config: TrainConfig, run_dir: Path | None,
           state: dict | None, progress: bool, group: distributed.ProcessGroup, extras: dict,
           handler: Messenger | None = None) -> list[dict]:
    """The training loop: ``net`` (built, seeded, shape-checked) on the ``train`` split, evaluated on ``val``
    (no ``val_error`` when it is None), from the checkpoint ``state`` if one is given; with ``run_dir`` the
    config, a checkpoint and the metrics are written every epoch. Returns every epoch's metrics."""
    device = _device(config, group)
    checkpoint = run_dir / CHECKPOINT if run_dir is not None else None
    net.to(device)
    optimizer = make_optimizer(net, config.lr, config.variance_lr_factor)
    metrics = _restored(net, optimizer, state, checkpoint) if state is not None else []
    start_epoch = state["epoch"] if state is not None else 0
    run_config = {**dataclasses.asdict(config), "world_size": group.world_size, **extras,
                  "layer_clip_var": {name: layer.clip_var for name, layer in zip(net.layer_names, net.layers)}}
    if group.is_main and run_dir is not None:
        atomic_write_text(run_dir / CONFIG, json.dumps(run_config, indent=2))

    train_x, train_y = train.x.to(device), train.y.to(device)
    val_x, val_y = (val.x.to(device), val.y.to(device)) if val is not None else (None, None)
    n_data = len(train_x)
    global_batch = config.batch_size * group.world_size
    steps_per_epoch = math.ceil(n_data / global_batch)
    negative_elbo = NegativeELBO(net, handler, config.estimator)

    def save(epoch: int) -> None:
        save_checkpoint(checkpoint, {
            "config": dataclasses.asdict(config), "epoch": epoch, "network": net.state_dict(),
            "optimizer": optimizer.state_dict(), "rng": {"torch": torch.get_rng_state()}, "metrics": metrics,
            "input_shape": list(net.input_shape),
        })
        atomic_write_text(run_dir / METRICS, "".join(json.dumps(m) + "\n" for m in metrics))

    if state is None and config.epochs == 0 and group.is_main and run_dir is not None:
        save(0)  # an initialised run, not a half-made one: compress, report and --resume work on it
    loss = DistributedDataParallel(negative_elbo) if group.active else negative_elbo
    for epoch in range(start_epoch, config.epochs):
        started, total, net_steps = time.perf_counter(), 0.0, 0
        order = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        draws = augment_generator(config.seed, epoch) if config.augment else None
        lr = epoch_lr(config.lr_schedule, config.lr, epoch, config.epochs)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr * param_group.get("lr_factor", 1.0)
        batches = iterate_minibatches(train, global_batch, order)
        bar = tqdm(batches, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False,
                   disable=None if progress else True, mininterval=0.5)  # None: no bar when not a terminal
        for step, (x, y) in enumerate(bar):
            if draws is not None:  # the global batch, alike in every process
                x = augment(x, draws)
            rows = len(x)  # of the global batch; this process takes [start, stop)
            start, stop = group.rows(rows)
            weight = group.world_size * (stop - start) / rows if group.active else 1.0
            x, y = x[start:stop].to(device), y[start:stop].to(device)
            beta = _kl_weight(config, epoch * steps_per_epoch + step + 1, steps_per_epoch)
            value = group.mean(svi_step(loss, optimizer, net, x, y, n_data, beta, weight,
                                        (start, rows) if group.active else None, config.clip_grad_norm)).item()
            if not math.isfinite(value) or not math.isfinite(total + value):
                raise _diverged(net, epoch, step, checkpoint)
            total, net_steps = total + value, net_steps + 1
            if step % 50 == 0:
                bar.set_postfix(loss=f"{value:.3f}")
        bar.close()
        stepped = time.perf_counter()
        if not all(torch.isfinite(p).all() for p in net.parameters()):
            raise TrainingDiverged(f"non-finite parameter after epoch {epoch + 1}: {_first_nonfinite(net)}")
        if group.is_main:
            record = {"epoch": epoch + 1, "elbo": -total / max(net_steps, 1), "beta": beta if net_steps else 1.0,
                      "lr": lr, **_evaluation(net, epoch, config, (train_x, train_y), (val_x, val_y)),
                      "groups_kept": groups_below(net)}
            ended = time.perf_counter()
            record.update(seconds=ended - started, step_seconds=stepped - started, eval_seconds=ended - stepped)
            metrics.append(record)
            if run_dir is not None:
                save(epoch + 1)
            if progress:
                tqdm.write(_epoch_line(record))
        group.barrier()  # nobody runs ahead of the checkpoint
    fused.free_variance_buffers()  # weight-sized, kept between steps only
    return metrics


#: The options of :func:`fit` beyond its named arguments: the :class:`TrainConfig` fields that concern a given network.
FIT_OPTIONS = ("seed", "warmup_epochs", "eval_every", "clip_grad_norm", "lr_schedule", "threads", "device", "augment",
               "clip_var", "variance_lr_factor", "estimator")


def _prior_name(net: BayesianNet) -> str:
    return "+".join(sorted({layer.prior.name for layer in net.layers}))


def fit(net: BayesianNet, train, val=None, *, epochs: int, batch_size: int = 128, lr: float = 1e-3,
        out: str | Path | None = None, resume: bool = False, progress: bool = True, **options) -> list[dict]:
    """Train ``net`` (a :class:`BayesianNet`, e.g. from :func:`pyro_bc.bayesianize`) by the training loop of
    ``pyro-bc train``; returns every epoch's metrics (the records of ``metrics.jsonl``).

    ``train`` and ``val`` are ``(x, y)`` tensor pairs, ``torch.utils.data.Dataset`` s or ``DataLoader`` s: a Dataset
    or DataLoader is read into tensors once, in the dataset's order (:func:`as_split`; the loader's batch size,
    sampler and shuffling are not used: the loop draws its own minibatches of ``batch_size`` from the seed), so the
    three forms of the same examples give the same parameters. Without ``val`` the records have no ``val_error``.

    ``options``: :data:`FIT_OPTIONS` (``seed`` 0, ``warmup_epochs``, ``eval_every``, ``clip_grad_norm``,
    ``lr_schedule``, ``threads`` (default: torch's current number), ``device``, ``augment``, ``clip_var``,
    ``variance_lr_factor``, ``estimator``: the gradient estimator per layer kind, text such as ``"flipout"`` or
    ``"conv2d=flipout,linear=lrt"``, see :class:`~pyro_bc.infer.estimators.EstimatorChoice`), as
    :class:`TrainConfig` has them. With ``out``, the run directory is written as by ``pyro-bc train``
    (``checkpoint.pt``, ``metrics.jsonl``, ``config.json``, the lock; the config's ``model`` is ``"python"``) and
    ``resume=True`` continues from its checkpoint exactly (the checkpoint's options, this call's ``epochs``,
    ``threads``, ``device`` and ``eval_every``). The network is trained in training mode and left in the mode it
    had; its parameters are those of the last epoch. A fine-tuned network's masks (``net.pruning_masks``) are dropped:
    ``fit`` trains every weight, so compression decides every group again by its log alpha.
    """
    if isinstance(net, BayesianNet):
        net.pruning_masks = None
    return fit_with(net, train, val, epochs=epochs, batch_size=batch_size, lr=lr, out=out, resume=resume,
                    progress=progress, **options)


def fit_with(net: BayesianNet, train, val=None, *, epochs: int, batch_size: int = 128, lr: float = 1e-3,
             out: str | Path | None = None, resume: bool = False, progress: bool = True,
             handler: Messenger | None = None, extras: dict | None = None, **options) -> list[dict]:
    """:func:`fit` with an effect handler on the loss (:class:`NegativeELBO`'s ``handler``) and ``extras`` for the
    run's ``config.json``: what :func:`pyro_bc.compression.finetuning.finetune` runs."""
    unknown = sorted(set(options) - set(FIT_OPTIONS))
    if unknown:
        raise ConfigError(f"fit got unknown option(s) {', '.join(unknown)}: choose from {', '.join(FIT_OPTIONS)}")
    if not isinstance(net, BayesianNet):
        raise ConfigError(f"fit trains a BayesianNet (see pyro_bc.bayesianize), got {type(net).__name__}")
    if options.get("threads") is None:
        options["threads"] = torch.get_num_threads()
    if "estimator" in options:  # recorded in its canonical form
        options["estimator"] = str(EstimatorChoice.parse(options["estimator"]))
    train_split = as_split(train, "train")
    val_split = None if val is None else as_split(val, "val")
    config = TrainConfig(model=PYTHON_MODEL, prior=_prior_name(net), epochs=epochs, batch_size=batch_size, lr=lr,
                         val_size=0 if val_split is None else len(val_split), **options)
    was_training = net.training

    def setup(state: dict | None, config: TrainConfig) -> tuple:
        pyro.set_rng_seed(config.seed)  # after the data were read: a DataLoader draws from torch's generator
        set_clip_var(net, config.clip_var)
        net.cpu()  # as a built network is (a fit before may have left it on a GPU); the loop moves it to the device
        check_forward(net, train_split.x[:2].cpu(), *(split.y for split in (train_split, val_split) if split))
        net.train()
        return net, train_split, val_split, {"data_format": PYTHON_MODEL, "normalisation": None, **(extras or {})}

    try:
        return run_training(config, out, resume, progress, setup, handler)
    finally:
        net.train(was_training)
