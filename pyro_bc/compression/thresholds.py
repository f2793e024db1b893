"""Threshold rules: the ways ``compress`` chooses one log alpha threshold per Bayesian layer.

Each rule is a small object with a :attr:`~ThresholdRule.name`, its :attr:`~ThresholdRule.settings`
(a JSON-able dict of its constructor's arguments, recorded in ``MODEL.json`` as ``threshold_rule``) and
:meth:`~ThresholdRule.thresholds`, which returns the thresholds for a fitted network:

* :class:`GivenThresholds`   the thresholds given (``--thresholds T1 T2 ...``);
* :class:`GapRule`           per layer, the middle of the widest gap in the sorted log alpha values (``--auto gap``);
* :class:`ValidationBudget`  the most compressing thresholds within a validation error budget
  (``--max-error-increase P``);
* :class:`WeightsBudget`     the least pruned network within a budget of weights kept, one threshold for every layer
  (``--max-weights-kept P``);
* :class:`PriorDefault`      each layer's prior's default cut (``layer.prior.default_threshold``);
* :class:`KeptStructure`     the structure a fine-tuning run was given (the default for such a run).

A new rule is a subclass plus one entry in :data:`RULES`.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import math
from abc import abstractmethod
from typing import ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm

from pyro_bc.compression.compressed import compressed_module
from pyro_bc.compression.finetuning import load_masks
from pyro_bc.compression.graph import BodyGraph, prune_network
from pyro_bc.compression.posterior import LayerPosterior, weights_kept_fraction
from pyro_bc.compression.rules import RecordedRule
from pyro_bc.errors import ConfigError
from pyro_bc.metrics.evaluate import error
from pyro_bc.nn.network import BayesianNet


@dataclasses.dataclass
class ThresholdInputs:
    """What a rule may look at: the network and its posterior, and, for rules that measure errors, the
    validation set and the layers' input means that pruned weights are folded with (``None``: no fold)."""

    net: BayesianNet
    posts: list[LayerPosterior]
    val_x: torch.Tensor | None = None
    val_y: torch.Tensor | None = None
    input_means: list[torch.Tensor] | None = None
    graph: BodyGraph | None = None  # the network's, built once by the caller (else on each pruning)


class ThresholdRule(RecordedRule):
    """A way of choosing one log alpha threshold per Bayesian layer."""

    @abstractmethod
    def thresholds(self, inputs: ThresholdInputs) -> list[float]:
        """One threshold per Bayesian layer of ``inputs.net``, in the network's order."""

    @abstractmethod
    def method(self, thresholds: list[float]) -> str:
        """The one-line description ``MODEL.json`` keeps as ``threshold_method``, given the chosen thresholds."""


class GivenThresholds(ThresholdRule):
    """The thresholds given, one per layer (their number and finiteness are checked when pruning)."""

    name = "given"

    def __init__(self, thresholds: list[float]):
        self.values = [float(t) for t in thresholds]

    @property
    def settings(self) -> dict:
        return {"thresholds": list(self.values)}

    def thresholds(self, inputs: ThresholdInputs) -> list[float]:
        return list(self.values)

    def method(self, thresholds: list[float]) -> str:
        return "given"


