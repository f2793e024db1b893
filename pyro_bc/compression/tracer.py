"""The tracer of :class:`~pyro_bc.compression.graph.BodyGraph`: ``torch.fx`` symbolic tracing that also runs each op on
an example, so that a forward may branch on what the input's shape fixes."""

from __future__ import annotations

import functools
import inspect
from unittest import mock

import torch
import torch.nn.functional as F
from torch import fx, nn

from pyro_bc.nn.kinds import kind_of


def _defaults_after_first(forward) -> dict:
    """The arguments of ``forward`` after its first that have defaults, at them."""
    parameters = list(inspect.signature(forward).parameters.values())[1:]
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty and
            p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}


def _drop_specialised_arguments(graph: fx.Graph) -> None:
    """Removes the placeholders after the first (arguments traced at their defaults) and the checks that ``fx``
    adds on them (``_assert_is_none``, ``torch._assert``), which read nothing else, so that the graph has one input."""
    dead = set([n for n in graph.nodes if n.op == "placeholder"][1:])
    for node in graph.nodes:  # in order: a check is dead once everything it reads is
        if node.op != "output" and node.all_input_nodes and all(n in dead for n in node.all_input_nodes):
            dead.add(node)
    for node in reversed(list(graph.nodes)):
        if node in dead:
            graph.erase_node(node)


def is_batchnorm(module: nn.Module) -> bool:
    """Whether ``module`` is PyTorch's BatchNorm (any subclass keeping its forward): one with a forward of its own (an
    activation after it, as timm's ``BatchNormAct2d``) is traced into, its ``F.batch_norm`` a BatchNorm op there."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and \
        type(module).forward in (nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward)


class ShapeTracer(fx.Tracer):
    """Stops at linear, convolution, BatchNorm and LayerNorm modules (subclasses that keep their forward) and at
    PyTorch's own modules, except those holding a Bayesian layer (``layers``: their paths), which it traces into (an
    ``nn.TransformerEncoder`` whose layers' linear layers are Bayesian). A module made in the forward and called at
    once (``nn.ReLU()(x)``) is traced into.

    Each op also runs on ``example`` as it is traced, so that a forward may branch on what an example of the
    network's input shape fixes: a size, a rank, a flag (``if x.dim() != 3``, ``len(x.shape)``, ``x.is_nested``, as
    PyTorch's transformer layers do); the graph keeps the branch taken. A branch on a tensor's values (or on a number
    read from them by ``.item()``) stays refused: data-dependent control flow."""

    def __init__(self, example: torch.Tensor, layers: list[str]):
        super().__init__()
        self.example, self.layers, self._eager = example, layers, False
        self.proxy_buffer_attributes = True  # a buffer sliced by a size (a causal mask) is traced, as parameters are

    def call_module(self, m, forward, args, kwargs):
        if self._eager or not self._installed(m):  # a module made in the forward (nn.ReLU()(x)): its ops are traced
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def _installed(self, m: nn.Module) -> bool:
        try:
            self.path_of_module(m)
        except NameError:
            return False
        return True

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        return attr_val if self._eager else super().getattr(attr, attr_val, parameter_proxy_cache)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return kind_of(m) is not None or is_batchnorm(m) or \
            isinstance(m, nn.LayerNorm) and type(m).forward is nn.LayerNorm.forward or \
            super().is_leaf_module(m, module_qualified_name) and \
            not any(layer.startswith(f"{module_qualified_name}.") for layer in self.layers)

    def trace(self, root, concrete_args=None) -> fx.Graph:
        """The graph of ``root``'s forward on its first argument, the others at their defaults (``mask=None``,
        ``return_features=False``: the network trains and compresses called with one input)."""
        defaults = _defaults_after_first(root.forward) if concrete_args is None else concrete_args
        with mock.patch.object(F, "_none_or_dtype", _none_or_dtype):
            graph = super().trace(root, defaults)
        _drop_specialised_arguments(graph)
        for node in graph.nodes:  # the example's values are not kept with the graph
            node.meta.pop(_EXAMPLE, None)
            node.meta.pop(_READS_VALUES, None)
        return graph

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _SizedProxy(node, self)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        proxy.node.meta[_READS_VALUES] = kind == "call_method" and target in ("item", "tolist") or \
            any(n.meta.get(_READS_VALUES, False) for n in proxy.node.all_input_nodes)
        proxy.node.meta[_EXAMPLE] = self._run(proxy.node)
        return proxy

    @torch.no_grad()
    def _run(self, node: fx.Node):
        """What ``node`` computes on the example (:data:`_UNKNOWN` where it cannot be run)."""
        if any(n.meta.get(_EXAMPLE, _UNKNOWN) is _UNKNOWN for n in node.all_input_nodes):
            return _UNKNOWN
        kind, target = node.op, node.target
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta[_EXAMPLE])
        self._eager = True  # modules called while the op runs are run, not traced
        try:
            if kind == "placeholder":
                return self.example
            if kind == "get_attr":
                return functools.reduce(getattr, target.split("."), self.root)
            if kind == "call_module":
                return self.root.get_submodule(target)(*args, **kwargs)
            if kind == "call_function":
                return target(*args, **kwargs)
            if kind == "call_method":
                return getattr(args[0], target)(*args[1:], **kwargs)
        except Exception:  # noqa: BLE001  (an op that cannot run alone: its value stays unknown)
            return _UNKNOWN
        finally:
            self._eager = False
        return _UNKNOWN

    def _fixed(self, obj: fx.Proxy):
        """The example's value of ``obj`` where it is fixed by the input's shape (a number, a flag, sizes), else
        :data:`_UNKNOWN`."""
        meta = obj.node.meta
        value = meta.get(_EXAMPLE, _UNKNOWN)
        if meta.get(_READS_VALUES, True) or isinstance(value, torch.Tensor) or not isinstance(
                value, (bool, int, float, tuple, list, torch.Size, torch.dtype, torch.device)):
            return _UNKNOWN
        return value

    def to_bool(self, obj: fx.Proxy) -> bool:
        value = self._fixed(obj)
        return super().to_bool(obj) if value is _UNKNOWN else bool(value)

    def iter(self, obj: fx.Proxy):
        value = self._fixed(obj)
        return super().iter(obj) if value is _UNKNOWN else iter([obj[i] for i in range(len(value))])


class _SizedProxy(fx.Proxy):
    """A proxy whose ``len`` is known where the traced example fixes it (``len(x.size())``, ``len(x.shape)``), and
    whose ``device`` and ``dtype`` are the example's."""

    def __len__(self) -> int:
        value = self.tracer._fixed(self)
        if value is _UNKNOWN:
            return super().__len__()
        return len(value)

    def __getattr__(self, k: str):
        if k in ("device", "dtype"):  # fixed by the example, and read as values: autocast(x.device.type, ...)
            example = self.node.meta.get(_EXAMPLE, _UNKNOWN)
            if isinstance(example, torch.Tensor):
                return getattr(example, k)
        return _SizedAttribute(self, k)


class _SizedAttribute(fx.proxy.Attribute, _SizedProxy):
    """An attribute of a traced value (``x.shape``), sized as :class:`_SizedProxy`."""


def _none_or_dtype(value) -> torch.dtype | None:
    """``F._none_or_dtype`` for a traced tensor too: PyTorch's transformer layers ask a mask given to them its dtype,
    and the original accepts only a ``torch.Tensor``."""
    return None if value is None else value.dtype


_EXAMPLE, _READS_VALUES = "pyro_bc_example", "pyro_bc_reads_values"  # node meta keys while tracing
_UNKNOWN = object()
