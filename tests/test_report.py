"""Figures and report.md of tiny trained runs (LeNet-300-100 gnj and ghs, LeNet-5)."""

import json

import numpy as np
import pytest
from PIL import Image

from pyro_bc import plots
from pyro_bc.cli import main
from pyro_bc.compress import compress_run
from pyro_bc.inspect import load_datatree, to_datatree
from pyro_bc.report import write_report
from pyro_bc.run_dir import TrainConfig
from pyro_bc.train import train


def _assert_png(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = np.asarray(Image.open(path).convert("L"), dtype=float)
    assert pixels.std() > 0


@pytest.fixture(scope="module")
def lenet300_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("lenet300")
    train(TrainConfig(epochs=1, subset=512, val_size=500), out=run, progress=False)
    summary = compress_run(run, run / "MODEL.bcz")
    return run, summary


def test_report_of_compressed_run(lenet300_run):
    run, summary = lenet300_run
    report = write_report(run, num_samples=50)
    assert report == run / "report.md"
    text = report.read_text()
    assert summary["architecture"] in text
    assert f"| cr_prune | {summary['cr_prune']:.1f} |" in text
    assert f"| cr_fast | {summary['cr_fast']:.1f} |" in text
    assert f"{summary['error_compressed']:.2f}%" in text
    for layer in summary["layers"]:
        assert f"| {layer['name']} | {layer['groups_kept']}/{layer['groups_total']} |" in text
    figures = sorted((run / "figures").glob("*.png"))
    assert {f.name for f in figures} == {"training.png", "compression.png", "log_alpha.png", "input_mask.png",
                                         "scales_fc1.png", "scales_fc2.png", "scales_fc3.png"}
    for fig in figures:
        _assert_png(fig)
        assert f"(figures/{fig.name})" in text
    dt = load_datatree(run / "posterior.nc")
    assert dt["posterior"].sizes["fc1_group"] == 784


def test_cli_report(lenet300_run, capsys):
    run, _ = lenet300_run
    assert main(["report", str(run), "--compressed", str(run / "MODEL.bcz")]) == 0
    assert capsys.readouterr().out.strip() == str(run / "report.md")


def test_cli_report_missing_json(lenet300_run, capsys):
    run, _ = lenet300_run
    assert main(["report", str(run), "--compressed", str(run / "OTHER.bcz")]) == 1
    assert "OTHER.json" in capsys.readouterr().err


def test_ghs_figures(tmp_path):
    from models import lenet300

    dt = to_datatree(lenet300.build("ghs"), num_samples=30)
    _assert_png(plots.plot_group_scales(dt, "fc3", tmp_path / "scales.png"))
    log_alphas = {name: dt["posterior"][f"{name}_log_alpha"].isel(chain=0, draw=0).values for name in ("fc1", "fc2")}
    _assert_png(plots.plot_log_alpha(log_alphas, [-3.0] * 2, tmp_path / "la.png"))


def test_compression_and_training_plots(lenet300_run, tmp_path):
    run, _summary = lenet300_run
    _assert_png(plots.plot_compression(json.loads((run / "MODEL.json").read_text()), tmp_path / "c.png"))
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    _assert_png(plots.plot_training(metrics, tmp_path / "t.png"))


def test_lenet5_report_uncompressed(tmp_path):
    train(TrainConfig(model="lenet5", epochs=1, subset=256, val_size=256), out=tmp_path, progress=False)
    text = write_report(tmp_path, num_samples=20).read_text()
    assert "Not compressed yet" in text
    assert "conv1_channel" in text
    names = {f.name for f in (tmp_path / "figures").glob("*.png")}
    assert names == {"training.png", "log_alpha.png", "input_mask.png", "scales_conv1.png", "scales_conv2.png",
                     "scales_fc1.png", "scales_fc2.png"}
    for name in names:
        _assert_png(tmp_path / "figures" / name)
