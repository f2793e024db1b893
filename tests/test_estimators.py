"""The gradient estimators (``pyro_bc.infer.estimators``) against closed forms and against the local reparameterisation.

A small layer with fixed parameters and a fixed batch, its output drawn many times through the :class:`Estimation`
handler (the guide traced, the layer replayed, as training does). References, written out here: the mean and the
covariance of every pair of output elements under the estimator's draws (group normal-Jeffreys scales ``z ~ N(m, v)``
per group, ``w~ ~ N(mu, sigma^2)``, ``b ~ N(b_mu, b_var)``): two elements share a draw of the weights within an
example under Flipout and explicit sampling, across the whole batch under ``shared``, and only at the same position
of one example under the LRT; the expected squared-error loss in closed form, whose autograd gradient is the
expected gradient. Monte Carlo tolerances come from the standard errors of independent calls (``z`` < 5).
"""

import itertools
import json

import pyro
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import pyro_bc
from pyro_bc.cli import main
from pyro_bc.errors import ConfigError
from pyro_bc.infer.elbo import MeanFieldELBO
from pyro_bc.infer.estimators import ESTIMATORS, Estimation, EstimatorChoice, Flipout
from pyro_bc.infer.reparam import LayerDraws, LayerOp, LocalReparameterization
from pyro_bc.nn.layers import BayesConv1d, BayesConv2d, BayesLinear
from pyro_bc.nn.network import BayesianNet
from pyro_bc.priors import known_options, make_prior
from pyro_bc.runs.training import train
from pyro_bc.train.checkpoint import load_checkpoint
from pyro_bc.train.loop import NegativeELBO
from pyro_bc.train.run_dir import TrainConfig

CALLS, COPIES = 300, 20  # independent handler calls; copies of the batch in each call
#: the indices two output elements must have in common to see the same draw of the weights and bias: (example,
#: position) under the LRT (a convolution's positions are independent), the example under Flipout (one weight draw
#: per example, for all its positions), nothing under one draw per batch
WEIGHTS_SHARED_BY = {"lrt": ("example", "position"), "lrt-bf16": ("example", "position"), "flipout": ("example",), "shared": ()}
#: ... and the same draw of the group scales: one per example, but one per batch under ``shared``
SCALES_SHARED_BY = {"lrt": ("example",), "lrt-bf16": ("example",), "flipout": ("example",), "shared": ()}


def _layer(kind: str, prior: str):
    torch.manual_seed(11)
    layer = {"linear": lambda p: BayesLinear(4, 3, p), "conv1d": lambda p: BayesConv1d(2, 3, 3, prior=p),
             "conv2d": lambda p: BayesConv2d(2, 3, 3, prior=p)}[kind](make_prior(prior))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # noise large enough that a wrong variance or covariance shows
        layer.weight_mu.copy_(torch.randn(layer.weight_mu.shape, generator=g))
        layer.weight_logvar.copy_(-1.5 + 0.3 * torch.randn(layer.weight_logvar.shape, generator=g))
        layer.bias_mu.copy_(torch.randn(layer.bias_mu.shape, generator=g))
        layer.bias_logvar.copy_(-2 + 0.3 * torch.randn(layer.bias_logvar.shape, generator=g))
        if prior == "gnj":
            layer.prior.z_mu.copy_(0.5 + torch.rand(layer.prior.z_mu.shape, generator=g))
            layer.prior.z_logvar.copy_(-1.5 + 0.3 * torch.randn(layer.prior.z_logvar.shape, generator=g))
    x = torch.randn({"linear": (3, 4), "conv1d": (2, 2, 6), "conv2d": (2, 2, 4, 4)}[kind], generator=g)
    return layer, x


def _draw(layer, x, estimator):
    with Estimation(estimator):
        guide = poutine.trace(layer.guide).get_trace()
        return poutine.replay(layer, trace=guide)(x)


