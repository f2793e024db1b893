"""Posterior analysis, pruning with propagation, bit precision and the compressed network
(:mod:`pyro_bc.compression.compressed`), checked against hand-built cases with known answers (never against the
code's own formulas)."""

import dataclasses
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import models.lenet5
import models.lenet300
from pyro_bc.bcz import codec
from pyro_bc.bcz.modules import to_module
from pyro_bc.compression.compressed import compressed_model
from pyro_bc.compression.graph import prune_chain
from pyro_bc.compression.posterior import (
    LayerPosterior,
    Precision,
    PrunedLayer,
    analyse,
    choose_precision,
    compression_rates,
    exponent_bits_official,
    fold_pruned_inputs,
    fold_state,
    mantissa_bits_per_weight,
    quantize,
)
from pyro_bc.errors import ConfigError
from pyro_bc.nn.layers import BayesConv2d
from pyro_bc.nn.network import BayesianNet

LOW, HIGH = -10.0, 10.0  # log alpha of a kept / a dropped group; thresholds at 0


def fc(name, n_out, n_in, la=None, var=1e-3, per_weight=False):
    shape = (n_out, n_in)
    if la is None:
        la = torch.full(shape if per_weight else (n_in,), LOW)
    return LayerPosterior(name, "linear", torch.as_tensor(la, dtype=torch.float32),
                          torch.linspace(-0.5, 0.5, n_out * n_in).reshape(shape),
                          torch.full(shape, var), torch.zeros(n_out), 1, per_weight=per_weight)


def conv(name, n_out, n_in, k=1, la=None):
    shape = (n_out, n_in, k, k)
    la = torch.full((n_out,), LOW) if la is None else torch.as_tensor(la, dtype=torch.float32)
    return LayerPosterior(name, "conv2d", la, torch.ones(shape), torch.full(shape, 1e-3), torch.zeros(n_out), 0,
                          (1, 0, 1, 1))


def rows_cols(mask):
    """Sets of rows / cols of a 2-D (or collapsed conv) mask that hold a kept weight."""
    m = mask.reshape(mask.shape[0], mask.shape[1], -1).any(-1)
    return set(torch.nonzero(m.any(1)).flatten().tolist()), set(torch.nonzero(m.any(0)).flatten().tolist())


# -- masks and propagation ----------------------------------------------------------------------------

def test_fc_stack_propagation():
    la1 = torch.full((4,), LOW)
    la1[3] = HIGH  # pixel 3 dropped
    la2 = torch.full((3,), LOW)
    la2[1] = HIGH  # layer 2's input 1 dropped -> layer 1's row 1 goes
    la3 = torch.full((3,), LOW)
    la3[0] = HIGH  # layer 3's input 0 dropped -> layer 2's row 0 goes
    posts = [fc("l1", 3, 4, la1), fc("l2", 3, 3, la2), fc("l3", 2, 3, la3)]
    l1, l2, l3 = prune_chain(posts, [0.0, 0.0, 0.0])
    assert rows_cols(l1.mask) == ({0, 2}, {0, 1, 2})
    assert rows_cols(l2.mask) == ({1, 2}, {0, 2})
    assert rows_cols(l3.mask) == ({0, 1}, {1, 2})
    # the masks are full outer products of the kept rows and columns
    assert [int(x.mask.sum()) for x in (l1, l2, l3)] == [2 * 3, 2 * 2, 2 * 2]
    assert l1.keep_out.tolist() == [True, False, True] and l2.keep_in.tolist() == [True, False, True]
    assert l2.keep_out.tolist() == [False, True, True] and l3.keep_in.tolist() == [False, True, True]
    assert l3.keep_out.tolist() == [True, True]  # the last layer keeps all outputs
    assert [x.groups_kept for x in (l1, l2, l3)] == [3, 2, 2]
    assert l2.keep_groups.tolist() == [True, False, True]  # a linear layer's groups are its inputs


