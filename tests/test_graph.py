"""Compression of bodies that are not flat sequences (pyro_bc.compression.graph): BatchNorm folded exactly, channels coupled
through residual sums, concatenations and depthwise convolutions (hand-set log alphas, known kept channels), the
compressed graph written, loaded and equal to the masked posterior-mean network, and compress against evaluate
for a tiny trained ResNet and VGG."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_data import write_npz
from torch import nn

import models.resnet
import models.vgg
import pyro_bc
from models import build_network
from pyro_bc.bcz import codec
from pyro_bc.bcz.model import Op
from pyro_bc.bcz.modules import Graph
from pyro_bc.compression.compressed import compressed_model, compressed_module
from pyro_bc.compression.graph import BodyGraph, analyse_network, prune_chain, prune_network
from pyro_bc.compression.pipeline import compress
from pyro_bc.compression.posterior import analyse
from pyro_bc.compression.thresholds import ThresholdInputs, ValidationBudget
from pyro_bc.data.datasets import load_data
from pyro_bc.errors import ConfigError
from pyro_bc.nn.layers import BayesConv2d, BayesLinear
from pyro_bc.nn.network import BayesianNet
from pyro_bc.runs.compressing import evaluate_file

KEPT, DROPPED = -30.0, 5.0  # z log-variances: log alpha about -30 (kept) or 5 (dropped) with E[z] near 1


def _set(layer, dropped=(), generator=None):
    """E[z] in [0.9, 1.1]; the groups ``dropped`` get a large log alpha (for ``lu``, every weight of the group
    a large variance); random biases."""
    with torch.no_grad():
        if not hasattr(layer.prior, "z_mu"):
            layer.weight_logvar.fill_(KEPT)
            layer.weight_logvar.index_fill_(layer.group_axis, torch.tensor(list(dropped), dtype=torch.long), DROPPED)
        else:
            layer.prior.z_mu.copy_(torch.rand(layer.prior.z_mu.shape, generator=generator) * 0.2 + 0.9)
            layer.prior.z_logvar.fill_(KEPT)
            layer.prior.z_logvar[list(dropped)] = DROPPED
        if layer.bias_mu is not None:
            layer.bias_mu.uniform_(-0.5, 0.5, generator=generator)


def _randomise_batchnorm(net, generator):
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1, generator=generator)
                m.running_var.uniform_(0.5, 2, generator=generator)
                if m.affine:
                    m.weight.uniform_(0.5, 1.5, generator=generator)
                    m.bias.uniform_(-1, 1, generator=generator)


def _masked(net, layers):
    """The posterior-mean network (BatchNorm unfolded) with every pruned weight set to zero."""
    mean = net.posterior_mean_network()
    with torch.no_grad():
        for layer, pruned in zip(net.layers, layers):
            mean.get_submodule(layer.site).weight.mul_(pruned.mask)
    return mean


def _compress(net, thresholds):
    posts = analyse_network(net, analyse(net))
    layers = prune_network(net, posts, thresholds, None)
    return layers, compressed_module(net, layers, None)


def _tiny(build, shape, prior="gnj"):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    net = build(prior, width=0.25, input_shape=shape)
    for i, layer in enumerate(net.layers):
        _set(layer, range(0, layer.n_groups, 3 + i % 2), g)
    _randomise_batchnorm(net, g)
    return net, g


# -- BatchNorm -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("build, shape", [(models.resnet.build, (3, 16, 16)), (models.vgg.build, (1, 28, 28))])
def test_batchnorm_fold_is_exact(build, shape):
    net, g = _tiny(build, shape)
    x = torch.randn(4, *shape, generator=g)
    _, unpruned = _compress(net, [100.0] * len(net.layers))  # nothing pruned: only BatchNorm folded
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in unpruned.modules())
    with torch.no_grad():
        torch.testing.assert_close(unpruned(x), net.posterior_mean_network()(x), rtol=1e-4, atol=1e-5)
        layers, pruned = _compress(net, [-3.0] * len(net.layers))
        assert sum(int(la.mask.sum()) for la in layers) < sum(la.mask.numel() for la in layers)
        torch.testing.assert_close(pruned(x), _masked(net, layers)(x), rtol=1e-4, atol=1e-5)


def test_batchnorm_scales_the_variances_and_moves_the_bias():
    net, _ = _tiny(models.vgg.build, (1, 28, 28))
    plain, folded = analyse(net)[0], analyse_network(net, analyse(net))[0]
    bn = net.body.bn1
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
    torch.testing.assert_close(folded.mean, plain.mean * scale[:, None, None, None])
    torch.testing.assert_close(folded.var, plain.var * scale[:, None, None, None] ** 2)
    torch.testing.assert_close(folded.bias, ((0 - bn.running_mean) * scale + bn.bias).detach())
    assert torch.equal(folded.log_alpha, plain.log_alpha)



class BatchNormPlaces(nn.Module):
    """BatchNorm on the input (no layer before it), after a layer another node also reads, and twice after one
    layer (the first folded, the second not); the last without affine parameters."""

    def __init__(self):
        super().__init__()
        self.first, self.a, self.shared = nn.BatchNorm2d(2), BayesConv2d(2, 4, 1), nn.BatchNorm2d(4)
        self.b, self.once, self.twice = BayesConv2d(4, 4, 1), nn.BatchNorm2d(4), nn.BatchNorm2d(4, affine=False)

    def forward(self, x):
        h = self.a(self.first(x))
        return self.twice(self.once(self.b(self.shared(h) + h)))


def test_batchnorm_that_cannot_be_folded_stays_a_per_channel_scale_and_shift():
    torch.manual_seed(0)
    net = BayesianNet(BatchNormPlaces(), input_shape=(2, 3, 3))
    _randomise_batchnorm(net, torch.Generator().manual_seed(1))
    graph = BodyGraph(net)
    assert graph.batchnorm_names == {1: "once"} and graph.batchnorm[1] is graph.modules["once"]
    affine = {n.name: n.affine for n in graph.nodes if n.affine is not None}
    assert list(affine) == ["first", "shared", "twice"]
    for name, (scale, shift) in affine.items():
        bn = net.body.get_submodule(name)
        var, mean = bn.running_var.double(), bn.running_mean.double()
        gamma = torch.ones(len(var), dtype=torch.float64) if bn.weight is None else bn.weight.double()
        beta = torch.zeros(len(var), dtype=torch.float64) if bn.bias is None else bn.bias.double()
        torch.testing.assert_close(scale, (gamma / torch.sqrt(var + bn.eps)).detach(), rtol=1e-12, atol=0)
        torch.testing.assert_close(shift, (beta - mean * gamma / torch.sqrt(var + bn.eps)).detach(), rtol=1e-12,
                                   atol=1e-15)


def test_batchnorm_without_running_statistics_is_named():
    with pytest.raises(ConfigError) as info:
        BodyGraph(BayesianNet(Then(nn.BatchNorm2d(4, track_running_stats=False)), input_shape=(2, 5, 5)))
    assert str(info.value) == "cannot compress f: BatchNorm must track running statistics"


def test_batchnorm_on_features_that_follows_no_layer_is_an_op_outside_the_registry():
    torch.manual_seed(0)
    net = BayesianNet(Then(nn.Sequential(nn.Flatten(), nn.BatchNorm1d(100))), input_shape=(2, 5, 5))
    _randomise_batchnorm(net, torch.Generator().manual_seed(2))
    graph = BodyGraph(net)
    assert [(n.name, n.what) for n in graph.nodes if n.program is not None] == [("f.1", "the module BatchNorm1d")]
    layers, module = _outside_of(net, graph, {"a": [2]})
    assert layers["a"].keep_out.all()
    _assert_masked(net, layers, module)


# -- coupled channels ----------------------------------------------------------------------------------

class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = BayesConv2d(2, 4, 1), BayesConv2d(4, 4, 1)
        self.c = BayesConv2d(4, 3, 1)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.c(torch.relu(self.b(h) + h))


class Concatenation(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = BayesConv2d(2, 3, 1), BayesConv2d(2, 2, 1)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), BayesLinear(5, 2)

    def forward(self, x):
        h = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], dim=1)
        return self.fc(torch.flatten(self.pool(h), 1))


class Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = BayesConv2d(2, 4, 1)
        self.d = BayesConv2d(4, 4, 3, padding=1, groups=4)
        self.c = BayesConv2d(4, 3, 1)

    def forward(self, x):
        return self.c(torch.relu(self.d(torch.relu(self.a(x)))))


def _coupled(body, dropped):
    net = BayesianNet(body, input_shape=(2, 5, 5))
    g = torch.Generator().manual_seed(3)
    for layer in net.layers:
        _set(layer, dropped.get(layer.site, ()), g)
    layers, module = _compress(net, [-3.0] * len(net.layers))
    x = torch.randn(3, 2, 5, 5, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(module(x), _masked(net, layers)(x), rtol=1e-5, atol=1e-6)
    return {layer.post.name: layer for layer in layers}, module


def _shapes(module):
    return [tuple(m.weight.shape) for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def test_a_residual_sum_keeps_the_union_of_its_inputs_channels():
    torch.manual_seed(0)
    layers, module = _coupled(Residual(), {"a": [0, 1], "b": [1, 2]})
    union = [True, False, True, True]  # channel 1 is dropped by both inputs of the sum
    for name in "ab":
        assert layers[name].keep_out.tolist() == union
    assert layers["b"].keep_in.tolist() == union and layers["c"].keep_in.tolist() == union
    assert layers["a"].mask[0].sum() == 0 and layers["a"].mask[2].all()  # a's channel 0: zero weights, kept
    assert _shapes(module) == [(3, 2, 1, 1), (3, 3, 1, 1), (3, 3, 1, 1)]


def test_a_concatenation_offsets_the_channels_of_its_inputs():
    torch.manual_seed(0)
    layers, module = _coupled(Concatenation(), {"a": [1], "fc": [3]})  # fc input 3 is b's channel 0
    assert layers["a"].keep_out.tolist() == [True, False, True]
    assert layers["b"].keep_out.tolist() == [False, True]
    assert layers["fc"].keep_in.tolist() == [True, False, True, False, True]
    assert _shapes(module) == [(2, 2, 1, 1), (1, 2, 1, 1), (2, 3)]


def test_a_depthwise_convolution_ties_its_inputs_to_its_outputs():
    torch.manual_seed(0)
    layers, module = _coupled(Depthwise(), {"a": [0, 1], "d": [1, 2]})
    tied = [True, False, True, True]
    assert layers["a"].keep_out.tolist() == tied
    assert layers["d"].keep_in.tolist() == tied and layers["d"].keep_out.tolist() == tied
    assert layers["c"].keep_in.tolist() == tied
    assert _shapes(module) == [(3, 2, 1, 1), (3, 1, 3, 3), (3, 3, 1, 1)]
    assert [m.groups for m in module.modules() if isinstance(m, nn.Conv2d)] == [1, 3, 1]


class Normalised(nn.Module):
    """a -> LayerNorm over ``shape`` (the last dimensions of (4, 5, 5)) -> ReLU -> c; the norm's affine tensors
    random."""

    def __init__(self, shape):
        super().__init__()
        self.a, self.norm, self.c = BayesConv2d(2, 4, 1), nn.LayerNorm(shape), BayesConv2d(4, 3, 1)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        return self.c(torch.relu(self.norm(self.a(x))))


class PlainMiddle(nn.Module):
    """a -> a plain (deterministic) 1x1 convolution -> ReLU -> c."""

    def __init__(self):
        super().__init__()
        self.a, self.plain, self.c = BayesConv2d(2, 4, 1), nn.Conv2d(4, 5, 1), BayesConv2d(5, 3, 1)

    def forward(self, x):
        return self.c(torch.relu(self.plain(self.a(x))))


def test_a_layer_norm_across_channels_keeps_them_all_and_one_within_them_lets_them_go():
    torch.manual_seed(0)
    layers, module = _coupled(Normalised((4, 5, 5)), {"a": [0, 1]})  # normalises over channels too: all stay
    assert layers["a"].keep_out.all() and not layers["a"].mask[:2].any() and layers["c"].keep_in.all()
    norm = [m for m in module.modules() if isinstance(m, nn.LayerNorm)]
    assert [m.normalized_shape for m in norm] == [(4, 5, 5)]
    layers, module = _coupled(Normalised((5,)), {"a": [0, 1]})  # over the width only: channels 0 and 1 go
    assert layers["a"].keep_out.tolist() == [False, False, True, True] and layers["c"].keep_in.tolist() == [
        False, False, True, True]
    assert _shapes(module) == [(2, 2, 1, 1), (3, 2, 1, 1)]


def test_a_plain_layer_stays_deterministic_and_keeps_every_channel_it_reads_and_writes():
    torch.manual_seed(0)
    layers, module = _coupled(PlainMiddle(), {"a": [0, 1], "c": [2]})
    assert layers["a"].keep_out.all() and not layers["a"].mask[:2].any()  # read by the plain layer: kept, zero
    assert layers["c"].keep_in.all()  # written by the plain layer
    assert _shapes(module) == [(4, 2, 1, 1), (5, 4, 1, 1), (3, 5, 1, 1)]
    graph = BodyGraph(BayesianNet(PlainMiddle(), input_shape=(2, 5, 5)))
    assert [(n.name, n.layer, type(n.module).__name__) for n in graph.nodes if n.layer is None] == [
        ("plain", None, "Conv2d"), ("relu", None, "NoneType")]


def test_a_channel_exactly_at_the_threshold_is_pruned_across_the_graph():
    """Kept iff log alpha < threshold: the concatenation's channel whose log alpha equals its layer's threshold goes
    (with the fc inputs that read it); one float32 step above the threshold, it stays."""
    torch.manual_seed(0)
    net = BayesianNet(Concatenation(), input_shape=(2, 5, 5))
    g = torch.Generator().manual_seed(3)
    for layer in net.layers:
        _set(layer, (), g)
    with torch.no_grad():
        net.body.a.prior.z_logvar[1] = -2.0  # log alpha of a's channel 1 near -2; the others near -30
    posts = analyse_network(net, analyse(net))
    at = float(posts[0].log_alpha[1])
    above = float(np.nextafter(np.float32(at), np.float32(np.inf)))
    graph = BodyGraph(net)
    a, _, fc = graph.prune(posts, [at, -3.0, -3.0])
    assert a.keep_out.tolist() == [True, False, True] and not a.mask[1].any()
    assert fc.keep_in.tolist() == [True, False, True, True, True]
    a, _, fc = graph.prune(posts, [above, -3.0, -3.0])
    assert a.keep_out.tolist() == [True] * 3 and a.mask.all() and fc.keep_in.all()


# -- files ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prior", ["gnj", "lu"])
@pytest.mark.parametrize("build, kind", [(models.resnet.build, Graph), (models.vgg.build, nn.Sequential)])
def test_a_compressed_graph_written_and_loaded_equals_the_masked_network(tmp_path, build, kind, prior):
    net, g = _tiny(build, (1, 28, 28), prior)
    thresholds = [3.0 if prior == "lu" else -3.0] * len(net.layers)
    posts = analyse_network(net, analyse(net))
    layers = prune_network(net, posts, thresholds, None)
    path = tmp_path / "model.bcz"
    codec.write_bcz(path, compressed_model(net, layers, None))
    loaded = codec.load(path)
    assert type(loaded) is kind
    dense = sum(la.mask.numel() for la in layers)
    assert sum(math.prod(s) for s in _shapes(loaded)) < dense  # physically smaller
    x = torch.randn(4, 1, 28, 28, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), _masked(net, layers)(x), rtol=1e-4, atol=1e-5)


def test_the_budget_search_on_a_graph_treats_a_layer_pruned_to_nothing_as_over_budget(tmp_path):
    net, g = _tiny(models.vgg.build, (1, 28, 28))  # a third of each layer's groups at log alpha 5, the rest -30
    x = torch.randn(64, 1, 28, 28, generator=g)
    with torch.no_grad():
        y = net.posterior_mean_network()(x).argmax(-1)  # the unpruned network is right on every example
    inputs = ThresholdInputs(net, analyse_network(net, analyse(net)), x, y)
    assert ValidationBudget._error(inputs, [-35.0] * len(net.layers)) == math.inf  # everything pruned: no network
    # within a budget of 100 points, each search ends at the grid's lowest, -8, which prunes the third only
    assert ValidationBudget(100.0).thresholds(inputs) == [-8.0] * len(net.layers)
    # conv2 loses every channel: the chain has no path left, so every layer is empty, which a .bcz cannot
    # store; the search counts the setting as over budget and compress refuses it in one line
    _set(net.layers[1], range(net.layers[1].n_groups), g)
    inputs = ThresholdInputs(net, analyse_network(net, analyse(net)), x, y)
    layers = prune_network(net, inputs.posts, [-3.0] * len(net.layers), None)
    assert {"conv2", "conv3"} <= {la.post.name for la in layers if la.empty}
    assert ValidationBudget._error(inputs, [-3.0] * len(net.layers)) == math.inf
    with pytest.raises(ConfigError, match=r"leave conv1, conv2, conv3, .*fc2 no weight"):  # every layer goes
        compress(net, tmp_path / "m.bcz", val=(x, y), thresholds=[-3.0] * len(net.layers))


# -- end to end ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("build", [models.resnet.build, models.vgg.build])
def test_evaluate_reproduces_compress(tmp_path, build):
    """A ResNet and a VGG with hand-set posteriors (a third of each layer's groups at log alpha 5, no training) on a
    tiny npz data folder, compressed from Python with the fold: evaluate's error on its test set is MODEL.json's and
    the one counted here from the loaded file's outputs."""
    net, _ = _tiny(build, (1, 28, 28))
    write_npz(tmp_path / "data" / "train.npz", 300, (1, 28, 28))
    write_npz(tmp_path / "data" / "test.npz", 400, (1, 28, 28), seed=1)
    data = load_data(tmp_path / "data", val_size=100)
    path = tmp_path / "model.bcz"
    summary = compress(net, path, val=(data.val.x, data.val.y), train=(data.train.x, data.train.y),
                       test=(data.test.x, data.test.y), thresholds=[-3.0] * len(net.layers),
                       metadata={"val_size": 100, "seed": 0})
    assert summary["architecture"] != "-".join(str(la.n_groups) for la in net.layers)  # something was pruned
    with torch.no_grad():
        wrong = int((pyro_bc.load(path)(data.test.x).argmax(1) != data.test.y).sum())
    assert evaluate_file(path, data=str(tmp_path / "data"))["error"] == summary["error_compressed"] == 100 * wrong / 400
    folds = {row["name"]: row["fold"] for row in json.loads((tmp_path / "model.json").read_text())["layers"]}
    assert folds["conv1"] == "off: padded convolution"
    assert folds["fc" if build is models.resnet.build else "fc2"] == "on"


@pytest.mark.parametrize("model", ["lenet300", "lenet5"])
def test_a_traced_sequence_and_its_chain_of_posteriors_prune_alike(model):
    """One pruning algorithm, two ways to build its graph: traced from the network, or laid out from the layers'
    posteriors alone (:meth:`BodyGraph.chain`). On a sequence they must keep the same weights."""
    torch.manual_seed(0)
    net = build_network(model, "gnj", input_shape=(1, 28, 28))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in net.layers:
            layer.prior.z_logvar.copy_(torch.randn(layer.prior.z_logvar.shape, generator=g) * 3 - 3)
    posts = analyse(net)
    thresholds = [-3.05, -2.95, -3.1, -2.9][: len(posts)]
    traced, chained = BodyGraph(net).prune(posts, thresholds), prune_chain(posts, thresholds)
    for a, b in zip(traced, chained):
        assert torch.equal(a.mask, b.mask) and torch.equal(a.keep_in, b.keep_in) and torch.equal(a.keep_out, b.keep_out)
    assert 0 < sum(int(a.mask.sum()) for a in traced) < sum(a.mask.numel() for a in traced)



def _random_gates(net, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in net.layers:
            layer.prior.z_logvar.copy_(torch.randn(layer.prior.z_logvar.shape, generator=g) * 3 - 3)
    return analyse(net)


@pytest.mark.parametrize("body, shape, nodes", [
    (lambda: nn.Sequential(BayesConv2d(2, 4, 1), nn.ReLU(), BayesConv2d(4, 4, 3, padding=1, groups=4), nn.ReLU(),
                           BayesConv2d(4, 2, 1), nn.ReLU(), BayesConv2d(2, 2, 1, groups=2), nn.ReLU(),
                           BayesConv2d(2, 2, 1), nn.ReLU(), BayesConv2d(2, 3, 1)), (2, 3, 3),
     [("0", (-1,), None, 1, False, False), ("2", (0,), None, 1, True, False), ("4", (1,), None, 1, False, False),
      ("6", (2,), None, 1, True, False), ("8", (3,), None, 1, False, False), ("10", (4,), None, 1, False, False)]),
    (lambda: nn.Sequential(BayesConv2d(4, 6, 1, groups=2), nn.ReLU(), nn.Flatten(), BayesLinear(6 * 9, 3)), (4, 3, 3),
     [("0", (-1,), None, 1, False, True), ("3.flatten", (0,), Op("flatten", {"start_dim": 1}), 9, False, False),
      ("3", (1,), None, 1, False, False)]),
    (lambda: nn.Sequential(BayesConv2d(2, 4, 1), nn.ReLU(), BayesConv2d(4, 6, 1, groups=2), nn.ReLU(),
                           BayesConv2d(6, 3, 1)), (2, 3, 3),
     [("0", (-1,), None, 1, False, False), ("2", (0,), None, 1, False, True), ("4", (1,), None, 1, False, False)]),
], ids=["depthwise", "grouped-first-then-flatten", "grouped-between"])
def test_a_chain_of_depthwise_or_grouped_convolutions_prunes_as_its_traced_network(body, shape, nodes):
    """The chain's nodes by hand (a depthwise convolution, of 4 or 2 groups, ties its outputs to its inputs, a plain
    one of as many inputs as outputs does not; a grouped one reads
    ``groups`` times its weights' input channels, a linear layer after a convolution reads it through a flatten of
    ``H W`` positions per channel), and its pruning is the traced network's."""
    torch.manual_seed(0)
    net = BayesianNet(body(), input_shape=shape)
    posts = _random_gates(net, 3)
    chain = BodyGraph.chain(posts)
    assert [(n.name, n.inputs, n.op, n.repeat, n.depthwise, n.grouped) for n in chain.nodes] == nodes
    assert len(chain.input_variables) == shape[0]
    for before, node in zip(chain.nodes, chain.nodes[1:]):  # depthwise: the same variables as the layer before
        assert torch.equal(node.variables, before.variables) == node.depthwise
    thresholds = [-3.0] * len(posts)
    traced, chained = BodyGraph(net).prune(posts, thresholds), prune_chain(posts, thresholds)
    for a, b in zip(traced, chained):
        assert torch.equal(a.mask, b.mask) and torch.equal(a.keep_in, b.keep_in) and torch.equal(a.keep_out, b.keep_out)
    assert 0 < sum(int(a.mask.sum()) for a in traced) < sum(a.mask.numel() for a in traced)
    for i, (layer, (name, *_, grouped)) in enumerate(zip(traced, [n for n in nodes if n[2] is None])):
        if grouped:  # a grouped convolution keeps every weight, input and output, and so do its neighbours' channels
            assert layer.mask.all() and layer.keep_in.dtype == layer.keep_out.dtype == torch.bool
            assert layer.keep_in.tolist() == [True] * layer.mask.shape[1] and layer.keep_out.all()
            assert i == 0 or traced[i - 1].keep_out.all()


def test_a_chain_whose_layers_do_not_line_up_is_refused():
    net = BayesianNet(nn.Sequential(BayesConv2d(2, 4, 1), BayesLinear(10, 3)), input_shape=None)  # never run
    with pytest.raises(ConfigError) as info:
        prune_chain(analyse(net), [0.0, 0.0])
    assert str(info.value) == "1 has 10 inputs, not a multiple of 0's 4 outputs: the body is not a plain sequence"


class Shuffle(nn.Module):
    """conv -> channel shuffle (view, transpose, view, as ShuffleNet writes it) -> chunk -> conv on one half."""

    def __init__(self):
        super().__init__()
        self.conv1 = BayesConv2d(2, 6, 1)
        self.conv2 = BayesConv2d(3, 2, 1)

    def forward(self, x):
        x = self.conv1(x)
        n, c, h, w = x.size()
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, -1, h, w)  # channels 0 3 1 4 2 5
        first, _ = x.chunk(2, dim=1)  # channels 0 3 1 of conv1
        return torch.flatten(self.conv2(first), 1)


def test_a_channel_shuffle_and_a_chunk_become_gathers_of_whole_channels(tmp_path):
    torch.manual_seed(0)
    net = BayesianNet(Shuffle(), input_shape=(2, 3, 3))
    g = torch.Generator().manual_seed(4)
    _set(net.layers[0], dropped=(3,), generator=g)  # conv1's channel 3 goes; channels 2, 4, 5 are never read
    _set(net.layers[1], generator=g)
    layers, module = _compress(net, [0.0, 0.0])
    assert layers[0].keep_out.tolist() == [True, True, False, False, False, False]
    assert layers[1].keep_in.tolist() == [True, False, True]  # it reads conv1's 0, 3, 1: 3 is gone
    x = torch.randn(4, 2, 3, 3, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(module(x), _masked(net, layers)(x), rtol=1e-5, atol=1e-5)
    graph = BodyGraph(net)
    gathers = [node.op.params["index"] for node in graph.nodes if node.op is not None and node.op.kind == "gather"]
    assert gathers == [[0, 3, 1]]  # the shuffle and the chunk's first half, one gather of conv1's channels


# -- traced functions ----------------------------------------------------------------------------------

class Then(nn.Module):
    """1 x 1 Bayesian convolutions from 2 to 4 channels (``h``) and to 1 channel (``o``), then ``f(h, o)`` (a module
    ``f``: ``f(h)``)."""

    def __init__(self, f):
        super().__init__()
        self.a, self.b, self.f = BayesConv2d(2, 4, 1), BayesConv2d(2, 1, 1), f

    def forward(self, x):
        h, o = self.a(x), self.b(x)
        return self.f(h) if isinstance(self.f, nn.Module) else self.f(h, o)


def stochastic_depth(x, p, mode, training=True):
    """torchvision.ops.stochastic_depth's signature (torchvision is optional here): the identity when not training."""
    return x if not training or p == 0 else x * (torch.rand(x.shape[0], 1, 1, 1) >= p) / (1 - p)


torch.fx.wrap("stochastic_depth")  # traced as one call, as torchvision's is


class _Scaled(nn.Module):
    """Its own parameter times the input: a tensor outside a layer."""

    def __init__(self):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(4, 1, 1))

    def forward(self, h):
        return h * self.gamma


class _Cumsum(nn.Module):
    def forward(self, h):
        return torch.cumsum(h, 1)


def _pool(kind, k, s, p):
    """A pooling op as the .bcz format writes it."""
    return Op(kind, {"kernel_size": k, "stride": s, "padding": p})

_MEAN1 = Op("adaptive_avgpool2d", {"output_size": 1})
_TRACED = [
    (lambda h, o: h + torch.relu(h), [Op("relu"), Op("add")]),
    (lambda h, o: torch.add(torch.relu(h), h), [Op("relu"), Op("add")]),
    (lambda h, o: h * torch.relu(h), [Op("relu"), Op("mul")]),
    (lambda h, o: torch.mul(h, h.mean((2, 3), keepdim=True)), [_MEAN1, Op("mul")]),
    (lambda h, o: h.mean((2, 3), keepdim=True) * h, [_MEAN1, Op("mul")]),
    (lambda h, o: F.adaptive_avg_pool2d(h, 2), [Op("adaptive_avgpool2d", {"output_size": 2})]),
    (lambda h, o: F.adaptive_avg_pool2d(h, output_size=3), [Op("adaptive_avgpool2d", {"output_size": 3})]),
    (lambda h, o: F.max_pool2d(h, 2), [_pool("maxpool2d", 2, 2, 0)]),
    (lambda h, o: F.max_pool2d(h, 3, 1, 1), [_pool("maxpool2d", 3, 1, 1)]),
    (lambda h, o: F.max_pool2d(h, kernel_size=3, stride=2, padding=1), [_pool("maxpool2d", 3, 2, 1)]),
    (lambda h, o: F.max_pool2d(h, 2, ceil_mode=True), [_pool("maxpool2d_ceil", 2, 2, 0)]),
    (lambda h, o: F.avg_pool2d(h, 2), [_pool("avgpool2d", 2, 2, 0)]),
    (lambda h, o: F.avg_pool2d(h, 3, 1, 1), [_pool("avgpool2d", 3, 1, 1)]),
    (lambda h, o: h.mean((2, 3)), [Op("spatial_mean")]),
    (lambda h, o: h.mean(dim=[-1, -2]), [Op("spatial_mean")]),
    (lambda h, o: torch.mean(h, (2, 3), True), [_MEAN1]),
    (lambda h, o: torch.mean(h, dim=(3, 2), keepdim=False), [Op("spatial_mean")]),
    (lambda h, o: torch.cat([h, o], 1), [Op("cat")]),
    (lambda h, o: torch.cat([h, o], dim=-3), [Op("cat")]),
    (lambda h, o: torch.cat([h], 1) + torch.relu(h), [Op("relu"), Op("add")]),
    (lambda h, o: torch.flatten(h, 1), [Op("flatten", {"start_dim": 1})]),
    (lambda h, o: h.flatten(1), [Op("flatten", {"start_dim": 1})]),
    (lambda h, o: torch.flatten(h, start_dim=1, end_dim=-1), [Op("flatten", {"start_dim": 1})]),
    (lambda h, o: torch.relu(h), [Op("relu")]),
    (lambda h, o: torch.relu(F.dropout(h, 0.2, training=False)), [Op("relu")]),
    (lambda h, o: torch.relu(F.dropout(h, 0.2, False)), [Op("relu")]),
    (lambda h, o: torch.relu(stochastic_depth(h, 0.2, "row", training=False)), [Op("relu")]),
    (nn.MaxPool2d(2), [_pool("maxpool2d", 2, 2, 0)]),
    (nn.MaxPool2d(3, 1, 1, ceil_mode=True), [_pool("maxpool2d_ceil", 3, 1, 1)]),
    (nn.AvgPool2d(3, 2, 1), [_pool("avgpool2d", 3, 2, 1)]),
    (nn.AdaptiveAvgPool2d(2), [Op("adaptive_avgpool2d", {"output_size": 2})]),
    (nn.Flatten(), [Op("flatten", {"start_dim": 1})]),
    (nn.Sequential(nn.Dropout(0.5), nn.Identity(), nn.ReLU()), [Op("relu")]),
]
_OUTSIDE = [
    (lambda h, o: h + o, "the function add"),
    (lambda h, o: h * o, "the function mul"),
    (lambda h, o: F.max_pool2d(h, 2, dilation=2), "the function max_pool2d"),
    (lambda h, o: F.avg_pool2d(h, 2, count_include_pad=False), "the function avg_pool2d"),
    (lambda h, o: F.avg_pool2d(h, 2, 2, 0, True), "the function avg_pool2d"),
    (lambda h, o: h.mean(2), "the tensor method .mean()"),
    (lambda h, o: h.mean(), "the tensor method .mean()"),
    (lambda h, o: h.mean((1, 2)), "the tensor method .mean()"),
    (lambda h, o: h.mean((2, 3), dtype=torch.float64), "the tensor method .mean()"),
    (lambda h, o: torch.cat([h, torch.relu(h)]), "the function cat"),
    (lambda h, o: torch.flatten(h), "the function flatten"),
    (lambda h, o: torch.flatten(h, 1, 2), "the function flatten"),
    (lambda h, o: h.flatten(0), "the tensor method .flatten()"),
    (lambda h, o: F.dropout(h, 0.2), "the function dropout"),
    (lambda h, o: F.dropout(h, 0.2, training=True), "the function dropout"),
    (nn.MaxPool2d(2, dilation=2), "the module MaxPool2d"),
    (nn.AvgPool2d(2, ceil_mode=True), "the module AvgPool2d"),
    (nn.AvgPool2d(2, count_include_pad=False), "the module AvgPool2d"),
    (nn.AvgPool2d(2, divisor_override=2), "the module AvgPool2d"),
    (nn.Flatten(1, 2), "the module Flatten"),
    (nn.Softmax(1), "the module Softmax"),
    (_Scaled(), "the function mul"),
    (nn.Sequential(_Scaled()), "the function mul"),  # named by its module's whole path, f.0
    (lambda h, o: stochastic_depth(h, 0.2, "row"), "the function stochastic_depth"),  # training by default
    (_Cumsum(), "the function cumsum"),
]
_POSITIONWISE = [  # outside the table, but each position computed alone: its channels pass through
    (lambda h: h + h, "the function add"),
    (lambda h: h * h, "the function mul"),
    (lambda h: torch.add(h, h, alpha=2), "the function add"),
    (lambda h: h + 1, "the function add"),
    (lambda h: h * 2, "the function mul"),
    (nn.LeakyReLU(0.2), "the module LeakyReLU"),
    (nn.ELU(), "the module ELU"),
    (nn.Mish(), "the module Mish"),
    (nn.PReLU(), "the module PReLU"),  # one slope for every channel
    (lambda h: F.softplus(h, beta=2), "the function softplus"),
    (lambda h: torch.dropout(h, 0.2, False), "the function dropout"),  # a builtin (no signature to bind): identity
]
_DRAWS = ("the function dropout", "the function stochastic_depth")  # in training mode: computed, but at random


@pytest.mark.parametrize("case", range(len(_TRACED)))
def test_each_form_of_a_supported_function_becomes_its_op(case):
    """Functional pools (positional, keyword and default arguments), spatial means (with and without keepdim, negative
    dims), per-channel products, concatenations along channels, flattens from dim 1, dropout traced in eval mode (no
    node), and the modules of the same: the ops are those the .bcz format defines for them (a pool's stride defaults
    to its kernel)."""
    f, expected = _TRACED[case]
    graph = BodyGraph(BayesianNet(Then(f), input_shape=(2, 5, 5)))
    assert [node.op for node in graph.nodes if node.layer is None] == expected


def _assert_masked(net: BayesianNet, layers: dict, module: nn.Module) -> None:
    """The compressed ``module`` computes the masked network (to float32 rounding) on seeded inputs."""
    x = torch.randn(3, 2, 5, 5, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(module(x), _masked(net, list(layers.values()))(x), rtol=1e-5, atol=1e-6)


def _outside_of(net: BayesianNet, graph: BodyGraph, dropped: dict) -> tuple[dict, nn.Module]:
    """Compress ``net`` at threshold -3 with the groups ``dropped`` (by layer site) gone; the compressed module must
    compute the masked network."""
    g = torch.Generator().manual_seed(3)
    for layer in net.layers:
        _set(layer, dropped.get(layer.site, ()), g)
    layers = prune_network(net, analyse_network(net, analyse(net), graph), [-3.0] * len(net.layers), None, graph)
    return {layer.post.name: layer for layer in layers}, compressed_module(net, layers, None, graph)


@pytest.mark.parametrize("case", range(len(_OUTSIDE)))
def test_an_op_outside_the_registry_keeps_what_it_reads_and_computes_as_traced(case):
    """A sum or product of two tensors of shapes that are not per-channel; pools with
    dilation, ceil mode (average) or without padding counted; means over other dims or with a dtype; concatenation
    along the batch; flattens not from dim 1 to the end; dropout in training mode; the modules of the same, a
    parameter used outside a layer, and a module with no op: each is one node that computes it as traced, named by
    the user's module path and what it calls, and every channel it reads stays (never a refusal)."""
    f, what = _OUTSIDE[case]
    torch.manual_seed(0)
    net = BayesianNet(Then(f), input_shape=(2, 5, 5))
    graph = BodyGraph(net)
    (node,) = [n for n in graph.nodes if n.program is not None]
    where = {nn.Sequential: "f.0"}.get(type(f), "f") if isinstance(f, nn.Module) else "the network's forward"
    assert (node.name, node.what) == (where, what)
    layers, module = _outside_of(net, graph, {"a": [1, 3]})
    assert layers["a"].keep_out.all() and not layers["a"].mask[1].any()  # channel 1: no weight, still computed
    if what not in _DRAWS:
        _assert_masked(net, layers, module)


class _Through(nn.Module):
    """A 1 x 1 Bayesian convolution from 2 to 4 channels, ``f``, then one from 4 to 3."""

    def __init__(self, f):
        super().__init__()
        self.a, self.c, self.f = BayesConv2d(2, 4, 1), BayesConv2d(4, 3, 1), f

    def forward(self, x):
        return self.c(self.f(self.a(x)))


@pytest.mark.parametrize("f, what, through", [*((f, what, True) for f, what in _POSITIONWISE),
                                              (nn.PReLU(4), "the module PReLU", False),  # a slope per channel
                                              (nn.Softmax(1), "the module Softmax", False)])
def test_an_op_outside_the_registry_that_computes_each_position_alone_lets_its_channels_through(f, what, through):
    """An activation outside the table (its core ATen operators all pointwise, no constant per channel) passes the
    channels through as ReLU does: channels 1 and 3 of ``a`` go, with ``c``'s weights reading them, and the compressed
    module still computes the masked network. A per-channel slope or a softmax across channels keeps them all."""
    torch.manual_seed(0)
    net = BayesianNet(_Through(f), input_shape=(2, 5, 5))
    graph = BodyGraph(net)
    (node,) = [n for n in graph.nodes if n.program is not None]
    assert (node.what, node.keeps_all) == (what, not through)
    layers, module = _outside_of(net, graph, {"a": [1, 3]})
    assert layers["a"].keep_out.tolist() == ([True, False, True, False] if through else [True] * 4)
    assert layers["c"].keep_in.tolist() == layers["a"].keep_out.tolist()
    _assert_masked(net, layers, module)


class _EndsOutside(nn.Module):
    """Two Bayesian convolutions, then an op outside the registry that computes the network's output and mixes its
    positions (a cumulative sum over the rows): its own output names no channels."""

    def __init__(self):
        super().__init__()
        self.a, self.c = BayesConv2d(2, 4, 1), BayesConv2d(4, 3, 1)

    def forward(self, x):
        return self.c(torch.relu(self.a(x))).cumsum(2)


def test_a_network_whose_output_an_op_outside_the_registry_computes_still_prunes_the_layers_before_it(tmp_path):
    """It pruned nothing: the output's channels, which such an op leaves unnamed, were taken as every channel of the
    network. Channels 1 and 3 of ``a`` go; ``c``'s outputs, which the op reads, all stay; the file computes the masked
    network."""
    torch.manual_seed(0)
    net = BayesianNet(_EndsOutside(), input_shape=(2, 5, 5))
    graph = BodyGraph(net)
    assert graph.nodes[-1].program is not None and graph.nodes[-1].variables is None
    layers, module = _outside_of(net, graph, {"a": [1, 3]})
    assert layers["a"].keep_out.tolist() == [True, False, True, False] and layers["c"].keep_out.all()
    _assert_masked(net, layers, module)
    x = torch.randn(3, 2, 5, 5, generator=torch.Generator().manual_seed(5))
    summary = _file_against_masked(net, {"a": [1, 3]}, x, tmp_path / "m.bcz")
    assert [row["groups_kept"] for row in summary["layers"]] == [2, 3]


class _OwnScale(Then):
    """The body's own parameter used in its forward."""

    def __init__(self):
        super().__init__(None)
        self.gamma = nn.Parameter(torch.ones(4, 1, 1))

    def forward(self, x):
        h, _ = self.a(x), self.b(x)
        return h * self.gamma


def test_a_tensor_of_the_body_itself_is_named_as_the_network():
    graph = BodyGraph(BayesianNet(_OwnScale(), input_shape=(2, 5, 5)))
    assert [(n.name, n.what) for n in graph.nodes if n.program is not None] == [
        ("the network's forward", "the function mul")]


def test_deterministic_modules_are_nodes_of_their_own_outputs():
    """A plain convolution: new variables, one per output channel (3, not the 5 positions of a row), all kept; a
    plain linear layer reading (batch, features) likewise, and on images one per output along the last axis; a LayerNorm over the last two
    dimensions leaves the channels free, over the last three it keeps them."""
    nodes = BodyGraph(BayesianNet(Then(nn.Conv2d(4, 3, 1)), input_shape=(2, 5, 5))).nodes
    assert (nodes[-1].name, len(nodes[-1].variables), nodes[-1].keeps_all) == ("f", 3, True)
    nodes = BodyGraph(BayesianNet(Then(nn.Sequential(nn.Flatten(), nn.Linear(100, 3))), input_shape=(2, 5, 5))).nodes
    assert (nodes[-1].name, len(nodes[-1].variables), nodes[-1].keeps_all) == ("f.1", 3, True)
    nodes = BodyGraph(BayesianNet(Then(nn.Linear(5, 3)), input_shape=(2, 5, 5))).nodes  # along the last axis
    assert (nodes[-1].name, len(nodes[-1].variables), nodes[-1].keeps_all, nodes[-1].axis) == ("f", 3, True, -1)
    for shape, across in (((5, 5), False), ((4, 5, 5), True)):
        nodes = BodyGraph(BayesianNet(Then(nn.LayerNorm(shape)), input_shape=(2, 5, 5))).nodes
        assert (nodes[-1].name, nodes[-1].keeps_all) == ("f", across)
        assert torch.equal(nodes[-1].variables, nodes[0].variables)


def test_reshapes_that_select_whole_channels_are_gathers_and_others_are_ops_outside_the_registry():
    """Indexing and chunks along dim 1 keep whole channels (a gather of them); a transpose of the spatial dimensions
    or a reshape across channels moves positions between channels: an op outside the registry, which keeps them."""
    for f, index in ((lambda h, o: torch.relu(h[:, [2, 0]]), [2, 0]), (lambda h, o: torch.relu(h.chunk(2, 1)[1]), [2, 3])):
        graph = BodyGraph(BayesianNet(Then(f), input_shape=(2, 5, 5)))
        assert [n.op for n in graph.nodes if n.layer is None] == [Op("gather", {"index": index}), Op("relu")]
        assert torch.equal(graph.nodes[-1].variables, graph.nodes[0].variables[index])
    for f, name in ((lambda h, o: torch.relu(h.transpose(2, 3)), "transpose"),
                    (lambda h, o: torch.relu(h.reshape(-1, 2, 2, 25)), "reshape")):
        torch.manual_seed(0)
        net = BayesianNet(Then(f), input_shape=(2, 5, 5))
        graph = BodyGraph(net)
        assert [(n.name, n.what) for n in graph.nodes if n.program is not None] == [
            ("the network's forward", f"the tensor method .{name}()")]
        assert graph.nodes[-1].op == Op("relu") and graph.nodes[-1].variables is None  # positions nothing names
        layers, module = _outside_of(net, graph, {"a": [0]})
        assert layers["a"].keep_out.all()
        _assert_masked(net, layers, module)


def _by_rank(h, o):
    """Branches on what the input's shape fixes, as PyTorch's transformer layers do."""
    if h.dim() != 4 or len(h.shape) != 4 or h.is_nested:
        return h * 0
    return torch.cat([torch.relu(h), o], 1)


def test_a_forward_may_branch_on_sizes_and_the_graph_keeps_the_branch_taken():
    torch.manual_seed(0)
    net = BayesianNet(Then(_by_rank), input_shape=(2, 5, 5))
    graph = BodyGraph(net)
    assert [n.op.kind for n in graph.nodes if n.layer is None] == ["relu", "cat"]
    layers, module = _outside_of(net, graph, {"a": [1]})
    _assert_masked(net, layers, module)


class _BatchNormThenReLU(nn.BatchNorm2d):
    """BatchNorm with an activation in its own forward (as timm's BatchNormAct2d), its normalisation by F.batch_norm."""

    def forward(self, x):
        return torch.relu(F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                       self.training, self.momentum, self.eps))


class _NormActs(nn.Module):
    """A layer followed by a BatchNorm with its own activation (folded), and one after a concatenation (a per-channel
    scale and shift)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = BayesConv2d(2, 4, 1, bias=False), BayesConv2d(2, 3, 1)
        self.bn_a, self.bn_cat = _BatchNormThenReLU(4), _BatchNormThenReLU(7)
        self.c = BayesConv2d(7, 3, 1)

    def forward(self, x):
        return self.c(self.bn_cat(torch.cat([self.bn_a(self.a(x)), self.b(x)], 1)))


def test_a_batchnorm_with_its_own_activation_folds_and_keeps_the_activation(tmp_path):
    """It was folded as a plain BatchNorm and its activation dropped: the file computed another function (timm's
    EfficientNet, 1e6 times off). Now its F.batch_norm folds into ``a`` and the ReLU stays; after the concatenation it
    is a per-channel scale and shift, then the ReLU; the file computes the masked network, and, with nothing pruned,
    the network itself."""
    torch.manual_seed(0)
    net = BayesianNet(_NormActs(), input_shape=(2, 5, 5))
    _randomise_batchnorm(net, torch.Generator().manual_seed(2))
    with torch.no_grad():  # bn_cat's ReLU passes what bn_a's ReLU clips: without the latter the outputs differ
        net.body.bn_cat.bias.fill_(3.0)
    graph = BodyGraph(net)
    assert graph.batchnorm_names == {0: "bn_a"}
    assert [n.op.kind if n.op else ("affine" if n.affine else n.name) for n in graph.nodes if n.layer is None] == [
        "relu", "cat", "affine", "relu"]
    x = torch.randn(3, 2, 5, 5, generator=torch.Generator().manual_seed(5))
    summary = _file_against_masked(net, {"a": [1], "b": [0]}, x, tmp_path / "m.bcz")
    with torch.no_grad():  # the pruned network keeps bn_a's activation, its normalisation made the identity
        torch.testing.assert_close(pyro_bc.pruned_network(net, summary)(x), codec.load(tmp_path / "m.bcz")(x),
                                   rtol=0.02, atol=0.02)
    for layer in net.layers:
        _set(layer, (), torch.Generator().manual_seed(4))
    pyro_bc.compress(net, tmp_path / "all.bcz", thresholds=[-3.0] * 3)
    with torch.no_grad():
        torch.testing.assert_close(codec.load(tmp_path / "all.bcz")(x), net.posterior_mean_network().eval()(x),
                                   rtol=0.02, atol=0.02)


class _ModulesMadeInTheForward(nn.Module):
    """Modules constructed in the forward and called at once (Hugging Face's DistilBERT: ``nn.ReLU()(x)``)."""

    def __init__(self):
        super().__init__()
        self.a, self.c = BayesConv2d(2, 4, 1), BayesConv2d(4, 3, 1)

    def forward(self, x):
        return self.c(nn.MaxPool2d(1)(nn.ReLU()(self.a(x))))


class _ReadsDeviceAndDtype(nn.Module):
    """A forward that reads its tensors' device and dtype as values (timm's EfficientViT: autocast off by device)."""

    def __init__(self):
        super().__init__()
        self.a, self.c = BayesConv2d(2, 4, 1), BayesConv2d(4, 3, 1)

    def forward(self, x):
        h = torch.relu(self.a(x))
        with torch.autocast(device_type=h.device.type, enabled=False):
            h = h.to(x.dtype)
        return self.c(h)


@pytest.mark.parametrize("body", [_ModulesMadeInTheForward, _ReadsDeviceAndDtype], ids=["made-in-forward", "device"])
def test_forwards_that_plain_fx_cannot_trace_prune_as_traced(body):
    """Both were refused: a module made in the forward (``NameError: module is not installed as a submodule``; it is
    traced into) and autocast given a traced attribute, not the string ``"cpu"`` (a tensor's device and dtype are its
    example's). Channel 1 of ``a`` prunes through what follows."""
    torch.manual_seed(0)
    net = BayesianNet(body(), input_shape=(2, 5, 5))
    graph = BodyGraph(net)
    assert graph.nodes[1].op.kind == "relu"
    layers, module = _outside_of(net, graph, {"a": [1]})
    assert layers["a"].keep_out.tolist() == [True, False, True, True]
    _assert_masked(net, layers, module)


class _OptionalArguments(nn.Module):
    """A forward with arguments after the input, at defaults that training and compression use."""

    def __init__(self):
        super().__init__()
        self.a, self.c = BayesConv2d(2, 4, 1), BayesConv2d(4, 3, 1)

    def forward(self, x, mask=None, scale: float = 2.0, *, return_features: bool = False):
        h = torch.relu(self.a(x))
        if mask is not None:
            h = h * mask
        out = self.c(h) * scale
        return (out, h) if return_features else out


def test_a_forward_with_arguments_after_the_input_is_traced_at_their_defaults(tmp_path):
    """It was refused (``KeyError: 'tensor_meta'``: the second argument was taken for a second input). The graph has
    one input; channels 1 and 3 of ``a`` go; the file computes the masked network called with the input alone."""
    torch.manual_seed(0)
    net = BayesianNet(_OptionalArguments(), input_shape=(2, 5, 5))
    assert len(BodyGraph(net).input_variables) == 2  # one input, of two channels
    x = torch.randn(3, 2, 5, 5, generator=torch.Generator().manual_seed(5))
    summary = _file_against_masked(net, {"a": [1, 3]}, x, tmp_path / "m.bcz")
    assert [row["groups_kept"] for row in summary["layers"]] == [2, 3]


class _SlicesABuffer(nn.Module):
    """A buffer sliced by a size of the traced tensor (as a causal mask is cut to the sequence's length)."""

    def __init__(self):
        super().__init__()
        self.a = BayesConv2d(2, 4, 1)
        self.register_buffer("scale", torch.arange(1.0, 9.0).reshape(1, 8, 1, 1))

    def forward(self, x):
        h = self.a(x)
        return torch.relu(h * self.scale[:, :h.shape[1]])


def test_a_buffer_sliced_by_a_size_is_traced_and_computed_as_the_network_does():
    torch.manual_seed(0)
    net = BayesianNet(_SlicesABuffer(), input_shape=(2, 5, 5))
    graph = BodyGraph(net)
    layers, module = _outside_of(net, graph, {"a": [2]})
    _assert_masked(net, layers, module)


@pytest.mark.parametrize("f", [lambda h, o: h if h.sum() > 0 else o, lambda h, o: h if h.max().item() > 0 else o],
                         ids=["tensor", "item"])
def test_a_branch_on_a_tensors_values_is_refused(f):
    """The traced example fixes sizes, not values: a branch on values (or a number read from them) stays refused."""
    torch.manual_seed(0)
    with pytest.raises(ConfigError, match="^cannot trace the network with torch.fx: TraceError: symbolically traced "
                                          "variables cannot be used as inputs to control flow$"):
        BodyGraph(BayesianNet(Then(f), input_shape=(2, 5, 5)))


class _Encoder(nn.Module):
    """PyTorch's own transformer encoder between two linear layers, on (batch, tokens, features)."""

    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0, batch_first=True)
        self.inp, self.encoder, self.head = nn.Linear(5, 8), nn.TransformerEncoder(layer, 2), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.encoder(self.inp(x)).mean(1))