def _elements(kind, layer, x):
    """Per output element (examples, outputs, positions flattened): its example, output, position and the inputs
    its weights multiply (linear: the example; a convolution: its patch)."""
    n = x.shape[0]
    if kind == "linear":
        patches = x[:, None, :]  # (N, positions 1, in)
    elif kind == "conv1d":
        patches = F.unfold(x[:, :, None], kernel_size=(1, 3)).transpose(1, 2)
    else:
        patches = F.unfold(x, kernel_size=3).transpose(1, 2)  # (N, positions, in * taps)
    out, positions = layer.weight_mu.shape[0], patches.shape[1]
    index = torch.tensor(list(itertools.product(range(n), range(out), range(positions))))
    return index, patches


def _closed_form(kind, layer, x, estimator):
    """Mean ``(E,)`` and covariance ``(E, E)`` of the output elements (ordered as the layer returns them), and the
    expected loss ``sum (y - t)^2`` against ``t = 0.5``, differentiable in the layer's parameters."""
    index, patches = _elements(kind, layer, x)
    ex, o, p = index.T
    mu, s2 = layer.weight_mu.reshape(layer.weight_mu.shape[0], -1), layer.weight_logvar.exp().reshape(
        layer.weight_mu.shape[0], -1)
    b_mu, b_var = layer.bias_mu, layer.bias_logvar.exp()
    if layer.prior.name == "gnj":
        m, v = layer.prior.z_mu, layer.prior.z_logvar.exp()
    else:
        m, v = torch.ones(layer.n_groups), torch.zeros(layer.n_groups)
    pa = patches[ex, p]  # (E, K): each element's inputs

    def sharing(by: tuple[str, ...]) -> torch.Tensor:
        same = torch.ones(len(index), len(index), dtype=torch.bool)
        for key, idx in (("example", ex), ("position", p)):
            if key in by:
                same &= idx[:, None] == idx[None, :]
        return same

    shared, scales_shared = sharing(WEIGHTS_SHARED_BY[estimator]), sharing(SCALES_SHARED_BY[estimator])
    same_o = o[:, None] == o[None, :]
    if kind == "linear":  # z on the inputs: y = sum_i x_i z_i w_oi + b_o
        mean = pa @ (m * mu).T
        mean = mean[torch.arange(len(o)), o] + b_mu[o]
        xx = pa[:, None, :] * pa[None, :, :]  # (E, E, in)
        cov = (xx * (v * mu[o][:, None, :] * mu[o][None, :, :])).sum(-1)
        cov = cov + same_o * ((xx * ((m**2 + v) * s2[o][:, None, :])).sum(-1) + b_var[o][:, None])
        cov = shared * cov  # a linear layer has one position: its scales and weights are shared alike
    else:  # z on the output channels: y = z_o (sum_k w_ok patch_k + b_o)
        ea = (pa * mu[o]).sum(-1) + b_mu[o]
        ca = (pa[:, None, :] * pa[None, :, :] * s2[o][:, None, :]).sum(-1) + b_var[o][:, None]
        mean = m[o] * ea
        cov = same_o * (scales_shared * v[o][:, None] * ea[:, None] * ea[None, :]
                        + shared * (m[o] ** 2 + v[o])[:, None] * ca)
    loss = ((mean - 0.5) ** 2 + cov.diagonal()).sum()
    return mean, cov, loss


def _params(layer):
    params = {"weight_mu": layer.weight_mu, "weight_logvar": layer.weight_logvar, "bias_mu": layer.bias_mu,
              "bias_logvar": layer.bias_logvar}
    if layer.prior.name == "gnj":
        params.update(z_mu=layer.prior.z_mu, z_logvar=layer.prior.z_logvar)
    return params


