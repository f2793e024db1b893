"""Export a compressed network to ONNX (torch's TorchScript-based exporter) or to a ``torch.export``
program (``.pt2``), with the pruned layers' own shapes and a dynamic batch dimension."""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from pyro_bc import codec
from pyro_bc.atomic import atomic_write_bytes
from pyro_bc.errors import ConfigError

FORMATS = ("onnx", "pt2")
INPUT_NAME, OUTPUT_NAME, BATCH_DIM = "input", "output", "batch"
ONNX_OPSET = 17
EXAMPLE_BATCH = 2  # a batch of 1 would let the tracers specialise the batch dimension


def _onnx_bytes(module: nn.Module, example: torch.Tensor) -> bytes:
    """The ONNX model of ``module``; its input and output have a dynamic first (batch) axis."""
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


def export_bytes(module: nn.Module, input_shape: Sequence[int], fmt: str) -> bytes:
    """``module`` (any ``nn.Module`` taking one ``(batch, *input_shape)`` tensor, put in eval mode) as the bytes
    of an ``onnx`` or ``pt2`` file; ConfigError, on one line, if the exporter fails."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}: choose {', '.join(FORMATS)}")
    example = torch.zeros(EXAMPLE_BATCH, *input_shape)
    try:
        return (_onnx_bytes if fmt == "onnx" else _pt2_bytes)(module.eval(), example)
    except Exception as exc:  # the exporters raise many types; one line naming the cause
        first_line = str(exc).strip().split("\n", 1)[0]
        raise ConfigError(f"cannot export to {fmt}: {type(exc).__name__}: {first_line}") from exc


def export_module(module: nn.Module, input_shape: Sequence[int], out: str | os.PathLike[str], fmt: str) -> int:
    """Write :func:`export_bytes` of ``module`` to ``out``, atomically; returns the bytes written."""
    out = Path(out)
    if not out.parent.is_dir():
        raise ConfigError(f"output folder {out.parent} does not exist")
    data = export_bytes(module, input_shape, fmt)
    try:
        atomic_write_bytes(out, data)
    except OSError as exc:
        raise ConfigError(f"cannot write {out}: {exc.strerror or exc}") from exc
    return len(data)


def export_bcz(path: str | os.PathLike[str], out: str | os.PathLike[str], fmt: str) -> int:
    """Export the network of the ``.bcz`` file ``path`` (as :func:`pyro_bc.codec.load` rebuilds it) to ``out``."""
    return export_module(codec.load(path), codec.read_bcz(path).input_shape, out, fmt)
