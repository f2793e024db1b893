"""Deterministic computations the ``.bcz`` node vocabulary has no node for, stored in a standard op set: PyTorch's
core ATen operators (``torch.Tag.core``), as ``torch.export`` lowers any module to.

A :class:`Program` is a graph of such calls over its inputs and its constant tensors (a class token, a positional
embedding, a layer scale, an attention's projections). The writer gets it from ``torch.export`` with the batch
dimension symbolic (:func:`export_program`); the reader rebuilds it as a ``torch.fx`` graph
(:func:`program_module`) after :func:`check_program` has resolved every target among the core ATen operators and
the few Python operators that symbolic sizes use: nothing in a file names code outside that set, and every
argument is data (numbers, strings, dtypes, references to earlier values).
"""

from __future__ import annotations

import math
import operator
import re
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import fx, nn
from torch._decomp import get_decompositions

from pyro_bc.bcz.binary import BadData

MAX_PROGRAM_NODES = 1 << 16
MAX_RANK = 8
# Python operators torch.export leaves in a graph: arithmetic on symbolic sizes, items of a multi-output op
SIZE_OPERATORS = {name: getattr(operator, name) for name in ("add", "sub", "mul", "floordiv", "mod", "neg", "getitem")}
# dtypes a constant or an argument may name
DTYPES = {name: getattr(torch, name) for name in ("float32", "float64", "float16", "bfloat16", "int64", "int32",
                                                  "int16", "int8", "uint8", "bool")}
# Core ATen factories whose shape a program may compute from an input's sizes (an RNN's initial state, one per
# example), by the torch function of the same signature: an exporter that traces (ONNX's) records the sizes it is
# given as computed only through these; the operator itself would fix the batch it was traced at.
SIZED_FACTORIES = {torch.ops.aten.full.default: torch.full, torch.ops.aten.empty.memory_format: torch.empty,
                   torch.ops.aten.arange.default: torch.arange, torch.ops.aten.arange.start_step: torch.arange}
CONSTANT_DTYPES = ("float32", "int64", "bool")  # what a program's constant tensors hold (floats stored as float32)
LAYOUTS = {"strided": torch.strided}
MEMORY_FORMATS = {name: getattr(torch, name) for name in ("contiguous_format", "preserve_format", "channels_last")}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,99}")


@dataclass
class Program:
    """Calls of core ATen operators. Values are numbered: the inputs ``0 .. n_inputs - 1``, then the constants,
    then one per node; a node is ``[target, args, kwargs]`` with ``target`` ``"aten.NAME.OVERLOAD"`` or
    ``"operator.NAME"`` and references to values written ``{"v": i}`` (JSON-able, see :func:`encode_value`).
    ``output``: the value the program returns."""

    n_inputs: int
    constants: list[np.ndarray]
    nodes: list[list[Any]]
    output: int


def encode_value(value: Any) -> Any:
    """An fx argument as JSON: numbers (non-finite floats as ``{"f": "inf"}``), strings, None, lists, references
    ``{"v": i}`` (a :class:`_Ref` from the writer), dtypes, layouts, memory formats and devices."""
    if isinstance(value, _Ref):
        return {"v": value.index}
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"f": repr(value)}
    if isinstance(value, (list, tuple)):
        return [encode_value(v) for v in value]
    if isinstance(value, torch.dtype):
        return {"dtype": next(k for k, v in DTYPES.items() if v == value)}
    if isinstance(value, torch.layout):
        return {"layout": next(k for k, v in LAYOUTS.items() if v == value)}
    if isinstance(value, torch.memory_format):
        return {"memory_format": next(k for k, v in MEMORY_FORMATS.items() if v == value)}
    if isinstance(value, torch.device):
        return {"device": "cpu"}  # the loaded module runs where it is moved; constants follow it
    raise BadData(f"an argument of type {type(value).__name__} cannot be stored")


class _Ref:
    """A reference to value ``index`` of the program being written."""

    def __init__(self, index: int):
        self.index = index


