"""Bit rules (:mod:`pyro_bc.compression.bits`): the variance rule and the validation error budget on a hand-built posterior
whose answer is known, then through ``compress_run``, the command line and ``analysis/bits_table.py``."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from pyro_bc.cli import main
from pyro_bc.compression.bits import TOLERANCE, BitsInputs, ValidationBitsBudget, VarianceRule, bits_rule_from_options
from pyro_bc.compression.compressed import compressed_module
from pyro_bc.compression.graph import prune_chain
from pyro_bc.compression.pipeline import format_table
from pyro_bc.compression.posterior import LayerPosterior, Precision, PrunedLayer, analyse, choose_precision
from pyro_bc.compression.thresholds import GapRule, GivenThresholds, ThresholdInputs
from pyro_bc.errors import ConfigError
from pyro_bc.metrics.evaluate import error_percent
from pyro_bc.nn.layers import BayesLinear
from pyro_bc.nn.network import BayesianNet
from pyro_bc.runs.compressing import compress_run
from pyro_bc.runs.load import load_run

sys.path.insert(0, str(Path(__file__).parents[1] / "analysis"))
import bits_table

VAR = 1e-3  # 2 Var = 2e-3 < 2^-8: the variance rule gives 8 mantissa bits


@pytest.fixture(scope="module")
def grid_net():
    """8 -> 8 -> 4 with ReLU; the first layer's weights are multiples of 2^-2, the second's of 2^-3 (odd
    multiples among them); labels are the exact network's predictions, so the variance rule's error is 0."""
    g = torch.Generator().manual_seed(0)
    means = [torch.randint(-4, 5, (8, 8), generator=g) / 4, torch.randint(-8, 9, (4, 8), generator=g) / 8]
    posts = [LayerPosterior(name, "linear", torch.full((m.shape[1],), -10.0), m, torch.full(m.shape, VAR),
                            torch.zeros(m.shape[0]), 1) for name, m in zip(("fc1", "fc2"), means)]
    layers = prune_chain(posts, [0.0, 0.0])
    net = BayesianNet(nn.Sequential(BayesLinear(8, 8), nn.ReLU(), BayesLinear(8, 4)), input_shape=(8,))
    x = torch.randn(2000, 8, generator=g)
    y = torch.relu(x @ means[0].T) @ means[1].T
    y = y.argmax(-1)
    trials = []

    def error(precision):
        trials.append(list(precision.mantissa_bits))
        return error_percent(compressed_module(net, layers, precision), x, y)

    return BitsInputs(layers, choose_precision(layers), error), trials


def _at(inputs, bits):
    return inputs.error(type(inputs.variance)(bits, inputs.variance.exponent_bits,
                                              inputs.variance.exponent_bits_official))


def test_hand_built_grids_give_the_known_bits(grid_net):
    inputs, trials = grid_net
    assert inputs.variance.mantissa_bits == [8, 8]
    assert _at(inputs, [2, 3]) == 0.0  # both grids are exact
    assert _at(inputs, [1, 3]) > 0 and _at(inputs, [2, 2]) > 0  # one bit fewer on either changes outputs
    trials.clear()
    chosen = ValidationBitsBudget(0.0).precision(inputs)
    assert chosen.mantissa_bits == [2, 3]
    assert chosen.exponent_bits == inputs.variance.exponent_bits
    # the variance rule's network first, then fc1 (64 kept weights) down to its refusal, then fc2 (32)
    assert trials == [[8, 8], *([m, 8] for m in range(7, 0, -1)), *([2, m] for m in range(7, 1, -1))]



def _kept(counts: list[int]) -> list[PrunedLayer]:
    """One linear layer per count, keeping exactly that many of its 4 x 4 weights (the search reads only the counts)."""
    layers = []
    for i, n in enumerate(counts):
        mask = torch.arange(16).reshape(4, 4) < n
        post = LayerPosterior(f"fc{i}", "linear", torch.zeros(4), torch.ones(4, 4), torch.ones(4, 4), torch.zeros(4), 1)
        layers.append(PrunedLayer(post, 0.0, mask.any(0), mask.any(1), mask))
    return layers


def _search(counts, start, error, budget=0.0):
    """The budget rule's bits and every setting it evaluated, for a hand-written error of the mantissa bits."""
    trials = []

    def measured(precision):
        bits = list(precision.mantissa_bits)
        assert min(bits) >= 0, f"a negative mantissa width was evaluated: {bits}"
        trials.append(bits)
        return error(bits)

    variance = Precision(list(start), 4, 4.0)
    chosen = ValidationBitsBudget(budget).precision(BitsInputs(_kept(counts), variance, measured))
    return chosen.mantissa_bits, trials


