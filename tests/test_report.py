"""Figures and report.md of tiny trained runs (LeNet-300-100 gnj and ghs, LeNet-5); the report takes its
pruning decisions from MODEL.json. The command line's cases are in tests/test_cli.py."""

import dataclasses
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_data import write_cifar

from models import build_network
from pyro_bc.bcz import codec
from pyro_bc.errors import ConfigError
from pyro_bc.report import plots
from pyro_bc.report.datatree import load_datatree, to_datatree
from pyro_bc.runs.compressing import compress_run
from pyro_bc.runs.load import original_network
from pyro_bc.runs.report import write_report
from pyro_bc.runs.training import train
from pyro_bc.train.checkpoint import save_checkpoint
from pyro_bc.train.run_dir import TrainConfig


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


def test_the_compression_section_lists_deterministic_modules(lenet300_run):
    """Where MODEL.json lists deterministic modules, a table of them after the rates, with the chosen precision."""
    from pyro_bc.runs.report import _compression_section

    _, summary = lenet300_run
    assert summary["deterministic_modules"] == [] and summary["deterministic_precision"] is None
    assert not any("Deterministic" in line for line in _compression_section(summary, "MODEL.json"))
    rows = [{"name": "norm", "module": "LayerNorm", "stored_as": "layer_norm", "parameters_original": 32,
             "parameters": 32, "precision": "float16"}]
    choice = {"chosen": "float16", "val_error_float32": 1.25, "val_error_float16": 1.0}
    lines = _compression_section({**summary, "deterministic_modules": rows, "deterministic_precision": choice}, "x")
    assert lines[-6].endswith("; at float16 (validation error 1.00% at float16, 1.25% at float32):")
    assert lines[-2] == "| norm | LayerNorm | layer_norm | 32 / 32 | float16 |"


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
    assert "the priors' default thresholds (conv1 -3, conv2 -3, fc1 -3, fc2 -3)" in text
    assert "conv1_channel" in text
    names = {f.name for f in (tmp_path / "figures").glob("*.png")}
    assert names == {"training.png", "log_alpha.png", "input_mask.png", "scales_conv1.png", "scales_conv2.png",
                     "scales_fc1.png", "scales_fc2.png"}
    for name in names:
        _assert_png(tmp_path / "figures" / name)


@pytest.fixture
def run_copy(lenet300_run, tmp_path):
    run, _ = lenet300_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("figures", "*.nc", "*.md"))
    return copy


def _input_mask_spy(monkeypatch) -> list:
    calls = []
    original = plots.plot_input_mask

    def spy(post, keep, threshold, input_shape, path):
        calls.append((post.name, keep.clone(), threshold))
        return original(post, keep, threshold, input_shape, path)

    monkeypatch.setattr(plots, "plot_input_mask", spy)
    return calls


def test_report_takes_the_kept_groups_from_model_json_without_pruning(run_copy, monkeypatch):
    summary = json.loads((run_copy / "MODEL.json").read_text())
    summary["layers"][0]["kept_groups"] = list(range(10))  # not what the thresholds would keep
    (run_copy / "EDITED.json").write_text(json.dumps(summary))

    def no_pruning(*args, **kwargs):
        raise AssertionError("the report pruned again")

    monkeypatch.setattr("pyro_bc.runs.report.prune_network", no_pruning)
    calls = _input_mask_spy(monkeypatch)
    text = write_report(run_copy, run_copy / "EDITED.bcz", num_samples=20).read_text()
    ((name, keep, threshold),) = calls
    assert name == "fc1" and keep.nonzero().flatten().tolist() == list(range(10))
    assert threshold == summary["layers"][0]["threshold"]
    assert "What is kept comes from `EDITED.json`." in text


def test_model_json_without_kept_groups_is_pruned_again_and_says_so(run_copy, monkeypatch):
    summary = json.loads((run_copy / "MODEL.json").read_text())
    for row in summary["layers"]:
        del row["kept_groups"]
    (run_copy / "MODEL.json").write_text(json.dumps(summary))
    calls = _input_mask_spy(monkeypatch)
    text = write_report(run_copy, num_samples=20).read_text()
    assert "pruned again (it predates `kept_groups`" in text
    assert int(calls[0][1].sum()) == summary["layers"][0]["groups_kept"]


