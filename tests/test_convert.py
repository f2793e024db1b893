"""pyro_bc.bayesianize: a plain PyTorch network made Bayesian, its dense weights the posterior means."""

import pyro
import pytest
import torch
import torch.nn.functional as F
from pyro.infer import SVI, TraceMeanField_ELBO
from torch import nn

import pyro_bc
from pyro_bc.errors import ConfigError
from pyro_bc.infer.reparam import LocalReparameterization
from pyro_bc.nn.layers import BayesConv2d, BayesLinear
from pyro_bc.priors import known_options


class Residual(nn.Module):
    """conv-BN-ReLU, a residual block (two padded convolutions and BatchNorm), a depthwise and a bias-free
    convolution, global pooling and a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=1, padding=2, dilation=2, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.depthwise = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        return self.head(self.depthwise(x))


def _dense() -> Residual:
    torch.manual_seed(0)
    dense = Residual()
    with torch.no_grad():  # running statistics away from their initial values
        for bn in (dense.stem[1], dense.bn1, dense.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
    return dense.eval()


@pytest.mark.parametrize("prior", ["gnj", "ghs", "lu", "rhs"])
def test_posterior_mean_outputs_equal_the_dense_network(prior):
    dense = _dense()
    net = pyro_bc.bayesianize(dense, prior, **known_options(prior, {"tau0": 1e-3}))
    x = torch.randn(5, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(net.posterior_mean_network()(x), dense(x), rtol=1e-5, atol=1e-5)
    assert all(isinstance(m, nn.BatchNorm2d) for m in (net.body.bn1, net.body.bn2))  # kept as they are
    assert type(dense.conv1) is nn.Conv2d  # the original is not changed


def test_every_argument_of_every_layer_is_kept():
    dense = _dense()
    net = pyro_bc.bayesianize(dense)
    for name, original in dense.named_modules():
        if isinstance(original, nn.Conv2d):
            layer = net.body.get_submodule(name)
            assert isinstance(layer, BayesConv2d)
            assert layer.conv_args == (original.stride, original.padding, original.dilation, original.groups)
            assert (layer.in_channels, layer.out_channels) == (original.in_channels, original.out_channels)
            assert layer.weight_mu.shape == original.weight.shape
            assert (layer.bias_mu is None) == (original.bias is None)
            mean = layer.posterior_mean_module()
            assert (mean.stride, mean.padding, mean.dilation, mean.groups, mean.kernel_size) == \
                (original.stride, original.padding, original.dilation, original.groups, original.kernel_size)
            assert (mean.bias is None) == (original.bias is None)
        elif isinstance(original, nn.Linear):
            layer = net.body.get_submodule(name)
            assert isinstance(layer, BayesLinear)
            assert (layer.in_features, layer.out_features) == (original.in_features, original.out_features)
    assert net.layer_names == ["stem.0", "conv1", "conv2", "depthwise", "head.2"]
    # a bias-free layer samples no bias site
    trace = pyro.poutine.trace(net.guide).get_trace()
    assert "conv1.b" not in trace.nodes and "stem.0.b" in trace.nodes


def test_moped_variances_and_bad_options():
    dense = _dense()
    net = pyro_bc.bayesianize(dense, "lu", delta=0.01)
    layer = net.body.head[2]
    torch.testing.assert_close(layer.weight_logvar.exp(), 0.01 * dense.head[2].weight.detach() ** 2)
    with pytest.raises(ConfigError, match="delta must be a positive number"):
        pyro_bc.bayesianize(dense, delta=0.0)
    with pytest.raises(ConfigError, match="holds no nn.Linear, nn.Conv1d or nn.Conv2d"):
        pyro_bc.bayesianize(nn.Sequential(nn.ReLU()))
    with pytest.raises(ConfigError, match=r"^Sequential's only layers pad other than evenly with zeros, which a "
                                          r"compressed layer cannot: nothing to make Bayesian \(0\)$"):
        pyro_bc.bayesianize(nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect")))
    with pytest.raises(ConfigError, match="^the module is already a BayesianNet: bayesianize takes the plain network"):
        pyro_bc.bayesianize(net)


def test_a_converted_network_trains_with_pyro_svi_and_keeps_batchnorm_statistics_in_training():
    pyro.set_rng_seed(0)
    dense = _dense().train()
    net = pyro_bc.bayesianize(dense, input_shape=(3, 12, 12))
    x, y = torch.randn(16, 3, 12, 12), torch.randint(0, 4, (16,))
    before = net.body.bn1.running_mean.clone()
    start = {k: v.detach().clone() for k, v in net.named_parameters()}
    pyro.clear_param_store()
    svi = SVI(net.model, net.guide, pyro.optim.Adam({"lr": 1e-2}), loss=TraceMeanField_ELBO())
    for _ in range(3):
        with LocalReparameterization():
            svi.step(x, y, 160)
    assert all(not torch.equal(p, start[k]) for k, p in net.named_parameters())  # BatchNorm's affine ones too
    assert not torch.equal(net.body.bn1.running_mean, before)  # updated in training, as in PyTorch
    mean_net = net.posterior_mean_network()
    assert not mean_net.training and net.body.bn1.training  # the copy's eval mode leaves the network alone


class Tokens(nn.Module):
    """A tiny transformer: a patch embedding, one encoder layer (attention reads its projections' weights itself),
    a layer that reads another layer's weight directly (as Swin's window attention does) and a linear head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(1, 8, 4, stride=4)
        self.encoder = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.mixer = nn.Linear(8, 8)  # used through its weight only
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)  # (N, 4, 8)
        tokens = self.encoder(tokens)
        tokens = tokens + torch.nn.functional.linear(tokens, self.mixer.weight)
        return self.head(tokens.mean(1))


