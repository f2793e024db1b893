"""The command line, ``pyro-bc`` (``pyro_bc.cli.main`` in process, ``python -m pyro_bc.cli`` in a subprocess):
each command's output and exit status, arguments refused with exit 2, errors as one line with exit 1,
and kill / resume and divergence of ``train`` as a user meets them.

Everything is seeded; two subprocess starts dominate the time of the kill-and-resume case (importing pyro
takes several seconds).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import masked_reference
import numpy as np
import pytest
import torch

from pyro_bc.bcz import codec
from pyro_bc.cli import main
from pyro_bc.compression.posterior import analyse
from pyro_bc.data.datasets import load_mnist
from pyro_bc.errors import ConfigError
from pyro_bc.runs.load import load_run
from pyro_bc.runs.training import train
from pyro_bc.train.checkpoint import load_checkpoint, save_checkpoint
from pyro_bc.train.run_dir import CHECKPOINT, LOCK, METRICS, TrainConfig

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--subset", "200", "--batch-size", "100", "--val-size", "500", "--seed", "1"]


def _metrics_epochs(run_dir: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run_dir / METRICS).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def compressed_run(run):
    """The run, compressed by ``pyro-bc compress`` at the priors' defaults into ``RUN_DIR/MODEL.bcz``."""
    assert main(["compress", str(run), "--out", str(run / "MODEL.bcz")]) == 0
    return run


