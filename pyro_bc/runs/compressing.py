"""``pyro-bc compress`` and ``pyro-bc evaluate``: a run directory to a ``.bcz`` file, and a file's test error and speed."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from pyro_bc.atomic import atomic_write_text
from pyro_bc.bcz import codec
from pyro_bc.bcz.modules import to_module
from pyro_bc.compression.bits import BitsRule
from pyro_bc.compression.finetuning import load_masks
from pyro_bc.compression.pipeline import checked_out, compress_network, resolve_rules, summary_json
from pyro_bc.compression.thresholds import KeptStructure, ThresholdRule
from pyro_bc.data.datasets import Dataset, load_data, require_shape
from pyro_bc.defaults import VAL_SIZE
from pyro_bc.errors import ConfigError
from pyro_bc.metrics.evaluate import error_percent
from pyro_bc.metrics.predict import scored
from pyro_bc.metrics.shift import fit_images, shift_report
from pyro_bc.runs.load import load_run, original_network
from pyro_bc.train.run_dir import FINETUNE_FILE, PYTHON_MODEL


def compress_run(run_dir: str | Path, out: str | Path, thresholds: list[float] | None = None, auto: str | None = None,
                 max_error_increase: float | None = None, data: str | None = None, fold: bool | None = None,
                 rule: ThresholdRule | None = None, bits_budget: float | None = None,
                 bits_rule: BitsRule | None = None, *, predictive_samples: int | None = None,
                 keep_variance: bool = False) -> dict:
    """Compress a finished run into ``out`` (``.bcz``) and ``MODEL.json`` beside it; returns the summary.

    Loads the run's network and its data (``data``, or the run's), then runs :func:`compress_network`, which
    :func:`compress` (the Python entry point) runs too.

    The thresholds come from ``rule`` (a :class:`~pyro_bc.compression.thresholds.ThresholdRule`), or from the
    command line's options ``thresholds``, ``auto`` and ``max_error_increase``
    (:func:`~pyro_bc.compression.thresholds.rule_from_options`; by default, each layer's prior's default).
    Then, with the layers pruned, the mantissa bits come from ``bits_rule`` (a :class:`~pyro_bc.compression.bits.BitsRule`),
    or from ``bits_budget`` (:func:`~pyro_bc.compression.bits.bits_rule_from_options`; by default, the variance rule).

    With ``fold``, what the pruned weights add on average (over the first :data:`FOLD_EXAMPLES` training
    examples) goes into the biases (:func:`~pyro_bc.compression.posterior.fold_pruned_inputs`). The default folds for
    the group priors (gnj, ghs), whose pruned groups still add their mean, and not for ``lu``, whose
    pruned weights' means are noise (both measured in analysis/RESULTS.md).

    ``predictive_samples``: record the test set's error, NLL, Brier score and ECE in ``MODEL.json`` under
    ``predictive`` (:func:`~pyro_bc.metrics.predict.predictive_summary`; the full posterior with this many draws, 0: only
    the deterministic networks; None: no record, the default, since 30 draws of LeNet-5 over 10,000 test images
    take minutes on one CPU thread).

    ``keep_variance``: the file also keeps the kept weights' posterior variances (and the group scales'), a
    version-3 ``.bcz`` that ``pyro_bc.load(path, bayesian=True)`` rebuilds as the compressed Bayesian network
    (:mod:`pyro_bc.bcz.bayesian`); ``MODEL.json`` adds ``file_bytes_without_variance`` and ``cr_file_without_variance``.
    """
    finetuned = (Path(run_dir) / FINETUNE_FILE).is_file()
    if finetuned and rule is None and (thresholds, auto, max_error_increase) == (None, None, None):
        rule = KeptStructure(str(run_dir))  # a fine-tuned run keeps its structure unless thresholds are asked for
    rule, bits_rule = resolve_rules((thresholds, auto, max_error_increase, None), rule, bits_budget, bits_rule)
    checked_out(out)
    net, config, state = load_run(run_dir)
    dataset = load_data(data or config.data, val_size=config.val_size, seed=config.seed)
    require_shape(dataset, data or config.data, net.input_shape, f"the network of {run_dir}",
                  f"give the run's data with --data DIR, or leave --data out to use the run's "
                  f"({config.data or 'the embedded MNIST'})" if data else "pass the run's data with --data DIR")
    info = {"model": config.model, "prior": config.prior, "run_dir": str(run_dir),
            "prior_options": config.prior_options, "data": data or config.data, "val_size": config.val_size,
            "seed": config.seed, **({"width": config.width} if config.width is not None else {})}
    val = None if dataset.validation is None else (dataset.val.x, dataset.val.y)  # none: trained on every example
    summary = compress_network(net, out, val, train_x=dataset.train.x, test=(dataset.test.x, dataset.test.y),
                               fold=fold, rule=rule, bits_rule=bits_rule, info=info,
                               predictive_samples=predictive_samples, keep_variance=keep_variance)
    if finetuned:  # MODEL.json says where the network came from
        record = load_masks(run_dir)[1]  # its kept groups are the layers' (kept-structure) or were pruned further
        summary["finetuned"] = {**{k: v for k, v in record.items() if k != "kept_groups"},
                                "epochs": len(state["metrics"])}
        atomic_write_text(Path(out).with_suffix(".json"), summary_json(summary))
    return summary


def _ms_per_batch(module: torch.nn.Module, batch: torch.Tensor, repeats: int = 7) -> float:
    times = []
    with torch.no_grad():
        module(batch)
        for _ in range(repeats):
            started = time.perf_counter()
            module(batch)
            times.append(time.perf_counter() - started)
    return 1000 * sorted(times)[len(times) // 2]


def evaluate_file(path: str | Path, data: str | None = None, batch_size: int = 1000, samples: int = 0,
                  rotation: bool = False, ood: str | None = None) -> dict:
    """Test error of a ``.bcz`` file, and its median time per batch against the dense original network
    (the unpruned architecture at float32; its weights do not change its speed); the deterministic network's
    ``nll``, ``brier`` and ``ece`` (:mod:`pyro_bc.metrics.scores`) and, with ``samples`` > 0, ``sampled``: the metrics of
    the compressed Bayesian network's predictive over that many draws (a file written with ``keep_variance``).
    Shift (:func:`~pyro_bc.metrics.shift.shift_report`, for each network): ``noise_auroc``; with ``rotation`` the error and
    NLL against rotation; with ``ood`` (a data folder) the entropy AUROC against its test images."""
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
        raise ConfigError(f"samples must be a whole number >= 0, got {samples!r}")
    bayesian = codec.load(path, bayesian=True) if samples else None  # refuses a file without variances first
    model = codec.read_bcz(path)
    meta = model.metadata
    compressed = to_module(model)
    dataset = _evaluation_data(path, meta, data)
    require_shape(dataset, data, model.input_shape, str(path), "give the data it was trained on with --data DIR")
    x, y = dataset.test.x, dataset.test.y
    original = original_network(meta, model.input_shape)
    ms_compressed = _ms_per_batch(compressed, x[:batch_size])
    ms_original = _ms_per_batch(original, x[:batch_size]) if original is not None else None
    ood_set = None
    if ood is not None:
        ood_set = (str(ood), fit_images(load_data(ood, val_size=0).test.x, tuple(x.shape[1:])))
    deterministic = scored(compressed, x, y, 0, batch_size)
    result = {"error": error_percent(compressed, x, y), "n": len(x),
              "ms_per_batch_compressed": ms_compressed, "ms_per_batch_original": ms_original,
              "speedup": ms_original / ms_compressed if ms_original is not None else None,
              **{k: deterministic[k] for k in ("nll", "brier", "ece")},
              **shift_report(compressed, x, y, 0, rotation, ood_set, batch_size)}
    if bayesian is not None:
        result["sampled"] = {"samples": samples, **scored(bayesian, x, y, samples, batch_size),
                             **shift_report(bayesian, x, y, samples, rotation, ood_set, batch_size)}
    return result


def _evaluation_data(path: str | Path, meta: dict, data: str | None) -> Dataset:
    """The data set of a ``.bcz`` file's test error, split and normalised as its training saw it; one line saying
    what is missing where the file does not record it (a file written by :func:`compress` from tensors)."""
    if data is None and meta.get("model") == PYTHON_MODEL:
        raise ConfigError(f"{path} was written by pyro_bc.compress from tensors, so its data is not recorded: give "
                          "its data folder with --data DIR (or evaluate pyro_bc.load(path) in Python)")
    dataset = load_data(data, val_size=meta.get("val_size", VAL_SIZE), seed=meta.get("seed", 0))
    if dataset.format != "mnist-idx" and not {"val_size", "seed"} <= meta.keys():
        raise ConfigError(f"{path} does not record the validation split (val_size, seed) on which {data}'s "
                          "per-channel normalisation depends: write it with pyro_bc.compress(..., "
                          "metadata={'val_size': V, 'seed': S})")
    return dataset
