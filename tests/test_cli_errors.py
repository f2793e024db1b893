"""A user's mistakes at the command line, one table: each gives exactly one line on stderr (``pyro-bc COMMAND:
error: ...``, naming the value and the problem, the usage block kept for ``--help``), its exit status (2 for
arguments the parser refuses, 1 for the rest), nothing on stdout, and leaves every file as it was: nothing
written, nothing lost (the inputs' bytes and the working folder are compared before and after).

Everything runs in process (``pyro_bc.cli.main``) on tiny seeded inputs made once per module.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import pytest
import torch
from tiny_data import SIDE, PLAIN_NET_3x8x8, write_npz
from torch import nn

import pyro_bc
from pyro_bc.cli import main
from pyro_bc.data.datasets import DEFAULT_DATA_DIR
from pyro_bc.errors import ConfigError
from pyro_bc.runs.compressing import evaluate_file
from pyro_bc.runs.training import train
from pyro_bc.train.run_dir import CHECKPOINT, TrainConfig

SMALL = ["--subset", "200", "--batch-size", "100", "--val-size", "500", "--seed", "1"]


@pytest.fixture(scope="module")
def inputs(run, tmp_path_factory) -> dict[str, Path]:
    """The files a user points the commands at: a LeNet-300-100 run and its ``.bcz``; a 3 x 8 x 8 npz folder, a
    run on it and its ``.bcz``; a ``.bcz`` and a run written from Python; a corrupt ``.bcz``; a network file
    without ``build``."""
    d = tmp_path_factory.mktemp("inputs")
    assert main(["compress", str(run), "--out", str(run / "MODEL.bcz")]) == 0
    write_npz(d / "npz" / "train.npz", 5100, seed=0)  # more than the default validation split
    write_npz(d / "npz" / "test.npz", 20, seed=1)
    write_npz(d / "small" / "train.npz", 300, seed=2)  # fewer than the default validation split
    write_npz(d / "small" / "test.npz", 20, seed=3)
    (d / "net.py").write_text(PLAIN_NET_3x8x8)
    (d / "nobuild.py").write_text("x = 1\n")
    (d / "raises.py").write_text("def build():\n    return 1 / 0\n")
    (d / "returns.py").write_text("def build():\n    return 1\n")
    (d / "three.py").write_text(PLAIN_NET_3x8x8.replace("nn.Linear(4 * 8 * 8, 10)", "nn.Linear(4 * 8 * 8, 3)"))
    torch.manual_seed(0)
    train(TrainConfig(model=str(d / "net.py"), data=str(d / "npz"), epochs=1, val_size=20, subset=200), d / "rgb",
          progress=False)
    assert main(["compress", str(d / "rgb"), "--out", str(d / "rgb" / "MODEL.bcz")]) == 0
    net = pyro_bc.bayesianize(nn.Sequential(nn.Flatten(), nn.Linear(3 * SIDE * SIDE, 10)), prior="gnj")
    x, y = torch.randn(40, 3, SIDE, SIDE), torch.arange(40) % 10
    pyro_bc.fit(net, (x, y), epochs=0, out=d / "pyrun", progress=False)
    pyro_bc.compress(net, d / "py.bcz", val=(x, y))
    (d / "corrupt.bcz").write_bytes(b"BCZ2 this is not a compressed network")
    torch.save(torch.zeros(3), d / "tensor.pt")
    return {"run": run, "bcz": run / "MODEL.bcz", "npz": d / "npz", "small": d / "small", "net": d / "net.py", "nobuild": d / "nobuild.py",
            "raises": d / "raises.py", "returns": d / "returns.py", "three": d / "three.py",
            "rgb": d / "rgb", "rgb_bcz": d / "rgb" / "MODEL.bcz", "pyrun": d / "pyrun", "py_bcz": d / "py.bcz",
            "corrupt": d / "corrupt.bcz", "tensor": d / "tensor.pt", "mnist": DEFAULT_DATA_DIR, "missing": d / "no-such-thing"}


def _files(*folders: Path) -> dict[str, str]:
    """Every file under ``folders``: path -> SHA-256 of its bytes."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in folders for p in sorted(folder.rglob("*")) if p.is_file()}


