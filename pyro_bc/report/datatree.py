"""The fitted guide as an ArviZ 1.x ``xarray.DataTree``: group scales, log alpha and a weight sample.

Variables, for every Bayesian layer ``L`` (its site name with dots replaced by underscores), all with
leading ``(chain, draw)`` dimensions (one chain):

``posterior`` group
    ``L_z``          draws of the group scales ``z`` from the guide (``gnj``: ``Normal(z_mu, z_sd)``;
                     ``ghs``: ``z = sqrt(s_a s_b z_a z_b)`` with log-normal factors). Not for ``lu``.
    ``L_tau``        ``ghs`` only: draws of the layer's global scale ``sqrt(s_a s_b)`` (no group dim).
    ``L_log_alpha``  log dropout rate per group, a deterministic function of the guide's parameters,
                     repeated over the draws. For ``lu`` (one alpha per weight) it is the **median**
                     log alpha of the weights of each group (input neuron / output channel).
    ``L_w``          draws of the marginal weights ``w = z w~`` of the first <= 16 groups x the first
                     <= 16 outputs (linear: output units; conv: flattened filter positions), dims
                     ``(L_w_group, L_w_unit)``: a small sample, to keep the tree small.

``prior`` group (``ghs`` layers only)
    ``L_z`` and ``L_tau`` drawn from the model's prior sites: ``s_a ~ Gamma(1/2, tau0^-2)``,
    ``s_b ~ InvGamma(1/2, 1)`` (so ``tau = sqrt(s_a s_b) ~ tau0 |Cauchy|``), ``z_a ~ Gamma(1/2, 1)``,
    ``z_b ~ InvGamma(1/2, 1)`` (so ``z = tau |Cauchy|``). The log-uniform priors of ``gnj`` and ``lu``
    are improper: they cannot be drawn from, and the root attributes say so.

The group dimension of a layer is ``L_group`` for linear layers (input neurons) and ``L_channel`` for
convolutions (output channels), with one integer coordinate per group.

:func:`predictions_datatree` (and :func:`with_predictions`, which adds it to a tree) holds the predictions:

``predictions`` group
    ``class_probs``  draws of the class probabilities of a fixed subset of test examples, dims ``(example, class)``:
                     one posterior draw each (the local reparameterisation, :func:`pyro_bc.metrics.predict.predictive` with
                     one sample and seed ``seed + draw``), so ArviZ's summaries and plots apply to them.
``predictions_constant_data`` group
    ``label``        the examples' labels; ``example_index`` their indices in the test set.
"""

from __future__ import annotations

import os
from pathlib import Path

import arviz as az
import numpy as np
import torch
import xarray as xr

from pyro_bc.metrics.predict import predictive
from pyro_bc.nn.layers import BayesLayer
from pyro_bc.nn.network import BayesianNet

MAX_W_GROUPS = 16
MAX_W_UNITS = 16


def var_prefix(layer: BayesLayer) -> str:
    """The variable-name prefix of a layer: its site name with dots replaced by underscores."""
    return layer.site.replace(".", "_")


def group_dim(layer: BayesLayer) -> str:
    """``<L>_channel`` for convolutions (output channels), ``<L>_group`` for linear layers (inputs)."""
    return f"{var_prefix(layer)}_{'channel' if layer.kind.is_conv else 'group'}"


def group_log_alpha(layer: BayesLayer) -> torch.Tensor:
    """Log alpha per group; for ``lu`` the median over each group's weights."""
    la = layer.log_alpha().detach().double()
    if la.shape == layer.weight_mu.shape:
        la = la.transpose(0, layer.group_axis).reshape(layer.n_groups, -1).median(dim=1).values
    return la


def _weight_sample(layer: BayesLayer, z: torch.Tensor | None, n: int, gen: torch.Generator) -> torch.Tensor:
    """Draws ``(n, g, u)`` of ``w = z w~`` for the first groups x units."""
    mu, sd = layer.weight_mu.detach().double(), (0.5 * layer.weight_logvar.detach().double()).exp()
    if layer.group_axis == 1:  # linear (out, in): groups are columns
        take = (slice(0, MAX_W_UNITS), slice(0, MAX_W_GROUPS))
        mu, sd = mu[take].T, sd[take].T
    else:  # conv (out, in, kh, kw): groups are output channels, units the flattened filter
        mu = mu[:MAX_W_GROUPS].reshape(min(MAX_W_GROUPS, mu.shape[0]), -1)[:, :MAX_W_UNITS]
        sd = sd[:MAX_W_GROUPS].reshape(min(MAX_W_GROUPS, sd.shape[0]), -1)[:, :MAX_W_UNITS]
    w = mu + sd * torch.randn((n,) + tuple(mu.shape), generator=gen, dtype=torch.float64)
    if z is not None:
        w = w * z[:, : mu.shape[0], None]
    return w


