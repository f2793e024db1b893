"""The training loop: outputs, determinism, exact resume, and clear errors for bad inputs."""

import json
import os

import pytest
import torch

from models import build_network
from pyro_bc.checkpoint import load_checkpoint
from pyro_bc.cli import main
from pyro_bc.errors import CheckpointError, ConfigError, TrainingDiverged
from pyro_bc.run_dir import TrainConfig
from pyro_bc.train import train


def _cfg(**kw):
    base = {"model": "lenet300", "prior": "gnj", "epochs": 1, "subset": 512, "val_size": 5000, "batch_size": 128}
    base.update(kw)
    return TrainConfig(**base)


def _network_state(run_dir):
    return load_checkpoint(run_dir / "checkpoint.pt")["network"]


def _assert_states_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("prior", ["gnj", "ghs", "lu"])
def test_one_epoch_writes_outputs(tmp_path, prior):
    last = train(_cfg(prior=prior), out=tmp_path, progress=False)
    assert {p.name for p in tmp_path.iterdir()} >= {"checkpoint.pt", "metrics.jsonl", "config.json"}
    assert not (tmp_path / ".lock").exists()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert {"epoch", "elbo", "train_error", "val_error", "groups_kept"} <= record.keys()
    assert record["epoch"] == 1 and record == {**last, "epoch": 1}
    assert all(isinstance(record[k], float) for k in ("elbo", "train_error", "val_error"))
    assert 0 <= record["train_error"] <= 100 and 0 <= record["val_error"] <= 100
    names = build_network("lenet300", prior).layer_names
    assert list(record["groups_kept"]) == names and len(names) == 3
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["prior"] == prior and config["epochs"] == 1 and config["subset"] == 512
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["epoch"] == 1 and state["config"]["prior"] == prior


def test_same_seed_same_parameters(tmp_path):
    train(_cfg(subset=256), out=tmp_path / "a", progress=False)
    train(_cfg(subset=256), out=tmp_path / "b", progress=False)
    _assert_states_equal(_network_state(tmp_path / "a"), _network_state(tmp_path / "b"))
    train(_cfg(subset=256, seed=1), out=tmp_path / "c", progress=False)
    state_a, state_c = _network_state(tmp_path / "a"), _network_state(tmp_path / "c")
    assert any(not torch.equal(state_a[k], state_c[k]) for k in state_a)


