"""SVI training: minibatch-scaled ELBO, local reparameterisation, warm-up, clipping, checkpoints.

The loss of a step is ``-ELBO / N`` for one minibatch: the mean negative log-likelihood of the batch
plus ``beta * KL / N`` (``beta`` ramps linearly from 0 to 1 over the warm-up epochs, else 1), which is
the official code's loss. Each epoch appends to ``RUN_DIR/metrics.jsonl`` and writes
``RUN_DIR/checkpoint.pt`` atomically; ``resume=True`` continues from it exactly: the minibatch order,
the augmentation draws and the learning rate of an epoch are functions of the seed and the epoch, and
the network, optimiser and torch random states come from the checkpoint.
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
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from models import build_network
from pyro_bc import distributed
from pyro_bc.atomic import atomic_write_text
from pyro_bc.augment import augment, augment_generator
from pyro_bc.checkpoint import load_checkpoint, save_checkpoint
from pyro_bc.data import iterate_minibatches, load_data
from pyro_bc.elbo import MeanFieldELBO
from pyro_bc.errors import CheckpointError, ConfigError, TrainingDiverged
from pyro_bc.evaluate import error_percent, groups_below
from pyro_bc.network import BayesianNet
from pyro_bc.reparam import LocalReparameterization
from pyro_bc.run_dir import CHECKPOINT, CONFIG, METRICS, RunLock, TrainConfig, prepare_run_dir
from pyro_bc.schedule import epoch_lr


def _check_shape(net: BayesianNet, x: torch.Tensor) -> None:
    if net.input_shape is None:  # a converted network: its input is the data's
        net.input_shape = tuple(x.shape[1:])
    if tuple(x.shape[1:]) != net.input_shape:
        raise ConfigError(f"data examples have shape {tuple(x.shape[1:])}, the network expects {net.input_shape}")
    try:
        with torch.no_grad():
            net.posterior_mean_network()(x[:2])
    except RuntimeError as e:
        raise ConfigError(f"data does not fit the network: {(str(e).splitlines() or [""])[0]}")


def _set_clip_var(net: BayesianNet, clip_var: dict[str, float | None]) -> None:
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

    Being an ``nn.Module`` lets ``DistributedDataParallel`` wrap it. ``weight`` multiplies the whole
    loss: a data-parallel rank holding ``b`` of a global batch's ``B`` rows uses ``K b / B``, so that
    the ranks' averaged gradient is the gradient of the global batch, KL counted once (``0`` for a
    rank with no rows: a zero loss over every parameter, so that the gradient all-reduce still runs).
    """

    def __init__(self, net: BayesianNet):
        super().__init__()
        self.net, self.elbo = net, MeanFieldELBO()

    def forward(self, x: torch.Tensor, y: torch.Tensor, n_data: int, beta: float = 1.0, weight: float = 1.0,
                shard: tuple[int, int] | None = None) -> torch.Tensor:
        """``shard``: the rows of a data-parallel global batch that ``x`` is (see :class:`LocalReparameterization`)."""
        if weight == 0:  # an empty shard (a last global batch smaller than the world): zero gradients
            return sum(p.sum() for p in self.parameters()) * 0.0
        model = poutine.scale(self.net.model, scale=weight / n_data)
        guide = poutine.scale(self.net.guide, scale=weight * beta / n_data)
        with LocalReparameterization(shard):
            return self.elbo.differentiable_loss(model, guide, x, y, n_data)


def make_optimizer(net: BayesianNet, lr: float) -> torch.optim.Optimizer:
    """The training loop's optimiser: Adam over the network's parameters, fused (one pass per tensor, ~10% faster)."""
    return torch.optim.Adam(net.parameters(), lr=lr, fused=True)


