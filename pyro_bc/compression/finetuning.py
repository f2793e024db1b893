"""Fine-tuning after pruning: SVI goes on over the kept weights of a compressed network, the pruned ones held at zero.

The compression's decision (its thresholds, and the fold of pruned inputs into the biases) becomes masks
(:func:`pruning_masks`): a weight-shaped mask of the kept weights and a mask of the kept outputs (biases) per layer.
:func:`apply_pruning` starts the network at the pruned network ``error_pruned`` measures (pruned means zero, the
fold in the biases); :class:`PruningMask`, an effect handler, then gives the guide's ``L.w`` and ``L.b`` sites the
masked distributions (:class:`MaskedNormalLogVar`): a pruned weight has mean 0 and variance 0, so that it adds
nothing to the local reparameterisation's draws, and its KL leaves the ELBO. The pruned entries' parameters get no
gradient, so Adam leaves them exactly where :func:`apply_pruning` put them (zero means) through any number of steps
and resumes. The group scales keep their sites and KL terms: a pruned group's scale multiplies only zero weights.
BatchNorm keeps its running statistics (:func:`freeze_batchnorm`): compression folds it with them, so the network
fine-tuned is the one compression keeps.

The training loop is :func:`pyro_bc.train.loop.run_training`'s, with the handler; ``RUN_DIR/finetune.pt`` keeps the masks
and the record (source run, thresholds, kept groups) that ``config.json``, ``MODEL.json`` and the report repeat.
"""

from __future__ import annotations

import dataclasses
import io
import json
import warnings
from pathlib import Path

import torch
from pyro.poutine.messenger import Messenger
from torch import nn
from torch.distributions import Normal as TorchNormal
from torch.distributions import register_kl
from torch.utils.hooks import RemovableHandle

from pyro_bc.atomic import atomic_write_bytes
from pyro_bc.compression.graph import BodyGraph, analyse_network
from pyro_bc.compression.posterior import PrunedLayer, analyse, kept_by_threshold
from pyro_bc.compression.pruned import summary_pruning
from pyro_bc.data.datasets import as_split
from pyro_bc.errors import CheckpointError, ConfigError
from pyro_bc.infer.distributions import LogUniform, NormalLogVar, kl_normal_log_uniform, kl_normal_logvar_normal
from pyro_bc.nn.network import BayesianNet
from pyro_bc.train.run_dir import CHECKPOINT, FINETUNE_FILE, prepare_run_dir

__all__ = ["MASKED_LOGVAR", "LayerMask", "MaskedNormalLogVar", "PruningMask", "apply_pruning", "check_masks",
           "finetune", "finetune_record", "freeze_batchnorm", "load_masks", "pruning_masks"]

#: Log-variance the guide gives a pruned weight: ``exp`` of it is exactly 0 in float32 and float64.
MASKED_LOGVAR = -1.0e4


@dataclasses.dataclass
class LayerMask:
    """One layer's part of a compression decision: ``site`` the layer's name, ``weight`` (bool, weight-shaped)
    the kept weights, ``bias`` (bool per output) the kept outputs, ``own`` (bool per group, or per weight for
    ``lu``) what the layer's own threshold kept (its neighbours may prune more), which
    :class:`~pyro_bc.compression.thresholds.KeptStructure` reproduces."""

    site: str
    weight: torch.Tensor
    bias: torch.Tensor
    own: torch.Tensor

    def state(self) -> dict:
        return {"weight": self.weight, "bias": self.bias, "own": self.own}