def test_fc_nothing_dropped_keeps_everything():
    posts = [fc("l1", 3, 4), fc("l2", 3, 3), fc("l3", 2, 3)]
    layers = prune_chain(posts, [0.0, 0.0, 0.0])
    assert all(bool(x.mask.all()) for x in layers)


def test_conv_to_conv_propagation():
    posts = [conv("c1", 3, 2, k=3, la=[LOW, HIGH, LOW]), conv("c2", 4, 3, k=3)]
    c1, c2 = prune_chain(posts, [0.0, 0.0])
    assert not c1.mask[1].any() and c1.mask[[0, 2]].all()
    assert not c2.mask[:, 1].any() and c2.mask[:, [0, 2]].all()
    assert c1.keep_out.tolist() == [True, False, True]
    assert c2.keep_in.tolist() == [True, False, True]
    assert int(c2.mask.sum()) == 4 * 2 * 9
    assert c1.keep_groups.tolist() == [True, False, True]  # a convolution's groups are its output channels


def test_conv_to_conv_compressed_removes_filter_bias_and_input_slice():
    torch.manual_seed(0)
    body = nn.Sequential(BayesConv2d(2, 3, 3), nn.ReLU(), BayesConv2d(3, 4, 3))
    net = BayesianNet(body, input_shape=(2, 7, 7))
    c1, c2 = net.layers
    with torch.no_grad():
        for layer in (c1, c2):
            layer.prior.z_mu.uniform_(0.9, 1.1)
            layer.prior.z_logvar.fill_(-30.0)
            layer.weight_logvar.fill_(math.log(1.3e-3))  # 8 mantissa bits (2 Var in [2^-9, 2^-8))
            layer.bias_mu.uniform_(-1, 1)
        c1.prior.z_logvar[1] = 5.0
    layers = prune_chain(analyse(net), [-3.0, -3.0])
    model = compressed_model(net, layers, choose_precision(layers))
    q1, _, q2 = model.items
    assert q1.weight_codes.shape == (2, 2, 3, 3) and q2.weight_codes.shape == (4, 2, 3, 3)
    bias1 = (c1.prior.z_mu * c1.bias_mu).detach()[[0, 2]]  # a conv bias is scaled by E[z]
    np.testing.assert_array_equal(q1.bias, bias1.numpy())
    w2 = (c2.prior.z_mu[:, None, None, None] * c2.weight_mu).detach()[:, [0, 2]].double()
    np.testing.assert_array_equal(q2.weight_codes, np.floor(w2.numpy() * 2**8 + 0.5))
    # dense reference: filter 1 zeroed (its bias still flows but meets zeroed conv2 weights)
    w1 = (c1.prior.z_mu[:, None, None, None] * c1.weight_mu).detach().double()
    w1 = torch.floor(w1 * 2**8 + 0.5) / 2**8
    w1[1] = 0
    w2_full = torch.floor((c2.prior.z_mu[:, None, None, None] * c2.weight_mu).detach().double() * 2**8 + 0.5) / 2**8
    w2_full[:, 1] = 0
    x = torch.randn(5, 2, 7, 7)
    ref = nn.functional.conv2d(torch.relu(nn.functional.conv2d(x.double(), w1, c1.prior.z_mu.detach().double() *
                                                               c1.bias_mu.detach().double())),
                               w2_full, (c2.prior.z_mu * c2.bias_mu).detach().double())
    torch.testing.assert_close(to_module(model)(x).double(), ref, atol=1e-5, rtol=0)


def test_conv_to_fc_across_flatten():
    c_la = [HIGH, LOW, LOW]  # channel 0 dropped
    f_la = torch.full((12,), LOW)
    f_la[5] = HIGH  # one input inside channel 1: the channel stays
    f_la[8:12] = HIGH  # all of channel 2's inputs: channel 2 leaves the conv too
    c, f = prune_chain([conv("c", 3, 1, la=c_la), fc("f", 2, 12, f_la)], [0.0, 0.0])
    assert c.keep_out.tolist() == [False, True, False]
    assert c.mask[1].all() and not c.mask[[0, 2]].any()
    assert f.keep_in.tolist() == [False] * 4 + [True, False, True, True] + [False] * 4
    assert int(f.mask.sum()) == 2 * 3
    assert c.groups_kept == 1 and f.groups_kept == 3