def _file_against_masked(net: BayesianNet, dropped: dict, x: torch.Tensor, path) -> dict:
    """``net`` with the groups ``dropped`` (by layer site) given a high log alpha, compressed at threshold -3 into
    ``path``; asserts that the file computes the masked network on ``x`` (to the rounding of its weights) and returns
    the compression's summary."""
    g = torch.Generator().manual_seed(3)
    for layer in net.layers:
        _set(layer, dropped.get(layer.site, ()), g)
    thresholds = [-3.0] * len(net.layers)
    summary = pyro_bc.compress(net, path, thresholds=thresholds)
    masked = _masked(net, prune_network(net, analyse_network(net, analyse(net)), thresholds, None))
    with torch.no_grad():
        torch.testing.assert_close(codec.load(path)(x), masked(x), rtol=0.02, atol=0.02)
    return summary


def test_pytorchs_transformer_encoder_is_traced_into_and_its_hidden_units_are_pruned(tmp_path):
    """nn.TransformerEncoder (a module of torch.nn, which the tracer otherwise keeps whole, and whose forward branches
    on its input's rank) holds Bayesian layers: the graph reaches them, prunes the feed-forward hidden units whose
    log alpha is high, and the file computes the masked network; draws of the Bayesian network in eval mode call
    the layers (PyTorch's fused inference path would read their ``weight``, which a Bayesian layer has none of)."""
    torch.manual_seed(0)
    net = pyro_bc.bayesianize(_Encoder(), input_shape=(6, 5))
    assert net.layer_names == ["inp", "encoder.layers.0.linear1", "encoder.layers.0.linear2",
                               "encoder.layers.1.linear1", "encoder.layers.1.linear2", "head"]
    x = torch.randn(4, 6, 5, generator=torch.Generator().manual_seed(4))
    # linear layers' groups are their inputs: linear2's are linear1's hidden units
    summary = _file_against_masked(net, {f"encoder.layers.{i}.linear2": [0, 5, 7] for i in (0, 1)}, x,
                                   tmp_path / "m.bcz")
    assert [row["groups_kept"] for row in summary["layers"]] == [5, 8, 9, 8, 9, 8]
    draws = pyro_bc.predictive(net.eval(), x, samples=3)
    assert draws.shape == (4, 3) and torch.allclose(draws.sum(1), torch.ones(4))


