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
    assert tradeoff.main([str(run), str(tuned), "--budgets", "0.5", "--thresholds", "-3", "--weights-kept", "20",
                          "--out-dir", str(tmp_path), "--recipe", "demo"]) == 0
    record = json.loads((tmp_path / "demo" / "tradeoff.json").read_text())
    assert (tmp_path / "demo" / "tradeoff.png").stat().st_size > 0
    assert [p["label"] for p in record["points"]] == ["budget 0.5", "threshold -3", "at most 20% kept", "prior default"]
    for label, argv in (("budget 0.5", ["--max-error-increase", "0.5"]),
                        ("threshold -3", ["--thresholds", "-3", "-3", "-3"]),
                        ("at most 20% kept", ["--max-weights-kept", "20"])):
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


def test_a_run_without_validation_examples_has_no_budget_points(tmp_path, capsys):
    run = tmp_path / "all"
    assert main(["train", "--epochs", "1", "--subset", "200", "--batch-size", "100", "--val-size", "0",
                 "--out", str(run)]) == 0
    assert tradeoff.main([str(run), "--budgets", "0.5", "--weights-kept", "30", "--out-dir", str(tmp_path)]) == 0
    assert "budget 0.5 skipped: the max-error-increase rule needs validation examples" in capsys.readouterr().err
    record = json.loads((tmp_path / "all" / "tradeoff.json").read_text())
    assert [p["label"] for p in record["points"]] == ["at most 30% kept", "prior default"]
    assert record["points"][0]["weights_kept_percent"] <= 30


def test_a_budget_of_weights_kept_outside_0_100_is_an_argument_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        tradeoff.main([str(tmp_path), "--weights-kept", "10", "0", "--out-dir", str(tmp_path)])
    assert exc.value.code == 2
    assert "--weights-kept: max_weights_kept is a percentage in (0, 100], not 0.0" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_a_finetuned_run_whose_structure_moved_is_compressed_at_its_sources_thresholds(tmp_path, monkeypatch):
    """Where the masks no longer part kept from pruned log alphas (ConfigError), the point is the compression at the
    thresholds in the source run's MODEL.json, as reproduce.sh compresses a fine-tuned recipe."""
    source, tuned = tmp_path / "source", tmp_path / "ft"
    source.mkdir()
    tuned.mkdir()
    (source / "MODEL.json").write_text(json.dumps({"layers": [{"threshold": -3.1}, {"threshold": 2.5}]}))
    (tuned / "config.json").write_text(json.dumps({"finetune": {"source_run": str(source)}}))
    calls = []

    def fake_point(run, rule, label):
        calls.append((run, rule, label))
        if rule is None:
            raise tradeoff.ConfigError("fc1: fine-tuning moved a kept group's log alpha")
        return {"label": label}

    monkeypatch.setattr(tradeoff, "point", fake_point)
    assert tradeoff.finetuned_point(tuned) == {"label": "fine-tuned (ft), at the source's thresholds"}
    (_, first, _), (run, rule, _) = calls
    assert first is None and run == tuned and isinstance(rule, tradeoff.GivenThresholds)
    assert rule.settings["thresholds"] == [-3.1, 2.5]
