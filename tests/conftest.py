"""Test-wide settings (one torch thread, a non-interactive matplotlib backend) and shared fixtures."""

import os

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

torch.set_num_threads(1)

import pytest

from pyro_bc.runs.training import train
from pyro_bc.train.run_dir import TrainConfig


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A LeNet-300-100 gnj run directory: one epoch on 1,000 training images, seeded (one per test module)."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("run")
    train(TrainConfig(epochs=1, subset=1000), out=out, progress=False)
    return out