def _decode_value(value: Any, n_known: int, values: list, depth: int = 0) -> Any:
    """The fx argument a JSON value stands for; BadData on anything else (references must be earlier values)."""
    if depth > 8:
        raise BadData("program: an argument is nested more than 8 deep")
    if isinstance(value, bool) or value is None or isinstance(value, (int, float, str)):
        return value
    if isinstance(value, list):
        return [_decode_value(v, n_known, values, depth + 1) for v in value]
    if not isinstance(value, dict) or len(value) != 1:
        raise BadData(f"program: an argument {str(value)[:40]!r} is not a value")
    ((key, item),) = value.items()
    if key == "v":
        if not (isinstance(item, int) and not isinstance(item, bool) and 0 <= item < n_known):
            raise BadData(f"program: reference {item!r} is not an earlier value")
        return values[item]
    table = {"dtype": DTYPES, "layout": LAYOUTS, "memory_format": MEMORY_FORMATS, "device": {"cpu": torch.device("cpu")},
             "f": {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}}.get(key)
    if table is None or not isinstance(item, str) or item not in table:
        raise BadData(f"program: {key}={str(item)[:20]!r} is not a value this reader knows")
    return table[item]


def resolve_target(name: Any) -> Any:
    """The operator a node's target names: a core ATen operator or one of :data:`SIZE_OPERATORS`; BadData
    otherwise (the only place a file names code)."""
    if not isinstance(name, str):
        raise BadData("program: a target is not a string")
    package, _, rest = name.partition(".")
    if package == "operator" and rest in SIZE_OPERATORS:
        return SIZE_OPERATORS[rest]
    op_name, _, overload = rest.partition(".")
    if package == "aten" and _NAME.fullmatch(op_name) and _NAME.fullmatch(overload) and not op_name.startswith("__"):
        try:
            target = getattr(getattr(torch.ops.aten, op_name), overload)
        except (AttributeError, RuntimeError):
            target = None
        if isinstance(target, torch._ops.OpOverload) and torch.Tag.core in target.tags:
            return target
    raise BadData(f"program: {name[:60]!r} is not a core ATen operator")


def target_name(target: Any) -> str:
    """The name :func:`resolve_target` reads back for a graph's target."""
    if isinstance(target, torch._ops.OpOverload) and target.namespace == "aten":
        return f"aten.{target._opname}.{target._overloadname}"
    for name, op in SIZE_OPERATORS.items():
        if target is op:
            return f"operator.{name}"
    raise BadData(f"{getattr(target, '__name__', target)} is not a core ATen operator")


def is_positionwise(program: Program) -> bool:
    """Whether ``program`` computes each position of its one input alone, whatever the input's size: every call a
    deterministic core ATen operator tagged pointwise (an activation: ``leaky_relu``, ``elu``, ``where``, ``exp``),
    every constant a single value (not one per channel, as a ``PReLU(C)``'s slopes)."""
    def pointwise(target: Any) -> bool:
        return isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags and \
            torch.Tag.nondeterministic_seeded not in target.tags
    return program.n_inputs == 1 and all(c.size <= 1 for c in program.constants) and \
        all(pointwise(resolve_target(node[0])) for node in program.nodes)


def check_program(program: Program) -> None:
    """BadData unless every target, reference, constant and the output are valid (before anything is built)."""
    _build_graph(program)


