"""The fold of pruned inputs into the biases, checked against references built by hand from the data.

A convolution whose input channel is constant over positions (a pruned channel of the layer before, which outputs
``relu(bias)`` everywhere) loses nothing when that channel is pruned and the constant's contribution, summed over
each filter's taps, goes into the bias. So the compressed network must compute what the unpruned posterior-mean
network computes, and both must equal a masked network whose bias the test adds by hand.
"""

import pytest
import torch
from torch import nn

import pyro_bc
from pyro_bc.compression.graph import analyse_network
from pyro_bc.compression.posterior import analyse
from pyro_bc.compression.pruned import check_pruning, layer_input_means, summary_pruning

CONSTANT_BIAS = 0.7  # the pruned channel's bias: it outputs relu(0.7) at every position


def _network(padding: int = 0) -> pyro_bc.nn.network.BayesianNet:
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Conv2d(3, 4, 3, padding=padding), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * (6 + 2 * padding) ** 2, 5))
    net = pyro_bc.bayesianize(dense, "gnj", input_shape=(1, 10, 10))
    conv1 = net.layers[0]
    with torch.no_grad():
        conv1.weight_mu[1] = 0.0  # channel 1 reads nothing: its output is its bias at every position
        conv1.bias_mu[1] = CONSTANT_BIAS
        for layer in net.layers:  # every group certain (log alpha -20, 23 mantissa bits) ...
            layer.prior.z_mu.fill_(1.0)
            layer.prior.z_logvar.fill_(-20.0)
            layer.weight_logvar.fill_(-40.0)
        conv1.prior.z_logvar[1] = 10.0  # ... but conv1's channel 1 (log alpha 10)
    return net


def _data(n: int = 64, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 10, 10, generator=generator), torch.randint(0, 5, (n,), generator=generator)


def test_conv_input_means_are_per_position_means_computed_from_the_data():
    net = _network()
    x, _ = _data()
    mean_net = net.posterior_mean_network()
    with torch.no_grad():
        conv2_input = mean_net[1](mean_net[0](x))  # (n, 3, 8, 8)
        fc_input = mean_net[4](mean_net[3](mean_net[2](conv2_input)))
    means = layer_input_means(net, x, batch_size=10)  # batches of 10 over 64 examples: a ragged last batch
    torch.testing.assert_close(means[0], x.double().mean((0, 2, 3)))
    torch.testing.assert_close(means[1], conv2_input.double().mean((0, 2, 3)))
    torch.testing.assert_close(means[2], fc_input.double().mean(0))
    assert means[1][1].item() == pytest.approx(CONSTANT_BIAS, rel=1e-6)  # the constant channel's mean is itself


def test_folding_a_constant_channel_into_an_unpadded_convolution_is_exact(tmp_path):
    net = _network()
    x, y = _data()
    reference = net.posterior_mean_network()
    summary = pyro_bc.compress(net, tmp_path / "m.bcz", val=(x, y), train=(x, y), thresholds=[0.0, 100.0, 100.0])
    assert summary["layers"][0]["kept_groups"] == [0, 2]
    assert summary["layers"][1]["fold"] == "on" and summary["fold_pruned_inputs"] is True

    # by hand: channel 1 masked out, its constant times each conv2 filter's summed taps added to conv2's bias
    masked = net.posterior_mean_network()
    with torch.no_grad():
        masked[0].weight[1] = 0.0
        masked[0].bias[1] = 0.0
        masked[2].bias += CONSTANT_BIAS * masked[2].weight[:, 1].sum((1, 2))
    loaded = pyro_bc.load(tmp_path / "m.bcz")
    with torch.no_grad():
        want, by_hand, got = reference(x), masked(x), loaded(x)
    torch.testing.assert_close(by_hand, want, rtol=1e-5, atol=1e-5)
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() < 2e-3 * scale  # float16 biases, 23-bit weights


def test_padded_convolution_is_not_folded(tmp_path):
    """With padding, conv2's border taps see zeros where the constant channel gives its value: no bias reproduces
    that, so conv2's fold is off and the pruned channel's contribution is dropped (the masked network, no bias)."""
    net = _network(padding=1)
    x, y = _data()
    summary = pyro_bc.compress(net, tmp_path / "m.bcz", val=(x, y), train=(x, y), thresholds=[0.0, 100.0, 100.0])
    assert summary["layers"][1]["fold"] == "off: padded convolution"
    masked = net.posterior_mean_network()
    with torch.no_grad():
        masked[0].weight[1] = 0.0
        masked[0].bias[1] = 0.0
        want, got = masked(x), pyro_bc.load(tmp_path / "m.bcz")(x)
    assert (got - want).abs().max().item() < 2e-3 * want.abs().max().item()


