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
from torch import nn

import models.lenet5
import pyro_bc
from pyro_bc.bcz import codec
from pyro_bc.compression.pipeline import choose_deterministic_precision, format_table
from pyro_bc.compression.posterior import analyse
from pyro_bc.compression.thresholds import GapRule, GivenThresholds, ThresholdInputs
from pyro_bc.data.datasets import load_mnist
from pyro_bc.errors import CheckpointError, ConfigError, FormatError
from pyro_bc.nn.layers import BayesConv2d
from pyro_bc.nn.network import BayesianNet
from pyro_bc.priors import make_prior
from pyro_bc.runs.compressing import compress_run, evaluate_file
from pyro_bc.runs.load import load_run

LAYER_KEYS = {"name", "groups_total", "groups_kept", "weights_total", "weights_kept", "bits", "exponent_bits",
              "mantissa_bits", "threshold"}
TOP_KEYS = {"layers", "architecture", "weights_kept_fraction", "cr_prune", "cr_fast", "cr_file", "file_bytes",
            "original_bytes", "error_posterior_mean", "error_pruned", "error_compressed", "val_error_compressed",
            "error_measure"}
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


# -- deterministic modules ---------------------------------------------------------------------------------------

def _with_deterministic_modules(head_bias: list[float] | None = None) -> BayesianNet:
    """Bayesian conv a -> ReLU -> BatchNorm (it follows no layer, so it stays) -> Bayesian conv b -> ReLU -> flatten
    -> LayerNorm -> a plain linear head (deterministic); a's channel 1 and b's channel 2 dropped (log alpha about 5,
    the rest about -30); BatchNorm and LayerNorm random. ``head_bias``: the head's weights zero, its bias this."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    prior = make_prior("gnj")
    body = nn.Sequential(BayesConv2d(2, 4, 3, prior=prior), nn.ReLU(), nn.BatchNorm2d(4),
                         BayesConv2d(4, 4, 3, prior=prior), nn.ReLU(), nn.Flatten(), nn.LayerNorm(16), nn.Linear(16, 3))
    with torch.no_grad():
        bn, norm, head = body[2], body[6], body[7]
        for tensor, low, high in ((bn.running_mean, -1, 1), (bn.running_var, 0.5, 2), (bn.weight, 0.5, 1.5),
                                  (bn.bias, -1, 1), (norm.weight, 0.5, 1.5), (norm.bias, -0.5, 0.5)):
            tensor.uniform_(low, high, generator=g)
        for layer, dropped in ((body[0], 1), (body[3], 2)):
            layer.prior.z_mu.copy_(torch.rand(4, generator=g) * 0.2 + 0.9)
            layer.prior.z_logvar.fill_(-30.0)
            layer.prior.z_logvar[dropped] = 5.0
            layer.bias_mu.uniform_(-0.5, 0.5, generator=g)
        if head_bias is not None:
            head.weight.zero_()
            head.bias.copy_(torch.tensor(head_bias))
    return BayesianNet(body, input_shape=(2, 6, 6)).eval()


def _error(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return 100 * (module(x).argmax(1) != y).float().mean().item()


def test_deterministic_modules_are_stored_at_float16_where_that_keeps_the_validation_error(tmp_path):
    net = _with_deterministic_modules()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(64, 2, 6, 6, generator=g), torch.randint(0, 3, (64,), generator=g)
    path = tmp_path / "m.bcz"
    summary = pyro_bc.compress(net, path, val=(x, y), test=(x, y), thresholds=[-3.0, -3.0])
    rows = [tuple(row.values()) for row in summary["deterministic_modules"]]
    assert rows == [("2", "BatchNorm2d", "depthwise 1x1 conv2d (scale, shift per kept channel)", 8, 6, "float16"),
                    ("6", "LayerNorm", "layer_norm", 32, 32, "float16"), ("7", "Linear", "linear", 51, 51, "float16")]
    assert summary["original_bytes"] == 4 * (4 * 2 * 9 + 4 + 4 * 4 * 9 + 4 + 8 + 32 + 51)  # deterministic ones too
    assert "deterministic: 2 (BatchNorm2d, 6 values at float16), 6 (LayerNorm, 32 values" in format_table(summary)
    # the stored values: float16(float32 of the original), BatchNorm over a's kept channels 0, 2, 3
    bn, norm, head = (net.body[i] for i in (2, 6, 7))
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    shift = bn.bias.double() - bn.running_mean.double() * scale

    def half(t: torch.Tensor) -> torch.Tensor:
        return t.detach().float().half().float()

    loaded = pyro_bc.load(path)
    stored_bn = next(m for m in loaded if isinstance(m, nn.Conv2d) and m.groups > 1)
    assert torch.equal(stored_bn.weight.flatten(), half(scale)[[0, 2, 3]])
    assert torch.equal(stored_bn.bias, half(shift)[[0, 2, 3]])
    stored_norm, stored_head = next(m for m in loaded if isinstance(m, nn.LayerNorm)), loaded[-1]
    for got, original in ((stored_norm.weight, norm.weight), (stored_norm.bias, norm.bias),
                          (stored_head.weight, head.weight), (stored_head.bias, head.bias)):
        assert torch.equal(got, half(original)) and not torch.equal(got, original.detach())
    # the file computes the full-size pruned network up to rounding; the errors are the summary's, by own count
    with torch.no_grad():
        want = pyro_bc.pruned_network(net, summary)(x)
        assert ((loaded(x) - want).norm() / want.norm()).item() < 0.01
    choice = summary["deterministic_precision"]
    assert choice["chosen"] == "float16" and choice["val_error_float16"] <= choice["val_error_float32"]
    assert _error(loaded, x, y) == pytest.approx(summary["val_error_compressed"]) == choice["val_error_float16"]
    with torch.no_grad():  # the same file with the deterministic tensors at float32
        stored_bn.weight.copy_(scale.float()[[0, 2, 3]].reshape(-1, 1, 1, 1))
        stored_bn.bias.copy_(shift.float()[[0, 2, 3]])
        for got, original in ((stored_norm.weight, norm.weight), (stored_norm.bias, norm.bias),
                              (stored_head.weight, head.weight), (stored_head.bias, head.bias)):
            got.copy_(original)
    assert _error(loaded, x, y) == pytest.approx(choice["val_error_float32"])


def test_deterministic_modules_stay_float32_where_float16_costs_validation_error(tmp_path):
    """The head's bias 1 + 2^-12 for class 1 is 1 at float16 (its step near 1 is 2^-10), a tie that class 0 wins:
    every label is 1, so float16 would make the validation error 100% instead of 0%."""
    net = _with_deterministic_modules(head_bias=[1.0, 1.0 + 2**-12, 0.0])
    x, y = torch.randn(16, 2, 6, 6, generator=torch.Generator().manual_seed(2)), torch.ones(16, dtype=torch.long)
    path = tmp_path / "m.bcz"
    summary = pyro_bc.compress(net, path, val=(x, y), thresholds=[-3.0, -3.0])
    assert summary["deterministic_precision"] == {"chosen": "float32", "val_error_float32": 0.0,
                                                  "val_error_float16": 100.0}
    assert [row["precision"] for row in summary["deterministic_modules"]] == ["float32"] * 3
    loaded = pyro_bc.load(path)
    assert torch.equal(loaded[-1].bias, net.body[7].bias.detach()) and summary["val_error_compressed"] == 0.0


def test_compress_without_validation_examples(tmp_path):
    """A network trained on all its data: given thresholds and the variance rule's bits need no validation
    examples; deterministic modules stay at float32 (nothing to check float16 on), ``val_error_compressed`` is None,
    the test error is the loaded file's by own count, and a rule that measures validation errors says what is missing."""
    net = _with_deterministic_modules()
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(32, 2, 6, 6, generator=g), torch.randint(0, 3, (32,), generator=g)
    path = tmp_path / "m.bcz"
    summary = pyro_bc.compress(net, path, test=(x, y), thresholds=[-3.0, -3.0])
    assert summary["val_error_compressed"] is None and summary["deterministic_precision"] is None
    assert [row["precision"] for row in summary["deterministic_modules"]] == ["float32"] * 3
    loaded = pyro_bc.load(path)
    assert torch.equal(loaded[-1].bias, net.body[7].bias.detach())
    assert summary["error_compressed"] == pytest.approx(_error(loaded, x, y))
    assert [row["mantissa_bits"] for row in summary["layers"]] == [
        row["mantissa_bits_variance_rule"] for row in summary["layers"]]
    assert "validation" not in format_table(summary).splitlines()[-1]
    with pytest.raises(ConfigError, match="the max-error-increase rule needs validation examples and there are none"):
        pyro_bc.compress(net, tmp_path / "b.bcz", test=(x, y), max_error_increase=0.5)
    with pytest.raises(ConfigError, match="bits rule needs the validation error"):
        pyro_bc.compress(net, tmp_path / "c.bcz", test=(x, y), thresholds=[-3.0, -3.0], bits_budget=0.5)


