"""Posterior analysis of a fitted guide: log alpha, marginal weight moments, pruning masks with
propagation through the network, bit precision per layer and compression rates (docs/METHOD.md 6-7).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from pyro_bc.errors import ConfigError
from pyro_bc.nn.network import BayesianNet

MAX_MANTISSA_BITS = 23


@dataclasses.dataclass
class LayerPosterior:
    """What the guide says about one layer, detached from autograd."""

    name: str
    kind: str  # the layer kind's name (pyro_bc.nn.kinds): "linear", "conv1d", "conv2d"
    log_alpha: torch.Tensor  # per group (gnj, ghs) or per weight (lu)
    mean: torch.Tensor  # E[w], weight-shaped
    var: torch.Tensor  # Var[w], weight-shaped
    bias: torch.Tensor  # posterior-mean bias as the network applies it
    group_axis: int
    conv_args: tuple = ()
    per_weight: bool = False  # log alpha per weight (the prior says so: ``lu``) rather than per group
    default_threshold: float = -3.0  # the prior's default cut (``Prior.default_threshold``)
    held_at_zero: torch.Tensor | None = None  # bool, as log alpha: what fine-tuning holds at zero, pruned at any cut

    def __post_init__(self):
        expected = tuple(self.mean.shape) if self.per_weight else (self.mean.shape[self.group_axis],)
        if tuple(self.log_alpha.shape) != expected:
            raise ValueError(f"{self.name}: log alpha of shape {tuple(self.log_alpha.shape)}, expected {expected} "
                             f"({'per weight' if self.per_weight else 'per group'})")

    @property
    def n_groups(self) -> int:
        """Number of groups: inputs (linear) or output channels (conv)."""
        return self.mean.shape[self.group_axis]


@torch.no_grad()
def analyse(net: BayesianNet) -> list[LayerPosterior]:
    """Read every Bayesian layer's guide: log alpha, ``E[w]``, ``Var[w]`` and the bias."""
    out = []
    masks = net.pruning_masks or [None] * len(net.layers)
    for layer, mask in zip(net.layers, masks):
        mean, var = layer.weight_moments()
        conv = layer.kind.is_conv
        out.append(LayerPosterior(layer.site, layer.kind.name, layer.log_alpha().detach().cpu(),
                                  mean.detach().cpu(), var.detach().cpu(), layer.bias_mean().detach().cpu(),
                                  layer.group_axis, layer.conv_args if conv else (), layer.prior.per_weight,
                                  float(layer.prior.default_threshold), None if mask is None else ~mask.own.cpu()))
    return out


def kept_by_threshold(post: LayerPosterior, threshold: float) -> torch.Tensor:
    """Bool, as log alpha: the groups (weights, for ``lu``) that ``threshold`` keeps, less those held at zero."""
    keep = post.log_alpha < threshold
    return keep if post.held_at_zero is None else keep & ~post.held_at_zero


@dataclasses.dataclass
class PrunedLayer:
    """One layer's pruning decision: what it keeps of its inputs, outputs and weights."""

    post: LayerPosterior
    threshold: float
    keep_in: torch.Tensor  # bool over input features / channels
    keep_out: torch.Tensor  # bool over output units / channels
    mask: torch.Tensor  # bool, weight-shaped

    @property
    def keep_groups(self) -> torch.Tensor:
        """Bool over the layer's groups: its inputs (linear) or output channels (conv)."""
        return self.keep_in if self.post.group_axis == 1 else self.keep_out

    @property
    def groups_kept(self) -> int:
        """Number of kept groups."""
        return int(self.keep_groups.sum())

    @property
    def empty(self) -> bool:
        """Whether the layer keeps no weight (no group, or no input left to it): a ``.bcz`` cannot store it."""
        return not bool(self.keep_in.any() and self.keep_out.any() and self.mask.any())


def _own_mask(post: LayerPosterior, threshold: float) -> torch.Tensor:
    keep = kept_by_threshold(post, threshold)
    if post.per_weight:
        return keep
    shape = [1] * post.mean.dim()
    shape[post.group_axis] = -1
    return keep.reshape(shape).expand_as(post.mean)


def _any_except(mask: torch.Tensor, dim: int) -> torch.Tensor:
    return mask.transpose(0, dim).reshape(mask.shape[dim], -1).any(1)


def _outer(post: LayerPosterior, keep_out: torch.Tensor, keep_in: torch.Tensor) -> torch.Tensor:
    m = keep_out[:, None] & keep_in[None, :]
    return m.reshape(m.shape + (1,) * (post.mean.dim() - 2))


def check_thresholds(posts: list[LayerPosterior], thresholds: list[float]) -> None:
    """ConfigError unless there is one finite threshold per layer."""
    if len(thresholds) != len(posts):
        raise ConfigError(f"{len(thresholds)} thresholds given for {len(posts)} layers ({', '.join(p.name for p in posts)})")
    if not all(math.isfinite(t) for t in thresholds):
        raise ConfigError(f"thresholds must be finite numbers, got {thresholds}")