def test_conv_to_fc_dropping_channel_removes_its_block():
    c, f = prune_chain([conv("c", 3, 1, la=[LOW, LOW, HIGH]), fc("f", 2, 12)], [0.0, 0.0])
    assert f.keep_in.tolist() == [True] * 8 + [False] * 4
    assert c.keep_out.tolist() == [True, True, False]


def test_per_weight_masks_dead_neurons_disappear():
    la1 = torch.full((3, 3), LOW)
    la1[0, :] = HIGH  # hidden neuron 0 loses all its weights
    la1[:, 0] = HIGH  # input 0 has no weight left
    la1[1, 2] = HIGH
    la2 = torch.full((2, 3), LOW)
    la2[:, 2] = HIGH  # hidden neuron 2 feeds nothing
    la2[0, 1] = HIGH
    l1, l2 = prune_chain([fc("a", 3, 3, la1, per_weight=True), fc("b", 2, 3, la2, per_weight=True)], [0.0, 0.0])
    assert l1.post.per_weight
    expected1 = torch.zeros(3, 3, dtype=torch.bool)
    expected1[1, 1] = True
    expected2 = torch.zeros(2, 3, dtype=torch.bool)
    expected2[1, 1] = True
    assert torch.equal(l1.mask, expected1) and torch.equal(l2.mask, expected2)
    assert l1.keep_out.tolist() == [False, True, False] and l1.keep_in.tolist() == [False, True, False]
    assert l2.keep_out.tolist() == [True, True]


def test_a_group_exactly_at_the_threshold_is_pruned():
    """Kept iff log alpha < threshold: at equality the group goes, just below it stays (per group and per weight)."""
    at, below = -2.5, float(np.nextafter(np.float32(-2.5), np.float32(-np.inf)))
    [layer] = prune_chain([fc("l", 2, 4, [below, at, at + 1.0, -9.0])], [at])
    assert layer.keep_in.tolist() == [True, False, False, True]
    assert rows_cols(layer.mask) == ({0, 1}, {0, 3})
    c, f = prune_chain([conv("c", 3, 1, la=[at, below, at]), fc("f", 2, 3)], [at, 0.0])
    assert c.keep_out.tolist() == [False, True, False] and f.keep_in.tolist() == [False, True, False]
    la = torch.tensor([[below, at], [at, below]])
    [weights] = prune_chain([fc("w", 2, 2, la, per_weight=True)], [at])
    assert weights.mask.tolist() == [[True, False], [False, True]]


def test_prune_rejects_bad_thresholds():
    posts = [fc("l1", 3, 4), fc("l2", 2, 3)]
    with pytest.raises(ConfigError, match="2 layers"):
        prune_chain(posts, [0.0])
    with pytest.raises(ConfigError, match="finite"):
        prune_chain(posts, [0.0, float("nan")])


# -- bit precision ------------------------------------------------------------------------------------

def count_rule(var: float) -> int:
    """#{t in 1..23 : 2 Var < 2^-t}, literally."""
    return sum(1 for t in range(1, 24) if 2 * var < 2.0**-t)


@pytest.mark.parametrize("var, bits", [(1e-2, 5), (1e-3, 8), (1e-4, 12), (1e-6, 18), (1.0, 0), (10.0, 0),
                                       (1e-12, 23), (0.0, 23), (2.0**-6, 4), (2.0**-7, 5)])
def test_mantissa_bits_known_values(var, bits):
    assert count_rule(var) == bits
    assert mantissa_bits_per_weight(torch.tensor([var])).tolist() == [bits]