def test_the_deterministic_precision_rule_compares_within_the_bits_tolerance():
    """float16 unless its error is above float32's by more than the bits rule's 1e-9 points; no deterministic
    node: no choice, and no error evaluated."""
    dense = codec.FloatLayer("linear", "d", [[0.1, 0.2]])
    model = codec.CompressedModel([dense], (2,))

    def rule(float32: float, float16: float) -> str:
        return choose_deterministic_precision(model, lambda m: float16 if codec.float16_exact(m.items[0].weight)
                                              else float32)["chosen"]

    assert rule(5.0, 5.0) == rule(5.0, 5.0 + 1e-10) == rule(5.0, 4.0) == "float16"
    assert rule(5.0, 5.0 + 1e-6) == "float32"
    quantized = codec.CompressedModel([codec.QuantizedLayer("linear", "q", np.ones((1, 2), np.int64), 0)], (2,))
    assert choose_deterministic_precision(quantized, lambda m: pytest.fail("evaluated")) is None


class _Tagger(nn.Module):
    """A class per token: embedding, hidden layer, a logit per tag; logits (N, T, tags)."""

    def __init__(self):
        super().__init__()
        self.embed, self.hidden, self.tags = nn.Embedding(12, 16), nn.Linear(16, 24), nn.Linear(24, 12)

    def forward(self, ids):
        return self.tags(torch.relu(self.hidden(self.embed(ids))))


