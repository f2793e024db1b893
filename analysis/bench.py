"""Benchmarks: SVI step cost against a deterministic step and a plain-PyTorch implementation of the
same maths, peak memory, the per-step bookkeeping on a network of almost no arithmetic, and inference of
dense against compressed networks (with glibc's default allocator and with freed memory kept).

Run from the repository root (one thread, nothing else running)::

    .venv/bin/python analysis/bench.py            # writes analysis/BENCHMARKS.md and analysis/benchmarks.json
    .venv/bin/python analysis/bench.py --render   # rewrites BENCHMARKS.md from benchmarks.json
    .venv/bin/python analysis/bench.py --only inference  # measures inference alone, keeps the other figures

Step timings are interleaved (a, b, c, a, b, c, ...) in one process after a warm-up, and the medians
are compared, so a slower or busier machine moves all three alike.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import bench_distributed  # the sibling script (sys.path[0] is analysis/ when this file is run)
import pyro
import torch
import torch.nn.functional as F
from torch import nn

from models import build_network
from pyro_bc.allocator import keep_freed_memory
from pyro_bc.bcz import codec
from pyro_bc.bcz.export import INPUT_NAME, export_bytes
from pyro_bc.compression.compressed import compressed_model
from pyro_bc.compression.graph import prune_chain
from pyro_bc.compression.macs import count_macs
from pyro_bc.compression.posterior import analyse, choose_precision
from pyro_bc.infer.distributions import K1, K2, K3
from pyro_bc.nn.layers import BayesConv2d, BayesLayer
from pyro_bc.nn.layout import Conv2dChannelsLast
from pyro_bc.train.loop import NegativeELBO, svi_step

HERE = Path(__file__).parent
OVERHEAD_NET = str(HERE / "overhead_net.py")  # LeNet-300-100's structure at widths 8-8: bookkeeping only
N_DATA, BATCH = 55_000, 128
STEP_LIMITS = {"plain": 1.15, "memory": 2.0, "deterministic": {"lenet300": 3.0, "lenet5": 2.5}}  # issue #7
SPEEDUP_TARGET = 5.0  # compressed against dense LeNet-5 at batch 1000
PAPER_GNJ_LENET5 = [8, 13, 88, 13]  # kept groups per layer of the paper's BC-GNJ LeNet-5 (docs/METHOD.md 9.2)
COMPASS_SPEEDUP = 10.0  # the compressed LeNet-5 at batch 1000 against the dense network as PyTorch runs it
INPUT_SHAPE, CHUNK = (1, 28, 28), 250  # LeNet-5's input; examples per slice of the chunked variant


# -- (b) the same maths in plain PyTorch: the floor without Pyro ------------------------------------

def _kl_lognormal_gamma(mu, logvar, a, rate):
    return -0.5 * (logvar + 1.8378770664093453 + 1) - a * torch.log(rate) + torch.lgamma(a) - a * mu + rate * torch.exp(
        mu + logvar.exp() / 2)


def _kl_lognormal_invgamma(mu, logvar, a, b):
    return -0.5 * (logvar + 1.8378770664093453 + 1) - a * torch.log(b) + torch.lgamma(a) + a * mu + b * torch.exp(
        logvar.exp() / 2 - mu)


def _kl_normal_std_sum(mu, logvar, var):
    """sum KL(N(mu, var) || N(0, 1)) by reductions, as pyro_bc's ELBO sums it (``summed_kl``)."""
    flat = mu.reshape(-1)
    return 0.5 * (var.sum() + torch.dot(flat, flat) - mu.numel() - logvar.sum())


def _kl_molchanov(log_alpha):
    return K1 - K1 * torch.sigmoid(K2 + K3 * log_alpha) + 0.5 * F.softplus(-log_alpha)


def plain_layer(layer: BayesLayer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LRT forward and KL of one layer, written directly (no Pyro), from the layer's own parameters."""
    w_var, b_var = layer.weight_logvar.exp(), layer.bias_logvar.exp()
    batch = x.shape[0]
    if layer.prior.name == "gnj":
        z = layer.prior.z_mu + (0.5 * layer.prior.z_logvar).exp() * torch.randn(batch, layer.n_groups)
        kl = _kl_molchanov(layer.prior.z_logvar - torch.log(layer.prior.z_mu**2 + 1e-8)).sum()
    elif layer.prior.name == "ghs":
        half, one = torch.tensor(0.5), torch.tensor(1.0)
        m_s, m_i = 0.5 * (layer.prior.sa_mu + layer.prior.sb_mu), 0.5 * (layer.prior.za_mu + layer.prior.zb_mu)
        sd_s = 0.5 * (layer.prior.sa_logvar.exp() + layer.prior.sb_logvar.exp()).sqrt()
        sd_i = 0.5 * (layer.prior.za_logvar.exp() + layer.prior.zb_logvar.exp()).sqrt()
        z = torch.exp(m_s + sd_s * torch.randn(batch, 1) + m_i + sd_i * torch.randn(batch, layer.n_groups))
        kl = (_kl_lognormal_gamma(layer.prior.sa_mu, layer.prior.sa_logvar, half, one / layer.prior.tau0**2)
              + _kl_lognormal_invgamma(layer.prior.sb_mu, layer.prior.sb_logvar, half, one)
              + _kl_lognormal_gamma(layer.prior.za_mu, layer.prior.za_logvar, half, one).sum()
              + _kl_lognormal_invgamma(layer.prior.zb_mu, layer.prior.zb_logvar, half, one).sum())
    else:
        z, kl = None, _kl_molchanov(layer.weight_logvar - torch.log(layer.weight_mu**2 + 1e-8)).sum()
    if layer.prior.name != "lu":
        kl = kl + _kl_normal_std_sum(layer.weight_mu, layer.weight_logvar, w_var)
    kl = kl + _kl_normal_std_sum(layer.bias_mu, layer.bias_logvar, b_var)
    if isinstance(layer, BayesConv2d):
        mean = F.conv2d(x, layer.weight_mu, layer.bias_mu, *layer.conv_args)
        var = F.conv2d(x * x, w_var, b_var, *layer.conv_args)
        y = mean + var.sqrt() * torch.randn_like(mean)
        y = y if z is None else y * z[:, :, None, None]
        return y.contiguous(memory_format=torch.channels_last), kl  # as pyro_bc's LRT does
    if z is not None:
        x = x * z
    mean, var = F.linear(x, layer.weight_mu, layer.bias_mu), F.linear(x * x, w_var, b_var)
    return mean + var.sqrt() * torch.randn_like(mean), kl


def plain_loss(net, x, y) -> torch.Tensor:
    kl = 0.0
    for module in net.body:
        if isinstance(module, BayesLayer):
            x, layer_kl = plain_layer(module, x)
            kl = kl + layer_kl
        else:
            x = module(x)
    return F.cross_entropy(x, y) + kl / N_DATA


# -- the three steps ---------------------------------------------------------------------------------

def deterministic_step(dense: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], torch.Tensor]:
    """(a): one fused-Adam step of cross-entropy on the batch ``(x, y)`` for the plain network ``dense``; the
    step returns the loss."""
    optimizer = torch.optim.Adam(dense.parameters(), lr=1e-3, fused=True)

    def step():
        loss = F.cross_entropy(dense(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def make_steps(model_name: str, prior: str, only: str | None = None, batch: int = BATCH) -> dict:
    """The step functions (a), (b), (c) on one fixed batch; ``only`` builds just that one (memory probes)."""
    pyro.set_rng_seed(0)
    pyro.enable_validation(False)
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    steps = {}
    if only in (None, "deterministic"):
        # in PyTorch's default layout, as a user's dense network would be (the posterior-mean copy's
        # convolutions return channels-last tensors)
        dense = default_layout_copy(build_network(model_name, prior).posterior_mean_network()).train()
        steps["deterministic"] = deterministic_step(dense, x, y)
    if only in (None, "plain"):
        plain_net = build_network(model_name, prior)
        plain_opt = torch.optim.Adam(plain_net.parameters(), lr=1e-3, fused=True)

        def plain():
            loss = plain_loss(plain_net, x, y)
            plain_opt.zero_grad(set_to_none=True)
            loss.backward()
            plain_opt.step()
            plain_net.clip_variances()

        steps["plain"] = plain
    if only in (None, "pyro_bc"):
        net = build_network(model_name, prior)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3, fused=True)
        loss = NegativeELBO(net)
        steps["pyro_bc"] = lambda: svi_step(loss, opt, net, x, y, N_DATA)
    return steps


def interleaved_samples(steps: dict[str, Callable[[], object]], rounds: int, per_round: int = 1,
                        warmup: int = 10) -> dict[str, list[float]]:
    """Seconds of each call of each step, timed round-robin: ``warmup`` untimed calls of each, then ``rounds``
    rounds in which each step runs ``per_round`` times in a row, the order rotated by one every round, so that a
    busier spell of the machine, or following a given step, falls on every step alike."""
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    names = list(steps)
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = steps[name]
            for _ in range(per_round):
                started = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - started)
    return times


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """First quartile, median and third quartile (inclusive: of 1, 2, 3, 4, 5 they are 2, 3, 4)."""
    return tuple(statistics.quantiles(values, n=4, method="inclusive")) if len(values) > 1 else (values[0],) * 3


