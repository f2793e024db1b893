"""pyro-bc's training step against the libraries a user would pick instead for Bayesian training of a PyTorch
network: bayesian-torch (one weight sample per batch, and Flipout) and TyXe (local reparameterisation).

Run from the repository root, with the extra ``bench`` installed (one thread, nothing else running)::

    .venv/bin/python analysis/bench_peers.py                                    # the full run
    .venv/bin/python analysis/bench_peers.py --networks lenet300 --rounds 3 --no-memory   # a quick look
    .venv/bin/python analysis/bench_peers.py --allocator kept --out analysis/bench_peers_kept.json  # as pyro-bc runs

``--allocator kept`` keeps freed memory in the process (``pyro_bc.allocator``, which the ``pyro-bc`` command
applies to itself), for every method alike: glibc otherwise maps and page-faults large buffers afresh every step.

Each network is built once as a plain PyTorch module (seeded) and every method trains its own copy of it on one
fixed random batch with Adam at learning rate 1e-3, one thread:

- ``dense``: the plain network, cross-entropy, fused Adam (``bench.deterministic_step``);
- ``pyro_bc``: the gnj prior with pyro-bc's default local reparameterisation (``NegativeELBO`` + ``svi_step``,
  ``make_optimizer``); LeNets and VGG are the project's own ``models/``, ResNet-18 is ``pyro_bc.bayesianize``
  of the torchvision network;
- ``bt_reparam`` and ``bt_flipout``: bayesian-torch's README recipe, ``dnn_to_bnn`` with its default prior and
  posterior settings (``Reparameterization``: one weight sample per batch; ``Flipout``; without MOPED, so the
  means start where bayesian-torch initialises them, not at the dense weights), loss
  ``cross_entropy + get_kl_loss / batch``, ``torch.optim.Adam``;
- ``tyxe_lrt``: ``tyxe.VariationalBNN`` with an ``IIDPrior(Normal(0, 1))`` on every weight and bias but BatchNorm's,
  ``AutoNormal`` started at the dense weights, Pyro's ``SVI`` with ``TraceMeanField_ELBO`` and ``pyro.optim.Adam``,
  each step inside ``tyxe.poutine.local_reparameterization()``. TyXe 0.0.2 calls ``pyro.util.deep_getattr``,
  which Pyro 1.9 no longer has: :func:`patch_tyxe` puts an equivalent back for the run.

The steps are timed in interleaved rounds in this one process (``bench.interleaved_samples``: round-robin, the
order rotated every round, a few steps per method per round); each method's median and interquartile range are
reported, with its ratio to pyro-bc's median and the interquartile range of that ratio taken round by round (the
method's median in a round over pyro-bc's in the same round, so that a busy spell of a shared machine, which
slows both alike, drops out of the spread). Peak memory: each method is built and run for a few steps in a fresh
process, and the figure is its peak resident memory (VmHWM, reset after the imports) less the resident memory
after the imports (``bench.peak_memory_added_mib``): what building the network and optimiser and training add,
allocator caches included.

Writes ``analysis/bench_peers.json``; ``analysis/bench.py --render`` puts its table into ``BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import bench  # the sibling script (sys.path[0] is analysis/ when this file is run)
import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

from models import build_network
from pyro_bc import bayesianize
from pyro_bc.allocator import keep_freed_memory
from pyro_bc.atomic import atomic_write_text
from pyro_bc.nn.network import BayesianNet
from pyro_bc.train.loop import NegativeELBO, make_optimizer, svi_step

HERE = Path(__file__).parent
LR = 1e-3
METHODS = ("dense", "pyro_bc", "bt_reparam", "bt_flipout", "tyxe_lrt")
PEERS = ("bayesian-torch", "tyxe")  # the distributions of the extra ``bench``


@dataclass(frozen=True)
class Network:
    """One benchmarked network: how to build it, its batch, and how many interleaved rounds it gets."""

    label: str
    batch: int
    input_shape: tuple[int, int, int]
    n_data: int  # the training-set size the ELBO scales the likelihood to
    rounds: int
    per_round: int
    warmup: int  # untimed steps of each method first


NETWORKS = {
    "lenet300": Network("LeNet-300-100", 128, (1, 28, 28), 55_000, rounds=30, per_round=5, warmup=5),
    "lenet5": Network("LeNet-5", 128, (1, 28, 28), 55_000, rounds=20, per_round=3, warmup=3),
    "resnet18": Network("ResNet-18 (torchvision, 3x32x32, 10 classes)", 64, (3, 32, 32), 50_000, rounds=10, per_round=2,
                        warmup=2),
    "vgg": Network("VGG (models/vgg.py, 3x32x32)", 64, (3, 32, 32), 50_000, rounds=6, per_round=1, warmup=1),
}


def patch_tyxe() -> bool:
    """Give Pyro back ``pyro.util.deep_getattr`` (gone in Pyro 1.9), which TyXe 0.0.2's ``AutoNormal`` calls.
    True where the patch was needed."""
    if hasattr(pyro.util, "deep_getattr"):
        return False
    pyro.util.deep_getattr = lambda obj, name: functools.reduce(getattr, name.split("."), obj)
    return True


def pyro_bc_network(name: str, vgg_width: float) -> BayesianNet:
    """The network as pyro-bc trains it, gnj prior, seeded: the project's model, or torchvision's ResNet-18
    made Bayesian by :func:`pyro_bc.bayesianize`."""
    pyro.set_rng_seed(0)
    spec = NETWORKS[name]
    if name == "resnet18":
        import torchvision  # a test-only dependency (extra ``dev``)

        return bayesianize(torchvision.models.resnet18(num_classes=10), "gnj", input_shape=spec.input_shape)
    return build_network(name, "gnj", input_shape=spec.input_shape, width=vgg_width if name == "vgg" else None)


def dense_network(name: str, vgg_width: float) -> nn.Module:
    """The plain network every other method starts from: the posterior-mean copy of :func:`pyro_bc_network`
    (same architecture, same initial weights) in train mode and PyTorch's default layout."""
    return bench.default_layout_copy(pyro_bc_network(name, vgg_width).posterior_mean_network()).train()


