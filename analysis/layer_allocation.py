"""Does a per-layer cut beat one threshold for every layer at the same size? A sweep of per-layer thresholds.

    python analysis/layer_allocation.py RUN_DIR --max-weights-kept P [--offsets -1.5 -0.75 0 0.75 1.5]
                                        [--examples 20000] [--slack 0] [--top 10] [--out FILE]

Starts from ``--max-weights-kept P``'s cut (one log alpha threshold for every layer, ``WeightsBudget``), moves each
layer's threshold by every combination of ``--offsets``, and keeps the combinations that keep at most P + slack
percent of the weights, each distinct pruning once. Each is the pruned posterior-mean network, folded as ``compress``
folds it (unrounded), ranked by its error on the first ``--examples`` examples of the run's own training split: the
choice never looks at the test set, whose error is only reported beside it. Prints the common cut and the best
``--top`` combinations, and writes them all to ``--out`` (JSON; default ``RUN_DIR/layer_allocation.json``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch

from pyro_bc.atomic import atomic_write_text
from pyro_bc.compression.compressed import compressed_module
from pyro_bc.compression.graph import BodyGraph, analyse_network, prune_network
from pyro_bc.compression.pipeline import folds_by_default
from pyro_bc.compression.posterior import analyse, weights_kept_fraction
from pyro_bc.compression.pruned import FOLD_EXAMPLES, layer_input_means
from pyro_bc.compression.thresholds import ThresholdInputs, WeightsBudget
from pyro_bc.data.datasets import load_data
from pyro_bc.metrics.evaluate import error_percent
from pyro_bc.runs.load import load_run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a trained run directory")
    parser.add_argument("--max-weights-kept", type=float, required=True, metavar="P", help="percent of weights kept")
    parser.add_argument("--offsets", type=float, nargs="+", default=[-1.5, -0.75, 0.0, 0.75, 1.5],
                        help="moves of each layer's threshold from the common cut, in log alpha")
    parser.add_argument("--examples", type=int, default=20000, help="training examples that rank the cuts")
    parser.add_argument("--slack", type=float, default=0.0, help="points of percent over P still accepted")
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    net, config, _ = load_run(args.run)
    data = load_data(config.data, val_size=config.val_size, seed=config.seed)
    graph = BodyGraph(net)
    posts = analyse_network(net, analyse(net), graph)
    means = layer_input_means(net, data.train.x[:FOLD_EXAMPLES]) if folds_by_default(net) else None
    common = WeightsBudget(args.max_weights_kept).thresholds(ThresholdInputs(net, posts, graph=graph))[0]
    train = (data.train.x[:args.examples], data.train.y[:args.examples])

    seen = set()  # the networks already measured: many combinations prune the same weights

    def row(offsets: tuple[float, ...]) -> dict | None:
        thresholds = [common + d for d in offsets]
        layers = prune_network(net, posts, thresholds, means, graph)
        kept = 100 * weights_kept_fraction(layers)
        key = tuple(la.mask.flatten().bool().numpy().tobytes() for la in layers)
        if any(la.empty for la in layers) or kept > args.max_weights_kept + args.slack or key in seen:
            return None
        seen.add(key)
        module = compressed_module(net, layers, None, graph)
        return {"offsets": list(offsets), "thresholds": thresholds, "weights_kept_percent": kept,
                "architecture": "-".join(str(la.groups_kept) for la in layers),
                "train_error": error_percent(module, *train), "test_error": error_percent(module, data.test.x, data.test.y)}

    uniform = row((0.0,) * len(posts))
    rows = [uniform] + [r for r in map(row, itertools.product(args.offsets, repeat=len(posts))) if r is not None]
    rows.sort(key=lambda r: (r["train_error"], r["weights_kept_percent"]))
    for label, r in [("one threshold", uniform)] + [(f"#{i + 1}", r) for i, r in enumerate(rows[:args.top])]:
        print(f"{label:>13}: {r['architecture']:>14} {r['weights_kept_percent']:.3f}% kept, train error "
              f"{r['train_error']:.2f}%, test error {r['test_error']:.2f}%, offsets {r['offsets']}")
    out = args.out or args.run / "layer_allocation.json"
    record = {"run": str(args.run), "max_weights_kept": args.max_weights_kept, "examples": args.examples,
              "slack": args.slack, "common_threshold": common, "one_threshold": uniform, "ranked": rows,
              "command": "python analysis/layer_allocation.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    atomic_write_text(out, json.dumps(record, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