def time_interleaved(steps: dict, repeats: int, warmup: int = 10) -> dict[str, float]:
    """The median milliseconds of each step over ``repeats`` interleaved rounds of one call each."""
    times = interleaved_samples(steps, repeats, 1, warmup)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_probe(model_name: str, prior: str, variant: str, steps: int = 20) -> float:
    """Peak resident memory added by building and running one variant, in MiB (Linux).

    The process's high-water mark is reset after the imports (``/proc/self/clear_refs``), so the
    figure is what training adds, not the ~700 MiB that importing torch and pyro costs.
    """
    return peak_memory_added_mib(lambda: make_steps(model_name, prior, only=variant)[variant], steps)


def peak_memory_added_mib(build: Callable[[], Callable[[], object]], steps: int = 20) -> float:
    """Peak resident memory, in MiB, that ``build()`` (which returns a step) and ``steps`` calls of its step add
    to this process (Linux): the high-water mark is reset first (``/proc/self/clear_refs``) and the resident
    memory at that moment subtracted. Run it in a fresh process, where nothing else has allocated."""
    torch.set_num_threads(1)
    Path("/proc/self/clear_refs").write_text("5")
    baseline = _status_kib("VmRSS")
    fn = build()
    for _ in range(steps):
        fn()
    return (_status_kib("VmHWM") - baseline) / 1024


def peak_memory_mb(model_name: str, prior: str, variant: str) -> float:
    """:func:`memory_probe` in a fresh process, so that variants do not share allocations."""
    code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); import bench; "
            f"print(bench.memory_probe({model_name!r}, {prior!r}, {variant!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


# -- inference -----------------------------------------------------------------------------------

def paper_sized_lenet5() -> tuple[nn.Module, nn.Module, str]:
    """The dense LeNet-5 as a plain ``nn.Sequential`` in PyTorch's default layout, the same network pruned to
    the paper's BC-GNJ architecture 8-13-88-13 (groups chosen, not trained) as loaded from its ``.bcz`` file,
    and that architecture."""
    pyro.set_rng_seed(0)
    net = build_network("lenet5", "gnj")
    with torch.no_grad():
        for layer, keep in zip(net.layers, PAPER_GNJ_LENET5):
            layer.prior.z_logvar.fill_(5.0)  # log alpha ~ 5: pruned at threshold -3
            # fc1's kept inputs spread over conv2's kept channels (16 inputs each), others the first groups
            kept = torch.linspace(0, 16 * PAPER_GNJ_LENET5[1] - 1, keep).long() if layer.site == "fc1" else slice(keep)
            layer.prior.z_logvar[kept] = -9.0
    layers = prune_chain(analyse(net), [-3.0] * len(net.layers))
    arch = "-".join(str(layer.groups_kept) for layer in layers)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lenet5.bcz"
        codec.write_bcz(path, compressed_model(net, layers, choose_precision(layers)))
        small = codec.load(path)
    return default_layout_copy(net.posterior_mean_network()), small, arch


def _with_conv_class(net: nn.Module, new: type) -> nn.Module:
    """A copy of ``net`` whose convolutions (``nn.Conv2d`` and its subclasses) are of class ``new``, same weights."""
    out = copy.deepcopy(net)
    for module in out.modules():
        if isinstance(module, nn.Conv2d):
            module.__class__ = new
    return out


def channels_last_copy(net: nn.Module) -> nn.Module:
    """The network with the loader's channels-last convolutions: what the layout alone is worth."""
    return _with_conv_class(net, Conv2dChannelsLast)


def default_layout_copy(net: nn.Module) -> nn.Module:
    """The network with plain ``nn.Conv2d`` convolutions in PyTorch's default layout (TorchScript cannot compile
    the channels-last subclasses, whose ``forward`` calls ``super()``)."""
    return _with_conv_class(net, nn.Conv2d)


def time_inference(dense: nn.Module, small: nn.Module, batch: int, repeats: int) -> dict[str, float]:
    x = torch.randn(batch, 1, 28, 28)
    dense_cl = channels_last_copy(dense)
    with torch.no_grad():
        return time_interleaved({"dense": lambda: dense(x), "dense_channels_last": lambda: dense_cl(x),
                                 "compressed": lambda: small(x)}, repeats)


def _onnxruntime(net: nn.Module) -> Callable[[torch.Tensor], object]:
    """``net`` exported by ``pyro-bc export`` and run by onnxruntime on one thread (a test-only dependency)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(export_bytes(net, INPUT_SHAPE, "onnx"), options,
                                           providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {INPUT_NAME: x.numpy()})


def _in_chunks(run: Callable[[torch.Tensor], torch.Tensor], size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``run`` over slices of ``size`` examples, so that each slice's activations stay in the cache."""
    return lambda x: torch.cat([run(part) for part in x.split(size)])


