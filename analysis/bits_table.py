"""Each run's bits by the variance rule and by a validation error budget, side by side, as a Markdown table.

    .venv/bin/python analysis/bits_table.py RUN_DIR... [--budget 0.1]

Every run directory must hold ``checkpoint.pt``. It is compressed twice into a temporary folder, at its own
recorded threshold rule (``threshold_rule`` of its ``MODEL.json``, else the priors' defaults): with the variance
rule (docs/METHOD.md 7.2) and with ``--bits-budget``. Each row carries the ``pyro-bc`` command that writes it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from pyro_bc.compression.thresholds import GapRule, ThresholdRule, rule_from_record
from pyro_bc.errors import BCError
from pyro_bc.runs.compressing import compress_run
from pyro_bc.train.run_dir import CHECKPOINT

BUDGET = 0.1  # percentage points of validation error
HEADER = ["| run | rule | bits per layer (mantissa) | cr_fast | cr_file | test error % | val error % | command |",
          "|---|---|---|---|---|---|---|---|"]


def recorded_rule(run: Path) -> ThresholdRule | None:
    """The threshold rule of the run's ``MODEL.json``, or None (the priors' defaults) where it records none."""
    path = run / "MODEL.json"
    record = json.loads(path.read_text()).get("threshold_rule") if path.is_file() else None
    return None if record is None else rule_from_record(record)


def threshold_flags(summary: dict) -> list[str]:
    """The ``pyro-bc compress`` flags of the summary's threshold rule (``--thresholds`` with the chosen values
    where the rule has no flag of its own)."""
    name, settings = summary["threshold_rule"]["name"], summary["threshold_rule"]["settings"]
    if name == "prior-default":
        return []
    if name == "gap" and settings == GapRule().settings:
        return ["--auto", "gap"]
    if name == "max-error-increase":
        return ["--max-error-increase", str(settings["max_error_increase"])]
    return ["--thresholds", *(str(layer["threshold"]) for layer in summary["layers"])]


def row(run: Path, summary: dict) -> str:
    """One table row of a compressed run's summary (``MODEL.json``)."""
    rule = summary["bits_rule"]
    flags = threshold_flags(summary)
    if rule["name"] == "validation-budget":
        flags += ["--bits-budget", str(rule["settings"]["bits_budget"])]
        name = f"validation-budget {rule['settings']['bits_budget']:g}"
    else:
        name = rule["name"]
    bits = "-".join(str(layer["bits"]) for layer in summary["layers"])
    mantissa = "-".join(str(layer["mantissa_bits"]) for layer in summary["layers"])
    command = " ".join(["pyro-bc compress", str(run), "--out MODEL.bcz", *flags])
    path = run.as_posix()
    label = path.split("results/", 1)[1] if "results/" in path else run.name  # e.g. lenet300-gnj/seeds/1
    return (f"| {label} | {name} | {bits} ({mantissa}) | {summary['cr_fast']:.1f} | {summary['cr_file']:.1f} | "
            f"{summary['error_compressed']:.2f} | {summary['val_error_compressed']:.2f} | `{command}` |")


def table(runs: list[Path], budget: float = BUDGET) -> list[str]:
    """The table's lines: per run, the variance rule's row, then the budget's."""
    lines = list(HEADER)
    with tempfile.TemporaryDirectory() as tmp:
        for k, run in enumerate(runs):
            rule = recorded_rule(run)
            for bits_budget in (None, budget):
                out = Path(tmp) / f"{k}-{bits_budget}.bcz"
                lines.append(row(run, compress_run(run, out, rule=rule, bits_budget=bits_budget)))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories holding checkpoint.pt")
    parser.add_argument("--budget", type=float, default=BUDGET, help="the --bits-budget, in points (default 0.1)")
    args = parser.parse_args(argv)
    missing = [str(run) for run in args.runs if not (run / CHECKPOINT).is_file()]
    if missing:
        parser.error(f"no {CHECKPOINT} in {', '.join(missing)}")
    try:
        print("\n".join(table(args.runs, args.budget)))
    except BCError as e:
        print(f"bits_table: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
