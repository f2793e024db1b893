"""MAC counts against hand-computed ones: the dense LeNet-5 and LeNet-300-100, a committed pruned LeNet-5,
convolutions with stride, padding and groups; ``MODEL.json``, ``format_table`` and the report's table carry
them."""

import json
from pathlib import Path

import pytest
import torch
from masked_reference import unambiguous_threshold
from torch import nn

from models import build_network
from pyro_bc.bcz import codec
from pyro_bc.compression.macs import add_macs, count_macs
from pyro_bc.compression.pipeline import format_table
from pyro_bc.compression.posterior import analyse
from pyro_bc.runs.compressing import compress_run
from pyro_bc.runs.load import load_run
from pyro_bc.runs.report import _compression_section
from pyro_bc.runs.training import train
from pyro_bc.train.run_dir import TrainConfig

RESULTS = Path(__file__).resolve().parents[1] / "analysis" / "results"
# conv1 20*1*5*5 * 24*24, conv2 50*20*5*5 * 8*8, fc1 800*500, fc2 500*10
LENET5_DENSE = [288_000, 1_600_000, 400_000, 5_000]
# lenet5-gnj keeps 9-13-76-12: conv1 9*1*25 * 24*24, conv2 13*9*25 * 8*8, fc1 76*12, fc2 12*10
LENET5_GNJ = [9 * 25 * 576, 13 * 9 * 25 * 64, 76 * 12, 12 * 10]


def test_dense_lenet5_and_lenet300():
    lenet5 = count_macs(build_network("lenet5", "gnj").posterior_mean_network(), (1, 28, 28))
    assert lenet5 == LENET5_DENSE and sum(lenet5) == 2_293_000
    assert count_macs(build_network("lenet300", "gnj").posterior_mean_network(), (1, 28, 28)) == [
        784 * 300, 300 * 100, 100 * 10]


def test_pruned_lenet5_from_its_file():
    path = RESULTS / "lenet5-gnj" / "MODEL.bcz"
    assert count_macs(codec.load(path), (1, 28, 28)) == LENET5_GNJ == [129_600, 187_200, 912, 120]
    summary = json.loads(path.with_suffix(".json").read_text())
    assert [r["macs_compressed"] for r in summary["layers"]] == LENET5_GNJ
    assert summary["macs_compressed"] == sum(LENET5_GNJ) and summary["macs_original"] == 2_293_000


def test_stride_padding_dilation_groups_and_positions():
    net = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2),  # 9x9 -> 5x5
                        nn.Conv2d(6, 3, 3, dilation=2),                    # 5x5 -> 1x1
                        nn.Flatten(0, -1), nn.Unflatten(0, (1, 3)),        # (1, 3)
                        nn.Linear(3, 4), nn.Unflatten(1, (2, 2)), nn.Linear(2, 5))  # applied at 2 positions
    assert count_macs(net, (4, 9, 9)) == [6 * 2 * 9 * 25, 3 * 6 * 9 * 1, 3 * 4, 2 * 5 * 2]


class _PaddedTokens(nn.Module):
    """Token ids, 0 the padding: embedded, then nn.TransformerEncoder with the padding as its key mask."""

    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0, batch_first=True)
        self.embed, self.encoder, self.head = nn.Embedding(10, 8, padding_idx=0), nn.TransformerEncoder(layer, 1), \
            nn.Linear(40, 3)

    def forward(self, ids):
        return self.head(self.encoder(self.embed(ids), src_key_padding_mask=ids == 0).flatten(1))


def test_a_padded_token_transformer_is_counted_on_ids():
    """Counted on zero ids, all padding: PyTorch's fused path for eval mode would pack them as nested tensors of no
    tokens and fail; the count calls the layers instead: per token 8 * 12 and 12 * 8, then 40 * 3 for the head."""
    assert count_macs(_PaddedTokens().eval(), (5,), input_dtype=torch.int64) == [5 * 8 * 12, 5 * 12 * 8, 40 * 3]


def test_add_macs_needs_one_entry_per_layer():
    dense = build_network("lenet300", "gnj").posterior_mean_network()
    summary = add_macs({"layers": [{}, {}, {}]}, dense, dense, (1, 28, 28))
    assert summary["macs_original"] == summary["macs_compressed"] == 266_200
    with pytest.raises(ValueError, match="2 layers"):
        add_macs({"layers": [{}, {}]}, dense, dense, (1, 28, 28))


def test_compress_records_and_shows_the_macs(tmp_path):
    torch.manual_seed(0)
    train(TrainConfig(epochs=1, subset=200, batch_size=100, val_size=500), out=tmp_path, progress=False)
    thresholds = [unambiguous_threshold(p.log_alpha) for p in analyse(load_run(tmp_path)[0])]  # keeps about half
    summary = compress_run(tmp_path, tmp_path / "MODEL.bcz", thresholds=thresholds)
    on_disk = json.loads((tmp_path / "MODEL.json").read_text())
    shapes = [item.weight_codes.shape for item in codec.read_bcz(tmp_path / "MODEL.bcz").items
              if isinstance(item, codec.QuantizedLayer)]
    assert [r["macs_compressed"] for r in on_disk["layers"]] == [out * inp for out, inp in shapes]  # pruned shapes
    assert [r["macs_original"] for r in on_disk["layers"]] == [235_200, 30_000, 1_000]
    assert on_disk["macs_compressed"] == sum(out * inp for out, inp in shapes) < 266_200
    assert on_disk["macs_original"] == 266_200
    table = format_table(summary)
    assert f"MACs per example: {on_disk['macs_compressed']:,} of 266,200" in table
    section = "\n".join(_compression_section(on_disk, "MODEL.json"))
    assert f"| {on_disk['macs_compressed']:,}/266,200 (" in section
    assert f"| {on_disk['layers'][0]['macs_compressed']:,}/235,200 (" in section


def test_report_table_of_a_summary_without_macs():
    summary = json.loads((RESULTS / "lenet5-gnj" / "MODEL.json").read_text())
    for row in [summary, *summary["layers"]]:
        del row["macs_original"], row["macs_compressed"]
    assert "| MACs per example (kept/original) | n/a |" in _compression_section(summary, "MODEL.json")
