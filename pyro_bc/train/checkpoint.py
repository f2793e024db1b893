"""Checkpoints: atomic saving and loading with clear errors."""

from __future__ import annotations

import io
from pathlib import Path

import torch

from pyro_bc.atomic import atomic_write_bytes
from pyro_bc.errors import CheckpointError, first_line

#: The parameter layout of the networks a checkpoint holds; 2 since priors became modules of their layers.
LAYOUT_VERSION = 2


def save_checkpoint(path: str | Path, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save({**state, "layout_version": LAYOUT_VERSION}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


REQUIRED_KEYS = ("config", "epoch", "network", "optimizer", "rng", "metrics")


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint`; any problem raises :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint (run 'pyro-bc train' first, or check the run directory)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (torch raises many types for corrupt archives)
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {first_line(e)})")
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        raise CheckpointError(f"{path}: not a pyro-bc checkpoint (missing keys)")
    if state.get("layout_version") != LAYOUT_VERSION:
        raise CheckpointError(f"{path}: written by an older pyro-bc (parameter layout {state.get('layout_version', 1)}, "
                              f"this version reads {LAYOUT_VERSION}): train again, or use pyro-bc 0.1 to compress it")
    return state
