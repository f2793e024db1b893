"""Bayesian layers: weights ``w = z w~`` with a sparsity prior on the group scales ``z``.

``w~ ~ N(0, 1)`` a priori (per-weight priors may choose otherwise) and ``z`` a scale shared by a group:
an input neuron of a fully connected layer, an output channel of a convolution. A layer owns ``w~`` and
the bias and delegates the scales to its :class:`~pyro_bc.priors.Prior`. Model sites of a layer ``L``:
the prior's (``L.z`` for ``gnj``; ``L.s_a``, ``L.s_b``, ``L.z_a``, ``L.z_b`` for ``ghs``), then ``L.w`` and
``L.b ~ N(0, 1)``; the guide samples the same sites, in the same order.
"""

from __future__ import annotations

import math

import pyro
import torch
from torch import nn

from pyro_bc.errors import ConfigError
from pyro_bc.infer import reparam
from pyro_bc.infer.distributions import NormalLogVar, StandardNormal
from pyro_bc.infer.reparam import LRT_ONLY
from pyro_bc.nn.kinds import KIND, LayerKind, explicit_padding
from pyro_bc.priors import GroupNormalJeffreys, Prior
from pyro_bc.priors.base import logvar_init


class BayesLayer(nn.Module):
    """What every Bayesian layer kind shares; a kind sets :attr:`op` (its entry of :data:`reparam.OPS`).

    :param prior: the sparsity prior (a template: the layer attaches its own copy); default
        :class:`~pyro_bc.priors.GroupNormalJeffreys`.
    :param clip_var: if set, weight and bias variances are projected to at most this value after
        every optimiser step (:meth:`clip_variances`), as the official code does on LeNet's fc1.
    :param bias: whether the layer has a bias (``L.b``); without one ``bias_mu`` and ``bias_logvar`` are ``None``.
    """

    kind: LayerKind  # what the rest of pyro-bc knows of the layer (pyro_bc.nn.kinds)
    op: reparam.LayerOp

    def __init__(self, weight_shape: tuple[int, ...], prior: Prior | None, clip_var: float | None,
                 bias: bool = True):
        super().__init__()
        prior = GroupNormalJeffreys() if prior is None else prior
        if not isinstance(prior, Prior):
            raise ConfigError(f"prior must be a pyro_bc.priors.Prior (e.g. make_prior({prior!r})), "
                              f"not {type(prior).__name__}")
        self.clip_var = clip_var
        self.site = type(self).__name__  # replaced by the network with the module path
        # a 2-D convolution's output is channels-last (faster on the CPU) unless the network's forward cannot take
        # it (a .view after it): then the network sets this (BayesianNet.choose_layout)
        self.contiguous_output = False
        self._priors: dict[tuple[torch.device, torch.dtype], dict] = {}  # see priors()
        self.weight_mu = nn.Parameter(torch.empty(weight_shape))
        self.weight_logvar = logvar_init(weight_shape)
        self.bias_mu = nn.Parameter(torch.zeros(weight_shape[0])) if bias else None
        self.bias_logvar = logvar_init((weight_shape[0],)) if bias else None
        self.prior = prior.attach(weight_shape[self.group_axis])

    @property
    def group_axis(self) -> int:
        """The weight axis that indexes groups: inputs (1) where the scales multiply the inputs, else outputs (0)."""
        return 1 if self.op.scales_input else 0

    @property
    def n_groups(self) -> int:
        return self.weight_mu.shape[self.group_axis]

    @property
    def weight(self) -> torch.Tensor:
        """The means of ``w~`` (``weight_mu``), for a forward that reads its layer's device, dtype or shape
        (``self.proj.weight.device``, as timm's EdgeNeXt does); what the layer computes is a draw, its posterior mean
        :meth:`posterior_mean_module`."""
        return self.weight_mu

    @property
    def bias(self) -> torch.Tensor | None:
        """The bias means (``bias_mu``; None without a bias), as :attr:`weight`."""
        return self.bias_mu

    def op_args(self) -> tuple:
        """The op's arguments after ``(x, weight, bias)`` (stride, padding, ... for convolutions)."""
        return ()

    # -- model and guide -------------------------------------------------------------------------

    def priors(self) -> dict[str, torch.distributions.Distribution]:
        """The layer's prior distributions by site suffix: the prior's scale sites, ``w`` and ``b``.

        They are constants, so they are built once per device and dtype and reused by every step.
        """
        like = self.weight_mu.detach()
        key = (like.device, like.dtype)
        if key not in self._priors:
            priors = {**self.prior.priors(like),
                      "w": self.prior.weight_prior(like).expand(like.shape).to_event(like.dim())}
            if self.bias_mu is not None:
                priors["b"] = StandardNormal(like).expand(self.bias_mu.shape).to_event(1)
            self._priors[key] = priors
        return self._priors[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model: sample the prior sites, then apply the layer through an effectful op."""
        priors = self.priors()
        z = self.prior.model(self.site, priors)
        w = pyro.sample(f"{self.site}.w", priors["w"])
        b = pyro.sample(f"{self.site}.b", priors["b"]) if self.bias_mu is not None else None
        y = reparam.bayes_layer(self.op, x, z, w, b, *self.op_args())
        return y.contiguous() if self.contiguous_output else y

    def guide(self) -> None:
        """The guide: the same sites as :meth:`forward`, in the same order."""
        self.prior.guide(self.site)
        w_q = NormalLogVar(self.weight_mu, self.weight_logvar)
        pyro.sample(f"{self.site}.w", w_q.to_event(self.weight_mu.dim()), infer=LRT_ONLY)
        if self.bias_mu is not None:
            b_q = NormalLogVar(self.bias_mu, self.bias_logvar)
            pyro.sample(f"{self.site}.b", b_q.to_event(1), infer=LRT_ONLY)

    # -- posterior summaries ---------------------------------------------------------------------

    def log_alpha(self) -> torch.Tensor:
        """Log dropout rate ``log Var/E^2``: per group, or per weight for per-weight priors."""
        return self.prior.log_alpha(self.weight_mu, self.weight_logvar)

    def _along_groups(self, t: torch.Tensor) -> torch.Tensor:
        shape = [1] * self.weight_mu.dim()
        shape[self.group_axis] = -1
        return t.reshape(shape)

    def weight_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Marginal ``E[w]`` and ``Var[w]`` of every weight ``w = z w~`` (docs/METHOD.md 7.1)."""
        mu, var = self.weight_mu, self.weight_logvar.exp()
        moments = self.prior.scale_moments()
        if moments is None:
            return mu, var
        ez, vz = (self._along_groups(t) for t in moments)
        return ez * mu, ez**2 * var + vz * mu**2 + vz * var

    def bias_mean(self) -> torch.Tensor:
        """Posterior-mean bias as the network computes it: scaled by ``E[z]`` where ``z`` scales the outputs
        (zeros without a bias: compression may fold the average of pruned inputs into it)."""
        if self.bias_mu is None:
            return self.weight_mu.new_zeros(self.weight_mu.shape[0])
        moments = self.prior.scale_moments()
        if not self.op.scales_input and moments is not None:
            return moments[0] * self.bias_mu
        return self.bias_mu

    def posterior_mean_module(self) -> nn.Module:
        """The plain torch layer holding ``E[w]`` and the posterior-mean bias."""
        raise NotImplementedError

    def variance_parameters(self) -> list[nn.Parameter]:
        """The log-variances and the prior's group-scale parameters: what sets the pace of pruning (they may be
        given a larger learning rate than the means, see :func:`pyro_bc.train.loop.make_optimizer`)."""
        own = [self.weight_logvar] + ([self.bias_logvar] if self.bias_logvar is not None else [])
        return own + list(self.prior.parameters())

    @torch.no_grad()
    def clip_variances(self) -> None:
        """Project weight and bias log-variances to at most ``log clip_var`` (no-op if unset)."""
        if self.clip_var is not None:
            limit = math.log(self.clip_var)
            self.weight_logvar.clamp_(max=limit)
            if self.bias_logvar is not None:
                self.bias_logvar.clamp_(max=limit)

    @torch.no_grad()
    def init_from(self, weight: torch.Tensor, bias: torch.Tensor | None = None, name: str = "weight") -> None:
        """Start from a deterministic layer's values: means ``mu = w / E[z]`` per group (and the bias where ``z``
        scales outputs), so that the posterior-mean layer computes what the dense one does (``name``: the
        weight's, for errors)."""
        if weight.shape != self.weight_mu.shape:
            raise ConfigError(f"{name} of shape {tuple(weight.shape)} does not fit {self.site}.weight_mu of shape "
                              f"{tuple(self.weight_mu.shape)}")
        if bias is not None and self.bias_mu is not None and bias.shape != self.bias_mu.shape:
            raise ConfigError(f"{name[:-len('weight')]}bias of shape {tuple(bias.shape)} does not fit "
                              f"{self.site}.bias_mu of shape {tuple(self.bias_mu.shape)}")
        moments = self.prior.scale_moments()
        scale = torch.ones(self.n_groups) if moments is None else moments[0].detach()
        self.weight_mu.copy_(weight / self._along_groups(scale))
        if bias is not None and self.bias_mu is not None:
            self.bias_mu.copy_(bias if self.op.scales_input else bias / scale)

    def _plain(self, *conv_args) -> nn.Module:
        """An uninitialised plain layer of this kind and shape, on the parameters' device."""
        return self.kind.module(tuple(self.weight_mu.shape), self.bias_mu is not None, *conv_args,
                                device=self.weight_mu.device, channels_last=not self.contiguous_output)

    def _filled(self, module: nn.Module) -> nn.Module:
        with torch.no_grad():
            module.weight.copy_(self.weight_moments()[0])
            if module.bias is not None:
                module.bias.copy_(self.bias_mean())
        return module


class BayesLinear(BayesLayer):
    """Fully connected Bayesian layer on inputs of any leading shape (features last); one group per input feature
    (the columns of ``W``)."""

    kind = KIND["linear"]
    op = reparam.OPS["linear"]

    def __init__(self, in_features: int, out_features: int, prior: Prior | None = None,
                 clip_var: float | None = None, bias: bool = True):
        super().__init__((out_features, in_features), prior, clip_var, bias)
        self.in_features, self.out_features = in_features, out_features
        with torch.no_grad():
            self.weight_mu.normal_(0.0, 1.0 / math.sqrt(in_features))

    @classmethod
    def like(cls, dense: nn.Linear, prior: Prior) -> BayesLinear:
        """The Bayesian twin of ``dense``: the same shape and bias or not."""
        return cls(dense.in_features, dense.out_features, prior, bias=dense.bias is not None)

    def posterior_mean_module(self) -> nn.Module:
        return self._filled(self._plain())


class _BayesConv(BayesLayer):
    """A convolution over ``kind.spatial_dims`` dimensions; one group per output channel (a whole filter and its
    bias)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, prior: Prior | None = None, clip_var: float | None = None, bias: bool = True):
        kernel = (kernel_size,) * self.kind.spatial_dims if isinstance(kernel_size, int) else tuple(kernel_size)
        super().__init__((out_channels, in_channels // groups, *kernel), prior, clip_var, bias)
        self.in_channels, self.out_channels = in_channels, out_channels
        # numbers where they can be: the fused op and the compressed file take numeric padding only
        self.conv_args = (stride, explicit_padding(padding, kernel, stride, dilation), dilation, groups)
        bound = 1.0 / math.sqrt(in_channels // groups * math.prod(kernel))
        with torch.no_grad():
            self.weight_mu.uniform_(-bound, bound)

    @classmethod
    def like(cls, dense: nn.Module, prior: Prior) -> _BayesConv:
        """The Bayesian twin of ``dense``: every argument kept (stride, padding, dilation, groups, bias or not)."""
        if dense.padding_mode != "zeros":
            raise ConfigError(f"padding_mode {dense.padding_mode!r} is not supported (only 'zeros')")
        return cls(dense.in_channels, dense.out_channels, dense.kernel_size, dense.stride, dense.padding,
                   dense.dilation, dense.groups, prior=prior, bias=dense.bias is not None)

    def op_args(self) -> tuple:
        return self.conv_args

    def posterior_mean_module(self) -> nn.Module:
        """The plain convolution holding ``E[w]`` (2-D: channels-last output, evaluation runs about twice as fast)."""
        return self._filled(self._plain(*self.conv_args))


class BayesConv1d(_BayesConv):
    """1-D convolution (sequences, ``(N, C, L)``)."""

    kind = KIND["conv1d"]
    op = reparam.OPS["conv1d"]


class BayesConv2d(_BayesConv):
    """2-D convolution (images, ``(N, C, H, W)``)."""

    kind = KIND["conv2d"]
    op = reparam.OPS["conv2d"]


#: The Bayesian layer of each kind (:data:`pyro_bc.nn.kinds.LAYER_KINDS`), by the kind's name.
BAYES_LAYERS: dict[str, type[BayesLayer]] = {cls.kind.name: cls for cls in (BayesLinear, BayesConv1d, BayesConv2d)}
