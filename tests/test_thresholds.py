"""Threshold rules: each rule's thresholds on hand-built posteriors, its name and settings, and the mapping
from the command line's options and from MODEL.json's record back to a rule."""

import dataclasses
import itertools
import json

import numpy as np
import pytest
import torch
from torch import nn

import models.lenet5
import models.lenet300
from pyro_bc.compression.posterior import LayerPosterior, analyse
from pyro_bc.compression.thresholds import (
    RULES,
    GapRule,
    GivenThresholds,
    KeptStructure,
    PriorDefault,
    ThresholdInputs,
    ThresholdRule,
    ValidationBudget,
    WeightsBudget,
    governed_weights,
    rule_from_options,
    rule_from_record,
)
from pyro_bc.errors import ConfigError
from pyro_bc.nn.layers import BayesLinear
from pyro_bc.nn.network import BayesianNet


def post(values):
    la = torch.tensor(values)
    return LayerPosterior("l", "linear", la, torch.zeros(1, len(values)), torch.zeros(1, len(values)), torch.zeros(1), 1)


def gap(*layers):
    return GapRule().thresholds(ThresholdInputs(None, [post(v) for v in layers]))


def test_gap_rule_hand_built():
    # widest gap overlapping [-6, 2]: between -5 and 1 -> middle -2
    assert gap([-9.0, -8.9, -5.0, 1.0, 1.1]) == [-2.0]
    # the widest gap (0.3, 4.4) has its middle above 2: clipped to 2; the 1.5-nat gap at -5 is too narrow
    assert gap([-7.0, -6.5, -4.5, -3.0, 0.3, 4.4, 5.0]) == [2.0]
    # gaps of 1 nat only (a continuum) -> default -3; a gap wholly outside [-6, 2] does not count either
    assert gap([-6.0, -5.0, -4.0, -3.0, -2.0]) == [-3.0]
    assert gap([-0.5, 0.0, 0.5, 1.0, 1.5, 2.5, 6.0]) == [-3.0]
    # one threshold per layer, in order
    assert gap([-9.0, -8.9, -5.0, 1.0, 1.1], [-6.0, -5.0, -4.0]) == [-2.0, -3.0]


def test_gap_rule_boundaries_count_at_equality():
    # a gap of exactly the minimum 2 nats counts; so does a gap that touches [-6, 2] at one end (then clipped)
    assert gap([-5.0, -3.0]) == [-4.0]
    assert gap([-10.0, -6.0]) == [-6.0]
    assert gap([2.0, 5.0]) == [2.0]
    assert gap([-5.0, -3.0 - 2**-20]) == [-3.0]  # just under 2 nats: the fallback


def test_gap_rule_moves_with_a_prior_that_cuts_elsewhere_by_default():
    """lu cuts at log alpha 3 by default, 6 nats above the group priors: its window is [0, 8], its fallback 3."""
    def lu_post(values):
        return dataclasses.replace(post(values), default_threshold=3.0)
    rule = GapRule()
    # the widest gap, (0.5, 9.5), has its middle 5 inside lu's [0, 8]; on the group scale it is clipped to 2
    assert rule.thresholds(ThresholdInputs(None, [lu_post([-9.0, -5.5, 0.5, 9.5])])) == [5.0]
    assert rule.thresholds(ThresholdInputs(None, [post([-9.0, -5.5, 0.5, 9.5])])) == [2.0]
    assert rule.thresholds(ThresholdInputs(None, [lu_post([0.0, 1.0, 2.0, 3.0])])) == [3.0]  # no gap: lu's cut
    assert rule.thresholds(ThresholdInputs(None, [lu_post([5.0, 20.0])])) == [8.0]  # clipped to lu's hi


def test_gap_rule_settings_change_the_rule():
    values = [-9.0, -8.0, -6.5, -5.0]  # gaps of 1 and 1.5 nats
    assert GapRule(min_gap=1.5).thresholds(ThresholdInputs(None, [post(values)])) == [-5.75]
    assert GapRule(fallback=-4.0).thresholds(ThresholdInputs(None, [post(values)])) == [-4.0]


def test_given_thresholds_are_returned_as_given():
    rule = GivenThresholds([-3, -2.5, 1])
    assert rule.thresholds(ThresholdInputs(None, [])) == [-3.0, -2.5, 1.0]
    assert rule.settings == {"thresholds": [-3.0, -2.5, 1.0]}


@pytest.mark.parametrize("prior, expected", [("gnj", [-3.0] * 3), ("ghs", [-3.0] * 3), ("lu", [3.0] * 3)])
def test_prior_default_is_each_layers_prior_default(prior, expected):
    net = models.lenet300.build(prior)
    assert PriorDefault().thresholds(ThresholdInputs(net, analyse(net))) == expected