def _build_graph(program: Program) -> tuple[fx.Graph, dict[str, torch.Tensor]]:
    if not 1 <= program.n_inputs <= 1 << 16 or len(program.nodes) > MAX_PROGRAM_NODES:
        raise BadData(f"program: {program.n_inputs} inputs and {len(program.nodes)} nodes (1 to 65536 each)")
    graph = fx.Graph()
    # the inputs in the layout torch.export assumed (a convolution may give channels-last ones)
    inputs = [graph.placeholder(f"input_{i}") for i in range(program.n_inputs)]
    values: list[Any] = [graph.call_method("contiguous", (placeholder,)) for placeholder in inputs]
    constants, sizes = {}, set()
    for i, array in enumerate(program.constants):
        if array.dtype.name not in CONSTANT_DTYPES or array.ndim > MAX_RANK:
            raise BadData(f"program: constant {i} is {array.dtype.name} of rank {array.ndim}")
        constants[f"constant_{i}"] = torch.from_numpy(np.array(array))
        values.append(graph.get_attr(f"constant_{i}"))
    for i, node in enumerate(program.nodes):
        if not (isinstance(node, list) and len(node) == 3 and isinstance(node[1], list) and isinstance(node[2], dict)):
            raise BadData(f"program: node {i} is not [target, args, kwargs]")
        target = resolve_target(node[0])
        if not all(isinstance(k, str) and _NAME.fullmatch(k) for k in node[2]):
            raise BadData(f"program: node {i} has a keyword that is not a name")
        args = tuple(_decode_value(a, len(values), values) for a in node[1])
        kwargs = {k: _decode_value(v, len(values), values) for k, v in node[2].items()}
        if target is torch.ops.aten.sym_size.int:  # sizes as tensor methods, which exporters that trace follow
            values.append(graph.call_method("size", args, kwargs))
            sizes.add(values[-1])
        elif target in SIZE_OPERATORS.values() and any(a in sizes for a in args):
            values.append(graph.call_function(target, args, kwargs))
            sizes.add(values[-1])
        elif _reads(args, sizes) and target in SIZED_FACTORIES:  # as torch's functions, which tracers follow too
            values.append(graph.call_function(SIZED_FACTORIES[target], args, kwargs))
        elif _reads(args, sizes) and hasattr(torch.Tensor, target._opname) and target._overloadname == "default":
            values.append(graph.call_method(target._opname, args, kwargs))
        else:
            values.append(graph.call_function(target, args, kwargs))
    if not (isinstance(program.output, int) and not isinstance(program.output, bool) and
            0 <= program.output < len(values)):
        raise BadData(f"program: output {program.output!r} is not a value")
    graph.output(values[program.output])
    if is_positionwise(program):  # its one input in any layout computes the same: no copy into torch's default one
        values[0].replace_all_uses_with(inputs[0])
        graph.erase_node(values[0])
    return graph, constants


def _reads(args: Any, sizes: set) -> bool:
    """Whether ``args`` (nested) refer to a size computed in the graph."""
    if isinstance(args, (list, tuple)):
        return any(_reads(a, sizes) for a in args)
    return args in sizes


def program_module(program: Program) -> nn.Module:
    """The torch module computing ``program``: an ``fx.GraphModule`` whose float constants are its (frozen)
    parameters, as a layer's weights are, and the others (indices, masks) its buffers."""
    graph, constants = _build_graph(program)
    root = nn.Module()
    for name, tensor in constants.items():
        if tensor.is_floating_point():
            root.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
        else:
            root.register_buffer(name, tensor)
    return fx.GraphModule(root, graph, class_name="Program").eval()


class _OnCopies(nn.Module):
    """``module`` run on copies of its inputs, so that an in-place op of its own (``masked_fill_`` on a mask it was
    given) changes none of them."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *inputs: torch.Tensor) -> Any:
        return self.module(*(x.clone() for x in inputs))


def _lowered(module: nn.Module, examples: tuple[torch.Tensor, ...], dims: Any) -> torch.export.ExportedProgram:
    """``module`` exported with the dynamic shapes ``dims`` (a free batch dimension) and decomposed to core ATen
    operators."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's own deprecation notices, one per export
        exported = torch.export.export(module, examples, dynamic_shapes=dims, strict=False).run_decompositions()
        for _ in range(4):  # torch's own decompositions of what the default table leaves outside the core set
            outside = get_decompositions([n.target for n in exported.graph.nodes if n.op == "call_function" and
                                          isinstance(n.target, torch._ops.OpOverload) and torch.Tag.core not in
                                          n.target.tags])
            if not outside:
                break
            exported = exported.run_decompositions({**torch.export.default_decompositions(), **outside})
    return exported