def fold_pruned_inputs(layers: list[PrunedLayer], input_means: list[torch.Tensor]) -> list[PrunedLayer]:
    """Move what the pruned weights add on average into the biases of the units that keep going.

    A pruned weight ``w_oi`` stops adding ``E[w_oi] x_i`` to unit ``o``; adding ``E[w_oi] mean(x_i)`` to the
    unit's bias keeps its average pre-activation. This is exact for inputs that never change, such as
    MNIST's background pixels (-1 after normalisation, so a pruned background pixel's weights act as a
    bias), and a first-order correction otherwise. ``input_means[l]`` is the mean of layer ``l``'s input
    over training examples: per feature for linear layers, per channel (over positions too) for
    convolutions, whose correction is then exact for inputs constant over positions. Layers where it
    could not be (:func:`fold_state`) are left as they are.
    """
    out = []
    for layer, mean_in in zip(layers, input_means):
        post = layer.post
        if fold_state(post, True) != "on":
            out.append(layer)
            continue
        dropped = torch.where(layer.mask, 0.0, post.mean)
        if dropped.dim() > 2:  # a convolution's filters summed over their taps
            dropped = dropped.sum(tuple(range(2, dropped.dim())))
        bias = post.bias + (dropped.double() @ mean_in.double()).to(post.bias.dtype)
        out.append(dataclasses.replace(layer, post=dataclasses.replace(post, bias=bias)))
    return out


def fold_state(post: LayerPosterior, fold: bool) -> str:
    """Whether :func:`fold_pruned_inputs` folds this layer: ``"on"``, or ``"off: <reason>"``.

    A padded convolution sees zeros at the border where a constant input channel would give its mean, so no
    per-channel bias reproduces the pruned weights there; a grouped convolution's filters see only their
    group's channels. Both are left unfolded rather than folded inexactly.
    """
    if not fold:
        return "off"
    if post.conv_args and post.conv_args[3] != 1:
        return "off: grouped convolution"
    if post.conv_args and _padded(post.conv_args[1]):
        return "off: padded convolution"
    return "on"


def _padded(padding) -> bool:
    return padding != "valid" and (isinstance(padding, str) or any(p != 0 for p in (
        (padding,) if isinstance(padding, int) else padding)))


# -- bit precision --------------------------------------------------------------------------------

def mantissa_bits_per_weight(var: torch.Tensor) -> torch.Tensor:
    """Official rule: ``#{t in 1..23 : 2 Var < 2^-t}`` (docs/METHOD.md 7.2)."""
    two_var = 2 * var.double()
    t = torch.ceil(-torch.log2(two_var)) - 1
    return t.clamp(0, MAX_MANTISSA_BITS).nan_to_num(nan=0.0).long()


def exponent_bits_official(max_abs_mean: float) -> float:
    """``ceil(log2(log2(max|E[w]|) + 1) + 1)``: NaN or below 1 for small weights (pitfall 8)."""
    with np.errstate(all="ignore"):
        value = np.ceil(np.log2(np.log2(np.float64(max_abs_mean)) + 1) + 1)
    return float(value)


@dataclasses.dataclass
class Precision:
    """Bits per layer: one exponent width for the network, a mantissa width per layer."""

    mantissa_bits: list[int]
    exponent_bits: int  # clamped to >= 1
    exponent_bits_official: float  # may be NaN or < 1

    def bits(self, i: int) -> int:
        """Bits per weight of layer ``i``: sign, exponent and mantissa."""
        return 1 + self.exponent_bits + self.mantissa_bits[i]


def choose_precision(layers: list[PrunedLayer]) -> Precision:
    """Each layer's mantissa bits (mean of the official rule over its kept weights, rounded up) and the
    network's exponent bits (official rule over the kept means, clamped to >= 1)."""
    mantissa = []
    for layer in layers:
        t = mantissa_bits_per_weight(layer.post.var[layer.mask])
        mantissa.append(math.ceil(t.double().mean().item()) if t.numel() else 0)
    kept_means = [layer.post.mean[layer.mask].abs() for layer in layers]
    max_abs = max((float(m.max()) for m in kept_means if m.numel()), default=0.0)
    official = exponent_bits_official(max_abs)
    clamped = int(official) if math.isfinite(official) and official >= 1 else 1
    return Precision(mantissa, clamped, official)


def quantize(mean: torch.Tensor, mantissa_bits: int) -> torch.Tensor:
    """Integer codes of ``E[w]`` on the fixed-point grid of step ``2^-m``: ``floor(E[w] 2^m + 1/2)``."""
    return torch.floor(mean.double() * 2.0**mantissa_bits + 0.5).long()


# -- rates ------------------------------------------------------------------------------------------

def weights_kept_fraction(layers: list[PrunedLayer]) -> float:
    """The fraction of the layers' weights that their masks keep (``MODEL.json``'s ``weights_kept_fraction``)."""
    return sum(int(layer.mask.sum()) for layer in layers) / sum(layer.mask.numel() for layer in layers)


def compression_rates(layers: list[PrunedLayer], precision: Precision) -> dict:
    """Weights kept, ``cr_prune`` and ``cr_fast`` (and ``cr_fast`` at the official exponent, where finite)."""
    total = sum(layer.mask.numel() for layer in layers)
    kept = [int(layer.mask.sum()) for layer in layers]
    fast_bits = sum(k * precision.bits(i) for i, k in enumerate(kept))
    rates = {"weights_total": total, "weights_kept": sum(kept), "weights_kept_fraction": sum(kept) / total,
             "cr_prune": total / max(sum(kept), 1), "cr_fast": 32 * total / max(fast_bits, 1)}
    e = precision.exponent_bits_official
    official_bits = sum(k * (1 + e + precision.mantissa_bits[i]) for i, k in enumerate(kept))
    rates["cr_fast_official_exponent"] = 32 * total / official_bits if math.isfinite(e) and official_bits > 0 else None
    return rates