@pytest.mark.parametrize("bad", [[784], [-1], "all", [0.5]])
def test_bad_kept_groups_are_a_config_error(run_copy, bad):
    summary = json.loads((run_copy / "MODEL.json").read_text())
    summary["layers"][0]["kept_groups"] = bad
    (run_copy / "MODEL.json").write_text(json.dumps(summary))
    with pytest.raises(ConfigError, match="fc1's kept_groups"):
        write_report(run_copy, num_samples=20)


def test_report_of_an_uncompressed_residual_network_prunes_across_the_graph(tmp_path):
    # ResNet-20 at width 1/4 (4, 8, 16 channels) on a tiny CIFAR folder; by hand, channel 0 of blocks.0.conv1
    # (read by conv2 only) and of blocks.0.conv2 (summed with the stem's output) get log alpha 5 > -3
    # (the other groups keep their initial log alpha, near -9); no training: the run directory is written here
    write_cifar(tmp_path / "cifar")
    run = tmp_path / "run"
    run.mkdir()
    torch.manual_seed(0)
    net = build_network("resnet20", "gnj", input_shape=(3, 8, 8), width=0.25)
    network = net.state_dict()
    for layer in ("blocks.0.conv1", "blocks.0.conv2"):
        network[f"body.{layer}.prior.z_mu"][0] = 1.0
        network[f"body.{layer}.prior.z_logvar"][0] = 5.0
    config = TrainConfig(model="resnet20", width=0.25, epochs=0, val_size=10, data=str(tmp_path / "cifar"))
    save_checkpoint(run / "checkpoint.pt", {"config": dataclasses.asdict(config), "epoch": 0, "network": network,
                                            "optimizer": {}, "rng": {}, "metrics": [], "input_shape": [3, 8, 8]})
    text = write_report(run, num_samples=5).read_text()
    # the sum keeps the union: blocks.0.conv2's channel 0 stays, blocks.0.conv1's goes (a flat pruning drops both)
    full = [4] * 7 + [8] * 7 + [16] * 8
    full[1] = 3
    assert f"the groups kept would be {'-'.join(map(str, full))}." in text
    assert compress_run(run, tmp_path / "MODEL.bcz")["architecture"] == "-".join(map(str, full))
    model = codec.read_bcz(tmp_path / "MODEL.bcz")  # the file keeps the width: evaluate's original is the same net
    original = original_network(model.metadata, model.input_shape)
    assert model.metadata["width"] == 0.25
    assert sum(p.numel() for p in original.parameters()) == sum(
        p.numel() for p in build_network("resnet20", width=0.25).posterior_mean_network().parameters())


@pytest.mark.slow
def test_report_does_not_import_training():
    code = "import sys, pyro_bc.runs.report; print('pyro_bc.train.loop' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_report_with_predictions(lenet300_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(lenet300_run[0], run)
    summary = compress_run(run, run / "BAYES.bcz", keep_variance=True)
    report = write_report(run, run / "BAYES.bcz", num_samples=5, predictive_samples=1)
    text = report.read_text()
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in text.splitlines()
            if line.startswith("| ") and line.count(" | ") == 7}
    assert set(rows) >= {"full posterior", "posterior mean", "compressed Bayesian", "compressed deterministic"}
    # errors from the probabilities against those compress measured from the logits
    assert rows["posterior mean"][2] == f"{summary['error_posterior_mean']:.2f}"
    assert rows["compressed deterministic"][2] == f"{summary['error_compressed']:.2f}"
    for name in ("reliability", "entropy", "rotation"):
        _assert_png(run / "figures" / f"{name}.png")
        assert f"(figures/{name}.png)" in text
    dt = load_datatree(run / "posterior.nc")
    assert dt["predictions"]["class_probs"].shape == (1, 5, 100, 10)
    assert "| predictions | class_probs | chain, draw, example, class | 1x5x100x10 |" in text