def export_program(module: nn.Module, examples: tuple[torch.Tensor, ...]) -> Program:
    """``module`` (deterministic, in eval mode) lowered by ``torch.export`` to core ATen operators, with dim 0 of
    every input (the batch) symbolic; ``examples``: inputs of the right shapes with a batch of at least 2. What
    depends on no input (an attention mask built from sizes, a bias gathered from its table) is computed here and
    stored as a constant, where that is not larger than the tensors it is computed from (at most 2^16 values where it
    reads none)."""
    dims = tuple({0: torch.export.Dim.AUTO} for _ in examples)
    exported = _lowered(module, examples, dims)
    if any(spec.kind == torch.export.graph_signature.OutputKind.USER_INPUT_MUTATION
           for spec in exported.graph_signature.output_specs):  # an in-place op on an input: the input would be an output
        exported = _lowered(_OnCopies(module), examples, {"inputs": dims})
    specs = {spec.arg.name: spec for spec in exported.graph_signature.input_specs}
    state = {**exported.state_dict, **exported.constants}
    inputs = [n for n in exported.graph.nodes if n.op == "placeholder"
              and specs[n.name].kind == torch.export.graph_signature.InputKind.USER_INPUT]
    known = {n: state[specs[n.name].target].detach().cpu() for n in exported.graph.nodes
             if n.op == "placeholder" and n not in inputs}
    calls = [n for n in exported.graph.nodes if n.op == "call_function"]
    with torch.no_grad():
        for node in calls:
            if all(a in known for a in node.all_input_nodes) and torch.Tag.nondeterministic_seeded not in getattr(
                    node.target, "tags", ()):
                args, kwargs = fx.node.map_arg((node.args, node.kwargs), known.__getitem__)
                value = node.target(*args, **kwargs)
                read = [known[a] for a in node.all_input_nodes if isinstance(known[a], torch.Tensor)]
                if _tensors(value) and _size(value) <= (sum(map(_size, read)) if read else 1 << 16):
                    known[node] = value
    (result,) = next(n for n in exported.graph.nodes if n.op == "output").args[0]
    needed = _ancestors(result)  # not the metadata assertions export leaves beside the computation
    computed = [n for n in calls if n not in known and n in needed]
    read = {a for n in computed for a in n.all_input_nodes} | {result}
    stored = [n for n in known if n in read]  # tensors (a tuple is read only by its items, known too)
    index = {n: i for i, n in enumerate(inputs + stored + computed)}
    nodes = []
    for node in computed:
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: _Ref(index[n]))
        nodes.append([target_name(node.target), encode_value(list(args)), {k: encode_value(v) for k, v in kwargs.items()}])
    program = Program(len(inputs), [_constant_array(known[n]) for n in stored], nodes, index[result])
    check_program(program)
    return program


def _ancestors(node: fx.Node) -> set[fx.Node]:
    """``node`` and every node it is computed from."""
    seen, stack = {node}, [node]
    while stack:
        for a in stack.pop().all_input_nodes:
            if a not in seen:
                seen.add(a)
                stack.append(a)
    return seen


def _tensors(value: Any) -> bool:
    """Whether ``value`` is a tensor or a tuple or list of them (what a constant, or an item of one, can be)."""
    return isinstance(value, torch.Tensor) or isinstance(value, (tuple, list)) and all(map(_tensors, value))


def _size(value: torch.Tensor | tuple | list) -> int:
    """Values in a tensor or a tuple or list of them."""
    return value.numel() if isinstance(value, torch.Tensor) else sum(map(_size, value))


def _constant_array(tensor: torch.Tensor) -> np.ndarray:
    """A constant as a numpy array of one of :data:`CONSTANT_DTYPES` (floats at float32)."""
    if tensor.dtype.is_floating_point:
        return tensor.float().numpy()
    if tensor.dtype == torch.bool:
        return tensor.numpy()
    return tensor.long().numpy()