def _monte_carlo(layer, x, estimator, mean, seed):
    """Per independent call: the mean over the copies of every element, of every product of two elements' deviations
    from their means ``mean``, and the gradient of the mean loss over the copies."""
    pyro.set_rng_seed(seed)
    params = _params(layer)
    batch = x.repeat(COPIES, *([1] * (x.dim() - 1)))
    firsts, seconds, grads = [], [], []
    for _ in range(CALLS):
        y = _draw(layer, batch, estimator).reshape(COPIES, -1)
        loss = ((y - 0.5) ** 2).sum() / COPIES
        grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(params.values()))]))
        y = y.detach().double()
        firsts.append(y.mean(0))
        seconds.append(torch.einsum("ra,rb->ab", y - mean, y - mean) / COPIES)
    return torch.stack(firsts), torch.stack(seconds), torch.stack(grads).double()


def _z(samples: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    se = samples.std(0) / len(samples) ** 0.5
    return (samples.mean(0) - expected).abs() / se


CASES = [("linear", "gnj"), ("linear", "lu"), ("conv1d", "gnj"), ("conv2d", "gnj"), ("conv2d", "lu")]


@pytest.mark.parametrize("estimator", list(ESTIMATORS))
@pytest.mark.parametrize(("kind", "prior"), CASES)
def test_output_moments_and_expected_gradient_match_closed_forms(kind, prior, estimator):
    layer, x = _layer(kind, prior)
    mean, cov, loss = _closed_form(kind, layer, x, estimator)
    exact_grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(_params(layer).values()))])
    mean, cov = mean.detach().double(), cov.detach().double()
    firsts, seconds, grads = _monte_carlo(layer, x, estimator, mean, seed=0)
    assert _z(firsts, mean).max() < 5
    assert _z(seconds, cov).max() < 5
    assert _z(grads, exact_grad.double()).max() < 5
    # where the covariances differ from the LRT's (draws shared across examples, or across a convolution's
    # positions), the draws must show it: the LRT's covariance is rejected
    lrt_cov = _closed_form(kind, layer, x, "lrt")[1].detach().double()
    differs = bool((cov - lrt_cov).abs().max() > 0.5)
    assert differs == (estimator == "shared" or (estimator == "flipout" and kind != "linear"))
    if differs:
        assert _z(seconds, lrt_cov).max() > 5


@pytest.mark.parametrize("prior", ["gnj", "ghs", "lu"])
def test_elbo_gradient_means_agree_with_the_lrt(prior):
    """A linear layer and a categorical likelihood: every estimator gives each example's logits the LRT's
    distribution, so the -ELBO's expected gradient (KL included: the LRT hands the ELBO its fused KL, the others
    leave it to the ELBO) is the same."""
    torch.manual_seed(3)
    net = BayesianNet(nn.Sequential(BayesLinear(5, 4, make_prior(prior, **known_options(prior, {"tau0": 1e-2})))), input_shape=(5,))
    with torch.no_grad():
        net.body[0].weight_logvar.fill_(-1.0)
    x, y = torch.randn(4, 5).repeat(8, 1), torch.tensor([0, 1, 2, 3]).repeat(8)
    loss = NegativeELBO(net)
    means = {}
    for name in ESTIMATORS:
        loss.estimators = EstimatorChoice.parse(name)
        pyro.set_rng_seed(1)
        draws = []
        for _ in range(80):
            net.zero_grad()
            loss(x, y, 100).backward()
            draws.append(torch.cat([p.grad.reshape(-1) for p in net.parameters()]).double())
        means[name] = torch.stack(draws)
    lrt = means.pop("lrt")
    for name, samples in means.items():
        se = (samples.var(0) / len(samples) + lrt.var(0) / len(lrt)).sqrt()
        assert ((samples.mean(0) - lrt.mean(0)).abs() / se).max() < 5, name


