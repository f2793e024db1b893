"""torchvision's classifiers, as a user would bring them: bayesianize -> compress (thresholds that cut about half of
each layer's groups) -> load. The loaded file must compute the full-size pruned network (:func:`pyro_bc.pruned_network`)
up to quantisation, with fewer parameters, and its ONNX and pt2 exports must compute the loaded module.

Small widths keep the suite fast (Inception v3, whose widths are fixed, runs at full size); ``analysis/zoo.py`` runs
the full-size constructors. The posteriors are set by hand
(seeded random group variances, BatchNorm statistics away from their defaults): what is checked is the pruning,
folding and writing, which training would not make more certain.
"""

import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from torch import nn

import pyro_bc
from pyro_bc.bcz.export import INPUT_NAME, export_module
from pyro_bc.compression.pipeline import format_table

tv = pytest.importorskip("torchvision")
sys.path.insert(0, str(Path(__file__).parents[1] / "analysis"))
from torchvision.models import convnext, efficientnet, regnet, resnet
from zoo import half_thresholds


def _efficientnet() -> nn.Module:
    config = [efficientnet.MBConvConfig(1, 3, 1, 32, 16, 1, 0.25, 1.0),
              efficientnet.MBConvConfig(6, 3, 2, 16, 24, 2, 0.25, 1.0),
              efficientnet.MBConvConfig(6, 5, 2, 24, 40, 1, 0.25, 1.0)]
    return efficientnet.EfficientNet(config, dropout=0.2, num_classes=10)


def _efficientnet_v2() -> nn.Module:
    config = [efficientnet.FusedMBConvConfig(1, 3, 1, 16, 16, 1), efficientnet.FusedMBConvConfig(4, 3, 2, 16, 24, 1),
              efficientnet.MBConvConfig(4, 3, 2, 24, 32, 1)]
    return efficientnet.EfficientNet(config, dropout=0.2, num_classes=10, last_channel=64)


def _alexnet() -> nn.Module:
    """AlexNet's features as torchvision builds them, its classifier's structure at 64 units instead of 4096."""
    model = tv.models.AlexNet(num_classes=10)
    model.classifier = nn.Sequential(nn.Dropout(), nn.Linear(256 * 6 * 6, 64), nn.ReLU(inplace=True), nn.Dropout(),
                                     nn.Linear(64, 64), nn.ReLU(inplace=True), nn.Linear(64, 10))
    return model


def _vgg(batch_norm: bool) -> nn.Module:
    """torchvision's VGG (its ``make_layers``, its 7x7 adaptive pooling, here of a 4x4 map) at 8-32 channels and its
    classifier's structure at 64 units instead of 4096."""
    model = tv.models.VGG(tv.models.vgg.make_layers([8, "M", 16, "M", 32, 32, "M"], batch_norm=batch_norm),
                          num_classes=10)
    model.classifier = nn.Sequential(nn.Linear(32 * 7 * 7, 64), nn.ReLU(True), nn.Dropout(), nn.Linear(64, 64),
                                     nn.ReLU(True), nn.Dropout(), nn.Linear(64, 10))
    return model