class MaskedNormalLogVar(NormalLogVar):
    """``N(mu, exp(logvar))`` on the kept entries (``keep``), a point mass at 0 elsewhere (with ``zero_variance``;
    else mean 0 and the entry's own variance: a pruned output's bias, whose value nothing downstream reads).

    Its KL against ``N(0, 1)`` (what the ELBO takes as :attr:`standard_normal_kl`) and against the log-uniform prior
    sum the kept entries only; the fused op's sum over all entries, which it would set, is ignored.
    """

    def __init__(self, loc: torch.Tensor, logvar: torch.Tensor, keep: torch.Tensor, zero_variance: bool = True,
                 validate_args: bool | None = None):
        self.keep, self.raw_loc, self.raw_logvar = keep, loc, logvar
        zero = loc.new_zeros(())
        masked_logvar = torch.where(keep, logvar, logvar.new_full((), MASKED_LOGVAR)) if zero_variance else logvar
        super().__init__(torch.where(keep, loc, zero), masked_logvar, validate_args=validate_args)

    @property
    def standard_normal_kl(self) -> torch.Tensor:
        """The sum over the kept entries of ``KL(N(mu, exp(logvar)) || N(0, 1))``, each
        ``(exp(logvar) + mu^2 - 1 - logvar) / 2``."""
        kl = 0.5 * (self.raw_logvar.exp() + self.raw_loc.pow(2) - 1.0 - self.raw_logvar)
        return torch.where(self.keep, kl, kl.new_zeros(())).sum()

    @standard_normal_kl.setter
    def standard_normal_kl(self, value: torch.Tensor) -> None:
        pass  # the fused op's sum includes the pruned entries

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """The kept entries' Normal log density; 0 at the pruned ones (a point mass, which only the kept entries'
        terms of a Monte Carlo ELBO could ever involve)."""
        lp = NormalLogVar(self.raw_loc, self.raw_logvar).log_prob(value)
        return torch.where(self.keep, lp, lp.new_zeros(()))


@register_kl(MaskedNormalLogVar, LogUniform)
def _kl_masked_log_uniform(p: MaskedNormalLogVar, q: LogUniform) -> torch.Tensor:
    kl = kl_normal_log_uniform(NormalLogVar(p.raw_loc, p.raw_logvar), q)
    return torch.where(p.keep, kl, kl.new_zeros(()))


@register_kl(MaskedNormalLogVar, TorchNormal)
def _kl_masked_normal(p: MaskedNormalLogVar, q: TorchNormal) -> torch.Tensor:
    """The kept entries' KL against a normal prior, zero at the pruned ones: what Pyro's own ELBO (with validation
    on) takes, the same sum as :attr:`MaskedNormalLogVar.standard_normal_kl` against ``N(0, 1)``."""
    kl = kl_normal_logvar_normal(NormalLogVar(p.raw_loc, p.raw_logvar), q)
    return torch.where(p.keep, kl, kl.new_zeros(()))


class PruningMask(Messenger):
    """Effect handler: the guide's weight and bias sites of the masked layers (``masks``: one
    :class:`LayerMask` per layer) become :class:`MaskedNormalLogVar` s. Apply it inside
    :class:`~pyro_bc.infer.reparam.LocalReparameterization` (entered after it), around the model and the guide."""

    def __init__(self, masks: list[LayerMask]):
        super().__init__()
        self.sites: dict[str, list] = {}  # site -> [keep mask, whether pruned entries get variance 0]
        for mask in masks:
            self.sites[f"{mask.site}.w"] = [mask.weight, True]
            self.sites[f"{mask.site}.b"] = [mask.bias, False]

    def _pyro_sample(self, msg) -> None:
        hit = self.sites.get(msg["name"])
        if hit is None or msg["is_observed"] or msg["value"] is not None:  # the model's replayed site has a value
            return
        fn, dims = msg["fn"], 0
        while isinstance(fn, torch.distributions.Independent):
            dims, fn = dims + fn.reinterpreted_batch_ndims, fn.base_dist
        if not isinstance(fn, NormalLogVar):
            raise ConfigError(f"site {msg['name']}: fine-tuning masks NormalLogVar guides, got {type(fn).__name__}")
        keep, zero_variance = hit
        if keep.device != fn.loc.device:  # moved once, on the first step on a device
            keep = self.sites[msg["name"]][0] = keep.to(fn.loc.device)
        masked = MaskedNormalLogVar(fn.loc, fn.logvar, keep, zero_variance)
        msg["fn"] = masked.to_event(dims) if dims else masked


def pruning_masks(layers: list[PrunedLayer]) -> list[LayerMask]:
    """The masks of a compression decision (:func:`pyro_bc.compression.pruned.summary_pruning`'s layers)."""
    return [LayerMask(layer.post.name, layer.mask.clone(), layer.keep_out.clone(),
                      kept_by_threshold(layer.post, layer.threshold).clone()) for layer in layers]