def test_lrt_estimator_is_the_local_reparameterization_draw_for_draw():
    torch.manual_seed(0)
    body = nn.Sequential(BayesConv2d(1, 3, 3, prior=make_prior("ghs")), nn.ReLU(), nn.Flatten(),
                         BayesLinear(3 * 4 * 4, 5, make_prior("gnj")))
    net = BayesianNet(body, input_shape=(1, 6, 6))
    x, y = torch.randn(8, 1, 6, 6), torch.arange(8) % 5
    results = []
    for handler in (LocalReparameterization, lambda: Estimation("lrt")):
        pyro.set_rng_seed(5)
        net.zero_grad()
        with handler():
            loss = MeanFieldELBO().differentiable_loss(net.model, net.guide, x, y, 100)
        loss.backward()
        results.append([loss.detach()] + [p.grad.clone() for p in net.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


class _ConvolutionLayouts(TorchDispatchMode):
    """Records, per convolution and per convolution backward, whether its tensors are channels-last."""

    def __init__(self):
        super().__init__()
        self.forward, self.backward = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        cl = torch.channels_last
        if func is torch.ops.aten.convolution.default:
            self.forward.append(args[0].is_contiguous(memory_format=cl))
        elif func is torch.ops.aten.convolution_backward.default:  # the gradient and the input it pairs with
            self.backward.append((args[0].is_contiguous(memory_format=cl), args[1].is_contiguous(memory_format=cl)))
        return func(*args, **(kwargs or {}))


class _BackwardLayouts(TorchDispatchMode):
    """Records the strides that each convolution backward and each product of two same-shaped 4-D tensors pair."""

    def __init__(self):
        super().__init__()
        self.pairs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution_backward.default:  # the gradient and the input's layout it meets
            grad, inp = args[0], args[1]
            layout = torch.channels_last if inp.shape[1] > 1 and inp.stride()[1] == 1 else torch.contiguous_format
            self.pairs.append((func.__name__, grad.is_contiguous(memory_format=layout)))
        elif func is torch.ops.aten.mul.Tensor and all(torch.is_tensor(a) and a.dim() == 4 for a in args[:2]) \
                and args[0].shape == args[1].shape:
            self.pairs.append((func.__name__, args[0].stride() == args[1].stride()))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("estimator", ["lrt", "lrt-bf16"])
def test_one_channel_convolution_backward_runs_in_one_layout(estimator):
    """A one-channel input (MNIST's first layer) is convolved in the default layout and its output handed on
    channels-last, so its gradient comes back channels-last: the fused LRT op's backward converts it once, and no
    convolution backward or product then pairs two layouts (each did, copying or striding, before). (``shared``
    and ``flipout`` are autograd's own backward, which still pairs them.)"""
    torch.manual_seed(0)
    layer = BayesConv2d(1, 8, 3, prior=make_prior("gnj"))
    x = torch.randn(4, 1, 10, 10)
    layouts = _BackwardLayouts()
    y = _draw(layer, x, estimator)
    assert y.is_contiguous(memory_format=torch.channels_last) and y.stride()[1] == 1
    with layouts:  # a sum, so that the only products of 4-D tensors are the layer's own
        F.max_pool2d(y, 2).sum().backward()
    assert any(name.startswith("convolution_backward") for name, _ in layouts.pairs)
    assert all(same for _, same in layouts.pairs), layouts.pairs


@pytest.mark.parametrize("estimator", sorted(ESTIMATORS))
def test_convolutions_run_channels_last_forward_and_backward(estimator):
    """Under every estimator a 2-D convolution of a default-layout RGB input (a network's first layer) convolves it in
    channels-last memory and returns channels-last, so that its backward pairs channels-last gradients with
    channels-last inputs: no convolution, forward or backward, sees a default-layout tensor."""
    torch.manual_seed(0)
    layer = BayesConv2d(3, 8, 3, prior=make_prior("gnj"))
    x = torch.randn(4, 3, 10, 10, requires_grad=True)
    layouts = _ConvolutionLayouts()
    with layouts:
        y = _draw(layer, x, estimator)
        F.max_pool2d(y, 2).square().sum().backward()
    assert y.is_contiguous(memory_format=torch.channels_last) and y.stride()[1] == 1
    assert layouts.forward and all(layouts.forward), layouts.forward
    assert layouts.backward and all(all(pair) for pair in layouts.backward), layouts.backward


@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_a_shard_draws_its_rows_of_the_global_batch(estimator):
    """Data parallelism: a process holding rows 2..4 of a batch of 7 draws what one process draws for them."""
    layer, _ = _layer("conv2d", "gnj")
    linear, _ = _layer("linear", "gnj")
    x = torch.randn(7, 2, 4, 4)
    tokens = torch.randn(7, 5, 4)  # a linear layer over tokens: one draw per example for all its tokens
    outputs = []
    for shard, rows in ((None, slice(None)), ((2, 7), slice(2, 5))):
        pyro.set_rng_seed(4)
        with torch.no_grad(), Estimation(estimator, shard=shard):
            y = poutine.replay(layer, trace=poutine.trace(layer.guide).get_trace())(x[rows])
            t = poutine.replay(linear, trace=poutine.trace(linear.guide).get_trace())(tokens[rows])
        outputs.append((y, t))
    torch.testing.assert_close(outputs[1][0], outputs[0][0][2:5], rtol=0, atol=0)
    torch.testing.assert_close(outputs[1][1], outputs[0][1][2:5], rtol=0, atol=0)


def test_signs_are_fair_and_sharded():
    pyro.set_rng_seed(0)
    full = LayerDraws().signs((6, 4000), torch.zeros(()))
    pyro.set_rng_seed(0)
    part = LayerDraws(shard=(1, 6)).signs((3, 4000), torch.zeros(()))
    assert torch.equal(part, full[1:4])
    assert set(full.unique().tolist()) == {-1.0, 1.0}
    assert abs(full.mean().item()) < 5 / (6 * 4000) ** 0.5


def test_flipout_refuses_a_kind_it_has_no_forward_for():
    layer, x = _layer("linear", "gnj")
    object.__setattr__(layer, "op", LayerOp("mykind", F.linear, True, lambda x, w: (x.shape[0], w.shape[0]),
                                            None))
    with pytest.raises(ConfigError, match="flipout has no forward for layer kind 'mykind'"):
        _draw(layer, x, "flipout")
    assert set(Flipout.ops) == {"linear", "conv1d", "conv2d"}


# -- the choice per layer kind, its text, the training loop ----------------------------------------------------


def test_choice_per_kind_and_its_canonical_text():
    choice = EstimatorChoice.parse(" conv2d = flipout , linear=lrt")
    assert choice("conv2d") is ESTIMATORS["flipout"] and choice("linear") is ESTIMATORS["lrt"]
    assert choice("conv1d") is ESTIMATORS["lrt"] and str(choice) == "conv2d=flipout"
    both = EstimatorChoice.parse("shared,linear=lrt")
    assert both("conv1d") is ESTIMATORS["shared"] and both("linear") is ESTIMATORS["lrt"]
    for spec in ("lrt", "flipout", "shared,linear=lrt", "conv2d=flipout", "flipout,linear=lrt,conv1d=shared"):
        assert str(EstimatorChoice.parse(spec)) == spec
        assert EstimatorChoice.parse(str(EstimatorChoice.parse(spec))) == EstimatorChoice.parse(spec)


@pytest.mark.parametrize(("spec", "message"), [
    ("sgd", "unknown estimator 'sgd', choose lrt, lrt-bf16, shared, flipout"),
    ("conv3d=flipout", "unknown layer kind 'conv3d', the kinds are linear, conv1d, conv2d"),
    ("linear=nope", "unknown estimator 'nope'"),
    ("lrt,flipout", "at most one estimator for all kinds"),
    ("linear=lrt,linear=shared", "layer kind 'linear' is named twice"),
    ("lrt,", "an empty item"),
])
def test_bad_choices_are_one_line_config_errors(spec, message):
    with pytest.raises(ConfigError, match=message) as e:
        EstimatorChoice.parse(spec)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=message):
        TrainConfig(estimator=spec).validate()
    net = pyro_bc.bayesianize(nn.Sequential(nn.Linear(3, 2)))
    with pytest.raises(ConfigError, match=message):
        pyro_bc.fit(net, (torch.randn(8, 3), torch.arange(8) % 2), epochs=1, estimator=spec, progress=False)


def test_cli_refuses_an_unknown_estimator_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--estimator", "sgd", "--out", str(tmp_path / "run"), "--epochs", "0"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "unknown estimator 'sgd'" in err
    assert not (tmp_path / "run").exists()


def _states_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_cli_run_records_its_estimator_and_resumes_exactly(tmp_path):
    args = ["train", "--model", "lenet5", "--subset", "256", "--val-size", "500", "--estimator",
            "linear=shared, conv2d=flipout"]
    assert main([*args, "--epochs", "2", "--out", str(tmp_path / "straight")]) == 0
    assert main([*args, "--epochs", "1", "--out", str(tmp_path / "split")]) == 0
    # resumed without the flag: the run's estimator, not the default
    assert main(["train", "--resume", "--epochs", "2", "--out", str(tmp_path / "split")]) == 0
    config = json.loads((tmp_path / "split" / "config.json").read_text())
    assert config["estimator"] == "linear=shared,conv2d=flipout"
    a, b = (load_checkpoint(tmp_path / d / "checkpoint.pt") for d in ("straight", "split"))
    _states_equal(a["network"], b["network"])
    assert [m["elbo"] for m in a["metrics"]] == [m["elbo"] for m in b["metrics"]]
    # and the estimator mattered: the LRT's run differs
    assert main(["train", "--model", "lenet5", "--subset", "256", "--val-size", "500", "--epochs", "1",
                 "--out", str(tmp_path / "lrt")]) == 0
    assert load_checkpoint(tmp_path / "lrt" / "checkpoint.pt")["metrics"][0]["elbo"] != a["metrics"][0]["elbo"]


def test_fit_records_its_estimator_and_resumes_exactly(tmp_path):
    def net():
        torch.manual_seed(0)
        return pyro_bc.bayesianize(nn.Sequential(nn.Conv1d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 3)))

    g = torch.Generator().manual_seed(0)
    data = (torch.randn(96, 2, 6, generator=g), torch.randint(0, 3, (96,), generator=g))
    options = {"batch_size": 32, "progress": False}
    straight = net()
    pyro_bc.fit(straight, data, epochs=2, out=tmp_path / "straight", estimator="flipout", **options)
    pyro_bc.fit(net(), data, epochs=1, out=tmp_path / "split", estimator="flipout", **options)
    resumed = net()
    pyro_bc.fit(resumed, data, epochs=2, out=tmp_path / "split", resume=True, **options)
    _states_equal(straight.state_dict(), resumed.state_dict())
    assert json.loads((tmp_path / "split" / "config.json").read_text())["estimator"] == "flipout"
    other = net()
    pyro_bc.fit(other, data, epochs=2, estimator="lrt", **options)
    assert not torch.equal(other.state_dict()["body.0.weight_mu"], straight.state_dict()["body.0.weight_mu"])


def test_default_training_is_the_lrt(tmp_path):
    a = train(TrainConfig(subset=256, epochs=1, val_size=500), out=tmp_path / "default", progress=False)
    b = train(TrainConfig(subset=256, epochs=1, val_size=500, estimator="lrt"), out=tmp_path / "lrt", progress=False)
    assert a["elbo"] == b["elbo"]
    assert json.loads((tmp_path / "default" / "config.json").read_text())["estimator"] == "lrt"
