"""``pyro-bc export``: ONNX (run by onnxruntime) and ``torch.export`` programs (re-loaded) of the committed
LeNet-300-100 and LeNet-5 files compute what the loaded module computes, with the pruned shapes and a dynamic
batch dimension; a graph module exports alike; bad formats, inputs and paths are one-line errors."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from torch import nn

import pyro_bc
from pyro_bc.bcz import codec
from pyro_bc.bcz.export import BATCH_DIM, FORMATS, INPUT_NAME, FixedAdaptiveAvgPool2d, export_module
from pyro_bc.cli import main
from pyro_bc.errors import ConfigError

RESULTS = Path(__file__).resolve().parents[1] / "analysis" / "results"
FILES = {"lenet300": RESULTS / "lenet300-gnj" / "MODEL.bcz", "lenet5": RESULTS / "lenet5-gnj" / "MODEL.bcz"}
BATCHES = (1, 37)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[tuple[str, str], Path]:
    """Every committed file in every format, through the command line."""
    folder = tmp_path_factory.mktemp("export")
    paths = {}
    for name, source in FILES.items():
        for fmt in FORMATS:
            paths[name, fmt] = folder / f"{name}.{fmt}"
            assert main(["export", str(source), "--format", fmt, "--out", str(paths[name, fmt])]) == 0
    return paths


def _pruned_shapes(path: Path) -> list[tuple[int, ...]]:
    return [tuple(item.weight_codes.shape) for item in codec.read_bcz(path).items
            if isinstance(item, codec.QuantizedLayer)]


def _run(path: Path, fmt: str, x: torch.Tensor) -> np.ndarray:
    """The outputs of an exported file on ``x``: onnxruntime for ONNX, the re-loaded program for pt2."""
    if fmt == "onnx":
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {INPUT_NAME: x.numpy()})[0]
    return torch.export.load(path).module()(x).detach().numpy()


def _assert_same_outputs(path: Path, fmt: str, module: nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for batch in BATCHES:  # the batch dimension is dynamic
        x = torch.randn(batch, 1, 28, 28, generator=generator)
        with torch.no_grad():
            expected = module(x).numpy()
        np.testing.assert_allclose(_run(path, fmt, x), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", FILES)
def test_exported_file_computes_the_loaded_module(exported, name, fmt):
    _assert_same_outputs(exported[name, fmt], fmt, codec.load(FILES[name]))


@pytest.mark.parametrize("name", FILES)
def test_onnx_holds_the_pruned_shapes_and_a_batch_axis(exported, name):
    graph = onnx.load(str(exported[name, "onnx"])).graph
    initializers = {t.name: tuple(t.dims) for t in graph.initializer}
    weights = [initializers[node.input[1]] for node in graph.node if node.op_type in ("Conv", "Gemm", "MatMul")]
    assert weights == _pruned_shapes(FILES[name])
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == BATCH_DIM


@pytest.mark.parametrize("name", FILES)
def test_pt2_holds_the_pruned_shapes(exported, name):
    program = torch.export.load(exported[name, "pt2"])
    weights = [tuple(program.state_dict[p].shape) for p in program.graph_signature.parameters if p.endswith("weight")]
    assert weights == _pruned_shapes(FILES[name])


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_graph_module_exports_alike(tmp_path, fmt):
    source = FILES["lenet5"]
    graph = torch.fx.symbolic_trace(codec.load(source))
    path = tmp_path / f"graph.{fmt}"
    assert export_module(graph, codec.read_bcz(source).input_shape, path, fmt) == path.stat().st_size
    _assert_same_outputs(path, fmt, graph, seed=1)


@pytest.mark.parametrize("fmt", FORMATS)
def test_deterministic_nodes_export_alike(tmp_path, fmt):
    """A file with float layers (a standalone BatchNorm's depthwise 1x1 convolution, a plain head) and a layer_norm."""
    rng = np.random.default_rng(0)
    items = [codec.QuantizedLayer("conv2d", "c", rng.integers(-9, 10, (2, 1, 5, 5)), 4, None, stride=4),  # (2, 6, 6)
             codec.FloatLayer("conv2d", "bn", rng.normal(size=(2, 1, 1, 1)), rng.normal(size=2), groups=2),
             codec.NormLayer("ln", (2, 6, 6), 1e-5, rng.normal(size=(2, 6, 6)), rng.normal(size=(2, 6, 6))),
             codec.Op("relu"), codec.Op("flatten"), codec.FloatLayer("linear", "head", rng.normal(size=(3, 72)))]
    source, path = tmp_path / "m.bcz", tmp_path / f"m.{fmt}"
    codec.write_bcz(source, codec.CompressedModel(items, (1, 28, 28)))
    assert main(["export", str(source), "--format", fmt, "--out", str(path)]) == 0
    _assert_same_outputs(path, fmt, codec.load(source))


class _Broken(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("no forward here\nsecond line")


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_exporter_failure_is_one_config_error(tmp_path, fmt):
    with pytest.raises(ConfigError, match=f"cannot export to {fmt}: RuntimeError: no forward here$"):
        export_module(_Broken(), (1, 28, 28), tmp_path / "x", fmt)
    with pytest.raises(ConfigError, match="unknown export format 'tflite'"):
        export_module(_Broken(), (1, 28, 28), tmp_path / "x", "tflite")
    assert not any(tmp_path.iterdir())


def test_unknown_format_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["export", str(FILES["lenet5"]), "--format", "tflite", "--out", str(tmp_path / "x")])
    assert info.value.code == 2
    assert "'tflite'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def _corrupt(tmp_path: Path) -> Path:
    data = bytearray(FILES["lenet5"].read_bytes())
    data[len(data) // 2] ^= 0xFF
    path = tmp_path / "corrupt.bcz"
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("source, out, message", [
    (_corrupt, "out.onnx", "checksum mismatch"),
    (lambda tmp: tmp / "missing.bcz", "out.onnx", "cannot read"),
    (lambda tmp: FILES["lenet5"], "no/such/folder/out.onnx", "does not exist"),
    (lambda tmp: FILES["lenet5"], "a_folder", "cannot write"),
])
def test_bad_input_or_path_exits_1_with_one_line(tmp_path, capsys, source, out, message):
    (tmp_path / "a_folder").mkdir()
    model = source(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["export", str(model), "--format", "onnx", "--out", str(tmp_path / out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pyro-bc export: error: ") and message in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no temporary file left


@pytest.mark.parametrize("in_size, out_size", [((2, 2), (7, 7)), ((1, 1), (3, 3)), ((9, 6), (4, 4)), ((8, 8), (2, 2))])
def test_fixed_adaptive_pooling_is_adaptive_pooling_and_exports_to_onnx(in_size, out_size, tmp_path):
    """VGG's 7x7 pooling of a small map: ONNX's exporter refuses it; the fixed pool computes the same numbers."""
    x = torch.randn(3, 4, *in_size, generator=torch.Generator().manual_seed(0))
    want = nn.functional.adaptive_avg_pool2d(x, out_size)
    torch.testing.assert_close(FixedAdaptiveAvgPool2d(in_size, out_size)(x), want)
    module = nn.Sequential(nn.Conv2d(4, 4, 1), nn.AdaptiveAvgPool2d(out_size), nn.Flatten())
    export_module(module, (4, *in_size), tmp_path / "m.onnx", "onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        np.testing.assert_allclose(session.run(None, {INPUT_NAME: x.numpy()})[0], module(x).numpy(), atol=1e-5)


class _TextCNN(nn.Module):
    """Token ids -> embedding -> a 1-D convolution over positions -> max over positions -> logits."""

    def __init__(self):
        super().__init__()
        self.embed, self.conv, self.fc = nn.Embedding(30, 6), nn.Conv1d(6, 5, 3, padding=1), nn.Linear(5, 3)

    def forward(self, ids):
        return self.fc(torch.relu(self.conv(self.embed(ids).transpose(1, 2))).amax(2))


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_network_of_token_ids_exports_with_integer_inputs(fmt, tmp_path):
    """The file records int64 inputs; ``pyro-bc export`` traces with them, and the exported program (onnxruntime's,
    or torch.export's re-loaded) computes what the loaded module computes on ids it never saw."""
    torch.manual_seed(0)
    net = pyro_bc.bayesianize(_TextCNN(), input_shape=(7,), input_dtype=torch.int64)
    pyro_bc.compress(net, tmp_path / "m.bcz", thresholds=[-3.0, -3.0])
    assert main(["export", str(tmp_path / "m.bcz"), "--format", fmt, "--out", str(tmp_path / f"m.{fmt}")]) == 0
    ids = torch.randint(0, 30, (9, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = codec.load(tmp_path / "m.bcz")(ids)
        if fmt == "onnx":
            session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
            got = torch.from_numpy(session.run(None, {INPUT_NAME: ids.numpy()})[0])
        else:
            got = torch.export.load(tmp_path / "m.pt2").module()(ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