class GapRule(ThresholdRule):
    """Per layer, the middle of the widest gap between sorted log alpha values that overlaps [lo, hi],
    clipped to [lo, hi]; ``fallback`` where no gap of at least ``min_gap`` nats is found (docs/METHOD.md 11).
    ``lo``, ``hi`` and ``fallback`` are on the group priors' scale, whose default cut is -3; for a layer whose prior
    cuts elsewhere by default (``lu``: 3, per weight) they move by the difference.

    Between 20 or 50 values spread over a continuum, gaps of one nat occur by chance, while the two modes of a
    layer that has separated lie several nats apart: hence the 2-nat minimum (the measurements behind it are in
    analysis/results/lenet5-gnj/NOTES.md).
    """

    name = "gap"

    def __init__(self, lo: float = -6.0, hi: float = 2.0, min_gap: float = 2.0, fallback: float = -3.0):
        self.lo, self.hi, self.min_gap, self.fallback = float(lo), float(hi), float(min_gap), float(fallback)

    @property
    def settings(self) -> dict:
        return {"lo": self.lo, "hi": self.hi, "min_gap": self.min_gap, "fallback": self.fallback}

    GROUP_CUT: ClassVar[float] = -3.0  # the default cut of the group priors, the scale of lo, hi and fallback

    def thresholds(self, inputs: ThresholdInputs) -> list[float]:
        return [self.layer_threshold(post.log_alpha, post.default_threshold - self.GROUP_CUT) for post in inputs.posts]

    def layer_threshold(self, log_alpha: torch.Tensor, shift: float = 0.0) -> float:
        """The threshold of one layer from its log alpha values, ``lo``, ``hi`` and ``fallback`` moved by ``shift``."""
        lo, hi = self.lo + shift, self.hi + shift
        values = np.sort(log_alpha.flatten().double().numpy())
        left, right = values[:-1], values[1:]
        widths = right - left
        ok = (right >= lo) & (left <= hi) & (widths >= self.min_gap)
        if not ok.any():
            return self.fallback + shift
        best = np.flatnonzero(ok)[np.argmax(widths[ok])]
        return float(np.clip((left[best] + right[best]) / 2, lo, hi))

    def method(self, thresholds: list[float]) -> str:
        return "auto gap"


class ValidationBudget(ThresholdRule):
    """The most compressing per-layer thresholds whose pruned (and folded) network's **validation** error stays
    within ``max_error_increase`` percentage points of the unpruned posterior-mean network's.

    Layers are visited in the order of the weights their groups govern, most first (:func:`governed_weights`:
    fc2's groups of LeNet-5 are fc1's outputs, so they govern fc1's rows too); for each, a binary search over
    :attr:`GRID` finds the lowest threshold that keeps the error within budget with the others fixed. Every
    accepted setting was evaluated, so the budget holds for the result. The errors are those before rounding:
    the bits are another rule's (``--bits-budget`` bounds what rounding costs). Rounding an unpruned layer is
    the costliest case (its pruned-to-be groups' large variances ask for few bits), so including it would make
    the least pruned network the worst, not the best.
    """

    name = "max-error-increase"
    GRID: ClassVar[np.ndarray] = np.round(np.arange(-8.0, 6.01, 0.25), 2)

    def __init__(self, max_error_increase: float):
        self.max_error_increase = max_error_increase

    @property
    def settings(self) -> dict:
        return {"max_error_increase": self.max_error_increase}

    def thresholds(self, inputs: ThresholdInputs) -> list[float]:
        if inputs.val_x is None or inputs.val_y is None:
            raise ConfigError(f"the {self.name} rule needs validation examples and there are none (a run trained "
                              "with --val-size 0, or compress without val): give thresholds or the gap rule")
        net, posts, grid = inputs.net, inputs.posts, self.GRID
        limit = error(net.posterior_mean_network(), inputs.val_x, inputs.val_y, net.observation) + \
            self.max_error_increase
        thresholds = [float(grid[-1])] * len(posts)
        if self._error(inputs, thresholds) > limit:
            raise ConfigError(f"even the least pruned network exceeds the error budget of {self.max_error_increase} "
                              "points: raise --max-error-increase")
        governed = governed_weights(net, posts, inputs.graph)
        order = sorted(range(len(posts)), key=lambda k: -governed[k])  # a bar on a terminal: a search per layer
        for i in tqdm(order, desc="error budget, layers searched", leave=False, disable=None):
            lo, hi = 0, len(grid) - 1  # grid[hi] is known to be within budget
            while lo < hi:
                mid = (lo + hi) // 2
                trial = thresholds[:i] + [float(grid[mid])] + thresholds[i + 1:]
                if self._error(inputs, trial) <= limit:
                    hi = mid
                else:
                    lo = mid + 1
            thresholds[i] = float(grid[hi])
        return thresholds

    @staticmethod
    def _error(inputs: ThresholdInputs, thresholds: list[float]) -> float:
        """Validation error (%) of the pruned and folded network at ``thresholds``, unrounded; infinite where a layer
        keeps no weight (a ``.bcz`` cannot store it: even a residual branch pruned away is over any budget, 100 points
        included)."""
        layers = prune_network(inputs.net, inputs.posts, thresholds, inputs.input_means, inputs.graph)
        if any(layer.empty for layer in layers):
            return math.inf
        return error(compressed_module(inputs.net, layers, None, inputs.graph), inputs.val_x, inputs.val_y,
                     inputs.net.observation)

    def method(self, thresholds: list[float]) -> str:
        return f"max validation error increase {self.max_error_increase} points"


