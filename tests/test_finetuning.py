"""Fine-tuning after pruning: the masked ELBO against a hand-built pruned network, pruned weights held at exactly
zero through steps and a resume, and the compression of a fine-tuned run keeping the structure it was given."""

import dataclasses
import json
import math

import pyro
import pytest
import torch
import torch.nn.functional as F
from tiny_data import write_cifar
from torch import nn

import pyro_bc
from models import build_network
from pyro_bc.cli import main
from pyro_bc.compression.finetuning import LayerMask, PruningMask, load_masks
from pyro_bc.compression.thresholds import KeptStructure
from pyro_bc.errors import CheckpointError, ConfigError
from pyro_bc.train.checkpoint import load_checkpoint, save_checkpoint
from pyro_bc.train.loop import NegativeELBO
from pyro_bc.train.run_dir import TrainConfig

# Molchanov et al. (2017), eq. 14: KL(N(mu, s^2) || LogUniform) ~= K1 - K1 sigmoid(K2 + K3 log a) + softplus(-log a)/2
K1, K2, K3 = 0.63576, 1.87320, 1.48695


def _two_layer_net() -> pyro_bc.nn.network.BayesianNet:
    """4 inputs -> 3 hidden (ReLU) -> 2 classes, gnj; every kept quantity near-certain (variance e^-40), the entries
    the masks prune wildly uncertain and large, so that counting them would change the loss."""
    torch.manual_seed(0)
    net = pyro_bc.bayesianize(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), "gnj", input_shape=(4,))
    with torch.no_grad():
        for layer in net.layers:
            layer.weight_mu.normal_()
            layer.bias_mu.normal_()
            layer.weight_logvar.fill_(-40.0)
            layer.bias_logvar.fill_(-40.0)
            layer.prior.z_mu.uniform_(0.5, 1.5)
            layer.prior.z_logvar.fill_(-40.0)
        first, second = net.layers
        first.weight_mu[:, 1] = 5.0  # input 1 pruned
        first.weight_logvar[:, 1] = 2.0
        first.weight_mu[2] = -4.0  # hidden unit 2 pruned (the second layer drops its input 2)
        first.weight_logvar[2] = 1.0
        first.bias_mu[2] = 3.0
        first.bias_logvar[2] = 0.5  # a pruned output's bias keeps its variance: nothing downstream reads it
        second.weight_mu[:, 2] = 6.0
        second.weight_logvar[:, 2] = 3.0
    return net


def _masks() -> list[LayerMask]:
    w0 = torch.ones(3, 4, dtype=torch.bool)
    w0[:, 1] = False
    w0[2] = False
    w1 = torch.ones(2, 3, dtype=torch.bool)
    w1[:, 2] = False
    return [LayerMask("0", w0, torch.tensor([True, True, False]), torch.tensor([True, False, True, True])),
            LayerMask("2", w1, torch.ones(2, dtype=torch.bool), torch.tensor([True, True, False]))]


def _normal_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return (0.5 * (logvar.exp() + mu**2 - 1 - logvar)).sum()


def _log_uniform_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    la = logvar - torch.log(mu**2 + 1e-8)
    return (K1 - K1 * torch.sigmoid(K2 + K3 * la) + 0.5 * F.softplus(-la)).sum()


