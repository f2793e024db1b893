"""Pruning any network body, a flat sequence or a graph: residual sums, concatenations, BatchNorm, any module.

The posterior-mean network is traced with ``torch.fx`` into :class:`BodyGraph`: one node per layer or
parameter-free op, each naming the nodes it reads, and a *channel variable* for every position along dim 1 of
every node's output (a channel, or a feature after a flatten). Positions that must be kept or removed together
share a variable:

* a layer's outputs are new variables; a depthwise convolution's are its inputs' (it ties them); a grouped
  convolution keeps every variable it reads and writes;
* activations (:mod:`pyro_bc.nn.ops`), pooling and BatchNorm keep their input's variables (BatchNorm that follows no
  layer alone stays as a per-channel scale and shift node); a flatten repeats each channel's variable over its
  positions; a concatenation joins its inputs' lists (so their indices are offset);
* deterministic modules stay as they are and keep every channel they mix: a plain linear layer or convolution the
  network did not make Bayesian keeps every variable it reads and writes; ``nn.LayerNorm`` keeps its input's
  variables, all of them where it normalises across them;
* a linear layer on a token sequence ``(batch, ..., features)`` names its features along the last dimension
  (``Node.axis`` -1); positional ops follow them there, ops that name channels along dim 1 do not;
* a residual sum, and a product with a per-channel scale (squeeze-excitation), unite their inputs' variables
  position by position, so a sum keeps the union of the channels its inputs keep (a producer that pruned a
  channel others keep outputs it with zero weights);
* shape queries (``x.size()``) touch nothing; reshapes, transposes, chunks and indexing are followed position by
  position and become a ``gather`` node where they reorder or select whole channels (ShuffleNet's channel shuffle);
* anything else (an attention, a parameter read in the forward, a reshape that moves channels into positions, any
  op of the user's) is an op outside the registry: one node computing it as traced, with the constants, sizes and
  multi-output calls it reads (:meth:`BodyGraph._opaque`), stored as core ATen operators
  (:mod:`pyro_bc.bcz.program`). It keeps every variable it reads; its outputs' positions have no variables until an
  op that names them reads them, which makes up kept ones (:meth:`BodyGraph._bind`). It is never a refusal. One
  whose core ATen operators compute each position of its one input alone (LeakyReLU, ELU, Mish, ``x * 2``:
  :func:`~pyro_bc.bcz.program.is_positionwise`) lets the channels through instead, as a registered activation.

A variable stays while some layer producing it keeps a weight for it and some layer reading it keeps a weight
reading it (the network's input and output always stay), iterated to a fixed point. Eval-mode BatchNorm right
after a layer is folded into that layer's ``E[w]``, ``Var[w]`` and bias (:meth:`BodyGraph.fold_batchnorm`) before
thresholds and bits are chosen.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from pyro_bc.bcz.model import Op
from pyro_bc.bcz.program import Program, export_program, is_positionwise
from pyro_bc.compression.posterior import (
    LayerPosterior,
    PrunedLayer,
    _any_except,
    _outer,
    _own_mask,
    check_thresholds,
    fold_pruned_inputs,
)
from pyro_bc.compression.tracer import ShapeTracer
from pyro_bc.errors import ConfigError, first_line
from pyro_bc.nn.kinds import kind_of, padding_stored
from pyro_bc.nn.network import BayesianNet
from pyro_bc.nn.ops import ELEMENTWISE_KINDS, elementwise_of_function, elementwise_of_method, elementwise_of_module

NETWORK_INPUT = -1  # the node index that names the network input
_FUNCTION_OPS = {operator.add: "add", torch.add: "add", operator.mul: "mul", torch.mul: "mul", torch.cat: "cat",
                 torch.flatten: "flatten", F.adaptive_avg_pool2d: "adaptive_avgpool2d", torch.mean: "mean",
                 F.max_pool2d: "maxpool2d", F.avg_pool2d: "avgpool2d"}
_METHOD_OPS = {"flatten": "flatten", "mul": "mul", "mean": "mean"}
# the arguments of the functional pools after the input, in order, with their defaults
_POOL_ARGS = {"maxpool2d": (("kernel_size", None), ("stride", None), ("padding", 0), ("dilation", 1),
                            ("ceil_mode", False), ("return_indices", False)),
              "avgpool2d": (("kernel_size", None), ("stride", None), ("padding", 0), ("ceil_mode", False),
                            ("count_include_pad", True), ("divisor_override", None))}
_PASS_THROUGH = (nn.Identity, nn.Dropout)  # modules that are the identity in eval mode


def module_op(module: nn.Module) -> Op | None:
    """The ``.bcz`` op of a parameter-free module; None where there is none (dilated or non-padding-counting
    pools, other modules)."""
    kind = elementwise_of_module(module)
    if kind is not None:
        return Op(kind)
    if isinstance(module, nn.Flatten) and module.end_dim == -1:
        return Op("flatten", {"start_dim": module.start_dim})
    if isinstance(module, nn.AdaptiveAvgPool2d):
        return Op("adaptive_avgpool2d", {"output_size": module.output_size})
    if isinstance(module, nn.MaxPool2d) and module.dilation in (1, (1, 1)) and not module.return_indices:
        return Op("maxpool2d_ceil" if module.ceil_mode else "maxpool2d",
                  {"kernel_size": module.kernel_size, "stride": module.stride, "padding": module.padding})
    if isinstance(module, nn.AvgPool2d) and not module.ceil_mode and module.count_include_pad and \
            module.divisor_override is None:
        return Op("avgpool2d", {"kernel_size": module.kernel_size, "stride": module.stride, "padding": module.padding})
    return None


@dataclasses.dataclass
class Node:
    """One node of the traced body: a Bayesian layer (``layer``: its index in ``net.layers``) or an op."""

    name: str
    inputs: tuple[int, ...]  # node indices, NETWORK_INPUT for the input
    variables: torch.Tensor | None  # channel variable of each position along ``axis``; None: all kept, unnamed
    layer: int | None = None
    op: Op | None = None
    repeat: int = 1  # flatten: positions per input channel
    depthwise: bool = False  # a depthwise convolution: its outputs are its inputs' variables
    grouped: bool = False  # a grouped convolution other than depthwise: it keeps all its channels
    affine: tuple[torch.Tensor, torch.Tensor] | None = None  # BatchNorm on its own: (scale, shift) per channel
    module: nn.Module | None = None  # a deterministic module kept as it is: a plain layer, a LayerNorm
    keeps_all: bool = False  # every variable it reads and writes stays (it mixes channels)
    axis: int = 1  # the dimension its variables run along: 1, or -1 for features last (a token sequence)
    reads: torch.Tensor | None = None  # a layer: the variables of its input positions
    reads_last_axis: bool = False  # a layer reading features along the last axis of an input of rank > 2
    reads_whole: bool = False  # a layer reading an input whose positions it cannot name: it reads all of them
    program: nn.Module | None = None  # an op outside the registry: the fx graph that computes it (it keeps all)
    what: str = ""  # such an op, in words
    input_shapes: tuple[tuple[tuple[int, ...], torch.dtype], ...] = ()  # such an op: its inputs' (shape, dtype)
    bound: bool = False  # its variables were made up for an op that names positions: all kept
    exported: Program | None = None  # such an op lowered to core ATen (:meth:`BodyGraph.exported`), once


class _Variables:
    """Channel variables with union-find."""

    def __init__(self) -> None:
        self.parent: list[int] = []

    def new(self, n: int) -> torch.Tensor:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return torch.arange(start, start + n)

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def unite(self, a: torch.Tensor, b: torch.Tensor) -> None:
        for i, j in zip(a.tolist(), b.tolist()):
            self.parent[self.find(i)] = self.find(j)

    def roots(self) -> torch.Tensor:
        """Every variable's representative, numbered 0, 1, ..."""
        return torch.unique(torch.tensor([self.find(i) for i in range(len(self.parent))]), return_inverse=True)[1]


