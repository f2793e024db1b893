"""The training loop: outputs, determinism, exact resume, and clear errors for bad inputs."""

import json
import math
import warnings
from collections import OrderedDict

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine
from tiny_data import PLAIN_NET_3x8x8, write_cifar
from torch import nn

from models import build_network
from pyro_bc.cli import main
from pyro_bc.data.augment import augment, augment_generator
from pyro_bc.errors import CheckpointError, ConfigError, TrainingDiverged
from pyro_bc.nn.layers import BayesLinear
from pyro_bc.nn.network import BayesianNet
from pyro_bc.priors import make_prior
from pyro_bc.runs.training import train
from pyro_bc.train.checkpoint import load_checkpoint
from pyro_bc.train.loop import NegativeELBO, make_optimizer, svi_step
from pyro_bc.train.run_dir import TrainConfig
from pyro_bc.train.schedule import epoch_lr


def _cfg(**kw):
    base = {"model": "lenet300", "prior": "gnj", "epochs": 1, "subset": 512, "val_size": 5000, "batch_size": 128}
    base.update(kw)
    return TrainConfig(**base)


def _network_state(run_dir):
    return load_checkpoint(run_dir / "checkpoint.pt")["network"]


def _assert_states_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("prior", ["gnj", "ghs", "lu"])
def test_one_epoch_writes_outputs(tmp_path, prior):
    last = train(_cfg(prior=prior), out=tmp_path, progress=False)
    assert {p.name for p in tmp_path.iterdir()} >= {"checkpoint.pt", "metrics.jsonl", "config.json"}
    assert not (tmp_path / ".lock").exists()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert {"epoch", "elbo", "train_error", "val_error", "groups_kept"} <= record.keys()
    assert record["epoch"] == 1 and record == {**last, "epoch": 1}
    assert all(isinstance(record[k], float) for k in ("elbo", "train_error", "val_error"))
    assert 0 <= record["train_error"] <= 100 and 0 <= record["val_error"] <= 100
    names = build_network("lenet300", prior).layer_names
    assert list(record["groups_kept"]) == names and len(names) == 3
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["prior"] == prior and config["epochs"] == 1 and config["subset"] == 512
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["epoch"] == 1 and state["config"]["prior"] == prior


def test_same_seed_same_parameters(tmp_path):
    train(_cfg(subset=256), out=tmp_path / "a", progress=False)
    train(_cfg(subset=256), out=tmp_path / "b", progress=False)
    _assert_states_equal(_network_state(tmp_path / "a"), _network_state(tmp_path / "b"))
    train(_cfg(subset=256, seed=1), out=tmp_path / "c", progress=False)
    state_a, state_c = _network_state(tmp_path / "a"), _network_state(tmp_path / "c")
    assert any(not torch.equal(state_a[k], state_c[k]) for k in state_a)


