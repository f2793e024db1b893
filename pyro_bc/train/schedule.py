"""Learning-rate schedules: the rate of each epoch as a pure function of the epoch, so that a resume is exact."""

from __future__ import annotations

import math

from pyro_bc.errors import ConfigError

__all__ = ["SCHEDULES", "epoch_lr"]

#: ``constant``: ``lr`` throughout; ``cosine``: ``lr (1 + cos(pi e / E)) / 2`` in epoch ``e`` (0-based) of ``E``,
#: from ``lr`` towards 0; ``step``: ``lr`` times 0.1 from epoch ``ceil(E / 2)`` on and 0.01 from ``ceil(3 E / 4)``.
SCHEDULES = ("constant", "cosine", "step")


def epoch_lr(schedule: str, lr: float, epoch: int, epochs: int) -> float:
    """The learning rate of (0-based) ``epoch`` of ``epochs`` under ``schedule`` (see :data:`SCHEDULES`)."""
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        return lr * (1 + math.cos(math.pi * epoch / epochs)) / 2
    if schedule == "step":
        milestones = (math.ceil(epochs / 2), math.ceil(3 * epochs / 4))
        return lr * 0.1 ** sum(epoch >= m for m in milestones)
    raise ConfigError(f"unknown learning-rate schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")
