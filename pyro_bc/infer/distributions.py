"""Priors and closed-form KL divergences for Bayesian compression (Louizos, Ullrich & Welling, 2017).

Importing this module registers, with :func:`torch.distributions.register_kl`:

* ``KL(Normal || LogUniform)``: the Molchanov et al. (2017) approximation (sparse variational dropout, eq. 14);
* ``KL(LogNormal || Gamma)`` and ``KL(LogNormal || InverseGamma)``: exact closed forms.

The rules are registered on the :mod:`torch.distributions` base classes, so they also cover the
:mod:`pyro.distributions` wrappers and, through Pyro's ``Independent`` rule, ``.to_event()`` versions.
"""

import math
from typing import ClassVar

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions.util import broadcast_shape
from torch.distributions import Gamma as _TorchGamma
from torch.distributions import InverseGamma as _TorchInverseGamma
from torch.distributions import LogNormal as _TorchLogNormal
from torch.distributions import Normal as _TorchNormal
from torch.distributions import constraints, register_kl
from torch.distributions.transforms import ExpTransform
from torch.distributions.utils import broadcast_all, lazy_property

from pyro_bc.defaults import LOG_ALPHA_EPS
from pyro_bc.infer.fused import standard_normal_kl

__all__ = [
    "K1",
    "K2",
    "K3",
    "LogNormalLogVar",
    "LogUniform",
    "NormalLogVar",
    "StandardNormal",
    "half_cauchy_gamma",
    "half_cauchy_inverse_gamma",
    "kl_lognormal_gamma",
    "kl_lognormal_inverse_gamma",
    "kl_normal_log_uniform",
    "kl_normal_logvar_normal",
    "log_alpha",
    "log_moments",
    "summed_kl",
]

#: Constants of the Molchanov et al. (2017) fit of ``-KL(N(mu, alpha mu^2) || LogUniform)``.
K1 = 0.63576
K2 = 1.87320
K3 = 1.48695

_LOG_2PI_E = math.log(2.0 * math.pi) + 1.0