@pytest.mark.parametrize("prior", ["gnj", "ghs"])
def test_resume_is_exact(tmp_path, prior):
    cfg = _cfg(prior=prior, subset=256, epochs=2)
    train(cfg, out=tmp_path / "straight", progress=False)
    train(_cfg(prior=prior, subset=256, epochs=1), out=tmp_path / "split", progress=False)
    train(cfg, out=tmp_path / "split", resume=True, progress=False)
    a, b = (load_checkpoint(tmp_path / d / "checkpoint.pt") for d in ("straight", "split"))
    assert a["epoch"] == b["epoch"] == 2
    _assert_states_equal(a["network"], b["network"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
    strip = [[{k: v for k, v in m.items() if not k.endswith("seconds")} for m in run["metrics"]] for run in (a, b)]
    assert strip[0] == strip[1]  # timings aside
    assert len((tmp_path / "split" / "metrics.jsonl").read_text().splitlines()) == 2


def test_lenet5_one_epoch(tmp_path):
    last = train(_cfg(model="lenet5", subset=256), out=tmp_path, progress=False)
    assert last["epoch"] == 1
    assert list(last["groups_kept"]) == build_network("lenet5", "gnj").layer_names
    assert len(last["groups_kept"]) == 4


# -- bad inputs ----------------------------------------------------------------------------------


def test_resume_from_corrupt_checkpoint(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(CheckpointError, match="checkpoint"):
        train(_cfg(), out=tmp_path, resume=True, progress=False)
    assert not (tmp_path / ".lock").exists()


def test_resume_without_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train(_cfg(), out=tmp_path, resume=True, progress=False)


def test_resume_with_other_prior(tmp_path):
    train(_cfg(subset=128), out=tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="gnj"):
        train(_cfg(subset=128, prior="ghs", epochs=2), out=tmp_path, resume=True, progress=False)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1


@pytest.mark.parametrize("bad, message", [
    ({"epochs": -1}, "^epochs must be a whole number >= 0, got -1$"),
    ({"epochs": 2.5}, "^epochs must be a whole number >= 0, got 2.5$"),
    ({"lr": float("nan")}, "^the learning rate must be a positive number, got nan$"),
    ({"lr": 0.0}, "^the learning rate must be a positive number, got 0.0$"),
    ({"batch_size": 0}, "^batch_size must be a whole number >= 1, got 0$"),
    ({"eval_every": True}, "^eval_every must be a whole number >= 1, got True$"),
])
def test_bad_numbers_name_the_option(tmp_path, bad, message):
    with pytest.raises(ConfigError, match=message):
        train(_cfg(**bad), out=tmp_path, progress=False)
    _cfg(epochs=np.int64(2), batch_size=np.int64(8)).validate()  # numpy's whole numbers are whole numbers


POISON = """
import torch
from torch import nn

from pyro_bc.nn.network import BayesianNet
from pyro_bc.nn.layers import BayesLinear


class Poison(nn.Module):
    # returns NaN on the 3rd training forward pass with gradients on, i.e. epoch 2, step 1 (2 steps an epoch); the
    # network's dry runs (eval mode) do not count
    calls = 0

    def forward(self, x):
        if self.training and torch.is_grad_enabled():
            Poison.calls += 1
            if Poison.calls == 3:
                return x * float("nan")
        return x


def build(prior):
    body = nn.Sequential(nn.Flatten(), BayesLinear(784, 10, prior), Poison())
    return BayesianNet(body, input_shape=(1, 28, 28))
"""


def test_divergence_names_epoch_and_step(tmp_path):
    f = tmp_path / "poison.py"
    f.write_text(POISON)
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"epoch 2, step 1") as info:
        train(_cfg(model=str(f), subset=256, epochs=3), out=run, progress=False)
    assert str(run / "checkpoint.pt") in str(info.value)
    state = load_checkpoint(run / "checkpoint.pt")
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["network"].values())
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    assert not (run / ".lock").exists()


def test_init_from_a_state_file(tmp_path):
    """--init-from loads a deterministic network's state_dict (its values: tests/test_network.py)."""
    torch.manual_seed(5)
    dense = torch.nn.Sequential(OrderedDict(flatten=torch.nn.Flatten(), fc1=torch.nn.Linear(784, 300),
                                            relu1=torch.nn.ReLU(), fc2=torch.nn.Linear(300, 100),
                                            relu2=torch.nn.ReLU(), fc3=torch.nn.Linear(100, 10)))
    torch.save(dense.state_dict(), tmp_path / "dense.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the names match LeNet-300-100's layers: no fallback to order
        train(_cfg(subset=128, epochs=0, init_from=str(tmp_path / "dense.pt")), out=tmp_path / "run", progress=False)
    with pytest.raises(ConfigError, match="not a readable state_dict"):
        train(_cfg(subset=128, epochs=0, init_from=str(tmp_path / "run" / "config.json")), out=tmp_path / "r2",
              progress=False)
    torch.save({"a.weight": torch.zeros(3, 3)}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="weight tensors and names that do not match"):
        train(_cfg(subset=128, epochs=0, init_from=str(tmp_path / "other.pt")), out=tmp_path / "r3", progress=False)


def test_data_that_does_not_fit_the_network(tmp_path):
    model_file = tmp_path / "small.py"
    model_file.write_text(
        "from torch import nn\nfrom pyro_bc.nn.network import BayesianNet\nfrom pyro_bc.nn.layers import BayesLinear\n"
        "def build(prior):\n"
        "    return BayesianNet(nn.Sequential(nn.Flatten(), BayesLinear(400, 10, prior)), input_shape=(1, 20, 20))\n")
    with pytest.raises(ConfigError, match=r"shape \(1, 28, 28\).*expects \(1, 20, 20\)"):
        train(_cfg(model=str(model_file), subset=128), out=tmp_path / "run", progress=False)


# -- NegativeELBO and svi_step ---------------------------------------------------------------------------


def _small_net(prior: str, clip_var=None) -> BayesianNet:
    torch.manual_seed(0)
    p = make_prior(prior, **({"tau0": 1e-2} if prior in ("ghs", "rhs") else {}))
    body = nn.Sequential(OrderedDict(fc1=BayesLinear(4, 6, p, clip_var=clip_var), relu=nn.ReLU(),
                                     fc2=BayesLinear(6, 3, p)))
    return BayesianNet(body, input_shape=(4,))


def _kl(net: BayesianNet) -> torch.Tensor:
    """Sum of KL(guide || prior) over the latent sites, site by site with torch's kl_divergence."""
    guide = poutine.trace(net.guide).get_trace()
    model = poutine.trace(poutine.replay(net.model, trace=guide)).get_trace(torch.zeros(1, 4))
    return sum(torch.distributions.kl_divergence(guide.nodes[name]["fn"], site["fn"]).sum()
               for name, site in model.nodes.items()
               if site["type"] == "sample" and not site["is_observed"] and name in guide.nodes)


@pytest.mark.parametrize("prior", ["gnj", "ghs", "lu", "rhs"])
def test_negative_elbo_is_nll_plus_beta_kl_over_n_and_scales_with_weight(prior):
    net = _small_net(prior)
    loss = NegativeELBO(net)
    gen = torch.Generator().manual_seed(1)
    x, y, n = torch.randn(16, 4, generator=gen), torch.randint(0, 3, (16,), generator=gen), 1000

    def value(**kw):
        pyro.set_rng_seed(2)  # the same local-reparameterisation noise for every call
        return loss(x, y, n, **kw).item()

    full, half, quarter = value(beta=1.0), value(beta=0.5), value(beta=0.25)
    kl = _kl(net).item()
    assert full - half == pytest.approx(0.5 * kl / n, rel=1e-4)
    assert half - quarter == pytest.approx(0.25 * kl / n, rel=1e-4)
    assert value(weight=2.5) == pytest.approx(2.5 * full, rel=1e-6)
    nll = full - kl / n  # the minibatch's log-likelihood scaled to n examples, over n: the batch's mean NLL
    assert 0.5 < nll < 5.0


def test_negative_elbo_of_an_empty_shard_is_zero_with_zero_gradients():
    net = _small_net("ghs")
    value = NegativeELBO(net)(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), 100, weight=0.0)
    value.backward()
    assert value.item() == 0.0
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in net.parameters())


