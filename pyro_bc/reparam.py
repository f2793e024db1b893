"""Effectful layer ops and the local reparameterisation trick as a Pyro effect handler.

A Bayesian layer's model computes its output with :func:`linear` or :func:`conv2d` from sampled
values ``(x, z, w, b)``: ``z`` the group scales (or ``None``), ``w`` the non-centred weights
``w~`` and ``b`` the bias. Without a handler these ops compute with the sampled values, i.e.
explicit weight sampling with one ``z`` per step. Under :class:`LocalReparameterization` they
look up the *guide distributions* the values were drawn from and return a draw of the
pre-activation instead (Kingma et al. 2015), with group-scale noise drawn per example as in
the official code (``METHOD.md`` section 5).

Example::

    lrt = LocalReparameterization()
    with lrt:
        loss = elbo.differentiable_loss(net.model, net.guide, x, y)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pyro.distributions import Independent, LogNormal, Normal
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import effectful

from pyro_bc.distributions import log_moments


def _linear(x: torch.Tensor, z: torch.Tensor | None, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x if z is None else x * z, w, b)


def _conv2d(x, z, w, b, stride=1, padding=0, dilation=1, groups=1) -> torch.Tensor:
    y = F.conv2d(x, w, b, stride, padding, dilation, groups)
    return y if z is None else y * z[..., :, None, None]


def _horseshoe_scale(s_a: torch.Tensor, s_b: torch.Tensor, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(s_a * s_b * z_a * z_b)


#: ``linear(x, z, w, b)``: input scaled by the input-group scales ``z``, then ``x W^T + b``.
linear = effectful(_linear, type="bc_linear")
#: ``conv2d(x, z, w, b, stride, padding, dilation, groups)``: convolution, output channels (bias
#: included) scaled by ``z``.
conv2d = effectful(_conv2d, type="bc_conv2d")
#: ``horseshoe_scale(s_a, s_b, z_a, z_b)``: ``z = sqrt(s_a s_b z_a z_b)``, the group horseshoe scale.
horseshoe_scale = effectful(_horseshoe_scale, type="bc_horseshoe_scale")


def _base(fn):
    while isinstance(fn, Independent):
        fn = fn.base_dist
    return fn


class HorseshoeScalePosterior:
    """The guide's distribution of ``z = s * z~`` for one layer, sampled per example.

    ``log z[n, i] = m_s + sqrt(v_s) xi[n] + m_i + sqrt(v_i) xi[n, i]``: one global draw per example
    shared by the layer's groups, one local draw per example and group (``METHOD.md`` 5.3).
    """

    def __init__(self, s_a: LogNormal, s_b: LogNormal, z_a: LogNormal, z_b: LogNormal):
        (m_sa, v_sa), (m_sb, v_sb), (m_za, v_za), (m_zb, v_zb) = map(log_moments, (s_a, s_b, z_a, z_b))
        self.loc = 0.5 * (m_sa + m_sb + m_za + m_zb)  # m_s + m_i
        self.sd_s, self.sd_i = 0.5 * torch.sqrt(v_sa + v_sb), 0.5 * torch.sqrt(v_za + v_zb)

    def rsample(self, sample_shape: tuple[int, ...], noise) -> torch.Tensor:
        """Draws of ``z``; ``noise(shape, like)`` gives the standard-normal draws."""
        shape = torch.Size(sample_shape)
        xi_s = noise(shape + (1,) * self.loc.dim(), self.loc)
        xi_i = noise(shape + self.loc.shape, self.loc)
        return torch.exp(self.loc + self.sd_s * xi_s + self.sd_i * xi_i)


class LocalReparameterization(Messenger):
    """Replace explicit weight sampling in :func:`linear`/:func:`conv2d` by the LRT.

    Records the guide distribution of every sampled value (by identity of the tensor, which Pyro's
    replay passes unchanged from guide to model) and, at each op, draws the pre-activation from
    its Gaussian: ``mean = (x z) M^T + mu_b``, ``var = (x z)^2 S^T + s_b^2`` for linear layers,
    ``y = z (conv(x, M) + mu_b + sqrt(conv(x^2, S) + s_b^2) eps)`` for convolutions, ``z`` drawn
    per example. Guide sites marked ``infer={"lrt_only": True}`` are not drawn (their value is the
    median): mark only values that are used solely by these ops. The guide must sample ``w`` (and ``b``)
    from a Normal and ``z`` from a Normal or through :func:`horseshoe_scale`; anything else falls back
    to explicit sampling.

    :attr:`rows` ``= (start, total)`` says the batch is rows ``start, start + 1, ...`` of a batch of
    ``total`` rows: the per-example noise is drawn for all ``total`` rows and these rows are kept, so
    that the processes of a data-parallel run together draw what one process would (``None``: the
    batch is the whole batch).
    """

    def __init__(self):
        super().__init__()
        self._q: dict[int, tuple[torch.Tensor, object]] = {}
        self.rows: tuple[int, int] | None = None

    def _noise(self, shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
        """Standard-normal per-example noise of ``shape`` (examples first), honouring :attr:`rows`."""
        if self.rows is None:
            return torch.randn(shape, dtype=like.dtype, device=like.device)
        start, total = self.rows
        full = torch.randn((total, *shape[1:]), dtype=like.dtype, device=like.device)
        return full[start:start + shape[0]]

    def __enter__(self):
        self._q.clear()
        return super().__enter__()

    def __exit__(self, *args):
        self._q.clear()
        return super().__exit__(*args)

    def _lookup(self, value):
        if value is None:
            return None
        hit = self._q.get(id(value))
        return hit[1] if hit is not None and hit[0] is value else None

    def _pyro_sample(self, msg) -> None:
        # A value drawn only to be fed to an LRT-replaced op is never used by value: skip the draw.
        if msg["infer"].get("lrt_only") and msg["value"] is None and not msg["is_observed"]:
            fn = _base(msg["fn"])
            msg["value"] = fn.loc.exp() if isinstance(fn, LogNormal) else fn.loc  # the median

    def _pyro_post_sample(self, msg) -> None:
        value = msg["value"]
        if msg["is_observed"] or not torch.is_tensor(value) or id(value) in self._q:
            return  # the model's replayed site: keep the guide's distribution
        self._q[id(value)] = (value, _base(msg["fn"]))

    def _pyro_bc_horseshoe_scale(self, msg) -> None:
        parts = [self._lookup(v) for v in msg["args"]]
        if all(isinstance(p, LogNormal) for p in parts):
            value = _horseshoe_scale(*msg["args"])
            self._q[id(value)] = (value, HorseshoeScalePosterior(*parts))
            msg["value"], msg["done"] = value, True

    def _gaussian_parts(self, args):
        x, z, w, b = args[:4]
        q_w, q_z = self._lookup(w), self._lookup(z)
        q_b = self._lookup(b) if b is not None else None
        if not isinstance(q_w, Normal) or (z is not None and q_z is None) or (b is not None and q_b is None):
            return None
        if z is None:
            z_n = None
        elif isinstance(q_z, HorseshoeScalePosterior):
            z_n = q_z.rsample(x.shape[:1], noise=self._noise)
        else:
            z_n = q_z.loc + q_z.scale * self._noise(x.shape[:1] + q_z.loc.shape, q_z.loc)
        bias = (None, None) if b is None else (q_b.loc, q_b.variance)
        return x, z_n, q_w.loc, q_w.variance, bias

    def _pyro_bc_linear(self, msg) -> None:
        parts = self._gaussian_parts(msg["args"])
        if parts is None:
            return
        x, z_n, w_mu, w_var, (b_mu, b_var) = parts
        if z_n is not None:
            x = x * z_n
        mean = F.linear(x, w_mu, b_mu)
        var = F.linear(x * x, w_var, b_var)
        msg["value"], msg["done"] = mean + var.sqrt() * self._noise(mean.shape, mean), True

    def _pyro_bc_conv2d(self, msg) -> None:
        parts = self._gaussian_parts(msg["args"])
        if parts is None:
            return
        x, z_n, w_mu, w_var, (b_mu, b_var) = parts
        conv_args = msg["args"][4:]
        mean = F.conv2d(x, w_mu, b_mu, *conv_args)
        var = F.conv2d(x * x, w_var, b_var, *conv_args)
        y = mean + var.sqrt() * self._noise(mean.shape, mean)
        y = y if z_n is None else y * z_n[:, :, None, None]
        # channels-last from here on: the pooling and the next convolution run several times faster on it
        msg["value"], msg["done"] = y.contiguous(memory_format=torch.channels_last), True
