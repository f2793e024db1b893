"""Metrics of class probabilities (pyro_bc.metrics.scores) against cases worked by hand."""

import math
import re

import pytest
import torch

from pyro_bc.errors import ConfigError
from pyro_bc.metrics.evaluate import error_percent
from pyro_bc.metrics.scores import ECE_BINS, brier, classification_metrics, ece, error, nll

# Four examples of three classes; every top-class probability lies inside a bin of width 1/15 (no edge).
PROBS = torch.tensor([[0.70, 0.20, 0.10],    # label 0: right, confidence 0.70 (bin 10)
                      [0.50, 0.30, 0.20],    # label 1: wrong, confidence 0.50 (bin 7)
                      [0.11, 0.11, 0.78],    # label 2: right, confidence 0.78 (bin 11)
                      [0.25, 0.45, 0.30]])   # label 1: right, confidence 0.45 (bin 6)
LABELS = torch.tensor([0, 1, 2, 1])


def test_hand_worked_case():
    assert ECE_BINS == 15
    assert error(PROBS, LABELS) == pytest.approx(25.0)
    assert nll(PROBS, LABELS) == pytest.approx(-(math.log(0.7) + math.log(0.3) + math.log(0.78) + math.log(0.45)) / 4)
    # (0.09 + 0.04 + 0.01) + (0.25 + 0.49 + 0.04) + (0.0121 + 0.0121 + 0.0484) + (0.0625 + 0.3025 + 0.09)
    assert brier(PROBS, LABELS) == pytest.approx(1.4476 / 4)
    # one example per bin: |0.70 - 1| + |0.50 - 0| + |0.78 - 1| + |0.45 - 1|
    assert ece(PROBS, LABELS) == pytest.approx(1.57 / 4)
    assert classification_metrics(PROBS, LABELS) == pytest.approx(
        {"error": 25.0, "nll": nll(PROBS, LABELS), "brier": 1.4476 / 4, "ece": 1.57 / 4})


def test_ece_averages_within_a_bin_before_the_absolute_value():
    probs = torch.tensor([[0.62, 0.38], [0.64, 0.36]])  # both in bin 9 of 15: (0.6, 0.667]
    labels = torch.tensor([0, 1])  # one right, one wrong: accuracy 0.5, confidence 0.63
    assert ece(probs, labels) == pytest.approx(0.13)  # per example it would be (0.38 + 0.64) / 2


def test_ece_bins_are_closed_on_the_right():
    probs = torch.tensor([[0.5, 0.25, 0.25, 0.0],       # label 0: right, confidence exactly 0.5
                          [0.375, 0.3, 0.2, 0.125],     # label 1: wrong, confidence 0.375
                          [1.0, 0.0, 0.0, 0.0]])        # label 0: right, confidence 1 (last bin)
    labels = torch.tensor([0, 1, 0])
    # 4 bins: 0.5 shares (0.25, 0.5] with 0.375: |0.875 - 1| / 3 (with [0.5, 0.75) it would be 0.875 / 3)
    assert ece(probs, labels, bins=4) == pytest.approx(0.125 / 3)


def test_ties_predict_the_lowest_class():
    probs = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    assert error(probs, torch.tensor([0, 1])) == pytest.approx(50.0)


@pytest.mark.parametrize("k", [2, 10])
def test_uniform_and_one_hot_closed_forms(k):
    labels = torch.arange(20) % k
    uniform = torch.full((20, k), 1.0 / k)
    assert nll(uniform, labels) == pytest.approx(math.log(k))
    assert brier(uniform, labels) == pytest.approx((1 - 1 / k) ** 2 + (k - 1) / k**2)
    # all predict class 0 at confidence 1/k; the fraction of label 0 is its accuracy
    accuracy = float((labels == 0).double().mean())
    assert ece(uniform, labels) == pytest.approx(abs(1 / k - accuracy), abs=1e-7)  # 1/k held in float32
    one_hot = torch.nn.functional.one_hot(labels, k).float()
    assert classification_metrics(one_hot, labels) == {"error": 0.0, "nll": 0.0, "brier": 0.0, "ece": 0.0}


def test_a_zero_probability_costs_a_finite_nll():
    nats = nll(torch.tensor([[1.0, 0.0]]), torch.tensor([1]))
    assert nats == pytest.approx(-math.log(torch.finfo(torch.float32).tiny))
    assert math.isfinite(nats)


