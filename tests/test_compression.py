"""End to end: a small trained run -> compress (given thresholds, gap, error budget, prior default) -> .bcz
and MODEL.json -> evaluate; bad inputs end in the project's errors without leaving partial files. The
command line's cases are in tests/test_cli.py."""

import json
import math
import os
import struct

import masked_reference
import numpy as np
import pytest
import torch

import models.lenet5
import pyro_bc
from pyro_bc.bcz import codec
from pyro_bc.compression.pipeline import format_table
from pyro_bc.compression.posterior import analyse
from pyro_bc.compression.thresholds import GapRule, GivenThresholds, ThresholdInputs
from pyro_bc.data.datasets import load_mnist
from pyro_bc.errors import CheckpointError, ConfigError, FormatError
from pyro_bc.runs.compressing import compress_run, evaluate_file
from pyro_bc.runs.load import load_run

LAYER_KEYS = {"name", "groups_total", "groups_kept", "weights_total", "weights_kept", "bits", "exponent_bits",
              "mantissa_bits", "threshold"}
TOP_KEYS = {"layers", "architecture", "weights_kept_fraction", "cr_prune", "cr_fast", "cr_file", "file_bytes",
            "original_bytes", "error_posterior_mean", "error_pruned", "error_compressed", "val_error_compressed"}
LENET300_PARAMS = 266200 + 410


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
    assert on_disk["threshold_method"] == "given"
    assert on_disk["threshold_rule"] == {"name": "given", "settings": {"thresholds": [-3.0, -2.0, -1.0]}}
    assert "architecture" in format_table(summary)


def test_model_json_records_the_kept_groups(run, halved):
    """In a stack of linear layers whose every layer keeps some group, a group (an input) stays iff its own log alpha
    is below its layer's threshold: the unit it reads has some kept input, and the layer some kept output."""
    path, summary = halved
    for row, post in zip(summary["layers"], analyse(load_run(run)[0])):
        assert row["kept_groups"] == [g for g, la in enumerate(post.log_alpha.tolist()) if la < row["threshold"]]
        assert len(row["kept_groups"]) == row["groups_kept"]
    text = path.with_suffix(".json").read_text()
    assert text.count('"kept_groups": [') == 3
    assert all(line.rstrip().endswith(("],", "]")) for line in text.splitlines() if '"kept_groups"' in line)


@pytest.fixture(scope="module")
def halved(run, tmp_path_factory):
    """The run compressed at thresholds that keep 40-60% of each layer's groups and equal no log alpha."""
    path = tmp_path_factory.mktemp("halved") / "model.bcz"
    thresholds = [masked_reference.unambiguous_threshold(p.log_alpha) for p in analyse(load_run(run)[0])]
    return path, compress_run(run, path, thresholds=thresholds)


def test_errors_are_those_of_a_masked_network_built_by_hand(run, halved):
    """The trained LeNet-300-100 pruned to about half of each layer's groups, folded (the gnj default) with the means
    of the first 10,000 training images, against the masked, folded and rounded reference built from kept_groups."""
    path, summary = halved
    net, config, _ = load_run(run)
    data = load_mnist(config.data, val_size=config.val_size, seed=config.seed)
    assert summary["fold_pruned_inputs"] is True
    for row, total in zip(summary["layers"], (784, 300, 100)):
        assert 0.3 * total < row["groups_kept"] < 0.7 * total  # about half kept, after propagation
    sets = {"test": (data.test.x, data.test.y), "val": (data.val.x, data.val.y)}
    errors = masked_reference.assert_matches(path, summary, net, data.train.x[:10_000], sets)
    assert errors["error_pruned"] != errors["error_posterior_mean"]  # the pruning changes what the network computes


