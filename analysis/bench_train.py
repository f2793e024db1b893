"""Training speed against the official tutorial's layers: per-step times, per-epoch overheads, threads.

Run from the repository root, one thread, nothing else running, with the official repository's
``BayesianLayers.py`` in a folder of your own (it is read from there, never copied here)::

    .venv/bin/python analysis/bench_train.py --official /path/to/Tutorial_BayesianCompressionForDL

Measured in one run, so that every figure is a ratio against the official step timed beside it:

* in-process steps, interleaved after a warm-up (medians): (o) the official tutorial's layers and loop
  (``LinearGroupNJ``/``Conv2dGroupNJ``, cross-entropy + KL / N, default Adam, variance clipping),
  (a) the deterministic network, (c) a pyro-bc step (``NegativeELBO`` + ``svi_step``);
* (t) ``pyro-bc train`` per step: the second epoch's step time over its steps on a 25,600-example
  subset (batch 128), and the epoch's overheads (posterior-mean evaluation, checkpoint write, metrics);
* the pyro-bc step's median and spread at 1 and 2 threads.

Writes ``analysis/bench_train.json``; ``analysis/bench.py`` renders it into ``BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import bench  # the sibling script (sys.path[0] is analysis/ when this file is run)
import pyro
import torch
import torch.nn.functional as F
from torch import nn

from pyro_bc.runs.training import train
from pyro_bc.train.checkpoint import load_checkpoint, save_checkpoint
from pyro_bc.train.run_dir import CHECKPOINT, METRICS, TrainConfig

HERE = Path(__file__).parent
SUBSET, BATCH = 25_600, 128


def official_layers(folder: Path):
    """The official ``BayesianLayers`` module, imported from ``folder``."""
    path = folder / "BayesianLayers.py"
    if not path.is_file():
        raise SystemExit(f"bench_train: {path} does not exist (give --official the official repository's folder)")
    spec = importlib.util.spec_from_file_location("official_bayesian_layers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def official_step(layers, model_name: str, x: torch.Tensor, y: torch.Tensor):
    """One step of the official tutorial's loop on its GNJ layers (LeNet-300-100 or LeNet-5)."""
    if model_name == "lenet300":
        bayes = [layers.LinearGroupNJ(784, 300, clip_var=0.04), layers.LinearGroupNJ(300, 100),
                 layers.LinearGroupNJ(100, 10)]
        net = nn.Sequential(nn.Flatten(), bayes[0], nn.ReLU(), bayes[1], nn.ReLU(), bayes[2])
    else:
        bayes = [layers.Conv2dGroupNJ(1, 20, 5), layers.Conv2dGroupNJ(20, 50, 5), layers.LinearGroupNJ(800, 500),
                 layers.LinearGroupNJ(500, 10)]
        net = nn.Sequential(bayes[0], nn.ReLU(), nn.MaxPool2d(2), bayes[1], nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                            bayes[2], nn.ReLU(), bayes[3])
    optimizer = torch.optim.Adam(net.parameters())  # the tutorial's optimiser, defaults

    def step():
        loss = F.cross_entropy(net(x), y) + sum(layer.kl_divergence() for layer in bayes) / bench.N_DATA
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for layer in bayes:
            layer.clip_variances()

    return step


def in_process_steps(layers, model_name: str, prior: str, repeats: int) -> dict[str, float]:
    steps = bench.make_steps(model_name, prior)
    steps.pop("plain")
    x, y = torch.randn(BATCH, 1, 28, 28), torch.randint(0, 10, (BATCH,))
    steps["official"] = official_step(layers, model_name, x, y)
    return bench.time_interleaved(steps, repeats)


def train_per_step(model_name: str, prior: str, threads: int = 1) -> dict[str, float]:
    """``pyro-bc train`` for two epochs on the subset; the second epoch's per-step time and overheads (ms)."""
    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(model=model_name, prior=prior, epochs=2, batch_size=BATCH, subset=SUBSET,
                             threads=threads)
        train(config, tmp, progress=False)
        last = json.loads((Path(tmp) / METRICS).read_text().splitlines()[-1])
        steps = -(-(SUBSET - config.val_size) // BATCH)
        state = load_checkpoint(Path(tmp) / CHECKPOINT)
        started = time.perf_counter()
        for _ in range(3):
            save_checkpoint(Path(tmp) / CHECKPOINT, state)
        checkpoint_ms = 1000 * (time.perf_counter() - started) / 3
    step_ms = 1000 * last["step_seconds"] / steps
    return {"ms_train_step": step_ms, "ms_train_epoch_per_step": (1000 * last["seconds"] + checkpoint_ms) / steps,
            "ms_eval": 1000 * last["eval_seconds"], "ms_checkpoint": checkpoint_ms, "steps": steps,
            "eval_fraction": 1000 * last["eval_seconds"] / (1000 * last["seconds"] + checkpoint_ms),
            "checkpoint_fraction": checkpoint_ms / (1000 * last["seconds"] + checkpoint_ms)}


def step_spread(model_name: str, threads: int, repeats: int) -> dict[str, float]:
    """Median and 10th/90th percentiles of a pyro-bc gnj step at ``threads`` threads."""
    torch.set_num_threads(threads)
    fn = bench.make_steps(model_name, "gnj", only="pyro_bc")["pyro_bc"]
    for _ in range(10):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - started))
    torch.set_num_threads(1)
    q = statistics.quantiles(times, n=10)
    return {"threads": threads, "ms_median": statistics.median(times), "ms_p10": q[0], "ms_p90": q[-1]}


