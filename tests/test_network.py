"""BayesianNet (pyro_bc.nn.network): site names and order, Pyro's tools on the model, parameters in Pyro's param store,
the posterior-mean network and initialisation from a deterministic network."""

import math
import warnings
from collections import OrderedDict

import pyro
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer import SVI, TraceMeanField_ELBO
from pyro.poutine.util import prune_subsample_sites
from torch import nn

from pyro_bc.errors import ConfigError
from pyro_bc.infer.elbo import MeanFieldELBO
from pyro_bc.infer.reparam import LocalReparameterization
from pyro_bc.nn.layers import BayesConv2d, BayesLinear
from pyro_bc.nn.network import BayesianNet
from pyro_bc.priors import known_options, make_prior

PRIORS = ["gnj", "ghs", "lu", "rhs"]
SCALE_SITES = {"gnj": ["z"], "ghs": ["s_a", "s_b", "z_a", "z_b"], "rhs": ["s_a", "s_b", "z_a", "z_b"], "lu": []}


@pytest.fixture(autouse=True)
def _clean_param_store():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)  # every test seeded; those that draw seed again where it matters
    yield
    pyro.clear_param_store()


def _net(prior: str, seed: int = 0) -> BayesianNet:
    torch.manual_seed(seed)
    p = make_prior(prior, **known_options(prior, {"tau0": 1e-2}))
    body = nn.Sequential(OrderedDict(conv=BayesConv2d(1, 3, 3, prior=p), relu=nn.ReLU(), flat=nn.Flatten(),
                                     fc=BayesLinear(3 * 4 * 4, 5, p)))
    return BayesianNet(body, input_shape=(1, 6, 6))


def _data(n: int = 7):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 6, 6, generator=gen), torch.randint(0, 5, (n,), generator=gen)


def _sample_sites(trace) -> list[str]:
    return [name for name, site in prune_subsample_sites(trace).nodes.items() if site["type"] == "sample"]


@pytest.mark.parametrize("prior", PRIORS)
def test_model_and_guide_sites_in_order(prior):
    net = _net(prior)
    x, y = _data()
    latent = [f"{layer}.{s}" for layer in ("conv", "fc") for s in [*SCALE_SITES[prior], "w", "b"]]
    model = poutine.trace(net.model).get_trace(x, y, 70)
    assert _sample_sites(model) == [*latent, "y"]
    assert model.nodes["y"]["is_observed"] and model.nodes["y"]["scale"] == pytest.approx(10.0)  # 70 / 7
    guide = poutine.trace(net.guide).get_trace(x, y, 70)
    assert _sample_sites(guide) == latent
    assert net.layer_names == ["conv", "fc"]


@pytest.mark.parametrize("prior", PRIORS)
def test_pyro_inspection_and_predictive_run_on_the_model(prior):
    net = _net(prior)
    x, y = _data()
    relations = pyro.infer.inspect.get_model_relations(net.model, model_args=(x, y, 70))
    latent = [f"{layer}.{s}" for layer in ("conv", "fc") for s in [*SCALE_SITES[prior], "w", "b"]]
    assert relations["sample_sample"]["y"] == latent
    spec = pyro.infer.inspect.generate_graph_specification(relations)
    assert set(spec["node_data"]) == {*latent, "y"}
    pyro.set_rng_seed(2)
    samples = pyro.infer.Predictive(net.model, guide=net.guide, num_samples=3)(x)
    assert samples["y"].shape == (3, 7) and samples["y"].min() >= 0 and samples["y"].max() < 5
    assert samples["fc.w"].shape[0] == 3 and samples["fc.w"].shape[-2:] == (5, 48)
    assert samples["conv.w"].shape[-4:] == (3, 1, 3, 3)


def test_render_model_runs():
    pytest.importorskip("graphviz", reason="pyro.render_model needs the graphviz package (not a dependency)")
    x, y = _data()
    graph = pyro.render_model(_net("ghs").model, model_args=(x, y, 70))
    assert "fc.z_a" in graph.source


