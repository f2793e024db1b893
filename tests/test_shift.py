"""Shift without new data (pyro_bc.metrics.shift): rotations against exact pixel permutations, entropy and AUROC against
closed forms and a brute-force count, image fitting, noise, the rotation curve of a constant network."""

import math

import pytest
import torch
from torch import nn

from pyro_bc.errors import ConfigError
from pyro_bc.metrics.shift import (
    ROTATIONS,
    auroc,
    entropy,
    fit_images,
    noise_images,
    rotate,
    rotation_curve,
    shift_report,
)


def test_right_angles_permute_pixels_exactly():
    x = torch.randn(3, 2, 6, 6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(rotate(x, 0), x, atol=1e-6, rtol=0)
    torch.testing.assert_close(rotate(x, 90), torch.rot90(x, 1, (2, 3)), atol=1e-5, rtol=0)  # counter-clockwise
    torch.testing.assert_close(rotate(x, 180), torch.flip(x, (2, 3)), atol=1e-5, rtol=0)


def test_corners_outside_the_image_take_the_fill():
    x = torch.ones(1, 1, 8, 8)
    out = rotate(x, 45, fill=-1.0)
    assert float(out[0, 0, 0, 0]) == pytest.approx(-1.0)  # a corner came from outside
    assert float(out[0, 0, 4, 4]) == pytest.approx(1.0)  # the centre stays
    assert float(rotate(x - 2, 45)[0, 0, 0, 0]) == pytest.approx(-1.0)  # default fill: the minimum of x


def test_entropy_closed_forms():
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    torch.testing.assert_close(entropy(probs), torch.tensor([math.log(4), 0.0, math.log(2)], dtype=torch.float64))


def test_auroc_hand_case_ties_and_brute_force():
    assert auroc(torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.25, 0.35])) == pytest.approx(5 / 6)
    assert auroc(torch.tensor([1.0]), torch.tensor([1.0])) == pytest.approx(0.5)
    assert auroc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 0.0
    g = torch.Generator().manual_seed(0)
    inside, outside = torch.randint(0, 6, (50,), generator=g).float(), torch.randint(2, 9, (40,), generator=g).float()
    pairs = (outside[None, :] > inside[:, None]).double() + 0.5 * (outside[None, :] == inside[:, None]).double()
    assert auroc(inside, outside) == pytest.approx(float(pairs.mean()))
    with pytest.raises(ConfigError, match="both sides"):
        auroc(torch.zeros(0), torch.ones(2))


def test_fit_images():
    x = torch.stack([torch.full((8, 8), v) for v in (0.0, 3.0, 6.0)])[None]  # one 3-channel image
    out = fit_images(x, (1, 28, 28))
    assert out.shape == (1, 1, 28, 28)
    torch.testing.assert_close(out, torch.full((1, 1, 28, 28), 3.0))  # the channels' mean, resized
    assert fit_images(torch.zeros(2, 1, 5, 5), (3, 5, 5)).shape == (2, 3, 5, 5)
    with pytest.raises(ConfigError, match="channels do not fit"):
        fit_images(torch.zeros(2, 2, 5, 5), (3, 5, 5))


def test_noise_images_are_seeded_and_in_range():
    like = torch.linspace(-1, 1, 2 * 28 * 28).reshape(2, 1, 28, 28)
    noise = noise_images(like)
    assert noise.shape == like.shape and float(noise.min()) >= -1 and float(noise.max()) <= 1
    assert torch.equal(noise, noise_images(like)) and not torch.equal(noise, noise_images(like, seed=1))


def test_noise_of_token_ids_is_seeded_ids_within_the_inputs_range():
    like = torch.tensor([[3, 9, 4], [5, 3, 7]])
    noise = noise_images(like.repeat(200, 1))
    assert noise.dtype == torch.int64 and set(noise.unique().tolist()) == set(range(3, 10))
    assert torch.equal(noise, noise_images(like.repeat(200, 1)))


class _Constant(nn.Module):
    """Logits log(0.7), log(0.2), log(0.1) whatever the input."""

    def forward(self, x):
        return torch.tensor([0.7, 0.2, 0.1]).log().expand(len(x), 3)


def test_rotation_curve_of_a_constant_network():
    x, y = torch.rand(6, 1, 4, 4), torch.tensor([0, 0, 1, 2, 0, 1])
    curve = rotation_curve(_Constant(), x, y)
    expected_nll = -(3 * math.log(0.7) + 2 * math.log(0.2) + math.log(0.1)) / 6
    assert curve["degrees"] == list(ROTATIONS) and ROTATIONS[0] == 0 and ROTATIONS[-1] == 180
    assert curve["error"] == pytest.approx([50.0] * len(ROTATIONS))
    assert curve["nll"] == pytest.approx([expected_nll] * len(ROTATIONS))
    assert curve["nll_area"] == pytest.approx(expected_nll)
    report = shift_report(_Constant(), x, y, rotation=True, ood=("noise again", noise_images(x, seed=5)))
    assert report["noise_auroc"] == pytest.approx(0.5) and report["ood"]["auroc"] == pytest.approx(0.5)  # all tied
    assert report["ood"]["n"] == 6 and report["rotation"] == curve