class _Segmenter(nn.Module):
    """A class per pixel: two 3x3 convolutions and a 1x1 head, the classes moved to the last axis."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(8, 4, 1))

    def forward(self, x):
        return self.body(x).movedim(1, -1)


@pytest.mark.parametrize("case", ["tagger", "segmenter"])
def test_a_network_labelling_every_position_trains_and_compresses_scored_over_the_positions(case, tmp_path):
    """A label per token or per pixel: the errors and scores ``compress`` records are means over every labelled
    position (padding labelled -100 left out), computed here by hand from the file's own logits."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if case == "tagger":  # every third sequence ends in two padding tokens, labelled -100 (nothing)
        x = torch.randint(0, 12, (192, 8), generator=g)
        y = (x + 1) % 12
        y[::3, 6:] = -100
        net = pyro_bc.bayesianize(_Tagger(), "gnj", input_shape=(8,), input_dtype=torch.int64)
    else:
        x = torch.randn(96, 3, 8, 8, generator=g)
        y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
        net = pyro_bc.bayesianize(_Segmenter(), "gnj", input_shape=(3, 8, 8))
    pyro_bc.fit(net, (x, y), epochs=4, batch_size=32, lr=1e-2, progress=False)
    summary = pyro_bc.compress(net, tmp_path / "m.bcz", val=(x, y), train=(x, y), test=(x, y), predictive_samples=0)
    with torch.no_grad():
        logits = pyro_bc.load(tmp_path / "m.bcz")(x)
    assert logits.shape == (*y.shape, logits.shape[-1])
    labelled = y != -100
    by_hand = 100.0 * (logits.argmax(-1) != y)[labelled].double().mean().item()
    assert summary["error_compressed"] == pytest.approx(by_hand, abs=1e-9)
    assert summary["error_compressed"] < 50.0  # it learned: guessing errs on 92% (tagger), 75% (segmenter)
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), y.reshape(-1)).item()  # -100 ignored
    assert summary["predictive"]["compressed_deterministic"]["nll"] == pytest.approx(nll, rel=1e-4)