def test_budget_search_opens_only_layers_with_bits_and_kept_weights():
    """Kept weights [1, 2, 0, 3] at [1, 0, 3, 2] bits, every setting free: the layer keeping 3 weights goes first (2
    steps), then the one keeping 1 (1 bit to 0); the layer already at 0 bits and the layer keeping nothing are never
    tried (nothing to lower, nothing to save): 1 + 3 evaluations."""
    bits, trials = _search([1, 2, 0, 3], [1, 0, 3, 2], lambda bits: 0.0)
    assert bits == [0, 0, 3, 0]
    assert trials == [[1, 0, 3, 2], [1, 0, 3, 1], [1, 0, 3, 0], [0, 0, 3, 0]]


def test_budget_search_breaks_ties_towards_the_earlier_layer():
    """Two layers keeping 3 weights each at 2 bits, and an error that allows one bit removed in all: the earlier
    layer takes it, then each layer's next step is refused and closes it."""
    bits, trials = _search([3, 3], [2, 2], lambda bits: 0.0 if sum(bits) >= 3 else 10.0)
    assert bits == [1, 2]
    assert trials == [[2, 2], [1, 2], [0, 2], [1, 1]]


def test_budget_search_keeps_a_setting_exactly_at_the_limit():
    """The limit is the start's error plus the budget plus TOLERANCE; a setting whose error equals it is kept, one
    float step above it is refused."""
    limit = 0.0 + 1.0 + TOLERANCE
    at, _ = _search([2], [3], lambda bits: 0.0 if bits == [3] else limit, budget=1.0)
    assert at == [0]
    above, _ = _search([2], [3], lambda bits: 0.0 if bits == [3] else math.nextafter(limit, math.inf), budget=1.0)
    assert above == [3]

def test_large_budget_lowers_every_layer_to_zero_bits(grid_net):
    inputs, _ = grid_net
    assert ValidationBitsBudget(100.0).precision(inputs).mantissa_bits == [0, 0]


def test_variance_rule_keeps_the_variance_bits(grid_net):
    inputs, _ = grid_net
    assert VarianceRule().precision(inputs) == inputs.variance
    assert isinstance(bits_rule_from_options(None), VarianceRule)
    assert bits_rule_from_options(0.5).record() == {"name": "validation-budget", "settings": {"bits_budget": 0.5}}


@pytest.mark.parametrize("budget", [-0.1, math.nan, math.inf, "1", True])
def test_bad_budgets_are_one_line_config_errors(budget):
    with pytest.raises(ConfigError, match="bits budget") as info:
        ValidationBitsBudget(budget)
    assert "\n" not in str(info.value)


def test_budget_rule_needs_an_error_function(grid_net):
    inputs, _ = grid_net
    with pytest.raises(ConfigError, match="validation error"):
        ValidationBitsBudget(0.0).precision(BitsInputs(inputs.layers, inputs.variance))


# -- compress_run and the command line ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pair(run, tmp_path_factory):
    """The run compressed at the priors' defaults by the variance rule and within a budget of 0 points."""
    folder = tmp_path_factory.mktemp("pair")
    return compress_run(run, folder / "variance.bcz"), compress_run(run, folder / "budget.bcz", bits_budget=0.0)