class _PaddedEncoder(nn.Module):
    """Token ids (0 the padding) embedded, then nn.TransformerEncoder masking the padding, then a mean over the tokens
    that are not padding (PyTorch's fused path for eval mode gives zeros at padding, its other path does not)."""

    def __init__(self, batch_first=True):
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0, batch_first=batch_first)
        self.embed, self.encoder, self.head = nn.Embedding(11, 8, padding_idx=0), nn.TransformerEncoder(layer, 1), \
            nn.Linear(8, 3)
        self.batch_first = batch_first

    def forward(self, ids):
        h = self.embed(ids) if self.batch_first else self.embed(ids).transpose(0, 1)
        h = self.encoder(h, src_key_padding_mask=ids == 0)
        kept = (ids != 0).unsqueeze(-1) if self.batch_first else (ids != 0).t().unsqueeze(-1)
        return self.head((h * kept).sum(1 if self.batch_first else 0) / kept.sum(1 if self.batch_first else 0))


def test_a_token_transformer_masking_its_padding_compresses_to_the_masked_network(tmp_path):
    """The padding mask is a second input of the attention's program, filled in place by PyTorch's mask conversion
    (the program computes on copies); the file computes the masked network on ids with padding. With the sequence
    first, the attention's inputs do not start with the batch: one line says so."""
    torch.manual_seed(0)
    net = pyro_bc.bayesianize(_PaddedEncoder(), input_shape=(6,), input_dtype=torch.int64)
    ids = torch.randint(1, 11, (5, 6), generator=torch.Generator().manual_seed(4))
    ids[:, 4:] = 0
    summary = _file_against_masked(net, {"encoder.layers.0.linear2": [1, 2]}, ids, tmp_path / "m.bcz")
    assert [row["groups_kept"] for row in summary["layers"]] == [8, 10, 8]
    seq_first = pyro_bc.bayesianize(_PaddedEncoder(batch_first=False), input_shape=(6,), input_dtype=torch.int64)
    with pytest.raises(ConfigError, match=r"^cannot compress encoder\.layers\.0\.linear1: the layer reads a tensor whose "
                                          r"first dimension is not the batch \(a sequence first, .*batch_first=True"):
        pyro_bc.compress(seq_first, tmp_path / "s.bcz", thresholds=[-3.0] * 3)