@torch.no_grad()
def to_datatree(net: BayesianNet, num_samples: int = 200, seed: int = 0) -> xr.DataTree:
    """Draws from the guide (and, for ``ghs``, the prior) of every layer as an ArviZ DataTree."""
    gen = torch.Generator().manual_seed(seed)
    posterior, prior, dims, coords = {}, {}, {}, {}
    improper = []

    def put(group: dict, name: str, value: torch.Tensor, var_dims: list[str]) -> None:
        group[name] = value.float().numpy()[None]  # one chain
        dims[name] = var_dims

    for layer in net.layers:
        name, gdim = var_prefix(layer), group_dim(layer)
        coords[gdim] = np.arange(layer.n_groups)
        draws = layer.prior.posterior_draws(num_samples, gen)
        z = draws.get("z")
        for var, value in draws.items():
            put(posterior, f"{name}_{var}", value, [gdim] if var == "z" else [])
        la = group_log_alpha(layer)
        put(posterior, f"{name}_log_alpha", la.expand(num_samples, -1), [gdim])
        w = _weight_sample(layer, z, num_samples, gen)
        wg, wu = f"{name}_w_group", f"{name}_w_unit"
        coords[wg], coords[wu] = np.arange(w.shape[1]), np.arange(w.shape[2])
        put(posterior, f"{name}_w", w, [wg, wu])
        prior_draws = layer.prior.prior_draws(num_samples, gen)
        for var, value in prior_draws.items():
            put(prior, f"{name}_{var}", value, [gdim] if var == "z" else [])
        if not prior_draws:
            improper.append(name)
    data = {"posterior": posterior}
    if prior:
        data["prior"] = prior
    dt = az.from_dict(data, dims=dims, coords=coords)
    dt.attrs.update({
        "layers": ",".join(var_prefix(layer) for layer in net.layers),
        "priors": ",".join(layer.prior.name for layer in net.layers),
        "kinds": ",".join(layer.kind.name for layer in net.layers),
        "group_dims": ",".join(group_dim(layer) for layer in net.layers),
        "num_samples": num_samples,
        "seed": seed,
        "input_shape": list(net.input_shape),
        "improper_prior_layers": ",".join(improper),
        "note": "gnj and lu layers have a log-uniform prior, which is improper: no prior draws. "
                "For lu, <L>_log_alpha is the median per-weight log alpha of each group and there is no <L>_z. "
                "<L>_w holds draws of w = z w~ for the first <=16 groups x <=16 units only.",
    })
    return dt


PREDICTION_EXAMPLES = 100  # the first examples of the test set whose predictions the tree holds


@torch.no_grad()
def predictions_datatree(source, x: torch.Tensor, y: torch.Tensor, num_samples: int = 100, seed: int = 0,
                         n_examples: int = PREDICTION_EXAMPLES) -> xr.DataTree:
    """``num_samples`` draws of the class probabilities of the first ``n_examples`` examples of ``x`` as the
    ``predictions`` and ``predictions_constant_data`` groups (``source``: a network, as :func:`pyro_bc.metrics.predict.predictive` takes).
    A network labelling each position (token, pixel) adds dimensions ``position_0``, ``position_1``, ... to both."""
    x, y = x[:n_examples], y[:n_examples]
    draws = torch.stack([predictive(source, x, samples=1, seed=seed + i).cpu() for i in range(num_samples)])
    n, positions, classes = draws.shape[1], draws.shape[2:-1], draws.shape[-1]
    labelled = ["example", *(f"position_{i}" for i in range(len(positions)))]  # a label per token or pixel
    return az.from_dict({"predictions": {"class_probs": draws.numpy()[None]},
                         "predictions_constant_data": {"label": y.numpy(), "example_index": np.arange(n)}},
                        pred_dims={"class_probs": [*labelled, "class"], "label": labelled,
                                   "example_index": ["example"]},
                        pred_coords={"example": np.arange(n), "class": np.arange(classes),
                                     **{name: np.arange(size) for name, size in zip(labelled[1:], positions)}})


def with_predictions(dt: xr.DataTree, source, x: torch.Tensor, y: torch.Tensor, num_samples: int = 100,
                     seed: int = 0) -> xr.DataTree:
    """A copy of ``dt`` with the groups of :func:`predictions_datatree`."""
    out = dt.copy()
    predictions = predictions_datatree(source, x, y, num_samples, seed)
    for group in ("predictions", "predictions_constant_data"):
        out[group] = predictions[group]
    return out


def save_datatree(dt: xr.DataTree, path: str | Path) -> Path:
    """Write ``dt`` as NetCDF-4 (h5netcdf, which needs h5py); returns the path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        dt.to_netcdf(tmp, engine="h5netcdf")
        os.replace(tmp, path)  # readers never see a half-written file
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_datatree(path: str | Path) -> xr.DataTree:
    """Read a tree written by :func:`save_datatree` fully into memory."""
    with xr.open_datatree(path, engine="h5netcdf") as dt:
        return dt.load()
