"""A Bayesian network: a body of pyro-bc layers and plain modules, plus a likelihood.

``model(x, y)`` runs the body (each Bayesian layer samples its prior sites) and observes ``y`` inside
``pyro.plate("data", n_data)``, so a minibatch's log-likelihood is scaled to the whole data set.
``guide()`` registers the network's parameters with Pyro's param store (as ``pyro.module`` does, under
:attr:`BayesianNet.pyro_name`) and samples every layer's guide sites in the same order, so Pyro's own
``SVI`` with a ``pyro.optim`` optimiser trains the network.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections import Counter
from collections.abc import Iterator

import pyro
import torch
from torch import nn

from pyro_bc.errors import ConfigError, first_line
from pyro_bc.nn.kinds import dense_layers
from pyro_bc.nn.layers import BayesLayer
from pyro_bc.nn.likelihoods import CategoricalLikelihood, make_likelihood

#: The integer input types a network may take (token ids into an ``nn.Embedding``), by the name checkpoints and
#: ``.bcz`` files record; a network of floating-point inputs records none.
INTEGER_INPUTS = {str(t).removeprefix("torch."): t for t in (torch.int64, torch.int32, torch.int16, torch.int8,
                                                               torch.uint8)}


def example_input(module: nn.Module, input_shape: tuple[int, ...], input_dtype: torch.dtype | None = None,
                  batch: int = 1) -> torch.Tensor:
    """``batch`` examples of zeros, of ``input_shape`` and ``input_dtype`` (None: floating point), on ``module``'s
    device: what dry runs of a network feed it (token id 0 is in every embedding's table)."""
    parameter = next(module.parameters(), None)
    return torch.zeros(batch, *input_shape, dtype=input_dtype or torch.get_default_dtype(),
                       device=None if parameter is None else parameter.device)


@contextlib.contextmanager
def layers_called_as_modules() -> Iterator[None]:
    """PyTorch's transformer layers (``nn.TransformerEncoderLayer``, ``nn.MultiheadAttention``) kept off their fused
    inference path, which in eval mode reads each linear layer's ``weight`` itself: a Bayesian layer has none and
    draws its own, so they call their layers as modules, as in training."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


@torch.no_grad()
def layer_calls(module: nn.Module, x: torch.Tensor) -> tuple[object, Counter]:
    """``module(x)``, and how many times the forward called each of ``module``'s layers
    (:data:`~pyro_bc.nn.kinds.LAYER_KINDS`) as a module, by path."""
    calls: Counter = Counter()
    handles = [m.register_forward_pre_hook(lambda *_, name=name: calls.update([name]))
               for name, m in dense_layers(module)]
    try:
        return module(x), calls
    finally:
        for handle in handles:
            handle.remove()


def input_dtype_name(dtype: torch.dtype | None) -> str | None:
    """The name checkpoints and ``.bcz`` files record for an input type: a key of :data:`INTEGER_INPUTS`, None for
    floating-point inputs."""
    return None if dtype is None else str(dtype).removeprefix("torch.")


def checked_input_dtype(dtype: torch.dtype | None) -> torch.dtype | None:
    """``dtype`` if it is None (floating-point inputs) or one of :data:`INTEGER_INPUTS`, else a one-line error."""
    if dtype is not None and dtype not in INTEGER_INPUTS.values():
        raise ConfigError(f"input_dtype must be an integer type ({', '.join(INTEGER_INPUTS)}) for ids, or None for "
                          f"floating-point inputs; got {dtype}")
    return dtype


def called_layers(module: nn.Module, input_shape: tuple[int, ...],
                  input_dtype: torch.dtype | None = None) -> set[str] | None:
    """The layers of ``module`` that its forward calls as modules on what depends on its input, in ``module``'s
    present mode. Not a layer whose weight the forward reads itself (Swin's window attention), nor a head only
    training reads, nor a layer applied to what the forward makes from constants alone (EdgeNeXt's positional
    encoding): run on two different examples, such a layer reads the same values both times and nothing autograd
    traces back to the input (the parameters frozen meanwhile; for token ids, traced back to the embedding tables).
    None where the forward fails on that shape."""
    ids = input_dtype is not None
    flags = [(p, p.requires_grad) for p in module.parameters()]
    module.requires_grad_(False)
    for m in module.modules():  # ids have no gradient: what an embedding looks up depends on them
        if ids and isinstance(m, nn.Embedding):
            m.weight.requires_grad_(True)
    generator = torch.Generator().manual_seed(0)
    first: dict[str, list[torch.Tensor | None]] = {}
    on_data: set[str] = set()

    def record(name: str, args: tuple, run: int) -> None:
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if run == 0:
            first.setdefault(name, []).append(None if x is None else x.detach().clone())
            return
        earlier = first.get(name, []).pop(0) if first.get(name) else None
        if x is not None and (x.requires_grad or earlier is None or earlier.shape != x.shape or
                              not torch.equal(earlier, x.detach())):
            on_data.add(name)

    try:
        for run in (0, 1):
            x = example_input(module, input_shape, input_dtype)
            x = x.fill_(run) if ids else torch.randn(x.shape, generator=generator).to(x).requires_grad_(True)
            handles = [m.register_forward_pre_hook(lambda _m, args, name=name, run=run: record(name, args, run))
                       for name, m in dense_layers(module)]
            try:
                module(x)
            finally:
                for handle in handles:
                    handle.remove()
    except Exception:  # noqa: BLE001  (the network does not run on this shape: training will say so, with its fix)
        return None
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
    return on_data


class BayesianNet(nn.Module):
    """:param body: any module holding :class:`~pyro_bc.nn.layers.BayesLayer` s; ``compress`` takes an ``nn.Sequential``
        of them and parameter-free modules.
    :param input_shape: shape of one input example, e.g. ``(1, 28, 28)``; ``None``: set by training from the data.
    :param likelihood: ``"categorical"`` (logits of classes), ``"bernoulli"`` (a logit per binary label: a binary
        classifier's one output, or one per label of a multi-label classifier) or ``"normal"`` (regression, fixed
        ``noise_scale``): :mod:`pyro_bc.nn.likelihoods`.
    :param input_dtype: an integer type (:data:`INTEGER_INPUTS`) where the inputs are ids (tokens into an
        ``nn.Embedding``); ``None``: floating-point inputs, or set by training from the data.
    """

    def __init__(self, body: nn.Module, input_shape: tuple[int, ...] | None, likelihood: str = "categorical",
                 noise_scale: float = 1.0, input_dtype: torch.dtype | None = None):
        super().__init__()
        self.body = body
        self.pyro_name = "bc"  # the parameters' prefix in Pyro's param store
        self.observation = make_likelihood(likelihood, noise_scale)  # how the targets are observed
        for name, module in body.named_modules():
            if isinstance(module, BayesLayer):
                module.site = name
        self.layers: list[BayesLayer] = [m for m in body.modules() if isinstance(m, BayesLayer)]
        if not self.layers:
            raise ConfigError("the network's body holds no pyro_bc Bayesian layer")
        self.input_dtype = checked_input_dtype(input_dtype)  # before the shape, whose setter runs the network on examples
        self.input_shape = input_shape
        #: Set by fine-tuning (``pyro_bc.finetune``, or loading a run of it): one
        #: :class:`~pyro_bc.compression.finetuning.LayerMask` per layer, whose pruned groups are held at zero, so that
        #: compression prunes them at any threshold. ``None``: every group is decided by its log alpha.
        self.pruning_masks: list | None = None

    @property
    def likelihood(self) -> str:
        """The likelihood's name (:data:`pyro_bc.nn.likelihoods.LIKELIHOODS`)."""
        return self.observation.name

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        """The shape of one input example; setting it also chooses the convolutions' output layout
        (:meth:`choose_layout`)."""
        return self._input_shape

    @input_shape.setter
    def input_shape(self, shape) -> None:
        self._input_shape = None if shape is None else tuple(int(d) for d in shape)
        if self._input_shape is not None:
            self._leave_uncalled_plain()
            self.choose_layout()

    def _leave_uncalled_plain(self) -> None:
        """Each Bayesian layer that the forward in eval mode does not call on what depends on its input
        (:func:`called_layers`) back to its plain posterior-mean layer, as :func:`~pyro_bc.nn.convert.bayesianize`
        given ``input_shape`` leaves it: torchvision's auxiliary classifiers (GoogLeNet, Inception v3), which only
        training reads and the likelihood does not (:meth:`model`), have no place in the compressed network. Nothing
        changes where the forward fails or calls no layer."""
        called = called_layers(self.posterior_mean_network(), self._input_shape, self.input_dtype)
        uncalled = [layer for layer in self.layers if layer.site not in called] if called else []
        if not uncalled:
            return
        names = [layer.site for layer in uncalled]
        warnings.warn(f"{len(names)} Bayesian layer(s) that the forward does not call in eval mode (or calls on "
                      f"constants alone) stay deterministic: {', '.join(names[:4])}{', ...' if len(names) > 4 else ''}",
                      stacklevel=3)
        for layer in uncalled:
            parent, _, child = layer.site.rpartition(".")
            layer.contiguous_output = True  # the torch layer itself, as the user's module had it
            setattr(self.body.get_submodule(parent) if parent else self.body, child, layer.posterior_mean_module())
        self.layers = [layer for layer in self.layers if layer not in uncalled]

    @torch.no_grad()
    def choose_layout(self) -> None:
        """Channels-last outputs for the 2-D convolutions (pooling and the next convolution run faster on them),
        unless the body's forward fails on them and runs on the default layout (``x.view(len(x), -1)`` after a
        convolution): then every layer gives the default layout. Decided by one forward of the posterior-mean
        network on zeros; a forward that fails either way is left to fail where it runs."""
        if not any(layer.kind.spatial_dims == 2 for layer in self.layers):
            return
        x = self.example_input(2)
        for contiguous in (False, True):
            for layer in self.layers:
                layer.contiguous_output = contiguous
            try:
                self.posterior_mean_network()(x)
                return
            except Exception:  # noqa: BLE001, S112  (any failure of a user's forward: try the other layout)
                continue
        for layer in self.layers:
            layer.contiguous_output = False

    def example_input(self, batch: int = 1) -> torch.Tensor:
        """``batch`` zero examples of the network's input shape and type, on its device."""
        return example_input(self.body, self._input_shape, self.input_dtype, batch)

    @property
    def layer_names(self) -> list[str]:
        return [layer.site for layer in self.layers]

    def model(self, x: torch.Tensor, y: torch.Tensor | None = None, n_data: int | None = None) -> torch.Tensor:
        with layers_called_as_modules():
            out = self.body(x)
        if isinstance(out, tuple):  # GoogLeNet, Inception v3: the auxiliary classifiers' logits follow in training
            out = out[0]
        with pyro.plate("data", n_data or len(x), subsample=torch.arange(len(x), device=x.device)):
            self.observation.observe(out, y)
        return out

    def guide(self, x: torch.Tensor | None = None, y: torch.Tensor | None = None, n_data: int | None = None) -> None:
        """Register the parameters with Pyro (:meth:`register_params`), then sample every layer's guide sites."""
        self.register_params()
        for layer in self.layers:
            layer.guide()

    def register_params(self) -> None:
        """``pyro.module(pyro_name, self)``, with this network's tensors in the param store.

        ``pyro.module`` keeps a tensor already stored under a name; a store left from another network of the
        same layout would then be optimised in this one's place. Such stale entries are replaced first.
        """
        store = pyro.get_param_store()
        for name, param in self.named_parameters():
            full = f"{self.pyro_name}$$${name}"
            if full in store and store.get_param(full) is not param:
                del store[full]
        pyro.module(self.pyro_name, self)

    def clip_variances(self) -> None:
        for layer in self.layers:
            layer.clip_variances()

    def posterior_mean_network(self) -> nn.Module:
        """A deterministic copy of the body, in eval mode, each Bayesian layer replaced by the plain layer holding
        its posterior-mean weights (``E[z] * mu_W``); the other modules are copies (BatchNorm with its running
        statistics), so nothing done to the copy touches the network."""
        memo = {id(layer): layer.posterior_mean_module() for layer in self.layers}
        return copy.deepcopy(self.body, memo).eval()

    def init_from(self, state: dict[str, torch.Tensor]) -> None:
        """Set weight (and bias) means from a deterministic network's ``state_dict``.

        ``<layer>.weight`` goes to the Bayesian layer of that name (its path in the body, e.g. ``conv1``); where
        the names do not all match, the state's ``*.weight`` tensors of the layers' dimensions are matched to the
        layers in order, with a warning. A ``*.bias`` beside a weight sets the bias mean.
        """
        by_name = [f"{layer.site}.weight" for layer in self.layers]
        if all(key in state for key in by_name):
            keys = by_name
        else:
            dims = {layer.weight_mu.dim() for layer in self.layers}  # the layer kinds' weights (2-D, 3-D, 4-D)
            keys = [k for k in state if k.endswith("weight") and state[k].dim() in dims]
            if len(keys) != len(self.layers):
                raise ConfigError(f"init state has {len(keys)} weight tensors and names that do not match the "
                                  f"network's layers ({', '.join(self.layer_names)})")
            warnings.warn(f"init state's weight names do not match the layers ({', '.join(self.layer_names)}): "
                          "matched in order", stacklevel=2)
        for key, layer in zip(keys, self.layers):
            layer.init_from(state[key], state.get(key[: -len("weight")] + "bias"), key)


def check_forward(net: BayesianNet, x: torch.Tensor, *labels: torch.Tensor, what: str = "data") -> None:
    """One line for what would otherwise fail inside the first step or a compression, or silently: examples (``x``,
    of the split ``what``) of another shape than the network's, a forward that fails on them, one that returns no
    tensor (in eval mode), a Bayesian layer called twice, class labels (``labels``: each split's) that are not one
    whole number per example within the network's outputs. Sets a converted network's input shape from ``x``, and
    its input type where ``x`` holds integer ids."""
    if not x.is_floating_point() and x.dtype not in INTEGER_INPUTS.values():
        raise ConfigError(f"{what} examples are {x.dtype}: give floating-point inputs, or integer ids "
                          f"({', '.join(INTEGER_INPUTS)})")
    if net.input_dtype is None and not x.is_floating_point():  # token ids: recorded for dry runs and the file
        net.input_dtype = x.dtype
    elif net.input_dtype is not None and x.is_floating_point():
        raise ConfigError(f"{what} examples are floating-point, but the network takes {net.input_dtype} ids")
    if net.input_shape is None:  # a converted network: its input is the data's
        net.input_shape = tuple(x.shape[1:])
    if tuple(x.shape[1:]) != net.input_shape:
        raise ConfigError(f"{what} examples have shape {tuple(x.shape[1:])}, the network expects {net.input_shape}")
    try:
        out, calls = layer_calls(net.posterior_mean_network(), x[:2])
    except RuntimeError as e:
        raise ConfigError(f"{what} does not fit the network: {first_line(e)}")
    if not isinstance(out, torch.Tensor):
        keys = f" of {', '.join(map(repr, out))}" if isinstance(out, dict) else ""
        hint = ("; wrap it in a module whose forward returns the logits, e.g. model(x)['out'] (torchvision's segmentation "
                "models), with the classes last: .movedim(1, -1)") if isinstance(out, dict) else ""
        raise ConfigError(f"the network returns a {type(out).__name__}{keys}: pyro-bc needs one tensor of logits (or, "
                          f"for regression, predictions){hint}")
    if isinstance(net.observation, CategoricalLikelihood) and out.shape[-1] > 1 and bool((out >= 0).all()) and \
            torch.allclose(out.sum(-1), torch.ones(())):
        warnings.warn("the network's outputs are probabilities (each row sums to 1): the categorical likelihood takes "
                      "logits, so a final Softmax squashes them twice; remove it (a LogSoftmax is fine)", stacklevel=3)
    for y in labels:
        net.observation.check_targets(y, tuple(out.shape))
    site = max(net.layer_names, key=lambda name: calls[name])
    if calls[site] > 1:
        raise ConfigError(f"layer {site!r} is called {calls[site]} times in one forward: a Bayesian layer is one Pyro "
                          "sample site, drawn once per forward, so a layer reused within a forward cannot be trained; "
                          "give each use its own layer")