# Every torchvision classification family at a small width (AlexNet's and VGG's classifiers narrowed by hand: their
# constructors fix 4096 units), Inception v3 at full size (its constructor fixes every width; 80x80 inputs, its
# minimum is 75x75); analysis/zoo.py runs the full-size constructors of all of them.
FAMILIES = {
    "resnet": lambda: resnet.ResNet(resnet.BasicBlock, [1, 1, 1, 1], num_classes=10),
    "alexnet": _alexnet,
    "vgg": lambda: _vgg(batch_norm=False),
    "vgg_bn": lambda: _vgg(batch_norm=True),
    "mobilenet_v2": lambda: tv.models.mobilenet_v2(weights=None, num_classes=10, width_mult=0.25),
    "mobilenet_v3": lambda: tv.models.mobilenet_v3_small(weights=None, num_classes=10, width_mult=0.25),
    "efficientnet": _efficientnet,
    "efficientnet_v2": _efficientnet_v2,
    "squeezenet": lambda: tv.models.squeezenet1_1(weights=None, num_classes=10),
    "mnasnet": lambda: tv.models.mnasnet0_5(weights=None, num_classes=10),
    "densenet": lambda: tv.models.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, bn_size=2,
                                           num_classes=10),
    "resnext": lambda: resnet.ResNet(resnet.Bottleneck, [1, 1, 1, 1], groups=4, width_per_group=4, num_classes=10),
    "regnet_x": lambda: regnet.RegNet(regnet.BlockParams.from_init_params(4, 8, 8.0, 2.0, 4), num_classes=10),
    "regnet_y": lambda: regnet.RegNet(regnet.BlockParams.from_init_params(4, 8, 8.0, 2.0, 4, se_ratio=0.25),
                                      num_classes=10),
    "inception": lambda: tv.models.Inception3(num_classes=10, aux_logits=False, init_weights=False),
    "googlenet": lambda: tv.models.GoogLeNet(num_classes=10, aux_logits=False, init_weights=False),
    "shufflenet": lambda: tv.models.ShuffleNetV2([2, 2, 2], [8, 16, 32, 64, 128], num_classes=10),
    "convnext": lambda: convnext.ConvNeXt([convnext.CNBlockConfig(16, 32, 1), convnext.CNBlockConfig(32, None, 1)],
                                          num_classes=10),
    "vit": lambda: tv.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16,
                                               mlp_dim=32, num_classes=10),
    "swin": lambda: tv.models.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 1], num_heads=[2, 2],
                                              window_size=[2, 2], num_classes=10),
}
TRANSFORMERS = {"convnext", "vit", "swin"}  # LayerNorm, attention, class tokens: ops outside the registry
SIZES = {"alexnet": 64, "inception": 80}  # input height and width: 32, but where a family needs more


def _bayesian(family: str) -> pyro_bc.nn.network.BayesianNet:
    torch.manual_seed(0)
    model = FAMILIES[family]()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.2, 0.2, generator=generator)
                module.running_var.uniform_(0.5, 1.5, generator=generator)
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.uniform_(-0.2, 0.2, generator=generator)
    size = SIZES.get(family, 32)
    net = pyro_bc.bayesianize(model.eval(), "gnj", input_shape=(3, size, size))
    with torch.no_grad():
        for layer in net.layers:
            layer.prior.z_logvar.copy_(torch.randn(layer.prior.z_logvar.shape, generator=generator) * 2 - 4)
            if not layer.weight_mu.any():  # ViT's head starts at zero
                layer.weight_mu.normal_(0, 0.1, generator=generator)
    return net.eval()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def compressed(request, tmp_path_factory):
    net = _bayesian(request.param)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(48, 3, *net.input_shape[1:], generator=generator)
    y = torch.randint(0, 10, (48,), generator=generator)
    path = tmp_path_factory.mktemp(request.param) / "model.bcz"
    summary = pyro_bc.compress(net, path, val=(x, y), train=(x, y), test=(x, y), thresholds=half_thresholds(net))
    return request.param, net, summary, path, (x, y)


def test_the_file_computes_the_pruned_network(compressed):
    family, net, summary, path, (x, y) = compressed
    pruned = pyro_bc.pruned_network(net, summary, train=(x, y))
    loaded = pyro_bc.load(path)
    with torch.no_grad():
        want, got = pruned(x), loaded(x)
    assert ((got - want).norm() / want.norm()).item() < 0.02, family
    # errors by the test's own count, against the summary's
    assert 100 * (got.argmax(1) != y).float().mean().item() == pytest.approx(summary["val_error_compressed"])
    assert 100 * (want.argmax(1) != y).float().mean().item() == pytest.approx(summary["error_pruned"])
    assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in pruned.parameters())
    kept = [row["groups_kept"] / row["groups_total"] for row in summary["layers"]]
    assert 0.2 < np.mean(kept) < 0.95  # about half cut; coupled channels and grouped convolutions keep more