class LogUniform(dist.TorchDistribution):
    """Improper log-uniform (normal-Jeffreys) prior with density proportional to ``1 / |z|``.

    :meth:`log_prob` is ``-log|z|`` summed over the event dimensions. The prior is improper, so it cannot be
    sampled: :meth:`sample` and :meth:`rsample` return ones, a finite placeholder that only lets
    :class:`pyro.infer.Predictive` and initialisation strategies run the model.

    :param torch.Size batch_shape: The batch shape.
    :param torch.Size event_shape: The event shape.
    :param validate_args: Passed to :class:`torch.distributions.Distribution`.
    """

    arg_constraints: ClassVar[dict[str, constraints.Constraint]] = {}
    support = constraints.real
    has_rsample = False

    def __init__(
        self,
        batch_shape: torch.Size | tuple[int, ...] = (),
        event_shape: torch.Size | tuple[int, ...] = (),
        validate_args: bool | None = None,
    ) -> None:
        super().__init__(torch.Size(batch_shape), torch.Size(event_shape), validate_args=validate_args)

    def expand(self, batch_shape: torch.Size | tuple[int, ...], _instance: "LogUniform | None" = None) -> "LogUniform":
        """Return a :class:`LogUniform` with the new batch shape (so the registered KLs stay in use)."""
        new = self._get_checked_instance(LogUniform, _instance)
        super(LogUniform, new).__init__(torch.Size(batch_shape), self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """Unnormalised log density ``-log|value|``, summed over the event dimensions."""
        if self._validate_args:
            self._validate_sample(value)
        lp = -value.abs().log()
        if self.event_shape:
            lp = lp.sum(tuple(range(-len(self.event_shape), 0)))
        return lp.expand(broadcast_shape(lp.shape, self.batch_shape))

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> torch.Tensor:
        """Placeholder ones of shape ``sample_shape + batch_shape + event_shape`` (the prior is improper)."""
        return torch.ones(self._extended_shape(torch.Size(sample_shape)))

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> torch.Tensor:
        """Same placeholder as :meth:`sample`."""
        return self.sample(sample_shape)

    @property
    def mean(self) -> torch.Tensor:
        """Undefined for an improper prior: NaN."""
        return torch.full(self._extended_shape(), math.nan)

    @property
    def variance(self) -> torch.Tensor:
        """Undefined for an improper prior: NaN."""
        return torch.full(self._extended_shape(), math.nan)


class NormalLogVar(dist.Normal):
    """``Normal`` parameterised by its log-variance, as the guides store it.

    The same distribution as ``Normal(loc, exp(logvar / 2))``; keeping ``logvar`` lets the registered KLs
    skip the ``log`` and the divisions that the generic Normal rules spend on every weight.
    """

    #: ``sum KL(self || N(0, 1))`` where an op has already computed it with its gradient folded into its own
    #: backward (the fused local reparameterisation); :func:`summed_kl` then returns it instead of recomputing.
    standard_normal_kl: torch.Tensor | None = None

    def __init__(self, loc: torch.Tensor, logvar: torch.Tensor, validate_args: bool | None = None):
        self.loc, self.logvar = broadcast_all(loc, logvar)
        # Normal.__init__ would compute the scale at once; here it waits until something asks for it
        torch.distributions.Distribution.__init__(self, self.loc.shape, validate_args=validate_args)

    @lazy_property
    def scale(self) -> torch.Tensor:
        return (0.5 * self.logvar).exp()

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(NormalLogVar, _instance)
        new.logvar = self.logvar.expand(torch.Size(batch_shape))
        return super().expand(batch_shape, _instance=new)

    @lazy_property
    def variance(self) -> torch.Tensor:  # shared by the KL and the local reparameterisation
        return self.logvar.exp()


class LogNormalLogVar(dist.LogNormal):
    """``LogNormal`` whose log is :class:`NormalLogVar`: parameterised by the log's mean and log-variance.

    The same distribution as ``LogNormal(loc, exp(logvar / 2))``, built without the generic
    ``TransformedDistribution`` shape checks (the transform is always one elementwise ``exp``) and without
    the scale until something asks for it: the horseshoe guides build twelve of these per step.
    """

    _exp = ExpTransform()

    def __init__(self, loc: torch.Tensor, logvar: torch.Tensor, validate_args: bool | None = None):
        self.base_dist = NormalLogVar(loc, logvar, validate_args=validate_args)
        self.transforms = [self._exp]
        torch.distributions.Distribution.__init__(self, self.base_dist.batch_shape, validate_args=validate_args)

    @property
    def logvar(self) -> torch.Tensor:
        return self.base_dist.logvar

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(LogNormalLogVar, _instance)
        return super().expand(batch_shape, _instance=new)


def log_moments(p: _TorchLogNormal) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, variance)`` of ``log x`` for ``x ~ p``, from the log-variance where ``p`` keeps one."""
    return p.loc, (p.base_dist.variance if isinstance(p, LogNormalLogVar) else p.scale.pow(2))


def _log_scale(p: _TorchLogNormal) -> torch.Tensor:
    return 0.5 * p.logvar if isinstance(p, LogNormalLogVar) else p.scale.log()


class StandardNormal(dist.Normal):
    """``Normal(0, 1)``, standard by its type: :func:`summed_kl` then does no arithmetic with its loc and scale.

    :param like: A tensor whose device and dtype the distribution takes.
    """

    def __init__(self, like: torch.Tensor, validate_args: bool | None = None):
        super().__init__(like.new_zeros(()), like.new_ones(()), validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(StandardNormal, _instance)
        return super().expand(batch_shape, _instance=new)


def _scalar_if_constant(t: torch.Tensor) -> torch.Tensor:
    """A 0-d view of ``t`` when ``t`` is one value expanded (all strides 0), else ``t``."""
    return t.as_strided((), ()) if all(stride == 0 for stride in t.stride()) else t


def _expand_to(kl: torch.Tensor, q: torch.distributions.Distribution) -> torch.Tensor:
    return kl.expand(broadcast_shape(kl.shape, q.batch_shape))


@register_kl(NormalLogVar, _TorchNormal)
def kl_normal_logvar_normal(p: NormalLogVar, q: _TorchNormal) -> torch.Tensor:
    """``KL(N(mu, exp(v)) || N(m, s^2)) = log s - v/2 + (exp(v) + (mu - m)^2) / (2 s^2) - 1/2``.

    A prior of one expanded value (such as ``Normal(0, 1).expand(shape)``) is used as a scalar, so the
    cost is a few passes over the guide's parameters only.
    """
    m, s = _scalar_if_constant(q.loc), _scalar_if_constant(q.scale)
    d = p.loc - m
    kl = torch.add(torch.addcmul(p.variance, d, d) / (2 * s * s), p.logvar, alpha=-0.5) + (torch.log(s) - 0.5)
    return _expand_to(kl, q)


def summed_kl(p: torch.distributions.Distribution, q: torch.distributions.Distribution) -> torch.Tensor | None:
    """``sum KL(p || q)`` over every element, in closed form, or ``None`` where no such form applies.

    For ``p`` a :class:`NormalLogVar` (possibly ``.to_event()``) and ``q`` a ``Normal`` of one loc and
    scale expanded to ``p``'s shape (the ``N(0, 1)`` weight and bias priors), the sum needs no
    elementwise KL: ``n (log s - 1/2) - sum(v) / 2 + (sum(exp v) + sum((mu - m)^2)) / (2 s^2)``, three
    reductions over the guide's parameters. Against ``N(0, 1)`` (a :class:`StandardNormal`) the sum that
    ``p`` carries (:attr:`NormalLogVar.standard_normal_kl`, set by the fused local reparameterisation) is
    returned as it is, so that it is counted once and its gradient flows through the fused op's backward.
    """
    while isinstance(p, torch.distributions.Independent) and isinstance(q, torch.distributions.Independent):
        if p.reinterpreted_batch_ndims != q.reinterpreted_batch_ndims:
            return None
        p, q = p.base_dist, q.base_dist
    if not isinstance(p, NormalLogVar) or not isinstance(q, _TorchNormal) or p.batch_shape != q.batch_shape:
        return None
    if isinstance(q, StandardNormal):  # m = 0, s = 1: no scalar arithmetic (and autograd nodes) for them
        if p.standard_normal_kl is not None:
            return p.standard_normal_kl
        return standard_normal_kl(p.loc, p.logvar, p.variance)
    m, s = _scalar_if_constant(q.loc), _scalar_if_constant(q.scale)
    if m.dim() or s.dim():
        return None
    mu, n = p.loc.reshape(-1), p.loc.numel()
    squares = torch.dot(mu, mu) - 2 * m * mu.sum() + n * m * m  # sum (mu - m)^2
    return n * (torch.log(s) - 0.5) - 0.5 * p.logvar.sum() + (p.variance.sum() + squares) / (2 * s * s)


def log_alpha(logvar: torch.Tensor, mean: torch.Tensor, eps: float = LOG_ALPHA_EPS) -> torch.Tensor:
    """Dropout-rate parameter ``log alpha = log Var - log(E^2 + eps)`` from the log-variance and the mean;
    ``eps`` keeps a zero mean finite."""
    return logvar - torch.log(mean.pow(2) + eps)


@register_kl(_TorchNormal, LogUniform)
def kl_normal_log_uniform(p: _TorchNormal, q: LogUniform) -> torch.Tensor:
    """Approximate ``KL(N(mu, sigma^2) || LogUniform)`` elementwise (Molchanov et al., 2017, eq. 14).

    ``KL ~= K1 - K1 * sigmoid(K2 + K3 * log_alpha) + 0.5 * softplus(-log_alpha)``, with the constant chosen
    so that ``KL -> 0`` as ``alpha -> infinity`` (the true KL to an improper prior is defined up to a constant).
    """
    if q.event_shape:
        raise ValueError("KL(Normal || LogUniform) needs a LogUniform with an empty event shape; use .to_event()")
    la = log_alpha(p.logvar if isinstance(p, NormalLogVar) else 2.0 * torch.log(p.scale), p.loc)
    kl = K1 - K1 * torch.sigmoid(K2 + K3 * la) + 0.5 * F.softplus(-la)
    return _expand_to(kl, q)


def _gamma_constant(q: _TorchGamma | _TorchInverseGamma) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(a, b, -0.5 log(2 pi e) - a log b + lgamma(a))`` of a (inverse) gamma, as scalars when ``q`` is one
    value expanded (the priors are), so that the constant costs no pass over the groups. Kept on ``q`` when
    its parameters are constants: the layers reuse their prior objects every step."""
    cached = q.__dict__.get("_bc_kl_constant")
    if cached is not None:
        return cached
    a, b = _scalar_if_constant(q.concentration), _scalar_if_constant(q.rate)
    out = a, b, torch.lgamma(a) - a * b.log() - 0.5 * _LOG_2PI_E
    if not (a.requires_grad or b.requires_grad):
        q.__dict__["_bc_kl_constant"] = out
    return out


