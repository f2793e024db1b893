"""``RUN_DIR/report.md``: the run's figures, its compression table and the posterior as NetCDF.

Writes, under the run directory:

* ``report.md``     the report, embedding the figures by relative path;
* ``figures/*.png`` the figures of :mod:`pyro_bc.plots`;
* ``posterior.nc``  the DataTree of :func:`pyro_bc.inspect.to_datatree` (NetCDF-4).

The compression table comes from ``MODEL.json`` (the ``.json`` beside a given ``.bcz``, else
``RUN_DIR/MODEL.json`` if it exists); its thresholds are then used for the histograms and the input
map. Without it the default threshold of -3 is used and the report says the run is not compressed.
"""

from __future__ import annotations

import json
from pathlib import Path

from pyro_bc import plots
from pyro_bc.atomic import atomic_write_text
from pyro_bc.compress import default_thresholds, load_run
from pyro_bc.errors import ConfigError
from pyro_bc.inspect import save_datatree, to_datatree, var_prefix
from pyro_bc.posterior import analyse, prune
from pyro_bc.run_dir import METRICS

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


def _compression_section(summary: dict, source: str) -> list[str]:
    lines = [f"## Compression (`{source}`)", "",
             "| layer | groups kept | weights kept | bits (1+e+m) | threshold |",
             "|---|---:|---:|---:|---:|"]
    for r in summary["layers"]:
        lines.append(f"| {r['name']} | {r['groups_kept']}/{r['groups_total']} | {r['weights_kept']}/{r['weights_total']} "
                     f"| {r['bits']} (1+{r['exponent_bits']}+{r['mantissa_bits']}) | {r['threshold']:.2f} |")
    lines += ["", "| quantity | value |", "|---|---:|",
              f"| architecture | {summary['architecture']} |",
              f"| weights kept | {100 * summary['weights_kept_fraction']:.2f}% |",
              f"| cr_prune | {summary['cr_prune']:.1f} |",
              f"| cr_fast | {summary['cr_fast']:.1f} |",
              f"| cr_file | {summary['cr_file']:.1f} |",
              f"| file bytes | {summary['file_bytes']} of {summary['original_bytes']} |",
              f"| test error, posterior mean | {summary['error_posterior_mean']:.2f}% |",
              f"| test error, pruned | {summary['error_pruned']:.2f}% |",
              f"| test error, compressed | {summary['error_compressed']:.2f}% |",
              f"| validation error, compressed | {summary['val_error_compressed']:.2f}% |"]
    if summary.get("threshold_method"):
        lines.append(f"| thresholds | {summary['threshold_method']} |")
    return lines + [""]


def write_report(run_dir: str | Path, compressed: str | Path | None = None, num_samples: int = 200,
                 seed: int = 0) -> Path:
    """Write ``RUN_DIR/report.md`` (with ``figures/`` and ``posterior.nc``); returns its path."""
    run_dir = Path(run_dir)
    net, config, _ = load_run(run_dir)
    summary_path = _summary_path(run_dir, compressed)
    summary = json.loads(summary_path.read_text()) if summary_path else None
    posts = analyse(net)
    if summary and [r["name"] for r in summary["layers"]] == [p.name for p in posts]:
        thresholds = [float(r["threshold"]) for r in summary["layers"]]
    elif summary:
        raise ConfigError(f"{summary_path} describes layers {[r['name'] for r in summary['layers']]}, "
                          f"the run's network {[p.name for p in posts]}")
    else:
        thresholds = default_thresholds(net)
    pruned = prune(posts, thresholds)
    figdir = run_dir / FIGURES
    figdir.mkdir(exist_ok=True)

    dt = to_datatree(net, num_samples=num_samples, seed=seed)
    nc_note = f"The posterior draws are in [`{POSTERIOR_NC}`]({POSTERIOR_NC}) (an ArviZ DataTree, NetCDF-4)."
    try:
        save_datatree(dt, run_dir / POSTERIOR_NC)
    except (ImportError, ValueError, OSError) as e:
        nc_note = f"`{POSTERIOR_NC}` could not be written ({type(e).__name__}: {e})."

    def rel(path: Path) -> str:
        return path.relative_to(run_dir).as_posix()

    metrics = _read_metrics(run_dir / METRICS)
    last = metrics[-1] if metrics else {}
    lines = [f"# pyro-bc report: {config.model} / {config.prior}", "",
             f"Run directory `{run_dir}`: {last.get('epoch', 0)} epochs, batch size {config.batch_size}, "
             f"lr {config.lr:g}, seed {config.seed}" + (f", training subset {config.subset}" if config.subset else "")
             + "".join(f", {k} {v:g}" for k, v in net.layers[0].prior.options().items()) + ".", ""]
    if last:
        lines += [(f"Last epoch: ELBO per example {last['elbo']:.4f}, train error {last['train_error']:.2f}%, "
                  f"validation error {last['val_error']:.2f}%."), ""]
    if summary:
        lines += _compression_section(summary, summary_path.name)
    else:
        kept = "-".join(str(p.groups_kept) for p in pruned)
        lines += ["## Compression", "", (f"Not compressed yet (no MODEL.json): run `pyro-bc compress {run_dir} --out "
                  f"{run_dir}/MODEL.bcz`. At the default threshold {thresholds[0]:g} the groups kept would be "
                  f"{kept}."), ""]
        summary = None

    lines += ["## Figures", ""]
    if metrics:
        totals = {layer.site: layer.n_groups for layer in net.layers}
        path = plots.plot_training(metrics, figdir / "training.png", totals)
        lines += ["### Training", "", f"![training curves]({rel(path)})", ""]
    if summary:
        path = plots.plot_compression(summary, figdir / "compression.png")
        lines += ["### Groups kept and bits per layer", "", f"![compression]({rel(path)})", ""]
    unit = "weights" if pruned[0].post.per_weight else "groups"
    log_alphas = {p.post.name: p.post.log_alpha.numpy() for p in pruned}
    path = plots.plot_log_alpha(log_alphas, thresholds, figdir / "log_alpha.png", unit)
    lines += [f"### log alpha per {unit[:-1]}", "", f"{unit.capitalize()} left of the dashed threshold are kept.", "",
              f"![log alpha]({rel(path)})", ""]
    path = plots.plot_input_mask(pruned, net.input_shape, figdir / "input_mask.png")
    if path is not None:
        title = "Input pixels kept" if pruned[0].post.kind == "linear" else "First convolution's filters"
        lines += [f"### {title}", "", f"![{title.lower()}]({rel(path)})", ""]
    lines += ["### Group scales", ""]
    for layer in net.layers:
        name = var_prefix(layer)
        path = plots.plot_group_scales(dt, name, figdir / f"scales_{name}.png")
        lines += [f"![{name} group scales]({rel(path)})", ""]

    lines += ["## Posterior (DataTree)", "", nc_note, "", "| group | variable | dims | shape |", "|---|---|---|---|"]
    for group in dt.children:
        for var_name, var in dt[group].data_vars.items():
            lines.append(f"| {group} | {var_name} | {', '.join(var.dims)} | {'x'.join(map(str, var.shape))} |")
    lines += ["", dt.attrs["note"], ""]
    out = run_dir / REPORT
    atomic_write_text(out, "\n".join(lines))
    return out