class WeightsBudget(ThresholdRule):
    """The least pruned network that keeps at most ``max_weights_kept`` percent of the weights: one log alpha
    threshold for every layer, the highest whose pruning stays within the budget.

    Log alpha (a group's noise over its signal) ranks the groups of all layers on one scale, so the kept groups are
    the network's most certain ones, wherever they sit. The rule looks at no data: a size target, and a cut for runs
    trained on every example (``--val-size 0``). Weights are counted as ``weights_kept_fraction`` counts them,
    after the pruning has followed the graph (a neuron gone takes the weights that read it along)."""

    name = "max-weights-kept"

    def __init__(self, max_weights_kept: float):
        if not 0 < max_weights_kept <= 100:
            raise ConfigError(f"max_weights_kept is a percentage in (0, 100], not {max_weights_kept!r}")
        self.max_weights_kept = float(max_weights_kept)

    @property
    def settings(self) -> dict:
        return {"max_weights_kept": self.max_weights_kept}

    def thresholds(self, inputs: ThresholdInputs) -> list[float]:
        posts, graph = inputs.posts, inputs.graph or BodyGraph(inputs.net)
        values = torch.cat([post.log_alpha.detach().flatten().double() for post in posts]).unique()  # sorted
        # cuts[k] keeps the groups of the k smallest log alpha values: the middles between neighbours, and the ends
        cuts = torch.cat([values[:1] - 1, (values[:-1] + values[1:]) / 2, values[-1:] + 1]).tolist()

        @functools.cache  # the bisections and their checks ask for some cuts twice
        def pruned(k: int) -> list:
            return prune_network(inputs.net, posts, [cuts[k]] * len(posts), None, graph)

        def percent_kept(k: int) -> float:
            return 100 * weights_kept_fraction(pruned(k))

        def keeps_every_layer(k: int) -> bool:
            return not any(layer.empty for layer in pruned(k))

        best = bisect.bisect_right(range(len(cuts)), self.max_weights_kept, key=percent_kept) - 1  # cut 0 keeps 0%
        if not keeps_every_layer(best):
            least = bisect.bisect_left(range(len(cuts)), True, key=keeps_every_layer)
            raise ConfigError(f"a budget of {self.max_weights_kept:g}% of weights leaves a layer no weight: the least "
                              f"that keeps every layer is {percent_kept(least):.4g}%; raise --max-weights-kept")
        return [cuts[best]] * len(posts)

    def method(self, thresholds: list[float]) -> str:
        return f"at most {self.max_weights_kept:g}% of weights kept"


def governed_weights(net: BayesianNet, posts: list[LayerPosterior], graph: BodyGraph | None = None) -> list[float]:
    """Per layer, the weights its groups govern: its number of groups (weights, for a per-weight prior) times the
    weights that go when its most prunable group goes alone, all else kept. Measured by the pruning itself, so
    it counts what a group takes with it across the graph: its own weights and its neighbours' (an input
    neuron's column and the row that produced it)."""
    tops = [float(post.log_alpha.max()) for post in posts]
    keep_all = [top + 1.0 for top in tops]

    def weights_kept(thresholds: list[float]) -> int:
        return sum(int(layer.mask.sum()) for layer in prune_network(net, posts, thresholds, None, graph))

    everything = weights_kept(keep_all)
    governed = []
    for i, (post, top) in enumerate(zip(posts, tops)):
        below = float(np.nextafter(np.float32(top), np.float32(-np.inf)))
        pruned = int((post.log_alpha >= below).sum())  # what the threshold ``below`` prunes: the top group and ties
        removed = everything - weights_kept(keep_all[:i] + [below] + keep_all[i + 1:])
        governed.append(post.log_alpha.numel() * removed / pruned)
    return governed


class PriorDefault(ThresholdRule):
    """Each layer's prior's default cut (``layer.prior.default_threshold``: -3 per group, 3 per weight for ``lu``)."""

    name = "prior-default"

    @property
    def settings(self) -> dict:
        return {}

    def thresholds(self, inputs: ThresholdInputs) -> list[float]:
        return [float(layer.prior.default_threshold) for layer in inputs.net.layers]

    def method(self, thresholds: list[float]) -> str:
        return "default " + ", ".join(f"{t:g}" for t in dict.fromkeys(thresholds))