def test_mantissa_bits_match_counting_rule():
    rng = np.random.default_rng(0)
    variances = 10.0 ** rng.uniform(-15, 1, 500)
    got = mantissa_bits_per_weight(torch.tensor(variances, dtype=torch.float64)).tolist()
    assert got == [count_rule(float(v)) for v in variances]


@pytest.mark.parametrize("max_abs, expected", [(1.0, 1.0), (0.6, 0.0), (3.0, 3.0), (16.0, 4.0)])
def test_exponent_bits_official(max_abs, expected):
    # by hand: 0.6 -> log2 = -0.737, +1 = 0.263, log2 = -1.93, +1 = -0.93, ceil = 0
    #          3.0 -> 1.585 + 1 = 2.585, log2 = 1.37, +1 = 2.37 -> 3; 16 -> 4 + 1 = 5, log2 = 2.32 -> 4
    assert exponent_bits_official(max_abs) == expected


def test_exponent_bits_official_nan_for_small_weights():
    assert math.isnan(exponent_bits_official(0.4))  # log2(0.4) + 1 < 0


def _single_layer(mean_values, var_values):
    mean = torch.tensor([mean_values], dtype=torch.float32)
    post = LayerPosterior("l", "linear", torch.full((len(mean_values),), LOW), mean,
                          torch.tensor([var_values], dtype=torch.float32), torch.zeros(1), 1)
    return prune_chain([post], [0.0])


@pytest.mark.parametrize("max_abs, official, clamped", [(0.6, 0.0, 1), (0.4, float("nan"), 1), (3.0, 3.0, 3),
                                                        (1.0, 1.0, 1)])
def test_choose_precision_clamps_exponent(max_abs, official, clamped):
    precision = choose_precision(_single_layer([0.1, -max_abs], [1e-2, 1e-3]))
    assert precision.exponent_bits == clamped
    assert (math.isnan(official) and math.isnan(precision.exponent_bits_official)) or \
        precision.exponent_bits_official == official
    assert precision.mantissa_bits == [7]  # mean of 5 and 8 bits, rounded up
    assert precision.bits(0) == 1 + clamped + 7


def test_choose_precision_ignores_pruned_weights():
    la = torch.tensor([LOW, HIGH])
    post = LayerPosterior("l", "linear", la, torch.tensor([[0.5, 100.0]]), torch.tensor([[1e-4, 1.0]]),
                          torch.zeros(1), 1)
    precision = choose_precision(prune_chain([post], [0.0]))
    assert precision.mantissa_bits == [12] and precision.exponent_bits == 1


# -- quantize -----------------------------------------------------------------------------------------

def test_quantize_half_up_known_values():
    values = torch.tensor([0.125, -0.125, 0.375, -0.375, 0.1, -0.1, 0.0, 1.0])
    # m = 2: grid step 1/4; ties go up (towards +inf)
    assert quantize(values, 2).tolist() == [1, 0, 2, -1, 0, 0, 0, 4]


@pytest.mark.parametrize("m", [0, 3, 8, 12, 23])
def test_quantize_error_bound(m):
    torch.manual_seed(m)
    mean = torch.randn(2000) * 3
    codes = quantize(mean, m)
    err = codes.double() * 2.0**-m - mean.double()
    assert float(err.abs().max()) <= 2.0 ** -(m + 1)
    ties = err.abs() == 2.0 ** -(m + 1)
    assert bool((err[ties] > 0).all())  # ties rounded up


# -- rates --------------------------------------------------------------------------------------------