def test_lenet5_errors_are_those_of_a_masked_network_built_by_hand(tmp_path):
    """LeNet-5 with hand-set posteriors (no training): conv1's channels 0-4, conv2's 0-9, fc1's inputs 500-799 and
    fc2's inputs 0-99 at log alpha 5, the rest at -30. conv2 is unpadded, so it folds conv1's pruned channels with
    their mean over examples *and* positions; fc1 folds conv2's, fc2 fc1's."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    net = models.lenet5.build("gnj")
    dropped = [range(5), range(10), range(500, 800), range(100)]
    with torch.no_grad():
        for layer, drop, var in zip(net.layers, dropped, (1e-3, 1e-4, 1e-2, 1e-3)):
            layer.prior.z_mu.copy_(torch.rand(layer.prior.z_mu.shape, generator=g) * 0.2 + 0.9)
            layer.prior.z_logvar.fill_(-30.0)
            layer.prior.z_logvar[list(drop)] = 5.0
            layer.weight_logvar.fill_(math.log(var))
            layer.bias_mu.copy_(torch.rand(layer.bias_mu.shape, generator=g) - 0.5)
    data = load_mnist(val_size=200)
    sets = {"test": (data.test.x[:500], data.test.y[:500]), "val": (data.val.x, data.val.y)}
    train_x = data.train.x[:500]
    path = tmp_path / "lenet5.bcz"
    summary = pyro_bc.compress(net, path, val=sets["val"], train=(train_x, data.train.y[:500]), test=sets["test"],
                               thresholds=[-3.0] * 4)
    # fc1's inputs 500-799 are all 16 of conv2's channels 32-49 and 12 of channel 31's: conv2 keeps channels 10-31,
    # fc1 the 16 inputs of channels 10-30 and 4 of channel 31
    assert [row["groups_kept"] for row in summary["layers"]] == [15, 22, 21 * 16 + 4, 400]
    assert [row["fold"] for row in summary["layers"]] == ["on"] * 4
    errors = masked_reference.assert_matches(path, summary, net, train_x, sets)
    assert len(set(errors.values())) > 1
    # conv2's stored biases: its own plus, per filter, the summed taps of conv1's pruned channels 0-4 times each
    # channel's mean over the 500 images and the 12 x 12 positions (float16 in the file)
    w2, b2 = masked_reference.posterior_means(net.layers[1])
    means = masked_reference.input_means(net, train_x)[1]
    assert means.shape == (20,) and means[:5].abs().min() > 0  # a pruned channel's mean is not zero: the fold acts
    want = b2 + w2[:, :5].sum((2, 3)) @ means[:5]
    stored = [item for item in codec.read_bcz(path).items if isinstance(item, codec.QuantizedLayer)][1].bias
    np.testing.assert_allclose(stored, want[10:32].numpy(), rtol=2**-10, atol=2**-24)


def test_evaluate_file_matches_model_json(halved):
    """evaluate's error is MODEL.json's and the one counted here from the loaded file's outputs on the test set."""
    path, summary = halved
    result = evaluate_file(path)
    test = load_mnist().test
    with torch.no_grad():
        wrong = int((pyro_bc.load(path)(test.x).argmax(1) != test.y).sum())
    assert result["error"] == summary["error_compressed"] == 100 * wrong / 10000
    assert result["n"] == 10000
    assert result["ms_per_batch_compressed"] > 0


def test_auto_gap(run, tmp_path):
    path = tmp_path / "gap.bcz"
    summary = compress_run(run, path, auto="gap")
    _check_summary(path, summary)
    net, _, _ = load_run(run)
    assert [la["threshold"] for la in summary["layers"]] == GapRule().thresholds(ThresholdInputs(net, analyse(net)))
    assert summary["threshold_method"] == "auto gap"
    assert summary["threshold_rule"] == {"name": "gap", "settings": GapRule().settings}


def test_rule_object_and_options_give_the_same_file(run, tmp_path):
    by_rule = compress_run(run, tmp_path / "rule.bcz", rule=GivenThresholds([-3.0, -2.0, -1.0]))
    by_options = compress_run(run, tmp_path / "options.bcz", thresholds=[-3.0, -2.0, -1.0])
    assert by_rule == by_options
    assert (tmp_path / "rule.bcz").read_bytes() == (tmp_path / "options.bcz").read_bytes()
    with pytest.raises(ConfigError, match="not both"):
        compress_run(run, tmp_path / "x.bcz", rule=GapRule(), thresholds=[-3.0, -3.0, -3.0])


def test_default_is_the_priors_default(run, tmp_path):
    summary = compress_run(run, tmp_path / "default.bcz")
    assert [la["threshold"] for la in summary["layers"]] == [-3.0, -3.0, -3.0]
    assert summary["threshold_method"] == "default -3"
    assert summary["threshold_rule"] == {"name": "prior-default", "settings": {}}


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
    assert summary["threshold_method"] == "max validation error increase 0.5 points"
    assert summary["threshold_rule"] == {"name": "max-error-increase", "settings": {"max_error_increase": 0.5}}


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
