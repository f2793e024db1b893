"""End to end: a small trained run -> compress (given thresholds, gap, error budget) -> .bcz and MODEL.json
-> evaluate; bad inputs end in the project's errors without leaving partial files."""

import json
import math
import os
import struct

import numpy as np
import pytest
import torch

from pyro_bc import codec
from pyro_bc.cli import main
from pyro_bc.compress import compress_run, evaluate_file, format_table, gap_thresholds, load_run
from pyro_bc.data import load_mnist
from pyro_bc.errors import CheckpointError, ConfigError, FormatError
from pyro_bc.posterior import LayerPosterior, analyse
from pyro_bc.run_dir import TrainConfig
from pyro_bc.train import train

LAYER_KEYS = {"name", "groups_total", "groups_kept", "weights_total", "weights_kept", "bits", "exponent_bits",
              "mantissa_bits", "threshold"}
TOP_KEYS = {"layers", "architecture", "weights_kept_fraction", "cr_prune", "cr_fast", "cr_file", "file_bytes",
            "original_bytes", "error_posterior_mean", "error_pruned", "error_compressed", "val_error_compressed"}
LENET300_PARAMS = 266200 + 410


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("run")
    train(TrainConfig(epochs=1, subset=1000), out=out, progress=False)
    return out


@pytest.fixture(scope="module")
def given(run, tmp_path_factory):
    path = tmp_path_factory.mktemp("given") / "model.bcz"
    return path, compress_run(run, path, thresholds=[-3.0, -2.0, -1.0])


