"""SVI step of the built-in CIFAR networks (VGG, ResNet-20) against the deterministic step of the same network.

Run from the repository root (one thread, nothing else running)::

    .venv/bin/python analysis/bench_cnn.py                          # widths 0.25 0.5 1.0
    .venv/bin/python analysis/bench_cnn.py --widths 0.25 0.5 --repeats 20

For each model (``vgg``, ``resnet20``) and width, on one fixed CIFAR-shaped batch (64 x 3 x 32 x 32), two
steps are timed interleaved after a warm-up (medians, as ``analysis/bench.py`` does): (a) the deterministic
step of the same network (its posterior-mean copy in train mode, BatchNorm included, in PyTorch's default
layout, cross-entropy, fused Adam) and (c) a pyro-bc step (``NegativeELBO`` + ``svi_step``, ``make_optimizer``,
``n_data`` = 50,000). Prior gnj at every width; the other priors (``--other-priors``) at the smallest width.
A width whose single pyro-bc step takes longer than ``--step-limit-s`` is recorded as skipped, and so are the
model's larger widths: the target concerns "the widths that fit in time".

Writes ``analysis/bench_cnn.json``; ``analysis/bench.py`` renders it into ``BENCHMARKS.md``
(``.venv/bin/python analysis/bench.py --render`` measures nothing else).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import bench  # the sibling script (sys.path[0] is analysis/ when this file is run)
import pyro
import torch

from models import build_network
from pyro_bc.train.loop import NegativeELBO, make_optimizer, svi_step

HERE = Path(__file__).parent
MODELS = ("vgg", "resnet20")
INPUT_SHAPE, BATCH, N_DATA = (3, 32, 32), 64, 50_000  # CIFAR-10's examples and training-set size


def weight_count(net) -> int:
    """The number of weights of the network's Bayesian layers (biases and BatchNorm not counted)."""
    return sum(layer.weight_mu.numel() for layer in net.layers)


def make_cnn_steps(model_name: str, prior: str, width: float) -> tuple[dict, int]:
    """The steps (a) and (c) of one network on one fixed batch, and the number of its layers' weights."""
    pyro.set_rng_seed(0)
    pyro.enable_validation(False)
    x, y = torch.randn(BATCH, *INPUT_SHAPE), torch.randint(0, 10, (BATCH,))
    net = build_network(model_name, prior, input_shape=INPUT_SHAPE, width=width)
    # a copy (nothing done to it touches ``net``), in PyTorch's default layout as a user's dense network would be
    dense = bench.default_layout_copy(net.posterior_mean_network()).train()
    loss, opt = NegativeELBO(net), make_optimizer(net, 1e-3)
    steps = {"deterministic": bench.deterministic_step(dense, x, y),
             "pyro_bc": lambda: svi_step(loss, opt, net, x, y, N_DATA)}
    return steps, weight_count(net)


def measure(model_name: str, prior: str, width: float, repeats: int, warmup: int, step_limit_s: float) -> dict:
    """One row: the medians of (a) and (c), or ``skipped`` where a single (c) step is above ``step_limit_s``."""
    steps, weights = make_cnn_steps(model_name, prior, width)
    row = {"model": model_name, "prior": prior, "width": width, "weights": weights}
    steps["pyro_bc"]()  # the first step pays for allocation and oneDNN's kernel choice
    started = time.perf_counter()
    steps["pyro_bc"]()
    single = time.perf_counter() - started
    if single > step_limit_s:
        return {**row, "skipped": f"one (c) step {single:.2f} s > {step_limit_s:g} s"}
    ms = bench.time_interleaved(steps, repeats, warmup)
    ratio = ms["pyro_bc"] / ms["deterministic"]
    return {**row, **{f"ms_{k}": v for k, v in ms.items()}, "ratio_pyro_bc_to_deterministic": ratio,
            "target_met": ratio <= bench.CNN_TARGET}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--other-priors", nargs="*", default=["ghs", "lu"],
                        help="priors timed besides gnj, at the smallest width only")
    parser.add_argument("--step-limit-s", type=float, default=1.0,
                        help="skip a width (and the model's larger ones) whose single pyro-bc step is slower")
    parser.add_argument("--note", default="", help="what else the machine was doing, written under the machine line")
    parser.add_argument("--out", default=str(HERE / "bench_cnn.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    machine = (f"{platform.processor() or platform.machine()}, {platform.system()}, torch {torch.__version__}, "
               f"pyro {pyro.__version__}, 1 thread")
    results = {"command": shlex.join(["analysis/bench_cnn.py", *sys.argv[1:]]), "machine": machine,
               "note": args.note, "batch": BATCH, "input_shape": list(INPUT_SHAPE), "n_data": N_DATA,
               "repeats": args.repeats, "warmup": args.warmup, "target": bench.CNN_TARGET, "rows": []}
    widths = sorted(args.widths)
    for model_name in MODELS:
        too_slow = False
        for width in widths:
            for prior in ["gnj", *(args.other_priors if width == widths[0] else [])]:
                if too_slow:
                    net = build_network(model_name, prior, input_shape=INPUT_SHAPE, width=width)
                    row = {"model": model_name, "prior": prior, "width": width, "weights": weight_count(net),
                           "skipped": f"a gnj step at this or a narrower width was over {args.step_limit_s:g} s"}
                else:
                    row = measure(model_name, prior, width, args.repeats, args.warmup, args.step_limit_s)
                    too_slow = prior == "gnj" and "skipped" in row
                results["rows"].append(row)
                print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print("\n".join(bench.cnn_section(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