def test_attention_projections_and_layers_read_by_weight_stay_deterministic_and_the_rest_trains():
    torch.manual_seed(0)
    dense = Tokens().eval()
    net = pyro_bc.bayesianize(dense, input_shape=(1, 8, 8))
    assert net.layer_names == ["embed", "encoder.linear1", "encoder.linear2", "head"]
    assert isinstance(net.body.encoder.self_attn.out_proj, nn.Linear) and isinstance(net.body.mixer, nn.Linear)
    x = torch.randn(6, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(net.posterior_mean_network()(x), dense(x))
    history = pyro_bc.fit(net, (x, torch.randint(0, 3, (6,))), epochs=2, batch_size=3, progress=False)
    assert all(torch.isfinite(torch.tensor(h["elbo"])) for h in history)


def test_a_linear_layer_on_tokens_draws_one_group_scale_per_example():
    """Under the local reparameterisation a linear layer on (examples, tokens, features) scales each example's
    features by one draw of z shared by its tokens: with the weights certain, two equal tokens of an example get
    equal outputs, and the mean over draws is the posterior-mean layer's output (within its standard error)."""
    torch.manual_seed(0)
    layer = BayesLinear(5, 3)
    with torch.no_grad():
        layer.weight_logvar.fill_(-40.0)
        layer.bias_logvar.fill_(-40.0)
        layer.prior.z_logvar.fill_(-2.0)  # z noise only: sd about 0.37 around 1
    net = pyro_bc.nn.network.BayesianNet(nn.Sequential(layer), input_shape=(4, 5))
    token = torch.randn(5)
    x = torch.stack([torch.stack([token, token, torch.randn(5), token]) for _ in range(2000)])  # (2000, 4, 5)
    pyro.set_rng_seed(1)
    with LocalReparameterization(), torch.no_grad():
        trace = pyro.poutine.trace(net.guide).get_trace()
        y = pyro.poutine.replay(net.body, trace=trace)(x)
    assert y.shape == (2000, 4, 3)
    torch.testing.assert_close(y[:, 0], y[:, 1])
    torch.testing.assert_close(y[:, 0], y[:, 3])
    assert not torch.allclose(y[0, 0], y[1, 0])  # another example, another z
    want = net.posterior_mean_network()(x[:1])[0, 0]
    spread = y[:, 0].std(0) / 2000**0.5
    assert ((y[:, 0].mean(0) - want).abs() < 4 * spread).all()


def test_bayesianize_given_an_input_shape_leaves_every_submodules_mode_as_it_was():
    """The probe for the layers the forward calls runs in eval mode on a copy: a BatchNorm the user froze in eval mode
    inside a network in training mode stays frozen, and the network stays in training mode."""
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    model.train()
    model[1].eval()
    net = pyro_bc.bayesianize(model, input_shape=(2, 6, 6))
    assert net.body.training and not net.body[1].training
    assert model.training and not model[1].training  # the user's module untouched


def test_lazy_layers_are_shaped_by_the_input_shape_or_refused_in_one_line():
    def lazy():
        torch.manual_seed(0)
        return nn.Sequential(nn.LazyConv2d(4, 3), nn.LazyBatchNorm2d(), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    with pytest.raises(ConfigError, match=r"^Sequential has lazy parameters not yet shaped \(0.weight\): give "
                                          r"bayesianize input_shape=\(...\), or run one batch through the model first$"):
        pyro_bc.bayesianize(lazy())
    model = lazy()
    net = pyro_bc.bayesianize(model, input_shape=(1, 6, 6))
    assert [tuple(layer.weight_mu.shape) for layer in net.layers] == [(4, 1, 3, 3), (3, 64)]
    # the dry run, in eval mode, left BatchNorm's statistics and every module's mode as they were
    assert model.training and all(m.training for m in model.modules())
    torch.testing.assert_close(model[1].running_mean, torch.zeros(4))
    torch.testing.assert_close(model[1].running_var, torch.ones(4))
    x = torch.randn(5, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(net.posterior_mean_network().eval()(x), model.eval()(x))


@pytest.mark.parametrize("wrap", [torch.compile, nn.DataParallel], ids=["compiled", "DataParallel"])
def test_a_wrapped_module_is_converted_as_the_module_it_wraps(wrap):
    """torch.compile's wrapper (it compiles nothing until called) and nn.DataParallel's (whose forward fx cannot
    trace: it was refused at compression)."""
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    net = pyro_bc.bayesianize(wrap(model))
    assert net.layer_names == ["0", "2"]
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(net.posterior_mean_network()(x), model(x))


@pytest.mark.parametrize("make", [torch.jit.script, lambda m: torch.jit.trace(m, torch.zeros(2, 6))],
                         ids=["script", "trace"])
def test_a_torchscript_module_is_one_line_naming_what_to_give_instead(make):
    """Its layers are TorchScript's, not nn.Linear (it was refused as holding none)."""
    with pytest.raises(ConfigError, match=r"^the module is TorchScript \((RecursiveScriptModule|TopLevelTracedModule), "
                                          r"from torch.jit.script or trace\): give bayesianize the Python module"):
        pyro_bc.bayesianize(make(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))))


@pytest.mark.parametrize("first", [nn.Conv2d(1, 4, 3, padding=1, padding_mode="reflect"),
                                   nn.Conv2d(1, 4, 2, padding="same")], ids=["reflect", "same-even"])
def test_a_convolution_padding_other_than_evenly_with_zeros_stays_deterministic_with_a_warning(first):
    """A compressed layer pads evenly with zeros: such a layer keeps its own padding, deterministic (the network was
    refused, or refused at compression after training), and the rest is made Bayesian."""
    model = nn.Sequential(first, nn.ReLU(), nn.Conv2d(4, 2, 1))
    with pytest.warns(UserWarning, match=r"^1 convolution\(s\) padding other than evenly with zeros .* deterministic: 0$"):
        net = pyro_bc.bayesianize(model)
    assert net.layer_names == ["2"] and type(net.body[0]) is nn.Conv2d
    x = torch.randn(3, 1, 5, 5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(net.posterior_mean_network()(x), model(x))


class _Decoder(nn.Module):
    """A downsampling convolution, a transposed one back up (a U-Net's decoder), a 3-D convolution over the result
    taken as one channel of depth 4, and a head."""

    def __init__(self):
        super().__init__()
        self.down, self.up = nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.ConvTranspose2d(4, 4, 2, stride=2)
        self.volume, self.head = nn.Conv3d(1, 2, 3, padding=1), nn.Linear(2, 3)

    def forward(self, x):
        h = self.up(torch.relu(self.down(x)))[:, None]
        return self.head(self.volume(h).mean((2, 3, 4)))


class _StandardisedConv2d(nn.Conv2d):
    """A convolution whose forward standardises its weight first (as timm's StdConv2d): not what its weight computes
    through F.conv2d."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.var((1, 2, 3), keepdim=True) + 1e-5).sqrt()
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


def test_a_layer_subclass_with_a_forward_of_its_own_stays_deterministic_and_computes_as_it_does(tmp_path):
    """It was made Bayesian from its raw weight, dropping the standardisation: the network computed something else."""
    torch.manual_seed(0)
    model = nn.Sequential(_StandardisedConv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 3, 3), nn.Flatten(),
                          nn.Linear(12, 3)).eval()
    with pytest.warns(UserWarning, match=r"^1 layer\(s\) .* stay deterministic: 0 \(_StandardisedConv2d\)$"):
        net = pyro_bc.bayesianize(model, input_shape=(2, 6, 6))
    assert net.layer_names == ["2", "4"]
    x = torch.randn(3, 2, 6, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(net.posterior_mean_network()(x), model(x))
        pyro_bc.compress(net, tmp_path / "m.bcz", thresholds=[10.0, 10.0])  # nothing pruned: the model itself
        torch.testing.assert_close(pyro_bc.load(tmp_path / "m.bcz")(x), model(x), rtol=2e-2, atol=2e-2)


class _ReadsItsLayersDevice(nn.Module):
    """A forward that reads a layer's weight for its device and dtype, and calls the layer (timm's EdgeNeXt)."""

    def __init__(self):
        super().__init__()
        self.proj, self.head = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        offset = torch.ones(6, device=self.proj.weight.device, dtype=self.proj.weight.dtype)
        return self.head(torch.relu(self.proj(x) + offset))


def test_a_forward_reading_its_layers_device_and_dtype_trains_and_compresses(tmp_path):
    """It failed at the first step (a Bayesian layer had no ``weight``); the layers' ``weight`` and ``bias`` are now
    their means."""
    torch.manual_seed(0)
    model = _ReadsItsLayersDevice().eval()
    net = pyro_bc.bayesianize(model)
    assert net.layer_names == ["proj", "head"] and net.body.proj.weight is net.body.proj.weight_mu
    assert net.body.head.bias is net.body.head.bias_mu
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g)
    pyro_bc.fit(net, (x, y), epochs=1, progress=False)
    pyro_bc.compress(net, tmp_path / "m.bcz", thresholds=[10.0, 10.0])  # nothing pruned
    with torch.no_grad():
        torch.testing.assert_close(pyro_bc.load(tmp_path / "m.bcz")(x), net.posterior_mean_network()(x),
                                   rtol=2e-2, atol=2e-2)


class _PositionalProjection(nn.Module):
    """A layer applied to a grid the forward makes from sizes alone (as EdgeNeXt's positional encoding), the same
    for every example, added to the features."""

    def __init__(self):
        super().__init__()
        self.a, self.position, self.head = nn.Conv2d(2, 4, 1), nn.Conv2d(2, 4, 1), nn.Linear(4, 3)

    def forward(self, x):
        b, _, h, w = x.shape
        grid = torch.stack(torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij"))
        return self.head((torch.relu(self.a(x)) + self.position(grid.expand(b, -1, -1, -1))).mean((2, 3)))


@pytest.mark.parametrize("given_shape", [True, False], ids=["bayesianize-input-shape", "learned-from-data"])
def test_a_layer_on_what_the_forward_makes_from_constants_stays_deterministic(given_shape, tmp_path):
    """It was made Bayesian, and compression refused the network (some Bayesian layers are not called): its input
    depends on no example, so it stays the plain layer; the file computes the network."""
    torch.manual_seed(0)
    model = _PositionalProjection().eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 2, 5, 5, generator=g), torch.randint(0, 3, (16,), generator=g)
    if given_shape:
        net = pyro_bc.bayesianize(model, input_shape=(2, 5, 5))
    else:
        net = pyro_bc.bayesianize(model)
        with pytest.warns(UserWarning, match=r"^1 Bayesian layer\(s\) that the forward does not call .*: position$"):
            pyro_bc.fit(net, (x, y), epochs=1, progress=False)
    assert net.layer_names == ["a", "head"] and type(net.body.position) is nn.Conv2d
    pyro_bc.compress(net, tmp_path / "m.bcz", thresholds=[10.0, 10.0])
    with torch.no_grad():
        torch.testing.assert_close(pyro_bc.load(tmp_path / "m.bcz")(x), net.posterior_mean_network()(x),
                                   rtol=2e-2, atol=2e-2)


def test_layers_of_kinds_without_a_bayesian_layer_stay_deterministic_and_are_named_in_a_warning(tmp_path):
    model = _Decoder().eval()
    with pytest.warns(UserWarning, match=r"^2 layer\(s\) of a kind pyro-bc has no Bayesian layer for, or whose class "
                                         r"computes a forward of its own, stay deterministic: up \(ConvTranspose2d\), "
                                         r"volume \(Conv3d\)$"):
        net = pyro_bc.bayesianize(model, input_shape=(2, 8, 8))
    assert net.layer_names == ["down", "head"] and type(net.body.up) is nn.ConvTranspose2d
    x = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(net.posterior_mean_network()(x), model(x))
    summary = pyro_bc.compress(net, tmp_path / "m.bcz", thresholds=[-3.0, -3.0])  # the file computes them whole
    assert {row["module"] for row in summary["deterministic_modules"]} >= {"the module ConvTranspose2d",
                                                                          "the module Conv3d"}
    with torch.no_grad():
        torch.testing.assert_close(pyro_bc.load(tmp_path / "m.bcz")(x), model(x), rtol=2e-2, atol=2e-2)


class _TiedLM(nn.Module):
    """A language model whose output layer shares its weight with the token embedding (GPT-2's tying)."""

    def __init__(self):
        super().__init__()
        self.wte, self.fc, self.head = nn.Embedding(12, 6), nn.Linear(6, 6), nn.Linear(6, 12, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, ids):
        return self.head(torch.relu(self.fc(self.wte(ids))))


def test_a_parametrized_weight_starts_the_bayesian_layer_and_the_parametrization_is_named():
    """weight_norm and spectral_norm compute a layer's weight from other parameters; the Bayesian layer's means are
    that weight (as computed when converted): the posterior mean's weight is it; with a warning naming the layers and parametrizations."""
    from torch.nn.utils import parametrizations

    torch.manual_seed(0)
    model = nn.Sequential(parametrizations.weight_norm(nn.Linear(6, 5)), nn.ReLU(),
                          parametrizations.spectral_norm(nn.Linear(5, 3)))
    model.eval()  # spectral_norm's power iteration does not move in eval mode
    with torch.no_grad():
        weights = [model[0].weight.clone(), model[2].weight.clone()]
    with pytest.warns(UserWarning, match=r"^2 layer\(s\) whose weight a parametrization computes start from that weight "
                                         r"and lose the parametrization .*: 0 \(_WeightNorm\), 2 \(_SpectralNorm\)$"):
        net = pyro_bc.bayesianize(model)
    mean = net.posterior_mean_network()
    for name, weight in zip(net.layer_names, weights):
        torch.testing.assert_close(mean.get_submodule(name).weight, weight)


def test_a_layer_tied_to_another_parameter_is_untied_with_a_warning():
    model = _TiedLM().eval()
    with pytest.warns(UserWarning, match=r"^1 tied layer weight\(s\) are untied, each Bayesian layer having a posterior "
                                         r"of its own: head.weight \(tied to wte.weight\)$"):
        net = pyro_bc.bayesianize(model, input_shape=(5,), input_dtype=torch.int64)
    assert net.layer_names == ["fc", "head"]
    ids = torch.randint(0, 12, (3, 5), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(net.posterior_mean_network()(ids), model(ids))  # the same function, untied