def test_register_params_puts_every_parameter_in_the_store_by_name():
    net = _net("ghs")
    net.guide()
    store = pyro.get_param_store()
    names = {f"bc$$${name}" for name, _ in net.named_parameters()}
    assert set(store.keys()) == names and "bc$$$body.fc.prior.za_mu" in names
    for name, param in net.named_parameters():
        assert store.get_param(f"bc$$${name}") is param


def test_register_params_replaces_a_stale_entry_of_another_network():
    a, b = _net("gnj", seed=0), _net("gnj", seed=1)
    a.guide()
    b.guide()  # same layout, same names: the store must now hold b's tensors
    store = pyro.get_param_store()
    for name, param in b.named_parameters():
        assert store.get_param(f"bc$$${name}") is param
    # and Pyro's SVI then trains b, not a
    x, y = _data()
    a_before = {k: v.detach().clone() for k, v in a.state_dict().items()}
    b_before = b.body.fc.weight_mu.detach().clone()
    svi = SVI(b.model, b.guide, pyro.optim.Adam({"lr": 0.01}), TraceMeanField_ELBO())
    with LocalReparameterization():
        svi.step(x, y, 70)
    assert not torch.equal(b.body.fc.weight_mu, b_before)
    assert all(torch.equal(a.state_dict()[k], v) for k, v in a_before.items())


@pytest.mark.parametrize("elbo, validate", [
    (TraceMeanField_ELBO, True), (TraceMeanField_ELBO, False), (MeanFieldELBO, True),
    (MeanFieldELBO, False),
])
@pytest.mark.parametrize("prior", PRIORS)
def test_pyro_svi_trains_the_network(prior, elbo, validate):
    """Pyro's own SVI and optimiser, one local-reparameterisation handler per step. Pyro's validation is set
    either way explicitly: pyro_bc.runs.training.train turns it off for the rest of the process."""
    pyro.set_rng_seed(3)
    net = _net(prior)
    x, y = _data(32)
    svi = SVI(net.model, net.guide, pyro.optim.Adam({"lr": 0.01}), elbo())
    before = {k: v.detach().clone() for k, v in net.named_parameters()}
    with pyro.validation_enabled(validate):
        for _ in range(3):
            with LocalReparameterization():
                loss = svi.step(x, y, 320)
    assert math.isfinite(loss)
    assert all(not torch.equal(p, before[k]) for k, p in net.named_parameters()), "a parameter was not trained"


@pytest.mark.parametrize("prior", ["gnj", "ghs"])
def test_one_handler_over_several_guide_runs(prior):
    """Two SVI steps under one handler, and two particles, give what one handler per guide run gives."""
    x, y = _data(16)

    def run(one_handler: bool, particles: int) -> list[torch.Tensor]:
        pyro.set_rng_seed(4)
        net = _net(prior)
        svi = SVI(net.model, net.guide, pyro.optim.Adam({"lr": 0.01}), TraceMeanField_ELBO(num_particles=particles))
        with pyro.validation_enabled(True):
            if one_handler:
                with LocalReparameterization():
                    for _ in range(2):
                        svi.step(x, y, 160)
            else:
                for _ in range(2):
                    with LocalReparameterization():
                        svi.step(x, y, 160)
        return [p.detach().clone() for p in net.parameters()]

    for a, b in zip(run(True, 1), run(False, 1)):
        torch.testing.assert_close(a, b)
    for p in run(True, 2):  # two guide runs per step under one handler
        assert torch.isfinite(p).all()


def _expected_scale(prior: str, layer) -> torch.Tensor | None:
    """E[z] from the guide parameters, computed here: gnj mu_z; ghs exp(m + v/2) of log z ~ N(m, v)."""
    p = layer.prior
    if prior == "gnj":
        return p.z_mu
    if prior == "ghs":
        m = 0.5 * (p.sa_mu + p.sb_mu + p.za_mu + p.zb_mu)
        v = 0.25 * (p.sa_logvar.exp() + p.sb_logvar.exp() + p.za_logvar.exp() + p.zb_logvar.exp())
        return torch.exp(m + v / 2)
    if prior == "rhs":
        return p.scale_moments()[0]  # Gauss-Hermite, checked against Monte Carlo in tests/test_priors.py
    return None