CATEGORIES = (  # aten ops by what they are in a step; anything else counts as "other aten"
    ("matrix products and convolutions", ("aten::mm", "aten::addmm", "aten::bmm", "aten::convolution",
                                          "aten::_convolution", "aten::mkldnn_convolution",
                                          "aten::convolution_backward", "aten::_slow_conv2d_forward",
                                          "aten::_slow_conv2d_backward", "aten::thnn_conv2d")),
    ("Adam", ("aten::_fused_adam_",)),
    ("noise draws", ("aten::normal_",)),
    ("elementwise and reductions", ("aten::mul", "aten::add", "aten::exp", "aten::sqrt", "aten::mul_", "aten::add_",
                                    "aten::sum", "aten::dot", "aten::sub", "aten::div", "aten::neg", "aten::clamp_",
                                    "aten::addcmul_", "aten::sigmoid", "aten::softplus", "aten::log", "aten::pow",
                                    "aten::max_pool2d_with_indices", "aten::max_pool2d_with_indices_backward",
                                    "aten::relu", "aten::threshold_backward", "aten::copy_", "aten::fill_",
                                    "aten::log_softmax", "aten::_log_softmax", "aten::_log_softmax_backward_data",
                                    "aten::sqrt_", "aten::div_", "aten::clamp_min_", "aten::rsqrt",
                                    "aten::sigmoid_backward", "aten::gather", "aten::scatter_add_")),
)


def profile_step(model_name: str, steps: int = 20) -> dict[str, float]:
    """Where a pyro-bc gnj step's time goes (ms per step): aten ops by category (their self time), and the rest
    of the wall time, which is Python: Pyro's messengers and sites, distribution objects, autograd's engine."""
    from torch.profiler import ProfilerActivity, profile

    fn = bench.make_steps(model_name, "gnj", only="pyro_bc")["pyro_bc"]
    for _ in range(10):
        fn()
    started = time.perf_counter()
    for _ in range(steps):
        fn()
    wall = 1000 * (time.perf_counter() - started) / steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    totals = {name: 0.0 for name, _ in CATEGORIES}
    totals["other aten ops"] = 0.0
    for event in prof.key_averages():
        if not event.key.startswith("aten::"):
            continue
        ms = event.self_cpu_time_total / 1000 / steps
        category = next((name for name, ops in CATEGORIES if event.key in ops), "other aten ops")
        totals[category] += ms
    profiled = sum(totals.values())
    # the profiler slows every op alike: scale the categories to the unprofiled wall time of a step
    scale = wall / (prof.profiler.self_cpu_time_total / 1000 / steps) if prof.profiler.self_cpu_time_total else 1.0
    out = {name: ms * scale for name, ms in totals.items()}
    out["Python: Pyro, distributions, autograd engine"] = max(wall - profiled * scale, 0.0)
    return {"model": model_name, "ms_step": wall, **out}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", required=True, type=Path, help="folder holding the official BayesianLayers.py")
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--out", default=str(HERE / "bench_train.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    pyro.enable_validation(False)
    layers = official_layers(args.official)
    results = {"command": "analysis/bench_train.py --official PATH", "steps": [], "threads": [], "profile": []}
    for model_name in ("lenet300", "lenet5"):
        repeats = args.repeats if model_name == "lenet300" else max(args.repeats // 4, 20)
        for prior in ("gnj", "ghs", "lu"):
            row = {"model": model_name, "prior": prior,
                   **{f"ms_{k}": v for k, v in in_process_steps(layers, model_name, prior, repeats).items()},
                   **train_per_step(model_name, prior)}
            row["ratio_train_to_official"] = row["ms_train_epoch_per_step"] / row["ms_official"]
            row["ratio_train_to_deterministic"] = row["ms_train_epoch_per_step"] / row["ms_deterministic"]
            row["ratio_in_process_to_official"] = row["ms_pyro_bc"] / row["ms_official"]
            results["steps"].append(row)
            print(json.dumps(row), flush=True)
        results["profile"].append(profile_step(model_name))
        print(json.dumps(results["profile"][-1]), flush=True)
        for threads in (1, 2):
            row = {"model": model_name, **step_spread(model_name, threads, repeats)}
            results["threads"].append(row)
            print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