# (argv with {names} of the inputs and {out} for a path in the empty working folder, exit status, a fragment of
# the line that names the value or the problem)
MISTAKES = [
    # the parser: exit 2
    ([], 2, "required: command"),
    (["frobnicate"], 2, "invalid choice: 'frobnicate'"),
    (["train", "--prior", "bogus", "--out", "{out}"], 2, "'bogus'"),
    (["train", "--model", "alexnet", "--out", "{out}"], 2, "unknown model 'alexnet'"),
    (["train", "--epochs", "-1", "--out", "{out}"], 2, "'-1' must be at least 0"),
    (["train", "--seed", "-1", "--out", "{out}"], 2, "'-1' must be at least 0"),
    (["train", "--epochs", "1.5", "--out", "{out}"], 2, "'1.5' is not a whole number"),
    (["train", "--batch-size", "0", "--out", "{out}"], 2, "'0' must be at least 1"),
    (["train", "--lr", "nan", "--out", "{out}"], 2, "'nan' is not a finite number"),
    (["train", "--lr", "-0.1", "--out", "{out}"], 2, "'-0.1' must be positive"),
    (["train", "--val-size", "-1", "--out", "{out}"], 2, "'-1' must be at least 0"),
    (["train", "--width", "0", "--out", "{out}"], 2, "'0' must be positive"),
    (["train", "--clip-var", "fc1", "--out", "{out}"], 2, "'fc1' is not LAYER=VARIANCE"),
    (["train", "--device", "tpu", "--out", "{out}"], 2, "'tpu'"),
    (["train", "--lr-schedule", "linear", "--out", "{out}"], 2, "'linear'"),
    (["train", "--epochs", "1"], 2, "required: --out"),
    (["train", "--out", "{out}", "--bogus-flag"], 2, "unrecognized arguments: --bogus-flag"),
    (["compress"], 2, "required: run_dir, --out"),
    (["compress", "{run}"], 2, "required: --out"),
    (["compress", "{run}", "--out", "{out}.bcz", "--thresholds", "1", "--auto", "gap"], 2, "not allowed with"),
    (["compress", "{run}", "--out", "{out}.bcz", "--auto", "median"], 2, "'median'"),
    (["compress", "{run}", "--out", "{out}.bcz", "--thresholds", "-3", "inf", "-3"], 2, "'inf' is not a finite"),
    (["compress", "{run}", "--out", "{out}.bcz", "--bits-budget", "-1"], 2, "'-1' must not be negative"),
    (["evaluate"], 2, "required: model"),
    (["export", "{bcz}", "--format", "tflite", "--out", "{out}"], 2, "'tflite'"),
    (["export", "{bcz}", "--out", "{out}"], 2, "required: --format"),
    (["recode", "{bcz}", "--out", "{out}.bcz", "--bias", "int3"], 2, "'int3'"),
    (["demo", "--epochs", "0", "--out", "{out}"], 2, "'0' must be at least 1"),
    # everything else: exit 1
    (["train", "--model", "{missing}.py", "--epochs", "1", "--out", "{out}", *SMALL], 1, "no-such-thing.py"),
    (["train", "--model", "{nobuild}", "--epochs", "1", "--out", "{out}", *SMALL], 1, "build"),
    (["train", "--model", "{raises}", "--epochs", "1", "--out", "{out}", *SMALL], 1, "build() failed: ZeroDivisionError"),
    (["train", "--model", "{returns}", "--epochs", "1", "--out", "{out}", *SMALL], 1, "build() returned int"),
    (["train", "--data", "{missing}", "--epochs", "1", "--out", "{out}"], 1, "no-such-thing"),
    (["train", "--data", "{npz}", "--epochs", "1", "--out", "{out}", "--val-size", "20"], 1, "shape (3, 8, 8)"),
    (["train", "--val-size", "60000", "--epochs", "1", "--out", "{out}"], 1, "val_size must be"),
    (["train", "--epochs", "1", "--out", "{run}", *SMALL], 1, ("already holds a run: give a new output directory, or "
                                                             "resume it (--resume")),
    (["train", "--model", "{net}", "--data", "{small}", "--epochs", "1", "--out", "{out}"], 1,
     ("val_size must be an integer in 0..299 (training examples: 300), got 5000 (the default; a tenth of the examples "
     "would be 30)")),
    (["train", "--model", "{net}", "--epochs", "1", "--out", "{out}", *SMALL], 1,
     "the embedded MNIST): give data of the network's input shape with --data DIR"),
    (["train", "--model", "{three}", "--data", "{npz}", "--epochs", "1", "--out", "{out}", "--val-size", "20"], 1,
     "class labels run from 0 to 9, but the network has 3 outputs"),
    (["train", "--init-from", "{tensor}", "--epochs", "1", "--out", "{out}", *SMALL], 1, "holds a Tensor, not a state_dict"),
    (["train", "--clip-var", "fc9=0.1", "--epochs", "1", "--out", "{out}", *SMALL], 1, "fc9"),
    (["train", "--init-from", "{missing}.pt", "--epochs", "1", "--out", "{out}", *SMALL], 1, "--init-from"),
    (["train", "--resume", "--epochs", "2", "--out", "{out}"], 1, "no checkpoint"),
    (["train", "--resume", "--model", "lenet5", "--epochs", "2", "--out", "{run}"], 1, "lenet300/gnj run, not lenet5"),
    (["train", "--resume", "--prior", "ghs", "--epochs", "2", "--out", "{run}"], 1, "lenet300/gnj run, not lenet300/ghs"),
    (["train", "--resume", "--epochs", "2", "--out", "{pyrun}"], 1, "pyro_bc.fit"),
    (["compress", "{missing}", "--out", "{out}.bcz"], 1, "no checkpoint"),
    (["compress", "{pyrun}", "--out", "{out}.bcz"], 1, "a run of pyro_bc.fit"),
    (["compress", "{run}", "--out", "{out}.bcz", "--thresholds", "-3", "-3"], 1, "threshold"),
    (["compress", "{run}", "--out", "{out}.bcz", "--thresholds", "-99", "-99", "-99"], 1, "no weight"),
    (["compress", "{run}", "--out", "{missing}/MODEL.bcz"], 1, "no-such-thing"),
    (["compress", "{rgb}", "--out", "{out}.bcz", "--data", "{mnist}"], 1, "3x8x8: give the run's data with --data"),
    (["compress", "{run}", "--out", "{out}.bcz", "--data", "{npz}"], 1, "1x28x28: give the run's data with --data"),
    (["evaluate", "{rgb_bcz}"], 1, "the embedded MNIST holds examples of shape 1x28x28, but"),
    (["evaluate", "{bcz}", "--data", "{npz}"], 1, "takes 1x28x28: give the data it was trained on with --data"),
    (["evaluate", "{py_bcz}"], 1, "written by pyro_bc.compress from tensors"),
    (["evaluate", "{py_bcz}", "--data", "{npz}"], 1, "does not record the validation split"),
    (["evaluate", "{missing}.bcz"], 1, "no-such-thing.bcz"),
    (["evaluate", "{corrupt}"], 1, "corrupt.bcz"),
    (["evaluate", "{bcz}", "--data", "{missing}"], 1, "no-such-thing"),
    (["export", "{corrupt}", "--format", "onnx", "--out", "{out}.onnx"], 1, "corrupt.bcz"),
    (["export", "{bcz}", "--format", "onnx", "--out", "{missing}/m.onnx"], 1, "no-such-thing"),
    (["recode", "{missing}.bcz", "--out", "{out}.bcz"], 1, "no-such-thing.bcz"),
    (["recode", "{corrupt}", "--out", "{out}.bcz"], 1, "corrupt.bcz"),
    (["report", "{missing}"], 1, "no-such-thing"),
]


