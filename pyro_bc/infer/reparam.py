"""Effectful layer ops and the local reparameterisation trick as a Pyro effect handler.

A Bayesian layer's model computes its output with :func:`bayes_layer` from sampled values
``(x, z, w, b)``: ``z`` the group scales (or ``None``), ``w`` the non-centred weights ``w~`` and ``b``
the bias; a prior computes ``z`` from its sites with :func:`group_scale`. Without a handler these
ops compute with the sampled values: explicit weight sampling, one ``z`` per step. Under
:class:`LocalReparameterization` they look up the *guide distributions* the values were drawn from
and return a draw of the pre-activation instead (Kingma et al. 2015), with group-scale noise drawn
per example as in the official code (docs/METHOD.md 5).

Every layer kind is one entry of :data:`OPS`: its deterministic function, whether the group scales
multiply its inputs or its outputs, and its local-reparameterisation op. The handler's body is the
same for all of them. The op also returns the weights' KL against ``N(0, 1)`` (:mod:`pyro_bc.infer.fused`);
the handler leaves it on the guide's weight distribution, where the ELBO's
:func:`~pyro_bc.infer.distributions.summed_kl` takes it instead of computing it again. :class:`LayerDraws` is the
handler's skeleton; the other gradient estimators (one weight draw per batch, Flipout) fill it in
:mod:`pyro_bc.infer.estimators`.

Example::

    with LocalReparameterization():
        loss = elbo.differentiable_loss(net.model, net.guide, x, y)
    # or, as a function: local_reparameterization(net.model)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from pyro.distributions import Independent, LogNormal, Normal
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import effectful

from pyro_bc.infer import fused
from pyro_bc.infer.distributions import NormalLogVar

#: ``infer`` of a guide site whose value feeds only ops that this handler replaces: under the handler the
#: site is not drawn (its value is the distribution's median), which saves a weight-sized draw per step.
LRT_ONLY = {"lrt_only": True}


def _conv_output_shape(x: torch.Tensor, weight: torch.Tensor, stride=1, padding=0, dilation=1, groups=1):
    if padding == "same":  # PyTorch allows it with stride 1 only
        return torch.Size((x.shape[0], weight.shape[0], *x.shape[2:]))
    padding = 0 if padding == "valid" else padding
    n = x.dim() - 2

    def per_dim(v) -> tuple[int, ...]:
        return (v,) * n if isinstance(v, int) else tuple(v)

    spatial = [(size + 2 * p - d * (k - 1) - 1) // s + 1 for size, k, s, p, d in
               zip(x.shape[2:], weight.shape[2:], per_dim(stride), per_dim(padding), per_dim(dilation))]
    return torch.Size((x.shape[0], weight.shape[0], *spatial))


def channels_last(t: torch.Tensor) -> torch.Tensor:
    """``t`` in channels-last memory format (``t`` itself where it already is, e.g. one channel)."""
    return t.contiguous(memory_format=torch.channels_last)


def _lrt_conv2d_channels_last(x: torch.Tensor, *args, variance_dtype: torch.dtype | None = None) -> fused.LRTOutput:
    # channels-last from here on: pooling and the next convolution run several times faster on it. The input is
    # converted, not only the output, so that the op's saved buffers and the gradients its backward receives share
    # one layout (a network's RGB input converted costs a twentieth of converting its first layer's output and then
    # its backward's mixed-layout products and copies); a convolution of one channel still returns the default one
    y, kl = fused.lrt_conv2d(channels_last(x), *args, variance_dtype=variance_dtype)
    return channels_last(y), kl


def _single(value) -> int | str:
    return value if isinstance(value, (int, str)) else value[0]


def _lrt_conv1d(x, z, mu, logvar, b_mu, b_var, eps, stride=1, padding=0, dilation=1, groups=1, *,
                variance_dtype: torch.dtype | None = None) -> fused.LRTOutput:
    """A 1-D convolution's LRT draw as the 2-D one's over a height of one (the same sums, one fused op)."""
    padding = _single(padding)
    y, kl = fused.lrt_conv2d(x.unsqueeze(2), z, mu.unsqueeze(2), logvar.unsqueeze(2), b_mu, b_var, eps.unsqueeze(2),
                             (1, _single(stride)), padding if isinstance(padding, str) else (0, padding),
                             (1, _single(dilation)), groups, variance_dtype=variance_dtype)
    return y.squeeze(2), kl


@dataclasses.dataclass(frozen=True)
class LayerOp:
    """One layer kind: ``function(x, weight, bias, *args)``, where the group scale applies, and the LRT op
    ``lrt(x, z, mu, logvar, b_mu, b_var, eps, *args) -> (draw, sum KL(N(mu, exp(logvar)) || N(0, 1)))``
    (``z`` per example, ``logvar`` the weight log-variances, ``b_var`` the bias variances, ``eps``
    standard-normal noise of the output's shape; keyword ``variance_dtype``: the dtype of the variance path, see
    :mod:`pyro_bc.infer.fused`)."""

    name: str
    function: Callable[..., torch.Tensor]
    scales_input: bool  # the group scales multiply the input features (True) or the output channels
    output_shape: Callable[..., torch.Size]
    lrt: Callable[..., fused.LRTOutput]


#: The layer kinds: one entry each.
OPS: dict[str, LayerOp] = {
    "linear": LayerOp("linear", F.linear, True, lambda x, w, *args: torch.Size((*x.shape[:-1], w.shape[0])),
                      fused.lrt_linear),
    "conv1d": LayerOp("conv1d", F.conv1d, False, _conv_output_shape, _lrt_conv1d),
    "conv2d": LayerOp("conv2d", F.conv2d, False, _conv_output_shape, _lrt_conv2d_channels_last),
}


def _along_dim1(z: torch.Tensor, dim: int) -> torch.Tensor:
    """``z`` of shape ``(G,)`` or ``(N, G)`` shaped to scale dimension 1 of a ``dim``-D tensor."""
    return z.reshape(z.shape + (1,) * (dim - 2)) if z.dim() == 2 else z.reshape((-1,) + (1,) * (dim - 2))


def _along_last(z: torch.Tensor, dim: int) -> torch.Tensor:
    """``z`` of shape ``(G,)`` or ``(N, G)`` shaped to scale the last dimension of a ``dim``-D tensor whose first
    is the examples' (a linear layer's input of any leading shape: features, or tokens and features)."""
    return z if z.dim() == 1 else z.reshape(z.shape[:1] + (1,) * (dim - 2) + z.shape[1:])


def _bayes_layer(op: LayerOp, x: torch.Tensor, z: torch.Tensor | None, w: torch.Tensor, b: torch.Tensor | None,
                 *args) -> torch.Tensor:
    if z is None:
        return op.function(x, w, b, *args)
    if op.scales_input:
        return op.function(x * _along_last(z, x.dim()), w, b, *args)
    y = op.function(x, w, b, *args)
    return y * _along_dim1(z, y.dim())


def _group_scale(prior, *values: torch.Tensor) -> torch.Tensor:
    return prior.scale(*values)


#: ``bayes_layer(op, x, z, w, b, *args)``: the layer kind ``op`` applied with weights ``z w`` (``z`` on the
#: inputs or the outputs, as ``op`` says) and bias ``b`` (scaled by ``z`` where ``z`` scales the outputs).
bayes_layer = effectful(_bayes_layer, type="bc_layer")
#: ``group_scale(prior, *values)``: ``z`` from the values of a prior's scale sites (``prior.scale``).
group_scale = effectful(_group_scale, type="bc_group_scale")


def _logvar(q: Normal) -> torch.Tensor:
    return q.logvar if isinstance(q, NormalLogVar) else 2 * q.scale.log()


def _base(fn):
    while isinstance(fn, Independent):
        fn = fn.base_dist
    return fn


class LayerDraws(Messenger):
    """The handler's skeleton shared by every gradient estimator: records the guide distribution of every sampled
    value (by identity of the tensor, which Pyro's replay passes unchanged from guide to model), leaves guide sites
    marked :data:`LRT_ONLY` undrawn, and at each :func:`bayes_layer` hands the guide distributions to :meth:`draw`,
    whose output replaces the op's. The guide must sample ``w`` (and ``b``) from a Normal; anything else falls back
    to explicit sampling. A weight KL that the draw returns is left on a :class:`NormalLogVar` ``w`` guide
    (:attr:`~NormalLogVar.standard_normal_kl`) for the ELBO.

    :param shard: ``(start, total)``: the batch is rows ``start, start + 1, ...`` of a batch of ``total``
        rows. The per-example draws (:meth:`noise`, :meth:`signs`) are made for all ``total`` rows and these rows
        are kept, so that the processes of a data-parallel run together draw what one process would (``None``: the
        whole batch).
    """

    def __init__(self, shard: tuple[int, int] | None = None):
        super().__init__()
        self.shard = shard
        self._q: dict[int, tuple[torch.Tensor, object]] = {}  # guide distributions of sampled values
        self._scales: dict[int, tuple[torch.Tensor, object]] = {}  # (prior, guide distributions) of group scales

    def _rows(self, full: torch.Tensor, n: int) -> torch.Tensor:
        start = self.shard[0]
        return full[start:start + n]

    def noise(self, shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
        """Standard-normal per-example noise of ``shape`` (examples first), honouring :attr:`shard`."""
        if self.shard is None:
            return torch.randn(shape, dtype=like.dtype, device=like.device)
        full = torch.randn((self.shard[1], *shape[1:]), dtype=like.dtype, device=like.device)
        return self._rows(full, shape[0])


    def signs(self, shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
        """Independent random signs (+1 or -1, each with probability 1/2) per example, honouring :attr:`shard`."""
        rows = shape[0] if self.shard is None else self.shard[1]
        full = torch.randint(0, 2, (rows, *shape[1:]), dtype=like.dtype, device=like.device).mul_(2).sub_(1)
        return full if self.shard is None else self._rows(full, shape[0])

    def __enter__(self):
        self._q.clear()
        self._scales.clear()
        return super().__enter__()

    def __exit__(self, *args):
        self._q.clear()
        self._scales.clear()
        return super().__exit__(*args)

    @staticmethod
    def _lookup(value, table: dict):
        if value is None:
            return None
        hit = table.get(id(value))
        return hit[1] if hit is not None and hit[0] is value else None

    def _pyro_sample(self, msg) -> None:
        # Only a guide's own site arrives here without a value (a replayed model site has the guide's value).
        if msg["infer"].get("lrt_only") and msg["value"] is None and not msg["is_observed"]:
            fn = _base(msg["fn"])
            msg["value"] = fn.loc.exp() if isinstance(fn, LogNormal) else fn.loc  # the median
            # the median may be a parameter, the same tensor in every guide run under this handler (several
            # steps or particles): this run's distribution replaces the last one's
            self._q[id(msg["value"])] = (msg["value"], fn)

    def _pyro_post_sample(self, msg) -> None:
        value = msg["value"]
        if msg["is_observed"] or not torch.is_tensor(value) or id(value) in self._q:
            return  # the model's replayed site: keep the guide's distribution
        self._q[id(value)] = (value, _base(msg["fn"]))

    def _pyro_bc_group_scale(self, msg) -> None:
        prior, *values = msg["args"]
        guides = [self._lookup(v, self._q) for v in values]
        if any(q is None for q in guides):
            return
        value = prior.scale(*values)
        self._scales[id(value)] = (value, (prior, guides))
        msg["value"], msg["done"] = value, True

    def _pyro_bc_layer(self, msg) -> None:
        op, x, z, w, b, *args = msg["args"]
        q_w, q_b, q_z = self._lookup(w, self._q), self._lookup(b, self._q), self._lookup(z, self._scales)
        if not isinstance(q_w, Normal) or (b is not None and not isinstance(q_b, Normal)) or (z is not None and q_z is None):
            return
        y, kl = self.draw(op, x, q_z, q_w, q_b, *args)
        if kl is not None and isinstance(q_w, NormalLogVar):  # counted by the ELBO through summed_kl
            q_w.standard_normal_kl = kl
        msg["value"], msg["done"] = y, True

    def draw(self, op: LayerOp, x: torch.Tensor, scales: tuple | None, q_w: Normal, q_b: Normal | None,
             *args) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer's output drawn from the guide distributions: ``scales`` the prior and the guide distributions
        of its scale sites (``None`` without group scales), ``q_w`` and ``q_b`` those of the weights and the bias;
        returns the output and the weights' KL against ``N(0, 1)`` where the draw computed it (else ``None``)."""
        raise NotImplementedError


def per_example_scales(op: LayerOp, x: torch.Tensor, scales: tuple | None, noise) -> torch.Tensor | None:
    """The group scales drawn once per example, ``(N, groups)`` (the prior's :meth:`Prior.per_example_scale`);
    expanded to ``x``'s shape where they scale the inputs of a linear layer on more than 2-D inputs (one scale per
    example, shared by its positions)."""
    if scales is None:
        return None
    prior, guides = scales
    z_n = prior.per_example_scale(guides, x.shape[0], noise)
    if op.scales_input and x.dim() > 2:
        z_n = _along_last(z_n, x.dim()).expand(x.shape)
    return z_n


def lrt_draw(op: LayerOp, x: torch.Tensor, scales: tuple | None, q_w: Normal, q_b: Normal | None, draws: LayerDraws,
             *args, variance_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The local reparameterisation's draw of a layer's output through the op's ``lrt`` (Kingma et al. 2015): the
    pre-activation from its Gaussian given the group scales, which are drawn per example; per-example noise from
    ``draws`` (the handler); the variance path in ``variance_dtype`` where one is given."""
    z_n = per_example_scales(op, x, scales, draws.noise)
    b_mu, b_var = (None, None) if q_b is None else (q_b.loc, q_b.variance)
    eps = draws.noise(op.output_shape(x, q_w.loc, *args), x)
    return op.lrt(x, z_n, q_w.loc, _logvar(q_w), b_mu, b_var, eps, *args, variance_dtype=variance_dtype)


class LocalReparameterization(LayerDraws):
    """Replace explicit weight sampling in :func:`bayes_layer` by the local reparameterisation.

    At each layer, draws the pre-activation from its Gaussian through the op's ``lrt`` (:func:`lrt_draw`; e.g.
    ``mean = (x z) M^T + mu_b``, ``var = (x z)^2 S^T + s_b^2`` for linear layers), ``z`` drawn per example by
    the prior (:meth:`Prior.per_example_scale`). Guide sites marked :data:`LRT_ONLY` are not drawn. The other
    gradient estimators, and a choice per layer kind, are :class:`pyro_bc.infer.estimators.Estimation`.

    :param shard: see :class:`LayerDraws`.
    """

    def draw(self, op, x, scales, q_w, q_b, *args):
        return lrt_draw(op, x, scales, q_w, q_b, self, *args)


def local_reparameterization(fn: Callable | None = None, shard: tuple[int, int] | None = None):
    """Function form of :class:`LocalReparameterization`, as Pyro's handlers have: wraps ``fn``, or returns
    the handler when ``fn`` is ``None``."""
    handler = LocalReparameterization(shard)
    return handler(fn) if fn is not None else handler