class _CausalEncoder(nn.Module):
    """nn.TransformerEncoder given a causal mask made in the forward by PyTorch's own helper."""

    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0, batch_first=True, norm_first=True)
        self.embed, self.head = nn.Embedding(11, 8), nn.Linear(8, 3)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)

    def forward(self, ids):
        causal = nn.Transformer.generate_square_subsequent_mask(ids.size(1), device=ids.device)
        return self.head(self.encoder(self.embed(ids), mask=causal, is_causal=True)[:, -1])


def test_a_causal_mask_given_to_pytorchs_encoder_is_traced_and_the_file_computes_the_masked_network(tmp_path):
    """PyTorch's mask checks ask the mask its dtype through a function that takes only real tensors (it stopped the
    trace); the mask, made from the sequence's length, is computed once into the attention's program."""
    torch.manual_seed(0)
    net = pyro_bc.bayesianize(_CausalEncoder(), input_shape=(6,), input_dtype=torch.int64)
    ids = torch.randint(0, 11, (5, 6), generator=torch.Generator().manual_seed(4))
    summary = _file_against_masked(net, {"encoder.layers.0.linear2": [2, 5]}, ids, tmp_path / "m.bcz")
    assert [row["groups_kept"] for row in summary["layers"]] == [8, 8, 10]  # head, linear1, linear2: made in that order