@pytest.mark.parametrize("prior", PRIORS)
def test_posterior_mean_network_is_the_body_run_with_expected_weights(prior):
    net = _net(prior)
    with torch.no_grad():  # guide parameters away from their initial values
        gen = torch.Generator().manual_seed(5)
        for p in net.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    x, _ = _data()
    conv, fc = net.body.conv, net.body.fc
    ez_conv, ez_fc = _expected_scale(prior, conv), _expected_scale(prior, fc)
    with torch.no_grad():
        if ez_conv is None:
            h = F.conv2d(x, conv.weight_mu, conv.bias_mu)
            out = F.linear(F.relu(h).flatten(1), fc.weight_mu, fc.bias_mu)
        else:  # conv: z scales output channels, bias included; linear: z scales inputs, bias unscaled
            h = F.conv2d(x, conv.weight_mu * ez_conv[:, None, None, None], conv.bias_mu * ez_conv)
            out = F.linear(F.relu(h).flatten(1), fc.weight_mu * ez_fc[None, :], fc.bias_mu)
        mean_net = net.posterior_mean_network()
        assert not mean_net.training
        assert isinstance(mean_net[0], nn.Conv2d) and isinstance(mean_net[3], nn.Linear)
        torch.testing.assert_close(mean_net(x), out, rtol=1e-5, atol=1e-5)


def test_init_from_a_deterministic_state_matches_names_first():
    torch.manual_seed(5)
    dense = nn.Sequential(OrderedDict(conv=nn.Conv2d(1, 3, 3), relu=nn.ReLU(), flatten=nn.Flatten(),
                                      fc=nn.Linear(48, 5)))
    net = _net("gnj")
    # keys in the opposite order to the layers: names, not order, decide
    state = OrderedDict(reversed(list(dense.state_dict().items())))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matched by name: no warning
        net.init_from(state)
    mean = net.posterior_mean_network()  # E[z] mu = the dense weights: the same function
    for name in ("conv.weight", "conv.bias", "fc.weight", "fc.bias"):
        torch.testing.assert_close(mean.get_parameter(name), dense.get_parameter(name), msg=name)
    x = torch.randn(4, 1, 6, 6)
    torch.testing.assert_close(mean(x), dense(x))
    before = net.body.fc.bias_mu.clone()
    net.init_from({k: v + 1 for k, v in state.items() if k != "fc.bias"})  # a missing bias leaves the mean alone
    assert torch.equal(net.body.fc.bias_mu, before)
    with pytest.raises(ConfigError, match=r"conv.weight of shape \(3, 1, 5, 5\) does not fit conv.weight_mu of shape"):
        net.init_from({"conv.weight": torch.zeros(3, 1, 5, 5), "fc.weight": torch.zeros(5, 48)})


def test_init_from_falls_back_to_order_with_a_warning():
    torch.manual_seed(5)
    dense = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 5))  # keys 0.weight, 3.weight
    net = _net("gnj")
    with pytest.warns(UserWarning, match="matched in order"):
        net.init_from(dense.state_dict())
    mean = net.posterior_mean_network()
    torch.testing.assert_close(mean.conv.weight, dense[0].weight)
    torch.testing.assert_close(mean.fc.bias, dense[3].bias)
    with pytest.raises(ConfigError, match="1 weight tensors and names that do not match"):
        net.init_from({"a.weight": torch.zeros(5, 48)})
    with pytest.raises(ConfigError, match=r"a.weight of shape \(3, 1, 5, 5\) does not fit conv.weight_mu"), \
            pytest.warns(UserWarning):
        net.init_from({"a.weight": torch.zeros(3, 1, 5, 5), "b.weight": torch.zeros(5, 48)})
    with pytest.raises(ConfigError, match=r"a.bias of shape \(4,\) does not fit conv.bias_mu of shape \(3,\)"), \
            pytest.warns(UserWarning):
        net.init_from({"a.weight": torch.zeros(3, 1, 3, 3), "a.bias": torch.zeros(4), "b.weight": torch.zeros(5, 48)})