@pytest.mark.parametrize("rule, thresholds, text", [
    (GivenThresholds([-1.0]), [-1.0], "given"),
    (GapRule(), [-2.0], "auto gap"),
    (ValidationBudget(0.5), [-8.0], "max validation error increase 0.5 points"),
    (PriorDefault(), [-3.0, -3.0, 3.0], "default -3, 3"),
    (WeightsBudget(10.8), [-2.5, -2.5], "at most 10.8% of weights kept"),
])
def test_method_text_is_what_model_json_has_always_recorded(rule, thresholds, text):
    assert rule.method(thresholds) == text


@pytest.mark.parametrize("rule", [GivenThresholds([-3.0, -2.0]), GapRule(lo=-5.0), ValidationBudget(1.5), PriorDefault(),
                                  KeptStructure("runs/finetuned"), WeightsBudget(10.8)])
def test_record_is_json_and_round_trips(rule):
    record = json.loads(json.dumps(rule.record()))
    assert record == {"name": rule.name, "settings": rule.settings}
    back = rule_from_record(record)
    assert type(back) is type(rule) and back.settings == rule.settings


def test_every_rule_is_registered_under_its_name():
    assert set(RULES) == {"given", "gap", "max-error-increase", "max-weights-kept", "prior-default", "kept-structure"}
    assert all(issubclass(cls, ThresholdRule) and cls.name == name for name, cls in RULES.items())


def test_bad_records_are_config_errors():
    with pytest.raises(ConfigError, match="unknown threshold rule 'median': choose one of given, gap, "
                                          "max-error-increase, max-weights-kept, prior-default, kept-structure$"):
        rule_from_record({"name": "median", "settings": {}})
    with pytest.raises(ConfigError, match=r"threshold rule gap: bad settings \{'width': 3\} \("):
        rule_from_record({"name": "gap", "settings": {"width": 3}})
    for record in ("gap", None, ["gap"]):
        with pytest.raises(ConfigError, match="unknown threshold rule None"):
            rule_from_record(record)


def test_a_record_without_settings_is_the_rule_with_its_defaults():
    assert isinstance(rule_from_record({"name": "prior-default"}), PriorDefault)
    assert rule_from_record({"name": "gap"}).settings == GapRule().settings


def test_rule_from_options_follows_the_command_lines_precedence():
    assert isinstance(rule_from_options(), PriorDefault)
    assert rule_from_options(thresholds=[-1.0, -2.0]).settings == {"thresholds": [-1.0, -2.0]}
    assert isinstance(rule_from_options(auto="gap"), GapRule)
    assert rule_from_options(max_error_increase=0.25).settings == {"max_error_increase": 0.25}
    assert rule_from_options(max_weights_kept=10.8).settings == {"max_weights_kept": 10.8}
    assert isinstance(rule_from_options(thresholds=[0.0], auto="gap", max_error_increase=1.0), GivenThresholds)
    with pytest.raises(ConfigError, match="unknown automatic threshold rule 'median': choose gap$"):
        rule_from_options(auto="median")


# -- the validation budget --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def budget_inputs():
    torch.manual_seed(0)
    net = models.lenet5.build("gnj").eval()  # layers by size: fc1, conv2, fc2, conv1
    x = torch.randn(200, 1, 28, 28)
    with torch.no_grad():
        y = net.posterior_mean_network()(x).argmax(-1)  # the unpruned network is right on every example
    return ThresholdInputs(net, analyse(net), x, y)


def test_budget_needs_validation_data(budget_inputs):
    with pytest.raises(ConfigError, match="needs validation examples"):
        ValidationBudget(1.0).thresholds(ThresholdInputs(budget_inputs.net, budget_inputs.posts))


def test_budget_that_even_the_least_pruned_network_exceeds(budget_inputs):
    with pytest.raises(ConfigError, match="even the least pruned .* points: raise --max-error-increase$"):
        ValidationBudget(-1.0).thresholds(budget_inputs)


def test_governed_weights_of_lenet5_by_hand(budget_inputs):
    # a group of conv1 / conv2 is an output channel: its filter and the next layer's slice that reads it
    # (conv2: 50 x 5 x 5 per conv1 channel; fc1: 4 x 4 positions x 500 outputs per conv2 channel); a group of
    # fc1 / fc2 is an input: its column (500 / 10 weights), and for fc2 also fc1's row that produced it (800)
    expected = [20 * (25 + 50 * 25), 50 * (20 * 25 + 16 * 500), 800 * 500, 500 * (10 + 800)]
    assert governed_weights(budget_inputs.net, budget_inputs.posts) == expected


