"""Bayesian layers with hierarchical sparsity priors, each owning its model sites and its guide.

Weights are non-centred, ``w = z * w~`` with ``w~ ~ N(0, 1)`` a priori, and ``z`` a scale shared by
a group: an input neuron of a fully connected layer, an output channel of a convolution.

========  ==========================================================================================
prior     model sites of a layer ``L`` (guide: same names, same order)
========  ==========================================================================================
``gnj``   ``L.z ~ LogUniform``; guide ``Normal(z_mu, z_sd)``  (group normal-Jeffreys)
``ghs``   ``L.s_a ~ Gamma(1/2, rate tau0^-2)``, ``L.s_b ~ InvGamma(1/2, 1)``, ``L.z_a ~ Gamma(1/2, 1)``,
          ``L.z_b ~ InvGamma(1/2, 1)``, ``z = sqrt(s_a s_b z_a z_b)``; guides log-normal (group horseshoe)
``lu``    no ``z``; ``L.w ~ LogUniform`` per weight (Sparse VD); guide ``Normal``
========  ==========================================================================================

Every layer also has ``L.w`` (``Normal(0, 1)`` for ``gnj``/``ghs``) and ``L.b ~ Normal(0, 1)``.
"""

from __future__ import annotations

import math

import pyro
import torch
from pyro.distributions import Gamma, InverseGamma
from torch import nn

from pyro_bc import reparam
from pyro_bc.distributions import LogNormalLogVar, LogUniform, NormalLogVar, StandardNormal
from pyro_bc.errors import ConfigError

PRIORS = ("gnj", "ghs", "lu")
LRT_ONLY = {"lrt_only": True}  # values that feed only LRT-replaced ops: under the LRT they need no draw


def _normal_init(shape, mean: float, sd: float = 0.01) -> nn.Parameter:
    return nn.Parameter(torch.randn(shape) * sd + mean)


