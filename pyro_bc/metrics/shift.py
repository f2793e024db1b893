"""Distribution shift without new data: rotated test images, and out-of-distribution detection by predictive entropy
(another data folder, or uniform noise images).

* :func:`rotation_curve`: error and NLL of a predictive on the test images rotated by 0, 15, ..., 180 degrees, and
  ``nll_area``, the NLL's mean over the rotation range (trapezoid rule): one number for "how badly it degrades".
* :func:`ood_auroc`: the AUROC of the predictive entropy as a score separating out-of-distribution images (positive)
  from the test images: the probability that a random OOD image has a higher entropy than a random test image, ties
  counting one half (the Mann-Whitney statistic). 0.5 is chance, 1 perfect separation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pyro_bc.errors import ConfigError
from pyro_bc.metrics.predict import predictive
from pyro_bc.metrics.scores import error, nll

ROTATIONS = tuple(range(0, 181, 15))  # degrees
NOISE_SEED = 0


def rotate(x: torch.Tensor, degrees: float, fill: float | None = None) -> torch.Tensor:
    """Images ``(N, C, H, W)`` rotated counter-clockwise by ``degrees`` about their centre (bilinear); pixels from
    outside the image get ``fill`` (default: the smallest value of ``x``, the background of normalised MNIST)."""
    fill = float(x.min()) if fill is None else fill
    angle = math.radians(degrees)
    cos, sin = math.cos(angle), math.sin(angle)
    theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=x.dtype, device=x.device)  # output -> input
    grid = F.affine_grid(theta.expand(len(x), 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each row of class probabilities ``[N, K]`` (``0 log 0 = 0``)."""
    p = probs.double()
    return -(p * p.clamp_min(1e-300).log()).sum(-1)


def auroc(inside: torch.Tensor, outside: torch.Tensor) -> float:
    """P(a random ``outside`` score > a random ``inside`` score) + P(equal) / 2, from the ranks of both together."""
    if not len(inside) or not len(outside):
        raise ConfigError("AUROC needs scores on both sides")
    scores = torch.cat([inside.double(), outside.double()])
    order = torch.argsort(scores, stable=True)
    ranks = torch.empty_like(scores)  # 1-based, tied scores sharing their mean rank
    _, inverse, counts = torch.unique_consecutive(scores[order], return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    mean_rank = ends - (counts.double() - 1) / 2
    ranks[order] = mean_rank[inverse]
    n_in, n_out = len(inside), len(outside)
    u = float(ranks[n_in:].sum()) - n_out * (n_out + 1) / 2
    return u / (n_in * n_out)


def fit_images(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Images ``(N, C, H, W)`` made to fit a network's input ``shape`` ``(C', H', W')``: channels averaged (to one)
    or repeated (from one), then resized bilinearly; so that e.g. CIFAR-10 images can be MNIST's OOD set."""
    if x.dim() != 4 or len(shape) != 3:
        raise ConfigError(f"OOD images of shape {tuple(x.shape[1:])} cannot be fitted to the input {tuple(shape)}")
    channels = shape[0]
    if x.shape[1] != channels:
        if channels == 1:
            x = x.mean(1, keepdim=True)
        elif x.shape[1] == 1:
            x = x.expand(-1, channels, -1, -1)
        else:
            raise ConfigError(f"OOD images with {x.shape[1]} channels do not fit an input of {channels}")
    if tuple(x.shape[2:]) != tuple(shape[1:]):
        x = F.interpolate(x, size=tuple(shape[1:]), mode="bilinear", align_corners=False)
    return x.contiguous()


def noise_images(like: torch.Tensor, seed: int = NOISE_SEED) -> torch.Tensor:
    """As many images as ``like`` holds, of its shape, each pixel uniform between ``like``'s smallest and largest
    values (seeded); for integer inputs (token ids), each id uniform among those from the smallest to the largest."""
    g = torch.Generator().manual_seed(seed)
    if not like.is_floating_point():
        return torch.randint(int(like.min()), int(like.max()) + 1, like.shape, generator=g, dtype=like.dtype)
    low, high = float(like.min()), float(like.max())
    return low + (high - low) * torch.rand(like.shape, generator=g, dtype=like.dtype)


def rotation_curve(source: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, samples: int = 0,
                   degrees: tuple[float, ...] = ROTATIONS, batch_size: int = 1000) -> dict:
    """``{"degrees": [...], "error": [...], "nll": [...], "nll_area": mean NLL over the range}`` of
    :func:`~pyro_bc.metrics.predict.predictive`'s probabilities on the rotated images (each angle with the same seed)."""
    errors, nlls = [], []
    for d in degrees:
        probs = predictive(source, rotate(x, d), samples, batch_size).cpu()
        errors.append(error(probs, y))
        nlls.append(nll(probs, y))
    span = degrees[-1] - degrees[0]
    area = sum((b - a) * (u + v) / 2 for a, b, u, v in zip(degrees, degrees[1:], nlls, nlls[1:])) / span \
        if span else nlls[0]
    return {"degrees": list(degrees), "error": errors, "nll": nlls, "nll_area": area}


def ood_auroc(source: torch.nn.Module, x: torch.Tensor, x_ood: torch.Tensor, samples: int = 0, batch_size: int = 1000) -> float:
    """AUROC of the predictive entropy separating ``x_ood`` (out of distribution) from ``x``."""
    inside = entropy(predictive(source, x, samples, batch_size).cpu())
    outside = entropy(predictive(source, x_ood, samples, batch_size, seed=1).cpu())
    return auroc(inside, outside)


def shift_report(source: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, samples: int = 0, rotation: bool = False,
                 ood: tuple[str, torch.Tensor] | None = None, batch_size: int = 1000) -> dict:
    """What ``pyro-bc evaluate`` adds for one network: ``noise_auroc`` (against :func:`noise_images`), with
    ``rotation`` the :func:`rotation_curve`, with ``ood = (name, images)`` ``{"data": name, "n": ..., "auroc": ...}``."""
    out: dict = {"noise_auroc": ood_auroc(source, x, noise_images(x), samples, batch_size)}
    if rotation:
        out["rotation"] = rotation_curve(source, x, y, samples, batch_size=batch_size)
    if ood is not None:
        out["ood"] = {"data": ood[0], "n": len(ood[1]), "auroc": ood_auroc(source, x, ood[1], samples, batch_size)}
    return out
