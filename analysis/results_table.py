"""Write analysis/RESULTS.md from the finished runs under analysis/results/, each beside the paper's row.

    .venv/bin/python analysis/results_table.py

A configuration without ``MODEL.json`` is listed as not run yet. Paper figures: METHOD.md section 9.2
(LeNet-300-100 CRs derived there from the architecture and bit strings).
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent
CONFIGS = ["lenet300-gnj", "lenet300-ghs", "lenet300-lu", "lenet5-gnj", "lenet5-ghs", "lenet5-lu"]
# error %, architecture, |W!=0|/|W| %, bits per layer, CR prune, CR fast
PAPER = {
    "lenet300-gnj": ("1.8", "278-98-13", "10.8", "8-9-14", "≈9.3", "≈37"),
    "lenet300-ghs": ("1.8", "311-86-14", "10.6", "13-11-10", "≈9.5", "≈23"),
    "lenet300-lu": ("1.8", "512-114-72", "2.2", "8-11-14", "?", "?"),
    "lenet5-gnj": ("1.0", "8-13-88-13", "0.9", "18-10-7-9", "108", "361"),
    "lenet5-ghs": ("1.0", "5-10-76-16", "0.6", "10-10-14-13", "156", "419"),
    "lenet5-lu": ("1.0", "14-19-242-131", "0.7", "13-8-8-14", "63", "228"),
}
HEADER = ("| configuration | source | test error % | architecture | \\|W≠0\\|/\\|W\\| % | bits per layer | cr_prune | "
          "cr_fast | cr_file | epochs | training time (1 core) |")


def row(name: str) -> list[str]:
    paper = PAPER[name]
    lines = [f"| {name} | paper | {' | '.join(paper)} | – | – | – |"]
    run = HERE / "results" / name
    summary_path = run / "MODEL.json"
    if not summary_path.is_file():
        return lines + [f"| {name} | pyro-bc | not run yet | | | | | | | | |"]
    s = json.loads(summary_path.read_text())
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    bits = "-".join(str(layer["bits"]) for layer in s["layers"])
    hours = sum(m["seconds"] for m in metrics) / 3600
    lines.append(f"| {name} | pyro-bc | {s['error_compressed']:.2f} | {s['architecture']} | "
                 f"{100 * s['weights_kept_fraction']:.2f} | {bits} | {s['cr_prune']:.1f} | {s['cr_fast']:.1f} | "
                 f"{s['cr_file']:.1f} | {len(metrics)} | {hours:.2f} h |")
    return lines


def main() -> None:
    out = ["# Results on MNIST, beside the paper", "",
           "Each pyro-bc row comes from `bash analysis/reproduce.sh NAME` (hyperparameters in that script);",
           "its files are in `analysis/results/NAME/`. Test error is that of the compressed (pruned, rounded)",
           "network loaded from `MODEL.bcz`; `pyro-bc evaluate analysis/results/NAME/MODEL.bcz` reproduces it.",
           "Training time is the sum of the epochs' wall times in `metrics.jsonl`.", "",
           HEADER, "|" + "---|" * 12]
    for name in CONFIGS:
        out += row(name)
    (HERE / "RESULTS.md").write_text("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
