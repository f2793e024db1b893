"""Fine-tuning after pruning on torchvision's classifiers at full size: where it starts and what it keeps.

    .venv/bin/python analysis/finetune_zoo.py                       # every family of analysis/zoo.py
    .venv/bin/python analysis/finetune_zoo.py resnet18 densenet121  # some (merged into the rows already written)

Each family is built as ``analysis/zoo.py`` builds it (``weights=None, num_classes=10``, its input size), its
BatchNorm statistics set away from the identity's (running means N(0, 0.5^2), variances U(0.5, 2)) so that a
network that ignored them would show, made Bayesian (gnj) and fitted one epoch on 64 random images; then every second
group of each layer is made uncertain (its scale's log-variance set to 5: log alpha about 5, against about -9 for
the others) and the network compressed at the priors' default threshold (-3) with the fold of pruned inputs, so
that the cut is clear of ties that one epoch of fine-tuning could reorder. Then:

- ``rel_start``: ``pyro_bc.finetune(..., epochs=0)`` on a copy, the relative L2 distance of its posterior-mean
  network's outputs from :func:`pyro_bc.pruned_network`'s on 8 images: fine-tuning starts where compression cut
  (BatchNorm folded into the layers there, kept with its running statistics here);
- one epoch of fine-tuning (lr 1e-3): ``statistics_kept`` whether every BatchNorm's running statistics are
  unchanged, ``pruned_zero`` whether every pruned weight mean is still exactly zero, ``structure_kept`` whether
  compressing with :class:`~pyro_bc.compression.thresholds.KeptStructure` keeps the groups the source kept;
- ``warnings``: the warnings fine-tuning gave (a layer with neither bias nor BatchNorm after it cannot carry the fold
  of its pruned inputs: it starts from the pruned network without it).

Writes ``analysis/finetune_zoo.json`` (a row at a time) and ``analysis/finetune_zoo.md``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
import traceback
import warnings
from copy import deepcopy
from pathlib import Path

import torch
import torchvision
import zoo  # the sibling script (sys.path[0] is analysis/ when this file is run)
from torch import nn

import pyro_bc
from pyro_bc.atomic import atomic_write_text
from pyro_bc.compression.finetuning import load_masks
from pyro_bc.compression.thresholds import KeptStructure

HERE = Path(__file__).parent


def statistics(net: nn.Module) -> list[torch.Tensor]:
    return [t.clone() for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for t in (m.running_mean, m.running_var)]


def run_family(name: str, folder: Path) -> dict:
    """One row (see the module's docstring), or the first thing that failed."""
    size = zoo.FAMILIES[name]
    row: dict = {"model": name, "input": size}
    stage = "build"
    try:
        torch.manual_seed(0)
        dense = zoo.build(name)
        norms = [m for m in dense.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        with torch.no_grad():
            for m in norms:
                m.running_mean.normal_(0.0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
        row["batchnorms"] = len(norms)
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(zoo.N_TRAIN, 3, size, size, generator=generator)
        y = torch.randint(0, 10, (zoo.N_TRAIN,), generator=generator)
        stage = "fit"
        net = pyro_bc.bayesianize(dense, "gnj", input_shape=(3, size, size))
        pyro_bc.fit(net, (x, y), epochs=1, batch_size=zoo.BATCH, progress=False)
        stage = "compress"
        with torch.no_grad():
            for layer in net.layers:
                layer.prior.z_logvar[1::2] = 5.0
        summary = pyro_bc.compress(net.eval(), folder / f"{name}.bcz", val=(x, y), train=(x, y))
        row.update(weights_kept_fraction=summary["weights_kept_fraction"], fold=summary["fold_pruned_inputs"])
        with torch.no_grad():
            want = pyro_bc.pruned_network(net, summary, train=(x, y))(x[:8]).numpy()
        stage = "finetune start"
        started = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            start = deepcopy(net)
            pyro_bc.finetune(start, summary, (x, y), epochs=0, progress=False)
            with torch.no_grad():
                row["rel_start"] = zoo.relative(start.posterior_mean_network()(x[:8]).numpy(), want)
            stage = "finetune"
            before = statistics(net)
            out = folder / f"{name}-ft"
            pyro_bc.finetune(net, summary, (x, y), epochs=1, batch_size=zoo.BATCH, lr=1e-3, out=out, progress=False)
        row["warnings"] = sorted({str(w.message) for w in caught if issubclass(w.category, UserWarning)
                                  and "fold" in str(w.message)})
        row["finetune_s"] = time.perf_counter() - started
        row["statistics_kept"] = all(torch.equal(a, b) for a, b in zip(statistics(net), before))
        masks, _ = load_masks(out)
        row["pruned_zero"] = all(bool((layer.weight_mu[~mask.weight] == 0).all())
                                 for layer, mask in zip(net.layers, masks))
        stage = "compress fine-tuned"
        after = pyro_bc.compress(net.eval(), folder / f"{name}-ft.bcz", val=(x, y), train=(x, y),
                                 rule=KeptStructure(str(out)))
        row["structure_kept"] = [r["kept_groups"] for r in after["layers"]] == \
            [r["kept_groups"] for r in summary["layers"]]
    except Exception as e:  # noqa: BLE001  (a row records the first failure of any kind and the run goes on)
        row["failed"] = f"{stage}: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
        row["where"] = traceback.format_exc().splitlines()[-3].strip().replace(f'"{HERE.parent}/', '"')[:200]
    return row


def table(rows: list[dict]) -> str:
    header = ("| model | BatchNorm modules | weights kept | start vs pruned_network (rel. L2) | BatchNorm statistics "
              "unchanged | pruned weights zero | structure kept | fine-tuning s | fold not carried |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['model']} | {r.get('batchnorms', '-')} | failed: {r['failed']} | | | | | | |")
            continue
        layers = [w.split(" has no")[0] for w in r["warnings"]]
        lines.append(f"| {r['model']} | {r['batchnorms']} | {100 * r['weights_kept_fraction']:.1f}% | "
                     f"{r['rel_start']:.1e} | {'yes' if r['statistics_kept'] else 'NO'} | "
                     f"{'yes' if r['pruned_zero'] else 'NO'} | {'yes' if r['structure_kept'] else 'NO'} | "
                     f"{r['finetune_s']:.0f} | {', '.join(layers) or '-'} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help=f"constructor names (default: all {len(zoo.FAMILIES)})")
    parser.add_argument("--out", type=Path, default=HERE / "finetune_zoo.json")
    args = parser.parse_args()
    unknown = sorted(set(args.models) - set(zoo.FAMILIES))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}: choose from {', '.join(zoo.FAMILIES)}")
    torch.set_num_threads(1)
    command = shlex.join([".venv/bin/python", "analysis/finetune_zoo.py", *sys.argv[1:]])
    earlier = json.loads(args.out.read_text())["rows"] if args.out.is_file() else []
    rows = {row["model"]: row for row in earlier}
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models or zoo.FAMILIES:
            rows[name] = {**run_family(name, Path(folder)), "command": command}
            print(json.dumps(rows[name]), flush=True)
            ordered = [rows[n] for n in zoo.FAMILIES if n in rows]
            record = {"torch": torch.__version__, "torchvision": torchvision.__version__, "rows": ordered}
            atomic_write_text(args.out, json.dumps(record, indent=1) + "\n")  # a row at a time: nothing lost
    commands = sorted({row["command"] for row in ordered})
    intro = (f"{' and '.join(f'`{c}`' for c in commands)} (torch {torch.__version__}, torchvision "
             f"{torchvision.__version__}, one thread): each family as `analysis/zoo.py` builds it, its BatchNorm "
             "statistics moved away from the identity's, fitted one epoch on 64 random images, every second "
             "group of each layer pruned, with the fold, then fine-tuned from that compression (the script's "
             "docstring has the method).")
    text = "\n".join(["## Fine-tuning torchvision's classifiers after pruning", "", intro, "", table(ordered)])
    atomic_write_text(HERE / "finetune_zoo.md", text + "\n")
    print(table(ordered))
    return 0


if __name__ == "__main__":
    sys.exit(main())
