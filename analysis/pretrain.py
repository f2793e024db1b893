"""Pretrain a built-in network deterministically, in plain PyTorch, for ``pyro-bc train --init-from``.

    .venv/bin/python analysis/pretrain.py --model lenet5 --epochs 8 --out runs/lenet5-dense.pt

Beside the state_dict, ``<out>.json`` holds each epoch's validation error and seconds. The dense network is the
Bayesian network's posterior-mean copy, so its ``state_dict`` keys are the Bayesian
layers' names (``conv1.weight``, ``fc1.bias``, ...) and ``--init-from`` matches them by name. Adam, cross-entropy,
the embedded MNIST's training split (the validation split held out, as training holds it out: ``--val-size``, 0
for none, and then no validation error is recorded), one thread.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from models import BUILTIN_MODELS, build_network
from pyro_bc.atomic import atomic_write_bytes, atomic_write_text
from pyro_bc.data.datasets import iterate_minibatches, load_mnist
from pyro_bc.defaults import VAL_SIZE
from pyro_bc.metrics.evaluate import error_percent


def pretrain(model: str, epochs: int, batch_size: int = 128, lr: float = 1e-3, seed: int = 0,
             data: str | None = None, val_size: int = VAL_SIZE) -> tuple[torch.nn.Module, list[dict]]:
    """The dense network after ``epochs`` epochs, and per epoch its validation error (where there is a validation
    split) and seconds."""
    torch.manual_seed(seed)
    net = build_network(model).posterior_mean_network().train()
    mnist = load_mnist(data, val_size=val_size, seed=seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    history = []
    for epoch in range(epochs):
        started = time.perf_counter()
        for x, y in iterate_minibatches(mnist.train, batch_size, torch.Generator().manual_seed(seed * 100_003 + epoch)):
            loss = F.cross_entropy(net(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        net.eval()
        record = {"epoch": epoch + 1}
        if mnist.validation is not None:
            record["val_error"] = error_percent(net, mnist.val.x, mnist.val.y)
        history.append({**record, "seconds": time.perf_counter() - started})
        net.train()
        error = f"validation error {record['val_error']:.2f}% " if "val_error" in record else ""
        print(f"epoch {epoch + 1}: {error}({history[-1]['seconds']:.1f}s)", flush=True)
    return net.eval(), history


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=BUILTIN_MODELS, required=True)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=None)
    parser.add_argument("--val-size", type=int, default=VAL_SIZE, help="training images held out (0: none)")
    parser.add_argument("--out", required=True, help="the state_dict file to write (atomically)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a perturbation of the numerics: the "
                        "sums of a convolution or a matrix product run in another order)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    net, history = pretrain(args.model, args.epochs, args.batch_size, args.lr, args.seed, args.data, args.val_size)
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    atomic_write_bytes(args.out, buffer.getvalue())
    history_path = Path(args.out).with_suffix(".json")  # per epoch: validation error (if any), seconds
    atomic_write_text(history_path, json.dumps(history, indent=1))
    print(f"wrote {args.out} and {history_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