# -- train --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, text", [
    (["--prior", "bogus"], "bogus"),
    (["--epochs", "-1"], "-1"),
    (["--lr", "nan"], "nan"),
    (["--lr", "-0.1"], "-0.1"),
    (["--batch-size", "0"], "'0'"),
    (["--model", "alexnet"], "alexnet"),
])
def test_cli_rejects_bad_values(tmp_path, capsys, args, text):
    with pytest.raises(SystemExit) as info:
        main(["train", *args, "--out", str(tmp_path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert text in err and "error" in err
    assert not (tmp_path / "checkpoint.pt").exists()


def test_cli_train_and_error_exit(tmp_path, capsys):
    assert main(["train", "--epochs", "1", "--subset", "128", "--out", str(tmp_path / "ok")]) == 0
    assert "trained lenet300/gnj" in capsys.readouterr().out
    assert (tmp_path / "ok" / "checkpoint.pt").exists()
    assert main(["train", "--resume", "--out", str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err
    assert "no checkpoint" in err and "Traceback" not in err


def test_cli_trains_and_compresses_without_validation_examples(tmp_path, capsys):
    """``--val-size 0``: the run trains on every example and records no validation error; ``compress`` at given
    thresholds writes a file whose test error a recount gives, the validation-budget rule is refused in one line,
    exit 1, nothing written; ``report`` and ``finetune`` work without validation examples too."""
    run = tmp_path / "all"
    args = ["train", "--prior", "lu", "--epochs", "1", "--subset", "200", "--batch-size", "100", "--val-size", "0",
            "--out", str(run)]
    assert main(args) == 0
    assert "1 epochs (no validation examples)" in capsys.readouterr().out
    record = json.loads((run / METRICS).read_text().splitlines()[-1])
    assert "val_error" not in record and "train_error" in record
    assert load_checkpoint(run / CHECKPOINT)["config"]["val_size"] == 0
    assert main(["compress", str(run), "--out", str(run / "MODEL.bcz"), "--thresholds", "3", "3", "3"]) == 0
    summary = json.loads((run / "MODEL.json").read_text())
    assert summary["val_error_compressed"] is None
    test = load_mnist(val_size=0).test
    with torch.no_grad():
        wrong = (codec.load(run / "MODEL.bcz")(test.x).argmax(1) != test.y).sum().item()
    assert summary["error_compressed"] == pytest.approx(100 * wrong / len(test))
    capsys.readouterr()
    assert main(["compress", str(run), "--out", str(run / "B.bcz"), "--max-error-increase", "0.1"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs validation examples and there are none" in err
    assert not (run / "B.bcz").exists()
    assert main(["report", str(run)]) == 0
    assert "validation error –" in (run / "report.md").read_text()
    tuned = tmp_path / "tuned"  # fine-tuned at the same cut, still on every example
    assert main(["finetune", str(run), "--epochs", "1", "--thresholds", "3", "3", "3", "--out", str(tuned)]) == 0
    assert "val_error" not in json.loads((tuned / METRICS).read_text().splitlines()[-1])


def test_cli_budget_of_weights_kept_compresses_and_finetunes_without_validation_examples(tmp_path, capsys):
    """``--max-weights-kept P`` needs no validation examples: ``compress`` keeps at most P% of the weights (per
    weight for lu, so within a few weights of P%) at one threshold for every layer, and ``finetune`` starts from the
    same cut."""
    run = tmp_path / "all"
    assert main(["train", "--prior", "lu", "--epochs", "1", "--subset", "200", "--batch-size", "100", "--val-size",
                 "0", "--out", str(run)]) == 0
    assert main(["compress", str(run), "--out", str(run / "MODEL.bcz"), "--max-weights-kept", "5"]) == 0
    summary = json.loads((run / "MODEL.json").read_text())
    assert summary["threshold_rule"] == {"name": "max-weights-kept", "settings": {"max_weights_kept": 5.0}}
    assert summary["threshold_method"] == "at most 5% of weights kept"
    assert 0.0499 < summary["weights_kept_fraction"] <= 0.05
    thresholds = [layer["threshold"] for layer in summary["layers"]]
    assert len(set(thresholds)) == 1
    tuned = tmp_path / "tuned"
    assert main(["finetune", str(run), "--epochs", "1", "--max-weights-kept", "5", "--out", str(tuned)]) == 0
    assert json.loads((tuned / "config.json").read_text())["finetune"]["thresholds"] == thresholds


# -- compress -----------------------------------------------------------------------------------------------

def test_cli_compress_prints_the_table_and_records_the_rule(compressed_run, capsys):
    summary = json.loads((compressed_run / "MODEL.json").read_text())
    assert summary["threshold_rule"] == {"name": "prior-default", "settings": {}}
    assert summary["threshold_method"] == "default -3"
    assert main(["compress", str(compressed_run), "--out", str(compressed_run / "GAP.bcz"), "--auto", "gap"]) == 0
    out = capsys.readouterr().out
    assert "architecture" in out and f"wrote {compressed_run / 'GAP.bcz'} and {compressed_run / 'GAP.json'}" in out
    assert json.loads((compressed_run / "GAP.json").read_text())["threshold_rule"]["name"] == "gap"


def test_cli_nan_threshold_exits_2(run, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["compress", str(run), "--out", str(tmp_path / "x.bcz"), "--thresholds", "nan"])
    assert info.value.code == 2
    assert "'nan'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_cli_run_without_checkpoint_returns_1(tmp_path, capsys):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    assert main(["compress", str(empty), "--out", str(tmp_path / "x.bcz")]) == 1
    err = capsys.readouterr().err
    assert "no checkpoint" in err and len(err.strip().splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == ["empty_run"]


def test_fold_is_the_default_for_group_priors_and_no_fold_turns_it_off(run, tmp_path):
    """Both files against the masked reference built here (tests/masked_reference.py): the folded one's biases gain
    the pruned weights' E[w] times their inputs' means over the first 10,000 training images, the plain one's not."""
    net, config, _ = load_run(run)
    thresholds = [masked_reference.unambiguous_threshold(p.log_alpha) for p in analyse(net)]  # keeps about half
    x = load_mnist(config.data, val_size=config.val_size, seed=config.seed).train.x
    means = masked_reference.input_means(net, x[:10_000])
    outputs = {}
    for name, extra in (("folded", []), ("plain", ["--no-fold"])):
        path = tmp_path / f"{name}.bcz"
        assert main(["compress", str(run), "--out", str(path), "--thresholds", *map(repr, thresholds), *extra]) == 0
        outputs[name] = json.loads(path.with_suffix(".json").read_text()), codec.read_bcz(path)
    (folded, folded_file), (plain, plain_file) = outputs["folded"], outputs["plain"]
    assert folded["fold_pruned_inputs"] is True and plain["fold_pruned_inputs"] is False
    assert plain["architecture"] == folded["architecture"]  # the same pruning, other biases
    for summary, model, fold_means in ((folded, folded_file, means), (plain, plain_file, None)):
        reference = masked_reference.reference_params(net, summary, fold_means, rounded=True)
        biases = [item.bias for item in model.items if isinstance(item, codec.QuantizedLayer)]
        kept_outputs = [row["kept_groups"] for row in summary["layers"][1:]] + [list(range(10))]  # the next inputs
        for (_, want), got, rows in zip(reference, biases, kept_outputs):
            np.testing.assert_allclose(got, want[rows].numpy(), rtol=2**-10, atol=2**-24)  # to a float16 step


# -- evaluate -----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_cli_evaluate_reproduces_a_committed_result(capsys):
    path = REPO / "analysis" / "results" / "lenet5-gnj" / "MODEL.bcz"
    assert main(["evaluate", str(path)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["error"] == pytest.approx(1.13) and result["n"] == 10000
    test, module = load_mnist().test, codec.load(path)
    with torch.no_grad():
        wrong = sum(int((module(test.x[i:i + 1000]).argmax(1) != test.y[i:i + 1000]).sum()) for i in range(0, 10000, 1000))
    assert result["error"] == 100 * wrong / 10000  # counted here from the loaded file's outputs
    assert result["error"] == json.loads(path.with_suffix(".json").read_text())["error_compressed"]
    assert result["ms_per_batch_compressed"] > 0 and result["ms_per_batch_original"] > 0
    # NLL and Brier score by a second implementation: torch's cross entropy of the logits, the one-hot distance
    from pyro_bc.data.datasets import load_data
    from pyro_bc.metrics.scores import ece

    test = load_data(None).test
    with torch.no_grad():
        logits = codec.load(path)(test.x)
    probs = torch.softmax(logits.double(), -1)
    assert result["nll"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits.double(), test.y)), rel=1e-5)
    one_hot = torch.nn.functional.one_hot(test.y, 10).double()
    assert result["brier"] == pytest.approx(float(((probs - one_hot) ** 2).sum(-1).mean()), rel=1e-5)
    assert result["ece"] == pytest.approx(ece(probs, test.y), abs=1e-6)
    assert 0 < result["ece"] < result["brier"] < 2 * result["nll"]
    assert "sampled" not in result


def test_cli_evaluate_shift_and_ood(capsys, tmp_path):
    from tiny_data import write_cifar

    path = REPO / "analysis" / "results" / "lenet5-gnj" / "MODEL.bcz"
    cifar = write_cifar(tmp_path / "cifar", n_test=50)
    assert main(["evaluate", str(path), "--shift", "rotate", "--ood", str(cifar)]) == 0
    result = json.loads(capsys.readouterr().out)
    rotation = result["rotation"]
    assert rotation["degrees"][0] == 0 and rotation["degrees"][-1] == 180
    assert rotation["error"][0] == pytest.approx(result["error"]) and rotation["nll"][0] == pytest.approx(result["nll"])
    assert rotation["error"][6] > 50 > rotation["error"][0]  # turned sideways (90 degrees), most digits are misread
    assert result["ood"] == {"data": str(cifar), "n": 50, "auroc": result["ood"]["auroc"]}
    assert 0 <= result["ood"]["auroc"] <= 1 and 0 <= result["noise_auroc"] <= 1


@pytest.mark.parametrize("argv, message", [
    (["--ood", "/no/such/folder"], "/no/such/folder"),
])
def test_cli_evaluate_bad_ood_is_one_line(capsys, argv, message):
    path = REPO / "analysis" / "results" / "lenet5-gnj" / "MODEL.bcz"
    assert main(["evaluate", str(path), *argv]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err


def test_cli_evaluate_samples_of_a_file_without_variances_is_one_line(capsys):
    path = REPO / "analysis" / "results" / "lenet5-gnj" / "MODEL.bcz"
    assert main(["evaluate", str(path), "--samples", "3"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "keeps no posterior variances" in err and "--keep-variance" in err


def test_cli_compress_records_predictive_metrics(run, tmp_path):
    out = tmp_path / "MODEL.bcz"
    assert main(["compress", str(run), "--out", str(out), "--predictive-samples", "2"]) == 0
    summary = json.loads(out.with_suffix(".json").read_text())
    record = summary["predictive"]
    assert record["samples"] == 2
    assert set(record) == {"samples", "full_posterior", "posterior_mean", "compressed_deterministic"}
    # the deterministic networks' errors are the summary's own (computed from logits by pyro_bc.metrics.evaluate)
    assert record["posterior_mean"]["error"] == pytest.approx(summary["error_posterior_mean"])
    assert record["compressed_deterministic"]["error"] == pytest.approx(summary["error_compressed"])
    for metrics in record.values():
        if isinstance(metrics, dict):
            assert set(metrics) == {"error", "nll", "brier", "ece"} and all(np.isfinite(list(metrics.values())))
    assert main(["compress", str(run), "--out", str(out)]) == 0  # without the option: no record
    assert "predictive" not in json.loads(out.with_suffix(".json").read_text())


def test_cli_keep_variance_then_evaluate_the_sampled_network(run, tmp_path, capsys):
    out = tmp_path / "MODEL.bcz"
    assert main(["compress", str(run), "--out", str(out), "--keep-variance", "--predictive-samples", "2"]) == 0
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["file_bytes"] == out.stat().st_size > summary["file_bytes_without_variance"]
    assert summary["cr_file"] < summary["cr_file_without_variance"]
    assert set(summary["predictive"]["compressed_bayesian"]) == {"error", "nll", "brier", "ece"}
    capsys.readouterr()
    assert main(["evaluate", str(out), "--samples", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["error"] == pytest.approx(summary["error_compressed"])
    assert result["sampled"]["samples"] == 2
    # the same seeded draws as compress's record (both: seed 0, batches of 1000)
    sampled = {k: v for k, v in result["sampled"].items() if k != "noise_auroc"}
    assert sampled == pytest.approx({"samples": 2, **summary["predictive"]["compressed_bayesian"]})
    assert 0 <= result["sampled"]["noise_auroc"] <= 1


# -- report -------------------------------------------------------------------------------------------------

def test_cli_report(compressed_run, capsys):
    run = compressed_run
    assert main(["report", str(run), "--compressed", str(run / "MODEL.bcz")]) == 0
    assert capsys.readouterr().out.strip() == str(run / "report.md")


def test_cli_report_missing_json(compressed_run, capsys):
    run = compressed_run
    assert main(["report", str(run), "--compressed", str(run / "OTHER.bcz")]) == 1
    assert "OTHER.json" in capsys.readouterr().err


# -- bad arguments ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("argv", "named"), [
    (["train", "--out", "R", "--epochs", "abc"], "'abc'"),
    (["train", "--out", "R", "--batch-size", "0"], "'0'"),
    (["train", "--out", "R", "--lr", "-1"], "'-1'"),
    (["train", "--out", "R", "--lr", "inf"], "'inf'"),
    (["train", "--out", "R", "--prior", "xyz"], "'xyz'"),
    (["train", "--out", "R", "--model", "nosuchmodel"], "'nosuchmodel'"),
    (["train", "--epochs", "1"], "--out"),
    (["compress", "R", "--out", "x.bcz", "--thresholds", "1", "nan"], "'nan'"),
    (["compress", "R", "--out", "x.bcz", "--auto", "bogus"], "'bogus'"),
    (["compress", "R", "--out", "x.bcz", "--max-error-increase", "-1"], "'-1'"),
    (["compress", "R", "--out", "x.bcz", "--max-weights-kept", "0"], "'0'"),
    (["finetune", "R", "--out", "F", "--epochs", "1", "--max-weights-kept", "101"], "'101'"),
    (["compress", "R", "--out", "x.bcz", "--max-weights-kept", "5", "--thresholds", "1"], "--thresholds"),
    (["compress", "R", "--out", "x.bcz", "--auto", "gap", "--thresholds", "1"], "--thresholds"),
    (["evaluate"], "model"),
    (["evaluate", "M.bcz", "--samples", "-2"], "'-2'"),
    (["evaluate", "M.bcz", "--samples", "two"], "'two'"),
    (["evaluate", "M.bcz", "--shift", "shear"], "'shear'"),
    (["compress", "R", "--out", "x.bcz", "--predictive-samples", "1.5"], "'1.5'"),
    (["demo", "--epochs", "0"], "'0'"),
    (["nosuchcommand"], "'nosuchcommand'"),
])
def test_bad_cli_arguments_exit_2_naming_the_value(argv, named, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert named in err, err
    assert "Traceback" not in err
    assert not any(tmp_path.iterdir())  # nothing was written


# -- kill and resume ----------------------------------------------------------------------------------------

def _train_cmd(out: Path) -> list[str]:
    return [sys.executable, "-m", "pyro_bc.cli", "train", "--model", "lenet300", "--prior", "gnj", "--epochs", "4",
            "--subset", "600", "--batch-size", "100", "--val-size", "1000", "--seed", "3", "--out", str(out)]


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run_bit_for_bit(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    proc = subprocess.Popen(_train_cmd(run_a), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while True:
            metrics = run_a / METRICS
            if (run_a / CHECKPOINT).is_file() and metrics.is_file() and metrics.read_text().strip():
                break
            if proc.poll() is not None:
                pytest.fail(f"training exited ({proc.returncode}) before its first checkpoint: "
                            f"{proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("no checkpoint within 90 s")
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, "the run finished before the kill: the test would prove nothing"
    killed_at = load_checkpoint(run_a / CHECKPOINT)["epoch"]
    assert 1 <= killed_at < 4, killed_at
    assert (run_a / LOCK).read_text().strip().isdigit()  # the killed run's stale lock is still there
    leftover = run_a / f".{CHECKPOINT}.deadbeef.tmp"  # as a kill during an atomic write would leave it
    leftover.write_bytes(b"\x00garbage" * 100)

    done = subprocess.run(_train_cmd(run_a) + ["--resume"], cwd=REPO, env=env, capture_output=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    resumed = [int(line.split(":")[0].split()[1]) for line in done.stdout.decode().splitlines()
               if line.startswith("epoch ")]
    assert resumed == list(range(killed_at + 1, 5))  # it continued, it did not start over
    assert not (run_a / LOCK).exists()

    # The uninterrupted reference run, in-process (saves a pyro import); same seed, same thread count.
    assert main(_train_cmd(run_b)[3:]) == 0

    state_a, state_b = load_checkpoint(run_a / CHECKPOINT), load_checkpoint(run_b / CHECKPOINT)
    assert state_a["epoch"] == state_b["epoch"] == 4
    assert state_a["network"].keys() == state_b["network"].keys()
    for name, tensor in state_b["network"].items():
        assert torch.equal(state_a["network"][name], tensor), name
    assert _metrics_epochs(run_a) == _metrics_epochs(run_b) == [1, 2, 3, 4]
    assert [m["epoch"] for m in state_a["metrics"]] == [1, 2, 3, 4]


# -- non-finite numbers -------------------------------------------------------------------------------------

POISON_ENV = "PYRO_BC_TEST_POISON"

POISON_MODEL = textwrap.dedent(f"""
    import math
    import os

    import torch

    from models.lenet300 import build as build_lenet300
    from pyro_bc.nn.network import BayesianNet


    class PoisonedNet(BayesianNet):
        # LeNet-300-100 whose fc1 means turn to NaN at the next guide call once ${POISON_ENV} is set.
        def guide(self, *args, **kwargs):
            if os.environ.get("{POISON_ENV}"):
                with torch.no_grad():
                    self.body.fc1.weight_mu.fill_(math.nan)
            return super().guide(*args, **kwargs)


    def build(prior="gnj"):
        net = build_lenet300(prior)
        net.__class__ = PoisonedNet
        return net
""")


@pytest.fixture
def poison_model(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # models.lenet300 is imported from the repository root
    monkeypatch.syspath_prepend(str(REPO))
    monkeypatch.delenv(POISON_ENV, raising=False)
    path = tmp_path / "poisoned.py"
    path.write_text(POISON_MODEL)
    return path


def test_nan_from_the_first_step_exits_1_naming_epoch_step_and_parameter(poison_model, tmp_path, monkeypatch,
                                                                         capsys):
    monkeypatch.setenv(POISON_ENV, "1")
    run = tmp_path / "run"
    code = main(["train", "--model", str(poison_model), "--epochs", "2", "--out", str(run), *SMALL])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "epoch 1, step 1" in err
    assert "parameter" in err and "weight_mu" in err
    assert "no epoch finished, so there is no checkpoint" in err and "intact" not in err  # none was written
    assert "Traceback" not in err
    assert err.replace("\r", "\n").strip().splitlines()[-1].startswith("pyro-bc train: error: ")
    assert not (run / CHECKPOINT).exists() and not (run / LOCK).exists()


def test_divergence_after_a_good_epoch_keeps_the_last_checkpoint_intact(poison_model, tmp_path, monkeypatch,
                                                                        capsys):
    run = tmp_path / "run"
    args = ["train", "--model", str(poison_model), "--out", str(run), *SMALL]
    assert main([*args, "--epochs", "1"]) == 0
    before_ckpt, before_metrics = (run / CHECKPOINT).read_bytes(), (run / METRICS).read_bytes()
    capsys.readouterr()

    monkeypatch.setenv(POISON_ENV, "1")
    assert main([*args, "--epochs", "3", "--resume"]) == 1
    err = capsys.readouterr().err
    assert "epoch 2, step 1" in err and "weight_mu" in err, err
    assert f"last good checkpoint {run / CHECKPOINT} is intact" in err
    assert (run / CHECKPOINT).read_bytes() == before_ckpt
    assert (run / METRICS).read_bytes() == before_metrics
    assert not (run / LOCK).exists()
    assert not list(run.glob("*.tmp"))
    state = load_checkpoint(run / CHECKPOINT)
    assert state["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in state["network"].values())

    # Once the cause is gone, the run resumes from that checkpoint.
    monkeypatch.delenv(POISON_ENV)
    assert main([*args, "--epochs", "2", "--resume"]) == 0
    assert _metrics_epochs(run) == [1, 2]


# -- output directory ---------------------------------------------------------------------------------------

def test_output_under_a_regular_file_is_a_config_error_before_training(tmp_path, capsys):
    parent = tmp_path / "a_file"
    parent.write_text("x")
    out = parent / "run"
    started = time.perf_counter()
    with pytest.raises(ConfigError, match="a_file"):
        train(TrainConfig(epochs=1, subset=200, val_size=500), out, progress=False)
    assert main(["train", "--epochs", "1", "--out", str(out), *SMALL]) == 1
    err = capsys.readouterr().err
    assert str(out) in err and err.count("\n") == 1
    assert time.perf_counter() - started < 5  # refused up front: no data loading, no training
    assert parent.read_text() == "x"


def test_live_lock_refuses_a_second_training(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK).write_text(str(os.getpid()))  # this test process is alive
    assert main(["train", "--epochs", "1", "--out", str(run), *SMALL]) == 1
    err = capsys.readouterr().err
    assert f"pid {os.getpid()}" in err and "already running" in err, err
    assert (run / LOCK).read_text() == str(os.getpid())  # the other training's lock is left alone
    assert not (run / CHECKPOINT).exists() and not (run / METRICS).exists()


def test_a_model_file_imports_its_neighbours_and_its_run_is_found_from_any_folder(tmp_path, monkeypatch):
    """As Python runs a script: the model file's folder is on sys.path while it is imported and built. The run records
    the file and the data folder by absolute paths, so compress and a resume work from another folder; a run that
    recorded the file relative (before) resumes when given the same file by another path."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "heads.py").write_text("from torch import nn\n\ndef head(k):\n    return nn.Linear(16, k)\n")
    (project / "net.py").write_text("from torch import nn\nfrom heads import head\n\n"
                                    "def build():\n    return nn.Sequential(nn.Flatten(), nn.Linear(784, 16), "
                                    "nn.ReLU(), head(10))\n")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--model", "project/net.py", "--epochs", "1", "--out", "run", *SMALL]) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"] == str(project / "net.py") and config["data"] is None  # None: the embedded MNIST
    monkeypatch.chdir(project)
    assert main(["compress", str(tmp_path / "run"), "--out", str(tmp_path / "M.bcz")]) == 0
    assert main(["train", "--out", "../run", "--resume", "--epochs", "2"]) == 0
    state = load_checkpoint(tmp_path / "run" / CHECKPOINT)
    state["config"]["model"] = "project/net.py"  # recorded as given, relative to tmp_path, by an older version
    save_checkpoint(tmp_path / "run" / CHECKPOINT, state)
    assert main(["train", "--model", "net.py", "--out", "../run", "--resume", "--epochs", "3"]) == 1  # elsewhere
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--model", str(project / "net.py"), "--out", "run", "--resume", "--epochs", "3"]) == 0
    monkeypatch.delitem(sys.modules, "heads")
    (tmp_path / "lenet300").write_text("")  # a file named as a built-in network does not shadow it
    assert main(["train", "--model", "lenet300", "--epochs", "0", "--subset", "100", "--out", "plain"]) == 0
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["model"] == "lenet300"
    from pyro_bc.cli import _train_config, build_parser

    args = build_parser().parse_args(["train", "--data", "some/folder", "--out", "run"])
    assert _train_config(args).data == str(tmp_path / "some" / "folder")