def test_masked_elbo_equals_the_elbo_of_the_network_with_the_pruned_weights_removed():
    net = _two_layer_net()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(16, 4, generator=g), torch.randint(0, 2, (16,), generator=g)
    n_data = 100
    first, second = net.layers
    with torch.no_grad():  # the pruned network built by hand: input 1 and hidden unit 2 removed
        z0, z1 = first.prior.z_mu, second.prior.z_mu
        w0 = first.weight_mu[[0, 1]][:, [0, 2, 3]]
        h = F.relu((x[:, [0, 2, 3]] * z0[[0, 2, 3]]) @ w0.t() + first.bias_mu[[0, 1]])
        logits = (h * z1[[0, 1]]) @ second.weight_mu[:, [0, 1]].t() + second.bias_mu
        nll = F.cross_entropy(logits, y)
        kl = (_normal_kl(w0, first.weight_logvar[[0, 1]][:, [0, 2, 3]])
              + _normal_kl(first.bias_mu[[0, 1]], first.bias_logvar[[0, 1]])
              + _normal_kl(second.weight_mu[:, [0, 1]], second.weight_logvar[:, [0, 1]])
              + _normal_kl(second.bias_mu, second.bias_logvar)
              + _log_uniform_kl(z0, first.prior.z_logvar) + _log_uniform_kl(z1, second.prior.z_logvar))  # scales stay
        expected = nll + kl / n_data
        for validate in (False, True):  # pyro-bc's ELBO, and Pyro's own (with its checks) under validation
            with pyro.validation_enabled(validate):
                torch.manual_seed(5)
                masked = NegativeELBO(net, PruningMask(_masks()))(x, y, n_data)
                torch.manual_seed(5)
                unmasked = NegativeELBO(net)(x, y, n_data)
            assert masked.item() == pytest.approx(expected.item(), rel=1e-5), validate
            assert abs(unmasked.item() - expected.item()) > 1.0  # the pruned entries would count without the masks


def test_masked_weights_get_no_gradient_and_their_kl_leaves_the_elbo():
    net = _two_layer_net()
    x, y = torch.randn(8, 4, generator=torch.Generator().manual_seed(4)), torch.arange(8) % 2
    torch.manual_seed(0)
    NegativeELBO(net, PruningMask(_masks()))(x, y, 8).backward()
    masks = _masks()
    for layer, mask in zip(net.layers, masks):
        for p in (layer.weight_mu, layer.weight_logvar):
            assert torch.all(p.grad[~mask.weight] == 0)
            assert torch.all(p.grad[mask.weight] != 0)
        assert torch.all(layer.bias_mu.grad[~mask.bias] == 0) and torch.all(layer.bias_logvar.grad[~mask.bias] == 0)


def _tiny_problem(seed: int = 1):
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    net = pyro_bc.bayesianize(dense, "gnj", input_shape=(1, 4, 4))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(200, 1, 4, 4, generator=g)
    y = x.flatten(1)[:, :3].argmax(1)
    with torch.no_grad():  # groups with log alpha 5 - log(z_mu^2) > -3: pruned at the default threshold
        net.layers[0].prior.z_logvar[[3, 5, 7, 9]] = 5.0
        net.layers[1].prior.z_logvar[[1, 2]] = 5.0
    return net, (x, y)


