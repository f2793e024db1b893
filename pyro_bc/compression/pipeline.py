"""A network in memory to a ``.bcz`` file and its summary (``MODEL.json``): :func:`compress` (``pyro_bc.compress``)
and :func:`compress_network`, which :func:`pyro_bc.runs.compressing.compress_run` runs for a run directory:
thresholds, pruning, bits, rates, errors."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from pyro_bc.atomic import atomic_write_text
from pyro_bc.bcz import codec
from pyro_bc.bcz.model import DETERMINISTIC, CompressedModel, FloatLayer, ProgramNode, float16_exact
from pyro_bc.bcz.modules import Graph, to_module
from pyro_bc.compression.bits import TOLERANCE, BitsInputs, BitsRule, bits_rule_from_options
from pyro_bc.compression.compressed import compressed_model
from pyro_bc.compression.graph import BodyGraph, analyse_network, prune_network
from pyro_bc.compression.macs import add_macs
from pyro_bc.compression.posterior import (
    Precision,
    PrunedLayer,
    analyse,
    choose_precision,
    compression_rates,
    fold_state,
)
from pyro_bc.compression.pruned import FOLD_EXAMPLES, layer_input_means, masked_network
from pyro_bc.compression.thresholds import ThresholdInputs, ThresholdRule, rule_from_options
from pyro_bc.compression.variances import compressed_variances
from pyro_bc.data.datasets import Split, as_split
from pyro_bc.errors import ConfigError
from pyro_bc.metrics.evaluate import error
from pyro_bc.metrics.predict import predictive_summary
from pyro_bc.nn.network import BayesianNet, check_forward
from pyro_bc.train.run_dir import PYTHON_MODEL


def compress(net: BayesianNet, out: str | Path = "MODEL.bcz", val: tuple[torch.Tensor, torch.Tensor] | None = None,
             thresholds: list[float] | None = None, auto: str | None = None, max_error_increase: float | None = None,
             *, max_weights_kept: float | None = None, train: tuple[torch.Tensor, torch.Tensor] | None = None,
             test: tuple[torch.Tensor, torch.Tensor] | None = None, fold: bool | None = None,
             rule: ThresholdRule | None = None, bits_budget: float | None = None, bits_rule: BitsRule | None = None,
             metadata: dict | None = None, predictive_samples: int | None = None, keep_variance: bool = False) -> dict:
    """Compress a trained network from Python (``pyro_bc.compress``): ``out`` (``.bcz``) and ``MODEL.json`` beside
    it, with the keys of ``pyro-bc compress``; returns that summary.

    ``val = (x, y)``: the validation examples, for the error-budget rules, ``val_error_compressed`` and the choice of
    the deterministic modules' precision; without them (a network trained on all its data) the thresholds must be
    given or found without errors (``thresholds``, ``auto``, ``max_weights_kept``), the bits are the variance rule's,
    ``val_error_compressed`` is None and deterministic modules stay at float32.
    ``test = (x, y)``: optional; without it ``error_posterior_mean``, ``error_pruned`` and ``error_compressed`` are
    None. ``train = (x, y)``: optional training examples, whose first :data:`FOLD_EXAMPLES` give the means with
    which pruned inputs are folded into the biases (``fold``: as :func:`compress_run`'s, but without ``train``
    nothing is folded and ``fold_pruned_inputs`` is false). Thresholds and bits as in :func:`compress_run`;
    ``max_weights_kept`` P: the least pruned network keeping at most P% of the weights (``--max-weights-kept``).
    ``metadata``: keys recorded in the file and the summary over the defaults ``{"model": "python", "prior":
    <the layers' prior>}`` (a ``.bcz`` keeps ``model``, ``prior``, ``thresholds``, ``val_size`` and ``seed``).
    ``predictive_samples`` (needs ``test``) and ``keep_variance``: as :func:`compress_run`'s.
    """
    rule, bits_rule = resolve_rules((thresholds, auto, max_error_increase, max_weights_kept), rule, bits_budget,
                                    bits_rule)
    val_split = None if val is None else as_split(val, "val")
    test_split = None if test is None else as_split(test, "test")
    if train is None:
        if fold:
            raise ConfigError("fold=True needs training examples: train=(x, y)")
        fold = False
    train_x = None if train is None else as_split(train, "train").x[:FOLD_EXAMPLES]
    info = {"model": PYTHON_MODEL, "prior": "+".join(sorted({layer.prior.name for layer in net.layers})),
            **(metadata or {})}
    was_training, device = net.training, next(net.parameters()).device
    try:  # on the CPU, in eval mode; the network goes back to its device and mode afterwards
        return compress_network(net.cpu().eval(), out, _on_cpu(val_split),
                                train_x=None if train_x is None else train_x.cpu(), test=_on_cpu(test_split),
                                fold=fold, rule=rule, bits_rule=bits_rule, info=info,
                                predictive_samples=predictive_samples, keep_variance=keep_variance)
    finally:
        net.to(device).train(was_training)


def _on_cpu(split: Split | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    return None if split is None else (split.x.cpu(), split.y.cpu())


def resolve_rules(options: tuple, rule, bits_budget, bits_rule) -> tuple[ThresholdRule, BitsRule]:
    """The threshold and bits rules of ``compress``'s arguments: ``options`` are ``thresholds``, ``auto``,
    ``max_error_increase`` and ``max_weights_kept`` (:func:`rule_from_options`), or ``rule`` itself."""
    if rule is not None and any(option is not None for option in options):
        raise ConfigError("give either a threshold rule or thresholds / auto / max_error_increase / max_weights_kept, "
                          "not both")
    rule = rule or rule_from_options(*options)
    if bits_rule is not None and bits_budget is not None:
        raise ConfigError("give either a bits rule or bits_budget, not both")
    return rule, bits_rule or bits_rule_from_options(bits_budget)


def checked_out(out: str | Path) -> Path:
    out = Path(out)
    if not out.parent.is_dir():
        raise ConfigError(f"output folder {out.parent} does not exist")
    return out


def _check_predictive_samples(samples: int | None, test) -> None:
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 0):
        raise ConfigError(f"predictive_samples must be a whole number >= 0 or None, got {samples!r}")
    if samples is not None and test is None:
        raise ConfigError("predictive_samples needs test examples: test=(x, y)")


def compress_network(net: BayesianNet, out: str | Path, val: tuple[torch.Tensor, torch.Tensor] | None, *,
                     train_x: torch.Tensor | None, test: tuple[torch.Tensor, torch.Tensor] | None, fold: bool | None,
                     rule: ThresholdRule, bits_rule: BitsRule, info: dict,
                     predictive_samples: int | None = None, keep_variance: bool = False) -> dict:
    """The compression of :func:`compress_run` and :func:`compress`: ``net`` pruned by ``rule``, its bits by
    ``bits_rule``, written to ``out`` and ``MODEL.json``. ``val``: the validation examples (None: none, as
    :func:`compress` says); ``train_x``: the training inputs of the fold (needed when it folds); ``test``: the test
    examples (None: test errors None); ``info``: ``model`` and ``prior`` (recorded in the summary) and the rest of
    the file's metadata."""
    out = checked_out(out)
    _check_predictive_samples(predictive_samples, test)
    given = {what: split for what, split in (("val", val), ("train", train_x is not None and (train_x, None)),
                                              ("test", test)) if split}  # (inputs, labels or None) by split
    if net.input_shape is None and not given:  # a converted network never trained: its input is the data's
        raise ConfigError("the network has never seen an input: give examples (val, train or test) to compress it")
    for what, (x, y) in given.items():
        check_forward(net, x[:2], *(() if y is None else (y,)), what=what)

    def val_error(module: torch.nn.Module) -> float | None:
        return None if val is None else error(module, *val, net.observation)
    graph = BodyGraph(net)  # traced once: every pruning and layout below reads it
    fold = folds_by_default(net) if fold is None else fold
    layers, thresholds = _pruned_layers(net, graph, rule, val, train_x[:FOLD_EXAMPLES] if fold else None)
    method = rule.method(thresholds)

    def file_model(precision: Precision, metadata: dict | None = None, half: bool = False) -> codec.CompressedModel:
        model = codec.round_biases(compressed_model(net, layers, precision, metadata, graph), "float16")  # RESULTS.md
        return codec.half_deterministic(model) if half else model

    variance = choose_precision(layers)
    precision = bits_rule.precision(BitsInputs(layers, variance, None if val is None else
                                               lambda p: val_error(to_module(file_model(p)))))
    deterministic_precision = None if val is None else choose_deterministic_precision(
        file_model(precision), lambda m: val_error(to_module(m)))
    rates = compression_rates(layers, precision)
    rest = {k: v for k, v in info.items() if k not in ("model", "prior")}
    metadata = {"model": info["model"], "prior": info["prior"], "thresholds": thresholds, "threshold_method": method,
                **rest}
    model = file_model(precision, metadata, half=(deterministic_precision or {}).get("chosen") == "float16")
    if keep_variance:  # a version-3 file: the compressed Bayesian network
        model.variances = compressed_variances(net, layers, model)
    file_bytes = codec.write_bcz(out, model)
    loaded = codec.load(out)
    deterministic = deterministic_modules(model, graph)
    original_bytes = 4 * (sum(p.numel() for layer in net.layers for p in (layer.weight_mu, layer.bias_mu)
                              if p is not None) + sum(row["parameters_original"] for row in deterministic))
    pruned_only = masked_network(net, layers, graph)  # what pruned_network(net, summary) rebuilds
    mean_network = net.posterior_mean_network()

    def test_error(module: torch.nn.Module) -> float | None:
        return None if test is None else error(module, *test, net.observation)

    summary = {
        "layers": _layer_rows(layers, precision, variance, fold),
        "architecture": "-".join(str(layer.groups_kept) for layer in layers),
        "weights_kept_fraction": rates["weights_kept_fraction"],
        "cr_prune": rates["cr_prune"],
        "cr_fast": rates["cr_fast"],
        "cr_file": original_bytes / file_bytes,
        "file_bytes": file_bytes,
        "original_bytes": original_bytes,
        "error_posterior_mean": test_error(mean_network),
        "error_pruned": test_error(pruned_only),
        "error_compressed": test_error(loaded),
        "val_error_compressed": val_error(loaded),
        "error_measure": net.observation.error_name,
        "exponent_bits_official": precision.exponent_bits_official if math.isfinite(
            precision.exponent_bits_official) else None,
        "cr_fast_official_exponent": rates["cr_fast_official_exponent"],
        "threshold_method": method,
        "threshold_rule": rule.record(),
        "bits_rule": bits_rule.record(),
        "fold_pruned_inputs": fold,
        "deterministic_modules": deterministic,
        "deterministic_precision": deterministic_precision,
        "model": info["model"],
        "prior": info["prior"],
    }
    add_macs(summary, mean_network, loaded, net.input_shape, _layer_modules(loaded, model, net),
             [mean_network.get_submodule(name) for name in net.layer_names], net.input_dtype)
    if keep_variance:
        summary["file_bytes_without_variance"] = len(codec.encode(dataclasses.replace(model, variances=None)))
        summary["cr_file_without_variance"] = original_bytes / summary["file_bytes_without_variance"]
    if predictive_samples is not None and test is not None:  # calibration before and after compression
        bayesian = codec.load(out, bayesian=True) if keep_variance else None
        summary["predictive"] = predictive_summary(net, loaded, test, bayesian, samples=predictive_samples)
    atomic_write_text(out.with_suffix(".json"), summary_json(summary))
    return summary


def folds_by_default(net: BayesianNet) -> bool:
    """Whether compression folds ``net``'s pruned inputs into the biases unless told: where every layer's prior
    leaves its pruned groups a mean worth keeping (gnj, ghs; not lu)."""
    return all(layer.prior.folds_pruned_inputs for layer in net.layers)


def _pruned_layers(net: BayesianNet, graph: BodyGraph, rule: ThresholdRule,
                   val: tuple[torch.Tensor, torch.Tensor] | None,
                   fold_x: torch.Tensor | None) -> tuple[list[PrunedLayer], list[float]]:
    """``net``'s layers pruned at the thresholds ``rule`` chooses on the validation examples ``val`` (None: none),
    with the fold of pruned inputs measured on ``fold_x`` (None: no fold); ConfigError where a layer would keep no
    weight."""
    posts = analyse_network(net, analyse(net), graph)  # BatchNorm folded in
    means = layer_input_means(net, fold_x) if fold_x is not None else None
    thresholds = rule.thresholds(ThresholdInputs(net, posts, *(val or (None, None)), means, graph))
    layers = prune_network(net, posts, thresholds, means, graph)
    empty = [layer.post.name for layer in layers if layer.empty]
    if empty:
        raise ConfigError(f"the thresholds {thresholds} leave {', '.join(empty)} no weight (a .bcz cannot store an "
                          "empty layer): raise their thresholds")
    return layers, thresholds


def _layer_rows(layers: list[PrunedLayer], precision: Precision, variance: Precision, fold: bool) -> list[dict]:
    """``MODEL.json``'s row per layer: groups and weights kept, bits, threshold, kept groups, fold."""
    return [{
        "name": layer.post.name, "groups_total": layer.post.n_groups, "groups_kept": layer.groups_kept,
        "weights_total": layer.mask.numel(), "weights_kept": int(layer.mask.sum()), "bits": precision.bits(i),
        "exponent_bits": precision.exponent_bits, "mantissa_bits": precision.mantissa_bits[i],
        "mantissa_bits_variance_rule": variance.mantissa_bits[i], "threshold": layer.threshold,
        "kept_groups": torch.nonzero(layer.keep_groups).flatten().tolist(), "fold": fold_state(layer.post, fold),
    } for i, layer in enumerate(layers)]


def choose_deterministic_precision(model: CompressedModel, error: Callable[[CompressedModel], float]) -> dict | None:
    """The precision of the deterministic modules' tensors (all together): ``float16`` where the validation error
    (``error``, of a compressed model) with them rounded to float16
    (:func:`~pyro_bc.bcz.codec.half_deterministic`) is not above the error with them at float32 (up to
    :data:`~pyro_bc.compression.bits.TOLERANCE`, as the bits rule compares), else ``float32``; both errors are
    recorded. None for a model without deterministic modules."""
    if not any(isinstance(item, DETERMINISTIC) for item in model.items):
        return None
    errors = {"float32": error(model), "float16": error(codec.half_deterministic(model))}
    chosen = "float16" if errors["float16"] <= errors["float32"] + TOLERANCE else "float32"
    return {"chosen": chosen, "val_error_float32": errors["float32"], "val_error_float16": errors["float16"]}


def deterministic_modules(model: CompressedModel, graph: BodyGraph) -> list[dict]:
    """``MODEL.json``'s row for each deterministic node of ``model`` (the network's modules that are not Bayesian,
    :attr:`BodyGraph.modules` by name): its module's class, how it is stored, its parameters in the network and the
    values the file stores, and their precision (``float16`` where every one is a float16 value)."""
    rows = []
    outside = iter(node for node in graph.nodes if node.program is not None)
    for item in (i for i in model.items if isinstance(i, DETERMINISTIC)):
        if isinstance(item, ProgramNode):  # an op outside the registry: named by its module path and what it calls
            tensors = [c for c in item.program.constants if c.dtype == np.float32]
            row = {"name": item.name, "module": next(outside).what,
                   "stored_as": f"core-ATen program ({len(item.program.nodes)} operators)",
                   "parameters_original": sum(c.size for c in tensors)}
        else:
            module = graph.modules[item.name]
            batchnorm = isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
            tensors = [t for t in (item.weight, item.bias) if t is not None]
            row = {"name": item.name, "module": type(module).__name__,
                   "stored_as": "depthwise 1x1 conv2d (scale, shift per kept channel)" if batchnorm else
                   item.kind if isinstance(item, FloatLayer) else "layer_norm",
                   "parameters_original": sum(p.numel() for p in module.parameters())}
        rows.append({**row, "parameters": sum(t.size for t in tensors),
                     "precision": None if not tensors else
                     "float16" if all(float16_exact(t) for t in tensors) else "float32"})
    return rows


def _layer_modules(loaded: torch.nn.Module, model: codec.CompressedModel, net: BayesianNet) -> list[torch.nn.Module]:
    """The modules of ``loaded`` (``model``'s network) that compute ``net``'s Bayesian layers (not the standalone
    BatchNorm it also stores as convolutions)."""
    names = set(net.layer_names)
    nodes = list(loaded.nodes if isinstance(loaded, Graph) else loaded)
    return [module for module, item in zip(nodes, model.items)
            if isinstance(item, codec.QuantizedLayer) and item.name in names]


def summary_json(summary: dict) -> str:
    """``MODEL.json``'s text: indented, with each layer's ``kept_groups`` on one line."""
    text = json.dumps(summary, indent=2)
    return re.sub(r'("kept_groups": )(\[[\d,\s]*\])', lambda m: m[1] + json.dumps(json.loads(m[2])), text) + "\n"


def format_table(summary: dict) -> str:
    """The per-layer table and the rates, as printed by ``pyro-bc compress``."""
    rows = [(f"{'layer':<10} {'groups kept':>12} {'weights kept':>16} {'bits':>5} {'(e+m)':>6} {'threshold':>9} "
             f"{'MACs kept':>19}")]
    for layer in summary["layers"]:
        rows.append(f"{layer['name']:<10} {layer['groups_kept']:>5}/{layer['groups_total']:<6} "
                    f"{layer['weights_kept']:>7}/{layer['weights_total']:<8} {layer['bits']:>5} "
                    f"{layer['exponent_bits']:>2}+{layer['mantissa_bits']:<3} {layer['threshold']:>9.2f} "
                    f"{layer['macs_compressed']:>9}/{layer['macs_original']}")
    rows.append(f"architecture {summary['architecture']}, {100 * summary['weights_kept_fraction']:.2f}% of weights "
                f"kept; cr_prune {summary['cr_prune']:.1f}, cr_fast {summary['cr_fast']:.1f}, "
                f"cr_file {summary['cr_file']:.1f} ({summary['file_bytes']} of {summary['original_bytes']} bytes)")
    bits_rule = summary.get("bits_rule", {"name": "variance"})
    if bits_rule["name"] != "variance":
        rows.append(f"mantissa bits by the {bits_rule['name']} rule {bits_rule.get('settings', {})}: "
                    f"{'-'.join(str(la['mantissa_bits']) for la in summary['layers'])} (variance rule: "
                    f"{'-'.join(str(la['mantissa_bits_variance_rule']) for la in summary['layers'])})")
    if summary.get("deterministic_modules"):
        rows.append("deterministic: " + ", ".join(
            f"{row['name']} ({row['module']}, " + (f"{row['parameters']} values at {row['precision']})"
                                                   if row["parameters"] else "no parameters)")
            for row in summary["deterministic_modules"]))
    rows.append(f"MACs per example: {summary['macs_compressed']:,} of {summary['macs_original']:,} "
                f"({summary['macs_original'] / summary['macs_compressed']:.1f}x fewer)")
    if summary["error_compressed"] is not None:  # None: compressed without test examples
        measure = summary.get("error_measure", "error")

        def shown(value: float) -> str:
            return f"{value:.2f}%" if measure == "error" else f"{value:.4g}"
        rows.append(f"test {measure}: posterior mean {shown(summary['error_posterior_mean'])}, pruned "
                    f"{shown(summary['error_pruned'])}, compressed {shown(summary['error_compressed'])}"
                    + ("" if summary["val_error_compressed"] is None else
                       f" (validation {shown(summary['val_error_compressed'])})"))
    return "\n".join(rows)


