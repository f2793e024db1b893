"""Pyro's own SVI loop trains pyro-bc networks, step for step like the project's training loop."""

import pyro
import pyro.optim
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO

from models import build_network
from pyro_bc.infer.elbo import MeanFieldELBO
from pyro_bc.infer.reparam import LocalReparameterization
from pyro_bc.priors import known_options
from pyro_bc.train.loop import NegativeELBO, make_optimizer, svi_step

N_DATA = 1000


def _batch():
    g = torch.Generator().manual_seed(5)
    return torch.randn(32, 1, 28, 28, generator=g), torch.randint(0, 10, (32,), generator=g)


def _twins(model: str, prior: str):
    pyro.set_rng_seed(0)
    a = build_network(model, prior, **known_options(prior, {"tau0": 1e-2}))
    pyro.set_rng_seed(0)
    b = build_network(model, prior, **known_options(prior, {"tau0": 1e-2}))
    return a, b


@pytest.mark.parametrize("elbo", [TraceMeanField_ELBO, MeanFieldELBO])
@pytest.mark.parametrize("model,prior", [("lenet300", "gnj"), ("lenet300", "ghs"), ("lenet300", "lu"),
                                         ("lenet300", "rhs"), ("lenet5", "gnj")])
def test_one_pyro_svi_step_equals_one_step_of_the_training_loop(model, prior, elbo):
    x, y = _batch()
    ours, theirs = _twins(model, prior)
    pyro.clear_param_store()

    pyro.set_rng_seed(1)
    svi_step(NegativeELBO(ours), make_optimizer(ours, 1e-3), ours, x, y, N_DATA)

    # Pyro's loop, with the loss scaled to -ELBO / N as the project's loop is
    svi = SVI(poutine.scale(theirs.model, scale=1 / N_DATA), poutine.scale(theirs.guide, scale=1 / N_DATA),
              pyro.optim.Adam({"lr": 1e-3}), loss=elbo())
    pyro.set_rng_seed(1)
    with LocalReparameterization():
        svi.step(x, y, N_DATA)
    theirs.clip_variances()

    mine, other = dict(ours.named_parameters()), dict(theirs.named_parameters())
    moved = 0
    for name, value in mine.items():
        torch.testing.assert_close(other[name], value, rtol=1e-5, atol=1e-6, msg=name)
        moved += not torch.equal(value, _twins(model, prior)[0].state_dict()[name])
    assert moved == len(mine)  # every parameter took its step


def test_the_plain_pyro_loop_trains_every_parameter():
    """The loop a Pyro user writes first: no scaling, no handler (explicit weight sampling), Trace_ELBO."""
    x, y = _batch()
    pyro.set_rng_seed(0)
    net = build_network("lenet300", "gnj")
    start = {k: v.detach().clone() for k, v in net.named_parameters()}
    pyro.clear_param_store()
    svi = SVI(net.model, net.guide, pyro.optim.Adam({"lr": 1e-2}), loss=Trace_ELBO())
    losses = [svi.step(x, y, 256) for _ in range(30)]
    assert all(not torch.equal(p, start[k]) for k, p in net.named_parameters())
    assert sum(losses[-5:]) < sum(losses[:5])
    store = pyro.get_param_store()
    assert all(store.get_param(f"bc$$${k}") is p for k, p in net.named_parameters())
