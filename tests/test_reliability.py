"""Reliability of the checkpoint loader: corrupt, truncated, garbage and old checkpoints load or raise
CheckpointError. (Kill and resume, non-finite numbers, output folders and bad arguments, all met through
the command line, are tested in tests/test_cli.py.)

Everything is seeded.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyro_bc.errors import CheckpointError
from pyro_bc.train.checkpoint import load_checkpoint, save_checkpoint
from pyro_bc.train.run_dir import CHECKPOINT

# Fuzzed checkpoint loader ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory) -> bytes:
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    optimizer = torch.optim.Adam(net.parameters())
    net(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    path = tmp_path_factory.mktemp("ckpt") / CHECKPOINT
    save_checkpoint(path, {"config": {"model": "lenet300", "prior": "gnj", "epochs": 1}, "epoch": 1,
                           "network": net.state_dict(), "optimizer": optimizer.state_dict(),
                           "rng": {"torch": torch.get_rng_state()[:64]},
                           "metrics": [{"epoch": 1, "elbo": -1.5, "groups_kept": {"fc1": 3}}]})
    data = path.read_bytes()
    assert isinstance(load_checkpoint(path), dict)
    return data


def _check_loads_or_checkpoint_error(path: Path) -> None:
    try:
        state = load_checkpoint(path)
    except CheckpointError as e:
        assert str(e) and "\n" not in str(e)
    else:
        assert isinstance(state, dict)


@settings(max_examples=50, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_corrupted_checkpoint_loads_or_raises_checkpoint_error(checkpoint_bytes, tmp_path, data):
    blob = bytearray(checkpoint_bytes)
    kind = data.draw(st.sampled_from(["truncate", "flip", "both", "overwrite"]))
    if kind in ("truncate", "both"):
        blob = blob[:data.draw(st.integers(0, len(blob) - 1))]
    if kind in ("flip", "both") and blob:
        for position, bit in data.draw(st.lists(st.tuples(st.integers(0, len(blob) - 1), st.integers(0, 7)),
                                                min_size=1, max_size=8)):
            blob[position] ^= 1 << bit
    if kind == "overwrite" and blob:
        start = data.draw(st.integers(0, len(blob) - 1))
        chunk = data.draw(st.binary(min_size=1, max_size=64))
        blob[start:start + len(chunk)] = chunk
    path = tmp_path / f"fuzz-{os.getpid()}-{time.monotonic_ns()}.pt"
    path.write_bytes(bytes(blob))
    _check_loads_or_checkpoint_error(path)


@pytest.mark.parametrize("blob", [b"", b"\x00", b"PK\x03\x04", b"not a checkpoint at all\n" * 10])
def test_garbage_checkpoint_raises_checkpoint_error(tmp_path, blob):
    path = tmp_path / CHECKPOINT
    path.write_bytes(blob)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_non_dict_and_incomplete_checkpoints_raise_checkpoint_error(tmp_path):
    for i, state in enumerate([[1, 2, 3], {"epoch": 1}, torch.zeros(3)]):
        path = tmp_path / f"{i}.pt"
        torch.save(state, path)
        with pytest.raises(CheckpointError, match="not a pyro-bc checkpoint"):
            load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


def test_a_checkpoint_of_the_previous_layout_is_refused_in_one_line(tmp_path):
    keys = ("config", "epoch", "network", "optimizer", "rng", "metrics")
    path = tmp_path / CHECKPOINT
    torch.save({k: {} for k in keys}, path)  # as pyro-bc 0.1 wrote them: no layout_version
    with pytest.raises(CheckpointError, match="older pyro-bc") as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)
    save_checkpoint(path, {k: {} for k in keys})
    assert load_checkpoint(path)["layout_version"] == 2