@pytest.mark.parametrize("prior", ["gnj", "ghs"])
def test_resume_is_exact(tmp_path, prior):
    cfg = _cfg(prior=prior, subset=256, epochs=2)
    train(cfg, out=tmp_path / "straight", progress=False)
    train(_cfg(prior=prior, subset=256, epochs=1), out=tmp_path / "split", progress=False)
    train(cfg, out=tmp_path / "split", resume=True, progress=False)
    a, b = (load_checkpoint(tmp_path / d / "checkpoint.pt") for d in ("straight", "split"))
    assert a["epoch"] == b["epoch"] == 2
    _assert_states_equal(a["network"], b["network"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
    strip = [{k: v for k, v in m.items() if k != "seconds"} for m in a["metrics"]], \
            [{k: v for k, v in m.items() if k != "seconds"} for m in b["metrics"]]
    assert strip[0] == strip[1]
    assert len((tmp_path / "split" / "metrics.jsonl").read_text().splitlines()) == 2


def test_lenet5_one_epoch(tmp_path):
    last = train(_cfg(model="lenet5", subset=256), out=tmp_path, progress=False)
    assert last["epoch"] == 1
    assert list(last["groups_kept"]) == build_network("lenet5", "gnj").layer_names
    assert len(last["groups_kept"]) == 4


# -- bad inputs ----------------------------------------------------------------------------------


def test_unknown_prior(tmp_path):
    with pytest.raises(ConfigError, match="unknown prior 'bogus'"):
        train(_cfg(prior="bogus"), out=tmp_path, progress=False)


def test_model_file_without_build(tmp_path):
    f = tmp_path / "net.py"
    f.write_text("x = 1\n")
    with pytest.raises(ConfigError, match="build"):
        train(_cfg(model=str(f)), out=tmp_path / "run", progress=False)


def test_model_file_build_returns_wrong_type(tmp_path):
    f = tmp_path / "net.py"
    f.write_text("def build(prior):\n    return 42\n")
    with pytest.raises(ConfigError, match="returned int"):
        train(_cfg(model=str(f)), out=tmp_path / "run", progress=False)


def test_model_file_that_fails_to_import(tmp_path):
    f = tmp_path / "net.py"
    f.write_text("raise ValueError('boom')\n")
    with pytest.raises(ConfigError, match="boom"):
        train(_cfg(model=str(f)), out=tmp_path / "run", progress=False)


def test_resume_from_corrupt_checkpoint(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(CheckpointError, match="checkpoint"):
        train(_cfg(), out=tmp_path, resume=True, progress=False)
    assert not (tmp_path / ".lock").exists()


def test_resume_without_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train(_cfg(), out=tmp_path, resume=True, progress=False)


def test_resume_with_other_prior(tmp_path):
    train(_cfg(subset=128), out=tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="gnj"):
        train(_cfg(subset=128, prior="ghs", epochs=2), out=tmp_path, resume=True, progress=False)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1


def test_output_dir_not_writable(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="cannot be written"):
        train(_cfg(), out=tmp_path / "file" / "run", progress=False)


def test_live_lock(tmp_path):
    (tmp_path / ".lock").write_text(str(os.getpid()))
    with pytest.raises(ConfigError, match=f"pid {os.getpid()}"):
        train(_cfg(), out=tmp_path, progress=False)
    assert (tmp_path / ".lock").read_text() == str(os.getpid())  # someone else's lock is left alone


@pytest.mark.parametrize("bad", [{"epochs": -1}, {"lr": float("nan")}, {"lr": 0.0}, {"batch_size": 0}])
def test_bad_numbers(tmp_path, bad):
    with pytest.raises(ConfigError):
        train(_cfg(**bad), out=tmp_path, progress=False)


POISON = """
import torch
from torch import nn

from pyro_bc.network import BayesianNet
from pyro_bc.nn import BayesLinear


class Poison(nn.Module):
    # returns NaN on the 3rd forward pass with gradients on, i.e. epoch 2, step 1 (2 steps an epoch)
    calls = 0

    def forward(self, x):
        if torch.is_grad_enabled():
            Poison.calls += 1
            if Poison.calls == 3:
                return x * float("nan")
        return x


def build(prior):
    body = nn.Sequential(nn.Flatten(), BayesLinear(784, 10, prior), Poison())
    return BayesianNet(body, input_shape=(1, 28, 28))
"""


def test_divergence_names_epoch_and_step(tmp_path):
    f = tmp_path / "poison.py"
    f.write_text(POISON)
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"epoch 2, step 1") as info:
        train(_cfg(model=str(f), subset=256, epochs=3), out=run, progress=False)
    assert str(run / "checkpoint.pt") in str(info.value)
    state = load_checkpoint(run / "checkpoint.pt")
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["network"].values())
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    assert not (run / ".lock").exists()


# -- CLI -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, text", [
    (["--prior", "bogus"], "bogus"),
    (["--epochs", "-1"], "-1"),
    (["--lr", "nan"], "nan"),
    (["--lr", "-0.1"], "-0.1"),
    (["--batch-size", "0"], "'0'"),
    (["--model", "vgg"], "vgg"),
])
def test_cli_rejects_bad_values(tmp_path, capsys, args, text):
    with pytest.raises(SystemExit) as info:
        main(["train", *args, "--out", str(tmp_path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert text in err and "error" in err
    assert not (tmp_path / "checkpoint.pt").exists()


def test_cli_train_and_error_exit(tmp_path, capsys):
    assert main(["train", "--epochs", "1", "--subset", "128", "--out", str(tmp_path / "ok")]) == 0
    assert "trained lenet300/gnj" in capsys.readouterr().out
    assert (tmp_path / "ok" / "checkpoint.pt").exists()
    assert main(["train", "--resume", "--out", str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err
    assert "no checkpoint" in err and "Traceback" not in err


def test_init_from_deterministic_state(tmp_path):
    """--init-from copies a deterministic network's weights into the weight and bias means."""
    torch.manual_seed(5)
    dense = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 300), torch.nn.ReLU(),
                                torch.nn.Linear(300, 100), torch.nn.ReLU(), torch.nn.Linear(100, 10))
    torch.save(dense.state_dict(), tmp_path / "dense.pt")
    train(_cfg(subset=128, epochs=0, init_from=str(tmp_path / "dense.pt")), out=tmp_path / "run", progress=False)
    with pytest.raises(ConfigError, match="not a readable state_dict"):
        train(_cfg(subset=128, epochs=0, init_from=str(tmp_path / "run" / "config.json")), out=tmp_path / "r2",
              progress=False)
    net = build_network("lenet300", "gnj")  # what train does with the state, checked value by value
    net.init_from(dense.state_dict())
    assert torch.equal(net.layers[0].weight_mu, dense[1].weight)
    assert torch.equal(net.layers[2].bias_mu, dense[5].bias)
    with pytest.raises(ConfigError, match="weight tensors"):
        net.init_from({"a.weight": torch.zeros(3, 3)})


def test_data_that_does_not_fit_the_network(tmp_path):
    model_file = tmp_path / "small.py"
    model_file.write_text(
        "from torch import nn\nfrom pyro_bc.network import BayesianNet\nfrom pyro_bc.nn import BayesLinear\n"
        "def build(prior):\n"
        "    return BayesianNet(nn.Sequential(nn.Flatten(), BayesLinear(400, 10, prior)), input_shape=(1, 20, 20))\n")
    with pytest.raises(ConfigError, match=r"shape \(1, 28, 28\).*expects \(1, 20, 20\)"):
        train(_cfg(model=str(model_file), subset=128), out=tmp_path / "run", progress=False)
