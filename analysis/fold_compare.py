"""The fold of pruned inputs before and after its fix (issue 28), on one run: the same thresholds (each prior's
default) compressed with the fixed per-position means, with the means as they were before the fix (a convolution's
input summed over positions), and with no fold.

    .venv/bin/python analysis/fold_compare.py RUN_DIR   # writes RUN_DIR/{fixed_fold,fold_before_the_fix,no_fold}.bcz
"""

from __future__ import annotations

import json
import sys

import torch

from pyro_bc.compression import pipeline as compression
from pyro_bc.compression import pruned

KEYS = ("architecture", "weights_kept_fraction", "error_posterior_mean", "error_pruned", "error_compressed",
        "val_error_compressed")


def means_before_the_fix(net, x, batch_size=1000):
    """The per-position means times each convolution's input positions: what the fold used before the fix."""
    means, mean_net, positions = pruned.layer_input_means(net, x, batch_size), net.posterior_mean_network(), {}

    def record(i: int, h: torch.Tensor) -> None:
        positions.setdefault(i, h[0, 0].numel() if h.dim() == 4 else 1)

    hooks = [mean_net.get_submodule(layer.site).register_forward_pre_hook(lambda _m, a, i=i: record(i, a[0]))
             for i, layer in enumerate(net.layers)]
    with torch.no_grad():
        mean_net(x[:1])
    for hook in hooks:
        hook.remove()
    return [m * positions[i] for i, m in enumerate(means)]


def main(run: str) -> None:
    torch.set_num_threads(1)
    fixed = pruned.layer_input_means
    for name, means, fold in (("fixed_fold", fixed, None), ("fold_before_the_fix", means_before_the_fix, None),
                              ("no_fold", fixed, False)):
        compression.layer_input_means = means
        summary = compression.compress_run(run, f"{run}/{name}.bcz", fold=fold)
        print(name, json.dumps({key: summary[key] for key in KEYS}), flush=True)
    compression.layer_input_means = fixed


if __name__ == "__main__":
    main(sys.argv[1])