@register_kl(_TorchLogNormal, _TorchGamma)
def kl_lognormal_gamma(p: _TorchLogNormal, q: _TorchGamma) -> torch.Tensor:
    """Exact ``KL(LogNormal(mu, s^2) || Gamma(a, rate=b))``, elementwise.

    ``-0.5 log(2 pi e s^2) - a log b + lgamma(a) - a mu + b exp(mu + s^2 / 2)``.
    """
    (mu, var), (a, b, const) = log_moments(p), _gamma_constant(q)
    return _expand_to(const - _log_scale(p) - a * mu + b * torch.exp(mu + 0.5 * var), q)


@register_kl(_TorchLogNormal, _TorchInverseGamma)
def kl_lognormal_inverse_gamma(p: _TorchLogNormal, q: _TorchInverseGamma) -> torch.Tensor:
    """Exact ``KL(LogNormal(mu, s^2) || InverseGamma(a, b))``, elementwise.

    ``q`` has density ``b^a / Gamma(a) x^(-a-1) exp(-b / x)`` (``b`` is torch's ``rate``). The KL is
    ``-0.5 log(2 pi e s^2) - a log b + lgamma(a) + a mu + b exp(s^2 / 2 - mu)``.
    """
    (mu, var), (a, b, const) = log_moments(p), _gamma_constant(q)
    return _expand_to(const - _log_scale(p) + a * mu + b * torch.exp(0.5 * var - mu), q)


