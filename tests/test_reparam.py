"""The local reparameterisation (LRT) path agrees in distribution with explicit weight sampling.

Reference: weights drawn directly from the guide's Normal/LogNormal factors in one batch and the
outputs computed by hand (einsum over input patches), independent of ``pyro_bc.infer.reparam``.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine

from pyro_bc.infer import fused
from pyro_bc.infer.distributions import NormalLogVar
from pyro_bc.infer.reparam import (
    LRT_ONLY,
    OPS,
    LocalReparameterization,
    bayes_layer,
    group_scale,
    local_reparameterization,
    lrt_draw,
)
from pyro_bc.nn.layers import BayesConv1d, BayesConv2d, BayesLinear
from pyro_bc.priors import known_options, make_prior

S = 50000
TAU0 = 1e-3


def _set_params(layer):
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        layer.weight_mu.copy_(torch.randn(layer.weight_mu.shape, generator=g))
        layer.weight_logvar.copy_(-3 + 0.3 * torch.randn(layer.weight_logvar.shape, generator=g))
        layer.bias_mu.copy_(torch.randn(layer.bias_mu.shape, generator=g))
        layer.bias_logvar.copy_(-3 + 0.3 * torch.randn(layer.bias_logvar.shape, generator=g))
        prior = layer.prior
        if prior.name == "gnj":
            prior.z_mu.copy_(0.5 + torch.rand(prior.z_mu.shape, generator=g))
            prior.z_logvar.copy_(-2 + 0.3 * torch.randn(prior.z_logvar.shape, generator=g))
        elif prior.name in ("ghs", "rhs"):
            prior.sa_mu.fill_(2 * math.log(TAU0) + 0.1)
            prior.sb_mu.fill_(-2 * math.log(TAU0) - 0.2)
            prior.sa_logvar.fill_(-2.0)
            prior.sb_logvar.fill_(-2.5)
            for name in ("za", "zb"):
                getattr(prior, f"{name}_mu").copy_(0.3 * torch.randn(layer.n_groups, generator=g))
                getattr(prior, f"{name}_logvar").copy_(-2 + 0.3 * torch.randn(layer.n_groups, generator=g))


def _make(kind, prior):
    prior = make_prior(prior, **known_options(prior, {"tau0": TAU0}))
    layer = {"linear": lambda: BayesLinear(5, 3, prior), "conv": lambda: BayesConv2d(2, 3, 3, prior=prior),
             "conv1d": lambda: BayesConv1d(2, 3, 3, prior=prior)}[kind]()
    _set_params(layer)
    return layer


def _input(kind):
    g = torch.Generator().manual_seed(3)
    return torch.randn({"linear": (1, 5), "conv": (1, 2, 5, 5), "conv1d": (1, 2, 7)}[kind], generator=g)


def _normal(mu, logvar, n):
    return mu + (0.5 * logvar).exp() * torch.randn((n,) + tuple(mu.shape))


def _draw_explicit(layer, n):
    """n independent draws (z, w~, b) from the guide factors, straight from their definitions."""
    with torch.no_grad():
        w = _normal(layer.weight_mu, layer.weight_logvar, n)
        b = _normal(layer.bias_mu, layer.bias_logvar, n)
        p = layer.prior
        if p.name == "gnj":
            z = _normal(p.z_mu, p.z_logvar, n)
        elif p.name in ("ghs", "rhs"):
            log_sa = _normal(p.sa_mu, p.sa_logvar, n)
            log_sb = _normal(p.sb_mu, p.sb_logvar, n)
            log_za = _normal(p.za_mu, p.za_logvar, n)
            log_zb = _normal(p.zb_mu, p.zb_logvar, n)
            z = torch.exp(0.5 * (log_sa[:, None] + log_sb[:, None] + log_za + log_zb))
            if p.name == "rhs":  # the slab, written out: c z / sqrt(c^2 + z^2)
                z = p.slab_scale * z / torch.sqrt(p.slab_scale**2 + z**2)
        else:
            z = None
    return z, w, b


def _hand_output(kind, x, z, w, b):
    """Outputs (n, units) from per-draw values: linear y_o = sum_i x_i z_i w_oi + b_o;
    conv y_o,p = z_o (sum_k W_o,k patch_k,p + b_o)."""
    n = w.shape[0]
    if kind == "linear":
        xz = x[0].expand(n, -1) if z is None else x[0] * z
        return torch.einsum("si,soi->so", xz, w) + b
    # (in * kernel taps, positions): a 1-D input as an image of height one
    patches = F.unfold(x, kernel_size=3)[0] if x.dim() == 4 else F.unfold(x[:, :, None], kernel_size=(1, 3))[0]
    y = torch.einsum("sok,kp->sop", w.reshape(n, w.shape[1], -1), patches) + b[:, :, None]
    if z is not None:
        y = y * z[:, :, None]
    return y.reshape(n, -1)


def _moments(y):
    y = y.double()
    mean, var = y.mean(0), y.var(0)
    se_mean = (var / len(y)).sqrt()
    se_var = ((y - mean) ** 2).var(0).div(len(y)).sqrt()
    return mean, var, se_mean, se_var


@pytest.mark.parametrize("prior", ["gnj", "ghs", "lu", "rhs"])
@pytest.mark.parametrize("kind", ["linear", "conv", "conv1d"])
def test_lrt_matches_explicit_sampling_moments(kind, prior):
    pyro.set_rng_seed(0)
    layer, x = _make(kind, prior), _input(kind)
    ref = _hand_output(kind, x, *_draw_explicit(layer, S))
    with torch.no_grad(), LocalReparameterization():
        guide_trace = poutine.trace(layer.guide).get_trace()
        lrt = poutine.replay(layer, trace=guide_trace)(x.expand((S,) + x.shape[1:]).contiguous()).reshape(S, -1)
    m1, v1, sm1, sv1 = _moments(ref)
    m2, v2, sm2, sv2 = _moments(lrt)
    z_mean = (m1 - m2).abs() / (sm1**2 + sm2**2).sqrt()
    z_var = (v1 - v2).abs() / (sv1**2 + sv2**2).sqrt()
    assert z_mean.max() < 4, (kind, prior, m1, m2)
    assert z_var.max() < 4, (kind, prior, v1, v2)
    assert ((v1 - v2).abs() / v1).max() < 0.05


@pytest.mark.parametrize("prior", ["gnj", "ghs", "lu", "rhs"])
@pytest.mark.parametrize("kind", ["linear", "conv", "conv1d"])
def test_handler_off_is_explicit_sampling(kind, prior):
    pyro.set_rng_seed(1)
    layer = _make(kind, prior)
    x = _input(kind).repeat(4, *([1] * (_input(kind).dim() - 1)))
    x = x + torch.randn_like(x)
    with torch.no_grad():
        guide_trace = poutine.trace(layer.guide).get_trace()
        y = poutine.replay(layer, trace=guide_trace)(x)
    site = layer.site
    vals = {name.split(".")[-1]: node["value"] for name, node in guide_trace.nodes.items() if node["type"] == "sample"}
    w, b = vals["w"], vals["b"]
    # the draws are genuine draws, not the means
    assert not torch.equal(w, layer.weight_mu) and not torch.equal(b, layer.bias_mu)
    if prior == "gnj":
        z = vals["z"]
        assert not torch.equal(z, layer.prior.z_mu)  # drawn: lrt_only acts under the LRT only
    elif prior in ("ghs", "rhs"):
        assert not torch.equal(vals["z_a"], layer.prior.za_mu.exp())  # drawn: lrt_only acts under the LRT only
        z = torch.sqrt(vals["s_a"] * vals["s_b"] * vals["z_a"] * vals["z_b"])
        if prior == "rhs":
            z = z / torch.sqrt(1 + z**2)  # slab width 1
    else:
        z = None
        assert f"{site}.z" not in guide_trace.nodes
    for i in range(len(x)):
        expected = _hand_output(kind, x[i:i + 1], None if z is None else z[None], w[None], b[None])[0]
        torch.testing.assert_close(y[i].reshape(-1), expected, rtol=1e-5, atol=1e-5)


# --- The handler's draw, computed by hand from the same noise -------------------------------------------------------
# A hand-built guide and model call ``bayes_layer`` directly. The model saves the random state just before the layer,
# so that the test redraws the handler's noise (the per-example scales' first, then the output's) and computes the
# Gaussian draw ``mean + sqrt(var) * eps`` of the local reparameterisation with torch's own functional ops.


class _LogNormalScale:
    """A prior whose group scale is its one site's value, log-normal: per example ``exp(loc + s * noise)``."""

    def scale(self, v):
        return v

    def per_example_scale(self, guides, n, noise):
        (q,) = guides
        return torch.exp(q.loc + q.scale * noise(torch.Size((n,)) + q.loc.shape, q.loc))


