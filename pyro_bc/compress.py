"""From a run directory to a ``.bcz`` file and ``MODEL.json``: thresholds, pruning, bits, rates, errors."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from models import build_network
from pyro_bc import codec
from pyro_bc.atomic import atomic_write_text
from pyro_bc.checkpoint import load_checkpoint
from pyro_bc.data import load_mnist
from pyro_bc.errors import ConfigError
from pyro_bc.evaluate import error_percent
from pyro_bc.network import BayesianNet
from pyro_bc.nn import BayesLayer
from pyro_bc.posterior import (
    LayerPosterior,
    PrunedLayer,
    analyse,
    choose_precision,
    compressed_model,
    compression_rates,
    fold_pruned_inputs,
    prune,
)
from pyro_bc.run_dir import CHECKPOINT, TrainConfig

DEFAULT_THRESHOLD = -3.0
DEFAULT_THRESHOLD_PER_WEIGHT = 3.0  # Sparse VD's customary log alpha cut for per-weight (lu) posteriors
SEARCH_GRID = np.round(np.arange(-8.0, 6.01, 0.25), 2)
FOLD_EXAMPLES = 10_000  # training examples whose layer inputs give the means that pruned weights are folded with


def default_thresholds(net: BayesianNet) -> list[float]:
    """The log alpha cuts used when none is given: each layer's prior's (-3 per group, 3 per weight for ``lu``)."""
    return [layer.prior.default_threshold for layer in net.layers]


def load_run(run_dir: str | Path) -> tuple[BayesianNet, TrainConfig, dict]:
    """The trained network of a run directory (from its checkpoint), its config and the checkpoint."""
    state = load_checkpoint(Path(run_dir) / CHECKPOINT)
    config = TrainConfig(**state["config"])
    net = build_network(config.model, config.prior, **config.prior_options)
    net.load_state_dict(state["network"])
    return net.eval(), config, state


def gap_thresholds(posts: list[LayerPosterior], lo: float = -6.0, hi: float = 2.0, min_gap: float = 2.0) -> list[float]:
    """Per layer, the middle of the widest gap between sorted log alpha values that overlaps [lo, hi],
    clipped to [lo, hi].

    Falls back to -3 where no gap of at least ``min_gap`` nats is found (METHOD.md 11). Between 20 or 50
    values spread over a continuum, gaps of one nat occur by chance (LeNet-5's conv1 at epoch 100 had one
    of 1.1 at -5.3, and cutting there took the test error to 47%), while the two modes of a layer that
    has separated lie several nats apart (its conv2: 0.3 to 4.4), hence the 2-nat minimum.
    """
    out = []
    for post in posts:
        values = np.sort(post.log_alpha.flatten().double().numpy())
        left, right = values[:-1], values[1:]
        widths = right - left
        ok = (right >= lo) & (left <= hi) & (widths >= min_gap)
        if ok.any():
            best = np.flatnonzero(ok)[np.argmax(widths[ok])]
            out.append(float(np.clip((left[best] + right[best]) / 2, lo, hi)))
        else:
            out.append(DEFAULT_THRESHOLD)
    return out


@torch.no_grad()
def layer_input_means(net: BayesianNet, x: torch.Tensor, batch_size: int = 1000) -> list[torch.Tensor]:
    """Mean of every Bayesian layer's input in the posterior-mean network over the examples ``x``:
    per feature for linear layers, per channel for convolutions."""
    mean_net = net.posterior_mean_network()
    sums: dict[int, torch.Tensor] = {}
    for start in range(0, len(x), batch_size):
        h = x[start:start + batch_size]
        for i, (module, original) in enumerate(zip(mean_net, net.body)):
            if isinstance(original, BayesLayer):
                part = h.sum(0) if h.dim() == 2 else h.sum((0, 2, 3))
                sums[i] = sums.get(i, 0) + part.double()
            h = module(h)
    return [total / len(x) for _, total in sorted(sums.items())]


def pruned_layers(posts: list[LayerPosterior], thresholds: list[float],
                  input_means: list[torch.Tensor] | None) -> list[PrunedLayer]:
    """:func:`prune`, then, given the layers' input means, :func:`fold_pruned_inputs`."""
    layers = prune(posts, thresholds)
    return layers if input_means is None else fold_pruned_inputs(layers, input_means)