def test_calibrated_draws_have_small_ece():
    """Labels drawn from the probabilities themselves: the ECE is only sampling noise (below 0.02 for 20,000
    examples: each bin's accuracy has standard error at most 0.5 / sqrt(n_b))."""
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(20_000, 5, generator=g), -1)
    labels = torch.multinomial(probs, 1, generator=g).squeeze(1)
    assert ece(probs, labels) < 0.02
    assert ece(probs, (labels + 1) % 5) > 0.3


@pytest.mark.parametrize("probs, labels, message", [
    (torch.ones(3), torch.zeros(3, dtype=torch.long), "must be [examples, classes]"),
    (torch.ones(3, 2), torch.zeros(2, dtype=torch.long), "of shape (2,) do not match probabilities of shape (3, 2)"),
    (torch.ones(3, 4, 2), torch.zeros(3, dtype=torch.long), "of shape (3,) do not match probabilities of shape (3, 4, 2)"),
    (torch.ones(3, 2), torch.zeros(3), "integer class indices"),
    (torch.ones(3, 2), torch.tensor([0, 1, 2]), "must lie in 0..1"),
])
def test_bad_input_raises_one_line(probs, labels, message):
    for metric in (error, nll, brier, ece):
        with pytest.raises(ConfigError, match=re.escape(message)) as info:
            metric(probs, labels)
        assert "\n" not in str(info.value)


def test_a_label_per_position_scores_every_position():
    """The hand-worked case's four rows as two examples of two positions each (a tagger's tokens, a segmenter's
    pixels): every metric is the same mean over the four labelled positions."""
    probs, labels = PROBS.reshape(2, 2, 3), LABELS.reshape(2, 2)
    assert error(probs, labels) == pytest.approx(25.0)
    assert nll(probs, labels) == pytest.approx(-(math.log(0.7) + math.log(0.3) + math.log(0.78) + math.log(0.45)) / 4)
    assert brier(probs, labels) == pytest.approx(1.4476 / 4)
    assert ece(probs, labels) == pytest.approx(1.57 / 4)
    logits = PROBS.log().reshape(2, 2, 3)  # error_percent's argmax over the last axis, in percent of the positions
    assert error_percent(torch.nn.Identity(), logits, labels) == pytest.approx(25.0)
    # a fifth position labelled -100 (PyTorch's ignore_index: padding) counts in none of them
    padded_probs = torch.cat([PROBS, torch.tensor([[0.1, 0.1, 0.8]])])
    padded = torch.cat([LABELS, torch.tensor([-100])])
    assert classification_metrics(padded_probs, padded) == pytest.approx(classification_metrics(PROBS, LABELS))
    assert error_percent(torch.nn.Identity(), padded_probs.log(), padded) == pytest.approx(25.0)


def test_no_examples():
    empty = torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)
    assert classification_metrics(*empty) == {"error": 0.0, "nll": 0.0, "brier": 0.0, "ece": 0.0}


class _PadSensitive(torch.nn.Module):
    """nn.TransformerEncoder masking padding, then a mean over every position (padding included): PyTorch's fused
    inference path gives zeros at padded positions, its training path values."""

    def __init__(self):
        super().__init__()
        layer = torch.nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0, batch_first=True)
        self.embed, self.encoder = torch.nn.Embedding(9, 8), torch.nn.TransformerEncoder(layer, 1)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, ids):
        return self.head(self.encoder(self.embed(ids), src_key_padding_mask=ids == 0).mean(1))


def test_error_percent_computes_as_training_does_at_padded_positions():
    """The error of the network in eval mode equals its error computed in training mode (no dropout: the same
    function, by PyTorch's other path), where the fused path's logits differ."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    ids, y = torch.randint(1, 9, (300, 6), generator=g), torch.randint(0, 3, (300,), generator=g)
    ids[:, 3:] = 0
    module = _PadSensitive().eval()
    with torch.no_grad():
        fused = module(ids)
        trained = module.train()(ids)
    assert not torch.allclose(fused, trained, atol=1e-3)  # the two paths differ here
    by_hand = 100.0 * float((trained.argmax(-1) != y).float().mean())
    assert error_percent(module.eval(), ids, y) == pytest.approx(by_hand)