def svi_step(loss: nn.Module, optimizer: torch.optim.Optimizer, net: BayesianNet, x: torch.Tensor,
             y: torch.Tensor, n_data: int, beta: float = 1.0, weight: float = 1.0,
             shard: tuple[int, int] | None = None, clip_grad_norm: float | None = None) -> torch.Tensor:
    """One optimiser step on ``loss`` (a :class:`NegativeELBO`, maybe wrapped), then variance clipping.

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


def train(config: TrainConfig, out: str | Path, resume: bool = False, progress: bool = True) -> dict:
    """Train ``config`` into run directory ``out``; returns the last epoch's metrics.

    Under ``torchrun`` this is one process of a data-parallel run (:mod:`pyro_bc.distributed`):
    ``config.batch_size`` is then the batch of each process, and only rank 0 writes.
    """
    config.validate()
    torch.set_num_threads(config.threads)
    with distributed.process_group(config.device) as group:
        run_dir = prepare_run_dir(out) if group.is_main else Path(out)
        with RunLock(run_dir) if group.is_main else contextlib.nullcontext():
            group.barrier()  # the others start once rank 0 holds the run directory
            # distribution argument checks cost ~20% of a step, and the inputs are ours: off while training only
            with pyro.validation_enabled(False):
                return _train(config, run_dir, resume, progress and group.is_main, group)


def _device(config: TrainConfig, group: distributed.ProcessGroup) -> torch.device:
    device = torch.device(config.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for, but no CUDA device is available")
        if group.active:
            device = torch.device("cuda", group.local_rank)
    return device


def _train(config: TrainConfig, run_dir: Path, resume: bool, progress: bool,
           group: distributed.ProcessGroup) -> dict:
    device = _device(config, group)
    state = load_checkpoint(run_dir / CHECKPOINT) if resume else None
    if state is not None:
        saved = state["config"]
        if (saved["model"], saved["prior"]) != (config.model, config.prior):
            raise CheckpointError(f"{run_dir / CHECKPOINT} is a {saved['model']}/{saved['prior']} run, "
                                  f"not {config.model}/{config.prior}")
        config = dataclasses.replace(TrainConfig(**saved), epochs=config.epochs, threads=config.threads,
                                     device=config.device, eval_every=config.eval_every)
    data = load_data(config.data, val_size=config.val_size, seed=config.seed, subset=config.subset)  # numpy's RNG
    pyro.set_rng_seed(config.seed)  # the same stream in every process (see pyro_bc.distributed)
    net = build_network(config.model, config.prior, input_shape=tuple(data.train.x.shape[1:]), **config.prior_options)
    _set_clip_var(net, config.clip_var)
    _check_shape(net, data.train.x[:2])
    if config.init_from and state is None:
        try:
            init_state = torch.load(config.init_from, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001  (any failure of user or file code is reported the same way)
            raise ConfigError(f"--init-from {config.init_from}: not a readable state_dict ({type(e).__name__})")
        net.init_from(init_state)
    net.to(device)
    optimizer = make_optimizer(net, config.lr)
    metrics: list[dict] = []
    if state is not None:
        try:
            net.load_state_dict(state["network"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{run_dir / CHECKPOINT} does not fit the network: {(str(e).splitlines() or [""])[0]}")
        torch.set_rng_state(state["rng"]["torch"])
        metrics = state["metrics"]
    start_epoch = state["epoch"] if state is not None else 0
    run_config = {**dataclasses.asdict(config), "world_size": group.world_size, "data_format": data.format,
                  "normalisation": data.normalisation,
                  "layer_clip_var": {name: layer.clip_var for name, layer in zip(net.layer_names, net.layers)}}
    if group.is_main:
        atomic_write_text(run_dir / CONFIG, json.dumps(run_config, indent=2))

    train_x, train_y = data.train.x.to(device), data.train.y.to(device)
    val_x, val_y = data.val.x.to(device), data.val.y.to(device)
    n_data = len(train_x)
    global_batch = config.batch_size * group.world_size
    steps_per_epoch = math.ceil(n_data / global_batch)
    negative_elbo = NegativeELBO(net)
    loss = DistributedDataParallel(negative_elbo) if group.active else negative_elbo
    for epoch in range(start_epoch, config.epochs):
        started, total, net_steps = time.perf_counter(), 0.0, 0
        order = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        draws = augment_generator(config.seed, epoch) if config.augment else None
        lr = epoch_lr(config.lr_schedule, config.lr, epoch, config.epochs)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
        batches = iterate_minibatches(data.train, global_batch, order)
        bar = tqdm(batches, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False,
                   disable=None if progress else True, mininterval=0.5)  # None: no bar when not a terminal
        for step, (x, y) in enumerate(bar):
            if draws is not None:  # the global batch, alike in every process
                x = augment(x, draws)
            rows = len(x)  # of the global batch; this process takes [start, stop)
            start, stop = group.rows(rows)
            weight = group.world_size * (stop - start) / rows if group.active else 1.0
            x, y = x[start:stop].to(device), y[start:stop].to(device)
            done = epoch * steps_per_epoch + step + 1
            beta = min(1.0, done / (config.warmup_epochs * steps_per_epoch)) if config.warmup_epochs else 1.0
            value = group.mean(svi_step(loss, optimizer, net, x, y, n_data, beta, weight,
                                        (start, rows) if group.active else None, config.clip_grad_norm)).item()
            if not math.isfinite(value) or not math.isfinite(total + value):
                raise TrainingDiverged(f"non-finite ELBO at epoch {epoch + 1}, step {step + 1} "
                                       f"(first bad value: {_first_nonfinite(net)}); last good checkpoint "
                                       f"{run_dir / CHECKPOINT} is intact")
            total, net_steps = total + value, net_steps + 1
            if step % 50 == 0:
                bar.set_postfix(loss=f"{value:.3f}")
        bar.close()
        stepped = time.perf_counter()
        if not all(torch.isfinite(p).all() for p in net.parameters()):
            raise TrainingDiverged(f"non-finite parameter after epoch {epoch + 1}: {_first_nonfinite(net)}")
        if group.is_main:
            record = {"epoch": epoch + 1, "elbo": -total / max(net_steps, 1), "beta": beta if net_steps else 1.0,
                      "lr": lr}
            if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs:  # draws nothing: resume is exact
                mean_net = net.posterior_mean_network()
                record.update(train_error=error_percent(mean_net, train_x, train_y),
                              val_error=error_percent(mean_net, val_x, val_y))
            record["groups_kept"] = groups_below(net)
            ended = time.perf_counter()
            record.update(seconds=ended - started, step_seconds=stepped - started, eval_seconds=ended - stepped)
            metrics.append(record)
            save_checkpoint(run_dir / CHECKPOINT, {
                "config": dataclasses.asdict(config), "epoch": epoch + 1, "network": net.state_dict(),
                "optimizer": optimizer.state_dict(), "rng": {"torch": torch.get_rng_state()}, "metrics": metrics,
                "input_shape": list(net.input_shape),
            })
            atomic_write_text(run_dir / METRICS, "".join(json.dumps(m) + "\n" for m in metrics))
            if progress:
                kept = "-".join(str(v) for v in record["groups_kept"].values())
                errors = (f"train err {record['train_error']:.2f}%  val err {record['val_error']:.2f}%  "
                          if "val_error" in record else "")
                tqdm.write(f"epoch {epoch + 1}: elbo/N {record['elbo']:.4f}  {errors}log alpha<-3: {kept}  "
                           f"({record['seconds']:.1f}s)")
        group.barrier()  # nobody runs ahead of the checkpoint
    return metrics[-1] if metrics else {}