FUNCTIONAL = {"linear": F.linear, "conv1d": F.conv1d, "conv2d": F.conv2d}


def _params(kind, x, out=4, k=3, groups=1, bias=True, z=True):
    """Float64 guide parameters: weight means and log-variances, bias means and log-variances, log-scale means."""
    g = torch.Generator().manual_seed(5)
    shape = (out, x.shape[-1]) if kind == "linear" else (out, x.shape[1] // groups) + (k,) * (x.dim() - 2)
    groups_n = x.shape[-1] if kind == "linear" else out

    def rand(*s):
        return torch.randn(s, generator=g, dtype=torch.float64)

    return {"mu": rand(*shape), "logvar": rand(*shape) - 2, "b_mu": rand(out) if bias else None,
            "b_logvar": rand(out) - 2 if bias else None, "z_mu": 0.3 * rand(groups_n) if z else None,
            "z_logvar": rand(groups_n) - 2 if z else None}


def _guide(p, lrt_only=True, logvar_form=True):
    infer = LRT_ONLY if lrt_only else {}
    w_q = NormalLogVar(p["mu"], p["logvar"]) if logvar_form else dist.Normal(p["mu"], (0.5 * p["logvar"]).exp())
    pyro.sample("w", w_q.to_event(p["mu"].dim()), infer=infer)
    if p["b_mu"] is not None:
        pyro.sample("b", dist.Normal(p["b_mu"], (0.5 * p["b_logvar"]).exp()).to_event(1), infer=infer)
    if p["z_mu"] is not None:
        pyro.sample("z", dist.LogNormal(p["z_mu"], (0.5 * p["z_logvar"]).exp()).to_event(1), infer=infer)


def _model(kind, x, p, args, states):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand(p["mu"].shape).to_event(p["mu"].dim()))
    b = None if p["b_mu"] is None else pyro.sample("b", dist.Normal(0.0, 1.0).expand([len(p["b_mu"])]).to_event(1))
    z = None
    if p["z_mu"] is not None:
        z = group_scale(_LogNormalScale(), pyro.sample("z", dist.LogNormal(0.0, 1.0).expand(p["z_mu"].shape).to_event(1)))
    states.append(torch.get_rng_state())
    return bayes_layer(OPS[kind], x, z, w, b, *args)


