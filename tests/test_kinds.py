"""The layer-kind table (pyro_bc.nn.kinds): each kind's MACs against hand counts, the file's pairs of a 1-D convolution,
and a 1-D convolutional network (the kind added through the table) through bayesianize -> fit -> compress -> load ->
ONNX, against the network masked by hand; padding given as a string, against torch's own."""

import json

import masked_reference
import numpy as np
import onnxruntime
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyro_bc
from pyro_bc.bcz.export import INPUT_NAME, export_module
from pyro_bc.errors import ConfigError
from pyro_bc.nn.kinds import KIND, LAYER_KINDS, explicit_padding, kind_of
from pyro_bc.nn.layers import BAYES_LAYERS, BayesLinear
from pyro_bc.nn.network import BayesianNet


def test_every_kind_has_a_bayesian_layer_a_reparameterisation_and_a_wire_id():
    from pyro_bc.bcz.model import WEIGHT_DIMS, WIRE_IDS
    from pyro_bc.infer.reparam import OPS

    for kind in LAYER_KINDS:
        assert BAYES_LAYERS[kind.name].kind is kind and OPS[kind.name].name == kind.name
        assert kind.name in WIRE_IDS and WEIGHT_DIMS[kind.name] == kind.weight_dims


@pytest.mark.parametrize("module, shape, macs", [
    (nn.Linear(6, 4), (6,), 24),
    (nn.Linear(6, 4), (5, 6), 5 * 24),  # applied at each of 5 tokens
    (nn.Conv1d(4, 6, 3, stride=2, padding=1, groups=2), (4, 9), 6 * 2 * 3 * 5),
    (nn.Conv2d(4, 6, (3, 2), dilation=(1, 2)), (4, 7, 8), 6 * 4 * 3 * 2 * 5 * 6),
])
def test_macs_against_hand_counts(module, shape, macs):
    with torch.no_grad():
        output = module(torch.zeros(1, *shape))
    assert kind_of(module).macs(module, output) == macs


def test_a_1d_convolution_is_stored_as_a_2d_one_over_a_height_of_one():
    conv1d = KIND["conv1d"]
    assert conv1d.to_pairs((2,), (1,), (3,)) == ((1, 2), (0, 1), (1, 3))
    assert conv1d.from_pairs((1, 2), (0, 1), (1, 3)) == [(2,), (1,), (3,)]
    assert KIND["conv2d"].to_pairs(2, (1, 0), 1) == ((2, 2), (1, 0), (1, 1))


