"""Trade-off curves of a run: test error against weights kept and against cr_file, over a sweep of validation budgets.

    python analysis/tradeoff.py RUN_DIR [RUN_DIR ...] [--budgets 0 0.1 0.25 ...] [--thresholds -9 -8 ...]
                                [--weights-kept 5 10.8 ...] [--out-dir analysis/results] [--recipe NAME]

Each ordinary run is compressed once per budget (``--max-error-increase B``, into a temporary folder), once per
``--thresholds`` value (that threshold for every layer), once per ``--weights-kept`` value (``--max-weights-kept P``)
and once at the priors' default thresholds; a point the run cannot have (a layer left empty, a validation budget for
a run trained with ``--val-size 0``) is skipped with a line saying why. Each point is the compressed file's test
error, its weights kept and its cr_file.
A fine-tuning run (``pyro-bc finetune``) is one point, compressed with the structure it was given (at its source
run's thresholds where fine-tuning moved a kept weight's log alpha past a pruned one's, as ``reproduce.sh`` does),
drawn on its source run's figure when that run is given too (else on its own). The paper's point (Table 1) and the
official code's (LeNet-300-100 GNJ, 200 epochs, measured here: 1.73% at 11.9% kept; its cr_file was not measured) go on
the same axes. Writes ``<out-dir>/<recipe>/tradeoff.png`` and ``tradeoff.json`` (recipe: the run directory's
name, or ``--recipe`` for one run).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pyro_bc.atomic import atomic_write_text
from pyro_bc.compression.thresholds import GivenThresholds, PriorDefault, ValidationBudget, WeightsBudget
from pyro_bc.errors import ConfigError
from pyro_bc.runs.compressing import compress_run
from pyro_bc.runs.load import load_run
from pyro_bc.train.run_dir import FINETUNE_FILE

#: Table 1 of the paper: (model, prior) -> (test error %, weights kept %, maximum CR; None: not given, the Sparse VD
#: rows).
PAPER = {("lenet300", "gnj"): (1.8, 10.8, 58), ("lenet300", "ghs"): (1.8, 10.6, 59), ("lenet300", "lu"): (1.8, 2.2, None),
         ("lenet5", "gnj"): (1.0, 0.9, 573), ("lenet5", "ghs"): (1.0, 0.6, 771), ("lenet5", "lu"): (1.0, 0.7, None)}
#: The official code's run measured here (docs/METHOD.md 10): (test error %, weights kept %).
OFFICIAL = {("lenet300", "gnj"): (1.73, 11.9)}
BUDGETS = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0)
KEYS = ("architecture", "weights_kept_fraction", "cr_file", "error_posterior_mean", "error_pruned", "error_compressed",
        "val_error_compressed", "threshold_method")


def point(run_dir: Path, rule, label: str) -> dict:
    """One compression of ``run_dir`` by ``rule`` (``None``: the run's default) into a temporary folder."""
    with tempfile.TemporaryDirectory() as tmp:
        summary = compress_run(run_dir, Path(tmp) / "MODEL.bcz", rule=rule)
    row = {"label": label, **{k: summary.get(k) for k in KEYS}}
    row["weights_kept_percent"] = 100 * row.pop("weights_kept_fraction")
    return row


def sweep(run_dir: Path, budgets, thresholds, size_budgets: list[WeightsBudget], n_layers: int) -> list[dict]:
    """The run's points: one per validation budget, one per common threshold, one per budget of weights kept and one
    at the priors' default thresholds, each where the run can have it; each row's ``sweep`` says which."""
    rules = ([("budget", ValidationBudget(b), f"budget {b:g}") for b in budgets]
             + [("threshold", GivenThresholds([t] * n_layers), f"threshold {t:g}") for t in thresholds]
             + [("weights-kept", rule, f"at most {rule.max_weights_kept:g}% kept") for rule in size_budgets]
             + [("default", PriorDefault(), "prior default")])
    rows = []
    for kind, rule, label in rules:
        try:
            rows.append({"sweep": kind, **point(run_dir, rule, label)})
        except ConfigError as e:
            print(f"{label} skipped: {e}", file=sys.stderr)
    return rows


def finetuned_point(run: Path) -> dict:
    """A fine-tuning run compressed with the structure it was given; where fine-tuning moved a kept weight's log
    alpha past a pruned one's (per-weight priors), at its source run's compression thresholds instead, as
    ``analysis/reproduce.sh`` compresses it."""
    try:
        return point(run, None, f"fine-tuned ({run.name})")
    except ConfigError as e:
        source = Path(json.loads((run / "config.json").read_text())["finetune"]["source_run"])
        layers = json.loads((source / "MODEL.json").read_text())["layers"]
        print(f"{run}: {e}; compressed at {source}'s thresholds instead", file=sys.stderr)
        return point(run, GivenThresholds([layer["threshold"] for layer in layers]),
                     f"fine-tuned ({run.name}), at the source's thresholds")


def plot(curve: list[dict], finetuned: list[dict], key: tuple[str, str], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, x, name in ((axes[0], "weights_kept_percent", "weights kept (%)"), (axes[1], "cr_file", "cr_file")):
        for kind, style, label in (("budget", "o-", "validation budgets"), ("threshold", "^--", "one threshold"),
                                   ("weights-kept", "v:", "budgets of weights kept"), ("default", "x", "priors' default")):
            ordered = sorted((r for r in curve if r.get("sweep") == kind), key=lambda r: r[x])
            if ordered:
                ax.plot([r[x] for r in ordered], [r["error_compressed"] for r in ordered], style, label=label)
        if finetuned:
            ax.plot([r[x] for r in finetuned], [r["error_compressed"] for r in finetuned], "s", color="C2",
                    label="after fine-tuning")
        if key in PAPER and (x == "weights_kept_percent" or PAPER[key][2] is not None):
            error, kept, cr = PAPER[key]
            ax.plot(kept if x == "weights_kept_percent" else cr, error, "*", ms=14, color="C3", label="paper")
        if key in OFFICIAL and x == "weights_kept_percent":
            error, kept = OFFICIAL[key]
            ax.plot(kept, error, "D", color="k", label="official code (200 epochs)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel("test error, compressed (%)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (ordinary or fine-tuning runs)")
    parser.add_argument("--budgets", type=float, nargs="*", default=list(BUDGETS),
                        help="validation error budgets in points (--max-error-increase; none: --budgets alone)")
    parser.add_argument("--thresholds", type=float, nargs="*", default=[],
                        help="common log alpha thresholds to sweep (each for every layer)")
    parser.add_argument("--weights-kept", type=float, nargs="*", default=[], metavar="P",
                        help="budgets of weights kept, in percent, to sweep (--max-weights-kept)")
    parser.add_argument("--out-dir", type=Path, default=REPO / "analysis" / "results")
    parser.add_argument("--recipe", default=None, help="the folder name under --out-dir (one ordinary run only)")
    args = parser.parse_args(argv)
    try:  # the rule's own check of a budget
        size_budgets = [WeightsBudget(p) for p in args.weights_kept]
    except ConfigError as e:
        parser.error(f"--weights-kept: {e}")
    sources = [r for r in args.runs if not (r / FINETUNE_FILE).is_file()]
    tuned = [r for r in args.runs if (r / FINETUNE_FILE).is_file()]
    if args.recipe and len(sources) != 1:
        parser.error("--recipe names the folder of one ordinary run")
    by_source: dict[Path, list[Path]] = {r.resolve(): [] for r in sources}
    alone = []
    for run in tuned:
        source = Path(json.loads((run / "config.json").read_text())["finetune"]["source_run"]).resolve()
        by_source.get(source, alone).append(run)
    for run in sources + alone:
        net, config, _ = load_run(run)
        key = (config.model, config.prior)
        curve = sweep(run, args.budgets, args.thresholds, size_budgets, len(net.layers)) if run in sources else [
            {"sweep": "finetuned", **finetuned_point(run)}]
        followers = by_source.get(run.resolve(), [])
        finetuned = [finetuned_point(t) for t in followers]
        recipe = args.recipe or run.name
        out = args.out_dir / recipe
        title = f"{recipe}: {config.model} / {config.prior}, run {run}"
        plot(curve, finetuned, key, title, out / "tradeoff.png")
        record = {"run": str(run), "model": config.model, "prior": config.prior, "points": curve,
                  "finetuned": [{"run": str(t), **p} for t, p in zip(followers, finetuned)],
                  "paper": PAPER.get(key), "official": OFFICIAL.get(key),
                  "command": "python analysis/tradeoff.py " + " ".join(sys.argv[1:] if argv is None else argv)}
        atomic_write_text(out / "tradeoff.json", json.dumps(record, indent=1))
        print(f"wrote {out / 'tradeoff.png'} and {out / 'tradeoff.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
