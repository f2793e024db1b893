"""Reliability: kill and resume, non-finite numbers, corrupt checkpoints, output folders, bad CLI arguments.

Everything is seeded; the whole file runs in well under a minute on one thread (two subprocess starts
dominate: importing pyro takes several seconds).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyro_bc import cli
from pyro_bc.checkpoint import load_checkpoint, save_checkpoint
from pyro_bc.errors import CheckpointError, ConfigError
from pyro_bc.run_dir import CHECKPOINT, LOCK, METRICS, TrainConfig
from pyro_bc.train import train

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--subset", "200", "--batch-size", "100", "--val-size", "500", "--seed", "1"]


def _metrics_epochs(run_dir: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run_dir / METRICS).read_text().splitlines() if line.strip()]


# 1. Kill and resume ---------------------------------------------------------------------------------------

def _train_cmd(out: Path) -> list[str]:
    return [sys.executable, "-m", "pyro_bc.cli", "train", "--model", "lenet300", "--prior", "gnj", "--epochs", "4",
            "--subset", "600", "--batch-size", "100", "--val-size", "1000", "--seed", "3", "--out", str(out)]


def test_sigkill_then_resume_matches_uninterrupted_run_bit_for_bit(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    proc = subprocess.Popen(_train_cmd(run_a), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while True:
            metrics = run_a / METRICS
            if (run_a / CHECKPOINT).is_file() and metrics.is_file() and metrics.read_text().strip():
                break
            if proc.poll() is not None:
                pytest.fail(f"training exited ({proc.returncode}) before its first checkpoint: "
                            f"{proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("no checkpoint within 90 s")
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, "the run finished before the kill: the test would prove nothing"
    killed_at = load_checkpoint(run_a / CHECKPOINT)["epoch"]
    assert 1 <= killed_at < 4, killed_at
    assert (run_a / LOCK).read_text().strip().isdigit()  # the killed run's stale lock is still there
    leftover = run_a / f".{CHECKPOINT}.deadbeef.tmp"  # as a kill during an atomic write would leave it
    leftover.write_bytes(b"\x00garbage" * 100)

    done = subprocess.run(_train_cmd(run_a) + ["--resume"], cwd=REPO, env=env, capture_output=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    resumed = [int(line.split(":")[0].split()[1]) for line in done.stdout.decode().splitlines()
               if line.startswith("epoch ")]
    assert resumed == list(range(killed_at + 1, 5))  # it continued, it did not start over
    assert not (run_a / LOCK).exists()

    # The uninterrupted reference run, in-process (saves a pyro import); same seed, same thread count.
    assert cli.main(_train_cmd(run_b)[3:]) == 0

    state_a, state_b = load_checkpoint(run_a / CHECKPOINT), load_checkpoint(run_b / CHECKPOINT)
    assert state_a["epoch"] == state_b["epoch"] == 4
    assert state_a["network"].keys() == state_b["network"].keys()
    for name, tensor in state_b["network"].items():
        assert torch.equal(state_a["network"][name], tensor), name
    assert _metrics_epochs(run_a) == _metrics_epochs(run_b) == [1, 2, 3, 4]
    assert [m["epoch"] for m in state_a["metrics"]] == [1, 2, 3, 4]


# 2. Non-finite numbers ------------------------------------------------------------------------------------

POISON_ENV = "PYRO_BC_TEST_POISON"

POISON_MODEL = textwrap.dedent(f"""
    import math
    import os

    import torch

    from models.lenet300 import build as build_lenet300
    from pyro_bc.network import BayesianNet


    class PoisonedNet(BayesianNet):
        # LeNet-300-100 whose fc1 means turn to NaN at the next guide call once ${POISON_ENV} is set.
        def guide(self, *args, **kwargs):
            if os.environ.get("{POISON_ENV}"):
                with torch.no_grad():
                    self.body.fc1.weight_mu.fill_(math.nan)
            return super().guide(*args, **kwargs)


    def build(prior="gnj"):
        net = build_lenet300(prior)
        net.__class__ = PoisonedNet
        return net