def _hand_lrt(kind, x, p, args, state, shard=None):
    """The LRT draw from the noise the handler draws after ``state`` (rows ``shard`` of a larger batch's noise)."""
    torch.set_rng_state(state)

    def noise(shape):
        start, total = (0, shape[0]) if shard is None else shard
        return torch.randn((total, *shape[1:]), dtype=torch.float64)[start:start + shape[0]]

    z = None if p["z_mu"] is None else torch.exp(p["z_mu"] + (0.5 * p["z_logvar"]).exp() * noise((len(x),) + p["z_mu"].shape))
    b_var = None if p["b_logvar"] is None else p["b_logvar"].exp()
    f = FUNCTIONAL[kind]
    if kind == "linear":
        xs = x if z is None else x * z.reshape(len(x), *(1,) * (x.dim() - 2), -1)
        mean, var = f(xs, p["mu"], p["b_mu"]), f(xs**2, p["logvar"].exp(), b_var)
        return mean + var.sqrt() * noise(mean.shape)
    mean, var = f(x, p["mu"], p["b_mu"], *args), f(x**2, p["logvar"].exp(), b_var, *args)
    y = mean + var.sqrt() * noise(mean.shape)
    return y if z is None else y * z.reshape(*z.shape, *(1,) * (y.dim() - 2))


