"""Data-parallel training under torchrun: two CPU processes (gloo) against one process with the doubled batch."""

import json
import os
import subprocess
import sys

import pytest
import torch

from models import build_network
from pyro_bc.cli import main
from pyro_bc.errors import ConfigError
from pyro_bc.runs.training import train
from pyro_bc.train.checkpoint import load_checkpoint
from pyro_bc.train.distributed import ProcessGroup, backend_for, from_environment
from pyro_bc.train.loop import NegativeELBO
from pyro_bc.train.run_dir import TrainConfig

# 497 examples: 15 global batches of 32 and a last one of 17, split 8 / 9 between the two processes
SUBSET, PER_PROCESS_BATCH, EPOCHS = 497, 16, 2
TRAIN_ARGS = ["--model", "lenet300", "--prior", "gnj", "--subset", str(SUBSET), "--val-size", "100", "--seed", "3"]


def _torchrun(out, epochs, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "pyro_bc.cli", "train", *TRAIN_ARGS, "--batch-size", str(PER_PROCESS_BATCH),
           "--epochs", str(epochs), "--out", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted two-process run, one stopped after an epoch and resumed, and the one-process reference."""
    root = tmp_path_factory.mktemp("distributed")
    whole = _torchrun(root / "two", EPOCHS)
    _torchrun(root / "resumed", 1)
    _torchrun(root / "resumed", EPOCHS, "--resume")
    config = TrainConfig(model="lenet300", prior="gnj", subset=SUBSET, val_size=100, seed=3, epochs=EPOCHS,
                         batch_size=2 * PER_PROCESS_BATCH)
    train(config, root / "one", progress=False)
    return root, whole


def _network(run_dir):
    return load_checkpoint(run_dir / "checkpoint.pt")["network"]


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_doubled_batch(runs):
    root, _ = runs
    two, one = _network(root / "two"), _network(root / "one")
    assert two.keys() == one.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=2e-5, msg=key)
    moved = max((one[k] - build_network("lenet300", "gnj").state_dict()[k]).abs().max() for k in one)
    assert moved > 1e-2  # 32 steps did move the parameters, so the agreement is not trivial


@pytest.mark.slow
def test_kl_is_counted_once(runs):
    """The epoch ELBO (likelihood + KL / N) is the one-process value; K copies of the KL would shift it."""
    root, _ = runs
    two, one = ([json.loads(line) for line in (root / d / "metrics.jsonl").read_text().splitlines()]
                for d in ("two", "one"))
    assert [m["epoch"] for m in two] == [1, 2]
    for a, b in zip(two, one):
        assert a["elbo"] == pytest.approx(b["elbo"], rel=1e-5)
        assert a["train_error"] == pytest.approx(b["train_error"], abs=0.21)  # at most one example of 497


@pytest.mark.slow
def test_only_rank_zero_writes(runs):
    root, whole = runs
    assert sorted(p.name for p in (root / "two").iterdir()) == ["checkpoint.pt", "config.json", "metrics.jsonl"]
    assert len((root / "two" / "metrics.jsonl").read_text().splitlines()) == EPOCHS
    assert whole.stdout.count("trained lenet300/gnj") == 1
    assert whole.stdout.count("epoch 1:") == 1
    config = json.loads((root / "two" / "config.json").read_text())
    assert config["world_size"] == 2 and config["batch_size"] == PER_PROCESS_BATCH


@pytest.mark.slow
def test_resumed_two_process_run_ends_where_an_uninterrupted_one_ends(runs):
    root, _ = runs
    resumed, whole = _network(root / "resumed"), _network(root / "two")
    for key in whole:
        assert torch.equal(resumed[key], whole[key]), key
    assert load_checkpoint(root / "resumed" / "checkpoint.pt")["epoch"] == EPOCHS


@pytest.mark.parametrize("rows", [32, 17, 1])
def test_sharded_losses_average_to_the_global_batch_loss(rows):
    """Ranks' weighted losses and gradients average to those of the whole batch, shards of any sizes."""
    torch.manual_seed(0)
    net = build_network("lenet300", "gnj")
    loss = NegativeELBO(net)
    x, y = torch.randn(rows, 1, 28, 28), torch.randint(0, 10, (rows,))

    def loss_and_grad(parts):
        net.zero_grad()
        total = 0.0
        for group in parts:
            torch.manual_seed(1)  # every rank starts the step from the same random state
            start, stop = group.rows(rows)
            shard = (start, rows) if group.world_size > 1 else None
            weight = group.world_size * (stop - start) / rows
            value = loss(x[start:stop], y[start:stop], 1000, 1.0, weight, shard) / group.world_size
            value.backward()
            total += value.item()
        return total, [p.grad.clone() for p in net.parameters()]

    whole, whole_grad = loss_and_grad([ProcessGroup()])
    split, split_grad = loss_and_grad([ProcessGroup(rank, 2) for rank in range(2)])
    assert split == pytest.approx(whole, rel=1e-6)
    for a, b in zip(split_grad, whole_grad):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_rows_are_disjoint_contiguous_and_cover_the_batch():
    assert [ProcessGroup(r, 2).rows(17) for r in range(2)] == [(0, 8), (8, 17)]
    assert [ProcessGroup(r, 3).rows(2) for r in range(3)] == [(0, 0), (0, 1), (1, 2)]
    assert ProcessGroup().rows(5) == (0, 5)


def test_backend_follows_the_device():
    assert backend_for("cpu") == "gloo" and backend_for("cuda") == "nccl"


def test_no_launcher_environment_is_one_process():
    assert from_environment({}) is None


@pytest.mark.parametrize("env, names", [
    ({"RANK": "0", "WORLD_SIZE": "2"}, ["LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"]),
    ({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "RANK": "0", "LOCAL_RANK": "0"}, ["WORLD_SIZE"]),
])
def test_incomplete_launcher_environment_is_named(env, names):
    with pytest.raises(ConfigError, match="incomplete") as info:
        from_environment(env)
    assert all(name in str(info.value) for name in names)


@pytest.mark.parametrize("values", [("2", "2", "0"), ("x", "2", "0"), ("0", "0", "0")])
def test_bad_launcher_values(values):
    env = dict(zip(("RANK", "WORLD_SIZE", "LOCAL_RANK"), values), MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    with pytest.raises(ConfigError, match="distributed launch environment"):
        from_environment(env)


def test_cli_reports_an_incomplete_launcher_environment(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", *TRAIN_ARGS, "--epochs", "1", "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "MASTER_ADDR" in err[0] and err[0].startswith("pyro-bc train: error:")
    assert not (tmp_path / "run").exists()
