"""Programs of core ATen operators (pyro_bc.bcz.program): what torch.export lowers a module to, stored and read back
computing what the module computes at any batch size; a reader that resolves nothing outside the core ATen
operators and the size operators."""

import json
import math
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyro_bc.bcz import codec
from pyro_bc.bcz import v2 as bcz_v2
from pyro_bc.bcz.binary import BadData
from pyro_bc.bcz.export import INPUT_NAME, export_bytes
from pyro_bc.bcz.model import CompressedModel, ProgramNode, float16_exact
from pyro_bc.bcz.modules import to_module
from pyro_bc.bcz.program import (
    Program,
    _decode_value,
    check_program,
    encode_value,
    export_program,
    is_positionwise,
    program_module,
    resolve_target,
    target_name,
)
from pyro_bc.errors import FormatError


class Tokens(nn.Module):
    """A ViT's input stage and one attention: a class token and a positional embedding (parameters read outside a
    layer), a reshape that moves channels into positions, and ``nn.MultiheadAttention``."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.token = nn.Parameter(torch.randn(1, 1, 8, generator=generator))
        self.position = nn.Parameter(torch.randn(1, 5, 8, generator=generator))
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        n = x.shape[0]
        tokens = torch.cat([self.token.expand(n, -1, -1), x.reshape(n, 8, 4).permute(0, 2, 1)], dim=1)
        tokens = tokens + self.position
        return torch.softmax(self.attention(tokens, tokens, tokens, need_weights=False)[0], -1)


@pytest.fixture(scope="module")
def tokens():
    torch.manual_seed(0)
    module = Tokens().eval()
    return module, export_program(module, (torch.randn(2, 8, 2, 2),))


def test_an_exported_program_computes_its_module_at_any_batch_size(tokens):
    module, program = tokens
    rebuilt = program_module(program)
    generator = torch.Generator().manual_seed(1)
    for batch in (1, 3, 7):
        x = torch.randn(batch, 8, 2, 2, generator=generator)
        with torch.no_grad():
            torch.testing.assert_close(rebuilt(x), module(x), rtol=1e-5, atol=1e-6)
    assert len(program.constants) >= 2 and program.n_inputs == 1  # the parameters are the program's constants
    assert all(node[0].startswith(("aten.", "operator.")) for node in program.nodes)


def test_a_program_reads_channels_last_inputs(tokens):
    """A loaded convolution gives channels-last outputs; the program was exported on contiguous ones."""
    module, program = tokens
    x = torch.randn(3, 8, 2, 2).to(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(program_module(program)(x), module(x.contiguous()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("module, positionwise", [(nn.LeakyReLU(0.2), True), (nn.Mish(), True), (nn.PReLU(), True),
                                                  (nn.PReLU(4), False), (nn.Softmax(1), False)])
def test_a_program_computing_each_position_alone_keeps_its_inputs_layout(module, positionwise):
    """An activation's program (pointwise operators, single-value constants) is computed on a channels-last input as
    it comes, with the values of the default layout; any other program copies its input to the default layout."""
    program = export_program(module.eval(), (torch.randn(2, 4, 3, 3),))
    assert is_positionwise(program) is positionwise
    x = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(0)).to(memory_format=torch.channels_last)
    with torch.no_grad():
        got, want = program_module(program)(x), module(x.contiguous())
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert got.is_contiguous(memory_format=torch.channels_last) is positionwise


def test_a_program_node_round_trips_through_a_file(tokens, tmp_path: Path):
    """Constants come back bit for bit; one whose values are float16 values is stored at two bytes a value."""
    module, program = tokens
    model = CompressedModel([ProgramNode("tokens", program)], (8, 2, 2))
    back = codec.decode(codec.encode(model))
    (node,) = back.items
    assert node.name == "tokens" and node.program.nodes == program.nodes and node.program.output == program.output
    for got, want in zip(node.program.constants, program.constants):
        assert got.dtype == want.dtype and np.array_equal(got, want)
    x = torch.randn(4, 8, 2, 2, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(to_module(back)(x), module(x), rtol=1e-5, atol=1e-6)
    halves = Program(program.n_inputs, [c.astype(np.float16).astype(np.float32) for c in program.constants],
                     program.nodes, program.output)
    values = sum(c.size for c in program.constants if not float16_exact(c))  # zeros are float16 values already
    full = len(codec.encode(model))
    half = len(codec.encode(CompressedModel([ProgramNode("tokens", halves)], (8, 2, 2))))
    assert full - half == 2 * values


def test_integer_and_bool_constants_round_trip():
    index = np.array([[2, 0], [1, 1]], dtype=np.int64)
    mask = np.array([True, False])
    nodes = [["aten.index_select.default", [{"v": 0}, 1, {"v": 1}], {}]]
    program = Program(1, [index[0], mask], nodes, 3)
    (node,) = codec.decode(codec.encode(CompressedModel([ProgramNode("select", program)], (3,)))).items
    assert [c.dtype for c in node.program.constants] == [np.int64, np.bool_]
    assert np.array_equal(node.program.constants[0], index[0]) and np.array_equal(node.program.constants[1], mask)
    x = torch.arange(6.0).reshape(2, 3)
    assert torch.equal(program_module(node.program)(x), x[:, [2, 0]])


def test_an_empty_constant_round_trips():
    """A constant with a dimension of 0 (an empty tensor, as a language model's cache logic makes) was written, then
    refused by the reader: every compression of such a network failed (GPT-2 of Hugging Face transformers)."""
    empty = np.zeros((0, 3), dtype=np.float32)
    nodes = [["aten.cat.default", [[{"v": 0}, {"v": 1}]], {}]]
    program = Program(1, [empty], nodes, 2)
    (node,) = codec.decode(codec.encode(CompressedModel([ProgramNode("cat", program)], (3,)))).items
    assert node.program.constants[0].shape == (0, 3)
    x = torch.arange(6.0).reshape(2, 3)
    assert torch.equal(program_module(node.program)(x), x)


@pytest.mark.parametrize("name", ["os.system", "builtins.eval", "aten.__class__.x", "torch.ops.aten.add.Tensor",
                                  "operator.attrgetter", "aten.add", "aten.add.Nope", "aten.nonexistent_op.default",
                                  "aten.add.Tensor.extra", "aten.linear.default", 3, None])
def test_the_reader_resolves_only_core_aten_and_size_operators(name):
    """Any other name (code of Python's, a composite or unknown operator, a malformed name) is refused in one line."""
    with pytest.raises(BadData, match="is not a core ATen operator|a target is not a string"):
        resolve_target(name)


def test_the_reader_resolves_core_operators_and_size_arithmetic():
    assert resolve_target("aten.add.Tensor") is torch.ops.aten.add.Tensor
    assert resolve_target("aten.sym_size.int") is torch.ops.aten.sym_size.int
    assert resolve_target("operator.floordiv")(7, 2) == 3


def test_a_file_with_a_program_naming_other_code_is_refused_before_anything_is_built(tmp_path: Path, monkeypatch):
    evil = CompressedModel([ProgramNode("evil", Program(1, [], [["builtins.exec", [{"v": 0}], {}]], 1))], (3,))
    with pytest.raises(BadData, match="is not a core ATen operator"):
        codec.encode(evil)
    with monkeypatch.context() as patch:  # a writer that does not check
        patch.setattr(bcz_v2, "check_program", lambda program: None)
        data = codec.encode(evil)
    path = tmp_path / "evil.bcz"
    path.write_bytes(data)
    with pytest.raises(FormatError, match="^[^\n]*'builtins.exec' is not a core ATen operator$"):
        codec.read_bcz(path)


class Masked(nn.Module):
    """Swin's attention mask: built from sizes alone by writing into slices (functional ``slice_scatter`` once
    exported), a table expanded along a new dimension (larger than the table: not stored), and a tensor built from
    nothing that is larger than 2^16 values (not stored)."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(3, 4, generator=torch.Generator().manual_seed(5)))

    def forward(self, x):
        mask = x.new_zeros(4, 4)
        mask[:2, 2:] = 1.0
        mask[2:, :2] = 2.0
        return x @ mask + self.table.expand(5, 3, 4).sum(0) + torch.ones(300, 300).mean()


def test_what_depends_on_no_input_is_computed_once_and_stored_where_that_is_not_larger():
    torch.manual_seed(0)
    module = Masked().eval()
    program = export_program(module, (torch.randn(2, 3, 4),))
    names = [node[0] for node in program.nodes]
    assert not any("scatter" in name for name in names), names  # the mask: stored
    assert names.count("aten.full.default") == 1, names  # 90,000 ones, built from nothing: more than 2^16, computed
    shapes = sorted(c.shape for c in program.constants)
    assert shapes == [(3, 4), (4, 4)], shapes  # the table itself, not its 5-fold expansion
    x = torch.randn(6, 3, 4, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(program_module(program)(x), module(x), rtol=1e-6, atol=1e-6)


def test_a_draw_is_not_computed_once():
    class Noisy(nn.Module):
        def forward(self, x):
            return x + torch.rand(3)

    program = export_program(Noisy(), (torch.randn(2, 3),))
    assert program.constants == [] and any(node[0].startswith("aten.rand") for node in program.nodes)


@pytest.mark.parametrize("value", [True, None, 3, "tanh", 0.5, math.inf, -math.inf, torch.float64, torch.bool,
                                   torch.strided, torch.channels_last, torch.contiguous_format, [1, [2, None]]])
def test_each_kind_of_argument_is_written_and_read_back(value):
    """JSON holds numbers, strings, lists and one-key objects for what it cannot (non-finite floats, dtypes,
    layouts, memory formats); a reference reads an earlier value."""
    text = json.dumps(encode_value(value), allow_nan=False)
    assert _decode_value(json.loads(text), 0, []) == value
    assert math.isnan(_decode_value(json.loads(json.dumps(encode_value(math.nan), allow_nan=False)), 0, []))
    assert _decode_value(encode_value(torch.device("cpu")), 0, []) == torch.device("cpu")


def test_an_argument_of_another_kind_cannot_be_written():
    with pytest.raises(BadData) as info:
        encode_value(1j)
    assert str(info.value) == "an argument of type complex cannot be stored"
    with pytest.raises(BadData) as info:
        target_name(torch.relu)
    assert str(info.value) == "relu is not a core ATen operator"
    with pytest.raises(BadData) as info:
        target_name(3)
    assert str(info.value) == "3 is not a core ATen operator"


def test_the_largest_program_the_reader_takes():
    check_program(Program(1 << 16, [], [["aten.relu.default", [{"v": 0}], {}]] * (1 << 16), 0))


@pytest.mark.parametrize("nodes, output, message", [
    ([["aten.relu.default", [{"v": 1}], {}]], 1, "program: reference 1 is not an earlier value"),
    ([["aten.relu.default", [{"v": 0, "w": 0}], {}]], 1, 'program: an argument "{\'v\': 0, \'w\': 0}" is not a value'),
    ([["aten.relu.default", [{"dtype": "object"}], {}]], 1, "program: dtype='object' is not a value this reader knows"),
    ([["aten.relu.default", [{"f": 1.0}], {}]], 1, "program: f='1.0' is not a value this reader knows"),
    ([["aten.relu.default", [[[[[[[[[[0]]]]]]]]]], {}]], 1, "program: an argument is nested more than 8 deep"),
    ([["aten.relu.default", [{"v": 0, "w": "x" * 100}], {}]], 1,
     f"program: an argument {str({'v': 0, 'w': 'x' * 100})[:40]!r} is not a value"),
    ([["aten.relu.default", [{"zz": "a"}], {}]], 1, "program: zz='a' is not a value this reader knows"),
    ([["aten.relu.default", [{"dtype": "y" * 50}], {}]], 1, f"program: dtype={'y' * 20!r} is not a value this reader knows"),
    ([["os.relu.default", [{"v": 0}], {}]], 1, "program: 'os.relu.default' is not a core ATen operator"),
    ([["aten." + "r" * 100, [{"v": 0}], {}]], 1, f"program: {('aten.' + 'r' * 100)[:60]!r} is not a core ATen operator"),
    ([[3, [{"v": 0}], {}]], 1, "program: a target is not a string"),
    ([["aten.relu.default", [{"v": 0}], {}]], 0.5, "program: output 0.5 is not a value"),
    ([["aten.relu.default", [{"v": 0}], {}]], 2, "program: output 2 is not a value"),
    ([["aten.relu.default", [{"v": True}], {}]], 1, "program: reference True is not an earlier value"),
    ([["aten.relu.default", [{"v": 0}]]], 1, "program: node 0 is not [target, args, kwargs]"),
    ([["aten.relu.default", [{"v": 0}], {"1x": 0}]], 1, "program: node 0 has a keyword that is not a name"),
])
def test_each_refusal_says_what_is_wrong(nodes, output, message):
    with pytest.raises(BadData) as info:
        check_program(Program(1, [], nodes, output))
    assert str(info.value) == message


def test_arguments_nested_eight_deep_and_an_input_as_the_output_are_read():
    check_program(Program(1, [], [["aten.relu.default", [{"v": 0}, [[[[[[[[0]]]]]]]]], {}]], 1))  # 0 at depth 8
    with pytest.raises(BadData):
        check_program(Program(1, [], [["aten.relu.default", [{"v": 0}, [[[[[[[[[0]]]]]]]]]], {}]], 1))  # 9
    identity = Program(1, [], [], 0)
    x = torch.randn(2, 3)
    assert torch.equal(program_module(identity)(x), x)


@pytest.mark.parametrize("n_inputs, nodes, constants, message", [
    (0, 0, [], "program: 0 inputs and 0 nodes (1 to 65536 each)"),
    (65537, 0, [], "program: 65537 inputs and 0 nodes (1 to 65536 each)"),
    (1, 65537, [], "program: 1 inputs and 65537 nodes (1 to 65536 each)"),
    (1, 0, [np.zeros(2)], "program: constant 0 is float64 of rank 1"),
    (1, 0, [np.zeros((1,) * 9, dtype=np.float32)], "program: constant 0 is float32 of rank 9"),
])
def test_a_program_beyond_the_bounds_is_refused(n_inputs, nodes, constants, message):
    program = Program(n_inputs, constants, [["aten.relu.default", [{"v": 0}], {}]] * nodes, 0)
    with pytest.raises(BadData) as info:
        check_program(program)
    assert str(info.value) == message


def test_keywords_and_constants_reach_the_operators():
    """A keyword changes what an operator computes (GELU's tanh form); float constants are frozen parameters, the
    others buffers; a rank-8 constant is read."""
    nodes = [["aten.gelu.default", [{"v": 0}], {"approximate": "tanh"}],
             ["aten.mul.Tensor", [{"v": 4}], {"other": {"v": 1}}],
             ["aten.index_select.default", [{"v": 5}, 1, {"v": 2}], {}]]
    constants = [np.full((1,) * 8, 2.0, dtype=np.float32).reshape(1, 1), np.array([1, 0], dtype=np.int64),
                 np.ones((1,) * 8, dtype=np.float32)]
    module = program_module(Program(1, constants, nodes, 6))
    x = torch.randn(3, 2)
    assert torch.equal(module(x), (2 * F.gelu(x, approximate="tanh"))[:, [1, 0]])
    assert [(n, p.requires_grad) for n, p in module.named_parameters()] == [("constant_0", False), ("constant_2", False)]
    assert [n for n, _ in module.named_buffers()] == ["constant_1"]


def test_a_program_traced_at_one_batch_size_runs_at_another():
    """Exporters that trace (ONNX) see the batch size through ``x.size(0)``, not as the number it was: the class
    token's expansion and the reshape follow the batch (onnxruntime, a second implementation)."""
    module, program = Tokens().eval(), None
    program = export_program(module, (torch.randn(2, 8, 2, 2),))
    loaded = to_module(CompressedModel([ProgramNode("tokens", program)], (8, 2, 2)))
    session = onnxruntime.InferenceSession(export_bytes(loaded, (8, 2, 2), "onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 8, 2, 2, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = module(x).numpy()
    np.testing.assert_allclose(session.run(None, {INPUT_NAME: x.numpy()})[0], want, rtol=1e-4, atol=1e-5)


class Sorted(nn.Module):
    """A table sorted (values and indices: twice the table, not stored), a bool mask (a buffer) applied to it."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(2, 4, generator=torch.Generator().manual_seed(8)))
        self.register_buffer("mask", torch.tensor([True, False, True, True]))

    def forward(self, x):
        return x * torch.sort(self.table, 1)[0].sum(0) * self.mask


def test_a_tuple_larger_than_what_it_is_computed_from_is_computed_by_the_program():
    module = Sorted().eval()
    program = export_program(module, (torch.randn(2, 4),))
    assert any(node[0] == "aten.sort.default" for node in program.nodes)
    assert sorted(str(c.dtype) for c in program.constants) == ["bool", "float32"]
    x = torch.randn(3, 4)
    with torch.no_grad():
        torch.testing.assert_close(program_module(program)(x), module(x))


class Lookup(nn.Module):
    """Token ids given as floats, cast and looked up (``.long()`` leaves a metadata assertion in the export), then
    an adaptive max pool, which the default decompositions leave outside the core set."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(7, 4)

    def forward(self, x):
        return F.adaptive_max_pool2d(self.embedding(x.long()).unsqueeze(1), 2).flatten(1)


def test_torchs_own_decompositions_reach_the_core_set_and_assertions_are_left_out():
    torch.manual_seed(0)
    module = Lookup().eval()
    program = export_program(module, (torch.tensor([[1.0, 2, 3, 4], [5, 6, 0, 1]]),))
    names = {node[0] for node in program.nodes}
    assert not any("assert" in name or "adaptive_max_pool" in name for name in names), names
    loaded = to_module(CompressedModel([ProgramNode("lookup", program)], (4,)))
    session = onnxruntime.InferenceSession(export_bytes(loaded, (4,), "onnx"), providers=["CPUExecutionProvider"])
    x = torch.randint(0, 7, (5, 4), generator=torch.Generator().manual_seed(9)).float()
    with torch.no_grad():
        want = module(x)
        torch.testing.assert_close(loaded(x), want)
    np.testing.assert_allclose(session.run(None, {INPUT_NAME: x.numpy()})[0], want.numpy(), rtol=1e-6, atol=1e-6)


class _FillsItsInput(nn.Module):
    """An in-place op on an input (as ``F._canonical_mask`` fills a padding mask made from token ids)."""

    def forward(self, scores, pad):
        return torch.softmax(scores.masked_fill_(pad, float("-inf")), -1)


def test_an_op_changing_its_input_in_place_exports_as_one_output_and_leaves_its_caller_alone():
    """torch.export returns a mutated input as a further output; the program computes on copies instead: one output,
    the masked softmax computed out of place, and the inputs given to the loaded program unchanged."""
    g = torch.Generator().manual_seed(0)
    scores, pad = torch.randn(3, 6, generator=g), torch.rand(3, 6, generator=g) > 0.5
    pad[:, 0] = False  # one position left in each row
    program = export_program(_FillsItsInput(), (scores.clone(), pad))
    given = scores.clone()
    got = program_module(program)(given, pad)
    torch.testing.assert_close(got, torch.softmax(scores.masked_fill(pad, float("-inf")), -1))
    assert torch.equal(given, scores)


class _Recurrent(nn.Module):
    """A GRU over (batch, steps, features): its initial state is made from the input's batch size."""

    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(3, 4, batch_first=True)

    def forward(self, x):
        return self.gru(x)[0][:, -1]


def test_a_state_made_from_the_batch_size_follows_the_batch_in_a_traced_export():
    """An RNN's zero state, lowered to ``aten.full`` of a size read from the input, is built by ``torch.full``: ONNX's
    exporter then records the size as computed and onnxruntime runs the program at another batch size."""
    torch.manual_seed(0)
    module = _Recurrent().eval()
    program = export_program(module, (torch.randn(2, 6, 3),))
    assert any(node[0] == "aten.full.default" for node in program.nodes)
    loaded = to_module(CompressedModel([ProgramNode("gru", program)], (6, 3)))
    session = onnxruntime.InferenceSession(export_bytes(loaded, (6, 3), "onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 6, 3, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = module(x).numpy()
    np.testing.assert_allclose(session.run(None, {INPUT_NAME: x.numpy()})[0], want, rtol=1e-4, atol=1e-5)
