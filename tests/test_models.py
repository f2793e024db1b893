"""The model registry (models.build_network): built-in networks with every prior, and user network files."""

import math
import runpy

import pyro
import pytest
import torch

import models.resnet
import models.vgg
from models import BUILTIN_MODELS, build_network
from pyro_bc.errors import ConfigError
from pyro_bc.infer.reparam import LocalReparameterization
from pyro_bc.nn.layers import BayesConv2d, BayesLinear
from pyro_bc.nn.network import BayesianNet
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
@pytest.mark.parametrize("model", list(LAYOUT))
def test_builtin_networks_with_every_prior(model, prior):
    torch.manual_seed(0)
    options = {"gnj": {}, "lu": {}, "ghs": {"tau0": 2e-4}, "rhs": {"tau0": 2e-4, "slab_scale": 3.0}}[prior]
    net = build_network(model, prior, **options)
    names, kinds, groups, weights = LAYOUT[model]
    assert isinstance(net, BayesianNet) and net.input_shape == (1, 28, 28)
    assert net.layer_names == names
    assert [type(layer) for layer in net.layers] == kinds
    assert [layer.n_groups for layer in net.layers] == groups
    assert sum(layer.weight_mu.numel() for layer in net.layers) == weights
    assert all(type(layer.prior) is PRIORS[prior] for layer in net.layers)
    assert [layer.prior.n_groups for layer in net.layers] == groups
    assert all(layer.prior.options() == options for layer in net.layers)
    with torch.no_grad():
        assert net.posterior_mean_network()(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_lenet300_clips_fc1_variances_only():
    net = build_network("lenet300")
    assert [layer.clip_var for layer in net.layers] == [0.04, None, None]


def test_a_prior_object_is_used_as_the_template():
    template = GroupHorseshoe(tau0=7e-4)
    net = build_network("lenet5", template)
    assert all(layer.prior.tau0 == 7e-4 and layer.prior is not template for layer in net.layers)
    assert list(template.parameters()) == []
    with pytest.raises(ConfigError, match="^options tau0 given with a GroupHorseshoe object: set them on the object$"):
        build_network("lenet5", template, tau0=1.0)  # options go with names, not objects


def _write(tmp_path, text: str) -> str:
    path = tmp_path / "net.py"
    path.write_text(text)
    return str(path)


USER_NET = """
from torch import nn
from pyro_bc.nn.network import BayesianNet
from pyro_bc.nn.layers import BayesLinear

def build(prior):
    return BayesianNet(nn.Sequential(nn.Flatten(), BayesLinear(784, 10, prior)), input_shape=(1, 28, 28))
"""


@pytest.mark.parametrize("prior", list(PRIORS))
def test_a_user_network_file(tmp_path, prior):
    net = build_network(_write(tmp_path, USER_NET), prior, **({"tau0": 1e-3} if prior in ("ghs", "rhs") else {}))
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
    ("def build():\n    import torch\n    return torch.nn.ReLU()\n", "holds no nn.Linear, nn.Conv1d or nn.Conv2d"),
    ("def build():\n    return 1 / 0\n", "build\\(\\) failed: ZeroDivisionError: division by zero"),
    ("x = 1\n", "defines no build\\(\\) function"),
    ("build = 3\n", "defines no build\\(\\) function"),
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
    with pytest.raises(ConfigError, match="unknown model 'vgg16': choose lenet300, lenet5, vgg, resnet20 or a path"):
        build_network("vgg16")
    with pytest.raises(ConfigError, match="unknown prior 'bogus'"):
        build_network("lenet300", "bogus")


# -- VGG and ResNet-20 ---------------------------------------------------------------------------------

CNN_LAYERS = {models.vgg.build: 13 + 2, models.resnet.build: 1 + 9 * 2 + 2 + 1}  # convolutions, projections, FC


def test_the_cnns_are_builtin_and_take_the_input_shape_from_the_data():
    assert {"vgg", "resnet20"} <= set(BUILTIN_MODELS)
    assert build_network("vgg", input_shape=(1, 28, 28)).input_shape == (1, 28, 28)
    assert build_network("resnet20").input_shape == (3, 32, 32)
    assert build_network("lenet5", input_shape=(3, 32, 32)).input_shape == (1, 28, 28)  # fixed: training checks it


def test_width_is_a_channel_multiplier_of_the_cnns_only():
    assert build_network("vgg", width=0.25).layers[0].weight_mu.shape[0] == 16
    assert build_network("resnet20", width=0.5).layers[0].weight_mu.shape[0] == 8
    with pytest.raises(ConfigError, match="model lenet5 takes no width"):
        build_network("lenet5", width=0.5)
    with pytest.raises(ConfigError, match="width must be a positive number"):
        build_network("vgg", width=float("nan"))


def test_full_width_sizes():
    vgg, resnet = build_network("vgg"), build_network("resnet20")
    assert [layer.weight_mu.shape[0] for layer in vgg.layers] == [64, 64, 128, 128, 256, 256, 256] + [512] * 7 + [10]
    assert 0.26e6 < sum(layer.weight_mu.numel() for layer in resnet.layers) < 0.28e6
    projections = [layer.site for layer in resnet.layers if layer.weight_mu.shape[-1] == 1]
    assert projections == ["blocks.3.shortcut.0", "blocks.6.shortcut.0"]
    assert [layer.conv_args[0] for layer in resnet.layers if layer.site.endswith("shortcut.0")] == [2, 2]


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28)])
@pytest.mark.parametrize("prior", list(PRIORS))
@pytest.mark.parametrize("build", list(CNN_LAYERS))
def test_cnns_forward_and_one_svi_step(build, prior, shape):
    torch.manual_seed(0)
    net = build(prior, width=0.25, input_shape=shape, **({"tau0": 1e-3} if prior in ("ghs", "rhs") else {}))
    assert len(net.layers) == CNN_LAYERS[build] and net.input_shape == shape
    x, y = torch.randn(4, *shape), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        assert net.posterior_mean_network()(x).shape == (4, 10)
    svi = pyro.infer.SVI(net.model, net.guide, pyro.optim.Adam({"lr": 1e-3}), pyro.infer.TraceMeanField_ELBO())
    with LocalReparameterization():
        loss = svi.step(x, y, 100)
    assert math.isfinite(loss)
    assert all(torch.isfinite(p).all() for p in net.parameters())
