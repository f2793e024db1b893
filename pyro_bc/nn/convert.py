"""A plain PyTorch network made Bayesian in one call: :func:`bayesianize`."""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from pyro_bc.errors import ConfigError
from pyro_bc.nn.kinds import LAYER_KINDS, dense_layers, kind_of, padding_stored
from pyro_bc.nn.layers import BAYES_LAYERS, BayesLayer
from pyro_bc.nn.network import BayesianNet, called_layers, checked_input_dtype, example_input
from pyro_bc.priors import Prior, make_prior


@torch.no_grad()
def _start_from(layer: BayesLayer, dense: nn.Module, name: str, delta: float | None) -> None:
    """Means such that the posterior-mean layer is ``dense`` (:meth:`BayesLayer.init_from`); with ``delta``,
    log-variances ``log(delta mu^2)`` (MOPED)."""
    layer.init_from(dense.weight, dense.bias, f"{name}.weight")
    if delta is not None:
        layer.weight_logvar.copy_(torch.log(delta * layer.weight_mu**2 + torch.finfo(dense.weight.dtype).tiny))


def _warn_tied(body: nn.Module, targets: list[tuple[str, nn.Module]]) -> None:
    """Warn where a layer made Bayesian shares its weight with another parameter (a language model's output layer
    tied to its embedding): the Bayesian layer gets a posterior of its own, so the two are no longer tied."""
    names: dict[int, list[str]] = {}
    for name, param in body.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    tied = [f"{name}.weight (tied to {', '.join(n for n in names[id(m.weight)] if n != f'{name}.weight')})"
            for name, m in targets if len(names.get(id(m.weight), ())) > 1]
    if tied:
        warnings.warn(f"{len(tied)} tied layer weight(s) are untied, each Bayesian layer having a posterior of its own: "
                      f"{', '.join(tied[:4])}{', ...' if len(tied) > 4 else ''}", stacklevel=3)


def _shape_lazy_layers(body: nn.Module, input_shape: tuple[int, ...], input_dtype: torch.dtype | None) -> None:
    """Lazy layers (``nn.LazyLinear``, ``nn.LazyConv2d``, ...) take their shapes from one forward of zeros, in eval
    mode so that BatchNorm's statistics stay as they are; each module's own mode is restored afterwards."""
    modes = [(m, m.training) for m in body.modules()]
    body.eval()
    with torch.no_grad():  # lazy parameters have a device too
        body(example_input(body, input_shape, input_dtype, batch=2))
    for m, mode in modes:
        m.training = mode