def test_batchnorm_that_follows_no_layer_is_listed_as_deterministic(compressed):
    family, net, summary, _, _ = compressed
    rows = summary["deterministic_modules"] or []
    listed = {row["name"] for row in rows if "BatchNorm" in row["module"]}
    if family == "densenet":  # pre-activation: every dense layer's first BatchNorm reads a concatenation
        assert "features.denseblock1.denselayer1.norm1" in listed and "features.norm0" not in listed
        chosen = summary["deterministic_precision"]["chosen"]
        for row in rows:  # a scale and a shift per kept channel, at the chosen precision
            channels = net.body.get_submodule(row["name"]).num_features
            assert row["module"] == "BatchNorm2d" and row["parameters_original"] == 2 * channels
            assert row["parameters"] % 2 == 0 and 0 < row["parameters"] <= 2 * channels and row["precision"] == chosen
    elif family not in TRANSFORMERS:
        assert rows == [] and summary["deterministic_precision"] is None, family
    else:
        assert listed == set(), family


def test_ops_outside_the_registry_are_listed_by_module_path(compressed):
    """A transformer's LayerNorms, attention, class token and positional embedding stay deterministic and are listed
    by the user's module paths, each with what it calls and how the file stores it."""
    family, net, summary, _, _ = compressed
    if family not in TRANSFORMERS:
        return
    rows = summary["deterministic_modules"]
    programs = {(row["name"], row["module"]) for row in rows if row["stored_as"].startswith("core-ATen program")}
    expected = {"vit": ("encoder.layers.encoder_layer_0.self_attention", "the module MultiheadAttention"),
                "swin": ("features.1.0.attn", "the function shifted_window_attention"),
                "convnext": ("features.1.0", "the function mul")}[family]  # the layer scale
    assert expected in programs, programs
    paths = dict(net.body.named_modules())
    assert all(row["name"] in paths or row["name"] == "the network's forward" for row in rows)


def test_the_file_is_smaller_than_the_float32_weights(compressed):
    _, _, summary, path, _ = compressed
    assert path.stat().st_size == summary["file_bytes"] < summary["original_bytes"]


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_exports_compute_the_loaded_module(compressed, fmt, tmp_path):
    family, _, _, path, (x, _) = compressed
    loaded = pyro_bc.load(path)
    out = tmp_path / f"model.{fmt}"
    export_module(loaded, tuple(x.shape[1:]), out, fmt)
    with torch.no_grad():
        want = loaded(x[:5]).numpy()
    if fmt == "onnx":
        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = session.run(None, {INPUT_NAME: x[:5].numpy()})[0]
    else:
        got = torch.export.load(out).module()(x[:5]).detach().numpy()
    assert np.linalg.norm(got - want) <= 1e-4 * np.linalg.norm(want), family


def _outside(model: nn.Module, tmp_path: Path) -> tuple[dict, pyro_bc.nn.network.BayesianNet, torch.Tensor]:
    torch.manual_seed(0)
    net = pyro_bc.bayesianize(model, "gnj", input_shape=(3, 8, 8))
    with torch.no_grad():
        for layer in net.layers:  # every other group dropped (log alpha 5), if it may be
            layer.prior.z_logvar.fill_(-8.0)[::2] = 5.0
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 2, (8,))
    summary = pyro_bc.compress(net, tmp_path / "model.bcz", val=(x, y), thresholds=[0.0] * len(net.layers))
    with torch.no_grad():
        want, got = pyro_bc.pruned_network(net, summary)(x), pyro_bc.load(tmp_path / "model.bcz")(x)
    assert ((got - want).norm() / want.norm()).item() < 0.02
    return summary, net, x


def test_an_op_outside_the_registry_keeps_its_channels_and_is_named_by_the_module_path(tmp_path):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return torch.cumsum(self.conv(x), 1)

    summary, _, _ = _outside(nn.Sequential(Block(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)), tmp_path)
    rows = {row["name"]: row for row in summary["deterministic_modules"]}
    assert rows["0"]["module"] == "the function cumsum" and rows["0"]["stored_as"].startswith("core-ATen program")
    assert "deterministic: 0 (the function cumsum, no parameters)" in format_table(summary)
    assert summary["layers"][0]["groups_kept"] == summary["layers"][0]["groups_total"] == 4  # all it reads


def test_a_parameter_used_outside_a_layer_is_kept_and_named_by_its_module(tmp_path):
    """ConvNeXt's layer scale: a learned per-channel factor read in the forward, not a layer of its own."""
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.gamma = nn.Parameter(torch.linspace(0.5, 2, 4).reshape(4, 1, 1))

        def forward(self, x):
            return self.gamma * self.conv(x)

    summary, _, _ = _outside(nn.Sequential(nn.Conv2d(3, 3, 1), Scaled(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)),
                             tmp_path)
    rows = {row["name"]: row for row in summary["deterministic_modules"]}
    assert rows["1"]["module"] == "the function mul" and rows["1"]["parameters"] == 4  # gamma, in the file
    assert summary["layers"][1]["groups_kept"] == 4


