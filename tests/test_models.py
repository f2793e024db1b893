"""The model registry (models.build_network): built-in networks with every prior, and user network files."""

import runpy

import pyro
import pytest
import torch

from models import BUILTIN_MODELS, build_network
from pyro_bc.errors import ConfigError
from pyro_bc.network import BayesianNet
from pyro_bc.nn import BayesConv2d, BayesLinear
from pyro_bc.priors import PRIORS, GroupHorseshoe

LAYOUT = {  # layer names, kinds, groups per layer, weights in all
    "lenet300": (["fc1", "fc2", "fc3"], [BayesLinear] * 3, [784, 300, 100], 266_200),
    "lenet5": (["conv1", "conv2", "fc1", "fc2"], [BayesConv2d, BayesConv2d, BayesLinear, BayesLinear],
               [20, 50, 800, 500], 430_500),
}


@pytest.fixture(autouse=True)
def _seed():
    pyro.set_rng_seed(0)


@pytest.mark.parametrize("prior", list(PRIORS))
@pytest.mark.parametrize("model", BUILTIN_MODELS)
def test_builtin_networks_with_every_prior(model, prior):
    torch.manual_seed(0)
    net = build_network(model, prior, tau0=2e-4, slab_scale=3.0)
    names, kinds, groups, weights = LAYOUT[model]
    assert isinstance(net, BayesianNet) and net.input_shape == (1, 28, 28)
    assert net.layer_names == names
    assert [type(layer) for layer in net.layers] == kinds
    assert [layer.n_groups for layer in net.layers] == groups
    assert sum(layer.weight_mu.numel() for layer in net.layers) == weights
    assert all(type(layer.prior) is PRIORS[prior] for layer in net.layers)
    assert [layer.prior.n_groups for layer in net.layers] == groups
    expected = {"gnj": {}, "lu": {}, "ghs": {"tau0": 2e-4}, "rhs": {"tau0": 2e-4, "slab_scale": 3.0}}[prior]
    assert all(layer.prior.options() == expected for layer in net.layers)
    with torch.no_grad():
        assert net.posterior_mean_network()(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_lenet300_clips_fc1_variances_only():
    net = build_network("lenet300")
    assert [layer.clip_var for layer in net.layers] == [0.04, None, None]


def test_a_prior_object_is_used_as_the_template():
    template = GroupHorseshoe(tau0=7e-4)
    net = build_network("lenet5", template, tau0=1.0)  # options go with names, not objects
    assert all(layer.prior.tau0 == 7e-4 and layer.prior is not template for layer in net.layers)
    assert list(template.parameters()) == []


def _write(tmp_path, text: str) -> str:
    path = tmp_path / "net.py"
    path.write_text(text)
    return str(path)


USER_NET = """
from torch import nn
from pyro_bc.network import BayesianNet
from pyro_bc.nn import BayesLinear

def build(prior):
    return BayesianNet(nn.Sequential(nn.Flatten(), BayesLinear(784, 10, prior)), input_shape=(1, 28, 28))
"""


@pytest.mark.parametrize("prior", list(PRIORS))
def test_a_user_network_file(tmp_path, prior):
    net = build_network(_write(tmp_path, USER_NET), prior, tau0=1e-3)
    assert net.layer_names == ["1"] and type(net.layers[0].prior) is PRIORS[prior]


PLAIN_NET = """
import torch
from torch import nn

def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, 10))
"""


def test_a_user_file_returning_a_plain_network_is_converted(tmp_path):
    path = _write(tmp_path, PLAIN_NET)
    net = build_network(path, "ghs", tau0=1e-3)
    assert net.layer_names == ["1", "3"] and type(net.layers[0].prior) is PRIORS["ghs"]
    dense = runpy.run_path(path)["build"]()  # the same plain network, built here
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(net.posterior_mean_network()(x), dense(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("text, match", [
    ("def build(prior):\n    return 42\n", "build\\(\\) returned int, not a torch module or a BayesianNet"),
    ("def build():\n    import torch\n    return torch.nn.ReLU()\n", "holds no nn.Linear or nn.Conv2d"),
    ("x = 1\n", "defines no build\\(prior\\) function"),
    ("build = 3\n", "defines no build\\(prior\\) function"),
    ("raise ValueError('boom')\n", "failed to import: ValueError: boom"),
    ("def build(:\n", "failed to import: SyntaxError"),
])
def test_a_user_file_that_does_not_build_a_network(tmp_path, text, match):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=match) as info:
        build_network(path)
    assert "\n" not in str(info.value) and path in str(info.value)


def test_unknown_models_and_priors(tmp_path):
    with pytest.raises(ConfigError, match="model file .*missing.py does not exist"):
        build_network(str(tmp_path / "missing.py"))
    with pytest.raises(ConfigError, match="unknown model 'vgg': choose lenet300, lenet5 or a path"):
        build_network("vgg")
    with pytest.raises(ConfigError, match="unknown prior 'bogus'"):
        build_network("lenet300", "bogus")