def bayesianize(module: nn.Module, prior: Prior | str = "gnj", *, input_shape: tuple[int, ...] | None = None,
                delta: float | None = None, likelihood: str = "categorical", noise_scale: float = 1.0,
                input_dtype: torch.dtype | None = None, **prior_options) -> BayesianNet:
    """A :class:`BayesianNet` whose body is a copy of ``module`` with every ``nn.Linear``, ``nn.Conv1d`` and
    ``nn.Conv2d`` replaced by the pyro-bc layer of the same arguments (stride, padding, dilation, groups, bias or
    not; :data:`pyro_bc.nn.layers.BAYES_LAYERS`), except
    the projections inside ``nn.MultiheadAttention`` and any layer the forward in eval mode does not call as a module
    (it reads the weight itself, as Swin's window attention does; a head only training reads) or calls on what
    the forward makes from constants alone (EdgeNeXt's positional encoding): those stay
    deterministic, found here given ``input_shape``, else by the network when it learns the shape from the data.
    A linear layer takes inputs of any leading shape (``(batch, features)``, ``(batch, tokens, features)``, ...).

    Everything else (BatchNorm, activations, pooling, residual additions in ``forward``) is kept as it is. The
    dense weights and biases become the posterior means, so ``net.posterior_mean_network()`` computes what
    ``module`` computes. ``delta`` sets the initial weight variances from the weights (MOPED:
    ``log-variance = log(delta * w^2)``). ``module`` itself is not changed, except that its lazy layers
    (``nn.LazyLinear``, ...), if any, are shaped by one forward of zeros of ``input_shape``, as PyTorch's dry run.
    A ``torch.compile``'d module, or one wrapped in ``nn.DataParallel`` or ``DistributedDataParallel``, is converted
    as the module it wraps.

    :param prior: the sparsity prior, a :class:`~pyro_bc.priors.Prior` or a name (``gnj``, ``ghs``, ``lu``,
        ``rhs``) with ``prior_options`` (``tau0``, ``slab_scale``).
    :param input_shape: one example's shape, e.g. ``(3, 32, 32)``; ``None`` lets training take it from the data.
    :param likelihood: ``"categorical"`` (the outputs are logits of classes), ``"bernoulli"`` (a logit per binary
        label: 0 or 1 targets, one per output) or ``"normal"`` (regression: the outputs are the means of the targets,
        with standard deviation ``noise_scale``), as :class:`BayesianNet` takes them.
    :param input_dtype: ``torch.int64`` (or another integer type) where the inputs are token ids into an
        ``nn.Embedding`` and ``input_shape`` is given; ``None``: floating-point inputs, or the data's type.
    """
    module = getattr(module, "_orig_mod", module)  # torch.compile's wrapper: the module it compiles
    if isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        module = module.module  # the replicated network; pyro-bc's own data parallelism wraps its loss (fit's)
    if isinstance(module, torch.jit.ScriptModule):
        raise ConfigError(f"the module is TorchScript ({type(module).__name__}, from torch.jit.script or trace): give "
                          "bayesianize the Python module it was made from")
    if isinstance(module, BayesianNet):
        raise ConfigError("the module is already a BayesianNet: bayesianize takes the plain network (its "
                          "posterior_mean_network() is one)")
    if delta is not None and not delta > 0:
        raise ConfigError(f"delta must be a positive number, got {delta}")
    prior, input_dtype = make_prior(prior, **prior_options), checked_input_dtype(input_dtype)
    lazy = [name for name, t in (*module.named_parameters(), *module.named_buffers()) if nn.parameter.is_lazy(t)]
    if lazy and input_shape is None:
        raise ConfigError(f"{type(module).__name__} has lazy parameters not yet shaped ({lazy[0]}): give bayesianize "
                          "input_shape=(...), or run one batch through the model first")
    if lazy:
        _shape_lazy_layers(module, input_shape, input_dtype)
    body = copy.deepcopy(module)
    # probed on a copy in eval mode: body.train(mode) afterwards would overwrite submodules' own modes
    called = None if input_shape is None else called_layers(copy.deepcopy(body).eval(), input_shape,
                                                               input_dtype)
    # nn.MultiheadAttention (and any module that reads a layer's weight itself) keeps that layer deterministic
    inside = tuple(f"{name}." for name, m in body.named_modules() if isinstance(m, nn.MultiheadAttention))
    targets = [(name, m) for name, m in dense_layers(body)
               if not name.startswith(inside or ("\0",)) and (called is None or name in called)]
    if not targets:
        names = [f"nn.{kind.dense.__name__}" for kind in LAYER_KINDS]
        raise ConfigError(f"{type(module).__name__} holds no {', '.join(names[:-1])} or {names[-1]} to make Bayesian")
    other = [f"{name} ({type(m).__name__})" for name, m in body.named_modules()
             if isinstance(m, (nn.modules.conv._ConvNd, nn.Bilinear, nn.Linear)) and kind_of(m) is None]
    if other:  # a transposed or 3-D convolution, a subclass computing its own forward: the file computes it whole
        warnings.warn(f"{len(other)} layer(s) of a kind pyro-bc has no Bayesian layer for, or whose class computes a "
                      f"forward of its own, stay deterministic: {', '.join(other[:4])}"
                      f"{', ...' if len(other) > 4 else ''}", stacklevel=2)
    padded = [name for name, m in targets if not padding_stored(m)]
    if len(padded) == len(targets):
        raise ConfigError(f"{type(module).__name__}'s only layers pad other than evenly with zeros, which a compressed "
                          f"layer cannot: nothing to make Bayesian ({', '.join(padded[:4])})")
    if padded:  # a compressed layer pads evenly with zeros; the file computes these whole, as traced
        warnings.warn(f"{len(padded)} convolution(s) padding other than evenly with zeros (padding_mode reflect, "
                      f"replicate or circular; 'same' over an even kernel) stay deterministic: "
                      f"{', '.join(padded[:4])}{', ...' if len(padded) > 4 else ''}", stacklevel=2)
        targets = [(name, m) for name, m in targets if name not in padded]
    _warn_tied(body, targets)
    parametrized = [f"{name} ({', '.join(type(p).__name__ for p in m.parametrizations.weight)})"
                    for name, m in targets if torch.nn.utils.parametrize.is_parametrized(m, "weight")]
    if parametrized:  # weight_norm, spectral_norm: the posterior is over the weight they compute
        warnings.warn(f"{len(parametrized)} layer(s) whose weight a parametrization computes start from that weight and "
                      f"lose the parametrization (the posterior is over the weight itself): "
                      f"{', '.join(parametrized[:4])}{', ...' if len(parametrized) > 4 else ''}", stacklevel=2)
    for name, dense in targets:
        try:
            layer = BAYES_LAYERS[kind_of(dense).name].like(dense, prior)
        except ConfigError as e:
            raise ConfigError(f"{name}: {e}") from None
        _start_from(layer, dense, name, delta)
        parent_name, _, child = name.rpartition(".")
        setattr(body.get_submodule(parent_name) if parent_name else body, child, layer)
    return BayesianNet(body, input_shape=input_shape, likelihood=likelihood, noise_scale=noise_scale,
                       input_dtype=input_dtype)