@pytest.mark.filterwarnings("ignore:The default weight initialization of GoogleNet")
def test_googlenet_as_torchvision_builds_it_trains_and_compresses_without_its_auxiliary_classifiers(tmp_path):
    """``googlenet(weights=None)`` has auxiliary classifiers, which its forward returns beside the logits in training
    and does not call in eval mode: bayesianized without an input shape it trains on the logits, its auxiliary
    classifiers stay plain (as they would given the shape) and untouched, and the file computes the pruned network."""
    torch.manual_seed(0)
    model = tv.models.googlenet(weights=None, num_classes=4)
    assert model.aux_logits
    net = pyro_bc.bayesianize(model, "gnj")
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(24, 3, 32, 32, generator=generator), torch.randint(0, 4, (24,), generator=generator)
    with pytest.warns(UserWarning, match="^6 Bayesian layer.* stay deterministic: aux1.conv.conv, aux1.fc1, aux1.fc2, "
                                         "aux2.conv.conv, ...$"):
        pyro_bc.fit(net, (x, y), epochs=1, batch_size=12, progress=False)
    bayesian = {name for name, m in net.body.named_modules() if isinstance(m, pyro_bc.nn.layers.BayesLayer)}
    assert bayesian == set(net.layer_names) and not any(name.startswith(("aux1", "aux2")) for name in bayesian)
    assert len(bayesian) == len([m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]) - 6
    for head in ("aux1", "aux2"):  # the parameters they started from: no gradient reached them
        trained = dict(getattr(net.body, head).named_parameters())
        for name, value in getattr(model, head).named_parameters():
            torch.testing.assert_close(trained[name], value, rtol=1e-6, atol=0)
    summary = pyro_bc.compress(net, tmp_path / "g.bcz", val=(x, y), train=(x, y), thresholds=half_thresholds(net))
    with torch.no_grad():
        want, got = pyro_bc.pruned_network(net, summary, train=(x, y))(x), pyro_bc.load(tmp_path / "g.bcz")(x)
    assert ((got - want).norm() / want.norm()).item() < 0.02


class _SegmentationLogits(nn.Module):
    """torchvision's segmentation models return ``{"out": (N, C, H, W), ...}``: the logits, classes last."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)["out"].movedim(1, -1)


def test_a_torchvision_segmenter_labelling_every_pixel_trains_and_its_file_computes_the_pruned_network(tmp_path):
    """LR-ASPP on MobileNetV3 (a class per pixel), wrapped to give its logits classes last: it trains on per-pixel
    labels, and the file computes the pruned network; the recorded error is the pixels' (counted here)."""
    torch.manual_seed(0)
    model = tv.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3)
    net = pyro_bc.bayesianize(_SegmentationLogits(model), "gnj", input_shape=(3, 64, 64))
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(16, 3, 64, 64, generator=generator)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    pyro_bc.fit(net, (x, y), epochs=1, batch_size=8, progress=False)
    with torch.no_grad():  # one epoch leaves every group alike: group variances set by hand, as for the classifiers
        for layer in net.layers:
            layer.prior.z_logvar.copy_(torch.randn(layer.prior.z_logvar.shape, generator=generator) * 2 - 4)
    summary = pyro_bc.compress(net, tmp_path / "s.bcz", val=(x, y), train=(x, y), test=(x, y),
                               thresholds=half_thresholds(net))
    with torch.no_grad():
        want, got = pyro_bc.pruned_network(net, summary, train=(x, y))(x), pyro_bc.load(tmp_path / "s.bcz")(x)
    assert got.shape == (16, 64, 64, 3)
    assert ((got - want).norm() / want.norm()).item() < 0.02
    assert summary["error_compressed"] == pytest.approx(100 * (got.argmax(-1) != y).float().mean().item())
    assert sum(row["groups_kept"] for row in summary["layers"]) < sum(row["groups_total"] for row in summary["layers"])