def test_budget_zero_never_raises_validation_error_and_never_adds_bits(pair):
    variance, budget = pair
    assert budget["val_error_compressed"] <= variance["val_error_compressed"]
    for v, b in zip(variance["layers"], budget["layers"]):
        assert v["mantissa_bits"] == v["mantissa_bits_variance_rule"] == b["mantissa_bits_variance_rule"]
        assert b["mantissa_bits"] <= b["mantissa_bits_variance_rule"]
        assert b["bits"] == 1 + b["exponent_bits"] + b["mantissa_bits"]
    assert sum(b["mantissa_bits"] for b in budget["layers"]) < sum(v["mantissa_bits"] for v in variance["layers"])
    assert budget["cr_fast"] > variance["cr_fast"]
    assert budget["architecture"] == variance["architecture"]


def test_model_json_records_the_bits_rule_beside_the_existing_keys(pair):
    variance, budget = pair
    assert variance["bits_rule"] == {"name": "variance", "settings": {}}
    assert budget["bits_rule"] == {"name": "validation-budget", "settings": {"bits_budget": 0.0}}
    assert set(variance) == set(budget)
    assert {"threshold_rule", "threshold_method", "cr_fast", "cr_file", "val_error_compressed"} <= set(budget)
    assert "variance rule: " in format_table(budget) and "variance rule: " not in format_table(variance)


def test_bits_compose_with_threshold_rules(run, tmp_path):
    """Thresholds first (as the threshold rule alone chooses them), then bits."""
    given = compress_run(run, tmp_path / "given.bcz", rule=GivenThresholds([-2.0, -2.0, -2.0]), bits_budget=0.5)
    assert [la["threshold"] for la in given["layers"]] == [-2.0, -2.0, -2.0]
    gap = compress_run(run, tmp_path / "gap.bcz", auto="gap", bits_budget=0.5)
    net = load_run(run)[0]
    assert [la["threshold"] for la in gap["layers"]] == GapRule().thresholds(ThresholdInputs(net, analyse(net)))
    for summary in (given, gap):
        assert summary["bits_rule"] == {"name": "validation-budget", "settings": {"bits_budget": 0.5}}
        assert all(la["mantissa_bits"] <= la["mantissa_bits_variance_rule"] for la in summary["layers"])


@pytest.mark.parametrize("options, match", [({"bits_budget": -1.0}, "bits budget"),
                                            ({"bits_budget": math.nan}, "bits budget"),
                                            ({"bits_budget": 0.1, "bits_rule": VarianceRule()}, "not both")])
def test_compress_run_refuses_bad_budgets_before_writing(run, tmp_path, options, match):
    with pytest.raises(ConfigError, match=match):
        compress_run(run, tmp_path / "x.bcz", **options)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("value", ["-1", "nan", "abc"])
def test_cli_bad_bits_budget_exits_2_naming_the_value(value, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["compress", "R", "--out", "x.bcz", "--bits-budget", value])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"'{value}'" in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())


def test_cli_bits_budget(run, tmp_path, capsys):
    path = tmp_path / "M.bcz"
    assert main(["compress", str(run), "--out", str(path), "--bits-budget", "0.2"]) == 0
    assert "mantissa bits by the validation-budget rule" in capsys.readouterr().out
    assert json.loads(path.with_suffix(".json").read_text())["bits_rule"]["settings"] == {"bits_budget": 0.2}


# -- analysis/bits_table.py ----------------------------------------------------------------------------------

def test_bits_table_rows_and_commands(run, pair):
    variance, budget = pair
    assert bits_table.recorded_rule(run) is None  # no MODEL.json: the priors' defaults
    assert bits_table.row(run, variance).endswith(f"`pyro-bc compress {run} --out MODEL.bcz` |")
    line = bits_table.row(run, budget)
    assert f"| {run.name} | validation-budget 0 |" in line and line.endswith("--bits-budget 0.0` |")
    bits = "-".join(str(la["bits"]) for la in budget["layers"])
    assert f"| {bits} (" in line and f"| {budget['error_compressed']:.2f} |" in line
    gap = dict(budget, threshold_rule={"name": "gap", "settings": GapRule().settings})
    assert bits_table.threshold_flags(gap) == ["--auto", "gap"]
    gap["threshold_rule"] = {"name": "gap", "settings": dict(GapRule().settings, min_gap=1.0)}
    assert bits_table.threshold_flags(gap) == ["--thresholds", *(str(la["threshold"]) for la in budget["layers"])]
