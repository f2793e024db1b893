"""The compressed Bayesian network (pyro_bc.bcz.bayesian, written by pyro_bc.compression.variances) and its version-3 ``.bcz`` file (pyro_bc.bcz.v3): stored
variances against the guide's, the draws' moments against closed forms (Monte Carlo within standard errors),
zero variances against the deterministic network, the file's bytes against version 2, and broken files."""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import pyro_bc
from pyro_bc.bcz import codec
from pyro_bc.bcz import v2 as bcz_v2
from pyro_bc.bcz import v3 as bcz_v3
from pyro_bc.bcz.bayesian import CompressedBayesianNet, SampledLayer, to_bayesian_module
from pyro_bc.bcz.model import CompressedModel, FloatLayer, LayerVariance, NormLayer, Op, QuantizedLayer, Variances
from pyro_bc.bcz.modules import to_module
from pyro_bc.compression.bits import BitsInputs, BitsRule
from pyro_bc.compression.pipeline import compress
from pyro_bc.compression.posterior import Precision
from pyro_bc.errors import FormatError
from pyro_bc.nn.layers import BayesConv2d, BayesLinear
from pyro_bc.nn.network import BayesianNet
from pyro_bc.priors import make_prior
from pyro_bc.runs.load import predictive

RESULTS = Path(__file__).resolve().parents[1] / "analysis" / "results"


def _net(prior: str) -> BayesianNet:
    """conv(1->3) -> flatten -> fc(48->4), with wide posteriors (log-variances between -4 and -1)."""
    torch.manual_seed(0)
    p = make_prior(prior)
    body = nn.Sequential(OrderedDict(conv=BayesConv2d(1, 3, 3, prior=p), act=nn.ReLU(), flat=nn.Flatten(),
                                     fc=BayesLinear(3 * 4 * 4, 4, p)))
    net = BayesianNet(body, input_shape=(1, 6, 6))
    with torch.no_grad():
        for layer in net.layers:
            layer.weight_logvar.uniform_(-4.0, -1.0)
            if prior == "gnj":
                layer.prior.z_logvar.uniform_(-5.0, -2.0)
    return net.eval()


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 6, 6, generator=g), torch.randint(0, 4, (n,), generator=g)