def _compressed_error(net, posts, thresholds, x, y, input_means=None) -> tuple[float, int]:
    layers = pruned_layers(posts, thresholds, input_means)
    module = codec.to_module(compressed_model(net, layers, choose_precision(layers)))
    return error_percent(module, x, y), sum(int(layer.mask.sum()) for layer in layers)


def search_thresholds(net: BayesianNet, posts: list[LayerPosterior], budget: float, x_val, y_val,
                      input_means: list[torch.Tensor] | None = None) -> list[float]:
    """The most compressing per-layer thresholds whose pruned, rounded network's **validation** error
    stays within ``budget`` percentage points of the unpruned posterior-mean network's.

    Layers are visited largest first; for each, a binary search over a grid of thresholds finds the
    lowest one that keeps the error within budget with the others fixed. Every accepted setting was
    evaluated, so the budget holds for the result.
    """
    limit = error_percent(net.posterior_mean_network(), x_val, y_val) + budget
    thresholds = [float(SEARCH_GRID[-1])] * len(posts)
    if _compressed_error(net, posts, thresholds, x_val, y_val, input_means)[0] > limit:
        raise ConfigError(f"even the least pruned network exceeds the error budget of {budget} points: "
                          "raise --max-error-increase")
    for i in sorted(range(len(posts)), key=lambda k: -posts[k].mean.numel()):
        lo, hi = 0, len(SEARCH_GRID) - 1  # SEARCH_GRID[hi] is known to be within budget
        while lo < hi:
            mid = (lo + hi) // 2
            trial = thresholds[:i] + [float(SEARCH_GRID[mid])] + thresholds[i + 1:]
            if _compressed_error(net, posts, trial, x_val, y_val, input_means)[0] <= limit:
                hi = mid
            else:
                lo = mid + 1
        thresholds[i] = float(SEARCH_GRID[hi])
    return thresholds


def compress_run(run_dir: str | Path, out: str | Path, thresholds: list[float] | None = None, auto: str | None = None,
                 max_error_increase: float | None = None, data: str | None = None, fold: bool | None = None) -> dict:
    """Compress a finished run into ``out`` (``.bcz``) and ``MODEL.json`` beside it; returns the summary.

    With ``fold``, what the pruned weights add on average (over the first :data:`FOLD_EXAMPLES` training
    examples) goes into the biases (:func:`~pyro_bc.posterior.fold_pruned_inputs`). The default folds for
    the group priors (gnj, ghs), whose pruned groups still add their mean, and not for ``lu``, whose
    pruned weights' means are noise (both measured in analysis/RESULTS.md).
    """
    out = Path(out)
    if not out.parent.is_dir():
        raise ConfigError(f"output folder {out.parent} does not exist")
    net, config, _ = load_run(run_dir)
    mnist = load_mnist(data or config.data, val_size=config.val_size, seed=config.seed)
    posts = analyse(net)
    fold = all(layer.prior.folds_pruned_inputs for layer in net.layers) if fold is None else fold
    means = layer_input_means(net, mnist.train.x[:FOLD_EXAMPLES]) if fold else None
    if thresholds is not None:
        method = "given"
    elif auto == "gap":
        thresholds, method = gap_thresholds(posts), "auto gap"
    elif max_error_increase is not None:
        thresholds = search_thresholds(net, posts, max_error_increase, mnist.val.x, mnist.val.y, means)
        method = f"max validation error increase {max_error_increase} points"
    else:
        thresholds = default_thresholds(net)
        method = "default " + ", ".join(f"{t:g}" for t in dict.fromkeys(thresholds))
    layers = pruned_layers(posts, thresholds, means)
    precision = choose_precision(layers)
    rates = compression_rates(layers, precision)
    metadata = {"model": config.model, "prior": config.prior, "thresholds": thresholds, "threshold_method": method,
                "run_dir": str(run_dir), "tau0": config.tau0, "prior_options": config.prior_options,
                "data": data or config.data,
                "val_size": config.val_size, "seed": config.seed}
    file_bytes = codec.write_bcz(out, compressed_model(net, layers, precision, metadata))
    loaded = codec.load(out)
    original_bytes = 4 * sum(p.numel() for layer in net.layers for p in (layer.weight_mu, layer.bias_mu))
    pruned_only = codec.to_module(compressed_model(net, layers, None))
    test_x, test_y = mnist.test.x, mnist.test.y
    summary = {
        "layers": [{
            "name": layer.post.name, "groups_total": layer.post.n_groups, "groups_kept": layer.groups_kept,
            "weights_total": layer.mask.numel(), "weights_kept": int(layer.mask.sum()), "bits": precision.bits(i),
            "exponent_bits": precision.exponent_bits, "mantissa_bits": precision.mantissa_bits[i],
            "threshold": layer.threshold,
        } for i, layer in enumerate(layers)],
        "architecture": "-".join(str(layer.groups_kept) for layer in layers),
        "weights_kept_fraction": rates["weights_kept_fraction"],
        "cr_prune": rates["cr_prune"],
        "cr_fast": rates["cr_fast"],
        "cr_file": original_bytes / file_bytes,
        "file_bytes": file_bytes,
        "original_bytes": original_bytes,
        "error_posterior_mean": error_percent(net.posterior_mean_network(), test_x, test_y),
        "error_pruned": error_percent(pruned_only, test_x, test_y),
        "error_compressed": error_percent(loaded, test_x, test_y),
        "val_error_compressed": error_percent(loaded, mnist.val.x, mnist.val.y),
        "exponent_bits_official": precision.exponent_bits_official if math.isfinite(
            precision.exponent_bits_official) else None,
        "cr_fast_official_exponent": rates["cr_fast_official_exponent"],
        "threshold_method": method,
        "fold_pruned_inputs": fold,
        "model": config.model,
        "prior": config.prior,
    }
    atomic_write_text(out.with_suffix(".json"), json.dumps(summary, indent=2) + "\n")
    return summary


