"""Benchmark: the fused LRT ops of :mod:`pyro_bc.infer.fused` against their plain-autograd references.

Times forward + backward of both outputs, the draw and the weight KL against ``N(0, 1)`` (gradients of every
input that a training step differentiates: the layer's input unless it is the data, the scales ``z``, the
weight means and log-variances, the bias means and variances; the KL's upstream gradient is the ELBO's
``1 / N``, so the fused backward folds it in as in training) at the layer
sizes of LeNet-300-100 (batch 128, ``z`` on the inputs) and LeNet-5's convolutions (batch 128, ``z`` on
the output channels; the second convolution's input and upstream gradient on channels-last, as in training),
on one thread. The two implementations are timed interleaved (fused, reference,
fused, ...) after a warm-up, and medians are reported, so a busier machine slows both alike.

Run from the repository root::

    OMP_NUM_THREADS=1 .venv/bin/python analysis/bench_fused.py [--repeats 200] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

from pyro_bc.infer.fused import lrt_conv2d, lrt_conv2d_reference, lrt_linear, lrt_linear_reference

BATCH = 128
N_DATA = 55_000  # the ELBO weighs the KL by 1 / N against the batch's mean log-likelihood
LINEAR = [(784, 300), (300, 100), (100, 10)]
# (C_in, C_out, kernel, input height/width)
CONV = [(1, 20, 5, 28), (20, 50, 5, 12)]


def _linear_case(d_in: int, d_out: int, first: bool, device: torch.device):
    gen = torch.Generator().manual_seed(d_in * 1000 + d_out)

    def r(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    x = r(BATCH, d_in).relu().requires_grad_(not first)
    z = (1 + 0.1 * r(BATCH, d_in)).requires_grad_()
    mu = (r(d_out, d_in) / d_in**0.5).requires_grad_()
    logvar = (r(d_out, d_in) - 9).requires_grad_()
    b_mu, b_var = r(d_out).requires_grad_(), torch.exp(r(d_out) - 9).requires_grad_()
    eps, g = r(BATCH, d_out), r(BATCH, d_out)
    args = (x, z, mu, logvar, b_mu, b_var, eps)
    return args, {}, g


def _conv_case(c_in: int, c_out: int, k: int, hw: int, first: bool, device: torch.device):
    gen = torch.Generator().manual_seed(c_in * 1000 + c_out)

    def r(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    x = r(BATCH, c_in, hw, hw).relu()
    if not first:  # LocalReparameterization hands convolution outputs on channels-last, and pooling keeps it
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(not first)
    z = (1 + 0.1 * r(BATCH, c_out)).requires_grad_()
    mu = (r(c_out, c_in, k, k) / (c_in * k * k) ** 0.5).requires_grad_()
    logvar = (r(c_out, c_in, k, k) - 9).requires_grad_()
    b_mu, b_var = r(c_out).requires_grad_(), torch.exp(r(c_out) - 9).requires_grad_()
    out = hw - k + 1
    eps, g = r(BATCH, c_out, out, out), r(BATCH, c_out, out, out)
    if not first:
        g = g.contiguous(memory_format=torch.channels_last)
    return (x, z, mu, logvar, b_mu, b_var, eps), {}, g


def _step(fn, args, kwargs, g, device: torch.device) -> float:
    inputs = [a for a in args if a is not None and a.requires_grad]
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    y, kl = fn(*args, **kwargs)
    torch.autograd.grad([y, kl], inputs, [g, torch.full_like(kl, 1.0 / N_DATA)])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _time_pair(fused, reference, args, kwargs, g, repeats: int, device: torch.device) -> tuple[float, float]:
    for _ in range(max(5, repeats // 10)):  # warm-up
        _step(fused, args, kwargs, g, device)
        _step(reference, args, kwargs, g, device)
    t_f, t_r = [], []
    for _ in range(repeats):
        t_f.append(_step(fused, args, kwargs, g, device))
        t_r.append(_step(reference, args, kwargs, g, device))
    return 1e3 * statistics.median(t_f), 1e3 * statistics.median(t_r)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--allocator", default="default", choices=["default", "kept"],
                        help="glibc malloc as a process starts, or keeping freed memory (pyro_bc.allocator)")
    opts = parser.parse_args(argv)
    if opts.allocator == "kept":
        from pyro_bc.allocator import keep_freed_memory

        if not keep_freed_memory():
            parser.error("--allocator kept needs glibc")
    torch.set_num_threads(1)
    torch.set_default_dtype(getattr(torch, opts.dtype))
    device = torch.device(opts.device)
    rows = []
    for i, (d_in, d_out) in enumerate(LINEAR):
        args, kwargs, g = _linear_case(d_in, d_out, i == 0, device)
        f, r = _time_pair(lrt_linear, lrt_linear_reference, args, kwargs, g, opts.repeats, device)
        rows.append((f"linear {d_in}->{d_out}", f, r))
    for i, (c_in, c_out, k, hw) in enumerate(CONV):
        args, kwargs, g = _conv_case(c_in, c_out, k, hw, i == 0, device)
        f, r = _time_pair(lrt_conv2d, lrt_conv2d_reference, args, kwargs, g, opts.repeats, device)
        rows.append((f"conv {c_in}->{c_out} {k}x{k} on {hw}x{hw}", f, r))
    command = "OMP_NUM_THREADS=1 .venv/bin/python analysis/bench_fused.py " + " ".join(sys.argv[1:] if argv is None
                                                                                       else argv)
    print(f"`{command.strip()}` (torch {torch.__version__}, {device}, {opts.dtype}, {opts.allocator} allocator, "
          f"batch {BATCH}, "
          f"{torch.get_num_threads()} thread(s), median of {opts.repeats} interleaved forward+backward)\n")
    print("| layer | fused ms | reference ms | speed-up |")
    print("|---|---:|---:|---:|")
    for name, f, r in rows:
        print(f"| {name} | {f:.3f} | {r:.3f} | {r / f:.2f}x |")
    total_f, total_r = sum(row[1] for row in rows[:3]), sum(row[2] for row in rows[:3])
    print(f"| LeNet-300-100 (sum) | {total_f:.3f} | {total_r:.3f} | {total_r / total_f:.2f}x |")
    total_f, total_r = sum(row[1] for row in rows[3:]), sum(row[2] for row in rows[3:])
    print(f"| LeNet-5 convs (sum) | {total_f:.3f} | {total_r:.3f} | {total_r / total_f:.2f}x |")


if __name__ == "__main__":
    main()
