"""The fused LRT ops (:mod:`pyro_bc.infer.fused`), both outputs (the draw and the weight KL), against their
plain-autograd references."""

from __future__ import annotations

import dataclasses
import gc
import math

import pyro
import pytest
import torch

from models import build_network
from pyro_bc.infer import fused, reparam
from pyro_bc.infer.fused import lrt_conv2d, lrt_conv2d_reference, lrt_linear, lrt_linear_reference, standard_normal_kl
from pyro_bc.nn.layers import BayesConv2d, BayesLinear
from pyro_bc.train.loop import NegativeELBO, make_optimizer, svi_step

NAMES = ("x", "z", "mu", "logvar", "b_mu", "b_var")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _leaves(tensors: dict, dtype, device) -> dict:
    return {k: None if v is None else v.to(dtype=dtype, device=device, copy=True).requires_grad_(k != "eps")
            for k, v in tensors.items()}


def linear_inputs(n=5, d_in=7, d_out=4, z=True, bias="both", seed=0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    t = {
        "x": torch.randn(n, d_in, generator=gen, dtype=torch.float64),
        "z": torch.randn(n, d_in, generator=gen, dtype=torch.float64) if z else None,
        "mu": torch.randn(d_out, d_in, generator=gen, dtype=torch.float64),
        "logvar": torch.randn(d_out, d_in, generator=gen, dtype=torch.float64) - 1,
        "b_mu": torch.randn(d_out, generator=gen, dtype=torch.float64) if bias != "none" else None,
        "b_var": torch.exp(torch.randn(d_out, generator=gen, dtype=torch.float64) - 1) if bias == "both" else None,
        "eps": torch.randn(n, d_out, generator=gen, dtype=torch.float64),
    }
    return t


def conv_inputs(n=3, c_in=4, c_out=6, hw=7, k=3, groups=1, stride=1, padding=0, dilation=1, z=True, bias="both",
                seed=0) -> tuple[dict, dict]:
    gen = torch.Generator().manual_seed(seed)
    conv = {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups}
    wshape = (c_out, c_in // groups, k, k)
    t = {
        "x": torch.randn(n, c_in, hw, hw, generator=gen, dtype=torch.float64),
        "z": torch.randn(n, c_out, generator=gen, dtype=torch.float64) if z else None,
        "mu": torch.randn(wshape, generator=gen, dtype=torch.float64),
        "logvar": torch.randn(wshape, generator=gen, dtype=torch.float64) - 1,
        "b_mu": torch.randn(c_out, generator=gen, dtype=torch.float64) if bias != "none" else None,
        "b_var": torch.exp(torch.randn(c_out, generator=gen, dtype=torch.float64) - 1) if bias == "both" else None,
    }
    out_shape = torch.nn.functional.conv2d(t["x"], t["mu"], **conv).shape
    t["eps"] = torch.randn(out_shape, generator=gen, dtype=torch.float64)
    return t, conv


def _call(fn, t: dict, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return fn(*(t[k] for k in (*NAMES, "eps")), **kwargs)


def _run(fn, t: dict, kwargs: dict, kl_upstream: float = 0.7):
    """Both outputs and the gradients of every differentiable input of ``sum(upstream * y) + kl_upstream * kl``."""
    y, kl = _call(fn, t, kwargs)
    assert kl.shape == ()
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    upstream = upstream.to(dtype=y.dtype, device=y.device)
    present = [k for k in NAMES if t[k] is not None]
    grads = torch.autograd.grad([y, kl], [t[k] for k in present], [upstream, torch.full_like(kl, kl_upstream)])
    return (y.detach(), kl.detach()), dict(zip(present, grads))


def _compare(fused, reference, t_raw: dict, kwargs: dict, dtype=torch.float64, device="cpu", rtol=1e-6, atol=1e-10,
             kl_upstream: float = 0.7):
    y_f, g_f = _run(fused, _leaves(t_raw, dtype, device), kwargs, kl_upstream)
    y_r, g_r = _run(reference, _leaves(t_raw, dtype, device), kwargs, kl_upstream)
    assert y_f[0].dtype == y_f[1].dtype == dtype and y_f[0].device.type == device
    torch.testing.assert_close(y_f, y_r, rtol=rtol, atol=atol)
    assert g_f.keys() == g_r.keys() == {k for k in NAMES if t_raw[k] is not None}
    for k in g_f:
        torch.testing.assert_close(g_f[k], g_r[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"grad of {k}: {m}")


BIASES = ["both", "none", "mean_only"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", BIASES)
@pytest.mark.parametrize("z", [True, False])
def test_linear_matches_reference_float64(z, bias, device):
    _compare(lrt_linear, lrt_linear_reference, linear_inputs(z=z, bias=bias), {}, device=device)


@pytest.mark.parametrize("kl_upstream", [0.0, -2.5])
def test_kl_upstream_zero_and_negative(kl_upstream):
    """An unused KL (upstream zero: the fused backward skips its terms) and a negative upstream (the ELBO's sign)."""
    _compare(lrt_linear, lrt_linear_reference, linear_inputs(), {}, kl_upstream=kl_upstream)
    t, conv = conv_inputs(stride=2, padding=1)
    _compare(lrt_conv2d, lrt_conv2d_reference, t, conv, kl_upstream=kl_upstream)


def test_kl_output_is_the_closed_form():
    """The KL output is ``sum KL(N(mu, exp(logvar)) || N(0, 1))``, elementwise by torch's own Normal rule."""
    t = linear_inputs()
    q = torch.distributions.Normal(t["mu"], (0.5 * t["logvar"]).exp())
    expected = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum()
    for fn in (lrt_linear, lrt_linear_reference):
        torch.testing.assert_close(_call(fn, t, {})[1], expected, rtol=1e-12, atol=0)


CONV_CASES = {
    "plain": {},
    "stride2_pad1": {"stride": 2, "padding": 1},
    "dilation2": {"dilation": 2, "padding": 2},
    "groups2": {"groups": 2},
    "depthwise": {"groups": 4, "c_in": 4, "c_out": 8},
    "asymmetric": {"stride": (2, 1), "padding": (1, 0), "dilation": (1, 2)},
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", BIASES)
@pytest.mark.parametrize("z", [True, False])
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_matches_reference_float64(case, z, bias, device):
    t, conv = conv_inputs(z=z, bias=bias, **CONV_CASES[case])
    _compare(lrt_conv2d, lrt_conv2d_reference, t, conv, device=device)


@pytest.mark.parametrize("device", DEVICES)
def test_float32_agrees(device):
    _compare(lrt_linear, lrt_linear_reference, linear_inputs(n=16, d_in=50, d_out=20, seed=3), {},
             dtype=torch.float32, device=device, rtol=1e-5, atol=1e-5)
    t, conv = conv_inputs(n=4, c_in=6, c_out=8, hw=9, stride=2, padding=1, seed=3)
    _compare(lrt_conv2d, lrt_conv2d_reference, t, conv, dtype=torch.float32, device=device, rtol=1e-5, atol=1e-5)


def test_batch_of_one():
    _compare(lrt_linear, lrt_linear_reference, linear_inputs(n=1), {})
    t, conv = conv_inputs(n=1, padding=1)
    _compare(lrt_conv2d, lrt_conv2d_reference, t, conv)


def _gradcheck(fn, t: dict, kwargs: dict):
    t = _leaves(t, torch.float64, "cpu")
    eps = t.pop("eps").detach()
    assert torch.autograd.gradcheck(lambda *a: fn(*a, eps, **kwargs), tuple(t[k] for k in NAMES))  # both outputs


@pytest.mark.parametrize("z", [True, False])
def test_gradcheck_linear(z):
    _gradcheck(lrt_linear, linear_inputs(n=3, d_in=4, d_out=3, z=z), {})


@pytest.mark.parametrize("z", [True, False])
def test_gradcheck_conv2d(z):
    t, conv = conv_inputs(n=2, c_in=2, c_out=4, hw=5, k=3, groups=2, stride=2, padding=1, z=z)
    _gradcheck(lrt_conv2d, t, conv)


def test_zero_variance_without_bias_variance_is_finite():
    """An all-zero input row gives ``v = 0`` without ``b_var``: outputs and gradients stay finite."""
    t = linear_inputs(bias="mean_only")
    t["x"][1] = 0.0
    y, grads = _run(lrt_linear, _leaves(t, torch.float32, "cpu"), {})
    assert torch.isfinite(y[0]).all() and all(torch.isfinite(g).all() for g in grads.values())
    _compare(lrt_linear, lrt_linear_reference, t, {})
    t, conv = conv_inputs(bias="mean_only")
    t["x"][0] = 0.0
    y, grads = _run(lrt_conv2d, _leaves(t, torch.float32, "cpu"), conv)
    assert torch.isfinite(y[0]).all() and all(torch.isfinite(g).all() for g in grads.values())
    _compare(lrt_conv2d, lrt_conv2d_reference, t, conv)


def test_only_requested_gradients():
    """Gradients for a subset of the inputs (the rest constants) match the reference."""
    t = linear_inputs()
    for fn in (lrt_linear, lrt_linear_reference):
        leaves = {k: v.clone() for k, v in t.items()}
        leaves["mu"].requires_grad_()
        leaves["z"].requires_grad_()
        y, kl = _call(fn, leaves, {})
        grads = torch.autograd.grad(y.sum() + kl, [leaves["mu"], leaves["z"]])
        if fn is lrt_linear:
            fused = grads
    for a, b in zip(fused, grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-10)
    tc, conv = conv_inputs()
    outs = []
    for fn in (lrt_conv2d, lrt_conv2d_reference):
        leaves = {k: v.clone() for k, v in tc.items()}
        leaves["logvar"].requires_grad_()
        y, kl = _call(fn, leaves, conv)
        outs.append(torch.autograd.grad(y.sum() - kl, [leaves["logvar"]])[0])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-10)


def test_no_grad_and_constant_inputs():
    t = linear_inputs()
    with torch.no_grad():
        out = _call(lrt_linear, t, {})
    torch.testing.assert_close(out, _call(lrt_linear_reference, t, {}))
    tc, conv = conv_inputs(stride=2)
    out = _call(lrt_conv2d, tc, conv)
    assert not any(o.requires_grad for o in out)
    torch.testing.assert_close(out, _call(lrt_conv2d_reference, tc, conv))


def test_channels_last_and_same_padding():
    t, conv = conv_inputs(padding=1)
    t["x"] = t["x"].contiguous(memory_format=torch.channels_last)
    _compare(lrt_conv2d, lrt_conv2d_reference, t, conv)
    t, conv = conv_inputs(padding="same")
    _compare(lrt_conv2d, lrt_conv2d_reference, t, conv)


def test_linear_leading_dims():
    t = linear_inputs(n=6)
    t3 = {k: None if v is None else v.reshape(2, 3, -1) if v.dim() == 2 and v.shape[0] == 6 else v
          for k, v in t.items()}
    _compare(lrt_linear, lrt_linear_reference, t3, {})



def test_standard_normal_kl_with_and_without_the_variance():
    """The public KL helper against torch's Normal rule, computing ``exp(logvar)`` itself or taking it."""
    t = linear_inputs()
    q = torch.distributions.Normal(t["mu"], (0.5 * t["logvar"]).exp())
    expected = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum()
    torch.testing.assert_close(standard_normal_kl(t["mu"], t["logvar"]), expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(standard_normal_kl(t["mu"], t["logvar"], t["logvar"].exp()), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("alone", NAMES)
def test_each_input_alone_gets_its_gradient(alone):
    """Only one input asks for a gradient (the others constants): the op still keeps what its backward needs."""
    for fn, ref, (t, conv) in ((lrt_linear, lrt_linear_reference, (linear_inputs(), {})),
                               (lrt_conv2d, lrt_conv2d_reference, conv_inputs(stride=2, padding=1))):
        grads = []
        for op in (fn, ref):
            leaves = {k: None if v is None else v.clone().requires_grad_(k == alone) for k, v in t.items()}
            y, kl = _call(op, leaves, conv)
            grads.append(torch.autograd.grad((y * y).sum() + 0.3 * kl, leaves[alone])[0])
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-10)


def test_linear_leading_dims_without_scales():
    t = linear_inputs(n=6, z=False)
    t3 = {k: None if v is None else v.reshape(2, 3, -1) if v.dim() == 2 and v.shape[0] == 6 else v
          for k, v in t.items()}
    y = _call(lrt_linear, t3, {})[0]
    expected = t["x"] @ t["mu"].T + t["b_mu"] + ((t["x"] ** 2) @ t["logvar"].exp().T + t["b_var"]).sqrt() * t["eps"]
    torch.testing.assert_close(y, expected.reshape(2, 3, -1), rtol=1e-12, atol=1e-12)


def _conv_draw(t: dict, **conv) -> torch.Tensor:
    """The draw composed in the test from ``F.conv2d`` (scales ``z`` not used)."""
    f = torch.nn.functional.conv2d
    v = f(t["x"] ** 2, t["logvar"].exp(), t["b_var"], **conv)
    return f(t["x"], t["mu"], t["b_mu"], **conv) + v.sqrt() * t["eps"]


def test_conv2d_defaults_and_string_padding_are_the_convolutions():
    """``lrt_conv2d``'s defaults are ``F.conv2d``'s (stride 1, no padding, dilation 1, one group); a string padding
    (the reference path) keeps the stride, dilation and groups."""
    t, _ = conv_inputs(z=False)
    for fn in (lrt_conv2d, lrt_conv2d_reference):
        torch.testing.assert_close(_call(fn, t, {})[0], _conv_draw(t), rtol=1e-12, atol=1e-12)
    conv = {"padding": "same", "dilation": 2, "groups": 2}
    t, _ = conv_inputs(z=False, **conv)
    for fn in (lrt_conv2d, lrt_conv2d_reference):
        torch.testing.assert_close(_call(fn, t, conv)[0], _conv_draw(t, **conv), rtol=1e-12, atol=1e-12)


def test_a_bias_variance_is_never_clamped():
    """With a bias variance ``v`` is used as it is, even below ``tiny`` (a subnormal); only without one is it
    clamped."""
    t = linear_inputs(z=False)
    t["x"][1], t["b_mu"][:], t["b_var"][:] = 0.0, 0.0, 1e-320  # row 1: v = b_var exactly, a float64 subnormal
    for fn in (lrt_linear, lrt_linear_reference):
        y = _call(fn, t, {})[0]
        torch.testing.assert_close(y[1], math.sqrt(1e-320) * t["eps"][1], rtol=1e-12, atol=0)


def _losses_after_training(model: str, steps: int) -> list[float]:
    pyro.set_rng_seed(0)
    net = build_network(model, "gnj")
    loss, optimizer = NegativeELBO(net), make_optimizer(net, 1e-3)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g)
    return [svi_step(loss, optimizer, net, x, y, 1000).item() for _ in range(steps)]


@pytest.mark.parametrize("model,steps", [("lenet300", 50), ("lenet5", 10)])
def test_training_with_the_fused_ops_follows_the_unfused_path(model, steps, monkeypatch):
    fused = _losses_after_training(model, steps)
    for layer, reference in ((BayesLinear, lrt_linear_reference), (BayesConv2d, lrt_conv2d_reference)):
        monkeypatch.setattr(layer, "op", dataclasses.replace(layer.op, lrt=reference))
    assert BayesLinear.op.lrt is not reparam.OPS["linear"].lrt
    unfused = _losses_after_training(model, steps)
    assert fused[0] == pytest.approx(unfused[0], rel=1e-6)
    assert fused[-1] == pytest.approx(unfused[-1], rel=1e-4)
    assert fused[-1] < fused[0]


# -- the variance path in bfloat16 -----------------------------------------------------------------

U = 2.0 ** -8  # bfloat16's unit roundoff (8 significant bits)


def _variance_path_bounds(fn, t: dict, conv: dict, upstream: torch.Tensor) -> dict:
    """float64 scales of the variance path's rounding: ``s = sqrt(v)``, and for the gradients of the weight and bias
    variances and of the inputs the sums of absolute terms ``|gv|^T x^2``, ``sum |gv|`` and ``|gv| var`` (``gv`` the
    gradient w.r.t. ``v``), through which each term's relative error bounds the error of the sum."""
    x, var, b_var, eps = t["x"], t["logvar"].exp(), t["b_var"], t["eps"]
    if fn in (lrt_linear, lrt_linear_reference):
        v = x.square() @ var.t() + (0 if b_var is None else b_var)
        gv = (upstream * eps / (2 * v.sqrt())).abs()
        return {"s": v.sqrt(), "var": gv.t() @ x.square(), "x": 2 * x.abs() * (gv @ var), "b_var": gv.sum(0)}
    v = torch.nn.functional.conv2d(x.square(), var, b_var, **conv)
    gv = (upstream * eps / (2 * v.sqrt())).abs()
    return {"s": v.sqrt(), "var": torch.nn.grad.conv2d_weight(x.square(), var.shape, gv, **conv),
            "x": 2 * x.abs() * torch.nn.grad.conv2d_input(x.shape, var, gv, **conv), "b_var": gv.sum((0, 2, 3))}


def _bfloat16_cases():
    t, conv = conv_inputs(n=4, c_in=6, c_out=8, hw=9, stride=2, padding=1, z=False, seed=4)
    return {"linear": (lrt_linear, linear_inputs(n=16, d_in=50, d_out=20, z=False, seed=4), {}),
            "linear_reference": (lrt_linear_reference, linear_inputs(n=16, d_in=50, d_out=20, z=False, seed=4), {}),
            "conv2d": (lrt_conv2d, t, conv), "conv2d_reference": (lrt_conv2d_reference, t, conv)}


@pytest.mark.parametrize("case", ["linear", "linear_reference", "conv2d", "conv2d_reference"])
def test_bfloat16_variance_path_stays_within_its_rounding_of_the_exact_draw(case):
    """float32 inputs, the variance path in bfloat16, against the same draw in float64. Rounding ``x`` and ``var`` to
    bfloat16, squaring there and rounding the float32-accumulated product back (all its terms are positive) puts
    each variance within ``5 U`` of the exact one, so ``sqrt(v)`` within ``2.5 U``: the output within ``2.5 U
    sqrt(v) |eps|``. The mean path, the KL and the mean's gradients are the float32 op's, bit for bit. The gradients
    are sums of terms with ``gv = g eps / (2 sqrt(v))`` (within ``2.5 U``, then rounded: ``3.5 U``): the bias
    variances' (summed in float32) within ``2.5 U`` of each term, the inputs' (times ``var``, rounded, the sum
    rounded) within ``5.5 U``, the weight variances' (times ``x^2``, the sum rounded) within ``7.5 U``; each sum so
    within that many ``U`` times the sum of its terms' absolute values."""
    fn, raw, conv = _bfloat16_cases()[case]
    (y, kl), grads = _run(fn, _leaves(raw, torch.float32, "cpu"), {**conv, "variance_dtype": torch.bfloat16})
    (y32, kl32), grads32 = _run(fn, _leaves(raw, torch.float32, "cpu"), conv)
    (y64, _), grads64 = _run(fn, _leaves(raw, torch.float64, "cpu"), conv)
    upstream = torch.randn(y64.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    bound = _variance_path_bounds(fn, raw, conv, upstream)
    var = raw["logvar"].exp()
    slack = 2e-5  # float32's own rounding, relative to the exact values
    assert y.dtype == torch.float32 and grads["logvar"].dtype == torch.float32
    assert torch.all((y.double() - y64).abs() <= 2.5 * U * bound["s"] * raw["eps"].abs() + slack * (1 + y64.abs()))
    assert torch.equal(kl, kl32) and torch.equal(grads["mu"], grads32["mu"]) and torch.equal(grads["b_mu"],
                                                                                           grads32["b_mu"])
    for name, of, terms, scale in (("logvar", "var", 7.5, var), ("x", "x", 5.5, 1.0), ("b_var", "b_var", 2.5, 1.0)):
        error = (grads[name].double() - grads64[name]).abs()
        assert torch.all(error <= terms * U * scale * bound[of] + slack * (1 + grads64[name].abs())), name
    # and the rounding is there: the bfloat16 path is not the float32 one
    assert not torch.equal(y, y32)


def test_a_variance_dtype_equal_to_the_inputs_is_the_exact_path():
    t, conv = conv_inputs(n=2, c_in=3, c_out=4, hw=6, seed=5)
    for fn, raw, kwargs in ((lrt_linear, linear_inputs(seed=5), {}), (lrt_conv2d, t, conv)):
        (y, kl), grads = _run(fn, _leaves(raw, torch.float32, "cpu"), {**kwargs, "variance_dtype": torch.float32})
        (y0, kl0), grads0 = _run(fn, _leaves(raw, torch.float32, "cpu"), kwargs)
        assert torch.equal(y, y0) and torch.equal(kl, kl0) and all(torch.equal(grads[k], grads0[k]) for k in grads)


@pytest.mark.parametrize("fn", [lrt_linear, lrt_linear_reference])
def test_bfloat16_without_a_bias_variance_stays_within_its_rounding(fn):
    """No bias variance: the widened variance is the product alone (nothing added), clamped at ``tiny``; the draw
    within the bound of the test above."""
    raw = linear_inputs(n=16, d_in=50, d_out=20, z=False, bias="mean", seed=4)
    (y, _), _ = _run(fn, _leaves(raw, torch.float32, "cpu"), {"variance_dtype": torch.bfloat16})
    (y64, _), _ = _run(fn, _leaves(raw, torch.float64, "cpu"), {})
    s = (raw["x"].square() @ raw["logvar"].exp().t()).sqrt()
    assert torch.all((y.double() - y64).abs() <= 2.5 * U * s * raw["eps"].abs() + 2e-5 * (1 + y64.abs()))
    assert not torch.equal(y, _run(fn, _leaves(raw, torch.float32, "cpu"), {})[0][0])


def test_bfloat16_convolution_keeps_its_padding_dilation_and_groups():
    """A dilated, padded, grouped convolution's variance path in bfloat16: the same output shape as the exact path
    and within the rounding bound of the tests above (each argument in its place)."""
    raw, conv = conv_inputs(n=2, c_in=4, c_out=6, hw=9, groups=2, padding=3, dilation=2, z=False, seed=6)
    (y, _), _ = _run(lrt_conv2d, _leaves(raw, torch.float32, "cpu"), {**conv, "variance_dtype": torch.bfloat16})
    (y64, _), _ = _run(lrt_conv2d, _leaves(raw, torch.float64, "cpu"), conv)
    s = (torch.nn.functional.conv2d(raw["x"].square(), raw["logvar"].exp(), raw["b_var"], **conv)).sqrt()
    assert y.shape == y64.shape
    assert torch.all((y.double() - y64).abs() <= 2.5 * U * s * raw["eps"].abs() + 2e-5 * (1 + y64.abs()))


def test_bfloat16_reaches_token_inputs_and_string_padding():
    """The variance dtype is passed on where the op reshapes its inputs (a linear layer on ``(N, T, features)``) and
    where it falls back to the reference (``padding="same"``): the same draw as the 2-D call, and as the reference."""
    bf16 = {"variance_dtype": torch.bfloat16}
    raw = linear_inputs(n=6, d_in=9, d_out=5, z=False, seed=2)
    t = _leaves(raw, torch.float32, "cpu")
    y2, _ = _call(lrt_linear, t, bf16)
    tokens = {**t, "x": t["x"].reshape(2, 3, 9), "eps": t["eps"].reshape(2, 3, 5)}
    y3, _ = _call(lrt_linear, tokens, bf16)
    assert torch.equal(y3.reshape(6, 5), y2) and not torch.equal(y2, _call(lrt_linear, t, {})[0])
    raw, conv = conv_inputs(n=2, c_in=3, c_out=4, hw=6, padding=1, seed=3)
    t = _leaves(raw, torch.float32, "cpu")
    same = {**conv, "padding": "same"}
    y, _ = _call(lrt_conv2d, t, {**same, **bf16})
    assert torch.equal(y, _call(lrt_conv2d_reference, t, {**same, **bf16})[0])
    assert not torch.equal(y, _call(lrt_conv2d_reference, t, same)[0])


# -- the variance buffer kept between steps --------------------------------------------------------

def _ops(op: str):
    if op == "linear":
        return lrt_linear, lrt_linear_reference, linear_inputs(), {}
    t, conv = conv_inputs()
    return lrt_conv2d, lrt_conv2d_reference, t, conv


def _detached_leaves(t: dict) -> dict:
    return _leaves({k: None if v is None else v.detach() for k, v in t.items()}, torch.float64, "cpu")


@pytest.mark.parametrize("op", ["linear", "conv2d"])
def test_the_variance_buffer_is_reused_and_every_call_equals_the_reference(op):
    """From the second call on, ``exp(logvar)`` goes into the memory the previous backward handed back, and every
    call's draw, KL and gradients equal the plain-autograd reference's, the parameters changing between calls."""
    fn, reference, t_raw, kwargs = _ops(op)
    t = _detached_leaves(t_raw)
    handed_back = []
    for _ in range(3):
        handed_back.append(id(t["logvar"]) in fused._FREE_VARIANCES)
        got = _run(fn, t, kwargs)
        want = _run(reference, _detached_leaves(t), kwargs)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        with torch.no_grad():  # a step of plain gradient descent on every parameter
            for k, g in got[1].items():
                t[k] -= 0.1 * g
    assert handed_back == [False, True, True]


@pytest.mark.parametrize("op", ["linear", "conv2d"])
def test_two_graphs_alive_at_once_never_share_a_buffer(op):
    """Two forwards before one backward (two particles, weight sharing): the second finds no free buffer and
    allocates its own, and the gradients of both draws are the reference's."""
    fn, reference, t_raw, kwargs = _ops(op)
    eps2 = torch.randn(t_raw["eps"].shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def two_draws(f, t):
        y1, kl1 = _call(f, t, kwargs)
        y2, kl2 = _call(f, {**t, "eps": eps2}, kwargs)
        present = [k for k in NAMES if t[k] is not None]
        loss = (y1 * y2.detach()).sum() + (y2 ** 2).sum() + kl1 + kl2
        return dict(zip(present, torch.autograd.grad(loss, [t[k] for k in present])))

    t = _detached_leaves(t_raw)
    _run(fn, t, kwargs)  # leaves a free buffer, which the first of the two forwards takes
    torch.testing.assert_close(two_draws(fn, t), two_draws(reference, _detached_leaves(t)), rtol=1e-12, atol=1e-12)


def test_a_retained_graph_whose_buffer_was_overwritten_fails_instead_of_a_wrong_gradient():
    t = _detached_leaves(linear_inputs())
    y, _ = _call(lrt_linear, t, {})
    y.sum().backward(retain_graph=True)  # hands the buffer back
    _call(lrt_linear, t, {})  # takes it and overwrites it
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("op", ["linear", "conv2d"])
def test_an_untracked_call_hands_its_buffer_back_at_once_and_it_is_forgotten_with_its_log_variances(op):
    fn, reference, t_raw, kwargs = _ops(op)
    t = {k: None if v is None else v.float() for k, v in t_raw.items()}
    logvar = t["logvar"]
    key = id(logvar)
    with torch.no_grad():
        for _ in range(2):  # the second call writes into the buffer the first handed back
            y, kl = _call(fn, t, kwargs)
            assert fused._FREE_VARIANCES[key][0]() is logvar
            torch.testing.assert_close(fused._FREE_VARIANCES[key][1], logvar.exp(), rtol=0, atol=0)
    torch.testing.assert_close((y, kl), _call(reference, t, kwargs))
    del logvar, t
    gc.collect()
    assert key not in fused._FREE_VARIANCES


def test_log_variances_moved_to_another_dtype_get_a_new_buffer():
    """``net.to(dtype)`` (or another device) swaps a parameter's data in place, the same object: its old buffer is
    not written into."""
    logvar = torch.nn.Parameter(torch.randn(4, 7, dtype=torch.float64) - 1)
    x, mu, eps = (torch.randn(shape, dtype=torch.float64) for shape in ((5, 7), (4, 7), (5, 4)))
    y, _ = lrt_linear(x, None, mu, logvar, None, None, eps)
    y.sum().backward()  # hands a float64 buffer back
    assert fused._FREE_VARIANCES[id(logvar)][1].dtype == torch.float64
    logvar.data = logvar.data.float()
    y, kl = lrt_linear(x.float(), None, mu.float(), logvar, None, None, eps.float())
    assert y.dtype == kl.dtype == torch.float32
    torch.testing.assert_close(kl, standard_normal_kl(mu.float(), logvar.detach()))