def test_report_of_a_python_fit_run_takes_the_network_and_test_examples(tmp_path):
    """A run of pyro_bc.fit records neither network nor data: write_report takes both. Non-image inputs (vectors)
    get the predictions without the rotation column; the posterior mean's error in the table is the posterior-mean
    network's, counted here from its logits."""
    import pyro_bc

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(160, 12, generator=g), torch.randint(0, 3, (160,), generator=g)
    net = pyro_bc.bayesianize(torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)))
    (record,) = pyro_bc.fit(net, (x[:128], y[:128]), epochs=1, batch_size=32, out=tmp_path, progress=False)
    with pytest.raises(ConfigError, match="does not record its data") as info:
        write_report(tmp_path, net=net, num_samples=5, predictive_samples=1)
    assert "\n" not in str(info.value)
    pyro_bc.compress(net, tmp_path / "MODEL.bcz", thresholds=[-3.0, -3.0])  # no test examples: no test errors
    text = write_report(tmp_path, net=net, num_samples=5, predictive_samples=2, test=(x[128:], y[128:])).read_text()
    assert "| test error, compressed | – |" in text and "| compressed deterministic |" in text
    with torch.no_grad():
        expected = 100 * (net.posterior_mean_network()(x[128:]).argmax(1) != y[128:]).float().mean().item()
    row = next(line.split(" | ") for line in text.splitlines() if line.startswith("| posterior mean |"))
    assert row[2] == f"{expected:.2f}" and row[6] == "-"
    assert f"ELBO per example {record['elbo']:.4f}, train error {record['train_error']:.2f}%, validation error –." \
        in text
    assert (tmp_path / "figures" / "reliability.png").is_file() and not (tmp_path / "figures" / "rotation.png").exists()
    assert load_datatree(tmp_path / "posterior.nc")["predictions"]["class_probs"].shape == (1, 5, 32, 3)
    assert net.training  # the report works on a copy in eval mode
    done = subprocess.run([sys.executable, "-m", "pyro_bc.cli", "report", str(tmp_path)], capture_output=True, check=False,
                          text=True)
    assert done.returncode == 1 and "write_report(run_dir, net=net)" in done.stderr


class _Segmenter(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(2, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(6, 3, 1))

    def forward(self, x):
        return self.body(x).movedim(1, -1)


def test_report_of_a_network_labelling_each_pixel_scores_the_pixels(tmp_path):
    """A segmenter (a class per pixel): the predictions table's posterior-mean error is over the test pixels, counted
    here from its logits; images, but no rotation (it would move the pixels' labels); the ArviZ predictions keep the
    pixels as dimensions."""
    import pyro_bc

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(80, 2, 6, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    net = pyro_bc.bayesianize(_Segmenter(), input_shape=(2, 6, 6))
    pyro_bc.fit(net, (x[:64], y[:64]), epochs=2, batch_size=16, lr=1e-2, out=tmp_path, progress=False)
    pyro_bc.compress(net, tmp_path / "MODEL.bcz", thresholds=[-3.0, -3.0])
    text = write_report(tmp_path, net=net, num_samples=3, predictive_samples=2, test=(x[64:], y[64:])).read_text()
    with torch.no_grad():
        expected = 100 * (net.posterior_mean_network()(x[64:]).argmax(-1) != y[64:]).float().mean().item()
    row = next(line.split(" | ") for line in text.splitlines() if line.startswith("| posterior mean |"))
    assert row[2] == f"{expected:.2f}" and row[6] == "-"
    assert (tmp_path / "figures" / "reliability.png").is_file() and not (tmp_path / "figures" / "rotation.png").exists()
    probs = load_datatree(tmp_path / "posterior.nc")["predictions"]["class_probs"]
    assert probs.shape == (1, 3, 16, 6, 6, 3) and probs.dims[2:4] == ("example", "position_0")
