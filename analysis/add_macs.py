"""Add the MAC counts to the ``MODEL.json`` beside each given ``.bcz`` file, changing no other key.

    .venv/bin/python analysis/add_macs.py analysis/results/*/MODEL.bcz

Each layer entry gets ``macs_original`` and ``macs_compressed`` and the top level their totals, counted by
:mod:`pyro_bc.compression.macs` from the file's pruned shapes and from the dense network its metadata names, as
``pyro-bc compress`` records them. Prints one line per file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pyro_bc.atomic import atomic_write_text
from pyro_bc.bcz import codec
from pyro_bc.compression.macs import add_macs
from pyro_bc.compression.pipeline import summary_json
from pyro_bc.runs.load import original_network


def add_macs_to_file(path: Path) -> dict:
    """Add the MACs to ``path``'s ``MODEL.json`` (rewritten in place); returns the updated summary."""
    model = codec.read_bcz(path)
    original = original_network(model.metadata)
    if original is None:
        raise SystemExit(f"{path}: its metadata names no buildable model")
    summary_path = path.with_suffix(".json")
    summary = add_macs(json.loads(summary_path.read_text()), original, codec.load(path), model.input_shape)
    atomic_write_text(summary_path, summary_json(summary))
    return summary


def main(paths: list[str]) -> int:
    for name in paths:
        summary = add_macs_to_file(Path(name))
        layers = ", ".join(f"{r['name']} {r['macs_compressed']:,}/{r['macs_original']:,}" for r in summary["layers"])
        print(f"{name}: {summary['macs_compressed']:,} of {summary['macs_original']:,} MACs "
              f"({summary['macs_original'] / summary['macs_compressed']:.1f}x fewer); {layers}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