def test_bad_networks_are_config_errors():
    with pytest.raises(ConfigError, match="no pyro_bc Bayesian layer"):
        BayesianNet(nn.Sequential(nn.Linear(2, 2)), input_shape=(2,))
    with pytest.raises(ConfigError, match="unknown likelihood 'poisson'"):
        BayesianNet(nn.Sequential(BayesLinear(2, 1)), input_shape=(2,), likelihood="poisson")


class _Viewed(nn.Module):
    """A convolution then ``x.view(len(x), -1)``: torch's default layout is contiguous, so this forward only runs
    where the convolution's output is."""

    def __init__(self, flatten_by_view: bool):
        super().__init__()
        self.conv, self.fc, self.by_view = BayesConv2d(2, 3, 3, padding=1), BayesLinear(3 * 5 * 5, 2), flatten_by_view

    def forward(self, x):
        h = torch.relu(self.conv(x))
        return self.fc(h.view(h.size(0), -1) if self.by_view else torch.flatten(h, 1))


@pytest.mark.parametrize("by_view", [False, True])
def test_the_convolutions_layout_is_the_one_the_forward_runs_on(by_view):
    """Channels-last outputs where the forward takes them (faster); the default layout where it needs it (a .view):
    then training and the posterior-mean network run, with the values of the channels-last network."""
    torch.manual_seed(0)
    net = BayesianNet(_Viewed(by_view), input_shape=(2, 5, 5))
    assert [layer.contiguous_output for layer in net.layers] == [by_view, by_view]
    x = torch.randn(4, 2, 5, 5)
    with torch.no_grad():
        out = net.posterior_mean_network()(x)
    expected = BayesianNet(_Viewed(False), input_shape=None)
    expected.load_state_dict(net.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(out, expected.posterior_mean_network()(x))
    pyro.clear_param_store()
    svi = SVI(net.model, net.guide, pyro.optim.Adam({"lr": 1e-3}), MeanFieldELBO())
    with LocalReparameterization():
        assert math.isfinite(svi.step(x, torch.tensor([0, 1, 0, 1]), 4))


class _WithAuxiliaryHead(nn.Module):
    """As torchvision's GoogLeNet and Inception v3: in training the forward returns ``(logits, auxiliary logits)``,
    in eval mode the logits alone, and the auxiliary head is not called."""

    def __init__(self):
        super().__init__()
        self.features, self.head, self.aux = BayesLinear(4, 6), BayesLinear(6, 3), BayesLinear(6, 3)

    def forward(self, x):
        h = torch.relu(self.features(x))
        return (self.head(h), self.aux(h)) if self.training else self.head(h)


def test_a_head_only_training_reads_stays_plain_and_the_likelihood_reads_the_first_output():
    torch.manual_seed(0)
    net = BayesianNet(_WithAuxiliaryHead(), input_shape=None)
    aux_mean = net.body.aux.posterior_mean_module()
    assert net.layer_names == ["features", "head", "aux"]
    with pytest.warns(UserWarning, match=r"^1 Bayesian layer.* does not call in eval mode \(or calls on constants alone\) stay deterministic: aux$"):
        net.input_shape = (4,)  # as training and compression set it from the data
    assert net.layer_names == ["features", "head"]
    assert type(net.body.aux) is nn.Linear  # its posterior mean, as bayesianize(input_shape=...) leaves it
    torch.testing.assert_close(net.body.aux.weight, aux_mean.weight)
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    with torch.no_grad():  # certain weights: the draw is the posterior mean
        for layer in net.layers:
            layer.weight_logvar.fill_(-60.0)
            layer.bias_logvar.fill_(-60.0)
            layer.prior.z_logvar.fill_(-60.0)
    net.train()
    with LocalReparameterization(), torch.no_grad():
        guide = poutine.trace(net.guide).get_trace()
        model = poutine.trace(poutine.replay(net.model, trace=guide)).get_trace(x, y, 5)
    want = F.log_softmax(net.posterior_mean_network()(x), -1)  # the head's logits, not the auxiliary head's
    torch.testing.assert_close(model.nodes["y"]["fn"].logits, want, atol=1e-4, rtol=0)
