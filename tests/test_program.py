"""Programs of core ATen operators (pyro_bc.bcz.program): what torch.export lowers a module to, stored and read back
computing what the module computes at any batch size; a reader that resolves nothing outside the core ATen
operators and the size operators."""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pyro_bc.bcz import codec
from pyro_bc.bcz import v2 as bcz_v2
from pyro_bc.bcz.binary import BadData
from pyro_bc.bcz.model import CompressedModel, ProgramNode, float16_exact
from pyro_bc.bcz.modules import to_module
from pyro_bc.bcz.program import Program, check_program, export_program, program_module, resolve_target
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


@pytest.mark.parametrize("nodes, output, message", [
    ([["aten.relu.default", [{"v": 1}], {}]], 1, "reference 1 is not an earlier value"),
    ([["aten.relu.default", [{"v": True}], {}]], 1, "reference True is not an earlier value"),
    ([["aten.relu.default", [{"w": 0}], {}]], 1, "is not a value this reader knows"),
    ([["aten.relu.default", [{"dtype": "object"}], {}]], 1, "is not a value this reader knows"),
    ([["aten.relu.default", [[[[[[[[[[[0]]]]]]]]]]], {}]], 1, "nested more than 8 deep"),
    ([["aten.relu.default", [{"v": 0}]]], 1, "is not \\[target, args, kwargs\\]"),
    ([["aten.relu.default", [{"v": 0}], {"1x": 0}]], 1, "a keyword that is not a name"),
    ([["aten.relu.default", [{"v": 0}], {}]], 2, "output 2 is not a value"),
])
def test_malformed_programs_are_refused(nodes, output, message):
    with pytest.raises(BadData, match=message):
        check_program(Program(1, [], nodes, output))


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
    exported), and a table expanded along a new dimension (larger than the table: not stored)."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(3, 4, generator=torch.Generator().manual_seed(5)))

    def forward(self, x):
        mask = x.new_zeros(4, 4)
        mask[:2, 2:] = 1.0
        mask[2:, :2] = 2.0
        return x @ mask + self.table.expand(5, 3, 4).sum(0)


def test_what_depends_on_no_input_is_computed_once_and_stored_where_that_is_not_larger():
    torch.manual_seed(0)
    module = Masked().eval()
    program = export_program(module, (torch.randn(2, 3, 4),))
    names = [node[0] for node in program.nodes]
    assert not any("scatter" in name or name.startswith("aten.full") for name in names), names  # the mask: stored
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
