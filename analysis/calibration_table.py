"""Is the compressed network still Bayesian? Error, NLL, ECE, NLL under rotation and noise-OOD AUROC of five
networks on the test set: the full posterior (the run's guide), its posterior mean, the compressed Bayesian network
(a ``.bcz`` written with ``--keep-variance``), the compressed deterministic network, and a dense network of the same
architecture (``analysis/pretrain.py``'s state_dict).

    .venv/bin/python analysis/calibration_table.py RUN_DIR MODEL.bcz DENSE.pt [--samples 30] [--out FILE.json]

Prints a Markdown table (and writes its numbers as JSON with ``--out``). Sampled networks use ``--samples`` draws of
the local reparameterisation (seed 0); ``rotation NLL`` is the mean NLL over 0-180 degrees (``pyro-bc evaluate
--shift rotate``'s ``nll_area``), ``noise AUROC`` the predictive entropy's AUROC against uniform-noise images.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from models import build_network
from pyro_bc.atomic import atomic_write_text
from pyro_bc.bcz import codec
from pyro_bc.data.datasets import load_data
from pyro_bc.metrics.predict import scored
from pyro_bc.metrics.shift import noise_images, ood_auroc, rotation_curve
from pyro_bc.runs.load import load_run


def measure(name: str, source, samples: int, x: torch.Tensor, y: torch.Tensor, file_bytes: int | None) -> dict:
    started = time.perf_counter()
    row = {"network": name, "samples": samples, **scored(source, x, y, samples),
           "rotation_nll": rotation_curve(source, x, y, samples)["nll_area"],
           "noise_auroc": ood_auroc(source, x, noise_images(x), samples), "file_bytes": file_bytes}
    row["seconds"] = time.perf_counter() - started
    print(f"{name}: {row}", file=sys.stderr)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("model", help="a .bcz file written with --keep-variance")
    parser.add_argument("dense", help="a dense state_dict of the same architecture (analysis/pretrain.py)")
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    net, config, _ = load_run(args.run_dir)
    test = load_data(config.data, val_size=config.val_size, seed=config.seed).test
    summary = json.loads(Path(args.model).with_suffix(".json").read_text())
    dense = build_network(config.model, config.prior, input_shape=net.input_shape).posterior_mean_network()
    dense.load_state_dict(torch.load(args.dense, map_location="cpu"))
    k = args.samples
    rows = [measure("full posterior", net, k, test.x, test.y, None),
            measure("posterior mean", net, 0, test.x, test.y, None),
            measure("compressed Bayesian", codec.load(args.model, bayesian=True), k, test.x, test.y,
                    summary["file_bytes"]),
            measure("compressed deterministic", codec.load(args.model), 0, test.x, test.y,
                    summary.get("file_bytes_without_variance", summary["file_bytes"])),
            measure("dense", dense.eval(), 0, test.x, test.y, summary["original_bytes"])]
    print("| network | draws | error % | NLL | ECE | Brier | rotation NLL | noise AUROC | file bytes |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['network']} | {r['samples'] or '-'} | {r['error']:.2f} | {r['nll']:.4f} | {r['ece']:.4f} | "
              f"{r['brier']:.4f} | {r['rotation_nll']:.3f} | {r['noise_auroc']:.3f} | {r['file_bytes'] or '-'} |")
    if args.out:
        atomic_write_text(args.out, json.dumps({"run_dir": args.run_dir, "model": args.model, "dense": args.dense,
                                                "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
