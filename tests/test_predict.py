"""The posterior predictive (pyro_bc.metrics.predict): local-reparameterisation draws against explicit weight
sampling (Monte Carlo, seeded, compared within standard errors), the posterior mean, seeding, sources."""

from collections import OrderedDict

import pyro
import pytest
import torch
from pyro import poutine
from torch import nn

import pyro_bc
from pyro_bc.errors import ConfigError
from pyro_bc.metrics.predict import predictive
from pyro_bc.nn.layers import BayesLinear
from pyro_bc.nn.network import BayesianNet
from pyro_bc.priors import make_prior


def _mlp(prior: str, logvar: float = -1.5) -> BayesianNet:
    """A 6-5-3 network with wide posteriors (weight log-variance ``logvar``; group scales' log-variance -2), so
    that the predictive differs clearly from the posterior-mean network's probabilities."""
    torch.manual_seed(1)
    p = make_prior(prior)
    net = BayesianNet(nn.Sequential(OrderedDict(fc1=BayesLinear(6, 5, p), act=nn.ReLU(), fc2=BayesLinear(5, 3, p))),
                      input_shape=(6,))
    with torch.no_grad():
        for layer in net.layers:
            layer.weight_mu.mul_(3.0)
            layer.weight_logvar.fill_(logvar)
            layer.bias_logvar.fill_(logvar)
            for name, value in layer.prior.named_parameters():
                if "logvar" in name or "log_var" in name:
                    value.fill_(-2.0)
    return net.eval()


def _explicit_draws(net: BayesianNet, x: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` draws ``[n, N, classes]`` of softmax(f(x; w)) with the weights (and scales) sampled from the guide and
    shared by the batch: no local reparameterisation."""
    out = []
    with torch.no_grad(), pyro.get_param_store().scope():
        for _ in range(n):
            trace = poutine.trace(net.guide).get_trace()
            out.append(torch.softmax(poutine.replay(net.body, trace=trace)(x), -1))
    return torch.stack(out)


@pytest.mark.parametrize("prior", ["gnj", "ghs"])
def test_sampled_predictive_matches_explicit_weight_sampling(prior):
    net = _mlp(prior)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(3)
    explicit = _explicit_draws(net, x, 3000)
    e_mean, e_se = explicit.mean(0), explicit.std(0) / len(explicit) ** 0.5
    # 600 copies of each example in one batch: per-example noise makes the rows independent, each the mean of 5 draws
    rows = predictive(net, x.repeat_interleave(600, 0), samples=5, seed=4).reshape(4, 600, 3)
    l_mean, l_se = rows.mean(1), rows.std(1) / 600 ** 0.5
    z = (l_mean - e_mean) / (l_se**2 + e_se**2).sqrt()
    assert z.abs().max() < 4.5, z  # 12 comparisons: a false alarm has probability about 1e-4
    assert float(l_se.max()) < 0.01  # the check has power: standard errors below a percentage point ...
    deterministic = predictive(net, x, samples=0)
    assert ((deterministic - e_mean).abs() / e_se).max() > 10  # ... which tells the predictive from the mean net


def test_tiny_variances_give_the_posterior_mean_network():
    net = _mlp("gnj", logvar=-40.0)
    with torch.no_grad():
        for layer in net.layers:
            layer.prior.z_logvar.fill_(-40.0)
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the posterior mean by hand: E[z] mu_W applied to the inputs
        h = torch.relu(x @ (net.body.fc1.weight_mu * net.body.fc1.prior.z_mu).T + net.body.fc1.bias_mu)
        by_hand = torch.softmax(h @ (net.body.fc2.weight_mu * net.body.fc2.prior.z_mu).T + net.body.fc2.bias_mu, -1)
    torch.testing.assert_close(predictive(net, x, samples=0), by_hand, atol=1e-6, rtol=0)
    torch.testing.assert_close(predictive(net, x, samples=3, batch_size=7), by_hand, atol=1e-5, rtol=0)


def test_seeded_batched_and_leaves_global_state_alone():
    net = _mlp("gnj")
    x = torch.randn(30, 6, generator=torch.Generator().manual_seed(0))
    pyro.clear_param_store()
    pyro.param("mine", torch.ones(2))
    state = torch.get_rng_state()
    a = predictive(net, x, samples=4, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert list(pyro.get_param_store().keys()) == ["mine"]
    assert torch.equal(a, predictive(net, x, samples=4, seed=7))
    assert not torch.equal(a, predictive(net, x, samples=4, seed=8))
    assert a.shape == (30, 3)
    torch.testing.assert_close(a.sum(-1), torch.ones(30))
    assert net.training is False
    net.train()
    predictive(net, x, samples=1)
    assert net.training is True


def test_run_directory_and_package_export(run):
    from pyro_bc.runs import load

    net = load.load_run(run)[0]
    x = torch.rand(20, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert pyro_bc.predictive is load.predictive
    torch.testing.assert_close(pyro_bc.predictive(run, x, samples=0), predictive(net, x, samples=0))
    torch.testing.assert_close(pyro_bc.predictive(str(run), x, samples=2, seed=1), predictive(net, x, samples=2, seed=1))


@pytest.mark.parametrize("options, message", [
    ({"samples": -1}, "samples must be a whole number >= 0"),
    ({"samples": 2.5}, "samples must be a whole number >= 0"),
    ({"batch_size": 0}, "batch_size must be a whole number >= 1"),
])
def test_bad_options_raise_one_line(options, message):
    with pytest.raises(ConfigError, match=message):
        predictive(_mlp("gnj"), torch.zeros(2, 6), **options)


def test_numpy_inputs_predict_as_tensors_and_a_missing_batch_dimension_is_one_line():
    net, x = _mlp("gnj"), torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(predictive(net, x.double().numpy(), samples=3), predictive(net, x, samples=3))
    with pytest.raises(ConfigError, match=r"^examples have shape \(\), the network expects \(6,\) \(one example\? "
                                          r"give x\[None\]\)$"):
        predictive(net, x[0])
    with pytest.raises(ConfigError, match=r"^examples have shape \(5,\), the network expects \(6,\)$"):
        predictive(net, x[:, :5])


def test_bad_source_raises_one_line(tmp_path):
    with pytest.raises(ConfigError, match="neither a run directory nor a .bcz file"):
        pyro_bc.predictive(tmp_path / "missing", torch.zeros(2, 6))
    with pytest.raises(ConfigError, match="^predictive needs a torch module, got PosixPath"):
        predictive(tmp_path / "missing", torch.zeros(2, 6))