def test_budget_visits_layers_by_governed_weights_and_stays_within_budget(budget_inputs, monkeypatch):
    trials = []
    error = ValidationBudget._error

    def spy(inputs, thresholds):
        trials.append(list(thresholds))
        return error(inputs, thresholds)

    monkeypatch.setattr(ValidationBudget, "_error", staticmethod(spy))
    rule = ValidationBudget(100.0)  # every setting is within budget: each search ends at the grid's lowest
    assert rule.thresholds(budget_inputs) == [float(ValidationBudget.GRID[0])] * 4
    assert trials[0] == [float(ValidationBudget.GRID[-1])] * 4  # the least pruned network first
    changed = [next(i for i, (a, b) in enumerate(zip(before, after)) if a != b)
               for before, after in itertools.pairwise(trials)]
    assert list(dict.fromkeys(changed)) == [1, 3, 2, 0]  # conv2 425,000, fc2 405,000, fc1 400,000, conv1 25,500


def _fragile_inputs_net(input_means=None):
    """One linear layer, 4 inputs (log alpha -7.9, -5.1, -2.1, 5.9), 2 classes: class 1's score is the sum of the
    inputs. Of 100 examples of class 1, 95 score 1 on input 0 alone; one scores 1 only with input 3, one only with
    input 2, three only with input 1. Pruning inputs 3, 2, 1 in turn costs 1, 2, then 5 wrong: 1%, 2%, 5%; pruning
    input 0 too (at the grid's lowest, -8) leaves the layer nothing."""
    net = BayesianNet(nn.Sequential(BayesLinear(4, 2)), input_shape=(4,))
    fc = net.layers[0]
    with torch.no_grad():
        fc.weight_mu.copy_(torch.tensor([[0.0] * 4, [1.0] * 4]))
        fc.bias_mu.zero_()
        fc.prior.z_mu.fill_(1.0)
        fc.prior.z_logvar.copy_(torch.tensor([-7.9, -5.1, -2.1, 5.9]))
    x = torch.tensor([[1.0, 0, 0, 0]] * 95 + [[-1.0, 0, 0, 2]] + [[-1.0, 0, 2, 0]] + [[-1.0, 2, 0, 0]] * 3)
    inputs = ThresholdInputs(net, analyse(net), x, torch.ones(100, dtype=torch.long), input_means)
    assert [round(float(la), 4) for la in inputs.posts[0].log_alpha] == [-7.9, -5.1, -2.1, 5.9]
    return inputs


@pytest.mark.parametrize("budget, expected", [(0.0, 6.0), (0.5, 6.0), (1.0, -2.0), (1.99, -2.0), (2.0, -5.0),
                                              (4.99, -5.0), (5.0, -7.75), (100.0, -7.75)])
def test_budget_is_met_at_equality(budget, expected):
    """An error exactly at the unpruned error plus the budget is within it: with budget 1 the 1% setting counts (the
    lowest grid point that keeps input 2 is -2.0); with budget 0 the unpruned network's own error is within it, and
    only the grid's top, 6.0, keeps input 3. A layer left nothing is over any budget, 100 points included."""
    assert ValidationBudget(budget).thresholds(_fragile_inputs_net()) == [expected]


def test_budget_errors_are_those_of_the_folded_network():
    """With input 3's mean at 2, the fold adds 2 to class 1's score once input 3 is pruned, which rescues every
    fragile example: within a budget of 0 everything but input 0 goes."""
    inputs = _fragile_inputs_net([torch.tensor([0.0, 0.0, 0.0, 2.0])])
    assert ValidationBudget(0.0).thresholds(inputs) == [-7.75]


def test_budget_needs_both_validation_inputs_and_labels():
    inputs = _fragile_inputs_net()
    for x, y in ((inputs.val_x, None), (None, inputs.val_y)):
        with pytest.raises(ConfigError, match="the max-error-increase rule needs validation examples"):
            ValidationBudget(1.0).thresholds(ThresholdInputs(inputs.net, inputs.posts, x, y))


@pytest.mark.parametrize("second", [1.0, float(np.nextafter(np.float32(1.0), np.float32(-np.inf)))])
def test_governed_weights_divide_by_the_groups_the_top_threshold_prunes(second):
    """Three inputs of a 2-output layer, log alpha 1, ``second`` and -20: the threshold just under the top prunes
    the inputs at 1 and at ``second`` (a tie, or one float32 step below: not below the threshold either), 4 weights,
    2 per group: the layer's 3 groups govern 3 x 2 weights."""
    net = BayesianNet(nn.Sequential(BayesLinear(3, 2)), input_shape=(3,))
    with torch.no_grad():
        net.layers[0].prior.z_mu.fill_(1.0)
        net.layers[0].prior.z_logvar.copy_(torch.tensor([1.0, second, -20.0]))
    posts = analyse(net)
    assert posts[0].log_alpha.tolist() == [1.0, second, -20.0]
    assert governed_weights(net, posts) == [6.0]