def test_svi_step_returns_the_loss_steps_and_clips_variances():
    net = _small_net("gnj", clip_var=0.04)
    with torch.no_grad():
        net.body.fc1.weight_logvar.fill_(0.0)  # variance 1 > 0.04
    loss = NegativeELBO(net)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(8, 4, generator=gen), torch.randint(0, 3, (8,), generator=gen)
    pyro.set_rng_seed(4)
    expected = loss(x, y, 80).item()
    before = {k: v.detach().clone() for k, v in net.named_parameters()}
    pyro.set_rng_seed(4)
    value = svi_step(loss, optimizer, net, x, y, 80)
    assert not value.requires_grad and value.item() == pytest.approx(expected, rel=1e-6)
    assert all(not torch.equal(p, before[k]) for k, p in net.named_parameters())
    limit = math.log(0.04)
    assert net.body.fc1.weight_logvar.max().item() <= limit + 1e-6
    assert net.body.fc1.bias_logvar.max().item() <= limit + 1e-6
    assert net.body.fc2.weight_logvar.max().item() > -9.5  # fc2 has no clip: moved by Adam only


def test_eval_every_skips_evaluations_without_changing_training(tmp_path):
    train(_cfg(epochs=3, subset=256), out=tmp_path / "every", progress=False)
    train(_cfg(epochs=3, subset=256, eval_every=2), out=tmp_path / "second", progress=False)
    records = [json.loads(line) for line in (tmp_path / "second" / "metrics.jsonl").read_text().splitlines()]
    assert ["val_error" in r for r in records] == [False, True, True]  # epoch 2, and the last epoch always
    assert all("train_error" not in r for r in records if "val_error" not in r)
    every = [json.loads(line) for line in (tmp_path / "every" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["val_error"] == every[-1]["val_error"]
    _assert_states_equal(_network_state(tmp_path / "every"), _network_state(tmp_path / "second"))
    # resumed with another eval_every: the same parameters still
    train(_cfg(epochs=2, subset=256, eval_every=2), out=tmp_path / "resumed", progress=False)
    train(_cfg(epochs=3, subset=256, eval_every=1), out=tmp_path / "resumed", resume=True, progress=False)
    _assert_states_equal(_network_state(tmp_path / "every"), _network_state(tmp_path / "resumed"))
    with pytest.raises(ConfigError, match="eval_every"):
        train(_cfg(eval_every=0), out=tmp_path / "bad", progress=False)


PLAIN_CONV_NET = """
from torch import nn

def build():
    return nn.Sequential(nn.Conv2d(1, 4, 5, padding=2, bias=False), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(4 * 14 * 14, 10))
"""


def test_a_plain_network_file_trains_and_compresses(tmp_path):
    from pyro_bc.runs.compressing import compress_run

    path = tmp_path / "plain.py"
    path.write_text(PLAIN_CONV_NET)
    train(_cfg(model=str(path), subset=256), out=tmp_path / "run", progress=False)
    summary = compress_run(tmp_path / "run", tmp_path / "run" / "MODEL.bcz")
    assert [layer["name"] for layer in summary["layers"]] == ["0", "4"]
    assert summary["original_bytes"] == 4 * (4 * 25 + 4 * 14 * 14 * 10 + 10)  # the conv has no bias


# -- beyond LeNet: other data, augmentation, learning-rate schedules, gradient and variance clipping -----------


def _cifar_cfg(tmp_path, **kw) -> TrainConfig:
    """A plain 3 x 8 x 8 network on a tiny CIFAR-format folder (60 training images, 10 held out)."""
    data = tmp_path / "cifar"
    if not data.exists():
        write_cifar(data)
    net = tmp_path / "net.py"
    net.write_text(PLAIN_NET_3x8x8)
    base = {"model": str(net), "prior": "gnj", "epochs": 2, "batch_size": 16, "val_size": 10, "data": str(data)}
    return TrainConfig(**{**base, **kw})


def test_augment_crops_padded_images_and_flips():
    x = torch.arange(2 * 3 * 5 * 6, dtype=torch.float32).view(2, 3, 5, 6)
    out = augment(x, augment_generator(7, 3))
    g = augment_generator(7, 3)
    dy, dx = torch.randint(0, 9, (2,), generator=g), torch.randint(0, 9, (2,), generator=g)
    flip = torch.rand(2, generator=g) < 0.5
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(2):
        crop = padded[i, :, dy[i]:dy[i] + 5, dx[i]:dx[i] + 6]
        assert torch.equal(out[i], crop.flip(-1) if flip[i] else crop)
    assert torch.equal(augment(x, augment_generator(7, 3)), out)  # a pure function of seed and epoch
    assert not torch.equal(augment(x, augment_generator(7, 4)), out)
    many = augment(torch.ones(400, 1, 4, 4), augment_generator(0, 0))
    assert 0 < (many == 0).any(dim=(1, 2, 3)).float().mean() < 1  # some crops reach the zero padding
    with pytest.raises(ConfigError, match="augmentation needs images"):
        augment(torch.zeros(3, 4), augment_generator(0, 0))


def test_learning_rate_schedules():
    assert [epoch_lr("constant", 0.1, e, 4) for e in range(4)] == [0.1] * 4
    assert [epoch_lr("cosine", 1.0, e, 4) for e in range(4)] == pytest.approx([1.0, 0.853553, 0.5, 0.146447], abs=1e-6)
    assert [epoch_lr("step", 1.0, e, 4) for e in range(4)] == pytest.approx([1.0, 1.0, 0.1, 0.01])
    steps = [epoch_lr("step", 1.0, e, 200) for e in (99, 100, 149, 150, 199)]
    assert steps == pytest.approx([1.0, 0.1, 0.1, 0.01, 0.01])
    assert epoch_lr("step", 1.0, 0, 1) == 1.0
    with pytest.raises(ConfigError, match="schedule"):
        epoch_lr("linear", 1.0, 0, 1)


def test_svi_step_clips_the_gradient_norm():
    net = _small_net("gnj")
    loss = NegativeELBO(net)
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(8, 4, generator=gen), torch.randint(0, 3, (8,), generator=gen)

    def grad_norm(clip):
        pyro.set_rng_seed(4)
        svi_step(loss, torch.optim.SGD(net.parameters(), lr=0.0), net, x, y, 80, clip_grad_norm=clip)
        return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in net.parameters()])).item()

    full = grad_norm(None)
    assert full > 0.01
    assert grad_norm(0.01) == pytest.approx(0.01, rel=1e-4)
    assert grad_norm(10 * full) == pytest.approx(full, rel=1e-6)  # below the limit: untouched


