"""analysis/pretrain.py writes a state_dict that --init-from takes by name: the Bayesian network's posterior
mean then computes what the pretrained dense network computes."""

import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[2] / "analysis"))
import pretrain

from models import build_network


def test_a_pretrained_lenet300_starts_a_bayesian_run_by_name(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["pretrain.py", "--model", "lenet300", "--epochs", "1",
                                      "--out", str(tmp_path / "dense.pt")])
    assert pretrain.main() == 0
    history = json.loads((tmp_path / "dense.json").read_text())
    assert [h["epoch"] for h in history] == [1] and history[0]["val_error"] < 10  # one epoch of LeNet-300-100
    dense = torch.load(tmp_path / "dense.pt", weights_only=True)  # as --init-from reads it
    net = build_network("lenet300")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # names match: no fallback to the order
        net.init_from(dense)
    x = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    expected = torch.relu(torch.relu(x.flatten(1) @ dense["fc1.weight"].T + dense["fc1.bias"]) @ dense["fc2.weight"].T
                          + dense["fc2.bias"]) @ dense["fc3.weight"].T + dense["fc3.bias"]
    torch.testing.assert_close(net.posterior_mean_network()(x), expected, rtol=1e-5, atol=1e-5)


def test_pretraining_on_every_training_image_records_no_validation_error(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["pretrain.py", "--model", "lenet300", "--epochs", "1", "--val-size", "0",
                                      "--out", str(tmp_path / "dense.pt")])
    assert pretrain.main() == 0
    history = json.loads((tmp_path / "dense.json").read_text())
    assert [sorted(h) for h in history] == [["epoch", "seconds"]]