# -- the budget of weights kept -----------------------------------------------------------------------------

def _chain(log_alphas: list[list[float]], outputs: int = 2) -> ThresholdInputs:
    """Linear layers in a chain whose input groups have the given log alphas (group scale mean 1, so log alpha is
    the scale's log variance)."""
    sizes = [len(values) for values in log_alphas] + [outputs]
    body = []
    for n_in, n_out in itertools.pairwise(sizes):
        body += [BayesLinear(n_in, n_out), nn.ReLU()]
    net = BayesianNet(nn.Sequential(*body[:-1]), input_shape=(sizes[0],))
    with torch.no_grad():
        for layer, values in zip(net.layers, log_alphas):
            layer.prior.z_mu.fill_(1.0)
            layer.prior.z_logvar.copy_(torch.tensor(values))
    return ThresholdInputs(net, analyse(net))


def _kept_by_hand(log_alphas: list[list[float]], threshold: float, outputs: int = 2) -> tuple[int, list[int]]:
    """A chain's weights kept at one threshold, counted by hand: each layer keeps its inputs under the threshold
    times its outputs, which are the next layer's inputs kept (the last layer's: all of them)."""
    groups = [int((np.array(values, dtype=np.float32) < np.float32(threshold)).sum()) for values in log_alphas]
    outs = groups[1:] + [outputs]
    return sum(g * o for g, o in zip(groups, outs)), groups


@pytest.mark.parametrize("budget", [48.0, 55.0, 62.0, 75.0, 90.0, 99.0, 100.0])  # the least is 47.6%
def test_weights_budget_keeps_the_most_groups_within_the_budget(budget):
    """Against every cut by hand: the rule keeps as many weights as any threshold within the budget, and as many
    groups as any threshold that keeps that many weights (the highest cut: a group that adds no weight stays)."""
    rng = np.random.default_rng(7)
    log_alphas = [rng.normal(-2, 3, n).round(3).tolist() for n in (6, 4, 3)]  # 6*4 + 4*3 + 3*2 = 42 weights
    values = np.unique(np.concatenate(log_alphas))
    cuts = [values[0] - 1, *((values[:-1] + values[1:]) / 2), values[-1] + 1]
    within = [(weights, sum(groups)) for weights, groups in (_kept_by_hand(log_alphas, t) for t in cuts)
              if 100 * weights / 42 <= budget and min(groups) > 0]
    (threshold, *others) = WeightsBudget(budget).thresholds(_chain(log_alphas))
    assert others == [threshold, threshold]
    weights, groups = _kept_by_hand(log_alphas, threshold)
    assert (weights, sum(groups)) == max(within)
    assert 100 * weights / 42 <= budget


def test_weights_budget_that_leaves_a_layer_empty_names_the_least_budget():
    log_alphas = [[-5.0, -4.0, -1.0], [0.0, -6.0], [-3.0]]  # 3*2 + 2*1 + 1*2 = 10 weights
    # the least cut keeping every layer is just over layer 2's -3, which keeps layer 0's -5 and -4 too: 2*1 + 1*1 + 1*2
    least = min(100 * w / 10 for w, g in (_kept_by_hand(log_alphas, t, 2) for t in np.arange(-7, 1, 0.5))
                if min(g) > 0)
    assert least == 50.0
    with pytest.raises(ConfigError, match=r"a budget of 45% of weights leaves a layer no weight: the least that keeps "
                                          r"every layer is 50%; raise --max-weights-kept$"):
        WeightsBudget(45).thresholds(_chain(log_alphas))
    assert _kept_by_hand(log_alphas, WeightsBudget(50).thresholds(_chain(log_alphas))[0]) == (5, [2, 1, 1])


def test_weights_budget_separates_neighbouring_float32_values():
    """Two inputs one float32 step apart: the cut between them keeps the smaller alone (the cut is evaluated as the
    pruning compares, in the log alphas' float32)."""
    below = float(np.nextafter(np.float32(1.0), np.float32(-np.inf)))
    inputs = _chain([[1.0, below]], outputs=1)
    (threshold,) = WeightsBudget(50).thresholds(inputs)
    assert _kept_by_hand([[1.0, below]], threshold, outputs=1) == (1, [1])


@pytest.mark.parametrize("budget", [0.0, -1.0, 100.5, float("nan")])
def test_weights_budget_is_a_percentage(budget):
    with pytest.raises(ConfigError, match=r"max_weights_kept is a percentage in \(0, 100\]"):
        WeightsBudget(budget)