@pytest.mark.parametrize("prior", ["gnj", "ghs", "lu"])
def test_variance_lr_factor_multiplies_the_first_adam_step_of_variances_only(prior):
    # Adam's first step is lr * g / (|g| + eps) per element: with the same gradients, the log-variances and the
    # prior's parameters move exactly `factor` times as far, the means exactly as far
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])

    def one_step(factor):
        net = _small_net(prior).double()  # float64: the steps' differences keep their digits
        before = {k: v.detach().clone() for k, v in net.named_parameters()}
        pyro.set_rng_seed(4)
        svi_step(NegativeELBO(net), make_optimizer(net, 1e-3, factor), net, x, y, 80)
        return {k: v.detach() - before[k] for k, v in net.named_parameters()}

    plain, fast = one_step(1.0), one_step(10.0)
    variances = {k for k in plain if "logvar" in k or ".prior." in k}
    assert variances and variances != set(plain)
    for k in plain:
        expected = 10 * plain[k] if k in variances else plain[k]
        torch.testing.assert_close(fast[k], expected, rtol=1e-4, atol=1e-9, msg=k)


def test_cifar_run_records_its_options_and_resumes_exactly(tmp_path):
    options = {"augment": True, "lr_schedule": "cosine", "clip_grad_norm": 1.0, "lr": 1e-2, "variance_lr_factor": 10.0}
    train(_cifar_cfg(tmp_path, **options), out=tmp_path / "straight", progress=False)
    train(_cifar_cfg(tmp_path, **options, epochs=1), out=tmp_path / "split", progress=False)
    train(_cifar_cfg(tmp_path, **options), out=tmp_path / "split", resume=True, progress=False)
    a, b = (load_checkpoint(tmp_path / d / "checkpoint.pt") for d in ("straight", "split"))
    _assert_states_equal(a["network"], b["network"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
    strip = [[{k: v for k, v in m.items() if not k.endswith("seconds")} for m in run["metrics"]] for run in (a, b)]
    assert strip[0] == strip[1]
    assert [m["lr"] for m in a["metrics"]] == pytest.approx([1e-2, 5e-3])  # cosine over 2 epochs
    assert [g["lr"] for g in a["optimizer"]["param_groups"]] == pytest.approx([5e-3, 5e-2])  # the factor stays
    config = json.loads((tmp_path / "straight" / "config.json").read_text())
    assert {k: config[k] for k in options} == options
    assert config["data_format"] == "cifar10-python" and config["normalisation"]["kind"] == "per-channel"
    assert config["layer_clip_var"] == {"0": None, "3": None} and config["clip_var"] == {}
    train(_cifar_cfg(tmp_path, lr_schedule="cosine", clip_grad_norm=1.0, lr=1e-2), out=tmp_path / "plain",
          progress=False)
    plain = _network_state(tmp_path / "plain")
    assert any(not torch.equal(plain[k], a["network"][k]) for k in plain)  # augmentation changes the training


def test_clip_var_per_layer(tmp_path):
    train(_cifar_cfg(tmp_path, epochs=1, clip_var={"0": 1e-5}), out=tmp_path / "run", progress=False)
    state = _network_state(tmp_path / "run")
    assert state["body.0.weight_logvar"].max().item() <= math.log(1e-5) + 1e-6  # initially log var -9 > log 1e-5
    assert state["body.3.weight_logvar"].max().item() > math.log(1e-5)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["clip_var"] == {"0": 1e-5} and config["layer_clip_var"] == {"0": 1e-5, "3": None}
    with pytest.raises(ConfigError, match=r"layer 'fc1', but the network's layers are 0, 3"):
        train(_cifar_cfg(tmp_path, clip_var={"fc1": 0.1}), out=tmp_path / "bad", progress=False)
    for bad in ({"clip_var": {"0": -1.0}}, {"clip_grad_norm": 0.0}, {"lr_schedule": "linear"},
                {"variance_lr_factor": float("nan")}):
        with pytest.raises(ConfigError):
            train(_cifar_cfg(tmp_path, **bad), out=tmp_path / "bad", progress=False)


def test_lenet300_keeps_its_fc1_clip_unless_told(tmp_path):
    train(_cfg(subset=128, epochs=0), out=tmp_path / "default", progress=False)
    config = json.loads((tmp_path / "default" / "config.json").read_text())
    assert config["layer_clip_var"] == {"fc1": 0.04, "fc2": None, "fc3": None}
    assert config["data_format"] == "mnist-idx" and config["normalisation"] == {"kind": "2*(x/255-0.5)"}
    assert (config["augment"], config["lr_schedule"], config["clip_grad_norm"]) == (False, "constant", None)
    train(_cfg(subset=128, epochs=0, clip_var={"fc1": None, "fc2": 0.5}), out=tmp_path / "other", progress=False)
    config = json.loads((tmp_path / "other" / "config.json").read_text())
    assert config["layer_clip_var"] == {"fc1": None, "fc2": 0.5, "fc3": None}


def test_cli_trains_a_plain_network_on_a_cifar_folder(tmp_path, capsys):
    cfg = _cifar_cfg(tmp_path)
    out = tmp_path / "run"
    argv = ["train", "--model", cfg.model, "--data", cfg.data, "--val-size", "10", "--batch-size", "16",
            "--epochs", "2", "--augment", "--lr-schedule", "step", "--clip-grad-norm", "2.5", "--clip-var", "0=0.1",
            "--clip-var", "3=none", "--out", str(out)]
    assert main(argv) == 0
    assert "trained" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["data_format"] == "cifar10-python" and config["augment"] is True
    assert (config["lr_schedule"], config["clip_grad_norm"]) == ("step", 2.5)
    assert config["clip_var"] == {"0": 0.1, "3": None} == config["layer_clip_var"]
    assert [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1e-3, 1e-4]
    # compressed and evaluated on the same folder: evaluate rebuilds the split (and so the normalisation)
    assert main(["compress", str(out), "--out", str(out / "MODEL.bcz")]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(out / "MODEL.bcz"), "--data", cfg.data]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    summary = json.loads((out / "MODEL.json").read_text())
    assert evaluated["error"] == summary["error_compressed"] and evaluated["n"] == 8


@pytest.mark.parametrize("args, text", [
    (["--clip-var", "fc1"], "LAYER=VARIANCE"),
    (["--clip-var", "fc1=-1"], "must be positive"),
    (["--lr-schedule", "linear"], "linear"),
    (["--clip-grad-norm", "0"], "must be positive"),
    (["--variance-lr-factor", "-2"], "must be positive"),
])
def test_cli_rejects_bad_training_options(tmp_path, capsys, args, text):
    with pytest.raises(SystemExit) as info:
        main(["train", *args, "--out", str(tmp_path)])
    assert info.value.code == 2 and text in capsys.readouterr().err