def test_compression_rates_hand_built():
    la2, la3 = torch.full((3,), LOW), torch.full((3,), LOW)
    la2[1], la3[0] = HIGH, HIGH
    la1 = torch.full((4,), LOW)
    la1[3] = HIGH
    layers = prune_chain([fc("l1", 3, 4, la1), fc("l2", 3, 3, la2), fc("l3", 2, 3, la3)], [0.0, 0.0, 0.0])
    rates = compression_rates(layers, Precision([3, 5, 7], 2, 2.0))
    assert rates["weights_total"] == 27 and rates["weights_kept"] == 14
    assert rates["cr_prune"] == pytest.approx(27 / 14)
    # bits 6, 8, 10 on 6, 4, 4 kept weights: 36 + 32 + 40 = 108
    assert rates["cr_fast"] == pytest.approx(32 * 27 / 108)
    assert rates["weights_kept_fraction"] == pytest.approx(14 / 27)


# -- real networks: compressed file vs. a masked, rounded dense reference -------------------------------

def _set_layer(layer, var, dropped, generator):
    """Posterior with known bits: E[z] in [0.9, 1.1], Var[z] ~ 0 for kept groups, weight variance ``var``."""
    with torch.no_grad():
        layer.prior.z_mu.copy_(torch.rand(layer.prior.z_mu.shape, generator=generator) * 0.2 + 0.9)
        layer.prior.z_logvar.fill_(-30.0)
        layer.prior.z_logvar[dropped] = 5.0
        layer.weight_logvar.fill_(math.log(var))
        layer.bias_mu.copy_(torch.rand(layer.bias_mu.shape, generator=generator) - 0.5)


def _rounded_mean(layer, m):
    """Dense ``E[z] mu_W`` rounded half-up to the 2^-m grid, as float64, plus its integer codes."""
    shape = [1] * layer.weight_mu.dim()
    shape[layer.group_axis] = -1
    mean = (layer.prior.z_mu.reshape(shape) * layer.weight_mu).detach().double()
    codes = torch.floor(mean * 2.0**m + 0.5)
    return codes * 2.0**-m, codes.long()


