"""Steps per second of data-parallel training: one process against two under torchrun (gloo, CPU).

Run from the repository root with nothing else running::

    .venv/bin/python analysis/bench_distributed.py    # prints a Markdown table; analysis/bench.py includes it

Each configuration trains LeNet-300-100 (gnj) for two epochs of 25,600 examples; the second epoch's
wall time (from ``metrics.jsonl``, which includes rank 0's end-of-epoch evaluation) gives the rate.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SUBSET = 25_600
CONFIGS = [  # (processes, batch per process)
    (1, 128),
    (2, 64),
    (2, 128),
]


def measure(processes: int, batch: int, out: Path) -> float:
    train = ["-m", "pyro_bc.cli", "train", "--model", "lenet300", "--prior", "gnj", "--epochs", "2",
             "--subset", str(SUBSET), "--val-size", "1000", "--batch-size", str(batch), "--out", str(out)]
    if processes > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
               *train]
    else:
        cmd = [sys.executable, *train]
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return math.ceil(SUBSET / (processes * batch)) / last["seconds"]


def table() -> list[str]:
    """The Markdown table of steps per second, one row per configuration."""
    lines = ["| processes | batch per process | global batch | steps/s | examples/s |", "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for processes, batch in CONFIGS:
            rate = measure(processes, batch, Path(tmp) / f"{processes}x{batch}")
            lines.append(f"| {processes} | {batch} | {processes * batch} | {rate:.1f} | {rate * processes * batch:.0f} |")
    return lines


def main() -> None:
    print("\n".join(table()))


if __name__ == "__main__":
    main()
