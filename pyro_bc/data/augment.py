"""Standard image augmentation for training: a random crop of the image padded by 4 zero pixels, a random
horizontal flip; each example its own draws, from a generator that is a pure function of the seed and the epoch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pyro_bc.errors import ConfigError

__all__ = ["PADDING", "augment", "augment_generator"]

#: Zero pixels added on every side before the crop (the crop has the image's own size).
PADDING = 4
# Offsets the augmentation generators' seeds from the minibatch order's (seed * 100_003 + epoch, below 2**32).
_STREAM = 1 << 32


def augment_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of epoch ``epoch``'s augmentation draws: seeded by ``seed`` and ``epoch`` alone, so that a
    resumed run draws what the uninterrupted run drew, and apart from the minibatch order's stream."""
    return torch.Generator().manual_seed(_STREAM + seed * 100_003 + epoch)


def augment(x: torch.Tensor, generator: torch.Generator, padding: int = PADDING) -> torch.Tensor:
    """Images ``x`` ``(N, C, H, W)``, each cropped at a random offset from itself padded by ``padding`` zeros (of
    the normalised images: the training mean) on every side, then flipped left-right with probability 1/2.

    Draws, in this order: ``N`` row offsets, ``N`` column offsets (each uniform in ``0..2 * padding``), ``N``
    uniforms (flip below 1/2), all on the CPU from ``generator``.
    """
    if x.dim() != 4:
        raise ConfigError(f"augmentation needs images (N, C, H, W), got examples of shape {tuple(x.shape[1:])}")
    n, _, h, w = x.shape
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    rows = dy[:, None] + torch.arange(h)
    cols = dx[:, None] + torch.arange(w)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    padded = F.pad(x, (padding, padding, padding, padding))
    device = x.device
    crops = padded[torch.arange(n, device=device)[:, None, None], :, rows.to(device)[:, :, None],
                   cols.to(device)[:, None, :]]  # (N, H, W, C): the indexed axes first
    return crops.permute(0, 3, 1, 2).contiguous()
