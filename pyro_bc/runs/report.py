"""``RUN_DIR/report.md``: the run's figures, its compression table and the posterior as NetCDF.

Writes, under the run directory:

* ``report.md``     the report, embedding the figures by relative path;
* ``figures/*.png`` the figures of :mod:`pyro_bc.report.plots`;
* ``posterior.nc``  the DataTree of :func:`pyro_bc.report.datatree.to_datatree` (NetCDF-4).

The compression table and the pruning decisions come from ``MODEL.json`` (the ``.json`` beside a given
``.bcz``, else ``RUN_DIR/MODEL.json`` if it exists): its per-layer thresholds mark the histograms and its
``kept_groups`` draw the input map; nothing is pruned again. (A ``MODEL.json`` written before
``kept_groups`` was recorded is pruned again at its thresholds, and the report says so.) Without a
``MODEL.json`` the report says the run is not compressed and shows what each layer's prior's default
threshold would keep, pruned as compression prunes (across the graph for networks that are not a sequence).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from pyro_bc.atomic import atomic_write_text
from pyro_bc.bcz import codec
from pyro_bc.compression.finetuning import load_masks
from pyro_bc.compression.graph import analyse_network, prune_network
from pyro_bc.compression.posterior import LayerPosterior, analyse
from pyro_bc.compression.thresholds import PriorDefault, ThresholdInputs
from pyro_bc.data.datasets import Split, as_split, load_data
from pyro_bc.errors import ConfigError
from pyro_bc.metrics.predict import predictive
from pyro_bc.metrics.scores import as_rows, classification_metrics
from pyro_bc.metrics.shift import auroc, entropy, noise_images, rotation_curve
from pyro_bc.nn.network import BayesianNet
from pyro_bc.report import plots
from pyro_bc.report.datatree import save_datatree, to_datatree, var_prefix, with_predictions
from pyro_bc.runs.load import load_run
from pyro_bc.train.checkpoint import load_checkpoint
from pyro_bc.train.run_dir import CHECKPOINT, FINETUNE_FILE, METRICS, PYTHON_MODEL, TrainConfig

REPORT, FIGURES, POSTERIOR_NC = "report.md", "figures", "posterior.nc"


def _read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _summary_path(run_dir: Path, compressed: str | Path | None) -> Path | None:
    if compressed is not None:
        path = Path(compressed).with_suffix(".json")
        if not path.is_file():
            raise ConfigError(f"{path} does not exist: run 'pyro-bc compress' to write it beside {compressed}")
        return path
    path = run_dir / "MODEL.json"
    return path if path.is_file() else None


def _kept_groups(rows: list[dict], posts: list[LayerPosterior], source: Path) -> list[torch.Tensor]:
    """Each layer's bool mask of kept groups from ``MODEL.json``'s ``kept_groups`` index lists."""
    masks = []
    for row, post in zip(rows, posts):
        index = row["kept_groups"]
        if not isinstance(index, list) or any(type(i) is not int or not 0 <= i < post.n_groups for i in index):
            raise ConfigError(f"{source}: {post.name}'s kept_groups is not a list of group indices below "
                              f"{post.n_groups}")
        mask = torch.zeros(post.n_groups, dtype=torch.bool)
        mask[index] = True
        masks.append(mask)
    return masks


def _decisions(net: BayesianNet, posts: list[LayerPosterior], summary: dict | None,
               summary_path: Path | None) -> tuple[list[float], list[torch.Tensor], str]:
    """The thresholds, each layer's mask of kept groups, and a sentence on where they come from."""
    if summary is None:
        thresholds = PriorDefault().thresholds(ThresholdInputs(net, posts))
        kept = [layer.keep_groups for layer in prune_network(net, posts, thresholds, None)]
        return thresholds, kept, "each layer's prior's default threshold (no MODEL.json)"
    rows = summary["layers"]
    if [r["name"] for r in rows] != [p.name for p in posts]:
        raise ConfigError(f"{summary_path} describes layers {[r['name'] for r in rows]}, "
                          f"the run's network {[p.name for p in posts]}")
    thresholds = [float(r["threshold"]) for r in rows]
    if all("kept_groups" in r for r in rows):
        return thresholds, _kept_groups(rows, posts, summary_path), f"`{summary_path.name}`"
    kept = [layer.keep_groups for layer in prune_network(net, posts, thresholds, None)]
    return thresholds, kept, (f"`{summary_path.name}`'s thresholds, pruned again (it predates `kept_groups`: "
                              "run `pyro-bc compress` again to record them)")


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}%"