def batch(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One fixed random batch of the network's input shape, ten classes."""
    spec = NETWORKS[name]
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(spec.batch, *spec.input_shape, generator=generator),
            torch.randint(0, 10, (spec.batch,), generator=generator))


def _pyro_bc_step(name: str, vgg_width: float, x: torch.Tensor, y: torch.Tensor) -> Callable[[], object]:
    net = pyro_bc_network(name, vgg_width)
    loss, opt = NegativeELBO(net), make_optimizer(net, LR)
    return lambda: svi_step(loss, opt, net, x, y, NETWORKS[name].n_data)


def _bayesian_torch_step(kind: str, dense: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], torch.Tensor]:
    """bayesian-torch's README recipe for layers of type ``kind`` (``Reparameterization`` or ``Flipout``)."""
    from bayesian_torch.models.dnn_to_bnn import dnn_to_bnn, get_kl_loss

    model = copy.deepcopy(dense)
    dnn_to_bnn(model, {"prior_mu": 0.0, "prior_sigma": 1.0, "posterior_mu_init": 0.0, "posterior_rho_init": -3.0,
                       "type": kind, "moped_enable": False, "moped_delta": 0.5})
    opt = torch.optim.Adam(model.parameters(), lr=LR)

    def step():
        loss = F.cross_entropy(model(x), y) + get_kl_loss(model) / x.shape[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def _tyxe_step(dense: nn.Module, n_data: int, x: torch.Tensor, y: torch.Tensor) -> Callable[[], float]:
    """TyXe's variational BNN with local reparameterisation, trained by Pyro's SVI (the step returns the loss,
    minus the ELBO)."""
    import tyxe

    patch_tyxe()
    pyro.clear_param_store()  # TyXe keeps its parameters in the global store, by site name
    prior = tyxe.priors.IIDPrior(dist.Normal(0.0, 1.0), expose_all=False,
                                 hide_module_types=(nn.BatchNorm1d, nn.BatchNorm2d))
    guide = functools.partial(tyxe.guides.AutoNormal, init_scale=1e-4,
                              init_loc_fn=tyxe.guides.PretrainedInitializer.from_net(dense))
    bnn = tyxe.VariationalBNN(copy.deepcopy(dense), prior, tyxe.likelihoods.Categorical(n_data), guide)
    svi = pyro.infer.SVI(bnn.model, bnn.guide, pyro.optim.Adam({"lr": LR}), loss=pyro.infer.TraceMeanField_ELBO())

    def step():
        with tyxe.poutine.local_reparameterization():
            return svi.step(x, y)

    return step


def make_step(method: str, name: str, vgg_width: float) -> Callable[[], object]:
    """One training step of ``method`` on network ``name``, its model and optimiser built afresh; the step
    returns its loss (each method's own: a tensor or a float)."""
    pyro.enable_validation(False)  # as pyro-bc's training loop runs
    x, y = batch(name)
    if method == "pyro_bc":
        return _pyro_bc_step(name, vgg_width, x, y)
    dense = dense_network(name, vgg_width)
    if method == "dense":
        return bench.deterministic_step(dense, x, y)
    if method in ("bt_reparam", "bt_flipout"):
        return _bayesian_torch_step("Reparameterization" if method == "bt_reparam" else "Flipout", dense, x, y)
    if method == "tyxe_lrt":
        return _tyxe_step(dense, NETWORKS[name].n_data, x, y)
    raise ValueError(f"unknown method {method!r}: choose {', '.join(METHODS)}")


def summarise(seconds: dict[str, list[float]], per_round: int) -> dict[str, dict]:
    """Median and quartiles (ms) of each method's steps, the median's ratio to pyro-bc's, and the ratio round by
    round (the method's median in a round over pyro-bc's in the same round, ``per_round`` steps each), whose
    quartiles are the ratio's spread with the machine's slower and faster spells paired out."""
    out = {}
    for method, t in seconds.items():
        ms = [1000 * s for s in t]
        q1, median, q3 = bench.quartiles(ms)
        out[method] = {"ms_median": median, "ms_q1": q1, "ms_q3": q3, "steps": len(t), "ms": ms}
    if "pyro_bc" in out:
        ours = out["pyro_bc"]["ms"]
        for row in out.values():
            row["ratio_to_pyro_bc"] = row["ms_median"] / out["pyro_bc"]["ms_median"]
            row["round_ratios_to_pyro_bc"] = [
                statistics.median(row["ms"][i:i + per_round]) / statistics.median(ours[i:i + per_round])
                for i in range(0, len(ours), per_round)]
            row["round_ratio_q1"], _, row["round_ratio_q3"] = bench.quartiles(row["round_ratios_to_pyro_bc"])
    return out


def time_network(name: str, methods: tuple[str, ...], rounds: int, per_round: int, warmup: int,
                 vgg_width: float) -> dict[str, dict]:
    """Every method's step on network ``name``, interleaved in this process."""
    steps = {method: make_step(method, name, vgg_width) for method in methods}
    return summarise(bench.interleaved_samples(steps, rounds, per_round, warmup), per_round)


def peak_memory_mib(method: str, name: str, vgg_width: float, steps: int, kept: bool) -> float:
    """:func:`bench.peak_memory_added_mib` of one method in a fresh process (its allocator keeping freed memory
    where ``kept``)."""
    code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); import bench, bench_peers; "
            + ("from pyro_bc.allocator import keep_freed_memory; keep_freed_memory(); " if kept else "")
            + f"print(bench.peak_memory_added_mib(lambda: bench_peers.make_step({method!r}, {name!r}, {vgg_width!r}), "
            f"{steps}))")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return float(out.stdout.strip().splitlines()[-1])