@pytest.mark.parametrize("examples_only", [False, True])
def test_pruned_network_is_the_hand_masked_network_and_the_file_up_to_rounding(tmp_path, examples_only):
    """The fold's examples given as (x, y) or as x alone."""
    net = _network()
    x, y = _data()
    summary = pyro_bc.compress(net, tmp_path / "m.bcz", val=(x, y), train=(x, y), thresholds=[0.0, 100.0, 100.0])
    pruned = pyro_bc.pruned_network(net, summary, train=x if examples_only else (x, y))
    masked = net.posterior_mean_network()
    with torch.no_grad():
        masked[0].weight[1] = 0.0
        masked[0].bias[1] = 0.0
        masked[2].bias += CONSTANT_BIAS * masked[2].weight[:, 1].sum((1, 2))
        want, got, loaded = masked(x), pruned(x), pyro_bc.load(tmp_path / "m.bcz")(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (loaded - got).norm() / got.norm() < 2e-3
    assert sum(p.numel() for p in pruned.parameters()) == sum(p.numel() for p in net.posterior_mean_network()
                                                              .parameters())  # full size


def test_pruned_network_needs_the_fold_data_and_the_same_pruning(tmp_path):
    net = _network()
    x, y = _data()
    summary = pyro_bc.compress(net, tmp_path / "m.bcz", val=(x, y), train=(x, y), thresholds=[0.0, 100.0, 100.0])
    with pytest.raises(pyro_bc.errors.ConfigError, match=r"^the summary folded pruned inputs into the biases: give "
                       r"the training examples the compression was given, train=\(x, y\)$"):
        pyro_bc.pruned_network(net, summary)
    with pytest.raises(pyro_bc.errors.ConfigError, match=r"^the summary has 0 layers, the network 3$"):
        pyro_bc.pruned_network(net, {})
    renamed = dict(summary, layers=[dict(summary["layers"][0], name="a"), *summary["layers"][1:]])
    with pytest.raises(pyro_bc.errors.ConfigError, match=r"^the summary's layers \(a, 2, 5\) are not the network's "
                                                         r"\(0, 2, 5\)$"):
        pyro_bc.pruned_network(net, renamed, train=(x, y))
    layers, _ = summary_pruning(net, summary, (x, y))
    with pytest.raises(pyro_bc.errors.ConfigError, match=r"^the summary's layers \(\) are not the network's "):
        check_pruning(layers, {})
    with torch.no_grad():
        net.layers[0].prior.z_logvar[1] = -20.0  # now channel 1 is certain: the recorded threshold keeps it
    with pytest.raises(pyro_bc.errors.ConfigError, match=r"^0: the summary keeps groups \[0, 2\] but its threshold "
                       r"keeps \[0, 1, 2\] in this network: is it the network that was compressed\?$"):
        pyro_bc.pruned_network(net, summary, train=(x, y))
    net.input_shape = None
    with pytest.raises(pyro_bc.errors.ConfigError, match=r"^the network's input shape is unknown: train it or "
                                                         r"compress it first$"):
        pyro_bc.pruned_network(net, summary, train=(x, y))


def test_pruned_network_without_a_fold_is_the_hand_masked_network(tmp_path):
    """Compressed without training examples nothing is folded: the pruned network needs none and is the network
    with conv1's channel 1 masked out, conv2's bias as it was."""
    net = _network()
    x, y = _data()
    summary = pyro_bc.compress(net, tmp_path / "m.bcz", val=(x, y), thresholds=[0.0, 100.0, 100.0])
    assert summary["fold_pruned_inputs"] is False
    masked = net.posterior_mean_network()
    with torch.no_grad():
        masked[0].weight[1] = 0.0
        masked[0].bias[1] = 0.0
        torch.testing.assert_close(pyro_bc.pruned_network(net, summary)(x), masked(x), rtol=1e-5, atol=1e-5)


def test_summary_pruning_gives_the_networks_graph(tmp_path):
    """The graph handed back (finetune checks and reuses it) prunes the network as the summary's layers do."""
    net = _network()
    x, y = _data()
    summary = pyro_bc.compress(net, tmp_path / "m.bcz", val=(x, y), thresholds=[0.0, 100.0, 100.0])
    layers, graph = summary_pruning(net, summary)
    again = graph.prune(analyse_network(net, analyse(net), graph), [0.0, 100.0, 100.0])
    assert [layer.keep_groups.nonzero().flatten().tolist() for layer in again] == [[0, 2], [0, 1, 2, 3], list(range(4 * 36))]
    assert all(torch.equal(a.mask, b.mask) for a, b in zip(again, layers))
