"""RESULTS.md's verdicts over seeds, on hand-built figures with known answers."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[2] / "analysis"))
import results_table


def test_seed_verdict_gives_misses_in_points_and_standard_deviations():
    # mean error 1.2 against the paper's 1.0, sample sd 0.1: 2 sd above; mean kept 0.9 = the paper's 0.9: met
    assert results_table.seed_verdict("lenet5-gnj", [1.1, 1.2, 1.3], [0.8, 0.9, 1.0]) == "missed: error +0.20 pt (2.0 sd)"
    # kept 1.0 ± 0.2 against 0.6 for ghs: 2 sd
    assert results_table.seed_verdict("lenet5-ghs", [0.9, 1.0, 0.8], [0.8, 1.0, 1.2]) == "missed: kept +0.40 pt (2.0 sd)"
    assert results_table.seed_verdict("lenet5-lu", [0.9, 1.0, 1.1], [5.0, 5.0, 5.0]) == "met"  # lu: error only
    assert results_table.seed_verdict("lenet5-gnj", [1.5], [0.5]) == "missed: error +0.50 pt"  # one seed: no sd