class BayesLayer(nn.Module):
    """Shared machinery of :class:`BayesLinear` and :class:`BayesConv2d`.

    :param prior: ``"gnj"``, ``"ghs"`` or ``"lu"``.
    :param tau0: global scale of the horseshoe (``ghs`` only).
    :param clip_var: if set, weight and bias variances are projected to at most this value after
        every optimiser step (:meth:`clip_variances`), as the official code does on LeNet's fc1.
    """

    group_axis: int  # the weight axis that indexes groups

    def __init__(self, weight_shape: tuple[int, ...], prior: str, tau0: float, clip_var: float | None):
        super().__init__()
        if prior not in PRIORS:
            raise ConfigError(f"unknown prior {prior!r}: choose one of {', '.join(PRIORS)}")
        self.prior, self.tau0, self.clip_var = prior, float(tau0), clip_var
        self.site = type(self).__name__  # replaced by the network with the module path
        self._priors: dict[tuple[torch.device, torch.dtype], dict] = {}  # see priors()
        n_out, n_groups = weight_shape[0], weight_shape[self.group_axis]
        self.weight_mu = nn.Parameter(torch.empty(weight_shape))
        self.weight_logvar = _normal_init(weight_shape, -9.0)
        self.bias_mu = nn.Parameter(torch.zeros(n_out))
        self.bias_logvar = _normal_init((n_out,), -9.0)
        if prior == "gnj":
            self.z_mu = _normal_init((n_groups,), 1.0)
            self.z_logvar = _normal_init((n_groups,), -9.0)
        elif prior == "ghs":  # METHOD.md section 11: E[z] ~ 1 and tau0^-2 E[s_a] ~ 1 at the start
            log_tau0 = math.log(tau0)
            self.sa_mu, self.sa_logvar = _normal_init((), 2 * log_tau0), _normal_init((), -9.0)
            self.sb_mu, self.sb_logvar = _normal_init((), -2 * log_tau0), _normal_init((), -9.0)
            self.za_mu, self.za_logvar = _normal_init((n_groups,), 0.0), _normal_init((n_groups,), -9.0)
            self.zb_mu, self.zb_logvar = _normal_init((n_groups,), 0.0), _normal_init((n_groups,), -9.0)

    @property
    def n_groups(self) -> int:
        return self.weight_mu.shape[self.group_axis]

    # -- model and guide -------------------------------------------------------------------------

    def priors(self) -> dict[str, torch.distributions.Distribution]:
        """The layer's prior distributions, by site suffix (``w``, ``b``, ``z`` or ``s_a`` ...).

        They are constants, so they are built once per device and dtype and reused by every step,
        which saves the model a dozen distribution objects per layer and step.
        """
        key = (self.weight_mu.device, self.weight_mu.dtype)
        if key not in self._priors:
            like = self.weight_mu.detach()
            w = LogUniform() if self.prior == "lu" else StandardNormal(like)
            priors = {"w": w.expand(self.weight_mu.shape).to_event(self.weight_mu.dim()),
                      "b": StandardNormal(like).expand(self.bias_mu.shape).to_event(1)}
            if self.prior == "gnj":
                priors["z"] = LogUniform().expand([self.n_groups]).to_event(1)
            elif self.prior == "ghs":
                one = like.new_ones(())
                half = one / 2
                priors.update(s_a=Gamma(half, one / self.tau0**2), s_b=InverseGamma(half, one),
                              z_a=Gamma(half, one).expand([self.n_groups]).to_event(1),
                              z_b=InverseGamma(half, one).expand([self.n_groups]).to_event(1))
            self._priors[key] = priors
        return self._priors[key]

    def _scales_model(self, priors: dict[str, torch.distributions.Distribution]) -> torch.Tensor | None:
        if self.prior == "gnj":
            return pyro.sample(f"{self.site}.z", priors["z"])
        if self.prior == "ghs":
            s_a, s_b, z_a, z_b = (pyro.sample(f"{self.site}.{name}", priors[name]) for name in ("s_a", "s_b", "z_a", "z_b"))
            return reparam.horseshoe_scale(s_a, s_b, z_a, z_b)
        return None

    def _scales_guide(self) -> None:
        if self.prior == "gnj":
            pyro.sample(f"{self.site}.z", NormalLogVar(self.z_mu, self.z_logvar).to_event(1))
        elif self.prior == "ghs":
            # the four factors feed only horseshoe_scale, which the LRT replaces by a per-example draw
            pyro.sample(f"{self.site}.s_a", LogNormalLogVar(self.sa_mu, self.sa_logvar), infer=LRT_ONLY)
            pyro.sample(f"{self.site}.s_b", LogNormalLogVar(self.sb_mu, self.sb_logvar), infer=LRT_ONLY)
            pyro.sample(f"{self.site}.z_a", LogNormalLogVar(self.za_mu, self.za_logvar).to_event(1), infer=LRT_ONLY)
            pyro.sample(f"{self.site}.z_b", LogNormalLogVar(self.zb_mu, self.zb_logvar).to_event(1), infer=LRT_ONLY)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model: sample the prior sites, then apply the layer through an effectful op."""
        priors = self.priors()
        z = self._scales_model(priors)
        w = pyro.sample(f"{self.site}.w", priors["w"])
        b = pyro.sample(f"{self.site}.b", priors["b"])
        return self._op(x, z, w, b)

    def guide(self) -> None:
        """The guide: the same sites as :meth:`forward`, in the same order."""
        self._scales_guide()
        w_q = NormalLogVar(self.weight_mu, self.weight_logvar)
        pyro.sample(f"{self.site}.w", w_q.to_event(self.weight_mu.dim()), infer=LRT_ONLY)
        b_q = NormalLogVar(self.bias_mu, self.bias_logvar)
        pyro.sample(f"{self.site}.b", b_q.to_event(1), infer=LRT_ONLY)

    # -- posterior summaries ---------------------------------------------------------------------

    def _ghs_log_z(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of log z under the guide (log-normal, METHOD.md 4.3)."""
        m = 0.5 * (self.sa_mu + self.sb_mu + self.za_mu + self.zb_mu)
        v = 0.25 * (self.sa_logvar.exp() + self.sb_logvar.exp() + self.za_logvar.exp() + self.zb_logvar.exp())
        return m, v

    def z_moments(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(E[z], Var[z])`` per group under the guide; ``None`` for ``lu`` (no group scale)."""
        if self.prior == "gnj":
            return self.z_mu, self.z_logvar.exp()
        if self.prior == "ghs":
            m, v = self._ghs_log_z()
            return torch.exp(m + v / 2), torch.expm1(v) * torch.exp(2 * m + v)
        return None

    def log_alpha(self) -> torch.Tensor:
        """Log dropout rate ``log Var/E^2``: per group (``gnj``, ``ghs``), per weight (``lu``)."""
        if self.prior == "gnj":
            return self.z_logvar - torch.log(self.z_mu**2 + 1e-8)
        if self.prior == "ghs":
            return torch.log(torch.expm1(self._ghs_log_z()[1]))
        return self.weight_logvar - torch.log(self.weight_mu**2 + 1e-8)

    def _along_groups(self, t: torch.Tensor) -> torch.Tensor:
        shape = [1] * self.weight_mu.dim()
        shape[self.group_axis] = -1
        return t.reshape(shape)

    def weight_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Marginal ``E[w]`` and ``Var[w]`` of every weight ``w = z w~`` (METHOD.md 7.1)."""
        mu, var = self.weight_mu, self.weight_logvar.exp()
        moments = self.z_moments()
        if moments is None:
            return mu, var
        ez, vz = (self._along_groups(t) for t in moments)
        return ez * mu, ez**2 * var + vz * mu**2 + vz * var

    def bias_mean(self) -> torch.Tensor:
        """Posterior-mean bias as the network computes it: conv biases are scaled by E[z]."""
        moments = self.z_moments()
        if self.group_axis == 0 and moments is not None:
            return moments[0] * self.bias_mu
        return self.bias_mu

    @torch.no_grad()
    def clip_variances(self) -> None:
        """Project weight and bias log-variances to at most ``log clip_var`` (no-op if unset)."""
        if self.clip_var is not None:
            limit = math.log(self.clip_var)
            self.weight_logvar.clamp_(max=limit)
            self.bias_logvar.clamp_(max=limit)

    @torch.no_grad()
    def init_from(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Start the weight (and bias) means from a deterministic network's values."""
        if weight.shape != self.weight_mu.shape:
            raise ConfigError(f"{self.site}: weight of shape {tuple(weight.shape)} does not fit "
                              f"{tuple(self.weight_mu.shape)}")
        self.weight_mu.copy_(weight)
        if bias is not None:
            self.bias_mu.copy_(bias)


class BayesLinear(BayesLayer):
    """Fully connected Bayesian layer; one group per input neuron (the columns of ``W``)."""

    group_axis = 1

    def __init__(self, in_features: int, out_features: int, prior: str = "gnj", tau0: float = 1e-5,
                 clip_var: float | None = None):
        super().__init__((out_features, in_features), prior, tau0, clip_var)
        self.in_features, self.out_features = in_features, out_features
        with torch.no_grad():
            self.weight_mu.normal_(0.0, 1.0 / math.sqrt(in_features))

    def _op(self, x, z, w, b):
        return reparam.linear(x, z, w, b)

    def posterior_mean_module(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding ``E[w]`` and the posterior-mean bias."""
        out = nn.utils.skip_init(nn.Linear, self.in_features, self.out_features,  # no draw from the RNG
                                 device=self.weight_mu.device)
        with torch.no_grad():
            out.weight.copy_(self.weight_moments()[0])
            out.bias.copy_(self.bias_mean())
        return out


class BayesConv2d(BayesLayer):
    """2-D convolution; one group per output channel (a whole filter and its bias)."""

    group_axis = 0

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], stride=1,
                 padding=0, dilation=1, groups: int = 1, prior: str = "gnj", tau0: float = 1e-5,
                 clip_var: float | None = None):
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        super().__init__((out_channels, in_channels // groups, kh, kw), prior, tau0, clip_var)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.conv_args = (stride, padding, dilation, groups)
        bound = 1.0 / math.sqrt(in_channels // groups * kh * kw)
        with torch.no_grad():
            self.weight_mu.uniform_(-bound, bound)

    def _op(self, x, z, w, b):
        return reparam.conv2d(x, z, w, b, *self.conv_args)

    def posterior_mean_module(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` holding ``E[w]`` and the posterior-mean bias."""
        stride, padding, dilation, groups = self.conv_args
        out = nn.utils.skip_init(nn.Conv2d, self.in_channels, self.out_channels, tuple(self.weight_mu.shape[2:]),
                                 stride, padding, dilation, groups, device=self.weight_mu.device)  # no RNG draw
        with torch.no_grad():
            out.weight.copy_(self.weight_moments()[0])
            out.bias.copy_(self.bias_mean())
        return out