def _frozen(net: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """TorchScript, frozen and optimised for inference (oneDNN convolutions in blocked layouts, conv+ReLU fused)."""
    return torch.jit.optimize_for_inference(torch.jit.script(default_layout_copy(net).eval()))


#: ways to run a network; each is tried on the dense and the compressed LeNet-5, and a failure is recorded
INFERENCE_VARIANTS: dict[str, Callable[[nn.Module], Callable]] = {
    "eager (as loaded)": lambda net: net,
    "torch.compile (inductor)": lambda net: torch.compile(net),
    "torch.compile (inductor, freezing)": lambda net: torch.compile(net, options={"freezing": True}),
    "TorchScript frozen + optimize_for_inference": _frozen,
    f"TorchScript frozen, chunks of {CHUNK}": lambda net: _in_chunks(_frozen(net), CHUNK),
    "onnxruntime (exported ONNX)": _onnxruntime,
}


def time_inference_variants(dense: nn.Module, small: nn.Module, repeats: int, batch: int = 1000) -> list[dict]:
    """Each of :data:`INFERENCE_VARIANTS` on both networks, timed interleaved; setup time includes the first
    call (where compilers compile). A variant that fails is a row with its error."""
    x = torch.randn(batch, 1, 28, 28)
    rows, calls = [], {}
    with torch.no_grad():
        for name, build in INFERENCE_VARIANTS.items():
            row: dict = {"variant": name, "batch": batch}
            try:
                for which, net in (("dense", dense), ("compressed", small)):
                    started = time.perf_counter()
                    run = build(net)
                    run(x)
                    row[f"setup_s_{which}"] = time.perf_counter() - started
                    calls[name, which] = functools.partial(run, x)
            except Exception as exc:  # noqa: BLE001  (a variant that does not work here is a finding)
                row["error"] = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
                calls.pop((name, "dense"), None)
            rows.append(row)
            print(json.dumps(row), flush=True)
        ms = time_interleaved({f"{n}|{w}": fn for (n, w), fn in calls.items()}, repeats, warmup=3)
    eager_dense = ms[f"{next(iter(INFERENCE_VARIANTS))}|dense"]
    for row in rows:
        if "error" not in row:
            row["ms_dense"], row["ms_compressed"] = ms[f"{row['variant']}|dense"], ms[f"{row['variant']}|compressed"]
            row["speedup"] = row["ms_dense"] / row["ms_compressed"]
            row["speedup_vs_eager_dense"] = eager_dense / row["ms_compressed"]
    return rows


def measure_inference(repeats: int) -> dict:
    """The inference part of the benchmarks: the dense LeNet-5 against the paper-sized compressed one, under
    glibc's default allocator and then with freed memory kept, and the inference variants (kept memory)."""
    dense, small, arch = paper_sized_lenet5()
    results = {"inference": [], "inference_macs": {"dense": sum(count_macs(dense, INPUT_SHAPE)),
                                                   "compressed": sum(count_macs(small, INPUT_SHAPE))}}
    for allocator in ("default", "kept"):  # the default first: keep_freed_memory cannot be undone
        if allocator == "kept" and not keep_freed_memory():
            allocator = "default"
            break
        for batch in (1, 1000):
            ms = time_inference(dense, small, batch, repeats if batch == 1 else 30)
            row = {"model": f"lenet5 dense vs compressed {arch}", "batch": batch, "allocator": allocator,
                   "ms_dense": ms["dense"], "ms_dense_channels_last": ms["dense_channels_last"],
                   "ms_compressed": ms["compressed"], "speedup": ms["dense"] / ms["compressed"],
                   "speedup_vs_channels_last": ms["dense_channels_last"] / ms["compressed"]}
            results["inference"].append(row)
            print(json.dumps(row), flush=True)
    variants = time_inference_variants(dense, small, repeats=30)
    results["inference_variants"] = [{"model": f"lenet5 dense vs compressed {arch}", "allocator": allocator, **row}
                                     for row in variants]
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--out", default=str(HERE))
    parser.add_argument("--note", default="", help="what else the machine was doing, written under the machine line")
    parser.add_argument("--render", action="store_true",
                        help="measure nothing: rewrite BENCHMARKS.md from the benchmarks.json in --out")
    parser.add_argument("--only", choices=("inference",),
                        help="measure only this part; the other figures of the benchmarks.json in --out are kept")
    args = parser.parse_args()
    if args.render or args.only:
        results = json.loads((Path(args.out) / "benchmarks.json").read_text())
        if args.only:
            torch.set_num_threads(1)
            results.update(measure_inference(args.repeats), inference_note=args.note)
        write_outputs(results, Path(args.out), results.get("distributed"))
        return 0
    torch.set_num_threads(1)
    machine = (f"{platform.processor() or platform.machine()}, {platform.system()}, torch {torch.__version__}, "
               f"pyro {pyro.__version__}, 1 thread")
    results = {"machine": machine, "note": args.note, "steps": [], "overhead": []}
    for model_name in ("lenet300", "lenet5"):
        repeats = args.repeats if model_name == "lenet300" else max(args.repeats // 5, 20)
        for prior in ("gnj", "ghs", "lu"):
            ms = time_interleaved(make_steps(model_name, prior), repeats)
            row = {"model": model_name, "prior": prior, **{f"ms_{k}": v for k, v in ms.items()},
                   "ratio_pyro_bc_to_deterministic": ms["pyro_bc"] / ms["deterministic"],
                   "ratio_pyro_bc_to_plain": ms["pyro_bc"] / ms["plain"]}
            for variant in ("plain", "pyro_bc"):
                row[f"peak_mb_{variant}"] = peak_memory_mb(model_name, prior, variant)
            row["memory_ratio"] = row["peak_mb_pyro_bc"] / row["peak_mb_plain"]
            results["steps"].append(row)
            print(json.dumps(row), flush=True)
    for prior in ("gnj", "ghs", "lu"):
        ms = time_interleaved(make_steps(OVERHEAD_NET, prior, batch=2), args.repeats)
        row = {"prior": prior, **{f"ms_{k}": v for k, v in ms.items()}}
        results["overhead"].append(row)
        print(json.dumps(row), flush=True)
    results.update(measure_inference(args.repeats))
    results["distributed"] = bench_distributed.table()
    print("\n".join(results["distributed"]), flush=True)
    write_outputs(results, Path(args.out), results["distributed"])
    return 0


def write_outputs(results: dict, out: Path, distributed: list[str] | None = None) -> None:
    (out / "benchmarks.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["# Benchmarks", "", "Produced by `.venv/bin/python analysis/bench.py` (figures in `benchmarks.json`).",
             f"Machine: {results['machine']}. Medians of interleaved repeats after warm-up; batch {BATCH}.",
             *([f"Conditions: {results['note']}"] if results.get("note") else []), "",
             "## SVI step", "",
             ("(a) deterministic step of the same network, (b) plain-PyTorch implementation of the same local-"
              "reparameterisation maths (`plain_loss` in the script), (c) a `pyro_bc` SVI step "
              "(`MeanFieldELBO` + `LocalReparameterization`). (b) and (c) sum the weight KLs by reductions and "
              "emit conv outputs channels-last; (a) is a plain `nn.Sequential` in PyTorch's default memory format. "
              "Peak memory: the peak resident memory that building and training the variant adds in a fresh "
              "process (high-water mark reset after the imports)."), "",
             "| model | prior | (a) ms | (b) ms | (c) ms | (c)/(a) | (c)/(b) | peak MiB (b) | peak MiB (c) | mem (c)/(b) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["steps"]:
        lines.append(f"| {r['model']} | {r['prior']} | {r['ms_deterministic']:.2f} | {r['ms_plain']:.2f} | "
                     f"{r['ms_pyro_bc']:.2f} | {r['ratio_pyro_bc_to_deterministic']:.2f} | "
                     f"{r['ratio_pyro_bc_to_plain']:.2f} | {r['peak_mb_plain']:.0f} | {r['peak_mb_pyro_bc']:.0f} | "
                     f"{r['memory_ratio']:.2f} |")
    lines += ["", "## Per-step bookkeeping", "",
              ("The same three steps on `analysis/overhead_net.py`, LeNet-300-100's layers at widths 784-8-8-10, "
               "batch 2: there is almost no arithmetic, so (c) - (b) is what Pyro's messengers, the sites' "
               "distribution objects and their autograd nodes cost per step, to set beside the full-size "
               "LeNet-300-100 rows above."), "",
              "| prior | (a) ms | (b) ms | (c) ms | (c) - (b) ms |", "|---|---|---|---|---|"]
    for r in results["overhead"]:
        lines.append(f"| {r['prior']} | {r['ms_deterministic']:.2f} | {r['ms_plain']:.2f} | {r['ms_pyro_bc']:.2f} | "
                     f"{r['ms_pyro_bc'] - r['ms_plain']:.2f} |")
    lines += ["", "## Inference: dense posterior-mean LeNet-5 against the loaded compressed network", "",
              ("The loaded `.bcz` network's convolutions return channels-last tensors (`pyro_bc.nn.layout.Conv2dChannelsLast`); "
               "the dense network is a plain `nn.Sequential` in PyTorch's default layout, and the dense "
               "channels-last column gives it the same layout, so the last column is what compression alone "
               "is worth. Allocator `default`: glibc malloc as a process starts; `kept`: after "
               "`keep_freed_memory()` in the script (`mallopt`: no mmap for large blocks, no heap trimming), so "
               "that large activations are not page-faulted afresh on every call."), "",
              ("| network | batch | allocator | dense ms | dense channels-last ms | compressed ms | speed-up | "
               "speed-up vs dense channels-last |"), "|---|---|---|---|---|---|---|---|"]
    for r in results["inference"]:
        lines.append(f"| {r['model']} | {r['batch']} | {r['allocator']} | {r['ms_dense']:.3f} | "
                     f"{r['ms_dense_channels_last']:.3f} | "
                     f"{r['ms_compressed']:.3f} | {r['speedup']:.1f}x | {r['speedup_vs_channels_last']:.1f}x |")
    lines += ["", *inference_variants_section(results)] if results.get("inference_variants") else []
    lines += ["", *targets_section(results)]
    if (out / "bench_train.json").is_file():
        lines += ["", *training_section(json.loads((out / "bench_train.json").read_text()))]
    if (out / "bench_cnn.json").is_file():
        lines += ["", *cnn_section(json.loads((out / "bench_cnn.json").read_text()))]
    if (out / "bench_peers.json").is_file():
        lines += ["", *peers_section(json.loads((out / "bench_peers.json").read_text()))]
    if (out / "bench_peers_kept.json").is_file():
        lines += ["", *peers_section(json.loads((out / "bench_peers_kept.json").read_text()),
                                     "Against bayesian-torch and TyXe, freed memory kept (as the `pyro-bc` command "
                                     "runs)", "bench_peers_kept.json")]
    if (out / "bench_estimators.json").is_file():
        lines += ["", *estimators_section(json.loads((out / "bench_estimators.json").read_text()))]
    if (out / "bench_estimators_bf16.json").is_file():
        lines += ["", *estimators_section(json.loads((out / "bench_estimators_bf16.json").read_text()),
                                          "Gradient estimators with the variance path in bfloat16",
                                          "bench_estimators_bf16.json")]
    if (out / "zoo.json").is_file():
        lines += ["", *zoo_steps_section(json.loads((out / "zoo.json").read_text()))]
    if distributed:
        lines += ["", "## Data-parallel training (`torchrun`, gloo, CPU)", "",
                  ("Produced by `.venv/bin/python analysis/bench_distributed.py` (LeNet-300-100 gnj, 25,600 "
                   "examples, the second epoch's wall time including rank 0's evaluation)."), "", *distributed]
    (out / "BENCHMARKS.md").write_text("\n".join(lines) + "\n")


TRAIN_TARGETS = {("lenet300", "official"): 0.5, ("lenet300", "deterministic"): 2.5, ("lenet5", "official"): 0.6}
PRIOR_VS_GNJ = 1.15  # ghs and lu steps within this factor of gnj's on the same network


def training_section(r: dict) -> list[str]:
    """The training-speed figures of ``analysis/bench_train.py`` against the official tutorial's step."""
    lines = ["## Training speed against the official tutorial's layers", "",
             (f"Produced by `.venv/bin/python {r['command']}` (figures in `bench_train.json`), one thread. "
              "(o) the official tutorial's GNJ layers and loop, (a) deterministic step, (c) a pyro-bc step in "
              "process, (t) `pyro-bc train`: the second epoch's wall time on a 25,600-example subset (batch 128) "
              "over its steps, the posterior-mean evaluation and the checkpoint write included. The official "
              "code has GNJ layers only: each row's (o) is the GNJ step of the same network."), "",
             ("| model | prior | (o) ms | (a) ms | (c) ms | (t) ms | (t)/(o) | (t)/(a) | (c)/(o) | evaluation per epoch | "
              "checkpoint per epoch |"), "|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in r["steps"]:
        lines.append(f"| {x['model']} | {x['prior']} | {x['ms_official']:.2f} | {x['ms_deterministic']:.2f} | "
                     f"{x['ms_pyro_bc']:.2f} | {x['ms_train_epoch_per_step']:.2f} | "
                     f"{x['ratio_train_to_official']:.2f} | {x['ratio_train_to_deterministic']:.2f} | "
                     f"{x['ratio_in_process_to_official']:.2f} | {x['ms_eval']:.0f} ms "
                     f"({100 * x['eval_fraction']:.1f}%) | {x['ms_checkpoint']:.0f} ms "
                     f"({100 * x['checkpoint_fraction']:.1f}%) |")
    lines += ["", "| figure | target | measured | result |", "|---|---|---|---|"]
    gnj = {x["model"]: x for x in r["steps"] if x["prior"] == "gnj"}
    for (model, against), limit in TRAIN_TARGETS.items():
        if model in gnj:
            value = gnj[model][f"ratio_train_to_{against}"]
            lines.append(f"| {model} gnj (t)/({'o' if against == 'official' else 'a'}) | <= {limit} | {value:.2f} | "
                         f"{_verdict(value, limit)} |")
    for x in r["steps"]:
        if x["prior"] != "gnj" and x["model"] in gnj:
            value = x["ms_train_epoch_per_step"] / gnj[x["model"]]["ms_train_epoch_per_step"]
            lines.append(f"| {x['model']} {x['prior']} (t) / gnj (t) | <= {PRIOR_VS_GNJ} | {value:.2f} | "
                         f"{_verdict(value, PRIOR_VS_GNJ)} |")
    if r.get("profile"):
        names = [k for k in r["profile"][0] if k not in ("model", "ms_step")]
        lines += ["", ("Where a pyro-bc gnj step's time goes (torch.profiler self times per op category, scaled to the "
                       "unprofiled step; the rest of the wall time is Python), ms per step:"), "",
                  "| model | step ms | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        for x in r["profile"]:
            lines.append(f"| {x['model']} | {x['ms_step']:.2f} | " + " | ".join(
                f"{x[k]:.2f} ({100 * x[k] / x['ms_step']:.0f}%)" for k in names) + " |")
    lines += ["", "Threads (a pyro-bc gnj step in process, median and 10th-90th percentiles):", "",
              "| model | threads | median ms | p10 ms | p90 ms |", "|---|---|---|---|---|"]
    for x in r["threads"]:
        lines.append(f"| {x['model']} | {x['threads']} | {x['ms_median']:.2f} | {x['ms_p10']:.2f} | "
                     f"{x['ms_p90']:.2f} |")
    return lines


CNN_TARGET = 2.5  # (c)/(a) of the VGG and ResNet-20 SVI step at batch 64


def cnn_section(r: dict) -> list[str]:
    """The SVI step of VGG and ResNet-20 against their deterministic step, from ``analysis/bench_cnn.py``."""
    lines = ["## SVI step of VGG and ResNet-20 (CIFAR-shaped, batch 64)", "",
             (f"Produced by `.venv/bin/python {r['command']}` (figures in `bench_cnn.json`), one thread, one fixed "
              "random batch of 64 x 3 x 32 x 32. (a) the deterministic step of the same network (its posterior-mean "
              "copy in train mode, BatchNorm included, in PyTorch's default layout, cross-entropy, fused Adam), "
              "(c) a pyro-bc step (`NegativeELBO` + `svi_step`, N = 50,000), timed interleaved after a warm-up "
              "(medians). Weights: those of the Bayesian layers. A width is skipped where a single (c) step is "
              "over the script's time limit, and so are the model's larger widths."),
             *([f"Machine: {r['machine']}."] if r.get("machine") else []),
             *([f"Conditions: {r['note']}"] if r.get("note") else []), "",
             f"| model | prior | width | weights | (a) ms | (c) ms | (c)/(a) | target <= {CNN_TARGET:g} |",
             "|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        head = f"| {x['model']} | {x['prior']} | {x['width']:g} | {x['weights']:,} |"
        if "skipped" in x:
            lines.append(f"{head} skipped: {x['skipped']} | | | |")
            continue
        ratio = x["ratio_pyro_bc_to_deterministic"]
        lines.append(f"{head} {x['ms_deterministic']:.1f} | {x['ms_pyro_bc']:.1f} | {ratio:.2f} | "
                     f"{_verdict(ratio, CNN_TARGET)} |")
    return lines


PEER_COLUMNS = {"dense": "dense", "pyro_bc": "pyro-bc (gnj, local reparameterisation)",
                "bt_reparam": "bayesian-torch, one weight sample per batch", "bt_flipout": "bayesian-torch, Flipout",
                "tyxe_lrt": "TyXe, local reparameterisation"}


#: issue #30: pyro-bc's step at most each peer's on these networks
PEER_TARGETS = {"bt_reparam": ("lenet300", "lenet5", "resnet18"), "bt_flipout": ("lenet300", "lenet5", "resnet18", "vgg"),
                "tyxe_lrt": ("lenet300", "lenet5", "resnet18", "vgg")}


def _seconds(r: dict) -> str:
    reached = r["reached"]
    if reached is None:
        best = r.get("best_val_error_within_groups")
        return "not reached" + ("" if best is None else f" (best {best:.2f}% within the groups)")
    ratio = f", {r['seconds_ratio_to_lrt']:.2f}x" if "seconds_ratio_to_lrt" in r else ""
    return f"{reached['seconds']:.0f} s, {reached['epochs']:g} epochs{ratio}"




def estimators_section(r: dict, title: str = "Gradient estimators", file: str = "bench_estimators.json") -> list[str]:
    """The ``BENCHMARKS.md`` section of ``bench_estimators.json`` (or of another run of that script, ``file``)."""
    load = ", ".join(f"{v:.2f}" for v in r["loadavg_start"]) + " at the start, " + ", ".join(
        f"{v:.2f}" for v in r["loadavg_end"]) + " at the end"
    trained = list(dict.fromkeys(name for x in r["networks"] for name in x["time_to_error"]))  # estimators timed
    lines = [f"## {title}", "",
             (f"Produced by `.venv/bin/python {r['command']}` (figures in `{file}`; the method is in the "
              "script's docstring): gnj prior, batch 128, the estimators of `pyro_bc.infer.estimators` in one process. "
              "Step: median ms [interquartile range] of interleaved rounds on one fixed batch, and the median over "
              "the LRT's; `lrt, LocalReparameterization` is the default path as it was before (the handler entered "
              "directly), against which `lrt` (through `Estimation`) shows the cost of choosing per kind. Time to "
              "error: from the dense start with the fast recipe's settings but a cosine schedule over fewer epochs "
              "(in the network column), the trainings advanced in turns "
              "(one step each), the seconds of each estimator's own steps until its posterior mean's validation "
              "error first reached the target with at most the target's groups kept (log alpha < -3; evaluated every "
              "quarter epoch), and their ratio to the LRT's. "
              "Gradient variance: the summed per-coordinate variance of repeated gradients of -ELBO/N on one fixed "
              "batch at fixed parameters, over the LRT's."),
             f"Machine: {r['machine']}; load average (1, 5, 15 min) {load}.",
             *([f"Conditions: {r['note']}"] if r.get("note") else []), "",
             ("| network | estimator | step ms | step / lrt | time to error | grad. var. / lrt, dense start: means, "
              "log-variances, scales | after the LRT's run |"), "|---|---|---|---|---|---|---|"]
    for x in r["networks"]:
        names = [n for n in x["steps"] if n in x["time_to_error"]] + [n for n in x["steps"]
                                                                       if n not in x["time_to_error"]]
        for name in names:
            s = x["steps"][name]
            step = f"{s['ms_median']:.2f} [{s['ms_q1']:.2f}-{s['ms_q3']:.2f}]"
            tte = _seconds(x["time_to_error"][name]) if name in x["time_to_error"] else ""
            variances = []
            for where in ("dense start", "after the LRT's run"):
                v = x["gradient_variance"].get(where, {}).get(name)
                variances.append("" if v is None else ", ".join(
                    f"{v[g + '_ratio_to_lrt']:.2f}" for g in ("means", "log-variances", "scales")))
            target = (f" to {x['target']:g}%, <= {x['max_groups']} groups (cosine over {x['epochs']} epochs)"
                      if name == names[0] else "")
            lines.append(f"| {x['model']}{target} | {name} | {step} | {s['ratio_to_lrt']:.2f} | {tte} | "
                         f"{variances[0]} | {variances[1]} |")
    lines += ["", ("Other targets, from the same runs' evaluations: seconds (epochs) of each estimator's steps to the first "
                   "evaluation at or below the error with at most the groups kept; the targets are the run's own, 0.2 "
                   "and 0.4 points looser in error, and 5/3 of its groups (a run stopped once it reached the run's "
                   "target, so only looser ones can be read off it)."), "",
              "| network | error <= % | groups <= | " + " | ".join(trained) + " |",
              "|---|---|---|" + "---|" * len(trained)]
    for x in r["networks"]:
        for groups in (x["max_groups"], round(x["max_groups"] * 5 / 3)):
            for error in (x["target"], x["target"] + 0.2, x["target"] + 0.4):
                cells = []
                for name in trained:
                    hit = next((e for e in x["time_to_error"][name]["evaluations"] if e["val_error"] <= error + 1e-9
                                and sum(e["groups_kept"].values()) <= groups), None)
                    cells.append("-" if hit is None else f"{hit['seconds']:.0f} ({hit['epochs']:g})")
                lines.append(f"| {x['model']} | {error:.1f} | {groups} | " + " | ".join(cells) + " |")
    lines += ["", "The LRT's gradient variances themselves: " + "; ".join(
        f"{x['model']}, " + ", ".join(f"{w}: means {x['gradient_variance'][w]['lrt']['means']:.3g}, log-variances "
                                      f"{x['gradient_variance'][w]['lrt']['log-variances']:.3g}"
                                      for w in ("dense start", "after the LRT's run")) for x in r["networks"]) + "."]
    return lines


STEP_TARGET = 2.5  # issue 28: the Bayesian step at most this many dense steps on every family


def zoo_steps_section(r: dict) -> list[str]:
    """The Bayesian step over the dense step on torchvision's families, by estimator, from ``analysis/zoo.py``."""
    rows = [x for x in r["rows"] if "ms_lrt" in x and "ms_lrt-bf16" in x]
    if not rows:
        return []
    command = next(x.get("steps_command", x.get("command")) for x in rows)
    table = [("| model (input) | dense ms | lrt ms (over dense) [per round] | lrt-bf16 ms (over dense) [per round] | "
              "lrt-bf16 / lrt |"), "|---|---|---|---|---|"]

    def cell(x: dict, name: str) -> str:
        rounds = x.get(f"step_ratio_{name}_rounds")
        spread = f" [{rounds[0]:.2f}-{rounds[1]:.2f}]" if rounds else ""
        return f"{x[f'ms_{name}']:.0f} ({x[f'ms_{name}'] / x['ms_dense']:.2f}x){spread}"

    for x in rows:
        table.append(f"| {x['model']} ({x['input']}) | {x['ms_dense']:.0f} | {cell(x, 'lrt')} | {cell(x, 'lrt-bf16')} | "
                     f"{x['ms_lrt-bf16'] / x['ms_lrt']:.2f} |")
    loads = [v for x in rows for v in x.get("loadavg", [])]
    notes = sorted({x["steps_note"] for x in rows if x.get("steps_note")})
    conditions = (f" Conditions: {'; '.join(notes)}." if notes else "") + (
        f" One-minute load average during the rows: {min(loads):.2f}-{max(loads):.2f} (2 cores)." if loads else "")
    relative = sorted(x["ms_lrt-bf16"] / x["ms_lrt"] for x in rows)

    def missed(key: str) -> str:
        over = [f"{x['model']} {x[key]:.2f}x" for x in rows if x[key] > STEP_TARGET]
        return f"{len(rows) - len(over)} of {len(rows)}" + (f" (missed: {', '.join(over)})" if over else "")

    return ["## Bayesian step over dense step on torchvision's families, and the variance path in bfloat16", "",
            (f"Produced by `{command}` (figures in `zoo.json`, keys `ms_*` and `step_ratio_*`; RESULTS.md has the "
             "whole pipeline's table): each family at full size, `weights=None, num_classes=10`, gnj, batch 32 of "
             "64x64 images (Inception 96x96), one thread; a dense copy in PyTorch's default layout and two Bayesian "
             "copies, stepped by `lrt` (the default) and by `lrt-bf16` (the local reparameterisation with its variance "
             "path in bfloat16, docs/METHOD.md 5.6), timed in interleaved rounds after a warm-up, medians. torch "
             f"{r['torch']}, torchvision {r['torchvision']}. Only the ratios within a row mean anything where the "
             "machine was shared; [per round]: the lowest and highest of the rounds' Bayesian step over the same "
             f"round's dense step.{conditions}"), "", *table, "",
            (f"Issue 28's target, the Bayesian step at most {STEP_TARGET}x the dense step: `lrt` meets it on "
             f"{missed('step_ratio_lrt')}; `lrt-bf16` on {missed('step_ratio_lrt-bf16')}. `lrt-bf16` over `lrt` in "
             f"the same rounds: median {statistics.median(relative):.2f} ({relative[0]:.2f}-{relative[-1]:.2f}). "
             "Grouped and depthwise convolutions keep float32 under `lrt-bf16` (oneDNN's bfloat16 grouped kernels "
             "are slower than its float32 ones), so the depthwise-heavy families gain nothing.")]


def peers_section(r: dict, title: str = "Against bayesian-torch and TyXe", figures: str = "bench_peers.json") -> list[str]:
    """pyro-bc's step against bayesian-torch's and TyXe's, from ``analysis/bench_peers.py`` (its JSON ``figures``)."""
    methods = [m for m in PEER_COLUMNS if any(m in x["methods"] for x in r["networks"])]
    load = ", ".join(f"{v:.2f}" for v in r["loadavg_start"]) + " at the start, " + ", ".join(
        f"{v:.2f}" for v in r["loadavg_end"]) + " at the end"
    allocator = {"default": "glibc's malloc as the process starts", "kept": (
        "freed memory kept in the process for every method (`pyro_bc.allocator.keep_freed_memory`, which the "
        "`pyro-bc` command applies to itself)")}[r.get("allocator", "default")]
    lines = [f"## {title}", "",
             (f"Produced by `.venv/bin/python {r['command']}` (figures in `{figures}`), one thread, allocator: "
              f"{allocator}, Adam at "
              f"learning rate {r['lr']:g}, one fixed random batch per network; versions: "
              + ", ".join(f"{k} {v}" for k, v in r["versions"].items()) + ". Each method trains its own copy of the "
              "same network; the methods are timed in interleaved rounds in one process (round-robin, order rotated "
              "every round, a few steps each), after a warm-up. Cells: median ms per step [interquartile range], "
              "and the median over pyro-bc's [the interquartile range of that ratio taken round by round: the "
              "method's median in a round over pyro-bc's in the same round, so that a busy spell of the machine, "
              "which slows both alike, drops out]. bayesian-torch as its README trains (`dnn_to_bnn`, default prior and "
              "posterior settings, loss `cross_entropy + get_kl_loss / batch`: each layer's KL is a mean, so its "
              "loss is not the ELBO); TyXe: `VariationalBNN`, `IIDPrior(Normal(0, 1))` on all but BatchNorm, "
              "`AutoNormal`, `TraceMeanField_ELBO`, inside `tyxe.poutine.local_reparameterization()`"
              + (", run with `pyro.util.deep_getattr` put back (Pyro 1.9 removed it; TyXe 0.0.2 calls it)"
                 if r.get("tyxe_patched") else "") + "."),
             f"Machine: {r['machine']}; load average (1, 5, 15 min) {load}.",
             *([f"Conditions: {r['note']}"] if r.get("note") else []), "",
             "| network (batch) | rounds x steps | " + " | ".join(PEER_COLUMNS[m] for m in methods) + " |",
             "|---|---|" + "---|" * len(methods)]
    for x in r["networks"]:
        cells = []
        for m in methods:
            c = x["methods"].get(m)
            if c is None:
                cells.append("")
                continue
            ratio = ""
            if "ratio_to_pyro_bc" in c and m != "pyro_bc":
                ratio = f", {c['ratio_to_pyro_bc']:.2f}x" + (f" [{c['round_ratio_q1']:.2f}-{c['round_ratio_q3']:.2f}]"
                                                              if "round_ratio_q1" in c else "")
            cells.append(f"{_ms(c['ms_median'])} [{_ms(c['ms_q1'])}-{_ms(c['ms_q3'])}]{ratio}")
        lines.append(f"| {x['label']} ({x['batch']}) | {x['rounds']} x {x['per_round']} | " + " | ".join(cells) + " |")
    targets = [(x, peer) for x in r["networks"] for peer, networks in PEER_TARGETS.items()
               if x["network"] in networks and {"pyro_bc", peer} <= set(x["methods"])]
    if targets:
        lines += ["", ("Targets of issue #30: pyro-bc's median step over the peer's, in the same run, and the "
                       "interquartile range of that ratio round by round; where 1 lies within that range, the result "
                       "says so: the verdict is then within the spread."),
                  "", "| network | against | target | measured | per-round range | result |", "|---|---|---|---|---|---|"]
        for x, peer in targets:
            ours, theirs = x["methods"]["pyro_bc"], x["methods"][peer]
            value = ours["ms_median"] / theirs["ms_median"]
            spread, note = "", ""
            if "round_ratios_to_pyro_bc" in theirs:
                q1, _, q3 = quartiles([1 / v for v in theirs["round_ratios_to_pyro_bc"]])
                spread, note = f"{q1:.2f}-{q3:.2f}", " (1 within the per-round range)" if q1 <= 1 <= q3 else ""
            lines.append(f"| {x['label']} | {PEER_COLUMNS[peer]} | <= 1 | {value:.2f} | {spread} | "
                         f"{_verdict(value, 1.0)}{note} |")
    if any("peak_mib" in c for x in r["networks"] for c in x["methods"].values()):
        floor = next((x["methods"]["dense"]["peak_mib"] for x in r["networks"]
                      if x["network"] == "lenet300" and "peak_mib" in x["methods"].get("dense", {})), None)
        lines += ["", ("Peak memory, MiB: each method built and run for a few steps in a fresh process; its peak "
                       "resident memory (VmHWM, reset after the imports) less the resident memory after the "
                       "imports: the network, optimiser state, activations and allocator caches, and also the "
                       "code and runtime buffers that a first training step touches, a floor common to all methods"
                       + (f" (the dense LeNet-300-100's {floor:.0f} MiB is mostly that floor: its weights, "
                          "gradients and Adam moments are 4 MiB)" if floor else "") + "."), "",
                  "| network (batch) | " + " | ".join(PEER_COLUMNS[m] for m in methods) + " |",
                  "|---|" + "---|" * len(methods)]
        for x in r["networks"]:
            cells = [f"{x['methods'][m]['peak_mib']:.0f}" if "peak_mib" in x["methods"].get(m, {}) else ""
                     for m in methods]
            lines.append(f"| {x['label']} ({x['batch']}) | " + " | ".join(cells) + " |")
    return lines


def _ms(value: float) -> str:
    """Milliseconds to three significant figures (trailing zeros kept), whole milliseconds from 100 up."""
    return f"{value:.{max(0, 2 - math.floor(math.log10(value))) if value > 0 else 2}f}"


def inference_variants_section(results: dict) -> list[str]:
    """The table of :data:`INFERENCE_VARIANTS` and what it shows against the MACs of the two networks."""
    rows = results["inference_variants"]
    macs = results["inference_macs"]
    first = rows[0]
    lines = ["### Inference variants: compilers, frozen graphs, onnxruntime", "",
             (f"{first['model']}, batch {first['batch']}, allocator `{first['allocator']}`, one thread. Each way "
              "of running a network is applied to the dense and to the compressed network; setup is the "
              "preparation plus the first call (where the compilers compile). `torch.compile (inductor, freezing)` "
              "folds the weights into the graph as constants and prepacks them for oneDNN; `TorchScript frozen "
              "+ optimize_for_inference` does the same through TorchScript (deprecated in PyTorch, shown as a "
              f"reference), and its chunked row runs {CHUNK} examples at a time; onnxruntime runs the file "
              "`pyro-bc export --format onnx` writes. MACs per example (`pyro_bc.compression.macs`): dense "
              f"{macs['dense']:,}, compressed {macs['compressed']:,} ({ratio_text(macs)} fewer)."),
             *([f"Measured on its own (`--only inference`): {results['inference_note']}"]
               if results.get("inference_note") else []), "",
             ("| variant | dense ms | compressed ms | speed-up (same variant) | speed-up over eager dense | "
              "compressed GMAC/s | setup s (dense / compressed) |"), "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error']} | | | | | |")
            continue
        gmacs = macs["compressed"] * r["batch"] / r["ms_compressed"] / 1e6
        lines.append(f"| {r['variant']} | {r['ms_dense']:.2f} | {r['ms_compressed']:.2f} | {r['speedup']:.1f}x | "
                     f"{r['speedup_vs_eager_dense']:.1f}x | {gmacs:.1f} | {r['setup_s_dense']:.1f} / "
                     f"{r['setup_s_compressed']:.1f} |")
    best, eager = _best_variant(results), next(r for r in rows if "error" not in r)
    if best:
        dense_rate = macs["dense"] * eager["batch"] / eager["ms_dense"] / 1e6
        lines += ["", (f"Fastest compressed: {best['variant']}, {best['ms_compressed']:.2f} ms, "
                       f"{best['speedup_vs_eager_dense']:.1f}x the eager dense network ({dense_rate:.1f} GMAC/s) "
                       f"but {best['speedup']:.1f}x the dense network run the same way: with {ratio_text(macs)} "
                       "fewer MACs, a speed-up over the eager dense network beyond that ratio comes from running "
                       "the compressed network better than eager PyTorch runs the dense one, not from the "
                       "pruning.")]
    return lines


def ratio_text(macs: dict) -> str:
    """The dense-to-compressed MAC ratio, as ``8.1x``."""
    return f"{macs['dense'] / macs['compressed']:.1f}x"


def _best_variant(results: dict) -> dict | None:
    """The inference variant whose compressed network is fastest."""
    timed = [r for r in results.get("inference_variants", []) if "error" not in r]
    return min(timed, key=lambda r: r["ms_compressed"]) if timed else None


def _verdict(value: float, limit: float, at_most: bool = True) -> str:
    met = value <= limit if at_most else value >= limit
    return "met" if met else f"missed by {abs(value - limit):.2f}"


def targets_section(results: dict) -> list[str]:
    """Each target of the speed issue against the measured figures, and, where one is missed, the
    measured figures that show why."""
    lines = ["## Targets", "",
             "| figure | target | measured | result |", "|---|---|---|---|"]
    for r in results["steps"]:
        name = f"{r['model']} {r['prior']}"
        limit = STEP_LIMITS["deterministic"][r["model"]]
        for label, value, target, verdict in (
                ("(c)/(b)", r["ratio_pyro_bc_to_plain"], f"<= {STEP_LIMITS['plain']}",
                 _verdict(r["ratio_pyro_bc_to_plain"], STEP_LIMITS["plain"])),
                ("(c)/(a)", r["ratio_pyro_bc_to_deterministic"], f"<= {limit}",
                 _verdict(r["ratio_pyro_bc_to_deterministic"], limit)),
                ("peak memory (c)/(b)", r["memory_ratio"], f"<= {STEP_LIMITS['memory']}",
                 _verdict(r["memory_ratio"], STEP_LIMITS["memory"]))):
            lines.append(f"| {name} {label} | {target} | {value:.2f} | {verdict} |")
    for r in results["inference"]:
        if r["batch"] == 1000:
            lines.append(f"| {r['model']}, batch 1000, {r['allocator']} allocator: speed-up | "
                         f">= {SPEEDUP_TARGET:g}x | {r['speedup']:.1f}x | "
                         f"{_verdict(r['speedup'], SPEEDUP_TARGET, at_most=False)} |")
    best = _best_variant(results)
    if best:
        lines.append(f"| {best['model']}, batch {best['batch']}, {best['allocator']} allocator, fastest variant "
                     f"({best['variant']}): speed-up over eager dense | >= {COMPASS_SPEEDUP:g}x | "
                     f"{best['speedup_vs_eager_dense']:.1f}x | "
                     f"{_verdict(best['speedup_vs_eager_dense'], COMPASS_SPEEDUP, at_most=False)} |")
    lines += ["", *_causes(results)]
    return lines


def _causes(results: dict) -> list[str]:
    """Why the missed targets are missed, in the measured figures' own terms."""
    causes = []
    overhead = {r["prior"]: r["ms_pyro_bc"] - r["ms_plain"] for r in results["overhead"]}
    for r in results["steps"]:
        gap = r["ms_pyro_bc"] - r["ms_plain"]
        if r["ratio_pyro_bc_to_plain"] > STEP_LIMITS["plain"]:
            line = f"- {r['model']} {r['prior']} (c)/(b): (c) - (b) is {gap:.2f} ms at full size"
            if r["prior"] in overhead:
                line += (f", and {overhead[r['prior']]:.2f} ms of it is left on the bookkeeping network: Pyro's "
                         "per-step cost of sample sites, distribution objects and their autograd nodes, which "
                         "does not shrink with the arithmetic.")
            else:
                line += "; this run did not measure the bookkeeping network for this prior."
            causes.append(line)
        floor = r["ms_plain"] / r["ms_deterministic"]
        limit = STEP_LIMITS["deterministic"][r["model"]]
        if r["ratio_pyro_bc_to_deterministic"] > limit and floor > limit:
            causes.append(f"- {r['model']} {r['prior']} (c)/(a): the plain-PyTorch floor (b)/(a) is already "
                          f"{floor:.2f}, above {limit}: the local reparameterisation computes a mean and a "
                          "variance preactivation per layer, and their backward passes, where the "
                          "deterministic step has one.")
    inference = {(r["allocator"], r["batch"]): r for r in results["inference"]}
    default, kept = inference.get(("default", 1000)), inference.get(("kept", 1000))
    if default and kept and default["speedup"] < SPEEDUP_TARGET <= kept["speedup"]:
        causes.append(f"- Inference under glibc's default allocator ({default['speedup']:.1f}x): large "
                      "activations are mapped afresh and page-faulted on every call, which costs the dense "
                      f"network alike; with freed memory kept the speed-up is {kept['speedup']:.1f}x "
                      "(the README gives the environment variables that do this for any process).")
    best = _best_variant(results)
    if best and best["speedup_vs_eager_dense"] < COMPASS_SPEEDUP:
        macs = results["inference_macs"]
        ratio = macs["dense"] / macs["compressed"]
        rate = {k: macs[k] * best["batch"] / ms / 1e6 for k, ms in
                (("dense", next(r for r in results["inference_variants"] if "error" not in r)["ms_dense"]),
                 ("compressed", best["ms_compressed"]))}
        causes.append(f"- Inference {COMPASS_SPEEDUP:g}x over the dense network: the compressed network does "
                      f"{ratio:.1f}x fewer MACs, so {COMPASS_SPEEDUP:g}x needs it to run "
                      f"{COMPASS_SPEEDUP / ratio:.2f}x as many MACs per second as the eager dense network; it runs "
                      f"{rate['compressed']:.1f} GMAC/s at best ({best['variant']}) against the dense network's "
                      f"{rate['dense']:.1f}. Its layers are narrow (8 and 13 channels), which fills the vector "
                      "units less well than the dense network's 20 and 50; the same variant speeds the dense "
                      f"network up too ({best['speedup']:.1f}x is compression alone under it).")
    return ["Causes of the missed targets:", "", *causes] if causes else []


if __name__ == "__main__":
    sys.exit(main())