@pytest.fixture(scope="module", params=["gnj", "lu"])
def compressed(request, tmp_path_factory):
    """A network compressed with its variances (thresholds that keep every group), and without."""
    net = _net(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    summaries = {}
    for name, keep in (("bayes", True), ("plain", False)):
        summaries[name] = compress(net, folder / f"{name}.bcz", val=_data(64, 1), thresholds=[10.0, 10.0],
                                   keep_variance=keep)
    return net, folder, summaries


def test_stored_variances_decode_within_half_a_step_of_the_guide(compressed):
    net, folder, _ = compressed
    model = codec.read_bcz(folder / "bayes.bcz")
    step = model.variances.step
    layers = [item for item in model.items if isinstance(item, QuantizedLayer)]
    for bayes, layer, variance in zip(net.layers, layers, model.variances.layers):
        with torch.no_grad():  # the guide's own parameters: w = z w~, w~ ~ N(mu, sigma^2), z ~ N(mu_z, sigma_z^2)
            sigma2 = bayes.weight_logvar.double().exp()
            if bayes.prior.name == "gnj":
                mu_z, var_z = bayes.prior.z_mu.double(), bayes.prior.z_logvar.double().exp()
                shape = (1, -1) if bayes.group_axis == 1 else (-1, 1, 1, 1)
                conditional = mu_z.reshape(shape) ** 2 * sigma2  # Var[w | z = E[z]] scaled: E[z]^2 sigma^2
                relative = var_z / mu_z**2
            else:
                conditional, relative = sigma2, None
        # gnj keeps whole groups: one variance per weight, zero codes included; lu prunes weight by weight (even
        # at this threshold): one per kept, non-zero weight
        assert variance.every_weight or bayes.prior.name == "lu"
        kept = np.ones(layer.weight_codes.shape, bool) if variance.every_weight else layer.weight_codes != 0
        decoded = np.asarray(variance.weight_codes) * step
        assert np.abs(decoded - conditional.log().numpy()[kept]).max() <= step / 2 + 1e-9
        if relative is None:
            assert variance.scale_codes is None
        else:
            assert np.abs(np.asarray(variance.scale_codes) * step - relative.log().numpy()).max() <= step / 2 + 1e-9
    weight_by_weight = [not v.every_weight for v in model.variances.layers]
    assert weight_by_weight == ([False, True] if net.layers[0].prior.name == "lu" else [False, False])


def test_files_without_variances_are_version_2_and_the_rest_of_version_3_is_their_bytes(compressed):
    _, folder, summaries = compressed
    plain, bayes = (folder / "plain.bcz").read_bytes(), (folder / "bayes.bcz").read_bytes()
    assert plain[4:6] == struct.pack("<H", 2) and bayes[4:6] == struct.pack("<H", 3)
    (section,) = struct.unpack_from("<I", bayes, len(bayes) - 8)
    assert bayes[:4] + bayes[6:len(bayes) - 8 - section] == plain[:4] + plain[6:-4]  # all but version and CRC
    assert summaries["bayes"]["file_bytes"] == len(bayes)
    assert summaries["bayes"]["file_bytes_without_variance"] == len(plain) == summaries["plain"]["file_bytes"]
    assert summaries["bayes"]["cr_file_without_variance"] == pytest.approx(summaries["plain"]["cr_file"])
    assert summaries["bayes"]["cr_file"] < summaries["plain"]["cr_file"]
    assert "cr_file_without_variance" not in summaries["plain"]
    torch.testing.assert_close(codec.load(folder / "bayes.bcz")(_data(5, 2)[0]),
                               codec.load(folder / "plain.bcz")(_data(5, 2)[0]))


def test_zero_variances_give_the_deterministic_network(compressed):
    _, folder, _ = compressed
    module = pyro_bc.load(folder / "bayes.bcz", bayesian=True)
    assert isinstance(module, CompressedBayesianNet)
    x = _data(40, 3)[0]
    assert not torch.allclose(module(x), module(x))  # draws once per call
    for layer in module.modules():
        if isinstance(layer, SampledLayer):
            layer.weight_var.zero_()
            if layer.scale_sd is not None:
                layer.scale_sd.zero_()
    torch.testing.assert_close(module(x), pyro_bc.load(folder / "plain.bcz")(x), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(module.posterior_mean_network()(x), pyro_bc.load(folder / "plain.bcz")(x))


def test_a_file_without_variances_refuses_bayesian_in_one_line():
    path = RESULTS / "lenet300-gnj" / "MODEL.bcz"
    with pytest.raises(FormatError, match="keeps no posterior variances") as info:
        pyro_bc.load(path, bayesian=True)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_sampled_linear_layer_moments_match_the_closed_form():
    """y_j = sum_i x_i z'_i w'_ji + b_j with z'_i ~ N(1, r_i), w'_ji ~ N(m_ji, c_ji): E[y_j] = x m_j + b_j and
    Var[y_j] = sum_i x_i^2 (c_ji (1 + r_i) + r_i m_ji^2). 40,000 draws of one example (as 40,000 rows)."""
    codes = np.array([[3, -2, 0], [1, 4, -1]])
    layer = QuantizedLayer("linear", "fc", codes, 1, np.array([0.25, -0.5], dtype=np.float32))
    c = np.array([[0.3, 0.1, 0.0], [0.05, 0.2, 0.4]])
    r = np.array([0.2, 0.05, 0.5])
    module = SampledLayer(layer, c, r)
    x = torch.tensor([[1.0, -2.0, 0.5]])
    torch.manual_seed(0)
    y = module(x.expand(40_000, 3)).double()
    m, xs = codes / 2.0, x.double().numpy()[0]
    mean = xs @ m.T + layer.bias
    var = (xs**2 * (c * (1 + r) + r * m**2)).sum(1)
    se_mean, se_var = np.sqrt(var / len(y)), var * math.sqrt(2 / len(y))
    assert np.all(np.abs(y.mean(0).numpy() - mean) < 4 * se_mean)
    assert np.all(np.abs(y.var(0).numpy() - var) < 4 * se_var)
    assert c[0, 2] * (1 + r[2]) == 0  # a zero weight (code 0) is not drawn: its variance is not stored


def test_sampled_convolution_scales_output_channels():
    """A 1x1 convolution of one channel into two, one position: y_k = z'_k (x w'_k + b_k): Var[y_k] =
    (1 + r_k) (x^2 c_k) + r_k (x m_k + b_k)^2."""
    codes = np.array([2, -3]).reshape(2, 1, 1, 1)
    layer = QuantizedLayer("conv2d", "conv", codes, 0, np.array([1.0, 0.5], dtype=np.float32))
    c, r = np.array([0.5, 0.1]).reshape(2, 1, 1, 1), np.array([0.1, 0.3])
    module = SampledLayer(layer, c, r)
    torch.manual_seed(1)
    y = module(torch.full((40_000, 1, 1, 1), 1.5)).double().reshape(-1, 2)
    mean = 1.5 * codes.ravel() + layer.bias
    var = (1 + r) * (1.5**2 * c.ravel()) + r * mean**2
    assert np.all(np.abs(y.mean(0).numpy() - mean) < 4 * np.sqrt(var / len(y)))
    assert np.all(np.abs(y.var(0).numpy() - var) < 4 * var * math.sqrt(2 / len(y)))



def test_sampled_1d_convolution_keeps_its_stride_and_padding():
    """A 1-D convolution (stored over a height of one) of one channel into two, kernel 2, stride 2, padding 1, on
    x = (1.5, -1, 0.5, 2): windows (0, 1.5), (-1, 0.5), (2, 0); y_kp = z'_k (x_p w'_k + b_k), so E[y_kp] = x_p m_k +
    b_k and Var[y_kp] = (1 + r_k) sum_j x_pj^2 c_kj + r_k E[y_kp]^2, computed window by window here."""
    codes = np.array([[[2, -1]], [[1, 3]]])
    layer = QuantizedLayer("conv1d", "conv", codes, 1, np.array([0.5, -0.25], dtype=np.float32), (1, 2), (0, 1),
                           (1, 1))
    c, r = np.array([[[0.2, 0.1]], [[0.05, 0.3]]]), np.array([0.1, 0.4])
    module = SampledLayer(layer, c, r)
    torch.manual_seed(2)
    y = module(torch.tensor([[[1.5, -1.0, 0.5, 2.0]]]).expand(40_000, 1, 4)).double()
    assert y.shape == (40_000, 2, 3)
    windows = np.array([[0.0, 1.5], [-1.0, 0.5], [2.0, 0.0]])
    m = codes[:, 0] / 2.0
    mean = windows @ m.T + layer.bias                                     # [position, channel]
    var = (1 + r) * (windows**2 @ c[:, 0].T) + r * mean**2
    assert np.all(np.abs(y.mean(0).numpy().T - mean) < 4 * np.sqrt(var / len(y)))
    assert np.all(np.abs(y.var(0).numpy().T - var) < 4 * var * math.sqrt(2 / len(y)))

class _FineBits(BitsRule):
    """16 mantissa bits in every layer: the means as good as float32 here, so that only the variances differ."""

    name = "fine"

    @property
    def settings(self) -> dict:
        return {}

    def precision(self, inputs: BitsInputs) -> Precision:
        return Precision([16] * len(inputs.layers), inputs.variance.exponent_bits, float("nan"))


def test_compressed_bayesian_predictive_matches_the_full_posterior():
    """An MLP kept whole (every group): the compressed Bayesian network's predictive against the guide's (both
    Monte Carlo), within their standard errors plus the weights' rounding (bits) and the variances' steps."""
    torch.manual_seed(0)
    p = make_prior("gnj")
    net = BayesianNet(nn.Sequential(OrderedDict(fc1=BayesLinear(6, 5, p), act=nn.ReLU(), fc2=BayesLinear(5, 3, p))),
                      input_shape=(6,))
    with torch.no_grad():
        for layer in net.layers:
            layer.weight_mu.mul_(3.0)
            layer.weight_logvar.fill_(-1.5)
            layer.bias_logvar.fill_(-30.0)  # the file keeps biases at their means
            layer.prior.z_logvar.fill_(-2.0)
    g = torch.Generator().manual_seed(0)
    val = torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        compress(net.eval(), Path(folder) / "m.bcz", val=val, thresholds=[10.0, 10.0], keep_variance=True,
                 bits_rule=_FineBits())
        bayes = pyro_bc.load(Path(folder) / "m.bcz", bayesian=True)
    x = torch.randn(3, 6, generator=g).repeat_interleave(2000, 0)
    full = predictive(net, x, samples=2, seed=1).reshape(3, 2000, 3)
    small = predictive(bayes, x, samples=2, seed=2).reshape(3, 2000, 3)
    se = ((full.var(1) + small.var(1)) / 2000).sqrt()
    assert ((full.mean(1) - small.mean(1)).abs() / se).max() < 4.5
    assert ((predictive(net, x[::2000], samples=0) - full.mean(1)).abs() / se).max() > 10  # the check has power


# -- the version-3 file -------------------------------------------------------------------------------------

def _model() -> CompressedModel:
    rng = np.random.default_rng(0)
    conv = QuantizedLayer("conv2d", "conv", rng.integers(-8, 8, (3, 1, 3, 3)), 4, np.ones(3, dtype=np.float32))
    fc = QuantizedLayer("linear", "fc", rng.integers(-8, 8, (4, 12)), 3, None)
    fc.weight_codes[0] = 0  # a row of zero weights
    items = [conv, Op("relu"), Op("maxpool2d", {"kernel_size": 2}), Op("flatten"), fc]
    variances = Variances(2, [LayerVariance(rng.integers(-30, 0, conv.weight_codes.size), rng.integers(-20, -5, 3)),
                              LayerVariance(rng.integers(-30, 0, int((fc.weight_codes != 0).sum())), None, False)])
    return CompressedModel(items, (1, 6, 6), {"model": "python"}, variances)


def test_version_3_round_trip(tmp_path):
    model = _model()
    size = codec.write_bcz(tmp_path / "m.bcz", model)
    back = codec.read_bcz(tmp_path / "m.bcz")
    assert size == (tmp_path / "m.bcz").stat().st_size and back.variances.step_bits == 2
    for a, b in zip(model.variances.layers, back.variances.layers):
        np.testing.assert_array_equal(a.weight_codes, b.weight_codes)
        assert (a.scale_codes is None) == (b.scale_codes is None) and a.every_weight == b.every_weight
        if a.scale_codes is not None:
            np.testing.assert_array_equal(a.scale_codes, b.scale_codes)
    plain = dataclasses.replace(model, variances=None)
    assert codec.encode(plain) == bcz_v2.encode(plain)
    assert codec.read_bcz(tmp_path / "m.bcz").items[0].weight_codes.tolist() == model.items[0].weight_codes.tolist()
    module = to_bayesian_module(back)
    assert module(torch.rand(7, 1, 6, 6)).shape == (7, 4)
    fc = [m for m in module.modules() if isinstance(m, SampledLayer)][1]
    zero = torch.from_numpy(model.items[4].weight_codes == 0)
    assert torch.all(fc.weight_var[zero] == 0) and torch.all(fc.weight_var[~zero] > 0)  # pruned weights stay zero
    assert codec.recode(tmp_path / "m.bcz", tmp_path / "r.bcz") == size  # recode keeps the variances


def test_deterministic_nodes_have_no_variance_entry_and_draw_nothing(tmp_path):
    """A float layer and a layer_norm (deterministic) in a version-3 file: the variance section holds one entry per
    quantized layer only, and the Bayesian module computes them as the deterministic network does."""
    rng = np.random.default_rng(0)
    fc = QuantizedLayer("linear", "fc", rng.integers(-9, 10, (3, 4)), 3, None)
    model = CompressedModel([FloatLayer("linear", "head", rng.normal(size=(4, 4))), NormLayer("ln", (4,), 1e-5),
                             Op("relu"), fc], (4,), {},
                            Variances(1, [LayerVariance(np.full(12, -200), None, True)]))  # variances e^-100
    back = codec.decode(codec.encode(model))
    assert [type(i) for i in back.items] == [FloatLayer, NormLayer, Op, QuantizedLayer]
    assert len(back.variances.layers) == 1 and back.variances.layers[0].weight_codes.tolist() == [-200] * 12
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(to_bayesian_module(back)(x), to_module(back)(x))


def test_version_3_writer_refuses_inconsistent_variances(tmp_path):
    model = _model()
    model.variances.layers[1].weight_codes = model.variances.layers[1].weight_codes[:-1]
    with pytest.raises(FormatError, match="weight log-variances for"):
        codec.write_bcz(tmp_path / "m.bcz", model)
    model = _model()
    model.variances.layers[0].scale_codes = np.array([-3, -4])
    with pytest.raises(FormatError, match="group-scale variances for 3 groups"):
        codec.write_bcz(tmp_path / "m.bcz", model)
    model = _model()
    model.variances.layers[0].scale_codes = np.array([-3, -4, 10**6])
    with pytest.raises(FormatError, match="log-variance beyond"):
        codec.write_bcz(tmp_path / "m.bcz", model)
    assert not any(tmp_path.iterdir())  # nothing written


def test_broken_version_3_files_give_one_line(tmp_path):
    good = bcz_v3.encode(_model())
    path = tmp_path / "b.bcz"
    rng = np.random.default_rng(0)
    cases = [good[:cut] for cut in range(0, len(good), 3)] + [good + b"\0"]
    for _ in range(200):  # bit flips
        broken = bytearray(good)
        position = int(rng.integers(0, 8 * len(good)))
        broken[position // 8] ^= 1 << (position % 8)
        cases.append(bytes(broken))
    body = good[:-8]  # lying section lengths, with a valid checksum
    for length in (0, 1, len(body), 2**32 - 1):
        crafted = body + struct.pack("<I", length)
        cases.append(crafted + struct.pack("<I", __import__("zlib").crc32(crafted)))
    for data in cases:
        path.write_bytes(data)
        with pytest.raises(FormatError) as info:
            codec.read_bcz(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_committed_results_still_load():
    for path in sorted(RESULTS.glob("**/MODEL.bcz")):
        model = codec.read_bcz(path)
        assert model.variances is None
        summary = json.loads(path.with_suffix(".json").read_text())
        assert path.stat().st_size == summary["file_bytes"]


def test_a_layer_node_that_is_no_bayesian_layer_is_deterministic(compressed):
    from pyro_bc.bcz.bayesian import LOG_VARIANCE_RANGE
    from pyro_bc.compression.variances import compressed_variances

    net, folder, _ = compressed
    model = codec.read_bcz(folder / "plain.bcz")
    extra = QuantizedLayer("linear", "standalone", np.array([[2, 0, -1, 3]]), 1, None)
    model.items += [extra]
    from pyro_bc.compression.graph import analyse_network, prune_network
    from pyro_bc.compression.posterior import analyse

    posts = analyse_network(net, analyse(net))
    variances = compressed_variances(net, prune_network(net, posts, [10.0, 10.0], None), model)
    last = variances.layers[-1]
    assert last.scale_codes is None and not last.every_weight
    assert np.all(last.weight_codes * variances.step == LOG_VARIANCE_RANGE[0]) and len(last.weight_codes) == 3


def test_predictive_of_a_file(compressed):
    _, folder, _ = compressed
    path = folder / "bayes.bcz"
    x = _data(30, 7)[0]
    with torch.no_grad():
        torch.testing.assert_close(predictive(path, x, samples=0), torch.softmax(codec.load(path)(x), -1))
    torch.testing.assert_close(predictive(str(path), x, samples=3, seed=2),
                               predictive(pyro_bc.load(path, bayesian=True), x, samples=3, seed=2))
    with pytest.raises(FormatError, match="keeps no posterior variances"):
        predictive(folder / "plain.bcz", x, samples=3)


def test_sampled_linear_layer_on_token_inputs_shares_the_group_scale_over_positions():
    """Inputs (N, T, F): z' is drawn per example and input feature and shared by the T positions, so with no weight
    noise the outputs of one example's positions move together: y_t = (x_t * z') m^T."""
    layer = QuantizedLayer("linear", "fc", np.array([[1, 2, -1]]), 0, None)
    module = SampledLayer(layer, np.zeros((1, 3)), np.array([0.5, 0.5, 0.5]))
    x = torch.ones(2000, 4, 3)
    torch.manual_seed(0)
    y = module(x)  # (2000, 4, 1): every position of an example sees the same z'
    assert y.shape == (2000, 4, 1)
    torch.testing.assert_close(y, y[:, :1].expand_as(y))
    assert float(y.var()) == pytest.approx(0.5 * (1 + 4 + 1), rel=0.1)  # Var = r sum m^2 x^2