def half_cauchy_gamma(tau0: float, like: torch.Tensor, batch_shape: torch.Size | tuple[int, ...] = ()) -> dist.Gamma:
    """Gamma factor ``s_a ~ Gamma(1/2, rate=1/tau0^2)`` of a half-Cauchy scale ``s ~ C+(0, tau0)``, on ``like``'s
    dtype and device.

    With ``s_b ~ InverseGamma(1/2, 1)`` (:func:`half_cauchy_inverse_gamma`), ``s = sqrt(s_a * s_b)`` is
    ``C+(0, tau0)``. The rate is ``tau0^-2`` (scale ``tau0^2``); transcriptions that use ``tau0`` or
    ``tau0^-1`` as the rate give a different global scale and are wrong for this model.
    """
    one = like.new_ones(())
    return dist.Gamma(one / 2, one / tau0**2).expand(torch.Size(batch_shape))


def half_cauchy_inverse_gamma(like: torch.Tensor, batch_shape: torch.Size | tuple[int, ...] = ()) -> dist.InverseGamma:
    """Inverse-gamma factor ``s_b ~ InverseGamma(1/2, 1)`` of a half-Cauchy scale (see :func:`half_cauchy_gamma`)."""
    one = like.new_ones(())
    return dist.InverseGamma(one / 2, one).expand(torch.Size(batch_shape))
