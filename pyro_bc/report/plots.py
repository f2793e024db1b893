"""Figures of a run, written as PNG files with a headless matplotlib; every function returns its path.

* :func:`plot_group_scales`  forest plot (ArviZ) of one layer's group scales (or, for ``lu``, its weight sample)
* :func:`plot_log_alpha`     log alpha histogram per layer with its threshold
* :func:`plot_input_mask`    input pixels the first linear layer keeps, or the first convolution's filters
* :func:`plot_compression`   groups kept / total and bits per layer, from ``MODEL.json``
* :func:`plot_training`      ELBO, train / validation error and groups kept per layer, per epoch
* :func:`plot_reliability`   reliability diagram: accuracy against confidence in the ECE's 15 bins, per network
* :func:`plot_entropy`       predictive entropy histograms, test images against noise images, per network
* :func:`plot_rotation`      NLL against the test images' rotation, per network

The last three use matplotlib: ArviZ 1.x has no view of class-probability calibration, entropy against an OOD set
or a metric against a shift (its predictive checks compare draws with observed data, not these).
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import arviz as az
import matplotlib.pyplot as plt
import numpy as np
import torch
import xarray as xr

from pyro_bc.compression.posterior import LayerPosterior
from pyro_bc.metrics.scores import ECE_BINS, ece

MAX_FOREST_ROWS = 40
DPI = 100


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return path


def _subplots(n: int, width: float = 4.0, height: float = 3.0, cols: int = 3):
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


# -- (a) group scales -------------------------------------------------------------------------------

def plot_group_scales(dt: xr.DataTree, layer: str, path: str | Path, max_rows: int = MAX_FOREST_ROWS) -> Path:
    """Forest plot (94% interval, median) of ``<layer>_z`` from the DataTree of :func:`pyro_bc.report.datatree.to_datatree`.

    Groups are sorted by log alpha, most relevant (lowest) at the top; a layer with more than
    ``max_rows`` groups shows its ``max_rows/2`` lowest and ``max_rows/2`` highest, as the title says.
    For ``lu`` layers (no group scale), the weight sample ``<layer>_w`` of the first group is shown.
    """
    post = dt["posterior"]
    if f"{layer}_z" in post:
        var = f"{layer}_z"
        la = post[f"{layer}_log_alpha"].isel(chain=0, draw=0)
        gdim = la.dims[0]
        order = np.argsort(la.values, kind="stable")
        n = len(order)
        if n > max_rows:
            half = max_rows // 2
            order = np.concatenate([order[:half], order[-half:]])
            what = f"the {half} lowest and {half} highest log alpha of {n} groups"
        else:
            what = f"all {n} groups, sorted by log alpha"
        coords = {gdim: post[gdim].values[order].tolist()}
        title = f"{layer}: group scale z (guide), {what}"
    else:
        var = f"{layer}_w"
        wg = f"{layer}_w_group"
        coords = {wg: [0]}
        title = f"{layer}: no group scale (lu prior); weights of input/channel 0 (w_unit = output/position)"
    rows = sum(len(v) for v in coords.values()) if var.endswith("_z") else post.sizes[f"{layer}_w_unit"]
    pc = az.plot_forest(dt, var_names=[var], coords=coords, combined=True,
                        figure_kwargs={"figsize": (9, max(2.5, 0.2 * rows + 0.6))})
    fig = pc.viz["figure"].item()
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


# -- (b) log alpha -----------------------------------------------------------------------------------

def plot_log_alpha(log_alphas: dict[str, np.ndarray], thresholds: list[float], path: str | Path,
                   unit: str = "groups") -> Path:
    """Histogram of each layer's log alpha (per group, or per weight for ``lu``) with its threshold."""
    fig, axes = _subplots(len(log_alphas))
    for ax, (layer, la), t in zip(axes, log_alphas.items(), thresholds):
        la = np.asarray(la, dtype=float).ravel()
        la = la[np.isfinite(la)]
        kept = int((la < t).sum())
        lo, hi = min(la.min(initial=t), t) - 0.5, max(la.max(initial=t), t) + 0.5
        ax.hist(la, bins=np.linspace(lo, hi, 50), color="tab:blue", alpha=0.8)
        ax.axvline(t, color="tab:red", linestyle="--", label=f"threshold {t:g}")
        ax.set_title(f"{layer}: {kept}/{len(la)} {unit} below threshold", fontsize=10)
        ax.set_xlabel("log alpha")
        ax.set_ylabel(unit)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


# -- (c) what the first layer keeps -----------------------------------------------------------------