class BodyGraph:
    """The traced body of ``net`` (which must know its input shape): its nodes in execution order, each
    layer's input and output variables, and the BatchNorm that follows each layer. Every pruning decision is taken
    on one (:meth:`prune`); :meth:`chain` builds one for a bare list of layer posteriors."""

    def __init__(self, net: BayesianNet):
        self._start()
        if net.input_shape is None:
            raise ConfigError("the network's input shape is unknown: train it first or give input_shape")
        mean = net.posterior_mean_network()
        try:
            module = fx.GraphModule(mean, ShapeTracer(net.example_input(2), net.layer_names).trace(mean))
            # what the output does not read goes (an unused item of a tuple), but every Bayesian layer stays
            layers = {layer.site for layer in net.layers}
            module.graph.eliminate_dead_code(lambda n: n.is_impure() or n.op == "call_module" and n.target in layers)
            _ShapeProp(module).propagate(net.example_input(1))
            _BatchFirst(module).run(net.example_input(2))
        except Exception as e:  # noqa: BLE001  (whatever a user's forward does, the cause is reported)
            raise ConfigError(f"cannot trace the network with torch.fx: {type(e).__name__}: "
                              f"{first_line(e)}")
        self.modules = dict(mean.named_modules())
        self.layer_index = {layer.site: i for i, layer in enumerate(net.layers)}
        self._traced = module
        position: dict[fx.Node, int] = {}
        self._pending: dict[fx.Node, tuple[int, object]] = {}  # shape ops not yet resolved: (base node, positions)
        self._deferred: set[fx.Node] = set()  # constants and tuples: computed inside the op that reads them
        self._live: set[fx.Node] = set()  # deferred nodes that depend on the network input
        for fx_node in module.graph.nodes:
            if fx_node.op == "placeholder":
                position[fx_node] = NETWORK_INPUT
                self.input_variables = self._variables.new(_shape(fx_node)[1])
                self._shapes = {NETWORK_INPUT: _shape(fx_node)}  # each node's output shape, batch 1
            elif fx_node.op == "output":
                self._resolve(fx_node, position)
                self._check_output(fx_node, position)
            elif "concrete" in fx_node.meta:  # a shape query (x.size(), arithmetic on sizes): no tensor, no node
                continue
            elif self._is_shape_op(fx_node, position):
                self._pending[fx_node] = self._shape_op(fx_node, position)
            elif (called := self._batchnorm_called(fx_node)) is not None:  # F.batch_norm in a module's forward
                self._resolve(fx_node, position)
                position[fx_node] = self._fold_target(fx_node, called[1], position[fx_node.args[0]], position,
                                                      name=called[0])
                self._shapes.setdefault(position[fx_node], _shape(fx_node))
            elif fx_node.op == "call_module" and fx_node.target in self.layer_index and \
                    not fx_node.meta[_BATCH_FIRST]:
                raise ConfigError(f"cannot compress {fx_node.target}: the layer reads a tensor whose first dimension "
                                  "is not the batch (a sequence first, or the batch merged with positions, as a "
                                  "MobileViT's patches are): pyro-bc needs the batch first in what a layer reads "
                                  "(batch_first=True for PyTorch's transformer layers)")
            elif not self._defer(fx_node, position):
                if any(a in self._deferred for a in fx_node.all_input_nodes):
                    position[fx_node] = self._opaque(fx_node, position)
                else:
                    self._resolve(fx_node, position)
                    position[fx_node] = self._add(fx_node, position)
                self._shapes.setdefault(position[fx_node], _shape(fx_node))
        self._finish(len(net.layers))

    def _start(self) -> None:
        self.nodes: list[Node] = []
        self.batchnorm: dict[int, nn.Module] = {}
        self.batchnorm_names: dict[int, str] = {}  # layer index -> the path of the BatchNorm folded into it
        self._variables = _Variables()
        self._fixed: list[torch.Tensor] = []  # variables that always stay (made up for positions nothing names)

    def _defer(self, fx_node: fx.Node, position: dict[fx.Node, int]) -> bool:
        """Whether ``fx_node`` is left to the op that reads it: a tensor that depends on no input (a parameter
        read outside a layer, and what is computed from it alone), a tuple (the outputs of a multi-output op) or a
        tensor whose first dimension is not the batch (an attention's queries, keys and values stacked in front of
        it, as timm's ``qkv.permute(2, 0, 3, 1, 4)``): what a node reads has the batch first (the network's output
        need not)."""
        live = any(a in position or a in self._pending or a in self._live for a in fx_node.all_input_nodes
                   if "concrete" not in a.meta)
        batch_first = fx_node.meta[_BATCH_FIRST] or any(user.op == "output" for user in fx_node.users)
        if isinstance(fx_node.meta.get("tensor_meta"), TensorMetadata) and live and batch_first:
            return False
        self._deferred.add(fx_node)
        if live:
            self._live.add(fx_node)
        return True

    def _opaque(self, fx_node: fx.Node, position: dict[fx.Node, int]) -> int:
        """An op outside the registry: a node computing ``fx_node`` with everything it reads that is not a node
        (pending reshapes, sizes, constants, tuples) from the nodes it reads. It keeps every channel it touches."""
        graph, env, sources, shapes, root = fx.Graph(), {}, [], [], nn.Module()

        def copy(n: fx.Node) -> fx.Node:
            if n in env:
                return env[n]
            if n in position and n is not fx_node:
                env[n] = graph.placeholder(f"input_{len(sources)}")
                sources.append(position[n])
                shapes.append((_shape(n), n.meta["tensor_meta"].dtype))
                return env[n]
            for a in n.all_input_nodes:
                copy(a)
            if n.op == "get_attr":
                name = f"constant_{len(env)}"
                value = functools.reduce(getattr, n.target.split("."), self._traced)
                root.register_buffer(name, value.detach().clone())
                env[n] = graph.get_attr(name)
            elif n.op == "call_module":
                name = f"module_{len(env)}"
                root.add_module(name, self.modules[n.target])
                env[n] = graph.call_module(name, *fx.node.map_arg((n.args, n.kwargs), lambda a: env[a]))
            else:
                env[n] = graph.node_copy(n, lambda a: env[a])
            return env[n]

        graph.output(copy(fx_node))
        called = fx_node  # an item of a multi-output op is named by that op (an attention, not its getitem)
        while called.target is operator.getitem and called.args[0] in self._deferred:
            called = called.args[0]
        node = Node(_where(called), tuple(sources), None, program=fx.GraphModule(root, graph).eval(),
                    what=_describe(called, self.modules), input_shapes=tuple(shapes), keeps_all=True)
        if self._positionwise(node, fx_node):  # an activation outside the table: its channels pass through
            node.variables, node.axis, node.keeps_all = self.variables(sources[0]), self._axis(sources[0]), False
        else:
            for source in sources:  # what it reads is kept whole
                if self.variables(source) is not None:
                    self._fixed.append(self.variables(source))
        return self._append(node)

    def _positionwise(self, node: Node, fx_node: fx.Node) -> bool:
        """Whether an op outside the registry computes each position of its one input alone (LeakyReLU, ELU, Mish,
        Softplus, ...: :func:`~pyro_bc.bcz.program.is_positionwise` of its core ATen program), into an output of
        the input's shape: then it computes the same on the kept channels alone."""
        meta = fx_node.meta.get("tensor_meta")
        if len(node.input_shapes) != 1 or not isinstance(meta, TensorMetadata) or \
                tuple(meta.shape) != tuple(node.input_shapes[0][0]):
            return False
        try:
            return is_positionwise(self.exported(node))
        except ConfigError:  # said where the file is written, as for any op that does not export
            return False

    def exported(self, node: Node) -> Program:
        """An op outside the registry (``node.program``) lowered to core ATen operators, once per node."""
        if node.exported is None:
            generator = torch.Generator().manual_seed(0)
            examples = tuple(_example((2, *shape[1:]), dtype, generator) for shape, dtype in node.input_shapes)
            try:
                node.exported = export_program(node.program, examples)
            except Exception as e:  # noqa: BLE001  (whatever torch.export meets in a user's code is reported)
                later = next((shape for shape, _ in node.input_shapes if not shape or shape[0] != 1), None)
                hint = "" if later is None else (f"; it reads a tensor of shape {tuple(later)} for one example, whose "
                                                 "first dimension is not the batch: pyro-bc needs the batch first "
                                                 "(batch_first=True for PyTorch's transformer layers)")
                raise ConfigError(f"cannot compress {node.name}: {node.what} does not export to core ATen "
                                  f"operators with a free batch size ({type(e).__name__}: {first_line(e)}){hint}")
        return node.exported

    def _bind(self, source: int, axis: int = 1) -> torch.Tensor:
        """The variables of ``source``'s output, made up (all kept, along ``axis``) where an op outside the
        registry left its positions unnamed and an op that names them reads it."""
        if source == NETWORK_INPUT or self.nodes[source].variables is not None:
            return self.variables(source)
        node = self.nodes[source]
        node.variables, node.axis, node.bound = self._variables.new(self._shapes[source][axis]), axis, True
        self._fixed.append(node.variables)
        return node.variables

    def _finish(self, n_layers: int) -> None:
        """Each layer's node, and the variables renumbered by their representatives."""
        found = {node.layer: i for i, node in enumerate(self.nodes) if node.layer is not None}
        if set(found) != set(range(n_layers)):
            raise ConfigError("some Bayesian layers are not called in the network's forward")
        self.layer_nodes = [self.nodes[found[i]] for i in range(n_layers)]
        roots = self._variables.roots()
        self.input_variables = roots[self.input_variables]
        for node in self.nodes:
            node.variables = None if node.variables is None else roots[node.variables]
            node.reads = None if node.reads is None else roots[node.reads]
        self._fixed = [roots[v] for v in self._fixed]
        self.n_variables = int(roots.max()) + 1

    @classmethod
    def chain(cls, posts: list[LayerPosterior]) -> BodyGraph:
        """The graph of a plain sequence of layers without a network: each layer reads the one before it, through
        a flatten where it reads a multiple of that layer's outputs (each channel owning consecutive positions)."""
        graph = cls.__new__(cls)
        graph._start()
        groups = [post.conv_args[3] if post.conv_args else 1 for post in posts]
        graph.input_variables = graph._variables.new(posts[0].mean.shape[1] * groups[0])
        source = NETWORK_INPUT
        for i, post in enumerate(posts):
            inputs, reads = graph.variables(source), post.mean.shape[1] * groups[i]
            if reads != len(inputs):
                if reads % len(inputs):
                    raise ConfigError(f"{post.name} has {reads} inputs, not a multiple of {posts[i - 1].name}'s "
                                      f"{len(inputs)} outputs: the body is not a plain sequence")
                repeat = reads // len(inputs)
                source = graph._append(Node(f"{post.name}.flatten", (source,), inputs.repeat_interleave(repeat),
                                            op=Op("flatten", {"start_dim": 1}), repeat=repeat))
                inputs = graph.variables(source)
            depthwise = groups[i] > 1 and groups[i] == reads == post.mean.shape[0]
            outputs = inputs if depthwise else graph._variables.new(post.mean.shape[0])
            source = graph._append(Node(post.name, (source,), outputs, layer=i, depthwise=depthwise,
                                        grouped=groups[i] > 1 and not depthwise, reads=inputs))
        graph._finish(len(posts))
        return graph

    # -- tracing ---------------------------------------------------------------------------------

    def _is_shape_op(self, fx_node: fx.Node, position: dict[fx.Node, int]) -> bool:
        """Whether ``fx_node`` only moves the positions of one tensor whose channels run along dim 1 (a reshape,
        transpose, chunk, or an item of a chunk)."""
        if fx_node.op == "call_method":
            moves = fx_node.target in _SHAPE_METHODS and fx_node.target != "contiguous" or \
                fx_node.target == "contiguous" and fx_node.args[0] in self._pending
        elif fx_node.op == "call_function":
            moves = fx_node.target in _SHAPE_FUNCTIONS or fx_node.target is operator.getitem and (
                fx_node.args[0] in self._pending or fx_node.args[0] in position)
        else:
            moves = False
        if not moves or len(self._bases(fx_node, position)) != 1:
            return False
        for a in fx_node.all_input_nodes:
            if "concrete" in a.meta or a in self._pending:
                continue
            if a not in position:
                return False
            if self.variables(position[a]) is None or self._axis(position[a]) != 1:
                return False
        return True

    def _bases(self, fx_node: fx.Node, position: dict[fx.Node, int]) -> set[int | None]:
        """The nodes whose positions a shape op moves (None for a tensor that is no node)."""
        return {self._pending[a][0] if a in self._pending else position.get(a) for a in fx_node.all_input_nodes
                if "concrete" not in a.meta}

    def _shape_op(self, fx_node: fx.Node, position: dict[fx.Node, int]) -> tuple[int, object]:
        """A reshape, transpose, chunk, ... applied to the positions of the one tensor it moves: each position of
        that tensor's output carries ``channel * P + spatial index`` (``P`` positions per channel)."""
        (base,) = self._bases(fx_node, position)

        def value(a: fx.Node):
            if "concrete" in a.meta:
                return a.meta["concrete"]
            if a in self._pending:
                return self._pending[a][1]
            shape = _shape(a)
            spatial = math.prod(shape[2:])
            return (torch.arange(shape[1]).reshape(-1, *[1] * (len(shape) - 2)) * spatial +
                    torch.arange(spatial).reshape(1, *shape[2:])).reshape(1, *shape[1:])

        args, kwargs = fx.node.map_arg((fx_node.args, fx_node.kwargs), value)
        if fx_node.op == "call_method":
            return base, getattr(args[0], fx_node.target)(*args[1:], **kwargs)
        return base, fx_node.target(*args, **kwargs)

    def _resolve(self, fx_node: fx.Node, position: dict[fx.Node, int]) -> None:
        """Every pending shape op ``fx_node`` reads becomes a node: a ``gather`` of its base's positions along
        dimension 1, where it only reorders or selects whole channels (a channel shuffle, a chunk)."""
        for a in fx_node.all_input_nodes:
            if a not in self._pending:
                continue
            base, moved = self._pending.pop(a)
            index = _channel_gather(moved, self._shapes[base])
            inputs, node = self.variables(base), None
            if index is not None and torch.equal(index, torch.arange(len(inputs))):
                position[a] = base
                continue
            if index is not None:
                node = Node(str(a.name), (base,), inputs[index], op=Op("gather", {"index": index.tolist()}))
            elif _flattens(moved, self._shapes[base]):  # x.view(len(x), -1): a flatten from dim 1
                repeat = math.prod(self._shapes[base][2:])
                node = Node(str(a.name), (base,), inputs.repeat_interleave(repeat), op=Op("flatten", {"start_dim": 1}),
                            repeat=repeat)
            position[a] = self._opaque(a, position) if node is None else self._append(node)
            self._shapes[position[a]] = _shape(a)

    def variables(self, source: int) -> torch.Tensor | None:
        """The variables of a node's output (or the network input's); None where no op has named them."""
        return self.input_variables if source == NETWORK_INPUT else self.nodes[source].variables

    def _axis(self, source: int) -> int:
        """The dimension the variables of a node's output run along (1 where no op has named them)."""
        return 1 if source == NETWORK_INPUT or self.nodes[source].variables is None else self.nodes[source].axis

    def layer_variables(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The variables of a layer's input positions and of its output positions."""
        node = self.layer_nodes[layer]
        return node.reads, node.variables

    def is_depthwise(self, layer: int) -> bool:
        return self.layer_nodes[layer].depthwise

    def _append(self, node: Node) -> int:
        self.nodes.append(node)
        return len(self.nodes) - 1

    def _add(self, fx_node: fx.Node, position: dict[fx.Node, int]) -> int:
        """Add one traced node; returns the node index its output is (an earlier one for aliases)."""
        sizes = any("concrete" in a.meta for a in fx_node.all_input_nodes)  # an op on tensors and sizes at once
        sources = [position[a] for a in fx_node.all_input_nodes if "concrete" not in a.meta]
        if fx_node.op == "call_module":
            module = self.modules[fx_node.target]
            if fx_node.target in self.layer_index:
                return self._add_layer(fx_node, module, sources[0])
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                return self._fold_target(fx_node, module, sources[0], position)
            if kind_of(module) is not None and not padding_stored(module):  # reflect, circular: computed as traced
                return self._opaque(fx_node, position)
            if kind_of(module) is not None or isinstance(module, nn.LayerNorm):
                return self._add_deterministic(fx_node, module, sources[0])
            if isinstance(module, _PASS_THROUGH):
                return sources[0]
            op = module_op(module)
        elif fx_node.op == "call_function" and _identity_in_eval(fx_node):
            return sources[0]
        elif sizes:
            op = None
        elif fx_node.op == "call_function":
            kind = elementwise_of_function(fx_node.target, fx_node.kwargs) or _FUNCTION_OPS.get(fx_node.target)
            op = None if kind is None else self._function_op(kind, fx_node)
        elif fx_node.op == "call_method" and fx_node.target == "contiguous":
            return sources[0]
        elif fx_node.op == "call_method":
            kind = elementwise_of_method(fx_node.target) or _METHOD_OPS.get(fx_node.target)
            op = None if kind is None else self._function_op(kind, fx_node)
        else:
            op = None
        if op is not None and op.kind == "identity":
            return sources[0]
        node = None if op is None else self._op_node(fx_node, op, sources)
        return self._opaque(fx_node, position) if node is None else self._append(node)

    def _function_op(self, kind: str, fx_node: fx.Node) -> Op | None:
        args, kwargs = fx_node.args, fx_node.kwargs
        if kind == "add":
            ok = len(args) == 2 and all(isinstance(a, fx.Node) for a in args) and not kwargs and \
                args[0] is not args[1] and _shape(args[0]) == _shape(args[1])  # x + x is one input, not two
            return Op("add") if ok else None
        if kind == "mul":  # x * s with s one value per channel (or x's shape): their channels are coupled
            if len(args) != 2 or kwargs or not all(isinstance(a, fx.Node) for a in args) or args[0] is args[1]:
                return None
            shapes = sorted((_shape(a) for a in args), key=math.prod)
            small, big = shapes
            per_channel = len(big) == len(small) >= 2 and big[:2] == small[:2] and all(d == 1 for d in small[2:])
            return Op("mul") if per_channel or big == small else None
        if kind == "adaptive_avgpool2d":
            size = args[1] if len(args) > 1 else kwargs.get("output_size")
            return Op(kind, {"output_size": size}) if size is not None and len(fx_node.all_input_nodes) == 1 else None
        if kind in _POOL_ARGS:
            names = _POOL_ARGS[kind]
            given = {**{name: default for name, default in names}, **dict(zip((n for n, _ in names), args[1:])),
                     **kwargs}
            module = (nn.MaxPool2d if kind == "maxpool2d" else nn.AvgPool2d)(**given)
            return module_op(module) if len(fx_node.all_input_nodes) == 1 else None
        if kind == "mean":
            dims = args[1] if len(args) > 1 else kwargs.get("dim")
            rank = len(_shape(fx_node.all_input_nodes[0]))
            spatial = dims is not None and rank == 4 and sorted(d % rank for d in (
                [dims] if isinstance(dims, int) else dims)) == [2, 3]
            keepdim = (args[2] if len(args) > 2 else kwargs.get("keepdim", False))
            if not spatial or len(fx_node.all_input_nodes) != 1 or kwargs.keys() - {"dim", "keepdim"}:
                return None
            return Op("adaptive_avgpool2d", {"output_size": 1}) if keepdim else Op("spatial_mean")
        if kind == "cat":
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            if len(fx_node.all_input_nodes) == 1 and isinstance(args[0], (list, tuple)) and len(args[0]) == 1:
                return Op("identity")  # a concatenation of one tensor is that tensor
            return Op("cat") if dim in (1, 1 - len(_shape(fx_node))) else None
        if kind == "flatten":
            start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
            end = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
            return Op("flatten", {"start_dim": start}) if start == 1 and end == -1 else None
        return Op(kind) if len(fx_node.all_input_nodes) == 1 else None

    def _op_node(self, fx_node: fx.Node, op: Op, sources: list[int]) -> Node | None:
        """The node of a registered op; None where its inputs' channels do not run along dim 1 as it needs."""
        given = [self.variables(s) for s in sources]
        axes = {self._axis(s) for s, v in zip(sources, given) if v is not None}
        if op.kind in ELEMENTWISE_KINDS and given[0] is None:  # positions still unnamed: so are its outputs
            return Node(str(fx_node.name), tuple(sources), None, op=op)
        positional = op.kind in ELEMENTWISE_KINDS + ("add", "mul")  # it acts position by position
        if len(axes) > 1 or not positional and axes - {1}:
            return None  # features last (a token sequence) read by an op that names channels along dim 1
        axis = axes.pop() if axes else 1
        inputs = [self._bind(s, axis) for s in sources]
        repeat = 1
        if op.kind in ("add", "mul"):
            self._variables.unite(inputs[0], inputs[1])
            variables = inputs[0]
        elif op.kind == "cat":
            variables = torch.cat(inputs)
        elif op.kind == "flatten":
            shape = _shape(fx_node.all_input_nodes[0])
            if op.params["start_dim"] != 1 and len(shape) > 2:
                raise ConfigError(f"{fx_node.target}: only flattening from dim 1 is supported")
            repeat = math.prod(shape[2:])
            variables = inputs[0].repeat_interleave(repeat)
        else:
            variables = inputs[0]
        return Node(str(fx_node.name), tuple(sources), variables, op=op, repeat=repeat, axis=axis)

    def _add_layer(self, fx_node: fx.Node, module: nn.Module, source: int) -> int:
        index = self.layer_index[fx_node.target]
        if any(node.layer == index for node in self.nodes):
            raise ConfigError(f"layer {fx_node.target} is called more than once: shared layers are not supported")
        conv = kind_of(module).is_conv
        last = not conv and len(_shape(fx_node)) > 2  # a linear layer over the features of a token sequence
        axis, whole = -1 if last else 1, False
        reads = self.variables(source)
        if reads is None:
            reads = self._bind(source, axis)
        elif last != (self._axis(source) == -1):  # positions it cannot name
            self._fixed.append(reads)  # so it reads them all
            reads, whole = self._variables.new(module.in_channels if conv else module.in_features), True
            self._fixed.append(reads)
        if not conv or module.groups == 1:
            outputs = self._variables.new(module.out_channels if conv else module.out_features)
        elif module.groups == module.in_channels == module.out_channels:
            outputs = reads  # depthwise: output channel c reads input channel c only
        else:  # grouped: every channel in and out is kept (see prune)
            outputs = self._variables.new(module.out_channels)
        depthwise = conv and module.groups == module.in_channels == module.out_channels > 1
        grouped = conv and module.groups > 1 and not depthwise
        return self._append(Node(fx_node.target, (source,), outputs, layer=index, depthwise=depthwise,
                                 grouped=grouped, axis=axis, reads=reads, reads_last_axis=last, reads_whole=whole))

    def _add_deterministic(self, fx_node: fx.Node, module: nn.Module, source: int) -> int:
        """A module the network keeps deterministic: a plain layer (new output variables; it keeps every channel it
        reads and writes) or a LayerNorm (its input's variables; all kept where it normalises across them)."""
        inputs, rank = self.variables(source), len(_shape(fx_node))
        axis = self._axis(source)
        if isinstance(module, nn.LayerNorm):  # it normalises over the last dimensions
            across = axis == -1 or len(module.normalized_shape) >= rank - 1
            return self._append(Node(str(fx_node.target), (source,), inputs, module=module, keeps_all=across,
                                     axis=axis))
        axis = -1 if not kind_of(module).is_conv and rank > 2 else 1
        outputs = self._variables.new(_shape(fx_node)[axis])
        return self._append(Node(str(fx_node.target), (source,), outputs, module=module, keeps_all=True, axis=axis))

    def _batchnorm_called(self, fx_node: fx.Node) -> tuple[str, nn.Module] | None:
        """``F.batch_norm`` in eval mode on a module's running statistics and affine parameters, as the forward of a
        BatchNorm subclass computes it (timm's ``BatchNormAct2d``, traced into: :func:`is_batchnorm`): that module's
        path and a BatchNorm holding those tensors, which folds as the module would; else None."""
        if fx_node.op != "call_function" or fx_node.target is not F.batch_norm or \
                not isinstance(fx_node.args[0] if fx_node.args else None, fx.Node):
            return None
        signature = inspect.signature(F.batch_norm)
        try:
            bound = signature.bind(*fx_node.args, **fx_node.kwargs)
        except TypeError:
            return None
        bound.apply_defaults()
        tensors = [bound.arguments[k] for k in ("running_mean", "running_var", "weight", "bias")]
        if bound.arguments["training"] is not False or tensors[0] is None or tensors[1] is None or \
                any(t is not None and not (isinstance(t, fx.Node) and t.op == "get_attr") for t in tensors):
            return None
        mean, var, weight, bias = (None if t is None else functools.reduce(getattr, t.target.split("."), self._traced)
                                   for t in tensors)
        norm = nn.BatchNorm1d(len(mean), eps=float(bound.arguments["eps"]), affine=False).eval()
        norm.running_mean, norm.running_var = mean.detach().clone(), var.detach().clone()
        for key, value in (("weight", weight), ("bias", bias)):
            if value is not None:
                setattr(norm, key, nn.Parameter(value.detach().clone(), requires_grad=False))
        return tensors[0].target.rpartition(".")[0], norm

    def _fold_target(self, fx_node: fx.Node, module: nn.Module, source: int, position: dict[fx.Node, int],
                     name: str | None = None) -> int:
        """BatchNorm right after a layer that feeds nothing else is folded into it: returns the layer's node.
        Elsewhere (after a concatenation, pre-activation) it stays, as a per-channel scale and shift node over
        images, or as an op outside the registry. ``name``: the BatchNorm's path (default: the module called)."""
        name = str(fx_node.target) if name is None else name
        if module.running_mean is None:
            raise ConfigError(f"cannot compress {fx_node.target}: BatchNorm must track running statistics")
        producer = fx_node.all_input_nodes[0]
        layer = self.nodes[source].layer if source != NETWORK_INPUT else None
        if layer is None or len(producer.users) != 1 or layer in self.batchnorm:
            if len(_shape(fx_node)) != 4 or self._axis(source) != 1:
                return self._opaque(fx_node, position)
            with torch.no_grad():
                scale = torch.rsqrt(module.running_var.double().cpu() + module.eps)
                if module.weight is not None:
                    scale = scale * module.weight.double().cpu()
                shift = -module.running_mean.double().cpu() * scale
                if module.bias is not None:
                    shift = shift + module.bias.double().cpu()
            return self._append(Node(name, (source,), self._bind(source), affine=(scale, shift)))
        self.batchnorm[layer] = module
        self.batchnorm_names[layer] = name
        return source

    def _check_output(self, fx_node: fx.Node, position: dict[fx.Node, int]) -> None:
        result = fx_node.args[0]
        if not isinstance(result, fx.Node) or position[result] != len(self.nodes) - 1:
            raise ConfigError("the network's output must be one tensor, the last one computed")

    # -- BatchNorm -------------------------------------------------------------------------------

    @torch.no_grad()
    def fold_batchnorm(self, posts: list[LayerPosterior]) -> list[LayerPosterior]:
        """Each layer followed by eval-mode BatchNorm with ``scale = gamma / sqrt(running_var + eps)``: ``E[w]``
        times ``scale``, ``Var[w]`` times ``scale^2``, bias ``(b - running_mean) scale + beta`` per output."""
        out = list(posts)
        for i, bn in self.batchnorm.items():
            post = posts[i]
            scale = torch.rsqrt(bn.running_var.double().cpu() + bn.eps)
            shift = torch.zeros_like(scale) if bn.bias is None else bn.bias.double().cpu()
            if bn.weight is not None:
                scale = scale * bn.weight.double().cpu()
            along = scale.reshape((-1,) + (1,) * (post.mean.dim() - 1))
            bias = (post.bias.double() - bn.running_mean.double().cpu()) * scale + shift
            out[i] = dataclasses.replace(post, mean=(post.mean.double() * along).to(post.mean.dtype),
                                         var=(post.var.double() * along**2).to(post.var.dtype),
                                         bias=bias.to(post.bias.dtype))
        return out

    # -- pruning ---------------------------------------------------------------------------------

    def prune(self, posts: list[LayerPosterior], thresholds: list[float]) -> list[PrunedLayer]:
        """Masks from per-layer thresholds on log alpha, with channel variables kept or removed together (see
        the module's docstring); each layer keeps the positions of its variables that stay."""
        check_thresholds(posts, thresholds)
        own = [torch.ones_like(p.mean, dtype=torch.bool) if self.layer_nodes[i].grouped else _own_mask(p, t)
               for i, (p, t) in enumerate(zip(posts, thresholds))]
        fixed = torch.zeros(self.n_variables, dtype=torch.bool)
        fixed[self.input_variables] = True  # the network's input, its output and any other tensor that nothing reads
        read = {source for node in self.nodes for source in node.inputs}
        for i, node in enumerate(self.nodes):  # (one computed by an op outside the registry names no channels)
            if i not in read and node.variables is not None:
                fixed[node.variables] = True
        for i in range(len(posts)):  # a grouped convolution keeps every channel it reads and writes
            if self.layer_nodes[i].grouped:
                for variables in self.layer_variables(i):
                    fixed[variables] = True
        for node in self.nodes:  # so does a deterministic module that mixes channels, and an op outside the registry
            if node.keeps_all:
                for variables in [node.variables, *(self.variables(source) for source in node.inputs)]:
                    if variables is not None:
                        fixed[variables] = True
        for variables in self._fixed:  # positions only such an op names
            fixed[variables] = True
        alive = torch.ones_like(fixed)
        while True:
            masks = [self._restrict(i, post, m, alive) for i, (post, m) in enumerate(zip(posts, own))]
            produced, used = fixed.clone(), fixed.clone()
            for i, m in enumerate(masks):
                inputs, outputs = self.layer_variables(i)
                produced[outputs[_any_except(m, 0)]] = True
                if not self.is_depthwise(i) and not self.layer_nodes[i].grouped:
                    used[inputs[_any_except(m, 1)]] = True
            now = alive & produced & used | fixed
            if torch.equal(now, alive):
                break
            alive = now
        layers = []
        for i, (post, t, m) in enumerate(zip(posts, thresholds, masks)):
            inputs, outputs = self.layer_variables(i)
            keep_out = alive[outputs]
            node = self.layer_nodes[i]
            if node.grouped or node.reads_whole:
                keep_in = torch.ones(m.shape[1], dtype=torch.bool)
            elif node.reads_last_axis:  # every kept feature of the sequence: no selection along its last axis
                keep_in = alive[inputs]
            else:
                keep_in = keep_out if self.is_depthwise(i) else alive[inputs] & _any_except(m, 1)
            layers.append(PrunedLayer(post, float(t), keep_in, keep_out, m))
        return layers

    def _restrict(self, i: int, post: LayerPosterior, mask: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
        inputs, outputs = self.layer_variables(i)
        if self.layer_nodes[i].grouped:
            return mask
        if self.is_depthwise(i):
            return mask & alive[outputs].reshape(-1, 1, 1, 1)
        return mask & _outer(post, alive[outputs], alive[inputs])

    def kept_positions(self, layers: list[PrunedLayer]) -> list[torch.Tensor | None]:
        """Bool over the variables' axis of every node's output: the positions the compressed network computes
        (None: all, where no op names them)."""
        kept: list[torch.Tensor | None] = []
        every = torch.ones(len(self.input_variables), dtype=torch.bool)
        for node in self.nodes:
            inputs = [every if s == NETWORK_INPUT else kept[s] for s in node.inputs]
            if node.variables is None:  # positions no op names: all of them
                kept.append(None)
            elif node.layer is not None:
                kept.append(layers[node.layer].keep_out)
            elif node.bound or node.module is not None and kind_of(node.module) is not None:  # all its outputs
                kept.append(torch.ones(len(node.variables), dtype=torch.bool))
            elif node.op is not None and node.op.kind == "cat":
                kept.append(torch.cat(inputs))
            elif node.op is not None and node.op.kind == "gather":
                kept.append(inputs[0][torch.tensor(node.op.params["index"])])
            else:
                kept.append(inputs[0].repeat_interleave(node.repeat))
        return kept


def _identity_in_eval(fx_node: fx.Node) -> bool:
    """Whether a function call is the identity because it was traced with ``training=False`` (dropout and
    stochastic depth in eval mode, e.g. ``F.dropout(x, p, training=self.training)``)."""
    name = getattr(fx_node.target, "__name__", "")
    if "dropout" not in name and name != "stochastic_depth":
        return False
    try:
        bound = inspect.signature(fx_node.target).bind(*fx_node.args, **fx_node.kwargs)
    except (TypeError, ValueError):  # no signature, or not these arguments
        return False
    return bound.arguments.get("training", True) is False and len(fx_node.all_input_nodes) == 1


class _ShapeProp(ShapeProp):
    """ShapeProp that also keeps what non-tensor nodes compute (``x.size()`` and arithmetic on sizes) as
    ``meta["concrete"]``, and marks the tensor nodes that depend on no input that way too."""

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        if n.op != "placeholder" and not isinstance(result, torch.Tensor) and not (
                isinstance(result, (tuple, list)) and any(isinstance(r, torch.Tensor) for r in result)):
            n.meta["concrete"] = result
        return result


_BATCH_FIRST = "pyro_bc_batch_first"  # node meta: whether a tensor's first dimension is the batch


class _BatchFirst(fx.Interpreter):
    """Run at a batch of two after :class:`_ShapeProp` ran at one: marks each tensor node whose first dimension
    is the batch (its size 1, then 2) as ``meta[_BATCH_FIRST]``."""

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        one = n.meta.get("tensor_meta")
        n.meta[_BATCH_FIRST] = isinstance(result, torch.Tensor) and isinstance(one, TensorMetadata) and \
            result.dim() > 0 and len(one.shape) > 0 and one.shape[0] == 1 and result.shape[0] == 2
        return result


_SHAPE_METHODS = {"view", "reshape", "transpose", "permute", "movedim", "moveaxis", "chunk", "split", "contiguous",
                  "unsqueeze", "squeeze"}
_SHAPE_FUNCTIONS = {torch.reshape, torch.transpose, torch.permute, torch.movedim, torch.moveaxis, torch.chunk,
                    torch.split, torch.squeeze, torch.unsqueeze}




def _channel_gather(moved, base_shape: tuple[int, ...]) -> torch.Tensor | None:
    """The channel of the base that each channel of ``moved`` (positions ``channel * P + spatial index``) is, where
    each of its channels is one whole channel of the base with its positions in place; else None."""
    if not isinstance(moved, torch.Tensor) or moved.dim() != len(base_shape) or moved.shape[2:] != base_shape[2:]:
        return None
    spatial = math.prod(base_shape[2:])
    flat = moved.reshape(moved.shape[1], spatial)
    channels, places = flat // spatial, flat % spatial
    if not torch.equal(places, torch.arange(spatial).expand_as(places)) or \
            not bool((channels == channels[:, :1]).all()):
        return None
    return channels[:, 0]


def _describe(fx_node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """What a traced node calls, in words: the module, function or tensor method."""
    if fx_node.op == "call_module":
        return f"the module {type(modules[fx_node.target]).__name__}"
    if fx_node.op == "call_method":
        return f"the tensor method .{fx_node.target}()"
    return f"the function {getattr(fx_node.target, '__name__', fx_node.target)}"


def _example(shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """An example input for torch.export: standard normals, or for a mask or an index, values that are valid."""
    values = torch.randn(shape, generator=generator)
    return values.to(dtype) if dtype.is_floating_point else (values > 0).to(dtype)


def _flattens(moved, base_shape: tuple[int, ...]) -> bool:
    """Whether ``moved`` holds the base's positions flattened from dim 1, in order (``x.view(len(x), -1)``)."""
    size = math.prod(base_shape[1:])
    return isinstance(moved, torch.Tensor) and tuple(moved.shape) == (1, size) and \
        torch.equal(moved.reshape(-1), torch.arange(size))


def _where(fx_node: fx.Node) -> str:
    """The user's module path a traced node belongs to (``features.3.block``), or the network itself."""
    if fx_node.op == "call_module":
        return str(fx_node.target)
    if fx_node.op == "get_attr":  # a parameter or buffer: its module's path
        return str(fx_node.target).rpartition(".")[0] or "the network"
    stack = fx_node.meta.get("nn_module_stack") or {}
    path = next(reversed(stack.values()), ("",))[0] if stack else ""
    return path or "the network's forward"


def _shape(fx_node: fx.Node) -> tuple[int, ...]:
    return tuple(fx_node.meta["tensor_meta"].shape)


def analyse_network(net: BayesianNet, posts: list[LayerPosterior], graph: BodyGraph | None = None
                    ) -> list[LayerPosterior]:
    """``posts`` (:func:`pyro_bc.compression.posterior.analyse`) with BatchNorm folded in (``graph``: ``net``'s, if built)."""
    return (graph or BodyGraph(net)).fold_batchnorm(posts)


def prune_network(net: BayesianNet, posts: list[LayerPosterior], thresholds: list[float],
                  input_means: list[torch.Tensor] | None, graph: BodyGraph | None = None) -> list[PrunedLayer]:
    """The pruning of ``net`` (:meth:`BodyGraph.prune` on ``graph``, ``net``'s graph built once by the caller that
    prunes many times, or here), then, given the layers' input means, :func:`pyro_bc.compression.posterior.fold_pruned_inputs`."""
    layers = (graph or BodyGraph(net)).prune(posts, thresholds)
    return layers if input_means is None else fold_pruned_inputs(layers, input_means)


def prune_chain(posts: list[LayerPosterior], thresholds: list[float]) -> list[PrunedLayer]:
    """The pruning of a plain sequence of layers given only their posteriors (:meth:`BodyGraph.chain`)."""
    return BodyGraph.chain(posts).prune(posts, thresholds)