def _check_summary(path, summary):
    on_disk = json.loads(path.with_suffix(".json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert TOP_KEYS <= set(on_disk)
    assert len(on_disk["layers"]) == 3
    for layer in on_disk["layers"]:
        assert LAYER_KEYS <= set(layer)
        assert layer["bits"] == 1 + layer["exponent_bits"] + layer["mantissa_bits"]
        assert layer["exponent_bits"] >= 1 and 0 <= layer["mantissa_bits"] <= 23
        assert 0 <= layer["weights_kept"] <= layer["weights_total"]
    assert [la["weights_total"] for la in on_disk["layers"]] == [235200, 30000, 1000]
    assert [la["groups_total"] for la in on_disk["layers"]] == [784, 300, 100]
    assert on_disk["architecture"] == "-".join(str(la["groups_kept"]) for la in on_disk["layers"])
    kept = sum(la["weights_kept"] for la in on_disk["layers"])
    assert on_disk["weights_kept_fraction"] == pytest.approx(kept / 266200)
    assert on_disk["cr_prune"] == pytest.approx(266200 / kept)
    fast_bits = sum(la["weights_kept"] * la["bits"] for la in on_disk["layers"])
    assert on_disk["cr_fast"] == pytest.approx(32 * 266200 / fast_bits)
    assert on_disk["original_bytes"] == 4 * LENET300_PARAMS
    assert on_disk["file_bytes"] == os.path.getsize(path)
    assert on_disk["cr_file"] == pytest.approx(on_disk["original_bytes"] / os.path.getsize(path))
    for key in ("error_posterior_mean", "error_pruned", "error_compressed", "val_error_compressed"):
        assert 0 <= on_disk[key] <= 100
    return on_disk


def test_given_thresholds(given):
    path, summary = given
    on_disk = _check_summary(path, summary)
    assert [la["threshold"] for la in on_disk["layers"]] == [-3.0, -2.0, -1.0]
    assert "architecture" in format_table(summary)


def test_evaluate_file_matches_model_json(given):
    path, summary = given
    result = evaluate_file(path)
    assert result["error"] == summary["error_compressed"]
    assert result["n"] == 10000
    assert result["ms_per_batch_compressed"] > 0


def test_auto_gap(run, tmp_path):
    path = tmp_path / "gap.bcz"
    summary = compress_run(run, path, auto="gap")
    _check_summary(path, summary)
    net, _, _ = load_run(run)
    assert [la["threshold"] for la in summary["layers"]] == gap_thresholds(analyse(net))


def test_gap_thresholds_hand_built():
    def post(values):
        la = torch.tensor(values)
        return LayerPosterior("l", "linear", la, torch.zeros(1, len(values)), torch.zeros(1, len(values)),
                              torch.zeros(1), 1)
    # widest gap overlapping [-6, 2]: between -5 and 1 -> middle -2
    assert gap_thresholds([post([-9.0, -8.9, -5.0, 1.0, 1.1])]) == [-2.0]
    # the widest gap (0.3, 4.4) has its middle above 2: clipped to 2; the 1.5-nat gap at -5 is too narrow
    assert gap_thresholds([post([-7.0, -6.5, -4.5, -3.0, 0.3, 4.4, 5.0])]) == [2.0]
    # gaps of 1 nat only (a continuum) -> default -3; a gap wholly outside [-6, 2] does not count either
    assert gap_thresholds([post([-6.0, -5.0, -4.0, -3.0, -2.0])]) == [-3.0]
    assert gap_thresholds([post([-0.5, 0.0, 0.5, 1.0, 1.5, 2.5, 6.0])]) == [-3.0]


def test_max_error_increase_within_budget(run, tmp_path):
    path = tmp_path / "budget.bcz"
    budget = 0.5
    summary = compress_run(run, path, max_error_increase=budget)
    _check_summary(path, summary)
    net, config, _ = load_run(run)
    mnist = load_mnist(config.data, val_size=config.val_size, seed=config.seed)
    with torch.no_grad():
        pred = net.posterior_mean_network()(mnist.val.x).argmax(-1)
    val_error = 100.0 * float((pred != mnist.val.y).sum()) / len(mnist.val.y)
    assert summary["val_error_compressed"] <= val_error + budget + 1e-9


# -- bad input -------------------------------------------------------------------------------------------

def _no_files(folder):
    return sorted(os.listdir(folder)) == []


@pytest.mark.parametrize("thresholds, match", [([-3.0, -3.0], "2 thresholds"), ([-3.0, math.nan, -3.0], "finite")])
def test_bad_thresholds(run, tmp_path, thresholds, match):
    with pytest.raises(ConfigError, match=match):
        compress_run(run, tmp_path / "x.bcz", thresholds=thresholds)
    assert _no_files(tmp_path)


def test_run_without_checkpoint(tmp_path):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint"):
        compress_run(empty, out / "x.bcz", thresholds=[-3.0, -3.0, -3.0])
    assert _no_files(out)


def test_missing_output_folder(run, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        compress_run(run, tmp_path / "nope" / "x.bcz")
    assert _no_files(tmp_path)


def _corrupt(data: bytes, how: str) -> bytes:
    if how == "truncated":
        return data[: len(data) // 2]
    if how == "bitflip":
        flipped = bytearray(data)
        flipped[len(data) - 100] ^= 0x10
        return bytes(flipped)
    if how == "magic":
        return b"NOPE" + data[4:]
    return data[:4] + struct.pack("<H", 99) + data[6:]  # version


@pytest.mark.parametrize("how, match", [("truncated", None), ("bitflip", "checksum"), ("magic", "magic"),
                                        ("version", "version")])
def test_evaluate_rejects_corrupt_files(given, tmp_path, how, match):
    path, _ = given
    bad = tmp_path / f"{how}.bcz"
    bad.write_bytes(_corrupt(path.read_bytes(), how))
    with pytest.raises(FormatError, match=match) as info:
        evaluate_file(bad)
    assert str(bad) in str(info.value)


def test_cli_nan_threshold_exits_2(run, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["compress", str(run), "--out", str(tmp_path / "x.bcz"), "--thresholds", "nan"])
    assert info.value.code == 2
    assert "'nan'" in capsys.readouterr().err
    assert _no_files(tmp_path)


def test_cli_run_without_checkpoint_returns_1(tmp_path, capsys):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    assert main(["compress", str(empty), "--out", str(tmp_path / "x.bcz")]) == 1
    err = capsys.readouterr().err
    assert "no checkpoint" in err and len(err.strip().splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == ["empty_run"]


def test_fold_is_the_default_for_group_priors_and_no_fold_turns_it_off(run, tmp_path):
    medians = [str(float(p.log_alpha.median())) for p in analyse(load_run(run)[0])]  # prunes half of each layer
    outputs = {}
    for name, extra in (("folded", []), ("plain", ["--no-fold"])):
        path = tmp_path / f"{name}.bcz"
        assert main(["compress", str(run), "--out", str(path), "--thresholds", *medians, *extra]) == 0
        outputs[name] = json.loads(path.with_suffix(".json").read_text()), codec.read_bcz(path)
    (folded, folded_file), (plain, plain_file) = outputs["folded"], outputs["plain"]
    assert folded["fold_pruned_inputs"] is True and plain["fold_pruned_inputs"] is False
    assert plain["architecture"] == folded["architecture"]  # the same pruning, other biases
    biases = [[item.bias for item in f.items if isinstance(item, codec.QuantizedLayer)] for f in (folded_file, plain_file)]
    assert all(not np.allclose(a, b) for a, b in zip(*biases))