def test_a_1d_convolutional_network_compresses_and_equals_the_hand_masked_network(tmp_path):
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv1d(2, 6, 5, padding=2), nn.ReLU(), nn.Conv1d(6, 4, 3, stride=2), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 7, 3))
    net = pyro_bc.bayesianize(dense, "gnj", input_shape=(2, 16))
    assert [type(layer).__name__ for layer in net.layers] == ["BayesConv1d", "BayesConv1d", "BayesLinear"]
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 2, 16, generator=generator), torch.randint(0, 3, (64,), generator=generator)
    pyro_bc.fit(net, (x, y), epochs=1, batch_size=16, progress=False)
    with torch.no_grad():  # conv1's channels 1 and 4 and conv2's channel 0 certain to go, the rest to stay
        for layer, dropped in zip(net.layers, ([1, 4], [0], [])):
            layer.prior.z_logvar.fill_(-20.0)
            layer.prior.z_logvar[dropped] = 10.0
    summary = pyro_bc.compress(net.eval(), tmp_path / "m.bcz", val=(x, y), thresholds=[0.0, 0.0, 0.0])
    assert [row["kept_groups"] for row in summary["layers"][:2]] == [[0, 2, 3, 5], [1, 2, 3]]
    assert summary["fold_pruned_inputs"] is False  # no training examples given: nothing folded

    masked = net.posterior_mean_network()  # by hand: the dropped channels' filters, biases and readers zeroed
    with torch.no_grad():
        masked[0].weight[[1, 4]] = 0.0
        masked[0].bias[[1, 4]] = 0.0
        masked[2].weight[0] = 0.0
        masked[2].bias[0] = 0.0
        masked[5].weight.view(3, 4, 7)[:, 0] = 0.0
        want = masked(x)
    loaded = pyro_bc.load(tmp_path / "m.bcz")
    with torch.no_grad():
        got = loaded(x)
    assert ((got - want).norm() / want.norm()).item() < 0.02
    assert [m.weight.shape for m in loaded.modules() if isinstance(m, nn.Conv1d)] == [(4, 2, 5), (3, 4, 3)]
    export_module(loaded, (2, 16), tmp_path / "m.onnx", "onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {INPUT_NAME: x.numpy()})[0], got.numpy(), atol=1e-4)


def test_macs_are_exact_integers_for_the_summary():
    """A grouped convolution's count is an integer (180, not 180.0) in the summary's JSON."""
    module = nn.Conv1d(4, 6, 3, stride=2, padding=1, groups=2)
    with torch.no_grad():
        output = module(torch.zeros(1, 4, 9))
    assert json.dumps(KIND["conv1d"].macs(module, output)) == "180"


@pytest.mark.parametrize("name, weight_shape, options, reference", [
    ("linear", (3, 4), {}, lambda x, w, b: x @ w.T + (0.0 if b is None else b)),
    ("conv1d", (4, 3, 3), {}, lambda x, w, b: F.conv1d(x, w, b)),
    ("conv1d", (4, 2, 3), {"stride": 2, "padding": 1, "dilation": 2, "groups": 2},
     lambda x, w, b: F.conv1d(x, w, b, stride=2, padding=1, dilation=2, groups=2)),
    ("conv2d", (4, 3, 3, 3), {}, lambda x, w, b: F.conv2d(x, w, b)),
    ("conv2d", (4, 2, 3, 3), {"stride": 2, "padding": 1, "dilation": 2, "groups": 2},
     lambda x, w, b: F.conv2d(x, w, b, stride=2, padding=1, dilation=2, groups=2)),
])
@pytest.mark.parametrize("bias", [True, False])
def test_a_kinds_plain_module_computes_the_functional_layer(name, weight_shape, options, reference, bias):
    """The stored layer's module, given the weight (and bias), computes torch's functional layer with those
    arguments (the defaults: stride 1, no padding, no dilation, one group); without a bias it has none."""
    g = torch.Generator().manual_seed(4)
    kind = KIND[name]
    in_features = weight_shape[1] * options.get("groups", 1)
    x = torch.randn(2, in_features, *(9,) * kind.spatial_dims, generator=g)
    w, b = torch.randn(weight_shape, generator=g), torch.randn(weight_shape[0], generator=g)
    module = kind.module(weight_shape, bias, **options)
    with torch.no_grad():
        module.weight.copy_(w)
        if bias:
            module.bias.copy_(b)
        got = module(x)
    assert (module.bias is None) is not bias
    torch.testing.assert_close(got, reference(x, w, b if bias else None))
    assert kind.module(weight_shape, bias, device=torch.device("meta"), **options).weight.is_meta


@pytest.mark.parametrize("padding, kernel, stride, dilation, want", [
    ("valid", (3, 3), 1, 1, (0, 0)),
    ("same", (3, 5), 1, 1, (1, 2)),
    ("same", (3,), 1, 2, (2,)),
    ("same", (3, 2), (1, 1), (1, 2), (1, 1)),
    ("same", (4, 4), 1, 1, "same"),  # a span of 3: one more on the right and bottom, which symmetric padding cannot say
    ("same", (3, 2), 1, 3, "same"),  # dilation 3 over a kernel of 2: a span of 3
    ("same", (3, 3), 2, 1, "same"),  # torch refuses "same" with a stride: left for torch to say so
    ((1, 0), (3, 3), 1, 1, (1, 0)),
])
def test_string_padding_becomes_numbers_where_it_pads_evenly(padding, kernel, stride, dilation, want):
    assert explicit_padding(padding, kernel, stride, dilation) == want
    if isinstance(padding, str) and not isinstance(want, str):  # the numbers compute what torch's string does
        conv = F.conv2d if len(kernel) == 2 else F.conv1d
        g = torch.Generator().manual_seed(0)
        x, w = torch.randn(2, 3, *(9,) * len(kernel), generator=g), torch.randn(4, 3, *kernel, generator=g)
        torch.testing.assert_close(conv(x, w, padding=want, dilation=dilation),
                                   conv(x, w, padding=padding, dilation=dilation))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")  # torch's, on the uneven case
def test_string_padding_trains_on_the_fused_op_and_compresses(tmp_path):
    """Bayesian and deterministic convolutions with padding "same" and "valid" are stored with numbers and the file
    computes the pruned network; "same" over an even span stays deterministic (computed as traced), and a Bayesian
    layer made with it by hand is refused by compression, naming the layer."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(2, 6, 3, padding="same", dilation=2), nn.ReLU(),
                          nn.Conv2d(6, 4, (3, 5), padding="same"), nn.ReLU(), nn.Conv2d(4, 4, 3, padding="valid"),
                          nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    net = pyro_bc.bayesianize(dense, "gnj", input_shape=(2, 6, 6))
    assert [layer.conv_args[1] for layer in net.layers[:3]] == [(2, 2), (1, 2), (0, 0)]
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 2, 6, 6, generator=g), torch.randint(0, 3, (64,), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(net.posterior_mean_network()(x), dense(x))
    pyro_bc.fit(net, (x, y), epochs=1, batch_size=16, progress=False)
    thresholds = [masked_reference.unambiguous_threshold(layer.log_alpha().detach()) for layer in net.layers]
    summary = pyro_bc.compress(net, tmp_path / "m.bcz", val=(x, y), train=(x, y), thresholds=thresholds)
    loaded = pyro_bc.load(tmp_path / "m.bcz")
    with torch.no_grad():
        want, got = pyro_bc.pruned_network(net, summary, train=(x, y))(x), loaded(x)
    assert ((got - want).norm() / want.norm()).item() < 0.02
    assert [m.padding for m in loaded.modules() if isinstance(m, nn.Conv2d)] == [(2, 2), (1, 2), (0, 0)]

    deterministic = BayesianNet(nn.Sequential(nn.Conv2d(2, 3, 3, padding="same"), nn.ReLU(), nn.Flatten(),
                                              BayesLinear(3 * 6 * 6, 3)), input_shape=(2, 6, 6))
    summary = pyro_bc.compress(deterministic.eval(), tmp_path / "d.bcz", val=(x, y), thresholds=[0.0])
    with torch.no_grad():
        want, got = pyro_bc.pruned_network(deterministic, summary)(x), pyro_bc.load(tmp_path / "d.bcz")(x)
    assert ((got - want).norm() / want.norm()).item() < 0.02

    with pytest.warns(UserWarning, match="stay deterministic: 0$"):  # one side padded more: kept as traced
        uneven = pyro_bc.bayesianize(nn.Sequential(nn.Conv2d(2, 3, 2, padding="same"), nn.Flatten(),
                                                   nn.Linear(3 * 6 * 6, 3)), "gnj", input_shape=(2, 6, 6))
    pyro_bc.fit(uneven, (x, y), epochs=1, batch_size=16, progress=False)
    summary = pyro_bc.compress(uneven, tmp_path / "u.bcz", val=(x, y), thresholds=[0.0])
    with torch.no_grad():
        want, got = pyro_bc.pruned_network(uneven, summary)(x), pyro_bc.load(tmp_path / "u.bcz")(x)
    assert ((got - want).norm() / want.norm()).item() < 0.02
    made_by_hand = BayesianNet(nn.Sequential(BAYES_LAYERS["conv2d"](2, 3, 2, padding="same"), nn.Flatten(),
                                             BayesLinear(3 * 6 * 6, 3)), input_shape=(2, 6, 6))
    with pytest.raises(ConfigError, match="^cannot compress 0: padding 'same' over an even kernel span"):
        pyro_bc.compress(made_by_hand, tmp_path / "h.bcz", val=(x, y), thresholds=[0.0, 0.0])