def test_lenet300_compressed_file_matches_masked_rounded_reference(tmp_path):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    net = models.lenet300.build("gnj")
    fc1, fc2, fc3 = net.layers
    # 2 Var bands: 1.3e-3 -> 8 bits, 8e-5 -> 12 bits, 1e-2 -> 5 bits
    _set_layer(fc1, 1.3e-3, slice(0, 100), g)  # pixels 0..99
    _set_layer(fc2, 8e-5, slice(0, 50), g)  # fc1 units 0..49
    _set_layer(fc3, 1e-2, slice(0, 10), g)  # fc2 units 0..9
    layers = prune_chain(analyse(net), [-3.0, -3.0, -3.0])
    precision = choose_precision(layers)
    assert precision.mantissa_bits == [8, 12, 5]
    path = tmp_path / "lenet300.bcz"
    codec.write_bcz(path, compressed_model(net, layers, precision))
    loaded = codec.read_bcz(path)
    module = codec.load(path)
    linears = [m for m in module if isinstance(m, nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(250, 684), (90, 250), (10, 90)]
    selects = [i for i in loaded.items if isinstance(i, codec.Op) and i.kind == "select"]
    assert len(selects) == 1 and selects[0].params["index"] == list(range(100, 784))

    refs = []
    kept = [(slice(50, 300), slice(100, 784)), (slice(10, 100), slice(50, 300)), (slice(0, 10), slice(10, 100))]
    quantized = [i for i in loaded.items if isinstance(i, codec.QuantizedLayer)]
    for layer, m, (rows, cols), q, lin in zip(net.layers, [8, 12, 5], kept, quantized, linears):
        w, codes = _rounded_mean(layer, m)
        np.testing.assert_array_equal(q.weight_codes, codes[rows, cols].numpy())  # bit for bit
        assert torch.equal(lin.weight, w[rows, cols].float())
        dense = torch.zeros_like(w)
        dense[rows, cols] = w[rows, cols]
        refs.append((dense, layer.bias_mu.detach().double()))
    x = torch.randn(16, 1, 28, 28, generator=g)
    h = x.double().flatten(1)
    for i, (w, b) in enumerate(refs):
        h = h @ w.T + b
        if i < 2:
            h = torch.relu(h)
    torch.testing.assert_close(module(x).double(), h, atol=1e-5, rtol=0)


def test_lenet5_compressed_file_matches_masked_rounded_reference(tmp_path):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    net = models.lenet5.build("gnj")
    conv1, conv2, fc1, fc2 = net.layers
    fc1_dropped = list(range(160, 176)) + [200]  # all 16 inputs of conv2 channel 10; one of channel 12
    _set_layer(conv1, 1.3e-3, slice(0, 5), g)  # conv1 channels 0..4
    _set_layer(conv2, 8e-5, slice(0, 10), g)  # conv2 channels 0..9 -> fc1 inputs 0..159
    _set_layer(fc1, 1e-2, fc1_dropped, g)
    _set_layer(fc2, 1.3e-3, slice(0, 100), g)  # fc1 units 0..99
    layers = prune_chain(analyse(net), [-3.0] * 4)
    precision = choose_precision(layers)
    bits = [8, 12, 5, 8]
    assert precision.mantissa_bits == bits
    path = tmp_path / "lenet5.bcz"
    codec.write_bcz(path, compressed_model(net, layers, precision))
    loaded = codec.read_bcz(path)
    module = codec.load(path)
    weights = [m for m in module if isinstance(m, (nn.Linear, nn.Conv2d))]
    kept_c1 = list(range(5, 20))
    kept_c2 = [c for c in range(10, 50) if c != 10]
    kept_f1_in = [i for i in range(800) if i // 16 in kept_c2 and i != 200]
    kept_f1_out = list(range(100, 500))
    assert [tuple(m.weight.shape) for m in weights] == [(15, 1, 5, 5), (39, 15, 5, 5), (400, 623), (10, 400)]
    assert len(kept_f1_in) == 623

    index = [kept_c1, (kept_c2, kept_c1), (kept_f1_out, kept_f1_in), (list(range(10)), kept_f1_out)]
    quantized = [i for i in loaded.items if isinstance(i, codec.QuantizedLayer)]
    dense = []
    for k, (layer, m, q) in enumerate(zip(net.layers, bits, quantized)):
        w, codes = _rounded_mean(layer, m)
        if k == 0:
            sub_codes, sub_w = codes[kept_c1], w[kept_c1]
        else:
            rows, cols = index[k]
            sub_codes, sub_w = codes[rows][:, cols], w[rows][:, cols]
        np.testing.assert_array_equal(q.weight_codes, sub_codes.numpy())  # bit for bit
        assert torch.equal(weights[k].weight, sub_w.float())
        mask = torch.zeros_like(w, dtype=torch.bool)
        if k == 0:
            mask[kept_c1] = True
        else:
            rows, cols = index[k]
            mask[torch.tensor(rows)[:, None], torch.tensor(cols)[None, :]] = True
        bias = layer.bias_mu.detach().double()
        if layer.group_axis == 0:
            bias = bias * layer.prior.z_mu.detach().double()
        dense.append((torch.where(mask, w, 0.0), bias))

    x = torch.randn(8, 1, 28, 28, generator=g).double()
    f = nn.functional
    h = f.max_pool2d(torch.relu(f.conv2d(x, *dense[0])), 2)
    h = f.max_pool2d(torch.relu(f.conv2d(h, *dense[1])), 2).flatten(1)
    h = torch.relu(h @ dense[2][0].T + dense[2][1])
    h = h @ dense[3][0].T + dense[3][1]
    torch.testing.assert_close(module(x.float()).double(), h, atol=1e-5, rtol=0)


# -- folding pruned inputs into the biases -------------------------------------------------------------

def test_fold_is_exact_for_a_constant_input_of_a_linear_layer():
    g = torch.Generator().manual_seed(0)
    la = torch.full((4,), LOW)
    la[2] = HIGH  # input 2 pruned
    post = fc("fc", 3, 4, la)
    post.mean.copy_(torch.randn(3, 4, generator=g))
    post.bias.copy_(torch.randn(3, generator=g))
    mean_in = torch.tensor([0.3, -0.2, -1.0, 0.5])
    [folded] = fold_pruned_inputs(prune_chain([post], [0.0]), [mean_in])
    x = torch.randn(6, 4, generator=g)
    x[:, 2] = -1.0  # the pruned input never changes (like a background pixel) and equals its mean
    reference = x @ post.mean.T + post.bias
    kept = folded.mask[0]
    torch.testing.assert_close(x[:, kept] @ post.mean[:, kept].T + folded.post.bias, reference)
    unfolded = x[:, kept] @ post.mean[:, kept].T + post.bias
    assert not torch.allclose(unfolded, reference, atol=1e-3)  # without the fold the pruned input is missed


def test_fold_is_exact_for_a_spatially_constant_channel_of_a_convolution():
    g = torch.Generator().manual_seed(1)
    first, second = conv("c1", 2, 1, la=[LOW, HIGH]), conv("c2", 3, 2, k=3)  # c1's channel 1 pruned
    second.mean.copy_(torch.randn(3, 2, 3, 3, generator=g))
    second.bias.copy_(torch.randn(3, generator=g))
    _, folded = fold_pruned_inputs(prune_chain([first, second], [0.0, 0.0]), [torch.zeros(1), torch.tensor([0.4, 2.5])])
    x = torch.randn(2, 2, 6, 6, generator=g)
    x[:, 1] = 2.5  # the pruned channel is constant over positions and equals its mean
    reference = F.conv2d(x, second.mean, second.bias)
    torch.testing.assert_close(F.conv2d(x[:, :1], second.mean[:, :1], folded.post.bias), reference)


def test_fold_leaves_kept_weights_and_unpruned_layers_alone():
    post = fc("fc", 3, 4)
    [folded] = fold_pruned_inputs(prune_chain([post], [0.0]), [torch.randn(4)])
    assert torch.equal(folded.post.bias, post.bias) and torch.equal(folded.mask, torch.ones(3, 4, dtype=torch.bool))


def test_fold_skips_an_unfoldable_layer_and_folds_the_next():
    """c1 is padded (its fold is off) and handed back as it was; c2 after it is still folded, exactly."""
    g = torch.Generator().manual_seed(2)
    first = dataclasses.replace(conv("c1", 2, 1, la=[LOW, HIGH]), conv_args=(1, 1, 1, 1))
    second = conv("c2", 3, 2, k=3)
    second.mean.copy_(torch.randn(3, 2, 3, 3, generator=g))
    layers = prune_chain([first, second], [0.0, 0.0])
    out = fold_pruned_inputs(layers, [torch.tensor([5.0]), torch.tensor([0.4, 2.5])])
    assert len(out) == 2 and out[0] is layers[0]
    torch.testing.assert_close(out[1].post.bias, 2.5 * second.mean[:, 1].sum((1, 2)))


def test_fold_is_exact_for_a_spatially_constant_channel_of_a_1d_convolution():
    """A 3-tap conv1d: the pruned channel's constant times each filter's summed taps goes into the bias."""
    g = torch.Generator().manual_seed(3)
    first = LayerPosterior("c1", "conv1d", torch.tensor([LOW, HIGH]), torch.ones(2, 1, 1), torch.full((2, 1, 1), 1e-3),
                           torch.zeros(2), 0, (1, 0, 1, 1))
    second = LayerPosterior("c2", "conv1d", torch.full((3,), LOW), torch.randn(3, 2, 3, generator=g),
                            torch.full((3, 2, 3), 1e-3), torch.randn(3, generator=g), 0, (1, 0, 1, 1))
    _, folded = fold_pruned_inputs(prune_chain([first, second], [0.0, 0.0]), [torch.zeros(1), torch.tensor([0.4, -1.5])])
    x = torch.randn(4, 2, 9, generator=g)
    x[:, 1] = -1.5
    reference = F.conv1d(x, second.mean, second.bias)
    torch.testing.assert_close(F.conv1d(x[:, :1], second.mean[:, :1], folded.post.bias), reference)


@pytest.mark.parametrize("padding, groups, state", [
    (0, 1, "on"), ((0, 0), 1, "on"), ("valid", 1, "on"), (1, 1, "off: padded convolution"),
    ((0, 1), 1, "off: padded convolution"), ("same", 1, "off: padded convolution"),
    (0, 2, "off: grouped convolution")])
def test_fold_state_of_convolutions(padding, groups, state):
    post = dataclasses.replace(conv("c", 2, 2), conv_args=(1, padding, 1, groups))
    assert fold_state(post, True) == state
    assert fold_state(post, False) == "off"
    assert fold_state(fc("fc", 2, 2), True) == "on"


def test_prune_names_the_layers_when_thresholds_are_missing():
    with pytest.raises(ConfigError, match=r"^1 thresholds given for 2 layers \(l1, l2\)$"):
        prune_chain([fc("l1", 3, 4), fc("l2", 2, 3)], [0.0])


def test_mantissa_bits_of_a_nan_variance_is_zero():
    """No t satisfies 2 Var < 2^-t for a NaN variance: 0 bits."""
    assert mantissa_bits_per_weight(torch.tensor([float("nan"), 1e-3])).tolist() == [0, 8]


def test_exponent_bits_official_is_silent_for_tiny_and_zero_weights():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(exponent_bits_official(0.0)) and math.isnan(exponent_bits_official(0.1))


def test_choose_precision_of_layers_keeping_nothing():
    """A layer keeping no weight has 0 mantissa bits; when no layer keeps one, the official exponent is NaN
    (log2 of log2 0) and the exponent is clamped to 1."""
    one = _single_layer([0.5, -3.0], [1e-2, 1e-3])[0]
    empty = dataclasses.replace(one, mask=torch.zeros_like(one.mask))
    precision = choose_precision([empty, one])
    assert precision.mantissa_bits == [0, 7] and precision.exponent_bits_official == 3.0
    nothing = choose_precision([empty])
    assert nothing.mantissa_bits == [0] and nothing.exponent_bits == 1 and math.isnan(nothing.exponent_bits_official)


def test_compression_rates_at_the_official_exponent():
    """Kept 2 of 12 and 3 of 8 weights at mantissa 3 and 5 bits: exponent 2 gives 2 * 6 + 3 * 8 = 36 bits, the
    official 2.5 gives 2 * 6.5 + 3 * 8.5 = 38.5 bits."""
    def layer(n_out, n_in, kept):
        post = fc("l", n_out, n_in)
        mask = (torch.arange(n_out * n_in) < kept).reshape(n_out, n_in)
        return PrunedLayer(post, 0.0, mask.any(0), mask.any(1), mask)

    rates = compression_rates([layer(3, 4, 2), layer(2, 4, 3)], Precision([3, 5], 2, 2.5))
    assert rates["cr_prune"] == pytest.approx(20 / 5) and rates["cr_fast"] == pytest.approx(640 / 36)
    assert rates["cr_fast_official_exponent"] == pytest.approx(640 / 38.5)
    assert compression_rates([layer(3, 4, 2)], Precision([3], 2, math.nan))["cr_fast_official_exponent"] is None
    # one kept weight at official exponent 0 and 0 mantissa bits: 1 bit in all
    assert compression_rates([layer(3, 4, 1)], Precision([0], 1, 0.0))["cr_fast_official_exponent"] == 32 * 12
    nothing = compression_rates([layer(3, 4, 0)], Precision([0], 1, 1.0))
    assert nothing["cr_prune"] == 12 and nothing["cr_fast"] == 32 * 12 and nothing["cr_fast_official_exponent"] is None