class KeptStructure(ThresholdRule):
    """The structure a fine-tuning run (``pyro-bc finetune``) was given: per layer, the middle between the largest
    log alpha of the groups (weights, for ``lu``) its own threshold kept and the smallest of those it pruned above
    it, so that the pruning of ``RUN_DIR/finetune.pt`` is reproduced exactly and nothing new is pruned.

    Fine-tuning's KL may move a kept group's log alpha above a pruned one's; the pruned one is still pruned where
    the network holds it at zero (``net.pruning_masks``, which fine-tuning and loading its run set). A network
    without them gets a ConfigError there (then give thresholds)."""

    name = "kept-structure"

    def __init__(self, run_dir: str):
        self.run_dir = str(run_dir)

    @property
    def settings(self) -> dict:
        return {"run_dir": self.run_dir}

    def thresholds(self, inputs: ThresholdInputs) -> list[float]:
        masks, _ = load_masks(self.run_dir)
        if len(masks) != len(inputs.posts):
            raise ConfigError(f"{self.run_dir}: masks of {len(masks)} layers for a network of {len(inputs.posts)}")
        out = []
        for post, mask in zip(inputs.posts, masks):
            log_alpha, own = post.log_alpha.flatten().double(), mask.own.flatten()
            if log_alpha.shape != own.shape:
                raise ConfigError(f"{post.name}: the fine-tuning masks do not fit the network's log alpha")
            kept, pruned = log_alpha[own], log_alpha[~own]
            if len(kept) and len(pruned) and pruned.min() <= kept.max():
                held = post.held_at_zero is not None and torch.equal(post.held_at_zero.flatten(), ~own)
                if not held:
                    raise ConfigError(f"{post.name}: fine-tuning moved a kept group's log alpha "
                                      f"({float(kept.max()):.3g}) to or above a pruned one's "
                                      f"({float(pruned.min()):.3g}), and the network does not hold the pruned "
                                      "ones at zero (net.pruning_masks): give --thresholds")
                pruned = pruned[pruned > kept.max()]  # the others are held at zero, below the threshold or not
            if not len(pruned):
                out.append(float(kept.max()) + 1.0)
            elif not len(kept):
                out.append(float(pruned.min()) - 1.0)
            else:
                out.append(float((kept.max() + pruned.min()) / 2))
        return out

    def method(self, thresholds: list[float]) -> str:
        return "the structure fine-tuning was given"


RULES: dict[str, type[ThresholdRule]] = {rule.name: rule for rule in
                                         (GivenThresholds, GapRule, ValidationBudget, WeightsBudget, PriorDefault,
                                          KeptStructure)}
AUTO_RULES: dict[str, type[ThresholdRule]] = {"gap": GapRule}  # ``--auto NAME``


def rule_from_options(thresholds: list[float] | None = None, auto: str | None = None,
                      max_error_increase: float | None = None, max_weights_kept: float | None = None) -> ThresholdRule:
    """The rule the command line's options name: ``--thresholds``, else ``--auto``, else
    ``--max-error-increase``, else ``--max-weights-kept``, else the priors' defaults."""
    if thresholds is not None:
        return GivenThresholds(thresholds)
    if auto is not None:
        if auto not in AUTO_RULES:
            raise ConfigError(f"unknown automatic threshold rule {auto!r}: choose {', '.join(AUTO_RULES)}")
        return AUTO_RULES[auto]()
    if max_error_increase is not None:
        return ValidationBudget(max_error_increase)
    if max_weights_kept is not None:
        return WeightsBudget(max_weights_kept)
    return PriorDefault()


def rule_from_record(record: dict) -> ThresholdRule:
    """The rule that :meth:`ThresholdRule.record` (``MODEL.json``'s ``threshold_rule``) describes."""
    name = record.get("name") if isinstance(record, dict) else None
    if name not in RULES:
        raise ConfigError(f"unknown threshold rule {name!r}: choose one of {', '.join(RULES)}")
    try:
        return RULES[name](**record.get("settings", {}))
    except TypeError as e:
        raise ConfigError(f"threshold rule {name}: bad settings {record.get('settings')!r} ({e})")