class _CausalSelfAttention(nn.Module):
    """A transformer written from scratch (as nanoGPT's): one projection split into queries, keys and values, heads by
    a reshape, a causal mask buffer cut to the sequence's length."""

    def __init__(self, width=8, heads=2, tokens=6):
        super().__init__()
        self.heads, self.qkv, self.out = heads, nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.register_buffer("causal", torch.tril(torch.ones(tokens, tokens)).view(1, 1, tokens, tokens))

    def forward(self, x):
        b, t, c = x.size()
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in self.qkv(x).split(c, dim=2))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))
        scores = scores.masked_fill(self.causal[:, :, :t, :t] == 0, float("-inf"))
        return self.out((scores.softmax(-1) @ v).transpose(1, 2).contiguous().view(b, t, c))


class _TinyGPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(13, 8), nn.Embedding(6, 8)
        self.norm1, self.attention, self.norm2 = nn.LayerNorm(8), _CausalSelfAttention(), nn.LayerNorm(8)
        self.mlp, self.head = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)), nn.Linear(8, 3)

    def forward(self, ids):
        x = self.tokens(ids) + self.positions(torch.arange(ids.shape[1], device=ids.device))
        x = x + self.attention(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return self.head(x[:, -1, :])


def test_a_transformer_written_from_scratch_compresses_to_the_masked_network(tmp_path):
    """Its MLP's hidden units are pruned; the heads' reshape keeps the attention's projections whole."""
    torch.manual_seed(0)
    net = pyro_bc.bayesianize(_TinyGPT(), input_shape=(6,), input_dtype=torch.int64)
    ids = torch.randint(0, 13, (5, 6), generator=torch.Generator().manual_seed(4))
    summary = _file_against_masked(net, {"mlp.2": [3, 9, 10]}, ids, tmp_path / "m.bcz")
    assert [row["name"] for row in summary["layers"]] == ["attention.qkv", "attention.out", "mlp.0", "mlp.2", "head"]
    assert [row["groups_kept"] for row in summary["layers"]] == [8, 8, 8, 13, 8]


class _StackedHeadsAttention(nn.Module):
    """Queries, keys and values stacked in front of the batch, then unbound (as timm's Attention, and so its ViTs):
    ``qkv(x).reshape(b, t, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)``."""

    def __init__(self, width=8, heads=2):
        super().__init__()
        self.heads, self.qkv, self.out = heads, nn.Linear(width, 3 * width), nn.Linear(width, width)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, c))


