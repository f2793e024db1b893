"""The kept weights' posterior variances from a fitted guide, quantised for a ``.bcz`` file that keeps them
(:func:`compressed_variances`); :mod:`pyro_bc.bcz.bayesian` reads them back as a network that draws.

A kept weight is ``w = z' w'`` with ``w' ~ N(m, c)`` per weight (``m`` the file's weight, ``c`` its variance given the
group scale) and ``z' = z / E[z] ~ N(1, r)`` per group (``r = Var[z] / E[z]^2``): the same mean and variance as the
guide's ``w = z w~`` (``Var[w] = c (1 + r) + r m^2``), and for ``gnj``, whose ``z`` is normal, the same distribution;
for ``ghs`` and ``rhs`` the log-normal ``z`` is replaced by the normal of its moments. Biases keep their means, and
a weight pruned on its own (``lu``) stays zero.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pyro_bc.bcz.bayesian import LOG_VARIANCE_RANGE
from pyro_bc.bcz.model import CompressedModel, LayerVariance, QuantizedLayer, Variances
from pyro_bc.compression.posterior import PrunedLayer
from pyro_bc.nn.network import BayesianNet

#: Log-variances are stored in steps of 2**-STEP_BITS nats: a decoded standard deviation is within a factor
#: exp(step / 4) (about 1.13) of the guide's.
STEP_BITS = 1


def _codes(log_variance: torch.Tensor, step_bits: int) -> np.ndarray:
    clamped = log_variance.double().clamp(*LOG_VARIANCE_RANGE)
    return torch.round(clamped * 2.0**step_bits).long().numpy()


@torch.no_grad()
def compressed_variances(net: BayesianNet, layers: list[PrunedLayer], model: CompressedModel,
                         step_bits: int = STEP_BITS) -> Variances:
    """The variances of ``model``'s kept weights (and group scales) under ``net``'s guide; ``layers``: the pruning
    that made ``model`` (matched to its layer nodes by name). A layer node that is no Bayesian layer gets the
    smallest variance, ``exp(-100)``: deterministic in effect."""
    by_name = {layer.post.name: layer for layer in layers}
    bayes = {layer.site: layer for layer in net.layers}
    out = []
    for item in (i for i in model.items if isinstance(i, QuantizedLayer)):
        if item.name not in by_name or item.name not in bayes:  # not a Bayesian layer (e.g. a BatchNorm kept alone)
            deterministic = np.full(int(np.count_nonzero(item.weight_codes)), LOG_VARIANCE_RANGE[0])
            out.append(LayerVariance(_codes(torch.from_numpy(deterministic), step_bits), None, False))
            continue
        pruned, layer = by_name[item.name], bayes[item.name]
        post = pruned.post
        moments = layer.prior.scale_moments()
        shape = [1] * post.mean.dim()
        shape[post.group_axis] = -1
        if moments is None:
            r = torch.zeros(post.n_groups, dtype=torch.float64)
        else:
            r = (moments[1].double() / moments[0].double() ** 2).cpu()
        r_w = r.reshape(shape)
        conditional = (post.var.double() - r_w * post.mean.double() ** 2) / (1 + r_w)  # c from Var[w] = c(1+r) + r m^2
        conditional = conditional.clamp_min(math.exp(LOG_VARIANCE_RANGE[0]))[pruned.keep_out]
        if conditional.shape[1:] != item.weight_codes.shape[1:]:  # not depthwise: only the kept inputs
            conditional = conditional[:, pruned.keep_in]
        mask = pruned.mask[pruned.keep_out]
        mask = mask if mask.shape[1:] == item.weight_codes.shape[1:] else mask[:, pruned.keep_in]
        every = bool(mask.all())  # else pruned weight by weight: the zero codes are the pruned weights
        chosen = conditional.log() if every else conditional.log()[torch.from_numpy(np.asarray(item.weight_codes) != 0)]
        weight = _codes(chosen.flatten(), step_bits)
        scale = None
        if moments is not None:
            kept = pruned.keep_in if post.group_axis == 1 else pruned.keep_out
            scale = _codes(r[kept].clamp_min(math.exp(LOG_VARIANCE_RANGE[0])).log(), step_bits)
        out.append(LayerVariance(weight, scale, every))
    return Variances(step_bits, out)