def _macs(row: dict) -> str:
    """``kept/original (Nx fewer)`` MACs per example of a MODEL.json entry; ``n/a`` where it predates the counts."""
    if "macs_original" not in row:
        return "n/a"
    return (f"{row['macs_compressed']:,}/{row['macs_original']:,} "
            f"({row['macs_original'] / row['macs_compressed']:.1f}x fewer)")


def _compression_section(summary: dict, source: str) -> list[str]:
    lines = [f"## Compression (`{source}`)", "",
             "| layer | groups kept | weights kept | bits (1+e+m) | threshold | MACs per example (kept/original) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in summary["layers"]:
        lines.append(f"| {r['name']} | {r['groups_kept']}/{r['groups_total']} | {r['weights_kept']}/{r['weights_total']} "
                     f"| {r['bits']} (1+{r['exponent_bits']}+{r['mantissa_bits']}) | {r['threshold']:.2f} "
                     f"| {_macs(r)} |")
    lines += ["", "| quantity | value |", "|---|---:|",
              f"| architecture | {summary['architecture']} |",
              f"| weights kept | {100 * summary['weights_kept_fraction']:.2f}% |",
              f"| cr_prune | {summary['cr_prune']:.1f} |",
              f"| cr_fast | {summary['cr_fast']:.1f} |",
              f"| cr_file | {summary['cr_file']:.1f} |",
              f"| file bytes | {summary['file_bytes']} of {summary['original_bytes']} |",
              f"| MACs per example (kept/original) | {_macs(summary)} |",
              f"| test error, posterior mean | {_percent(summary['error_posterior_mean'])} |",
              f"| test error, pruned | {_percent(summary['error_pruned'])} |",
              f"| test error, compressed | {_percent(summary['error_compressed'])} |",
              f"| validation error, compressed | {_percent(summary['val_error_compressed'])} |"]
    if summary.get("threshold_method"):
        lines.append(f"| thresholds | {summary['threshold_method']} |")
    return lines + [""] + _deterministic_section(summary)


def _deterministic_section(summary: dict) -> list[str]:
    """The modules the file keeps deterministic (MODEL.json's ``deterministic_modules``), with the precision chosen
    for them and the validation errors it was chosen on; nothing where there are none."""
    rows, choice = summary.get("deterministic_modules"), summary.get("deterministic_precision")
    if not rows:
        return []
    lines = ["Deterministic modules (not Bayesian: stored as the network has them, not pruned by log alpha)"
             + (f"; at {choice['chosen']} (validation error {choice['val_error_float16']:.2f}% at float16, "
                f"{choice['val_error_float32']:.2f}% at float32):" if choice else ":"), "",
             "| module | class | stored as | parameters (network / file) | precision |", "|---|---|---|---:|---|"]
    lines += [f"| {r['name']} | {r['module']} | {r['stored_as']} | {r['parameters_original']} / {r['parameters']} "
              f"| {r['precision']} |" for r in rows]
    return lines + [""]


def _finetune_line(record: dict, epochs: int, lr: float) -> str:
    """What the report says of a fine-tuning run: from which run, which pruning, for how long."""
    before = record.get("source_compression", {})
    error = before.get("error_pruned")
    return (f"Fine-tuned for {epochs} epochs (lr {lr:g}) from run `{record.get('source_run')}`, pruned to "
            f"{before.get('architecture')} ({before.get('threshold_method')}"
            + (f"; test error of the pruned network before fine-tuning {error:.2f}%" if error is not None else "")
            + "): the pruned weights held at zero, SVI on the kept ones.")


def _predictions_section(net: BayesianNet, test, compressed: str | Path | None, samples: int, figdir: Path,
                         rel) -> list[str]:
    """The report's predictions on ``test`` (a split with ``x`` and ``y``): metrics, reliability, entropy (test
    against noise) and, for images (``N x C x H x W``), NLL under rotation of the full posterior (``samples``
    draws), its posterior mean and, where ``compressed`` keeps variances, the compressed Bayesian (``samples``
    draws) and deterministic networks."""
    images = test.x.dim() == 4 and test.y.dim() == 1  # rotating an image moves the labels of its pixels
    sources = {"full posterior": (net, samples), "posterior mean": (net, 0)}
    if compressed is not None and Path(compressed).is_file():
        if codec.read_bcz(compressed).variances is not None:
            sources["compressed Bayesian"] = (codec.load(compressed, bayesian=True), samples)
        sources["compressed deterministic"] = (codec.load(compressed), 0)
    noise = noise_images(test.x)
    probs, entropies, curves, rows = {}, {}, {}, []
    for name, (source, k) in sources.items():  # a network labelling each position: a row per position
        probs[name], labels = as_rows(predictive(source, test.x, k).cpu(), test.y.cpu())
        noise_probs = predictive(source, noise, k, seed=1).cpu()
        entropies[name] = {"test": entropy(probs[name]).numpy(),
                           "noise": entropy(noise_probs.reshape(-1, noise_probs.shape[-1])).numpy()}
        if images:
            curves[name] = rotation_curve(source, test.x, test.y, k)
        m = classification_metrics(probs[name], labels)
        noise_auroc = auroc(*(torch.from_numpy(entropies[name][s]) for s in ("test", "noise")))
        rotation = f"{curves[name]['nll_area']:.3f}" if images else "-"
        rows.append(f"| {name} | {k or '-'} | {m['error']:.2f} | {m['nll']:.4f} | {m['brier']:.4f} | {m['ece']:.4f} "
                    f"| {rotation} | {noise_auroc:.3f} |")
    lines = ["## Predictions", "", (f"On the {len(test)} test examples; sampled networks average {samples} draws of the "
             "local reparameterisation (seed 0). Rotation NLL (images only): the mean over 0-180 degrees; noise "
             "AUROC: the predictive entropy's, against as many uniform-noise inputs."), "",
             "| network | draws | error % | NLL | Brier | ECE | rotation NLL | noise AUROC |",
             "|---|---:|---:|---:|---:|---:|---:|---:|", *rows, ""]
    figures = [("Reliability", plots.plot_reliability(probs, labels, figdir / "reliability.png")),
               ("Predictive entropy", plots.plot_entropy(entropies, figdir / "entropy.png"))]
    if images:
        figures.append(("NLL under rotation", plots.plot_rotation(curves, figdir / "rotation.png")))
    for title, path in figures:
        lines += [f"### {title}", "", f"![{title.lower()}]({rel(path)})", ""]
    return lines


def _figures_section(net: BayesianNet, posts: list[LayerPosterior], thresholds: list[float], kept: list[torch.Tensor],
                     decided_by: str, summary: dict | None, metrics: list[dict], dt, figdir: Path, rel) -> list[str]:
    """The report's figures, drawn into ``figdir``: training curves, groups kept and bits, log alpha against the
    thresholds, the first layer's kept inputs, the group scales; ``rel`` makes a figure's path relative to the run."""
    lines = ["## Figures", ""]
    if metrics:
        totals = {layer.site: layer.n_groups for layer in net.layers}
        path = plots.plot_training(metrics, figdir / "training.png", totals)
        lines += ["### Training", "", f"![training curves]({rel(path)})", ""]
    if summary:
        path = plots.plot_compression(summary, figdir / "compression.png")
        lines += ["### Groups kept and bits per layer", "", f"![compression]({rel(path)})", ""]
    unit = "weights" if posts[0].per_weight else "groups"
    log_alphas = {p.name: p.log_alpha.numpy() for p in posts}
    path = plots.plot_log_alpha(log_alphas, thresholds, figdir / "log_alpha.png", unit)
    lines += [f"### log alpha per {unit[:-1]}", "",
              f"{unit.capitalize()} left of the dashed threshold are kept (thresholds from {decided_by}).", "",
              f"![log alpha]({rel(path)})", ""]
    path = plots.plot_input_mask(posts[0], kept[0], thresholds[0], net.input_shape, figdir / "input_mask.png")
    if path is not None:
        title = "Input pixels kept" if posts[0].kind == "linear" else "First convolution's filters"
        lines += [f"### {title}", "", f"What is kept comes from {decided_by}.", "",
                  f"![{title.lower()}]({rel(path)})", ""]
    lines += ["### Group scales", ""]
    for layer in net.layers:
        name = var_prefix(layer)
        path = plots.plot_group_scales(dt, name, figdir / f"scales_{name}.png")
        lines += [f"![{name} group scales]({rel(path)})", ""]
    return lines


def write_report(run_dir: str | Path, compressed: str | Path | None = None, num_samples: int = 200,
                 seed: int = 0, predictive_samples: int | None = None, net: BayesianNet | None = None,
                 test: Split | None = None) -> Path:
    """Write ``RUN_DIR/report.md`` (with ``figures/`` and ``posterior.nc``); returns its path.

    ``predictive_samples``: also a predictions section (:func:`_predictions_section`; the full posterior and the
    compressed Bayesian network with that many draws) and the DataTree's ``predictions`` group (the first 100 test
    images, ``num_samples`` draws); None, the default: neither (they evaluate the test set many times over).
    A run of :func:`pyro_bc.fit` records neither its network nor its data: give the trained ``net`` and, for the
    predictions, ``test`` (``(x, y)``, a Dataset or a DataLoader); a run of the command line rebuilds both."""
    run_dir = Path(run_dir)
    if net is None:
        net, config, _ = load_run(run_dir)
    else:  # a copy in eval mode: the caller's network keeps its mode
        config = TrainConfig.from_dict(load_checkpoint(run_dir / CHECKPOINT)["config"])
        net = copy.deepcopy(net).eval()
    if predictive_samples is not None and test is None and config.model == PYTHON_MODEL:
        raise ConfigError(f"{run_dir} is a run of pyro_bc.fit, which does not record its data: give the test "
                          "examples for the predictions (write_report(..., test=(x, y)))")
    summary_path = _summary_path(run_dir, compressed)
    summary = json.loads(summary_path.read_text()) if summary_path else None
    posts = analyse_network(net, analyse(net))  # as compression sees them: BatchNorm folded in
    thresholds, kept, decided_by = _decisions(net, posts, summary, summary_path)
    figdir = run_dir / FIGURES
    figdir.mkdir(exist_ok=True)

    def rel(path: Path) -> str:
        return path.relative_to(run_dir).as_posix()

    dt = to_datatree(net, num_samples=num_samples, seed=seed)
    predictions = []
    if predictive_samples is not None:
        test = load_data(config.data, val_size=config.val_size, seed=config.seed).test if test is None else \
            as_split(test, "test")
        predictions = _predictions_section(net, test, compressed if compressed is not None else run_dir / "MODEL.bcz",
                                           predictive_samples, figdir, rel)
        dt = with_predictions(dt, net, test.x, test.y, num_samples=num_samples, seed=seed)
    nc_note = f"The posterior draws are in [`{POSTERIOR_NC}`]({POSTERIOR_NC}) (an ArviZ DataTree, NetCDF-4)."
    try:
        save_datatree(dt, run_dir / POSTERIOR_NC)
    except (ImportError, ValueError, OSError) as e:
        nc_note = f"`{POSTERIOR_NC}` could not be written ({type(e).__name__}: {e})."

    metrics = _read_metrics(run_dir / METRICS)
    last = metrics[-1] if metrics else {}
    lines = [f"# pyro-bc report: {config.model} / {config.prior}", "",
             f"Run directory `{run_dir}`: {last.get('epoch', 0)} epochs, batch size {config.batch_size}, "
             f"lr {config.lr:g}, seed {config.seed}" + (f", training subset {config.subset}" if config.subset else "")
             + "".join(f", {k} {v:g}" for k, v in net.layers[0].prior.options().items()) + ".", ""]
    if (run_dir / FINETUNE_FILE).is_file():
        lines += [_finetune_line(load_masks(run_dir)[1], len(metrics), config.lr), ""]
    if last:
        if "train_rmse" in last:  # a regression network
            measured = f"train RMSE {last['train_rmse']:.4g}" + (
                f", validation RMSE {last['val_rmse']:.4g}" if "val_rmse" in last else "")
        else:
            measured = (f"train error {_percent(last.get('train_error'))}, "
                        f"validation error {_percent(last.get('val_error'))}")
        lines += [f"Last epoch: ELBO per example {last['elbo']:.4f}, {measured}.", ""]
    if summary:
        lines += _compression_section(summary, summary_path.name)
    else:
        defaults = ", ".join(f"{p.name} {t:g}" for p, t in zip(posts, thresholds))
        counts = "-".join(str(int(k.sum())) for k in kept)
        lines += ["## Compression", "", (f"Not compressed yet (no MODEL.json): run `pyro-bc compress {run_dir} --out "
                  f"{run_dir}/MODEL.bcz`. At the priors' default thresholds ({defaults}) the groups kept would be "
                  f"{counts}."), ""]

    lines += _figures_section(net, posts, thresholds, kept, decided_by, summary, metrics, dt, figdir, rel)
    lines += predictions
    lines += ["## Posterior (DataTree)", "", nc_note, "", "| group | variable | dims | shape |", "|---|---|---|---|"]
    for group in dt.children:
        for var_name, var in dt[group].data_vars.items():
            lines.append(f"| {group} | {var_name} | {', '.join(var.dims)} | {'x'.join(map(str, var.shape))} |")
    lines += ["", dt.attrs["note"], ""]
    out = run_dir / REPORT
    atomic_write_text(out, "\n".join(lines))
    return out