@torch.no_grad()
def apply_pruning(net: BayesianNet, layers: list[PrunedLayer], graph: BodyGraph) -> None:
    """Start ``net`` at its pruned network: pruned weight means zero; each kept output's bias the decision's
    (the fold of pruned inputs included, where ``z`` scales the outputs divided by ``E[z]``), pruned outputs' zero.

    A layer followed by BatchNorm (``graph.batchnorm_names``) keeps its bias means; the BatchNorm's shift takes
    what its folded bias lacks, so that with the running statistics the pair computes the decision's bias
    (pruned outputs: zero). Run fine-tuning with :func:`freeze_batchnorm`, which keeps those statistics."""
    followed = {i: net.body.get_submodule(name) for i, name in graph.batchnorm_names.items()}
    for i, (layer, pruned) in enumerate(zip(net.layers, layers)):
        layer.weight_mu.masked_fill_(~pruned.mask.to(layer.weight_mu.device), 0.0)
        keep_out = pruned.keep_out.to(layer.weight_mu.device)
        if i in followed:
            if layer.bias_mu is not None:
                layer.bias_mu.masked_fill_(~keep_out, 0.0)
            continue
        if layer.bias_mu is None:
            if bool((pruned.post.bias != 0).any()):
                warnings.warn(f"{layer.site} has no bias: the fold of its pruned inputs is not carried into "
                              "fine-tuning", stacklevel=2)
            continue
        target = pruned.post.bias.to(layer.bias_mu)
        moments = layer.prior.scale_moments()
        if not layer.op.scales_input and moments is not None:
            target = target / moments[0].detach()
        layer.bias_mu.copy_(torch.where(keep_out, target, torch.zeros((), dtype=target.dtype)))
    if followed:
        folded = analyse_network(net, analyse(net), graph)  # the biases as compression folds them now
        for i, norm in followed.items():
            target = torch.where(layers[i].keep_out, layers[i].post.bias.double(), 0.0)
            missing = target - folded[i].bias.double()
            if norm.bias is None:
                if bool((missing.abs() > 1e-6).any()):
                    warnings.warn(f"{graph.batchnorm_names[i]} has no shift: the fold of {net.layers[i].site}'s "
                                  "pruned inputs is not carried into fine-tuning", stacklevel=2)
                continue
            norm.bias.add_(missing.to(norm.bias))


def _in_eval_mode(module: nn.Module, args) -> None:
    module.train(False)


def freeze_batchnorm(net: BayesianNet) -> list[RemovableHandle]:
    """Every BatchNorm of ``net`` normalises by its running statistics and leaves them as they are, in training mode
    too (a forward pre-hook puts it in eval mode before each call); its scale and shift still train. Fine-tuning
    then trains the function that compression keeps, which folds BatchNorm with those statistics. Returns the
    hooks' handles (``handle.remove()`` lets the modules follow ``train()`` again)."""
    return [module.register_forward_pre_hook(_in_eval_mode) for module in net.modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm)]


