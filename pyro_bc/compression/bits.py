"""Bit rules: the ways ``compress`` chooses each layer's mantissa bits once the thresholds are fixed.

Each rule is a small object with a :attr:`~BitsRule.name`, its :attr:`~BitsRule.settings` (a JSON-able dict
of its constructor's arguments, recorded in ``MODEL.json`` as ``bits_rule``) and :meth:`~BitsRule.precision`,
which returns the :class:`~pyro_bc.compression.posterior.Precision` of the pruned layers:

* :class:`VarianceRule`          the paper's: from the posterior variances alone (docs/METHOD.md 7.2; the default);
* :class:`ValidationBitsBudget`  the variance rule's bits, lowered while the compressed network's **validation**
  error stays within a budget (``--bits-budget P``).

Every rule starts from the variance rule's precision; the exponent bits are never changed. A new rule is a
subclass, plus an option in :func:`bits_rule_from_options` for the command line.
"""

from __future__ import annotations

import dataclasses
import math
from abc import abstractmethod
from collections.abc import Callable

from pyro_bc.compression.posterior import Precision, PrunedLayer
from pyro_bc.compression.rules import RecordedRule
from pyro_bc.errors import ConfigError

#: Slack (percentage points) on the budget comparison, so that float rounding of ``error + budget`` never
#: refuses a setting that is exactly on the budget.
TOLERANCE = 1e-9


@dataclasses.dataclass
class BitsInputs:
    """What a rule may look at: the pruned layers, the variance rule's precision (every rule's start) and,
    for rules that measure errors, the validation error (%) of the compressed network at a precision."""

    layers: list[PrunedLayer]
    variance: Precision
    error: Callable[[Precision], float] | None = None


class BitsRule(RecordedRule):
    """A way of choosing each pruned layer's mantissa bits."""

    @abstractmethod
    def precision(self, inputs: BitsInputs) -> Precision:
        """The exponent bits and one mantissa width per layer of ``inputs.layers``."""


class VarianceRule(BitsRule):
    """The paper's rule: each layer's mantissa bits from its kept weights' posterior variances
    (:func:`~pyro_bc.compression.posterior.choose_precision`)."""

    name = "variance"

    @property
    def settings(self) -> dict:
        return {}

    def precision(self, inputs: BitsInputs) -> Precision:
        return inputs.variance


class ValidationBitsBudget(BitsRule):
    """The variance rule's bits, lowered while the compressed network's validation error stays within
    ``bits_budget`` percentage points of the variance rule's compressed network's.

    Search: greedy, one bit at a time. Each step lowers, by one bit, the open layer with the most kept weights
    (one of its bits saves the most bits of the network; ties: the earlier layer); the setting is evaluated and
    kept if within budget, else that layer is closed at its current bits. A layer at 0 bits is closed too; the
    search ends when all are. Every accepted setting was evaluated, so the budget holds for the result, and
    at most ``sum(bits) + layers + 1`` networks are evaluated.
    """

    name = "validation-budget"

    def __init__(self, bits_budget: float):
        if isinstance(bits_budget, bool) or not isinstance(bits_budget, (int, float)) or \
                not math.isfinite(bits_budget) or bits_budget < 0:
            raise ConfigError(f"bits budget {bits_budget!r} must be a finite number of percentage points >= 0")
        self.bits_budget = float(bits_budget)

    @property
    def settings(self) -> dict:
        return {"bits_budget": self.bits_budget}

    def precision(self, inputs: BitsInputs) -> Precision:
        if inputs.error is None:
            raise ConfigError(f"the {self.name} bits rule needs the validation error of the compressed network")
        start = inputs.variance
        limit = inputs.error(start) + self.bits_budget + TOLERANCE
        kept = [int(layer.mask.sum()) for layer in inputs.layers]
        bits = list(start.mantissa_bits)
        open_layers = {i for i, (m, n) in enumerate(zip(bits, kept)) if m > 0 and n > 0}
        while open_layers:
            i = max(open_layers, key=lambda k: (kept[k], -k))
            trial = bits[:i] + [bits[i] - 1] + bits[i + 1:]
            if inputs.error(dataclasses.replace(start, mantissa_bits=trial)) <= limit:
                bits = trial
                if bits[i] == 0:
                    open_layers.discard(i)
            else:
                open_layers.discard(i)
        return dataclasses.replace(start, mantissa_bits=bits)


def bits_rule_from_options(bits_budget: float | None = None) -> BitsRule:
    """The rule the command line's options name: ``--bits-budget P``, else the variance rule."""
    return VarianceRule() if bits_budget is None else ValidationBitsBudget(bits_budget)
