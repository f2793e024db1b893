"""torchvision's classifiers at full size, as a new user would bring them: bayesianize -> fit (one short epoch on
random images) -> compress (per-layer thresholds between the two middle log alphas: about half of each layer's
groups cut) -> load -> export, and the Bayesian training step against the dense one.

    .venv/bin/python analysis/zoo.py                       # every family; writes analysis/zoo.json and a table
    .venv/bin/python analysis/zoo.py resnet18 mobilenet_v2  # some
    .venv/bin/python analysis/zoo.py --steps-only           # the step timings alone, merged into zoo.json's rows
    .venv/bin/python analysis/zoo.py --render               # zoo.md from zoo.json

Each row records the parameters of the dense network and of the loaded file, the weights kept, the file's bytes,
the relative L2 distance of the file's outputs from :func:`pyro_bc.pruned_network`'s, the exports' distance from
the loaded module (ONNX by onnxruntime, pt2 re-loaded), and the median Bayesian step over the median dense step
for each estimator of :data:`ESTIMATORS_TIMED` (interleaved rounds, batch 32, one thread), or the first thing that
failed, in one line. torchvision is needed
(the ``dev`` extra); nothing is downloaded (``weights=None``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
import traceback
from copy import deepcopy
from pathlib import Path

import bench  # the sibling script (sys.path[0] is analysis/ when this file is run)
import numpy as np
import onnxruntime
import pyro
import torch
import torchvision
from torch import nn

import pyro_bc
from pyro_bc.atomic import atomic_write_text
from pyro_bc.bcz.export import INPUT_NAME, export_module
from pyro_bc.infer.estimators import DEFAULT as DEFAULT_ESTIMATOR
from pyro_bc.train.loop import NegativeELBO, make_optimizer, svi_step

HERE = Path(__file__).parent
FAMILIES = {  # constructor name -> input size (Inception needs 75 pixels at least)
    "alexnet": 64, "convnext_tiny": 64, "densenet121": 64, "efficientnet_b0": 64, "efficientnet_v2_s": 64,
    "googlenet": 64, "inception_v3": 96, "mnasnet0_5": 64, "mobilenet_v2": 64, "mobilenet_v3_small": 64,
    "regnet_x_400mf": 64, "regnet_y_400mf": 64, "resnet18": 64, "resnet50": 64, "resnext50_32x4d": 64,
    "shufflenet_v2_x0_5": 64, "squeezenet1_1": 64, "swin_t": 64, "vgg11": 64, "vgg11_bn": 64, "vit_b_16": 64,
}
EXTRA = {"googlenet": {"aux_logits": False, "init_weights": False}, "inception_v3": {"aux_logits": False,
         "init_weights": False}, "vit_b_16": {"image_size": 64}}
N_TRAIN, BATCH = 64, 32
ESTIMATORS_TIMED = (DEFAULT_ESTIMATOR, "lrt-bf16")  # the Bayesian steps timed beside the dense one


def build(name: str) -> nn.Module:
    """The full-size constructor, untrained, for 10 classes."""
    return getattr(torchvision.models, name)(weights=None, num_classes=10, **EXTRA.get(name, {}))


def half_thresholds(net: pyro_bc.nn.network.BayesianNet) -> list[float]:
    """Per layer, the midpoint between its two middle log alphas (about half of its groups cut, no ties)."""
    out = []
    for layer in net.layers:
        values = layer.log_alpha().detach().flatten().sort().values
        middle = len(values) // 2
        out.append(float(values[middle - 1] + values[middle]) / 2 if len(values) > 1 else float(values[0]) + 1.0)
    return out


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def step_ratio(dense: nn.Module, net: pyro_bc.nn.network.BayesianNet, x: torch.Tensor, y: torch.Tensor,
               repeats: int, estimators: tuple[str, ...] = ESTIMATORS_TIMED) -> dict:
    """Median dense and Bayesian training steps (ms) on one batch, interleaved, and their ratio: ``ms_NAME`` and
    ``step_ratio_NAME`` of each of ``estimators`` (each stepping its own copy of the network)."""
    pyro.enable_validation(False)
    steps = {"dense": bench.deterministic_step(dense.train(), x, y)}
    for name in estimators:
        copy = net if name == DEFAULT_ESTIMATOR else deepcopy(net)
        loss, opt = NegativeELBO(copy, estimators=name), make_optimizer(copy, 1e-3)
        steps[name] = functools.partial(svi_step, loss, opt, copy.train(), x, y, 50_000)
    load_start = os.getloadavg()
    times = bench.interleaved_samples(steps, repeats, 1, 1)
    ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
    row = {"ms_dense": ms["dense"], "loadavg": [load_start[0], os.getloadavg()[0]]}
    for name in estimators:
        per_round = sorted(b / d for b, d in zip(times[name], times["dense"]))  # a round's step over its dense step
        row.update({f"ms_{name}": ms[name], f"step_ratio_{name}": ms[name] / ms["dense"],
                    f"step_ratio_{name}_rounds": [per_round[0], per_round[-1]]})
    return row


def run_family(name: str, folder: Path, repeats: int, steps_only: bool = False) -> dict:
    """One row of the table (see the module's docstring); ``steps_only``: the step timings alone."""
    size = FAMILIES[name]
    row: dict = {"model": name, "input": size}
    stage = "build"
    try:
        torch.manual_seed(0)
        dense = build(name)
        row["params_dense"] = sum(p.numel() for p in dense.parameters())
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(N_TRAIN, 3, size, size, generator=generator)
        y = torch.randint(0, 10, (N_TRAIN,), generator=generator)
        stage = "bayesianize"
        net = pyro_bc.bayesianize(dense, "gnj", input_shape=(3, size, size))
        stage = "step"
        row.update(step_ratio(bench.default_layout_copy(dense), net, x[:BATCH], y[:BATCH], repeats))
        if steps_only:
            return row
        stage = "fit"
        started = time.perf_counter()
        pyro_bc.fit(net, (x, y), epochs=1, batch_size=BATCH, progress=False)
        row["fit_s"] = time.perf_counter() - started
        stage = "compress"
        path = folder / f"{name}.bcz"
        summary = pyro_bc.compress(net.eval(), path, val=(x, y), train=(x, y), thresholds=half_thresholds(net))
        stage = "load"
        loaded = pyro_bc.load(path)
        pruned = pyro_bc.pruned_network(net, summary, train=(x, y))
        with torch.no_grad():
            got, want = loaded(x[:8]).numpy(), pruned(x[:8]).numpy()
        row.update(params_file=sum(p.numel() for p in loaded.parameters()),
                   weights_kept_fraction=summary["weights_kept_fraction"], file_bytes=summary["file_bytes"],
                   rel_l2_to_pruned=relative(got, want))
        stage = "export onnx"
        export_module(loaded, (3, size, size), folder / f"{name}.onnx", "onnx")
        session = onnxruntime.InferenceSession(str(folder / f"{name}.onnx"), providers=["CPUExecutionProvider"])
        row["rel_onnx"] = relative(session.run(None, {INPUT_NAME: x[:8].numpy()})[0], got)
        stage = "export pt2"
        export_module(loaded, (3, size, size), folder / f"{name}.pt2", "pt2")
        row["rel_pt2"] = relative(torch.export.load(folder / f"{name}.pt2").module()(x[:8]).detach().numpy(), got)
    except Exception as e:  # noqa: BLE001  (a row records the first failure of any kind and the run goes on)
        row["failed"] = f"{stage}: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
        where = traceback.format_exc().splitlines()[-3].strip()
        row["where"] = where.replace(f'"{HERE.parent}/', '"')[:200]  # paths relative to the repository
    return row


def table(rows: list[dict]) -> str:
    """The markdown table of RESULTS.md."""
    header = ("| model | input | parameters dense / file | weights kept | file bytes | file vs pruned_network (rel. L2) "
              f"| onnx / pt2 vs file | Bayesian step / dense step ({'; '.join(ESTIMATORS_TIMED)}) |")
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        step = "; ".join(f"{r[f'step_ratio_{e}']:.2f}x ({r[f'ms_{e}']:.0f} / {r['ms_dense']:.0f} ms)"
                         for e in ESTIMATORS_TIMED if f"step_ratio_{e}" in r) or "-"
        if "failed" in r or "params_file" not in r:  # a failure, or the steps timed alone
            failed = f"failed: {r['failed']}" if "failed" in r else "not compressed in this run"
            lines.append(f"| {r['model']} | {r['input']} | {r.get('params_dense', '-'):,} | {failed} | | | | {step} |")
            continue
        lines.append(f"| {r['model']} | {r['input']} | {r['params_dense']:,} / {r['params_file']:,} | "
                     f"{100 * r['weights_kept_fraction']:.1f}% | {r['file_bytes']:,} | {r['rel_l2_to_pruned']:.1e} | "
                     f"{r['rel_onnx']:.0e} / {r['rel_pt2']:.0e} | {step} |")
    return "\n".join(lines)


def write_markdown(ordered: list[dict]) -> None:
    """analysis/zoo.md (RESULTS.md includes it): the commands, the conditions and :func:`table`."""
    commands = sorted({row["command"] for row in ordered if row.get("command")})
    steps = sorted({row["steps_command"] for row in ordered if row.get("steps_command")})
    notes = sorted({row["steps_note"] for row in ordered if row.get("steps_note")})
    intro = (
        f"{' and '.join(f'`{c}`' for c in commands)}" + (f", the step timings by {' and '.join(f'`{c}`' for c in steps)}"
                                                          if steps else "") +
        f" (torch {torch.__version__}, torchvision {torchvision.__version__}, one thread; the step ratios are of one "
        f"interleaved run each, {'; '.join(notes) if notes else 'on a machine shared with other work'}; "
        "analysis/BENCHMARKS.md has each round's range). Each network is built with `weights=None, num_classes=10`, made Bayesian (gnj), fitted "
        "one epoch on 64 random images, compressed at per-layer thresholds between its two middle log alphas (about "
        "half of each layer's groups), loaded, and exported; docs/NETWORKS.md says what the graph supports.")
    text = "\n".join(["## torchvision's classifiers at full size (issue 28)", "", intro, "", table(ordered)])
    atomic_write_text(HERE / "zoo.md", text + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help=f"constructor names (default: all {len(FAMILIES)})")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds of the step timing")
    parser.add_argument("--out", type=Path, default=HERE / "zoo.json")
    parser.add_argument("--merge", action="store_true",
                        help="replace these models' rows in --out and keep the others (each row keeps its command)")
    parser.add_argument("--render", action="store_true", help="only write analysis/zoo.md from --out")
    parser.add_argument("--note", default="", help="what else the machine was doing (kept with the step timings)")
    parser.add_argument("--steps-only", action="store_true",
                        help="time the steps alone and merge them into the rows of --out (the rest of each row stays)")
    args = parser.parse_args()
    unknown = sorted(set(args.models) - set(FAMILIES))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}: choose from {', '.join(FAMILIES)}")
    if args.render:
        write_markdown(json.loads(args.out.read_text())["rows"])
        return 0
    torch.set_num_threads(1)
    command = shlex.join([".venv/bin/python", "analysis/zoo.py", *sys.argv[1:]])
    merge = args.merge or args.steps_only
    earlier = json.loads(args.out.read_text()) if merge and args.out.is_file() else {"rows": []}
    rows = {row["model"]: {"command": earlier.get("command", command), **row} for row in earlier["rows"]}
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models or FAMILIES:
            timed = run_family(name, Path(folder), args.repeats, args.steps_only)
            rows[name] = {**rows.get(name, {}), **timed, "steps_command": command, "steps_note": args.note} \
                if args.steps_only else {**timed, "command": command}
            print(json.dumps(rows[name]), flush=True)
            ordered = [rows[n] for n in FAMILIES if n in rows]
            record = {"torch": torch.__version__, "torchvision": torchvision.__version__, "rows": ordered}
            atomic_write_text(args.out, json.dumps(record, indent=1) + "\n")  # a row at a time: nothing lost
    write_markdown(ordered)
    print(table(ordered))
    return 0


if __name__ == "__main__":
    sys.exit(main())