CASES = {  # kind, input shape, the op's positional arguments, groups, bias, group scales
    "linear": ("linear", (4, 5), (), 1, True, True),
    "linear-tokens": ("linear", (4, 3, 5), (), 1, True, True),  # one scale per example, shared by its 3 positions
    "linear-bare": ("linear", (4, 5), (), 1, False, False),
    "conv2d-strided": ("conv2d", (2, 2, 6, 6), (2, 1), 1, True, True),
    "conv2d-same": ("conv2d", (2, 2, 5, 5), (1, "same"), 1, True, False),
    "conv1d": ("conv1d", (3, 2, 7), (), 1, True, True),
    "conv1d-tuples-grouped": ("conv1d", (3, 4, 9), ((2,), (1,), (2,), 2), 2, True, True),
    "conv1d-valid": ("conv1d", (3, 2, 7), (1, "valid"), 1, False, True),
    "conv1d-same": ("conv1d", (3, 2, 7), (1, "same"), 1, True, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_lrt_draw_is_the_hand_computed_gaussian(case):
    """Value for value: the handler's draw is ``mean + sqrt(var) eps`` (scaled by the per-example ``z``), for each op
    and its stride / padding / dilation / groups; the guide's sites are its medians; the weight KL is left on the
    guide's ``NormalLogVar`` as ``sum(var + mu^2 - logvar - 1) / 2``."""
    kind, shape, args, groups, bias, z = CASES[case]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    p, states = _params(kind, x, groups=groups, bias=bias, z=z), []
    torch.manual_seed(0)
    with LocalReparameterization():
        guide = poutine.trace(_guide).get_trace(p)
        y = poutine.replay(_model, trace=guide)(kind, x, p, args, states)
    torch.testing.assert_close(y, _hand_lrt(kind, x, p, args, states[0]))
    assert torch.equal(guide.nodes["w"]["value"], p["mu"])  # not drawn: the median
    if z:
        torch.testing.assert_close(guide.nodes["z"]["value"], p["z_mu"].exp())  # a LogNormal's median
    mu, logvar = p["mu"], p["logvar"]
    torch.testing.assert_close(guide.nodes["w"]["fn"].base_dist.standard_normal_kl,
                               0.5 * (logvar.exp() + mu**2 - logvar - 1).sum())


@pytest.mark.parametrize("shard", [None, (1, 6)])
def test_lrt_with_drawn_normal_sites_and_shards(shard):
    """A guide that draws its sites (no ``LRT_ONLY``) from plain ``Normal`` factors gets the same Gaussian draw; with
    ``shard=(1, 6)`` the noise is rows 1-4 of a 6-row batch's. The function form wraps the model the same way."""
    kind, args = "linear", ()
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    p, states = _params(kind, x), []

    def run():
        guide = poutine.trace(_guide).get_trace(p, lrt_only=False, logvar_form=False)
        assert not torch.equal(guide.nodes["w"]["value"], p["mu"])  # drawn
        return poutine.replay(_model, trace=guide)(kind, x, p, args, states)

    torch.manual_seed(0)
    with LocalReparameterization(shard):
        y = run()
    torch.testing.assert_close(y, _hand_lrt(kind, x, p, args, states[0], shard))
    torch.manual_seed(0)
    torch.testing.assert_close(local_reparameterization(run, shard)(), y)
    handler = local_reparameterization(shard=shard)
    assert isinstance(handler, LocalReparameterization) and handler.shard == shard


def test_a_second_guide_run_under_one_handler_uses_its_own_distributions():
    """The medians are the same tensors in every guide run; the second run's distributions (a bias variance changed
    in place between the runs) replace the first's."""
    kind, args = "linear", ()
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    p, states = _params(kind, x), []
    with LocalReparameterization():
        for _ in range(2):
            guide = poutine.trace(_guide).get_trace(p)
            y = poutine.replay(_model, trace=guide)(kind, x, p, args, states)
            p["b_logvar"] += 1.0
    p["b_logvar"] -= 1.0
    torch.testing.assert_close(y, _hand_lrt(kind, x, p, args, states[1]))


def test_values_not_from_the_guide_fall_back_to_the_explicit_layer():
    """Under the handler a weight, bias or group scale the guide did not sample is computed explicitly."""
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    p = _params("linear", x)
    plain_w, plain_b, plain_z = p["mu"].clone(), p["b_mu"].clone(), p["z_mu"].exp()
    with LocalReparameterization():
        guide = poutine.trace(_guide).get_trace(p)
        w, b = guide.nodes["w"]["value"], guide.nodes["b"]["value"]
        assert torch.equal(bayes_layer(OPS["linear"], x, None, plain_w, None), x @ plain_w.T)
        assert torch.equal(bayes_layer(OPS["linear"], x, None, w, plain_b), x @ w.T + plain_b)
        torch.testing.assert_close(bayes_layer(OPS["linear"], x, plain_z, w, b), (x * plain_z) @ w.T + b)


def test_noise_follows_the_inputs_dtype_and_device():
    like = torch.empty(0, dtype=torch.float64, device="meta")
    for handler in (LocalReparameterization(), LocalReparameterization((1, 5))):
        eps = handler.noise(torch.Size((3, 2)), like)
        assert eps.shape == (3, 2) and eps.dtype == torch.float64 and eps.device.type == "meta"


@pytest.mark.parametrize("kind, args", [("conv2d", ()), ("conv2d", (2, 1)), ("conv2d", ((2, 1), "valid", (1, 2))),
                                        ("conv2d", (1, "same", 2)), ("conv1d", ()), ("conv1d", ((2,), (1,), (2,)))])
def test_output_shape_is_the_convolutions(kind, args):
    x = torch.zeros((2, 4, 9, 8) if kind == "conv2d" else (2, 4, 9))
    w = torch.zeros((3, 4, 3, 2) if kind == "conv2d" else (3, 4, 3))
    assert OPS[kind].output_shape(x, w, *args) == FUNCTIONAL[kind](x, w, None, *args).shape


def test_bayes_layer_without_the_handler_scales_inputs_or_outputs():
    """Explicit sampling: ``z`` per example ``(N, G)`` or shared ``(G,)`` scales a linear layer's input features
    (at every position of a token input) and a convolution's output channels; the op's arguments are passed."""
    g = torch.Generator().manual_seed(4)
    x, w, b = torch.randn(4, 3, 5, generator=g), torch.randn(2, 5, generator=g), torch.randn(2, generator=g)
    for z in (torch.rand(4, 5, generator=g), torch.rand(5, generator=g)):
        zx = z[:, None, :] if z.dim() == 2 else z
        torch.testing.assert_close(bayes_layer(OPS["linear"], x, z, w, b), (x * zx) @ w.T + b)
    x, w = torch.randn(4, 2, 6, 6, generator=g), torch.randn(3, 2, 3, 3, generator=g)
    b = torch.randn(3, generator=g)
    assert bayes_layer(OPS["conv2d"], x, None, w, b, 2, 1).shape == (4, 3, 3, 3)
    torch.testing.assert_close(bayes_layer(OPS["conv2d"], x, None, w, b, 2, 1), F.conv2d(x, w, b, 2, 1))
    for z in (torch.rand(4, 3, generator=g), torch.rand(3, generator=g)):
        expected = F.conv2d(x, w, b, 2, 1) * (z[:, :, None, None] if z.dim() == 2 else z[:, None, None])
        torch.testing.assert_close(bayes_layer(OPS["conv2d"], x, z, w, b, 2, 1), expected)


def test_observed_weights_are_used_as_they_are():
    """Weights and bias fixed by ``poutine.condition`` (observed sites) are not guide draws: the layer is explicit."""
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    p = _params("linear", x, z=False)
    w0, b0 = torch.ones_like(p["mu"]), torch.arange(4.0, dtype=torch.float64)
    with LocalReparameterization():
        y = poutine.condition(_model, data={"w": w0, "b": b0})("linear", x, p, (), [])
    torch.testing.assert_close(y, x.sum(-1, keepdim=True) + b0)


def test_weight_kl_is_finite_below_the_exponents_range():
    """A weight log-variance of -1500 (a variance float64 rounds to 0) gives the finite KL
    ``sum(mu^2 + 1500 - 1) / 2``: the op takes the guide's log-variance, not ``2 log(scale)``."""
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    p = _params("linear", x, z=False)
    p["logvar"] = torch.full_like(p["mu"], -1500.0)
    with LocalReparameterization():
        guide = poutine.trace(_guide).get_trace(p)
        poutine.replay(_model, trace=guide)("linear", x, p, (), [])
    torch.testing.assert_close(guide.nodes["w"]["fn"].base_dist.standard_normal_kl,
                               0.5 * (p["mu"] ** 2 + 1499.0).sum())


@pytest.mark.parametrize("kind", ["conv1d", "conv2d"])
def test_the_convolutions_lrt_ops_pass_the_variance_dtype_on(kind):
    """The op table's LRT op of each convolution runs the fused op with the variance dtype it is given: in bfloat16
    the 2-D op's draw (the 1-D one over a height of one), not the exact float32 draw."""
    g = torch.Generator().manual_seed(3)
    spatial = (9,) if kind == "conv1d" else (9, 9)
    x = torch.randn(2, 4, *spatial, generator=g)
    kernel = (6, 4, *(3,) * len(spatial))
    mu, logvar = torch.randn(kernel, generator=g), torch.randn(kernel, generator=g) - 1
    eps = torch.randn(2, 6, *(7,) * len(spatial), generator=g)
    args = (x, None, mu, logvar, None, None, eps)
    y, _ = OPS[kind].lrt(*args, variance_dtype=torch.bfloat16)
    y32, _ = OPS[kind].lrt(*args)
    if kind == "conv1d":
        want, _ = fused.lrt_conv2d(x.unsqueeze(2), None, mu.unsqueeze(2), logvar.unsqueeze(2), None, None,
                                   eps.unsqueeze(2), variance_dtype=torch.bfloat16)
        want = want.squeeze(2)
    else:
        want, _ = fused.lrt_conv2d(*args, variance_dtype=torch.bfloat16)
    assert torch.equal(y, want) and not torch.equal(y, y32)


def test_lrt_draw_passes_the_variance_dtype_on():
    """``lrt_draw`` (every LRT estimator's draw) gives its ``variance_dtype`` to the op: the fused op's bfloat16 draw
    with the same noise, not the exact one."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 7, generator=g)
    q_w = NormalLogVar(torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g) - 1)

    def draw(dtype):
        torch.manual_seed(1)  # the per-example noise, drawn from torch's generator
        return lrt_draw(OPS["linear"], x, None, q_w, None, LocalReparameterization(), variance_dtype=dtype)[0]

    torch.manual_seed(1)
    eps = torch.randn(5, 4)
    want, _ = fused.lrt_linear(x, None, q_w.loc, q_w.logvar, None, None, eps, variance_dtype=torch.bfloat16)
    assert torch.equal(draw(torch.bfloat16), want) and not torch.equal(want, draw(None))
