"""analysis/layer_allocation.py: its common cut against compress's, its rows against compressions at their thresholds."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "analysis"))
import layer_allocation

from pyro_bc.cli import main


def test_rows_are_the_prunings_at_their_thresholds_within_the_budget_ranked_by_training_error(run, tmp_path):
    out = tmp_path / "allocation.json"
    assert layer_allocation.main([str(run), "--max-weights-kept", "30", "--offsets", "-0.03", "0", "0.03",
                                  "--examples", "500", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    sized = tmp_path / "sized.bcz"
    assert main(["compress", str(run), "--out", str(sized), "--max-weights-kept", "30"]) == 0
    direct = json.loads(sized.with_suffix(".json").read_text())
    one = record["one_threshold"]
    assert one["thresholds"] == [layer["threshold"] for layer in direct["layers"]]
    assert one["architecture"] == direct["architecture"]
    assert one["weights_kept_percent"] == pytest.approx(100 * direct["weights_kept_fraction"])
    ranked = record["ranked"]
    assert len(ranked) > 1 and one in ranked
    assert [r["train_error"] for r in ranked] == sorted(r["train_error"] for r in ranked)
    assert all(r["weights_kept_percent"] <= 30 for r in ranked)
    # (log alpha after one epoch lies within 0.2 of -9, hence the small offsets.) Each row's network is the pruned,
    # unrounded one whose test error compress reports as error_pruned.
    for row in (ranked[0], ranked[-1]):
        bcz = tmp_path / "at.bcz"
        assert main(["compress", str(run), "--out", str(bcz), "--thresholds", *map(str, row["thresholds"])]) == 0
        at = json.loads(bcz.with_suffix(".json").read_text())
        assert row["architecture"] == at["architecture"]
        assert row["test_error"] == pytest.approx(at["error_pruned"], abs=0.011)