def save_masks(path: Path, masks: list[LayerMask], record: dict) -> None:
    """``RUN_DIR/finetune.pt``: the masks and the record, atomically."""
    buffer = io.BytesIO()
    torch.save({"masks": [m.state() for m in masks], "sites": [m.site for m in masks], "record": json.dumps(record)},
               buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_masks(run_dir: str | Path) -> tuple[list[LayerMask], dict]:
    """The masks and the record of the fine-tuning run ``run_dir``; CheckpointError if it has none."""
    path = Path(run_dir) / FINETUNE_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: no fine-tuning masks (is {run_dir} a run of pyro-bc finetune?)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        return ([LayerMask(site, **m) for site, m in zip(state["sites"], state["masks"])],
                json.loads(state["record"]))
    except Exception as e:  # noqa: BLE001  (any corruption is reported the same way)
        raise CheckpointError(f"{path}: not readable fine-tuning masks ({type(e).__name__})")


def finetune_record(source: str, summary: dict, epochs: int) -> dict:
    keys = ("architecture", "weights_kept_fraction", "cr_file", "error_pruned", "error_compressed", "threshold_method",
            "fold_pruned_inputs")
    return {"source_run": source, "epochs": epochs, "thresholds": [row["threshold"] for row in summary["layers"]],
            "kept_groups": {row["name"]: row["kept_groups"] for row in summary["layers"]},
            "source_compression": {k: summary.get(k) for k in keys}}


def check_masks(net: BayesianNet, masks: list[LayerMask]) -> None:
    """ConfigError unless ``masks`` name ``net``'s layers, in order, with their weights' shapes."""
    if [m.site for m in masks] != net.layer_names:
        raise ConfigError(f"the masks are of layers {', '.join(m.site for m in masks)}, the network's are "
                          f"{', '.join(net.layer_names)}")
    for layer, mask in zip(net.layers, masks):
        if mask.weight.shape != layer.weight_mu.shape:
            raise ConfigError(f"{layer.site}: mask of shape {tuple(mask.weight.shape)} for weights of shape "
                              f"{tuple(layer.weight_mu.shape)}")


def finetune(net: BayesianNet, summary: dict | None, train, val=None, *, epochs: int, batch_size: int = 128,
             lr: float = 1e-4, out: str | Path | None = None, resume: bool = False, progress: bool = True,
             source: str = "python", **options) -> list[dict]:
    """Fine-tune ``net`` after the compression ``summary`` (``MODEL.json``, or what :func:`pyro_bc.compress`
    returned for ``net``): SVI on the kept weights, the pruned ones fixed at zero, the KL on for the kept weights
    (the pruned weights' KL leaves the ELBO), by :func:`pyro_bc.fit`'s loop, with its options (``lr_schedule``,
    ``warmup_epochs``, ``seed``, ...). Returns every epoch's metrics.

    ``train``, ``val`` as for :func:`pyro_bc.fit`; ``train`` also gives the fold's means where the summary folded.
    The network is changed in place: it starts at the pruned network (:func:`apply_pruning`). With ``out``, the
    run directory also holds ``finetune.pt`` (masks and record, ``source`` naming where the network came from);
    ``resume=True`` continues it exactly (``summary`` is then not needed: the masks are the run's); and
    ``pyro_bc.compress(net, ..., rule=KeptStructure(out))`` compresses it with the structure it was given. The masks
    stay with the network (``net.pruning_masks``): any later compression prunes what they prune.
    BatchNorm computes with its running statistics, unchanged (:func:`freeze_batchnorm`), as compression folds it.
    """
    from pyro_bc.train.loop import fit_with  # on use: compress and the report never load the training loop

    if not isinstance(net, BayesianNet):
        raise ConfigError(f"finetune takes a BayesianNet, got {type(net).__name__}")
    if resume:
        if out is None:
            raise ConfigError("resume needs the run directory (out) to resume from")
        masks, record = load_masks(out)
    else:
        if summary is None:
            raise ConfigError("finetune needs the compression summary whose pruning it keeps (MODEL.json)")
        if out is not None and ((Path(out) / CHECKPOINT).exists() or (Path(out) / FINETUNE_FILE).exists()):
            raise ConfigError(f"{out} already holds a run: give a new output directory, or resume it (resume=True)")
        layers, graph = summary_pruning(net, summary, as_split(train, "train").x)
        masks, record = pruning_masks(layers), finetune_record(source, summary, epochs)
        apply_pruning(net, layers, graph)
        if out is not None:
            save_masks(prepare_run_dir(out) / FINETUNE_FILE, masks, record)
    check_masks(net, masks)
    net.pruning_masks = masks  # compression prunes what they prune, whatever log alpha fine-tuning leaves them
    frozen = freeze_batchnorm(net)
    try:
        return fit_with(net, train, val, epochs=epochs, batch_size=batch_size, lr=lr, out=out, resume=resume,
                        progress=progress, handler=PruningMask(masks),
                        extras={"finetune": {**record, "epochs": epochs}}, **options)
    finally:
        for handle in frozen:
            handle.remove()


