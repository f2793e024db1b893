"""Evaluation helpers (pyro_bc.metrics.evaluate): the error each likelihood measures and groups below a log alpha
cut."""

import math
from collections import OrderedDict

import pyro
import pytest
import torch
from torch import nn

from pyro_bc.defaults import KEPT_LOG_ALPHA
from pyro_bc.metrics.evaluate import error, error_percent, groups_below
from pyro_bc.nn.layers import BayesConv2d, BayesLinear
from pyro_bc.nn.likelihoods import BernoulliLikelihood, NormalLikelihood
from pyro_bc.nn.network import BayesianNet
from pyro_bc.priors import make_prior


@pytest.fixture(autouse=True)
def _seed():
    pyro.set_rng_seed(0)


def _selector() -> nn.Linear:
    """A module whose argmax is the index of the largest input feature (the identity map)."""
    layer = nn.Linear(3, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(3))
        layer.bias.zero_()
    return layer


@pytest.mark.parametrize("batch_size", [1, 3, 1000])
def test_error_percent_counts_wrong_argmaxes(batch_size):
    x = torch.eye(3)[[0, 1, 2, 0, 1, 2, 0]]  # argmax 0 1 2 0 1 2 0
    y = torch.tensor([0, 1, 2, 1, 1, 0, 0])  # two wrong of seven
    assert error_percent(_selector(), x, y, batch_size=batch_size) == pytest.approx(200 / 7)
    assert error_percent(_selector(), x, x.argmax(-1), batch_size=batch_size) == 0.0
    assert error_percent(_selector(), x, (x.argmax(-1) + 1) % 3, batch_size=batch_size) == 100.0


def test_error_percent_of_no_examples_is_zero():
    assert error_percent(_selector(), torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)) == 0.0


@pytest.mark.parametrize("batch_size", [1, 2, 1000])
def test_error_of_binary_labels_and_of_regression_targets_over_batches(batch_size):
    """Hand-worked: logits -2, 0.5, 3 against labels 0, 0, 1 get one of three wrong (a positive logit predicts 1);
    predictions 1, 2, 3 against targets 1, 0, 7 have RMSE sqrt((0 + 4 + 16) / 3), whatever the batches."""
    outputs = torch.tensor([[-2.0], [0.5], [3.0]])
    assert error(nn.Identity(), outputs, torch.tensor([0, 0, 1]), BernoulliLikelihood(),
                 batch_size) == pytest.approx(100 / 3)
    assert error(nn.Identity(), torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([1.0, 0.0, 7.0]),
                 NormalLikelihood(), batch_size) == pytest.approx(math.sqrt(20 / 3))


def _net(prior: str) -> BayesianNet:
    p = make_prior(prior)
    body = nn.Sequential(OrderedDict(conv=BayesConv2d(1, 4, 3, prior=p), flat=nn.Flatten(),
                                     fc=BayesLinear(4 * 4 * 4, 2, p)))
    return BayesianNet(body, input_shape=(1, 6, 6))


def test_groups_below_counts_hand_set_group_log_alphas():
    net = _net("gnj")
    with torch.no_grad():  # gnj: log alpha = log sigma_z^2 - log(mu_z^2 + 1e-8); mu_z = 1 gives log sigma_z^2
        for layer in net.layers:
            layer.prior.z_mu.fill_(1.0)
        net.body.conv.prior.z_logvar.copy_(torch.tensor([-5.0, -3.5, -2.5, 1.0]))
        net.body.fc.prior.z_logvar.copy_(torch.linspace(-10.0, 2.6, 64))  # steps of 0.2: 35 below -3.1
    assert groups_below(net) == {"conv": 2, "fc": 36}  # default cut KEPT_LOG_ALPHA = -3
    assert KEPT_LOG_ALPHA == -3.0
    assert groups_below(net, threshold=0.0) == {"conv": 3, "fc": 51}
    assert groups_below(net, threshold=-math.inf) == {"conv": 0, "fc": 0}


def test_groups_below_counts_weights_for_the_per_weight_prior():
    net = _net("lu")
    with torch.no_grad():
        for layer in net.layers:
            layer.weight_mu.fill_(1.0)
            layer.weight_logvar.fill_(0.0)  # log alpha 0: above -3
        net.body.conv.weight_logvar[:2].fill_(-6.0)  # two filters of 9 weights
        net.body.fc.weight_logvar[0, :5] = -4.0
    assert groups_below(net) == {"conv": 18, "fc": 5}
