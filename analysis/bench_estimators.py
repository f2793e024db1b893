"""The gradient estimators compared (issue #30): step time, gradient variance, time to a validation error.

Run from the repository root, one thread::

    .venv/bin/python analysis/bench_estimators.py --note "what else the machine was doing"

For LeNet-300-100 and LeNet-5 with the gnj prior and each estimator of ``pyro_bc.infer.estimators`` (``lrt``, ``shared``,
``flipout``), all in one process, so that every figure is a ratio against the LRT measured beside it:

* **step**: ``svi_step`` (``NegativeELBO`` + fused Adam) on one fixed batch of 128, in interleaved rounds (order
  rotated every round, after a warm-up), median and quartiles; beside them the LRT's step under
  ``reparam.LocalReparameterization`` itself (the handler the loop used before the estimators), which shows what the
  default path's dispatch through ``Estimation`` costs.
* **time to error**: from a dense start (``analysis/pretrain.py``'s network, the fast recipe's pretraining epochs) with
  the fast recipe's settings of ``analysis/reproduce.sh`` (Adam 1e-3, batch 128, ``--variance-lr-factor 30``, a
  cosine schedule, here over fewer epochs than the recipe's: :data:`RECIPES`), the three trainings of a network
  advance in turns, one step each, so that a busy spell of the machine falls on all of them alike. The posterior-mean
  network's validation error and the groups kept (log alpha < -3) are measured every ``--eval-fraction`` of an epoch
  (not timed). The dense start is already near the target error and the first steps prune most groups, the error
  rising, then falling again; so the target is a compressed network at that error: the figure is the sum of an
  estimator's own step times up to the first evaluation at or below the target error with at most the target's
  groups kept (about 1.3 times what the fast recipe keeps at its end), and its epochs. The loop is ``pyro-bc
  train``'s ingredients (``make_optimizer``, ``epoch_lr``, ``iterate_minibatches`` with the loop's seeds,
  ``svi_step``) without checkpoints.
* **gradient variance**: on one fixed batch of 128 and fixed parameters, ``--draws`` gradients of ``-ELBO / N`` per
  estimator; the sum over the parameters of each group (weight and bias means; their log-variances; the group scales'
  parameters) of the per-coordinate variance, at the dense start and at the LRT's parameters when its time-to-error
  run stopped.

Writes ``analysis/bench_estimators.json``; ``analysis/bench.py --render`` puts its table into ``BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import pyro
import torch
from bench import interleaved_samples, quartiles  # the sibling scripts (sys.path[0] is analysis/ when this is run)
from pretrain import pretrain
from pyro import poutine

from models import build_network
from pyro_bc.data.datasets import iterate_minibatches, load_mnist
from pyro_bc.infer.estimators import ESTIMATORS
from pyro_bc.infer.reparam import LocalReparameterization
from pyro_bc.metrics.evaluate import error_percent, groups_below
from pyro_bc.train.loop import NegativeELBO, make_optimizer, svi_step
from pyro_bc.train.schedule import epoch_lr

HERE = Path(__file__).parent

BATCH, LR, VARIANCE_LR_FACTOR, SEED = 128, 1e-3, 30.0, 0
#: per network: the fast recipe's pretraining epochs (analysis/reproduce.sh), the cosine schedule's epochs (the
#: recipe's are 80 and 30: shortened, so that the targets come within minutes), the target: validation error (%) and
#: groups kept at most (the fast recipe ends at 276-78-17 and 10-11-53-16), and the most epochs a run goes on for
RECIPES = {"lenet300": {"pretrain": 10, "epochs": 30, "target": 2.5, "max_groups": 450, "max_epochs": 30},
           "lenet5": {"pretrain": 8, "epochs": 10, "target": 1.6, "max_groups": 150, "max_epochs": 10}}
NAMES = list(ESTIMATORS)


class BeforeEstimators(NegativeELBO):
    """``NegativeELBO`` as it was before the estimators: ``LocalReparameterization`` entered directly."""

    def forward(self, x, y, n_data, beta=1.0, weight=1.0, shard=None):
        model = poutine.scale(self.net.model, scale=weight / n_data)
        guide = poutine.scale(self.net.guide, scale=weight * beta / n_data)
        with LocalReparameterization(shard):
            return self.elbo.differentiable_loss(model, guide, x, y, n_data)


def dense_start(model: str, epochs: int, cache: Path) -> dict:
    """The state_dict of the pretrained dense network (``analysis/pretrain.py``), cached in ``cache``."""
    path = cache / f"{model}-dense-{epochs}.pt"
    if not path.is_file():
        net, _ = pretrain(model, epochs, seed=SEED)
        buffer = io.BytesIO()
        torch.save(net.state_dict(), buffer)
        cache.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buffer.getvalue())
    return torch.load(path, weights_only=True)


def bayesian(model: str, start: dict | None):
    pyro.set_rng_seed(SEED)
    net = build_network(model, "gnj")
    if start is not None:
        net.init_from(start)
    return net


def step_times(model: str, rounds: int) -> dict:
    """Median and quartiles (ms) of one training step per estimator, interleaved."""
    x, y = torch.randn(BATCH, 1, 28, 28), torch.randint(0, 10, (BATCH,))
    steps = {}
    for name, loss_cls in [(n, None) for n in NAMES] + [("lrt, LocalReparameterization", BeforeEstimators)]:
        net = bayesian(model, None)
        opt = make_optimizer(net, LR)
        loss = NegativeELBO(net, estimators=name) if loss_cls is None else loss_cls(net)
        steps[name] = (lambda loss=loss, opt=opt, net=net: svi_step(loss, opt, net, x, y, 55_000))
    samples = interleaved_samples(steps, rounds)
    out = {}
    for name, times in samples.items():
        q1, median, q3 = quartiles([1000 * t for t in times])
        out[name] = {"ms_median": median, "ms_q1": q1, "ms_q3": q3}
    for row in out.values():
        row["ratio_to_lrt"] = row["ms_median"] / out["lrt"]["ms_median"]
    return out


def gradient_variance(net, x: torch.Tensor, y: torch.Tensor, n_data: int, draws: int) -> dict:
    """Per estimator, the summed per-coordinate variance of ``draws`` gradients of ``-ELBO / N`` on ``(x, y)``, by
    parameter group, and its ratio to the LRT's."""
    groups = {"means": [], "log-variances": [], "scales": []}
    for layer in net.layers:
        groups["means"] += [p for p in (layer.weight_mu, layer.bias_mu) if p is not None]
        groups["log-variances"] += [p for p in (layer.weight_logvar, layer.bias_logvar) if p is not None]
        groups["scales"] += list(layer.prior.parameters())
    out = {}
    for name in NAMES:
        loss = NegativeELBO(net, estimators=name)
        samples = {g: [] for g in groups}
        pyro.set_rng_seed(1)
        for _ in range(draws):
            net.zero_grad(set_to_none=True)
            loss(x, y, n_data).backward()
            for g, params in groups.items():
                samples[g].append(torch.cat([p.grad.reshape(-1) for p in params]).double())
        out[name] = {g: float(torch.stack(s).var(0).sum()) for g, s in samples.items()}
    for name in NAMES:
        for g in groups:
            out[name][f"{g}_ratio_to_lrt"] = out[name][g] / out["lrt"][g]
    return out


