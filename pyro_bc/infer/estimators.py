"""Gradient estimators of a Bayesian layer's output, one object each in :data:`ESTIMATORS`, and the effect handler
:class:`Estimation` that applies them, chosen per layer kind.

Under the handler each :func:`~pyro_bc.infer.reparam.bayes_layer` is replaced by a draw of the layer's output from the
guide distributions of its weights ``w~ ~ N(mu, sigma^2)``, its bias and its group scales ``z``
(:class:`~pyro_bc.infer.reparam.LayerDraws` finds them), made by one of:

* ``lrt``, the local reparameterisation (Kingma et al. 2015; the default, :func:`pyro_bc.infer.reparam.lrt_draw`): the
  pre-activation drawn from its Gaussian, with independent noise per example and output, the group scales drawn
  per example;
* ``lrt-bf16``: the local reparameterisation with its variance path (``x^2`` against the weight variances, forward
  and backward) in bfloat16, which costs less where the hardware multiplies bfloat16 natively; the noise's scale is
  within 1% of the exact one (``pyro_bc.infer.fused``), everything else is as ``lrt`` computes it. Grouped
  convolutions keep float32 (oneDNN's bfloat16 grouped kernels measured slower than its float32 ones);
* ``shared``: one draw of the weights, the bias and the group scales per batch, shared by all its examples
  (``w~ = mu + sigma eps``, then the layer's dense op): the least work per step, but the examples' gradients are
  correlated, so the minibatch gradient's variance does not fall as one over the batch size;
* ``flipout`` (Wen, Vicol, Ba, Tran & Grosse 2018, *Flipout: Efficient pseudo-independent weight perturbations on
  mini-batches*, ICLR): one shared perturbation ``dW = sigma eps`` made different for every example by random
  signs on its inputs (``s_n``) and outputs (``r_n``), ``W_n = mu + dW * r_n s_n^T``, so
  ``y_n = mu x_n + r_n * (dW (s_n * x_n))``: two products per layer, as the LRT has. The signs are per example and
  input feature (channel), so an example's weights are the same at every position of a convolution or a sequence;
  the group scales are drawn per example, as under the LRT.

Each gives every example's pre-activation the mean and the per-element variance of explicit weight sampling
(``tests/test_estimators.py``), so for a loss that sums over the elements of one layer's output all three estimate
the same gradient; they differ in its variance and in the time a step takes (``analysis/bench_estimators.py``).
A convolution's positions are independent under the LRT and share the example's weights under the others, so
through deeper networks the LRT's expected loss is that of its own approximation (docs/PYTHON.md).

Example::

    with Estimation("flipout,linear=lrt"):     # Flipout for the convolutions, the LRT for linear layers
        loss = elbo.differentiable_loss(net.model, net.guide, x, y, n_data)
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from typing import ClassVar

import torch
import torch.nn.functional as F
from pyro.distributions import Normal

from pyro_bc.errors import ConfigError
from pyro_bc.infer.reparam import (
    OPS,
    LayerDraws,
    LayerOp,
    _along_dim1,
    _bayes_layer,
    channels_last,
    lrt_draw,
    per_example_scales,
)

__all__ = ["DEFAULT", "ESTIMATORS", "Estimation", "Estimator", "EstimatorChoice", "Flipout", "LocalReparameterisation",
           "ReducedPrecisionVariance", "SharedDraw", "estimation"]

#: The estimator every layer kind uses unless told otherwise.
DEFAULT = "lrt"

#: ``signs(shape)``: independent random signs of ``shape`` (examples first) on the layer input's device and dtype.
Signs = Callable[[tuple[int, ...]], torch.Tensor]
Draw = tuple[torch.Tensor, torch.Tensor | None]


class Estimator(abc.ABC):
    """One gradient estimator: how a Bayesian layer's output is drawn from the guide distributions.

    A subclass sets :attr:`name` (the name ``--estimator`` takes) and implements :meth:`__call__`; registering it
    is ``ESTIMATORS[name] = Subclass()``.
    """

    name: ClassVar[str]

    @abc.abstractmethod
    def __call__(self, op: LayerOp, x: torch.Tensor, scales: tuple | None, q_w: Normal, q_b: Normal | None,
                 draws: LayerDraws, *args) -> Draw:
        """The output of layer kind ``op`` on ``x`` (``args``: the op's further arguments, stride, padding, ...).

        :param scales: ``(prior, guides)``: the layer's prior and the guide distributions of its scale sites, from
            which ``prior.per_example_scale(guides, n, noise)`` draws ``n`` scale vectors; ``None`` without scales.
        :param q_w: the guide Normal of the weights ``w~``; ``q_b`` of the bias (``None`` without one).
        :param draws: the handler, whose ``noise`` and ``signs`` make per-example draws (a data-parallel process's
            rows of the global batch's); draws shared by the batch come from torch's generator directly.
        :returns: the output and the weights' summed KL against ``N(0, 1)`` where the draw computed it (``None``:
            the ELBO computes it).
        """


class LocalReparameterisation(Estimator):
    """The local reparameterisation trick: :func:`pyro_bc.infer.reparam.lrt_draw`, each kind's ``lrt`` of the op table."""

    name = "lrt"

    def __call__(self, op, x, scales, q_w, q_b, draws, *args):
        return lrt_draw(op, x, scales, q_w, q_b, draws, *args)


class ReducedPrecisionVariance(LocalReparameterisation):
    """The local reparameterisation with the variance path in :attr:`variance_dtype` (see
    :mod:`pyro_bc.infer.fused`), except in grouped convolutions (``groups > 1``: slower in bfloat16 on oneDNN)."""

    name = "lrt-bf16"
    variance_dtype: ClassVar[torch.dtype] = torch.bfloat16

    def __call__(self, op, x, scales, q_w, q_b, draws, *args):
        grouped = len(args) > 3 and args[3] != 1  # a convolution's (stride, padding, dilation, groups)
        return lrt_draw(op, x, scales, q_w, q_b, draws, *args, variance_dtype=None if grouped else self.variance_dtype)


def _shared_noise(shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
    """Standard normals from torch's generator, alike in every data-parallel process (they share its stream)."""
    return torch.randn(shape, dtype=like.dtype, device=like.device)


def _normal_draw(q: Normal) -> torch.Tensor:
    return torch.addcmul(q.loc, q.scale, torch.randn_like(q.loc))


#: The memory layout each kind's input and output are given where it is not the op's own, as the LRT's conv2d
#: gives them (pooling and the next convolution run several times faster on channels-last); every estimator
#: applies it.
LAYOUTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"conv2d": channels_last}


def _in_layout(op: LayerOp, t: torch.Tensor) -> torch.Tensor:
    layout = LAYOUTS.get(op.name)
    return t if layout is None else layout(t)


class SharedDraw(Estimator):
    """One draw of the group scales, the weights and the bias per batch, shared by its examples; the layer's dense
    op (the op table's ``function``) computes the output."""

    name = "shared"

    def __call__(self, op, x, scales, q_w, q_b, draws, *args):
        z = None if scales is None else scales[0].per_example_scale(scales[1], 1, _shared_noise)[0]
        w = _normal_draw(q_w)
        b = None if q_b is None else _normal_draw(q_b)
        return _in_layout(op, _bayes_layer(op, _in_layout(op, x), z, w, b, *args)), None


def flipout_linear(x: torch.Tensor, z: torch.Tensor | None, mu: torch.Tensor, delta: torch.Tensor,
                   b_mu: torch.Tensor | None, b_delta: torch.Tensor | None, signs: Signs) -> torch.Tensor:
    """Flipout of a linear layer on ``x`` ``(N, ..., in)``: ``y = xs mu^T + b_mu + r * ((s * xs) delta^T + b_delta)``
    with ``xs = x z`` (``z`` per example, ``x``'s shape, or ``None``), ``s`` a sign per example and input feature,
    ``r`` per example and output (shared by an example's positions)."""
    ones = (1,) * (x.dim() - 2)
    xs = x if z is None else x * z
    s = signs((x.shape[0], *ones, x.shape[-1]))
    r = signs((x.shape[0], *ones, mu.shape[0]))
    return torch.addcmul(F.linear(xs, mu, b_mu), F.linear(xs * s, delta, b_delta), r)


def _flipout_conv(function: Callable[..., torch.Tensor]):
    def flipout_conv(x, z, mu, delta, b_mu, b_delta, signs: Signs, *args) -> torch.Tensor:
        """Flipout of a convolution: ``y = (conv(x, mu) + b_mu + r * (conv(s * x, delta) + b_delta)) z``, ``s`` a
        sign per example and input channel, ``r`` per example and output channel, ``z`` ``(N, C_out)`` or None."""
        ones = (1,) * (x.dim() - 2)
        s = signs((x.shape[0], x.shape[1], *ones))
        r = signs((x.shape[0], mu.shape[0], *ones))
        y = torch.addcmul(function(x, mu, b_mu, *args), function(x * s, delta, b_delta, *args), r)
        return y if z is None else y * _along_dim1(z, y.dim())
    return flipout_conv


class Flipout(Estimator):
    """Flipout (Wen et al. 2018): the shared perturbation ``dW = sigma eps`` (and ``db``) times per-example random
    signs on the inputs and the outputs; the group scales drawn per example. :attr:`ops` holds the forward of each
    layer kind, ``forward(x, z, mu, delta, b_mu, b_delta, signs, *args)``; a new kind adds its own."""

    name = "flipout"
    ops: ClassVar[dict[str, Callable[..., torch.Tensor]]] = {
        "linear": flipout_linear,
        "conv1d": _flipout_conv(F.conv1d),
        "conv2d": _flipout_conv(F.conv2d),
    }

    def __call__(self, op, x, scales, q_w, q_b, draws, *args):
        forward = self.ops.get(op.name)
        if forward is None:
            raise ConfigError(f"estimator flipout has no forward for layer kind {op.name!r} (add one to "
                              f"pyro_bc.infer.estimators.Flipout.ops, or choose another estimator for it)")
        x = _in_layout(op, x)
        z_n = per_example_scales(op, x, scales, draws.noise)
        delta = q_w.scale * torch.randn_like(q_w.loc)
        b_delta = None if q_b is None else q_b.scale * torch.randn_like(q_b.loc)
        y = forward(x, z_n, q_w.loc, delta, None if q_b is None else q_b.loc, b_delta,
                    lambda shape: draws.signs(shape, x), *args)
        return _in_layout(op, y), None


#: The gradient estimators by name; :class:`EstimatorChoice` picks one per layer kind.
ESTIMATORS: dict[str, Estimator] = {e.name: e for e in (LocalReparameterisation(), ReducedPrecisionVariance(),
                                                          SharedDraw(), Flipout())}


def _estimator(name: str, spec: str) -> Estimator:
    if name not in ESTIMATORS:
        raise ConfigError(f"estimator {spec!r}: unknown estimator {name!r}, choose {', '.join(ESTIMATORS)} (per "
                          "layer kind: KIND=NAME, e.g. conv2d=flipout,linear=lrt)")
    return ESTIMATORS[name]


class EstimatorChoice:
    """The estimator of each layer kind: ``default`` for every kind that ``per_kind`` does not name.

    As text (``--estimator``, ``fit(..., estimator=...)``, ``config.json``): comma-separated items, each an
    estimator's name (every kind not named otherwise; at most one) or ``KIND=NAME``: ``flipout``,
    ``conv2d=flipout,linear=lrt``, ``shared,linear=lrt``. Kinds not named use :data:`DEFAULT` when no bare name is
    given. :meth:`parse` reads it, ``str()`` writes it back in a canonical form.
    """

    def __init__(self, default: str = DEFAULT, per_kind: Mapping[str, str] | None = None, spec: str | None = None):
        spec = spec if spec is not None else default
        self.default = default
        self._default = _estimator(default, spec)
        self.per_kind = {}
        for kind, name in (per_kind or {}).items():
            if kind not in OPS:
                raise ConfigError(f"estimator {spec!r}: unknown layer kind {kind!r}, the kinds are {', '.join(OPS)}")
            _estimator(name, spec)
            if name != default:
                self.per_kind[kind] = name
        self._by_kind = {kind: ESTIMATORS[name] for kind, name in self.per_kind.items()}

    @classmethod
    def parse(cls, spec: str | EstimatorChoice) -> EstimatorChoice:
        """The choice written as ``spec`` (see the class); :class:`~pyro_bc.errors.ConfigError`, one line, for an
        unknown estimator or kind, a kind named twice or two defaults."""
        if isinstance(spec, EstimatorChoice):
            return spec
        if not isinstance(spec, str):
            raise ConfigError(f"estimator must be text such as 'lrt' or 'conv2d=flipout,linear=lrt', got "
                              f"{type(spec).__name__}")
        default, per_kind = None, {}
        for item in (part.strip() for part in spec.split(",")):
            kind, sep, name = (part.strip() for part in item.partition("="))
            if not item:
                raise ConfigError(f"estimator {spec!r}: an empty item; give NAME or KIND=NAME items, comma-separated "
                                  "(e.g. flipout,linear=lrt)")
            if not sep:
                if default is not None:
                    raise ConfigError(f"estimator {spec!r}: at most one estimator for all kinds, the others as "
                                      "KIND=NAME (e.g. flipout,linear=lrt)")
                default = item
            elif kind in per_kind:
                raise ConfigError(f"estimator {spec!r}: layer kind {kind!r} is named twice")
            else:
                per_kind[kind] = name
        return cls(DEFAULT if default is None else default, per_kind, spec)

    def __call__(self, kind: str) -> Estimator:
        """The estimator of layer kind ``kind``."""
        return self._by_kind.get(kind, self._default)

    def __str__(self) -> str:
        kinds = [f"{kind}={self.per_kind[kind]}" for kind in OPS if kind in self.per_kind]
        return ",".join(kinds if kinds and self.default == DEFAULT else [self.default, *kinds])

    def __repr__(self) -> str:
        return f"EstimatorChoice({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, EstimatorChoice) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))


class Estimation(LayerDraws):
    """Effect handler: each Bayesian layer's output drawn by its kind's estimator (see the module docstring).

    ``Estimation("lrt")`` computes exactly what :class:`~pyro_bc.infer.reparam.LocalReparameterization` does, draw for
    draw; the training loop (``pyro-bc train --estimator``, ``fit(..., estimator=...)``) steps under it.

    :param estimators: an :class:`EstimatorChoice` or its text (``"flipout"``, ``"conv2d=flipout,linear=lrt"``).
    :param shard: as :class:`~pyro_bc.infer.reparam.LayerDraws`'s.
    """

    def __init__(self, estimators: str | EstimatorChoice = DEFAULT, shard: tuple[int, int] | None = None):
        super().__init__(shard)
        self.choice = EstimatorChoice.parse(estimators)

    def draw(self, op, x, scales, q_w, q_b, *args):
        return self.choice(op.name)(op, x, scales, q_w, q_b, self, *args)


def estimation(fn: Callable | None = None, estimators: str | EstimatorChoice = DEFAULT,
               shard: tuple[int, int] | None = None):
    """Function form of :class:`Estimation`, as Pyro's handlers have: wraps ``fn``, or returns the handler when
    ``fn`` is ``None``."""
    handler = Estimation(estimators, shard)
    return handler(fn) if fn is not None else handler
