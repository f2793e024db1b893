"""Export a compressed network to ONNX (torch's TorchScript-based exporter) or to a ``torch.export``
program (``.pt2``), with the pruned layers' own shapes and a dynamic batch dimension."""

from __future__ import annotations

import copy
import io
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.onnx import symbolic_helper

from pyro_bc.atomic import atomic_write_bytes
from pyro_bc.bcz import codec
from pyro_bc.errors import ConfigError, first_line
from pyro_bc.nn.network import INTEGER_INPUTS

FORMATS = ("onnx", "pt2")
INPUT_NAME, OUTPUT_NAME, BATCH_DIM = "input", "output", "batch"
ONNX_OPSET = 17
EXAMPLE_BATCH = 2  # a batch of 1 would let the tracers specialise the batch dimension


class FixedAdaptiveAvgPool2d(nn.Module):
    """``nn.AdaptiveAvgPool2d`` for one input size, as two averaging matrices (``A_h x A_w^T`` per channel): the
    same numbers, in ops ONNX has for any sizes (its exporter refuses an output size that does not divide the
    input's, such as VGG's 7x7 pooling of a 2x2 map)."""

    def __init__(self, in_size: tuple[int, int], out_size: tuple[int, int]):
        super().__init__()
        self.register_buffer("rows", _averaging(in_size[0], out_size[0]))
        self.register_buffer("cols", _averaging(in_size[1], out_size[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(torch.matmul(self.rows, x), self.cols.t())


def _averaging(n_in: int, n_out: int) -> torch.Tensor:
    """Row ``i`` averages the input positions ``[floor(i n_in / n_out), ceil((i + 1) n_in / n_out))``, as
    adaptive pooling does."""
    matrix = torch.zeros(n_out, n_in)
    for i in range(n_out):
        start, stop = (i * n_in) // n_out, -(-((i + 1) * n_in) // n_out)
        matrix[i, start:stop] = 1.0 / (stop - start)
    return matrix


def _fixed_pools(module: nn.Module, example: torch.Tensor) -> nn.Module:
    """A copy of ``module`` with every ``nn.AdaptiveAvgPool2d`` replaced by its :class:`FixedAdaptiveAvgPool2d`
    for the input size it sees on ``example``."""
    module = copy.deepcopy(module)
    sizes: dict[str, tuple[int, int]] = {}
    pools = {name: m for name, m in module.named_modules() if isinstance(m, nn.AdaptiveAvgPool2d)}
    def record(name: str, x: torch.Tensor) -> None:
        sizes.setdefault(name, tuple(x.shape[-2:]))

    handles = [m.register_forward_pre_hook(lambda _m, args, name=name: record(name, args[0]))
               for name, m in pools.items()]
    with torch.no_grad():
        module(example)
    for handle in handles:
        handle.remove()
    for name, pool in pools.items():
        out = pool.output_size if isinstance(pool.output_size, tuple) else (pool.output_size,) * 2
        out = tuple(size if o is None else o for o, size in zip(out, sizes[name]))
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, child,
                FixedAdaptiveAvgPool2d(tuple(sizes[name]), out))
    return module


def _softmax(g, x, dim, _half_to_float):
    return g.op("Softmax", x, axis_i=symbolic_helper._get_const(dim, "i", "dim"))


def _to_copy(g, x, dtype, *_layout_device_and_format):
    if symbolic_helper._is_none(dtype):
        return g.op("Identity", x)
    scalar_type = symbolic_helper._type_utils.JitScalarType(symbolic_helper._get_const(dtype, "i", "dtype"))
    return g.op("Cast", x, to_i=scalar_type.onnx_type())


# core ATen operators a stored program may call (pyro_bc.bcz.program) that the TorchScript exporter has no symbolic
# for, each as the ONNX operator it is
CORE_SYMBOLICS = {"aten::_softmax": _softmax, "aten::_to_copy": _to_copy}


def _onnx_bytes(module: nn.Module, example: torch.Tensor) -> bytes:
    """The ONNX model of ``module`` (adaptive pools fixed to their sizes); its input and output have a dynamic
    first (batch) axis."""
    module = _fixed_pools(module, example)
    for name, symbolic in CORE_SYMBOLICS.items():
        torch.onnx.register_custom_op_symbolic(name, symbolic, ONNX_OPSET)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation notice: the new one needs onnxscript
        torch.onnx.export(module, (example,), buffer, dynamo=False, opset_version=ONNX_OPSET,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: BATCH_DIM}, OUTPUT_NAME: {0: BATCH_DIM}})
    return buffer.getvalue()


def _pt2_bytes(module: nn.Module, example: torch.Tensor) -> bytes:
    """The saved ``torch.export`` program of ``module``, with a dynamic batch dimension."""
    program = torch.export.export(module, (example,), dynamic_shapes=({0: torch.export.Dim(BATCH_DIM, min=1)},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def export_bytes(module: nn.Module, input_shape: Sequence[int], fmt: str,
                 input_dtype: torch.dtype | None = None) -> bytes:
    """``module`` (any ``nn.Module`` taking one ``(batch, *input_shape)`` tensor, of ``input_dtype`` where its inputs
    are integer ids, put in eval mode) as the bytes of an ``onnx`` or ``pt2`` file; ConfigError, on one line, if the
    exporter fails."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}: choose {', '.join(FORMATS)}")
    example = torch.zeros(EXAMPLE_BATCH, *input_shape, dtype=input_dtype or torch.get_default_dtype())
    try:
        return (_onnx_bytes if fmt == "onnx" else _pt2_bytes)(module.eval(), example)
    except Exception as exc:  # the exporters raise many types; one line naming the cause
        raise ConfigError(f"cannot export to {fmt}: {type(exc).__name__}: {first_line(exc)}") from exc


def export_module(module: nn.Module, input_shape: Sequence[int], out: str | os.PathLike[str], fmt: str,
                  input_dtype: torch.dtype | None = None) -> int:
    """Write :func:`export_bytes` of ``module`` to ``out``, atomically; returns the bytes written."""
    out = Path(out)
    if not out.parent.is_dir():
        raise ConfigError(f"output folder {out.parent} does not exist")
    data = export_bytes(module, input_shape, fmt, input_dtype)
    try:
        atomic_write_bytes(out, data)
    except OSError as exc:
        raise ConfigError(f"cannot write {out}: {exc.strerror or exc}") from exc
    return len(data)


def export_bcz(path: str | os.PathLike[str], out: str | os.PathLike[str], fmt: str) -> int:
    """Export the network of the ``.bcz`` file ``path`` (as :func:`pyro_bc.bcz.codec.load` rebuilds it) to ``out``."""
    model = codec.read_bcz(path)
    dtype = None if model.input_dtype is None else INTEGER_INPUTS[model.input_dtype]
    return export_module(codec.load(path), model.input_shape, out, fmt, dtype)