def test_pruned_weights_stay_exactly_zero_through_steps_and_a_resume_which_is_exact(tmp_path):
    net, data = _tiny_problem()
    summary = pyro_bc.compress(net, tmp_path / "m.bcz", val=data, train=data, thresholds=[-3.0, -3.0])
    start = pyro_bc.pruned_network(net, summary, data)  # what error_pruned measures, fold included

    straight = _tiny_problem()[0]
    pyro_bc.finetune(straight, summary, data, data, epochs=4, lr=1e-2, out=tmp_path / "a", progress=False)
    resumed = _tiny_problem()[0]
    pyro_bc.finetune(resumed, summary, data, data, epochs=0, lr=1e-2, out=tmp_path / "b0", progress=False)
    with torch.no_grad():  # fine-tuning starts at the pruned network (the fold in the biases)
        torch.testing.assert_close(resumed.posterior_mean_network()(data[0]), start(data[0]))
    start_mu = {layer.site: layer.weight_mu.clone() for layer in resumed.layers}
    pyro_bc.finetune(resumed, summary, data, data, epochs=2, lr=1e-2, out=tmp_path / "b", progress=False)
    pyro_bc.finetune(resumed, None, data, data, epochs=4, out=tmp_path / "b", progress=False, resume=True)

    masks, record = load_masks(tmp_path / "b")
    assert record["kept_groups"] == {row["name"]: row["kept_groups"] for row in summary["layers"]}
    moved = 0
    for a, b, mask in zip(straight.layers, resumed.layers, masks):
        for name in ("weight_mu", "weight_logvar", "bias_mu", "bias_logvar"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name  # the resume is exact
        assert torch.all(a.weight_mu[~mask.weight] == 0) and torch.all(a.bias_mu[~mask.bias] == 0)
        assert torch.all(a.weight_moments()[0][~mask.weight] == 0)
        moved += int((a.weight_mu[mask.weight] != start_mu[a.site][mask.weight]).sum())
    assert moved > 0  # the kept weights did train


def test_compressing_a_fine_tuned_network_keeps_its_structure(tmp_path):
    net, data = _tiny_problem()
    summary = pyro_bc.compress(net, tmp_path / "m.bcz", val=data, train=data, thresholds=[-3.0, -3.0])
    pyro_bc.finetune(net, summary, data, data, epochs=3, lr=1e-2, out=tmp_path / "ft", progress=False)
    after = pyro_bc.compress(net, tmp_path / "ft.bcz", val=data, train=data, test=data,
                             rule=KeptStructure(str(tmp_path / "ft")))
    assert [r["kept_groups"] for r in after["layers"]] == [r["kept_groups"] for r in summary["layers"]]
    assert after["threshold_rule"]["name"] == "kept-structure"
    # the pruned weights are zero and fold nothing: the pruned network is the posterior-mean network
    mean_error = 100.0 * (net.posterior_mean_network()(data[0]).argmax(1) != data[1]).float().mean().item()
    assert after["error_pruned"] == pytest.approx(mean_error)
    # asked for, the thresholds decide; the source's own prune nothing it kept and keep nothing it pruned here
    again = pyro_bc.compress(net, tmp_path / "again.bcz", val=data, train=data, thresholds=[-3.0, -3.0])
    assert [r["kept_groups"] for r in again["layers"]] == [r["kept_groups"] for r in summary["layers"]]


def test_kept_structure_holds_when_fine_tuning_moved_a_kept_group_above_the_pruned_ones(tmp_path):
    net, data = _tiny_problem()
    summary = pyro_bc.compress(net, tmp_path / "m.bcz", val=data, train=data, thresholds=[-3.0, -3.0])
    pyro_bc.finetune(net, summary, data, epochs=0, out=tmp_path / "ft", progress=False)
    first = net.layers[0]
    with torch.no_grad():
        first.prior.z_logvar[0] = 20.0  # kept input 0 now above every pruned one (log alpha 5 - log z^2)
        first.prior.z_logvar[3] = -30.0  # and pruned input 3 far below every kept one
    la = first.log_alpha()
    assert la[0] > la[[5, 7, 9]].max() and la[3] < la[[0, 1, 2, 4]].min()
    after = pyro_bc.compress(net, tmp_path / "x.bcz", val=data, train=data, rule=KeptStructure(str(tmp_path / "ft")))
    assert [r["kept_groups"] for r in after["layers"]] == [r["kept_groups"] for r in summary["layers"]]
    # the file computes the network the masks leave: the fine-tuned means, the pruned inputs and units zero
    masks = load_masks(tmp_path / "ft")[0]
    x = data[0]
    with torch.no_grad():
        first_mean, second_mean = (layer.weight_moments()[0] * m.weight for layer, m in zip(net.layers, masks))
        z0, z1 = (layer.prior.z_mu for layer in net.layers)
        h = F.relu((x.flatten(1) * z0) @ first_mean.t() + first.bias_mu * masks[0].bias)
        expected = (h * z1) @ second_mean.t() + net.layers[1].bias_mu
        torch.testing.assert_close(pyro_bc.load(tmp_path / "x.bcz")(x), expected, atol=2e-2, rtol=2e-2)
    # a given threshold keeps nothing that the masks hold at zero, however low its log alpha
    given = pyro_bc.compress(net, tmp_path / "g.bcz", val=data, train=data, thresholds=[25.0, -3.0])
    assert given["layers"][0]["kept_groups"] == summary["layers"][0]["kept_groups"]
    # trained again by fit (every weight), the network drops the masks; then no threshold reproduces the structure
    pyro_bc.fit(net, data, epochs=0, progress=False)
    assert net.pruning_masks is None
    with pytest.raises(ConfigError, match="moved a kept group.*does not hold the pruned ones at zero"):
        pyro_bc.compress(net, tmp_path / "y.bcz", val=data, train=data, rule=KeptStructure(str(tmp_path / "ft")))


def test_cli_finetune_then_compress_keeps_the_structure_and_records_the_source(run, tmp_path, capsys):
    source_bcz = tmp_path / "src.bcz"  # thresholds other than the default's (-3), which compress would use again
    assert main(["compress", str(run), "--out", str(source_bcz), "--thresholds", "-4", "-3.5", "-3.8"]) == 0
    source = json.loads(source_bcz.with_suffix(".json").read_text())
    out = tmp_path / "ft"
    assert main(["finetune", str(run), "--epochs", "1", "--out", str(out), "--lr", "1e-4",
                 "--thresholds", "-4", "-3.5", "-3.8", "--kl-warmup-epochs", "2"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["finetune"]["source_run"] == str(run) and config["finetune"]["epochs"] == 1
    assert config["lr"] == 1e-4 and config["epochs"] == 1
    assert main(["finetune", str(run), "--epochs", "2", "--out", str(out), "--resume"]) == 0
    # the KL weight after epoch e of a 2-epoch warm-up is e / 2 (its last step's: e S / (2 S))
    betas = [json.loads(line)["beta"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert betas == [0.5, 1.0]
    bcz = out / "MODEL.bcz"
    assert main(["compress", str(out), "--out", str(bcz)]) == 0
    after = json.loads(bcz.with_suffix(".json").read_text())
    assert [r["kept_groups"] for r in after["layers"]] == [r["kept_groups"] for r in source["layers"]]
    assert after["threshold_rule"]["name"] == "kept-structure"
    assert after["finetuned"]["source_run"] == str(run) and after["finetuned"]["epochs"] == 2
    assert math.isfinite(after["error_compressed"])
    assert main(["report", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert f"Fine-tuned for 2 epochs (lr 0.0001) from run `{run}`, pruned to {source['architecture']}" in report
    capsys.readouterr()
    assert main(["finetune", str(run), "--epochs", "1", "--out", str(out)]) == 1  # not over an existing run
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train", "--epochs", "3", "--out", str(out), "--resume"]) == 1  # train would drop the masks
    assert "is a fine-tuning run" in capsys.readouterr().err


def test_resume_without_masks_is_a_checkpoint_error(tmp_path):
    net, data = _tiny_problem()
    with pytest.raises(CheckpointError, match="no fine-tuning masks"):
        pyro_bc.finetune(net, None, data, epochs=1, out=tmp_path / "none", resume=True, progress=False)


def test_masked_kl_against_the_log_uniform_prior_counts_the_kept_weights_only():
    """lu: per-weight log-uniform priors, whose KL the ELBO takes elementwise (not the fused sum)."""
    torch.manual_seed(0)
    net = pyro_bc.bayesianize(nn.Sequential(nn.Linear(3, 2)), "lu", input_shape=(3,))
    layer = net.layers[0]
    with torch.no_grad():
        layer.weight_mu.copy_(torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.3, -0.7]]))
        layer.weight_logvar.fill_(-40.0)
        layer.weight_logvar[1, 2] = 1.0  # pruned: large and uncertain
        layer.bias_mu.copy_(torch.tensor([0.2, -0.1]))
        layer.bias_logvar.fill_(-40.0)
    keep = torch.ones(2, 3, dtype=torch.bool)
    keep[1, 2] = False
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(10, 3, generator=g), torch.randint(0, 2, (10,), generator=g)
    with torch.no_grad():
        w = torch.where(keep, layer.weight_mu, 0.0)
        nll = F.cross_entropy(x @ w.t() + layer.bias_mu, y)
        kl = (_log_uniform_kl(layer.weight_mu[keep], layer.weight_logvar[keep])
              + _normal_kl(layer.bias_mu, layer.bias_logvar))
        masks = [LayerMask("0", keep, torch.ones(2, dtype=torch.bool), keep)]
        loss = NegativeELBO(net, PruningMask(masks))(x, y, 50)
    assert loss.item() == pytest.approx((nll + kl / 50).item(), rel=1e-5)


def test_kl_warmup_epochs_is_trains_warmup_epochs():
    from pyro_bc.cli import build_parser

    args = build_parser().parse_args(["train", "--out", "r", "--kl-warmup-epochs", "7"])
    assert args.warmup_epochs == 7
    assert build_parser().parse_args(["train", "--out", "r", "--warmup-epochs", "3"]).warmup_epochs == 3


def test_cli_finetune_bad_input_is_one_line_and_writes_nothing(run, tmp_path, capsys):
    out = tmp_path / "ft"
    assert main(["finetune", str(tmp_path / "missing"), "--epochs", "1", "--out", str(out)]) == 1
    assert "no checkpoint" in capsys.readouterr().err and not out.exists()
    assert main(["finetune", str(run), "--epochs", "1", "--out", str(run)]) == 1
    err = capsys.readouterr().err
    assert "must differ from the source run" in err and len(err.strip().splitlines()) == 1
    assert main(["finetune", str(run), "--epochs", "1", "--out", str(out), "--resume"]) == 1
    assert "no fine-tuning masks" in capsys.readouterr().err


class _ResidualBatchNorm(nn.Module):
    """conv0 + BN (no bias) -> ReLU -> conv1 + BN -> ReLU -> h + BN(conv2(h)) -> BN on its own (after the sum) ->
    ReLU -> pool -> head: BatchNorm folded into layers with and without a bias, one that follows no layer, a
    residual sum."""

    def __init__(self):
        super().__init__()
        self.conv0, self.bn0 = nn.Conv2d(2, 6, 3, bias=False), nn.BatchNorm2d(6)
        self.conv1, self.bn1 = nn.Conv2d(6, 4, 1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.bn3, self.head = nn.BatchNorm2d(4), nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(torch.relu(self.bn0(self.conv0(x))))))
        h = torch.relu(self.bn3(h + self.bn2(self.conv2(h))))
        return self.head(h.mean((2, 3)))


def _batchnorm_problem():
    torch.manual_seed(0)
    dense = _ResidualBatchNorm()
    with torch.no_grad():  # running statistics, scales and shifts far from the identity's
        for bn in (dense.bn0, dense.bn1, dense.bn2, dense.bn3):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
    net = pyro_bc.bayesianize(dense, "gnj", input_shape=(2, 6, 6))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(120, 2, 6, 6, generator=g)
    y = x.mean((2, 3)).argmax(1) % 3
    with torch.no_grad():  # pruned at -3: conv0's channels 1 and 4 (conv1's inputs, folded into bn1's shift); conv2's
        net.layers[0].prior.z_logvar[[1, 4]] = 5.0  # channel 2, whose sum the skip keeps; head's input 3
        net.layers[2].prior.z_logvar[2] = 5.0
        net.layers[3].prior.z_logvar[3] = 5.0
    return net, (x, y)


def _norm_statistics(net) -> list[torch.Tensor]:
    return [t.clone() for m in net.modules() if isinstance(m, nn.BatchNorm2d)
            for t in (m.running_mean, m.running_var, m.num_batches_tracked)]


def test_fine_tuning_starts_a_batchnorm_network_at_its_pruned_network(tmp_path):
    """Folded BatchNorm keeps its running statistics in fine-tuning; its shift carries the fold of the layer's pruned
    inputs, so the posterior-mean network computes what error_pruned measures (BatchNorm folded into the weights)."""
    net, data = _batchnorm_problem()
    summary = pyro_bc.compress(net, tmp_path / "m.bcz", val=data, train=data, thresholds=[-3.0] * 4)
    assert summary["fold_pruned_inputs"] and summary["architecture"] == "4-4-4-3"
    assert [r["weights_kept"] for r in summary["layers"]] == [72, 16, 12, 9]  # conv1 reads 4 of 6 inputs, conv2 writes 3 of 4 rows
    start = pyro_bc.pruned_network(net, summary, data)
    pyro_bc.finetune(net, summary, data, epochs=0, out=tmp_path / "ft", progress=False)
    with torch.no_grad():
        reached = net.posterior_mean_network()(data[0])
        torch.testing.assert_close(reached, start(data[0]), rtol=1e-5, atol=1e-5)
    carried = net.body.bn1.bias - _batchnorm_problem()[0].body.bn1.bias
    assert carried.abs().max() > 0.05  # the fold of conv1's pruned inputs, in bn1's shift: the check can fail


def test_fine_tuning_a_batchnorm_network_trains_on_frozen_statistics_and_resumes_exactly(tmp_path):
    net, data = _batchnorm_problem()
    statistics = _norm_statistics(net)
    summary = pyro_bc.compress(net, tmp_path / "m.bcz", val=data, train=data, thresholds=[-3.0] * 4)
    straight = _batchnorm_problem()[0]
    pyro_bc.finetune(straight, summary, data, data, epochs=3, lr=1e-2, batch_size=32, out=tmp_path / "a",
                     progress=False)
    resumed = _batchnorm_problem()[0]
    pyro_bc.finetune(resumed, summary, data, data, epochs=1, lr=1e-2, batch_size=32, out=tmp_path / "b",
                     progress=False)
    pyro_bc.finetune(resumed, None, data, data, epochs=3, out=tmp_path / "b", progress=False, resume=True)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)  # the resume is exact
    shift = straight.body.bn2.bias.clone()
    for got, want in zip(_norm_statistics(straight), statistics):
        assert torch.equal(got, want)  # the running statistics did not move
    assert not torch.equal(shift, _batchnorm_problem()[0].body.bn2.bias)  # the shifts did train
    masks, _ = load_masks(tmp_path / "a")
    for layer, mask in zip(straight.layers, masks):
        assert torch.all(layer.weight_mu[~mask.weight] == 0)
    straight.train()
    assert straight.body.bn0.training  # the hooks are gone: BatchNorm follows train() again
    after = pyro_bc.compress(straight, tmp_path / "ft.bcz", val=data, train=data,
                             rule=KeptStructure(str(tmp_path / "a")))
    assert [r["kept_groups"] for r in after["layers"]] == [r["kept_groups"] for r in summary["layers"]]


def test_cli_finetunes_a_resnet_with_batchnorm_on_its_running_statistics(tmp_path, capsys):
    """ResNet-20 at width 1/4 on a tiny CIFAR folder, a run written by hand (no training) whose stem keeps 3 of 4
    channels: `pyro-bc finetune` trains it with every BatchNorm's statistics as they were, and `compress` keeps the
    structure."""
    write_cifar(tmp_path / "cifar")
    run = tmp_path / "run"
    run.mkdir()
    torch.manual_seed(0)
    network = build_network("resnet20", "gnj", input_shape=(3, 8, 8), width=0.25).state_dict()
    network["body.blocks.0.conv1.prior.z_logvar"][0] = 5.0  # read by blocks.0.conv2 only: pruned
    for key in network:
        if key.endswith("running_var"):
            network[key].uniform_(0.5, 2.0)
        elif key.endswith("running_mean"):
            network[key].normal_()
    config = TrainConfig(model="resnet20", width=0.25, epochs=0, val_size=10, data=str(tmp_path / "cifar"))
    save_checkpoint(run / "checkpoint.pt", {"config": dataclasses.asdict(config), "epoch": 0, "network": network,
                                            "optimizer": {}, "rng": {}, "metrics": [], "input_shape": [3, 8, 8]})
    out = tmp_path / "ft"
    assert main(["compress", str(run), "--out", str(run / "MODEL.bcz")]) == 0
    source = json.loads((run / "MODEL.json").read_text())
    assert main(["finetune", str(run), "--epochs", "2", "--lr", "1e-2", "--out", str(out)]) == 0
    tuned = load_checkpoint(out / "checkpoint.pt")["network"]
    statistics = [key for key in network if key.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(statistics) == 3 * 21  # the stem, two per block, two projections
    for key in statistics:
        assert torch.equal(tuned[key], network[key]), key
    assert not torch.equal(tuned["body.bn1.weight"], network["body.bn1.weight"])  # the scales trained
    assert main(["compress", str(out), "--out", str(out / "MODEL.bcz")]) == 0
    after = json.loads((out / "MODEL.json").read_text())
    assert [r["kept_groups"] for r in after["layers"]] == [r["kept_groups"] for r in source["layers"]]
    assert after["architecture"] == source["architecture"] and source["architecture"].startswith("4-3-")