""")


@pytest.fixture
def poison_model(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # models.lenet300 is imported from the repository root
    monkeypatch.syspath_prepend(str(REPO))
    monkeypatch.delenv(POISON_ENV, raising=False)
    path = tmp_path / "poisoned.py"
    path.write_text(POISON_MODEL)
    return path


def test_nan_from_the_first_step_exits_1_naming_epoch_step_and_parameter(poison_model, tmp_path, monkeypatch,
                                                                         capsys):
    monkeypatch.setenv(POISON_ENV, "1")
    run = tmp_path / "run"
    code = cli.main(["train", "--model", str(poison_model), "--epochs", "2", "--out", str(run), *SMALL])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "epoch 1, step 1" in err
    assert "parameter" in err and "weight_mu" in err
    assert "Traceback" not in err
    assert err.replace("\r", "\n").strip().splitlines()[-1].startswith("pyro-bc train: error: ")
    assert not (run / CHECKPOINT).exists() and not (run / LOCK).exists()


def test_divergence_after_a_good_epoch_keeps_the_last_checkpoint_intact(poison_model, tmp_path, monkeypatch,
                                                                        capsys):
    run = tmp_path / "run"
    args = ["train", "--model", str(poison_model), "--out", str(run), *SMALL]
    assert cli.main([*args, "--epochs", "1"]) == 0
    before_ckpt, before_metrics = (run / CHECKPOINT).read_bytes(), (run / METRICS).read_bytes()
    capsys.readouterr()

    monkeypatch.setenv(POISON_ENV, "1")
    assert cli.main([*args, "--epochs", "3", "--resume"]) == 1
    err = capsys.readouterr().err
    assert "epoch 2, step 1" in err and "weight_mu" in err, err
    assert (run / CHECKPOINT).read_bytes() == before_ckpt
    assert (run / METRICS).read_bytes() == before_metrics
    assert not (run / LOCK).exists()
    assert not list(run.glob("*.tmp"))
    state = load_checkpoint(run / CHECKPOINT)
    assert state["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in state["network"].values())

    # Once the cause is gone, the run resumes from that checkpoint.
    monkeypatch.delenv(POISON_ENV)
    assert cli.main([*args, "--epochs", "2", "--resume"]) == 0
    assert _metrics_epochs(run) == [1, 2]


# 3. Fuzzed checkpoint loader ------------------------------------------------------------------------------

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


# 4. Output directory --------------------------------------------------------------------------------------

def test_output_under_a_regular_file_is_a_config_error_before_training(tmp_path, capsys):
    parent = tmp_path / "a_file"
    parent.write_text("x")
    out = parent / "run"
    started = time.perf_counter()
    with pytest.raises(ConfigError, match="a_file"):
        train(TrainConfig(epochs=1, subset=200, val_size=500), out, progress=False)
    assert cli.main(["train", "--epochs", "1", "--out", str(out), *SMALL]) == 1
    err = capsys.readouterr().err
    assert str(out) in err and err.count("\n") == 1
    assert time.perf_counter() - started < 5  # refused up front: no data loading, no training
    assert parent.read_text() == "x"


def test_live_lock_refuses_a_second_training(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK).write_text(str(os.getpid()))  # this test process is alive
    assert cli.main(["train", "--epochs", "1", "--out", str(run), *SMALL]) == 1
    err = capsys.readouterr().err
    assert f"pid {os.getpid()}" in err and "already running" in err, err
    assert (run / LOCK).read_text() == str(os.getpid())  # the other training's lock is left alone
    assert not (run / CHECKPOINT).exists() and not (run / METRICS).exists()


# 5. CLI bad arguments -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("argv", "named"), [
    (["train", "--out", "R", "--epochs", "abc"], "'abc'"),
    (["train", "--out", "R", "--batch-size", "0"], "'0'"),
    (["train", "--out", "R", "--lr", "-1"], "'-1'"),
    (["train", "--out", "R", "--lr", "inf"], "'inf'"),
    (["train", "--out", "R", "--prior", "xyz"], "'xyz'"),
    (["train", "--out", "R", "--model", "nosuchmodel"], "'nosuchmodel'"),
    (["train", "--epochs", "1"], "--out"),
    (["compress", "R", "--out", "x.bcz", "--thresholds", "1", "nan"], "'nan'"),
    (["compress", "R", "--out", "x.bcz", "--auto", "bogus"], "'bogus'"),
    (["compress", "R", "--out", "x.bcz", "--max-error-increase", "-1"], "'-1'"),
    (["compress", "R", "--out", "x.bcz", "--auto", "gap", "--thresholds", "1"], "--thresholds"),
    (["evaluate"], "model"),
    (["demo", "--epochs", "0"], "'0'"),
    (["nosuchcommand"], "'nosuchcommand'"),
])
def test_bad_cli_arguments_exit_2_naming_the_value(argv, named, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert named in err, err
    assert "Traceback" not in err
    assert not any(tmp_path.iterdir())  # nothing was written
