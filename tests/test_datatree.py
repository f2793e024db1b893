"""The posterior DataTree: groups, variables, dims and coords match the network; NetCDF round trip."""

import numpy as np
import pytest

from models import lenet5, lenet300
from pyro_bc.report.datatree import load_datatree, save_datatree, to_datatree


@pytest.mark.parametrize("prior", ["gnj", "ghs", "lu"])
def test_lenet300_tree_matches_network(prior):
    net = lenet300.build(prior)
    dt = to_datatree(net, num_samples=20, seed=1)
    assert set(dt.children) == ({"posterior", "prior"} if prior == "ghs" else {"posterior"})
    post = dt["posterior"]
    assert post.sizes["chain"] == 1 and post.sizes["draw"] == 20
    for name, groups in [("fc1", 784), ("fc2", 300), ("fc3", 100)]:
        assert np.array_equal(post[f"{name}_group"].values, np.arange(groups))
        assert post[f"{name}_log_alpha"].dims == ("chain", "draw", f"{name}_group")
        if prior == "lu":
            assert f"{name}_z" not in post
        else:
            assert post[f"{name}_z"].dims == ("chain", "draw", f"{name}_group")
            assert np.all(np.isfinite(post[f"{name}_z"].values))
        assert post[f"{name}_w"].dims == ("chain", "draw", f"{name}_w_group", f"{name}_w_unit")
        assert post[f"{name}_w"].shape[2:] == (16, 10 if name == "fc3" else 16)
    if prior == "ghs":
        assert dt["prior"]["fc1_z"].dims == ("chain", "draw", "fc1_group")
        assert np.all(dt["prior"]["fc1_z"].values > 0)
        assert post["fc1_tau"].dims == ("chain", "draw")
    else:
        assert "fc1" in dt.attrs["improper_prior_layers"]
    # log alpha is the layer's, repeated over the draws
    expected = net.layers[0].log_alpha().detach()
    if prior == "lu":
        expected = expected.median(dim=0).values
    np.testing.assert_allclose(post["fc1_log_alpha"].values[0, 5], expected.numpy(), rtol=1e-5, atol=1e-5)


def test_gnj_scales_follow_the_guide():
    net = lenet300.build("gnj")
    post = to_datatree(net, num_samples=400, seed=0)["posterior"]
    z = post["fc2_z"].values[0]
    np.testing.assert_allclose(z.mean(0), net.layers[1].prior.z_mu.detach().numpy(), atol=3e-3)


def test_lenet5_conv_channels_and_round_trip(tmp_path):
    dt = to_datatree(lenet5.build("gnj"), num_samples=10)
    post = dt["posterior"]
    for name, n in [("conv1_channel", 20), ("conv2_channel", 50), ("fc1_group", 800), ("fc2_group", 500)]:
        assert post.sizes[name] == n
    assert post["conv1_z"].dims == ("chain", "draw", "conv1_channel")
    path = save_datatree(dt, tmp_path / "posterior.nc")
    back = load_datatree(path)
    assert set(back.children) == set(dt.children)
    for var in post.data_vars:
        np.testing.assert_array_equal(back["posterior"][var].values, post[var].values)
        assert back["posterior"][var].dims == post[var].dims
    assert back.attrs["layers"] == "conv1,conv2,fc1,fc2"


def test_seeded():
    net = lenet300.build("ghs")
    a, b = to_datatree(net, 5, seed=3), to_datatree(net, 5, seed=3)
    np.testing.assert_array_equal(a["posterior"]["fc1_z"].values, b["posterior"]["fc1_z"].values)
    np.testing.assert_array_equal(a["prior"]["fc1_z"].values, b["prior"]["fc1_z"].values)


def test_predictions_group_holds_draws_of_the_predictive(tmp_path):
    import arviz as az
    import torch

    from pyro_bc.metrics.predict import predictive
    from pyro_bc.report.datatree import predictions_datatree, with_predictions

    torch.manual_seed(0)
    net = lenet300.build(prior="gnj")
    with torch.no_grad():
        for layer in net.layers:
            layer.weight_logvar.fill_(-4.0)  # wide enough that draws differ visibly
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(12, 1, 28, 28, generator=g), torch.randint(0, 10, (12,), generator=g)
    tree = predictions_datatree(net, x, y, num_samples=300, seed=0, n_examples=5)
    probs = tree["predictions"].ds["class_probs"]
    assert probs.dims == ("chain", "draw", "example", "class") and probs.shape == (1, 300, 5, 10)
    assert tree["predictions_constant_data"].ds["label"].values.tolist() == y[:5].tolist()
    np.testing.assert_allclose(probs.sum("class").values, 1.0, atol=1e-5)
    # the draws' mean against an independent estimate (other seeds), within 5 standard errors
    mean, se = probs.mean("draw").values[0], probs.std("draw").values[0] / np.sqrt(300)
    other = predictive(net, x[:5], samples=300, seed=10_000).numpy()
    assert np.all(np.abs(mean - other) <= 5 * np.sqrt(2) * se + 1e-6)
    assert float(se.max()) > 1e-4  # the draws do differ
    assert len(az.summary(tree, group="predictions", kind="stats")) == 50  # ArviZ's own functions apply
    full = with_predictions(to_datatree(net, num_samples=4), net, x, y, num_samples=3)
    back = load_datatree(save_datatree(full, tmp_path / "p.nc"))
    assert {"posterior", "predictions", "predictions_constant_data"} <= set(back.children)
    assert back["predictions"].ds["class_probs"].shape == (1, 3, 12, 10)