def _call(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # the parser's refusals
        return e.code


@pytest.mark.parametrize("argv, status, fragment", MISTAKES, ids=[" ".join(m[0])[:60] for m in MISTAKES])
def test_a_mistake_is_one_line_with_its_exit_status_and_touches_no_file(inputs, tmp_path, monkeypatch, capsys,
                                                                         argv, status, fragment):
    monkeypatch.chdir(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    argv = [a.format(out=work / "out", **inputs) for a in argv]
    folders = (inputs["run"], inputs["npz"].parent, work)
    before = _files(*folders)
    capsys.readouterr()
    assert _call(argv) == status
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert len(lines) == 1, err
    command = f"pyro-bc {argv[0]}" if argv and argv[0] in {"train", "compress", "evaluate", "export", "recode",
                                                           "report", "demo"} else "pyro-bc"
    assert lines[0].startswith(f"{command}: error: "), lines[0]
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in err and "usage:" not in err
    assert out == ""
    assert _files(*folders) == before  # nothing written, nothing lost
    assert list(work.iterdir()) == []  # not even an empty run directory
    assert list(tmp_path.iterdir()) == [work]


def test_there_are_at_least_forty_mistakes():
    assert len(MISTAKES) >= 40


def test_help_still_prints_the_usage(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: pyro-bc train")


def test_epochs_0_leaves_a_run_that_resumes_as_if_never_stopped(tmp_path, capsys):
    """``--epochs 0`` writes an initialised run (checkpoint at epoch 0); resuming it for one epoch gives the
    parameters of one uninterrupted epoch, bit for bit, and ``compress`` works on it."""
    assert main(["train", "--epochs", "0", "--out", str(tmp_path / "a"), *SMALL]) == 0
    assert "0 epochs (initialised only)" in capsys.readouterr().out
    assert main(["compress", str(tmp_path / "a"), "--out", str(tmp_path / "a0.bcz")]) == 0
    assert main(["train", "--epochs", "1", "--resume", "--out", str(tmp_path / "a")]) == 0  # model, prior: the run's
    assert main(["train", "--epochs", "1", "--out", str(tmp_path / "b"), *SMALL]) == 0
    a = torch.load(tmp_path / "a" / CHECKPOINT, weights_only=True)
    b = torch.load(tmp_path / "b" / CHECKPOINT, weights_only=True)
    assert a["epoch"] == b["epoch"] == 1
    for key, value in b["network"].items():
        assert torch.equal(a["network"][key], value), key


def test_resume_takes_model_and_prior_from_the_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--model", "lenet5", "--prior", "lu", "--epochs", "0", "--out", str(run), *SMALL]) == 0
    assert main(["train", "--resume", "--epochs", "0", "--out", str(run)]) == 0
    assert "trained lenet5/lu: 0 epochs" in capsys.readouterr().out


def test_init_from_by_order_warns_in_one_line(tmp_path, capsys):
    dense = nn.Sequential(nn.Linear(784, 300), nn.Linear(300, 100), nn.Linear(100, 10))
    torch.save(dense.state_dict(), tmp_path / "dense.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert main(["train", "--epochs", "0", "--init-from", str(tmp_path / "dense.pt"), "--out",
                     str(tmp_path / "run"), *SMALL]) == 0
    err = capsys.readouterr().err
    expected = "pyro-bc train: warning: init state's weight names do not match the layers (fc1, fc2, fc3): matched in order"
    assert err.splitlines() == [expected], err


@pytest.mark.parametrize("first_epoch", [False, True])
def test_ctrl_c_says_whether_a_checkpoint_is_left(tmp_path, monkeypatch, capsys, first_epoch):
    run = tmp_path / "run"
    if first_epoch:
        assert main(["train", "--epochs", "0", "--out", str(run), *SMALL]) == 0
        capsys.readouterr()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("pyro_bc.cli.train", interrupted)
    assert main(["train", "--epochs", "1", "--out", str(run), *SMALL]) == 130
    err = capsys.readouterr().err
    expected = (f"interrupted; the last checkpoint {run / CHECKPOINT} is intact" if first_epoch
                else "interrupted before the first checkpoint; there is nothing to resume")
    assert err.splitlines() == [f"pyro-bc train: {expected}" + (" (--resume continues from it)" if first_epoch
                                                                 else "")]


def test_a_python_file_evaluates_with_its_split_recorded(inputs, tmp_path):
    """With ``metadata={"val_size", "seed"}`` a file written from Python evaluates on a folder of its shape: the
    error is the loaded network's on that folder's test set, normalised by the same split (computed here by hand
    from the npz's training images)."""
    import numpy as np

    net = pyro_bc.bayesianize(nn.Sequential(nn.Flatten(), nn.Linear(3 * SIDE * SIDE, 10)), prior="gnj")
    x, y = torch.randn(40, 3, SIDE, SIDE), torch.arange(40) % 10
    pyro_bc.compress(net, tmp_path / "py.bcz", val=(x, y), metadata={"val_size": 20, "seed": 3})
    train_npz, test_npz = np.load(inputs["npz"] / "train.npz"), np.load(inputs["npz"] / "test.npz")
    keep = np.random.default_rng(3).permutation(5100)[:5080]  # the training part of the split
    images = train_npz["x"][keep].astype(np.float64) / 255
    mean, std = images.mean(axis=(0, 2, 3)), images.std(axis=(0, 2, 3))
    test_x = (test_npz["x"] / 255 - mean[:, None, None]) / std[:, None, None]
    logits = pyro_bc.load(tmp_path / "py.bcz")(torch.as_tensor(test_x, dtype=torch.float32))
    expected = 100 * (logits.argmax(1).numpy() != test_npz["y"]).mean()
    assert evaluate_file(tmp_path / "py.bcz", data=str(inputs["npz"]))["error"] == pytest.approx(expected)
    with pytest.raises(ConfigError, match="tensors"):
        evaluate_file(inputs["py_bcz"])