def versions() -> dict[str, str]:
    """The versions this run used."""
    found = {"python": platform.python_version(), "torch": torch.__version__, "pyro-ppl": pyro.__version__}
    for package in ("torchvision", *PEERS):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", nargs="+", choices=tuple(NETWORKS), default=list(NETWORKS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--rounds", type=int, help="interleaved rounds per network (default: the network's own)")
    parser.add_argument("--steps", type=int, help="steps per method per round (default: the network's own)")
    parser.add_argument("--warmup", type=int, help="untimed steps of each method first (default: the network's own)")
    parser.add_argument("--memory-steps", type=int, default=3, help="steps run in each memory probe")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory probes")
    parser.add_argument("--vgg-width", type=float, default=1.0, help="channel multiplier of the VGG (1: the paper's)")
    parser.add_argument("--allocator", default="default", choices=["default", "kept"],
                        help="glibc malloc as a process starts, or keeping freed memory as the pyro-bc command does "
                             "(pyro_bc.allocator), for every method alike")
    parser.add_argument("--note", default="", help="what else the machine was doing")
    parser.add_argument("--out", default=str(HERE / "bench_peers.json"))
    args = parser.parse_args(argv)
    for option, least in (("rounds", 1), ("steps", 1), ("warmup", 0), ("memory_steps", 1)):
        if getattr(args, option) is not None and getattr(args, option) < least:
            parser.error(f"--{option.replace('_', '-')} must be at least {least}")
    if not args.vgg_width > 0:
        parser.error(f"--vgg-width must be positive, got {args.vgg_width}")
    missing = [module for prefix, module in (("bt_", "bayesian_torch"), ("tyxe_", "tyxe"))
               if any(m.startswith(prefix) for m in args.methods) and importlib.util.find_spec(module) is None]
    if missing:
        parser.error(f"{' and '.join(missing)} not installed: .venv/bin/pip install --no-deps bayesian-torch==0.5.0 "
                     "tyxe==0.0.2 (the extra bench), or time the others only: --methods dense pyro_bc")
    if args.allocator == "kept" and not keep_freed_memory():
        parser.error("--allocator kept needs glibc, and no malloc settings in the environment")
    torch.set_num_threads(1)
    pyro.enable_validation(False)
    found = versions()
    print("versions: " + ", ".join(f"{k} {v}" for k, v in found.items()), flush=True)
    results = {"command": shlex.join(["analysis/bench_peers.py", *(sys.argv[1:] if argv is None else argv)]),
               "versions": found, "machine": f"{platform.processor() or platform.machine()}, {platform.system()}, "
                                             f"{os.cpu_count()} CPUs, 1 thread",
               "note": args.note, "allocator": args.allocator, "lr": LR, "vgg_width": args.vgg_width,
               "tyxe_patched": patch_tyxe(),
               "loadavg_start": list(os.getloadavg()), "networks": []}
    for name in args.networks:
        spec = NETWORKS[name]
        rounds, per_round = args.rounds or spec.rounds, args.steps or spec.per_round
        warmup = spec.warmup if args.warmup is None else args.warmup
        load = os.getloadavg()
        methods = time_network(name, tuple(args.methods), rounds, per_round, warmup, args.vgg_width)
        if not args.no_memory:
            for method, row in methods.items():
                row["peak_mib"] = peak_memory_mib(method, name, args.vgg_width, args.memory_steps,
                                                  args.allocator == "kept")
        row = {"network": name, "label": spec.label + (f", width {args.vgg_width:g}" if name == "vgg" else ""),
               "batch": spec.batch, "input_shape": list(spec.input_shape), "rounds": rounds, "per_round": per_round,
               "warmup": warmup, "loadavg_before": list(load), "loadavg_after": list(os.getloadavg()),
               "methods": methods}
        results["networks"].append(row)
        print(json.dumps(row), flush=True)
    results["loadavg_end"] = list(os.getloadavg())
    atomic_write_text(args.out, json.dumps(results, indent=2) + "\n")
    print("\n".join(bench.peers_section(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
