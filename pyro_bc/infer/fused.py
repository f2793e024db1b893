"""Fused local-reparameterisation (LRT) ops for linear and 2-D convolutional layers.

Under the local reparameterisation trick (Kingma et al. 2015) a Bayesian layer draws its
pre-activation rather than its weights: with weight means ``mu`` and variances ``var``,

* linear: ``xs = x z``, ``y = xs mu^T + b_mu + sqrt(xs^2 var^T + b_var) eps`` (``z`` scales the inputs);
* conv2d: ``y = (conv(x, mu) + b_mu + sqrt(conv(x^2, var) + b_var) eps) z`` (``z`` scales the output
  channels, bias included).

This is the training hot path. Composed from autograd primitives the op records about ten nodes, each
with its own output-sized buffer; :func:`lrt_linear` and :func:`lrt_conv2d` are single
:class:`torch.autograd.Function` s that work in place where they can (``sqrt(v)``, then
``eps / sqrt(v)`` in ``v``'s buffer, the mean turned into the output), save only what the backward
reads, fold the ``1/2`` of ``d sqrt(v) / dv`` into the smallest tensor it multiplies, and skip every
gradient that no input asks for. Fresh output-sized buffers matter: with glibc's default allocator each
one is mapped and page-faulted anew, which costs more than the arithmetic of LeNet-5's first
convolution; for the same reason the weight variances ``exp(logvar)`` go into the previous step's buffer
(:func:`_variances`), which took 15-20% off AlexNet's and VGG-11's whole steps (their large fully connected
layers). The matrix products and convolutions themselves are those of the reference, so layers
whose cost is arithmetic gain little (``analysis/bench_fused.py`` measures both). The ``*_reference``
functions are the plain-autograd composition of the same maths, used by the tests and the benchmark.

``variance_dtype`` (``torch.bfloat16``, say) runs the variance path, ``x^2`` against ``var`` forward and backward,
in that dtype, and the mean path, the noise, the KL and every returned gradient in the inputs' dtype: where the
hardware multiplies bfloat16 natively (AVX512-BF16 or AMX CPUs, recent GPUs) the second product costs less; the
noise's scale is then within ``2.5 * 2**-8`` (1%) of the exact one, far inside the spread of one draw (docs/METHOD.md
5.6 derives the bounds, tests/test_fused.py checks them). ``None`` (the default) computes everything in the inputs'
dtype, exactly as before.

The ops take the weight *log*-variances and return, beside the draw, the summed KL of the weights
against ``N(0, 1)`` (:func:`standard_normal_kl`), the weight term of the ELBO: ``var = exp(logvar)`` is
computed once and used by the forward pass, the KL and the backward pass, and the KL's gradient is folded
into the backward's weight gradients (``d KL / d mu = mu``, ``d KL / d logvar = (var - 1) / 2``): one
in-place pass for the means and one for the log-variances beside the matrix products, instead of
autograd's separate ``exp``, ``sum`` and ``dot`` nodes and the accumulation of their gradients.
(:class:`~pyro_bc.infer.reparam.LocalReparameterization` hands the KL to the ELBO through the guide's
distribution, see :func:`~pyro_bc.infer.distributions.summed_kl`.) The bias variances are passed exponentiated.

Without a bias variance ``v`` can be exactly zero (an all-zero input row) where ``sqrt`` has an infinite
derivative; both the fused and the reference ops then clamp ``v`` from below at the dtype's smallest
normal number (``torch.finfo(dtype).tiny``), which changes the output by at most ``sqrt(tiny)`` (about
1e-19 in float32) and keeps every gradient finite. With a bias variance (always positive) nothing is
clamped.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["lrt_conv2d", "lrt_conv2d_reference", "lrt_linear", "lrt_linear_reference", "standard_normal_kl"]

IntPair = int | tuple[int, int]


def as_pair(v: IntPair) -> list[int]:
    """``[v, v]`` for an int, else the two values as ints (a convolution's stride, padding or dilation)."""
    return [v, v] if isinstance(v, int) else [int(v[0]), int(v[1])]


def _sqrt_variance(v: torch.Tensor, clamp: bool) -> torch.Tensor:
    """``sqrt(v)`` in place, ``v`` first clamped at ``tiny`` when there is no bias variance."""
    if clamp:
        v.clamp_min_(torch.finfo(v.dtype).tiny)
    return v.sqrt_()


def standard_normal_kl(mu: torch.Tensor, logvar: torch.Tensor, var: torch.Tensor | None = None) -> torch.Tensor:
    """``sum KL(N(mu, exp(logvar)) || N(0, 1)) = (sum(var) + sum(mu^2) - sum(logvar) - n) / 2``: three
    reductions, no weight-sized temporary (``var``: ``exp(logvar)`` where the caller has it)."""
    var = logvar.exp() if var is None else var
    flat = mu.reshape(-1)
    return 0.5 * (var.sum() + torch.dot(flat, flat) - logvar.sum() - mu.numel())


def _grad_mu(grad: torch.Tensor, mu: torch.Tensor, g_kl: float) -> torch.Tensor:
    """``grad + g_kl mu`` in ``grad``'s buffer: the mean gradient with the KL's folded in.

    (One pass; ``addmm(mu, ..., beta=g_kl)`` measures slower on CPU: it copies ``mu`` first.)"""
    return grad.add_(mu, alpha=g_kl) if g_kl else grad


def _grad_logvar(grad_var: torch.Tensor, var: torch.Tensor, g_kl: float) -> torch.Tensor:
    """``(grad_var + g_kl / 2) var - g_kl / 2`` in ``grad_var``'s buffer: the log-variance gradient, through
    ``d var / d logvar = var``, with the KL's folded in. One pass: it is ``lerp(-g_kl / 2, grad_var, var)``
    (``add_`` then ``addcmul`` measured slower)."""
    if not g_kl:
        return grad_var.mul_(var)
    return torch.lerp(grad_var.new_full((), -0.5 * g_kl), grad_var, var, out=grad_var)


#: Per weight log-variance tensor (by ``id``, checked through a weak reference), the buffer of its last
#: ``exp(logvar)`` once no graph needs it any more: see :func:`_variances`.
_FREE_VARIANCES: dict[int, tuple[weakref.ref, torch.Tensor]] = {}


def _variances(logvar: torch.Tensor) -> torch.Tensor:
    """``exp(logvar)``, in the buffer of the previous step's variances where :func:`_release` handed it back.

    A weight-sized tensor freshly allocated every step is mapped and page-faulted anew (glibc returns allocations
    that large to the system), which cost more than the ``exp`` itself on AlexNet's and VGG's fully connected
    layers. A forward takes the buffer, so two graphs never share one; the backward that last reads it gives it
    back. A graph that still needs the buffer when a later forward has overwritten it (``retain_graph=True`` and
    a second backward after a new forward) fails autograd's saved-tensor version check: an error, never a wrong
    gradient. The cost: between steps each layer keeps one weight-sized buffer that a step would allocate anyway;
    the training loop lets them go when it ends (:func:`free_variance_buffers`)."""
    free = _FREE_VARIANCES.pop(id(logvar), None)
    if free is None or free[0]() is not logvar or _kind(free[1]) != _kind(logvar):  # moved (``net.to``) or new
        return logvar.exp()
    return torch.exp(logvar, out=free[1])


def free_variance_buffers() -> None:
    """Let go of every buffer that :func:`_variances` keeps between steps (the next step allocates afresh)."""
    _FREE_VARIANCES.clear()


def _kind(t: torch.Tensor) -> tuple:
    return t.shape, t.dtype, t.device


def _release(logvar: torch.Tensor, var: torch.Tensor) -> None:
    """Hand ``var`` back for ``logvar``'s next :func:`_variances` (forgotten with ``logvar``)."""
    key = id(logvar)
    _FREE_VARIANCES[key] = (weakref.ref(logvar, lambda _, key=key: _FREE_VARIANCES.pop(key, None)), var)


def _release_saved(ctx, var: torch.Tensor) -> None:
    """The backward's :func:`_release` of the variances its forward saved (when the log-variances still exist)."""
    logvar = ctx.logvar()
    if logvar is not None:
        _release(logvar, var)


def _narrow(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``t`` in the variance path's dtype (``t`` itself where there is none)."""
    return t if dtype is None else t.to(dtype)


def _low_precision(variance_dtype: torch.dtype | None, x: torch.Tensor) -> torch.dtype | None:
    """The variance path's dtype where it differs from the inputs', else None (the exact path)."""
    return None if variance_dtype in (None, x.dtype) else variance_dtype


def _widened_variance(v: torch.Tensor, b_var: torch.Tensor | None, dtype: torch.dtype,
                      along: tuple[int, ...]) -> torch.Tensor:
    """A reduced-precision variance product back in ``dtype``, plus the bias variances (shaped by ``along``)."""
    v = v.to(dtype)
    return v if b_var is None else v.add_(b_var.reshape(along))


def _in_layout_of(g: torch.Tensor, saved: torch.Tensor) -> torch.Tensor:
    """``g`` in the memory layout of the forward's buffer ``saved`` (one copy where they differ).

    A convolution of one input channel gives a default-layout output that the caller converts to channels-last,
    so its gradient comes back channels-last: converted once here, the backward's products and convolutions run
    in one layout instead of each copying or striding across two."""
    if saved.is_contiguous():
        return g.contiguous()
    return g.contiguous(memory_format=torch.channels_last)


def _tracked(*inputs: torch.Tensor | None) -> bool:
    """Whether autograd will record the op: only then does the forward keep anything for the backward."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)


class _LRTLinear(torch.autograd.Function):
    """``y = xs mu^T + b_mu + sqrt(xs^2 var^T + b_var) eps``, ``xs = x z``, on 2-D ``x``, and the weight KL."""

    @staticmethod
    def forward(ctx, x, z, mu, logvar, b_mu, b_var, eps, track, variance_dtype):
        low = _low_precision(variance_dtype, x)
        var = _variances(logvar)
        kl = standard_normal_kl(mu, logvar, var)
        xs = x if z is None else x * z
        mean = xs @ mu.t() if b_mu is None else torch.addmm(b_mu, xs, mu.t())
        xn = _narrow(xs, low)
        xs2 = xn * xn
        var_v = _narrow(var, low)  # the variances as the variance path multiplies them
        if low is None:
            v = xs2 @ var.t() if b_var is None else torch.addmm(b_var, xs2, var.t())
        else:
            v = _widened_variance(xs2 @ var_v.t(), b_var, x.dtype, (-1,))
        s = _sqrt_variance(v, b_var is None)
        y = mean.addcmul_(s, eps)
        if track:
            r = torch.div(eps, s, out=s).mul_(0.5)  # d y / d v = eps / (2 sqrt(v)), in the buffer of sqrt(v)
            ctx.save_for_backward(x, z, xs, xs2, mu, var, var_v, r)
            ctx.logvar = weakref.ref(logvar)
        else:
            _release(logvar, var)
        return y, kl

    @staticmethod
    @once_differentiable
    def backward(ctx, g, g_kl):
        x, z, xs, xs2, mu, var, var_v, r = ctx.saved_tensors
        need_x, need_z, need_mu, need_logvar, need_bmu, need_bvar = ctx.needs_input_grad[:6]
        g_kl = float(g_kl)  # zero when the KL output is unused (on CUDA: one host sync per layer)
        gv = g * r  # gradient w.r.t. the variance v
        gv_v = gv.to(var_v.dtype)  # as the variance path multiplies it
        grad_x = grad_z = grad_mu = grad_logvar = grad_bmu = grad_bvar = None
        if need_x or need_z:
            grad_xs = (g @ mu).addcmul_(xs, (gv_v @ var_v).to(g.dtype), value=2.0)
            if z is None:
                grad_x = grad_xs
            else:
                grad_x = grad_xs * z if need_x else None
                grad_z = grad_xs.mul_(x) if need_z else None
        if need_mu:
            grad_mu = _grad_mu(g.t() @ xs, mu, g_kl)
        if need_logvar:
            grad_logvar = _grad_logvar((gv_v.t() @ xs2).to(g.dtype), var, g_kl)
        if need_bmu:
            grad_bmu = g.sum(0)
        if need_bvar:
            grad_bvar = gv.sum(0)
        _release_saved(ctx, var)
        return grad_x, grad_z, grad_mu, grad_logvar, grad_bmu, grad_bvar, None, None, None


class _LRTConv2d(torch.autograd.Function):
    """``y = (conv(x, mu) + b_mu + sqrt(conv(x^2, var) + b_var) eps) z`` and the weight KL."""

    @staticmethod
    def forward(ctx, x, z, mu, logvar, b_mu, b_var, eps, stride, padding, dilation, groups, track, variance_dtype):
        low = _low_precision(variance_dtype, x)
        var = _variances(logvar)
        kl = standard_normal_kl(mu, logvar, var)
        mean = F.conv2d(x, mu, b_mu, stride, padding, dilation, groups)
        xn = _narrow(x, low)
        x2 = xn * xn
        var_v = _narrow(var, low)  # the variances as the variance path convolves them
        if low is None:
            v = F.conv2d(x2, var, b_var, stride, padding, dilation, groups)
        else:
            v = _widened_variance(F.conv2d(x2, var_v, None, stride, padding, dilation, groups), b_var, x.dtype,
                                  (-1, 1, 1))
        s = _sqrt_variance(v, b_var is None)
        y = mean.addcmul_(s, eps)  # y0, before the scales
        # Output-sized buffers are the cost here (the first layer's convolutions are cheap): reuse them.
        keep_y0 = track and z is not None and ctx.needs_input_grad[1]
        if z is not None:
            y = y * z[:, :, None, None] if keep_y0 else y.mul_(z[:, :, None, None])
        if track:
            r = torch.div(eps, s, out=s)  # 2 d y0 / d v = eps / sqrt(v); the 1/2 is applied to the small gradients
            ctx.conv = (stride, padding, dilation, groups)
            ctx.bias_sizes = [mu.shape[0]]
            ctx.save_for_backward(x, x2, z, mu, var, var_v, r, mean if keep_y0 else None)
            ctx.logvar = weakref.ref(logvar)
        else:
            _release(logvar, var)
        return y, kl

    @staticmethod
    @once_differentiable
    def backward(ctx, g, g_kl):
        x, x2, z, mu, var, var_v, r, y0 = ctx.saved_tensors
        need_x, need_z, need_mu, need_logvar, need_bmu, need_bvar = ctx.needs_input_grad[:6]
        g_kl = float(g_kl)  # zero when the KL output is unused (on CUDA: one host sync per layer)
        stride, padding, dilation, groups = ctx.conv
        g = _in_layout_of(g, r)
        grad_z = None
        if z is not None:  # g becomes the gradient w.r.t. y0 (and the mean)
            if need_z:
                buf = g * y0
                grad_z = buf.sum((2, 3))
                g = torch.mul(g, z[:, :, None, None], out=buf)
            else:
                g = g * z[:, :, None, None]
        gv = g * r  # twice the gradient w.r.t. the variance

        def back(grad, inp, weight, need_w, need_b):
            return torch.ops.aten.convolution_backward(
                grad, inp, weight, ctx.bias_sizes if need_b else None, stride, padding, dilation, False, [0, 0],
                groups, [need_x, need_w, need_b])

        grad_x = grad_mu = grad_logvar = grad_bmu = grad_bvar = None
        if need_x or need_mu or need_bmu:
            grad_x, grad_mu, grad_bmu = back(g, x, mu, need_mu, need_bmu)
            grad_mu = None if grad_mu is None else _grad_mu(grad_mu, mu, g_kl)
        if need_x or need_logvar or need_bvar:
            exact = var_v.dtype == g.dtype  # else the bias gradient is summed from gv directly, in g's dtype
            grad_x2, grad_var, grad_bvar = back(gv.to(var_v.dtype), x2, var_v, need_logvar, need_bvar and exact)
            if need_x:
                grad_x = grad_x.addcmul_(x, grad_x2.to(g.dtype))  # d(x^2)/dx = 2x, times the halved gv
            grad_logvar = None if grad_var is None else _grad_logvar(grad_var.to(g.dtype).mul_(0.5), var, g_kl)
            if need_bvar and not exact:
                grad_bvar = gv.sum((0, 2, 3))
            grad_bvar = None if grad_bvar is None else grad_bvar.mul_(0.5)
        _release_saved(ctx, var)
        return grad_x, grad_z, grad_mu, grad_logvar, grad_bmu, grad_bvar, None, None, None, None, None, None, None


LRTOutput = tuple[torch.Tensor, torch.Tensor]


def lrt_linear(x: torch.Tensor, z: torch.Tensor | None, mu: torch.Tensor, logvar: torch.Tensor,
               b_mu: torch.Tensor | None, b_var: torch.Tensor | None, eps: torch.Tensor, *,
               variance_dtype: torch.dtype | None = None) -> LRTOutput:
    """LRT draw of a linear layer's pre-activation and the weight KL (:func:`standard_normal_kl`), fused (see
    the module docstring).

    :param x: inputs ``(N, in)`` (or ``(..., in)``); ``z``: per-example input scales of ``x``'s shape, or ``None``.
    :param mu: weight means ``(out, in)``; ``logvar``: weight log-variances, same shape.
    :param b_mu: bias means ``(out,)`` or ``None``; ``b_var``: bias variances ``(out,)`` or ``None``.
    :param eps: standard-normal noise ``(N, out)`` (or ``(..., out)``); it gets no gradient.
    :param variance_dtype: the variance path's dtype (see the module docstring); ``None``: ``x``'s.
    """
    track = _tracked(x, z, mu, logvar, b_mu, b_var)
    if x.dim() == 2:
        return _LRTLinear.apply(x, z, mu, logvar, b_mu, b_var, eps, track, variance_dtype)
    lead = x.shape[:-1]
    z2 = None if z is None else z.reshape(-1, z.shape[-1])
    y, kl = _LRTLinear.apply(x.reshape(-1, x.shape[-1]), z2, mu, logvar, b_mu, b_var,
                             eps.reshape(-1, eps.shape[-1]), track, variance_dtype)
    return y.reshape(*lead, y.shape[-1]), kl


def lrt_conv2d(x: torch.Tensor, z: torch.Tensor | None, mu: torch.Tensor, logvar: torch.Tensor,
               b_mu: torch.Tensor | None, b_var: torch.Tensor | None, eps: torch.Tensor, stride: IntPair = 1,
               padding: IntPair | str = 0, dilation: IntPair = 1, groups: int = 1, *,
               variance_dtype: torch.dtype | None = None) -> LRTOutput:
    """LRT draw of a 2-D convolution's output and the weight KL, fused (see the module docstring).

    :param x: inputs ``(N, C_in, H, W)``; ``z``: per-example output-channel scales ``(N, C_out)`` or ``None``.
    :param mu: weight means ``(C_out, C_in / groups, kh, kw)``; ``logvar``: weight log-variances, same shape.
    :param b_mu: bias means ``(C_out,)`` or ``None``; ``b_var``: bias variances ``(C_out,)`` or ``None``.
    :param eps: standard-normal noise of the output's shape; it gets no gradient.
    :param padding: ints as for :func:`torch.nn.functional.conv2d`; a string (``"same"``) falls back to
        :func:`lrt_conv2d_reference`.
    :param variance_dtype: the variance path's dtype (see the module docstring); ``None``: ``x``'s.
    """
    if isinstance(padding, str):
        return lrt_conv2d_reference(x, z, mu, logvar, b_mu, b_var, eps, stride, padding, dilation, groups,
                                    variance_dtype=variance_dtype)
    return _LRTConv2d.apply(x, z, mu, logvar, b_mu, b_var, eps, as_pair(stride), as_pair(padding), as_pair(dilation),
                            int(groups), _tracked(x, z, mu, logvar, b_mu, b_var), variance_dtype)


def _reference_sqrt(v: torch.Tensor, clamp: bool) -> torch.Tensor:
    return (v.clamp_min(torch.finfo(v.dtype).tiny) if clamp else v).sqrt()


def _reference_variance(product, x: torch.Tensor, var: torch.Tensor, b_var: torch.Tensor | None,
                        variance_dtype: torch.dtype | None, along: tuple[int, ...]) -> torch.Tensor:
    """``product(x^2, var) + b_var``, the product in ``variance_dtype`` where one is given."""
    low = _low_precision(variance_dtype, x)
    if low is None:
        return product(x * x, var, b_var)
    xn = x.to(low)
    v = product(xn * xn, var.to(low), None).to(x.dtype)
    return v if b_var is None else v + b_var.reshape(along)


def lrt_linear_reference(x: torch.Tensor, z: torch.Tensor | None, mu: torch.Tensor, logvar: torch.Tensor,
                         b_mu: torch.Tensor | None, b_var: torch.Tensor | None, eps: torch.Tensor, *,
                         variance_dtype: torch.dtype | None = None) -> LRTOutput:
    """:func:`lrt_linear` composed from autograd primitives (unfused)."""
    var = logvar.exp()
    xs = x if z is None else x * z
    mean = F.linear(xs, mu, b_mu)
    v = _reference_variance(F.linear, xs, var, b_var, variance_dtype, (-1,))
    return mean + _reference_sqrt(v, b_var is None) * eps, standard_normal_kl(mu, logvar, var)


def lrt_conv2d_reference(x: torch.Tensor, z: torch.Tensor | None, mu: torch.Tensor, logvar: torch.Tensor,
                         b_mu: torch.Tensor | None, b_var: torch.Tensor | None, eps: torch.Tensor,
                         stride: IntPair = 1, padding: IntPair | str = 0, dilation: IntPair = 1,
                         groups: int = 1, *, variance_dtype: torch.dtype | None = None) -> LRTOutput:
    """:func:`lrt_conv2d` composed from autograd primitives (unfused)."""
    var = logvar.exp()
    mean = F.conv2d(x, mu, b_mu, stride, padding, dilation, groups)
    v = _reference_variance(lambda x2, w, b: F.conv2d(x2, w, b, stride, padding, dilation, groups), x, var, b_var,
                            variance_dtype, (-1, 1, 1))
    y = mean + _reference_sqrt(v, b_var is None) * eps
    return y if z is None else y * z[:, :, None, None], standard_normal_kl(mu, logvar, var)
