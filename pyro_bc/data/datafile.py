"""What the data readers (IDX, CIFAR-10 python, npz) share: file checks, label checks, the raw arrays they return."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pyro_bc.errors import DataError

#: Bytes read or decompressed at a time.
CHUNK = 1 << 20
#: Deflate cannot expand by more than ~1032:1; compressed data declaring more than this much must be lying.
MAX_DEFLATE_RATIO = 1100
#: The largest data file read whole (pickles, npz members): 8 GiB, far above CIFAR-10's 31 MB batches.
MAX_FILE_BYTES = 1 << 33


@dataclass
class RawData:
    """A data folder's examples before the split: uint8 images ``(N, C, H, W)`` and integer labels ``(N,)``.

    ``train_name`` and ``test_name`` name the files (of the labels) in messages, ``test_images_name`` the test
    images' where they have their own; ``n_classes`` is the format's own class count (CIFAR's ``batches.meta``), or
    None: the largest training label + 1.
    """

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    train_name: str
    test_name: str
    n_classes: int | None = None
    test_images_name: str | None = None


def require_file(path: Path) -> int:
    """The size of regular file ``path``; a missing or unreadable path raises a one-line :class:`DataError`."""
    try:
        if not path.exists():
            raise DataError(f"{path}: file not found")
        if not path.is_file():
            raise DataError(f"{path}: not a regular file")
        return path.stat().st_size
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None


def check_labels(labels: np.ndarray, n_images: int, where: str, images: str) -> None:
    """``labels`` must be 1-D integers in 0..255, one per image; ``where`` prefixes messages, ``images`` names the
    images' file."""
    if labels.ndim != 1:
        raise DataError(f"{where}: expected 1-D labels (N,), got shape {labels.shape}")
    if labels.dtype.kind not in "iu":
        raise DataError(f"{where}: expected integer labels, got {labels.dtype}")
    if labels.shape[0] != n_images:
        raise DataError(f"{where}: count mismatch: {labels.shape[0]} labels but {images} has {n_images} images")
    if labels.size:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi > 255:
            raise DataError(f"{where}: label out of range: labels span {lo}..{hi}, must lie in 0..255")