def format_table(summary: dict) -> str:
    """The per-layer table and the rates, as printed by ``pyro-bc compress``."""
    rows = [f"{'layer':<10} {'groups kept':>12} {'weights kept':>16} {'bits':>5} {'(e+m)':>6} {'threshold':>9}"]
    for layer in summary["layers"]:
        rows.append(f"{layer['name']:<10} {layer['groups_kept']:>5}/{layer['groups_total']:<6} "
                    f"{layer['weights_kept']:>7}/{layer['weights_total']:<8} {layer['bits']:>5} "
                    f"{layer['exponent_bits']:>2}+{layer['mantissa_bits']:<3} {layer['threshold']:>9.2f}")
    rows.append(f"architecture {summary['architecture']}, {100 * summary['weights_kept_fraction']:.2f}% of weights "
                f"kept; cr_prune {summary['cr_prune']:.1f}, cr_fast {summary['cr_fast']:.1f}, "
                f"cr_file {summary['cr_file']:.1f} ({summary['file_bytes']} of {summary['original_bytes']} bytes)")
    rows.append(f"test error: posterior mean {summary['error_posterior_mean']:.2f}%, pruned "
                f"{summary['error_pruned']:.2f}%, compressed {summary['error_compressed']:.2f}% "
                f"(validation {summary['val_error_compressed']:.2f}%)")
    return "\n".join(rows)


def _ms_per_batch(module: torch.nn.Module, batch: torch.Tensor, repeats: int = 7) -> float:
    times = []
    with torch.no_grad():
        module(batch)
        for _ in range(repeats):
            started = time.perf_counter()
            module(batch)
            times.append(time.perf_counter() - started)
    return 1000 * sorted(times)[len(times) // 2]


def evaluate_file(path: str | Path, data: str | None = None, batch_size: int = 1000) -> dict:
    """Test error of a ``.bcz`` file, and its median time per batch against the dense original network
    (the unpruned architecture at float32; its weights do not change its speed)."""
    model = codec.read_bcz(path)
    meta = model.metadata
    compressed = codec.to_module(model)
    mnist = load_mnist(data or meta.get("data"), val_size=meta.get("val_size", 5000), seed=meta.get("seed", 0))
    x, y = mnist.test.x, mnist.test.y
    try:
        original = build_network(meta["model"], meta["prior"], **meta.get("prior_options", {})).posterior_mean_network()
    except (KeyError, ConfigError):
        original = None
    return {"error": error_percent(compressed, x, y), "n": len(x),
            "ms_per_batch_compressed": _ms_per_batch(compressed, x[:batch_size]),
            "ms_per_batch_original": _ms_per_batch(original, x[:batch_size]) if original is not None else None}
