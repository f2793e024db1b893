"""The likelihoods (pyro_bc.nn.likelihoods): each site's log probability against its closed form or PyTorch's loss,
and the table by name."""

import math

import pytest
import torch
import torch.nn.functional as F
from pyro import poutine
from torch import nn

from pyro_bc.errors import ConfigError
from pyro_bc.nn.layers import BayesLinear
from pyro_bc.nn.likelihoods import LIKELIHOODS
from pyro_bc.nn.network import BayesianNet


def test_the_table_names_each_likelihood_and_an_unknown_name_is_one_line():
    assert set(LIKELIHOODS) == {"categorical", "bernoulli", "normal"}
    for name in LIKELIHOODS:
        assert BayesianNet(nn.Sequential(BayesLinear(2, 2)), input_shape=(2,), likelihood=name).likelihood == name
    with pytest.raises(ConfigError, match="^unknown likelihood 'poisson': choose one of categorical, bernoulli, normal$"):
        BayesianNet(nn.Sequential(BayesLinear(2, 1)), input_shape=(2,), likelihood="poisson")


def test_normal_likelihood_observes_regression_targets():
    net = BayesianNet(nn.Sequential(BayesLinear(3, 1)), input_shape=(3,), likelihood="normal", noise_scale=0.5)
    x, y = torch.randn(4, 3), torch.randn(4)
    site = poutine.trace(net.model).get_trace(x, y, 4).nodes["y"]
    assert site["value"] is y and torch.all(site["fn"].scale == 0.5) and site["fn"].loc.shape == (4,)


def test_normal_likelihood_of_several_outputs_sums_their_log_densities():
    """Two predictions per example: the site is one event of two independent normals per example, its log density
    the sum of the closed-form N(y; f(x), s^2) terms; a target of shape (N, 1) for one output is the same as (N,)."""
    torch.manual_seed(0)
    net = BayesianNet(nn.Sequential(BayesLinear(3, 2)), input_shape=(3,), likelihood="normal", noise_scale=0.5)
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    trace = poutine.trace(net.model).get_trace(x, y, 4)
    out, site = trace.nodes["_RETURN"]["value"], trace.nodes["y"]
    by_hand = (-0.5 * ((y - out) / 0.5) ** 2 - math.log(0.5) - 0.5 * math.log(2 * math.pi)).sum(1)
    torch.testing.assert_close(site["fn"].log_prob(site["value"]), by_hand)
    single = BayesianNet(nn.Sequential(BayesLinear(3, 1)), input_shape=(3,), likelihood="normal")
    column = poutine.trace(single.model).get_trace(x, y[:, :1], 4).nodes["y"]
    assert column["value"].shape == (4,) and column["fn"].event_shape == ()


def test_categorical_likelihood_of_a_label_per_position_sums_the_positions_log_probabilities():
    """A tagger's logits (N, T, C), a label per position: one event per example, its log probability the sum over
    the positions of log softmax (F.cross_entropy, by hand), scaled by n_data / N; without labels the model draws
    one label per position."""
    torch.manual_seed(0)
    net = BayesianNet(nn.Sequential(BayesLinear(3, 4)), input_shape=(5, 3))
    x, y = torch.randn(2, 5, 3), torch.randint(0, 4, (2, 5))
    trace = poutine.trace(net.model).get_trace(x, y, 8)
    out, site = trace.nodes["_RETURN"]["value"], trace.nodes["y"]
    by_hand = -F.cross_entropy(out.reshape(-1, 4), y.reshape(-1), reduction="none").reshape(2, 5).sum(1)
    torch.testing.assert_close(site["fn"].log_prob(y), by_hand)
    assert site["scale"] == pytest.approx(4.0)
    assert poutine.trace(net.model).get_trace(x).nodes["y"]["value"].shape == (2, 5)
    # a label -100 (PyTorch's ignore_index: padding) labels nothing: its position leaves the sum
    y[0, 3:] = -100
    trace = poutine.trace(net.model).get_trace(x, y, 8)
    out, site = trace.nodes["_RETURN"]["value"], trace.nodes["y"]
    by_hand = -F.cross_entropy(out.transpose(1, 2), y, reduction="none").sum(1)  # zero at ignored positions
    torch.testing.assert_close(site["fn"].log_prob(site["value"]), by_hand)


def test_bernoulli_likelihood_sums_each_labels_log_probability():
    """Logits of three binary labels per example: one event per example, its log probability the sum of
    ``y log sigmoid(l) + (1 - y) log(1 - sigmoid(l))`` (F.binary_cross_entropy_with_logits, by hand); one logit per
    example takes labels of shape (N,)."""
    torch.manual_seed(0)
    net = BayesianNet(nn.Sequential(BayesLinear(4, 3)), input_shape=(4,), likelihood="bernoulli")
    x, y = torch.randn(5, 4), torch.randint(0, 2, (5, 3))
    trace = poutine.trace(net.model).get_trace(x, y, 5)
    out, site = trace.nodes["_RETURN"]["value"], trace.nodes["y"]
    by_hand = -F.binary_cross_entropy_with_logits(out, y.float(), reduction="none").sum(1)
    torch.testing.assert_close(site["fn"].log_prob(site["value"]), by_hand)
    single = BayesianNet(nn.Sequential(BayesLinear(4, 1)), input_shape=(4,), likelihood="bernoulli")
    trace = poutine.trace(single.model).get_trace(x, y[:, 0], 5)
    out, site = trace.nodes["_RETURN"]["value"], trace.nodes["y"]
    torch.testing.assert_close(site["fn"].log_prob(site["value"]),
                               -F.binary_cross_entropy_with_logits(out[:, 0], y[:, 0].float(), reduction="none"))