class _TinyViT(nn.Module):
    def __init__(self):
        super().__init__()
        self.patches, self.norm1, self.attention = nn.Conv2d(1, 8, 2, stride=2), nn.LayerNorm(8), _StackedHeadsAttention()
        self.norm2, self.mlp = nn.LayerNorm(8), nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.patches(x).flatten(2).transpose(1, 2)
        x = x + self.attention(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return self.head(x.mean(1))


def test_attention_that_stacks_queries_keys_and_values_in_front_of_the_batch_compresses_to_the_masked_network(
        tmp_path):
    """It was refused (an op's input had the batch second, which cannot be exported with a free batch size): such a
    tensor is computed inside the ops that read it, each of which has the batch first."""
    torch.manual_seed(0)
    net = pyro_bc.bayesianize(_TinyViT(), input_shape=(1, 6, 6))
    x = torch.randn(5, 1, 6, 6, generator=torch.Generator().manual_seed(4))
    summary = _file_against_masked(net, {"mlp.2": [3, 9, 10]}, x, tmp_path / "m.bcz")
    assert [row["groups_kept"] for row in summary["layers"]] == [8, 8, 8, 8, 13, 8]


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_a_plain_convolution_padding_other_than_with_zeros_is_computed_as_traced(mode):
    """A .bcz layer node pads with zeros; such a convolution is an op outside the registry (a program), which keeps
    the channels it reads, and the file computes the masked network (it was refused)."""
    torch.manual_seed(0)
    body = nn.Sequential(BayesConv2d(2, 4, 1), nn.Conv2d(4, 3, 3, padding=1, padding_mode=mode), nn.ReLU(),
                         BayesConv2d(3, 2, 1))
    net = BayesianNet(body, input_shape=(2, 5, 5))
    graph = BodyGraph(net)
    assert next((n.name, n.program is not None) for n in graph.nodes if n.layer is None) == ("1", True)
    layers, module = _outside_of(net, graph, {"0": [1]})
    assert layers["0"].keep_out.all() and not layers["0"].mask[1].any()  # read by the program: kept, zero
    _assert_masked(net, layers, module)


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = BayesConv2d(2, 2, 1)

    def forward(self, x):
        return self.a(self.a(x))


class _Unused(Then):
    def __init__(self):
        super().__init__(lambda h, o: torch.cat([h, o], 1))
        self.unused = BayesConv2d(2, 2, 1)


class _PatchesInTheBatch(nn.Module):
    """The batch merged with positions before a layer (as a MobileViT's patches)."""

    def __init__(self):
        super().__init__()
        self.a, self.c = BayesConv2d(2, 4, 1), BayesLinear(4, 3)

    def forward(self, x):
        h = self.a(x)
        return self.c(h.permute(0, 2, 3, 1).reshape(-1, 4)).reshape(x.shape[0], -1)


def _raises(message):
    def f(h, o):
        raise ValueError(message)
    return f


@pytest.mark.parametrize("body, message", [
    (lambda: Then(lambda h, o: h), "the network's output must be one tensor, the last one computed"),
    (lambda: Then(lambda h, o: (h, o)), "the network's output must be one tensor, the last one computed"),
    (lambda: _Twice(), "layer a is called more than once: shared layers are not supported"),
    (lambda: Then(nn.Flatten(2)), "f: only flattening from dim 1 is supported"),
    (lambda: Then(_raises("boom\nsecond line")), "cannot trace the network with torch.fx: ValueError: boom"),
    (lambda: _PatchesInTheBatch(), ("cannot compress c: the layer reads a tensor whose first dimension is not the "
                                    "batch (a sequence first, or the batch merged with positions, as a MobileViT's "
                                    "patches are): pyro-bc needs the batch first in what a layer reads "
                                    "(batch_first=True for PyTorch's transformer layers)")),
], ids=["not-last", "tuple", "shared", "flatten-2", "trace", "patches-in-batch"])
def test_bodies_the_graph_cannot_hold_are_refused_in_one_line(body, message):
    torch.manual_seed(0)
    with pytest.raises(ConfigError) as info:
        BodyGraph(BayesianNet(body(), input_shape=(2, 5, 5)))
    assert str(info.value) == message


def test_a_bayesian_layer_the_forward_does_not_call_is_left_plain_and_the_graph_holds_the_rest():
    torch.manual_seed(0)
    body = _Unused()
    with pytest.warns(UserWarning, match="stay deterministic: unused$"):
        net = BayesianNet(body, input_shape=(2, 5, 5))
    assert net.layer_names == ["a", "b"] and type(body.unused) is nn.Conv2d
    graph = BodyGraph(net)
    assert [node.name for node in graph.layer_nodes] == ["a", "b"]


def test_a_bayesian_linear_layer_on_images_reads_them_whole_and_an_unknown_input_shape_is_refused():
    """torch applies a linear layer to images along their width: positions no channel variable names, so it reads
    all of them (the convolution before it keeps every channel) and prunes only its own outputs."""
    torch.manual_seed(0)
    body = nn.Sequential(BayesConv2d(2, 4, 1), BayesLinear(5, 3))
    net = BayesianNet(body, input_shape=(2, 5, 5))
    graph = BodyGraph(net)
    assert graph.layer_nodes[1].reads_whole and graph.layer_nodes[1].axis == -1
    layers, module = _outside_of(net, graph, {"0": [1], "1": [2]})
    assert layers["0"].keep_out.all() and layers["1"].keep_in.all()
    _assert_masked(net, layers, module)
    with pytest.raises(ConfigError) as info:
        BodyGraph(BayesianNet(body, input_shape=None))
    assert str(info.value) == "the network's input shape is unknown: train it first or give input_shape"


class _ViewFlatten(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.fc = BayesConv2d(2, 4, 1), BayesLinear(4 * 25, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.fc(h.view(h.size(0), -1))


def test_a_view_that_flattens_from_dim_1_is_a_flatten_and_prunes_through():
    """``x.view(len(x), -1)`` after a convolution is the flatten it stands for: the linear layer's inputs follow
    the convolution's channels, 25 positions each."""
    torch.manual_seed(0)
    net = BayesianNet(_ViewFlatten(), input_shape=(2, 5, 5))
    graph = BodyGraph(net)
    assert [n.op for n in graph.nodes if n.layer is None] == [Op("relu"), Op("flatten", {"start_dim": 1})]
    layers, module = _outside_of(net, graph, {"a": [1, 3]})
    assert layers["a"].keep_out.tolist() == [True, False, True, False]
    assert layers["fc"].keep_in.tolist() == [True] * 25 + [False] * 25 + [True] * 25 + [False] * 25
    _assert_masked(net, layers, module)


class _Recurrent(nn.Module):
    """A GRU over the columns of a convolution's output: a module returning a tuple, one item of it used."""

    def __init__(self):
        super().__init__()
        self.a, self.g, self.fc = BayesConv2d(2, 4, 1), nn.GRU(4, 3, batch_first=True), BayesLinear(3, 2)

    def forward(self, x):
        out, _ = self.g(torch.relu(self.a(x)).mean(2).transpose(1, 2))
        return self.fc(out[:, -1])


def test_a_multi_output_module_is_one_op_named_by_its_path_and_masks_are_computed_as_traced():
    torch.manual_seed(0)
    net = BayesianNet(_Recurrent(), input_shape=(2, 5, 5))
    graph = BodyGraph(net)
    named = [(n.name, n.what) for n in graph.nodes if n.program is not None]
    assert named.count(("g", "the module GRU")) == 1, named  # once: its unused second output is not computed
    layers, module = _outside_of(net, graph, {"a": [0], "fc": [1]})
    assert layers["a"].keep_out.all()
    _assert_masked(net, layers, module)
    masked = BayesianNet(Then(lambda h, o: torch.where(h > 0, h, o)), input_shape=(2, 5, 5))  # a bool input
    layers, module = _outside_of(masked, BodyGraph(masked), {"a": [2]})
    _assert_masked(masked, layers, module)