def plot_input_mask(post: LayerPosterior, keep: torch.Tensor, threshold: float, input_shape: tuple[int, ...],
                    path: str | Path) -> Path | None:
    """The first layer's kept inputs as an image, or a convolution's kept filters.

    ``post`` is the first layer's posterior, ``keep`` the bool mask of its kept groups (inputs of a linear
    layer, output channels of a convolution) and ``threshold`` the log alpha threshold that chose them.

    * first layer linear over the flattened image (``in_features == prod(input_shape)``, 2-D spatial
      input): the ``H x W`` map of kept input pixels (one panel per input channel);
    * first layer a convolution: each filter's posterior mean (first input channel), removed
      output channels crossed out in grey;
    * anything else: ``None`` (nothing written).
    """
    spatial = tuple(input_shape[-2:]) if len(input_shape) >= 2 else ()
    if post.kind == "linear" and len(spatial) == 2 and keep.numel() == int(np.prod(input_shape)):
        la = post.log_alpha
        if post.per_weight:  # lu: median over each input's weights
            la = la.median(dim=0).values
        keep = keep.reshape(-1, *spatial).numpy()
        la = la.reshape(-1, *spatial).numpy()
        fig, axes = plt.subplots(len(keep), 2, figsize=(8.5, 4.0 * len(keep)), squeeze=False)
        for c, (ax_la, ax_keep) in enumerate(axes):
            ch = f", input channel {c}" if len(keep) > 1 else ""
            im = ax_la.imshow(la[c], cmap="viridis_r", interpolation="nearest")
            fig.colorbar(im, ax=ax_la, fraction=0.046, pad=0.04)
            ax_la.set_title(f"{post.name}: log alpha per input pixel{ch}\n(low = relevant)", fontsize=9)
            ax_keep.imshow(keep[c], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax_keep.set_title(f"{int(keep[c].sum())}/{keep[c].size} pixels kept at threshold {threshold:g}{ch}\n"
                              "(white = kept, black = pruned)", fontsize=9)
            for ax in (ax_la, ax_keep):
                ax.set_xticks([])
                ax.set_yticks([])
        fig.tight_layout()
        return _save(fig, path)
    if post.kind == "conv2d":
        mean = post.mean[:, 0].numpy()  # (out, kh, kw), first input channel
        n = len(mean)
        cols = min(10, n)
        rows = math.ceil(n / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(1.2 * cols, 1.3 * rows + 0.6), squeeze=False)
        bound = float(np.abs(mean).max()) or 1.0
        for i, ax in enumerate(axes.flat):
            ax.set_xticks([])
            ax.set_yticks([])
            if i >= n:
                ax.set_visible(False)
                continue
            kept = bool(keep[i])
            ax.imshow(mean[i], cmap="RdBu_r" if kept else "gray", vmin=-bound, vmax=bound, interpolation="nearest",
                      alpha=1.0 if kept else 0.35)
            if not kept:
                ax.plot([0, 1], [0, 1], transform=ax.transAxes, color="black", lw=1)
                ax.plot([0, 1], [1, 0], transform=ax.transAxes, color="black", lw=1)
            ax.set_title(f"{i}", fontsize=8, color="black" if kept else "gray")
        fig.suptitle(f"{post.name}: {int(keep.sum())}/{n} filters kept (E[w], red +, blue -; "
                     "crossed = pruned)", fontsize=10)
        fig.tight_layout()
        return _save(fig, path)
    return None


# -- (d) compression ----------------------------------------------------------------------------------

def plot_compression(summary: dict, path: str | Path) -> Path:
    """Bars of groups kept / total and of bits per weight per layer, from a ``MODEL.json`` summary."""
    rows = summary["layers"]
    names = [r["name"] for r in rows]
    x = np.arange(len(rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    total = np.array([r["groups_total"] for r in rows])
    kept = np.array([r["groups_kept"] for r in rows])
    ax1.bar(x, total, color="lightgray", label="total")
    ax1.bar(x, kept, color="tab:blue", label="kept")
    for i, (k, t) in enumerate(zip(kept, total)):
        ax1.text(i, t, f"{k}/{t}", ha="center", va="bottom", fontsize=9)
    ax1.set_xticks(x, names)
    ax1.set_ylabel("groups")
    ax1.set_ylim(0, total.max() * 1.12)
    ax1.set_title(f"groups kept per layer (architecture {summary['architecture']})", fontsize=10)
    ax1.legend(fontsize=8)
    exp = np.array([r["exponent_bits"] for r in rows])
    man = np.array([r["mantissa_bits"] for r in rows])
    ax2.bar(x, np.ones_like(exp), color="tab:gray", label="sign")
    ax2.bar(x, exp, bottom=1, color="tab:orange", label="exponent")
    ax2.bar(x, man, bottom=1 + exp, color="tab:green", label="mantissa")
    for i, r in enumerate(rows):
        ax2.text(i, r["bits"], str(r["bits"]), ha="center", va="bottom", fontsize=9)
    ax2.set_xticks(x, names)
    ax2.set_ylabel("bits per weight")
    ax2.set_ylim(0, max(r["bits"] for r in rows) * 1.15 + 1)
    ax2.set_title(f"bits per weight (cr_prune {summary['cr_prune']:.1f}, cr_fast {summary['cr_fast']:.1f})",
                  fontsize=10)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


# -- (e) training ------------------------------------------------------------------------------------

def plot_training(metrics: list[dict], path: str | Path, totals: dict[str, int] | None = None) -> Path:
    """ELBO, train / validation error and groups kept per layer against the epoch (``metrics.jsonl`` rows).

    With ``totals`` (groups per layer) the kept groups are shown as a percentage of the layer.
    """
    epochs = [m["epoch"] for m in metrics]
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(14, 3.8))
    style = {"marker": "o", "markersize": 3}
    a1.plot(epochs, [m["elbo"] for m in metrics], **style)
    a1.set_title("ELBO per example", fontsize=10)
    evaluated = [m for m in metrics if "val_error" in m]  # every --eval-every epochs
    a2.plot([m["epoch"] for m in evaluated], [m["train_error"] for m in evaluated], label="train", **style)
    a2.plot([m["epoch"] for m in evaluated], [m["val_error"] for m in evaluated], label="validation", **style)
    a2.set_title("error (%)", fontsize=10)
    a2.legend(fontsize=8)
    layers = list(metrics[0].get("groups_kept", {})) if metrics else []
    for layer in layers:
        counts = np.array([m["groups_kept"].get(layer, 0) for m in metrics], dtype=float)
        if totals and totals.get(layer):
            a3.plot(epochs, 100 * counts / totals[layer], label=f"{layer} (of {totals[layer]})", **style)
        else:
            a3.plot(epochs, counts, label=layer, **style)
    a3.set_title("groups with log alpha < -3 " + ("(% of layer)" if totals else "(count)"), fontsize=10)
    if layers:
        a3.legend(fontsize=8)
    for ax in (a1, a2, a3):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if len(epochs) < 10:
            ax.set_xticks(epochs)
    fig.tight_layout()
    return _save(fig, path)


# -- (f) predictions ----------------------------------------------------------------------------------

def plot_reliability(probs: dict[str, torch.Tensor], labels: torch.Tensor, path: str | Path) -> Path:
    """Per network (``{name: [N, K] probabilities}``): accuracy against mean confidence in each non-empty bin of
    :func:`pyro_bc.metrics.scores.ece` (15 equal-width bins of the top-class probability), with the diagonal."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="calibrated")
    for name, p in probs.items():
        confidence, predicted = p.double().max(-1)
        index = (torch.ceil(confidence * ECE_BINS).long() - 1).clamp(0, ECE_BINS - 1)
        xs, ys = [], []
        for b in range(ECE_BINS):
            chosen = index == b
            if chosen.any():
                xs.append(float(confidence[chosen].mean()))
                ys.append(float((predicted[chosen] == labels[chosen]).double().mean()))
        ax.plot(xs, ys, marker="o", markersize=3, label=f"{name} (ECE {ece(p, labels):.4f})")
    ax.set(xlabel="confidence (top-class probability)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
           title="Reliability")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_entropy(entropies: dict[str, dict[str, np.ndarray]], path: str | Path) -> Path:
    """Per network (``{name: {"test": ..., "noise": ..., ...}}``): histograms of the predictive entropy (nats)."""
    fig, axes = _subplots(len(entropies), width=4.0, height=3.0, cols=len(entropies))
    for ax, (name, sets) in zip(axes, entropies.items()):
        top = max(float(np.max(v)) for v in sets.values()) or 1.0
        for label, values in sets.items():
            ax.hist(values, bins=40, range=(0, top), alpha=0.5, density=True, label=label)
        ax.set(title=name, xlabel="predictive entropy (nats)", ylabel="density")
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_rotation(curves: dict[str, dict], path: str | Path) -> Path:
    """Per network (``{name: pyro_bc.metrics.shift.rotation_curve(...)}``): NLL against the rotation in degrees."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, curve in curves.items():
        ax.plot(curve["degrees"], curve["nll"], marker="o", markersize=3,
                label=f"{name} (mean {curve['nll_area']:.2f})")
    ax.set(xlabel="rotation (degrees)", ylabel="test NLL (nats)", title="NLL under rotation")
    ax.legend(fontsize=7)
    return _save(fig, path)
