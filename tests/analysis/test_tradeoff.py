"""analysis/tradeoff.py: its points against compressions made directly, a fine-tuning run on its source's figure."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "analysis"))
import tradeoff

from pyro_bc.cli import main


def test_points_are_the_compressions_at_each_budget_and_threshold(run, tmp_path):
    tuned = tmp_path / "ft"
    assert main(["finetune", str(run), "--epochs", "1", "--out", str(tuned), "--thresholds", "-4", "-3.5", "-3.8"]) == 0
    assert tradeoff.main([str(run), str(tuned), "--budgets", "0.5", "--thresholds", "-3", "--out-dir", str(tmp_path),
                          "--recipe", "demo"]) == 0
    record = json.loads((tmp_path / "demo" / "tradeoff.json").read_text())
    assert (tmp_path / "demo" / "tradeoff.png").stat().st_size > 0
    assert [p["label"] for p in record["points"]] == ["budget 0.5", "threshold -3", "prior default"]
    for label, argv in (("budget 0.5", ["--max-error-increase", "0.5"]),
                        ("threshold -3", ["--thresholds", "-3", "-3", "-3"])):
        bcz = tmp_path / f"{label.replace(' ', '_')}.bcz"
        assert main(["compress", str(run), "--out", str(bcz)] + argv) == 0
        direct = json.loads(bcz.with_suffix(".json").read_text())
        row = next(p for p in record["points"] if p["label"] == label)
        assert row["architecture"] == direct["architecture"]
        assert row["error_compressed"] == direct["error_compressed"]
        assert row["weights_kept_percent"] == pytest.approx(100 * direct["weights_kept_fraction"])
    (finetuned,) = record["finetuned"]
    assert finetuned["run"] == str(tuned) and finetuned["threshold_method"] == "the structure fine-tuning was given"
    assert record["paper"] == [1.8, 10.8, 58] and record["official"] == [1.73, 11.9]