def time_to_error(model: str, start: dict, data, recipe: dict, eval_fraction: float) -> tuple[dict, object]:
    """The estimators' trainings from ``start``, advanced in turns; returns per estimator its evaluations
    (epochs, seconds of its steps, validation error), the first reaching the target, and the LRT's network."""
    runs = {}
    for name in NAMES:
        net = bayesian(model, start).train()
        runs[name] = {"net": net, "opt": make_optimizer(net, LR, VARIANCE_LR_FACTOR),
                      "loss": NegativeELBO(net, estimators=name), "seconds": 0.0, "evaluations": [], "reached": None}
    train, val = data.train, data.val
    n_data = len(train)
    steps_per_epoch = -(-n_data // BATCH)
    every = max(1, round(eval_fraction * steps_per_epoch))
    pyro.set_rng_seed(SEED)
    for epoch in range(recipe["max_epochs"]):
        lr = epoch_lr("cosine", LR, epoch, recipe["epochs"])
        for run in runs.values():
            for group in run["opt"].param_groups:
                group["lr"] = lr * group.get("lr_factor", 1.0)
        order = torch.Generator().manual_seed(SEED * 100_003 + epoch)  # the training loop's minibatch order
        for step, (x, y) in enumerate(iterate_minibatches(train, BATCH, order)):
            names = NAMES[step % len(NAMES):] + NAMES[:step % len(NAMES)]  # rotated: no estimator always first
            for name in names:
                run = runs[name]
                if run["reached"] is not None:
                    continue
                started = time.perf_counter()
                value = svi_step(run["loss"], run["opt"], run["net"], x, y, n_data)
                run["seconds"] += time.perf_counter() - started
                if not torch.isfinite(value):
                    raise SystemExit(f"bench_estimators: {model} {name}: non-finite loss at epoch {epoch + 1}")
            if (step + 1) % every == 0 or step + 1 == steps_per_epoch:
                for name, run in runs.items():
                    if run["reached"] is not None:
                        continue
                    with torch.no_grad():
                        error = error_percent(run["net"].posterior_mean_network(), val.x, val.y)
                    kept = groups_below(run["net"])
                    record = {"epochs": round(epoch + (step + 1) / steps_per_epoch, 3),
                              "seconds": run["seconds"], "val_error": error, "groups_kept": kept}
                    run["evaluations"].append(record)
                    print(json.dumps({"model": model, "estimator": name, **record}), flush=True)
                    if error <= recipe["target"] and sum(kept.values()) <= recipe["max_groups"]:
                        run["reached"] = record
        if all(run["reached"] is not None for run in runs.values()):
            break
    results = {name: {"reached": run["reached"], "evaluations": run["evaluations"],
                      "best_val_error": min(e["val_error"] for e in run["evaluations"]),
                      "best_val_error_within_groups": min((e["val_error"] for e in run["evaluations"]
                                                           if sum(e["groups_kept"].values()) <= recipe["max_groups"]),
                                                          default=None)} for name, run in runs.items()}
    lrt = results["lrt"]["reached"]
    for name, r in results.items():
        if r["reached"] is not None and lrt is not None:
            r["seconds_ratio_to_lrt"] = r["reached"]["seconds"] / lrt["seconds"]
    return results, runs["lrt"]["net"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--rounds", type=int, default=200, help="interleaved step rounds (LeNet-5: a quarter)")
    parser.add_argument("--draws", type=int, default=100, help="gradient draws per estimator (LeNet-5: half)")
    parser.add_argument("--max-epochs", type=int, default=None,
                        help="stop the time-to-error runs after this many epochs (default: the network's, RECIPES)")
    parser.add_argument("--eval-fraction", type=float, default=0.25,
                        help="evaluate the validation error every this fraction of an epoch")
    parser.add_argument("--cache", type=Path, default=Path("runs/bench_estimators"),
                        help="where the pretrained dense networks are kept")
    parser.add_argument("--note", default="", help="what else the machine was doing")
    parser.add_argument("--out", type=Path, default=HERE / "bench_estimators.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pyro.enable_validation(False)
    results = {"command": shlex.join(["analysis/bench_estimators.py", *sys.argv[1:]]),
               "machine": f"{platform.processor() or platform.machine()}, {platform.system()}, "
                          f"torch {torch.__version__}, pyro {pyro.__version__}, 1 thread",
               "note": args.note, "loadavg_start": list(os.getloadavg()), "batch": BATCH, "networks": []}
    data = load_mnist(seed=SEED)
    for model in args.networks:
        recipe = {**RECIPES[model], **({"max_epochs": args.max_epochs} if args.max_epochs else {})}
        row = {"model": model, "prior": "gnj", **recipe, "eval_fraction": args.eval_fraction}
        rounds = args.rounds if model == "lenet300" else max(args.rounds // 4, 20)
        row["steps"] = step_times(model, rounds)
        row["rounds"] = rounds
        print(json.dumps({"model": model, "steps": row["steps"]}), flush=True)
        start = dense_start(model, recipe["pretrain"], args.cache)
        row["time_to_error"], trained = time_to_error(model, start, data, recipe, args.eval_fraction)
        draws = args.draws if model == "lenet300" else max(args.draws // 2, 20)
        g = torch.Generator().manual_seed(SEED)
        batch = torch.randperm(len(data.train), generator=g)[:BATCH]
        x, y = data.train.x[batch], data.train.y[batch]
        row["draws"] = draws
        row["gradient_variance"] = {
            "dense start": gradient_variance(bayesian(model, start).train(), x, y, len(data.train), draws),
            "after the LRT's run": gradient_variance(copy.deepcopy(trained).train(), x, y, len(data.train), draws)}
        print(json.dumps({"model": model, "gradient_variance": row["gradient_variance"]}), flush=True)
        results["networks"].append(row)
    results["loadavg_end"] = list(os.getloadavg())
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
