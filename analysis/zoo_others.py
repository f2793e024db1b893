"""Networks from the two other model libraries people bring, timm and Hugging Face transformers, as a new user would:
bayesianize -> compress with nothing pruned (the file against the original network: does pyro-bc compute what the
user's network computes?) -> fit (one short epoch on random data) -> compress at half the weights (the file
against :func:`pyro_bc.pruned_network`).

    .venv/bin/pip install --no-deps timm==1.0.31 transformers==5.25.0 huggingface_hub safetensors pyyaml tokenizers
    .venv/bin/python analysis/zoo_others.py                  # every network; writes zoo_others.json and the table
    .venv/bin/python analysis/zoo_others.py resnet18 bert    # some

Neither library is a dependency of pyro-bc, nor imported by it: they are what the script tests it on. Nothing is
downloaded (random initialisation; Hugging Face models from small configurations). Each row records the Bayesian
layers, the file's relative L2 distance from the original network with every group kept (the weights rounded to
the variance rule's bits: a few thousandths; a network computed wrongly is off by orders of magnitude), the weights
kept, cr_file and the file's distance from the pruned network; or the first thing that failed, in one line.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import pyro_bc
from pyro_bc.atomic import atomic_write_text

HERE = Path(__file__).parent
TIMM = ["resnet18", "efficientnet_b0", "tf_efficientnet_b0", "mobilenetv3_small_050", "mobilenetv4_conv_small",
        "convnext_atto", "regnetx_002", "regnety_002", "ghostnet_050", "rexnet_100", "lcnet_050", "tinynet_e",
        "ese_vovnet19b_dw", "resnest14d", "res2net50_14w_8s", "nf_resnet26", "repvgg_a0", "poolformer_s12",
        "fastvit_t8", "hrnet_w18_small", "dla34", "densenet121", "skresnet18", "cspresnet50", "dpn68", "mixnet_s",
        "hardcorenas_a", "selecsls42b", "efficientvit_b0", "edgenext_xx_small", "vit_tiny_patch16_224",
        "mobilevit_xxs"]
HUGGING_FACE = ["bert", "distilbert", "roberta", "gpt2"]
IMAGE, TOKENS, VOCABULARY, CLASSES = (3, 64, 64), 12, 100, 5


class Logits(nn.Module):
    """A Hugging Face classifier as pyro-bc takes it: token ids in, logits out (its output is a dict-like record)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits


def build(name: str) -> tuple[nn.Module, tuple[int, ...], torch.dtype | None]:
    """The network, one example's shape and the input type (None: images)."""
    if name in HUGGING_FACE:
        import transformers as hf

        small = {"vocab_size": VOCABULARY, "num_labels": CLASSES}
        config = {
            "bert": lambda: hf.BertForSequenceClassification(hf.BertConfig(
                hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                max_position_embeddings=16, **small)),
            "distilbert": lambda: hf.DistilBertForSequenceClassification(hf.DistilBertConfig(
                dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=16, **small)),
            "roberta": lambda: hf.RobertaForSequenceClassification(hf.RobertaConfig(
                hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                max_position_embeddings=20, **small)),
            "gpt2": lambda: hf.GPT2ForSequenceClassification(hf.GPT2Config(
                n_embd=32, n_layer=2, n_head=2, n_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=1,
                **small)),
        }[name]
        return Logits(config().eval()), (TOKENS,), torch.int64
    import timm

    size = {"img_size": IMAGE[1]} if name.startswith("vit") else {}
    return timm.create_model(name, pretrained=False, num_classes=CLASSES, **size), IMAGE, None


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def row(name: str) -> dict:
    torch.manual_seed(0)
    model, shape, dtype = build(name)
    model.eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, VOCABULARY, (24, *shape), generator=g) if dtype else torch.randn(24, *shape, generator=g)
    y = torch.randint(0, CLASSES, (24,), generator=g)
    train, val = (x[:16], y[:16]), (x[16:], y[16:])
    start = time.perf_counter()
    net = pyro_bc.bayesianize(model, input_shape=shape, input_dtype=dtype)
    with tempfile.TemporaryDirectory() as d, torch.no_grad():
        pyro_bc.compress(net, f"{d}/whole.bcz", thresholds=[10.0] * len(net.layers))  # every group kept
        whole = relative(pyro_bc.load(f"{d}/whole.bcz")(val[0]), model(val[0]))
        with torch.enable_grad():
            pyro_bc.fit(net, train, epochs=1, batch_size=8, progress=False)
        summary = pyro_bc.compress(net, f"{d}/half.bcz", val, max_weights_kept=50.0, train=train)
        pruned = relative(pyro_bc.load(f"{d}/half.bcz")(val[0]),
                          pyro_bc.pruned_network(net, summary, train=train)(val[0]))
    return {"network": name, "bayesian_layers": len(net.layers), "file_vs_original_all_kept": whole,
            "weights_kept_percent": 100 * summary["weights_kept_fraction"], "cr_file": summary["cr_file"],
            "file_vs_pruned": pruned, "seconds": time.perf_counter() - start}


def render(rows: list[dict], command: str) -> str:
    lines = [(f"Produced by `{command}` (figures in `zoo_others.json`; the method in the script's docstring). "
              f"torch {torch.__version__}, one thread."), "",
             "| network | Bayesian layers | file vs original, all kept | weights kept | cr_file | file vs pruned |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['network']} | refused: {r['failed']} | | | | |")
        else:
            lines.append(f"| {r['network']} | {r['bayesian_layers']} | {r['file_vs_original_all_kept']:.1e} | "
                         f"{r['weights_kept_percent']:.1f}% | {r['cr_file']:.1f} | {r['file_vs_pruned']:.1e} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("networks", nargs="*", default=TIMM + HUGGING_FACE)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    rows = []
    for name in args.networks:
        try:
            rows.append(row(name))
        except Exception as e:  # noqa: BLE001  (a network pyro-bc refuses is a row saying why)
            rows.append({"network": name, "failed": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"})
        print(json.dumps(rows[-1]), flush=True)
    command = shlex.join([".venv/bin/python", "analysis/zoo_others.py", *sys.argv[1:]])
    atomic_write_text(HERE / "zoo_others.json", json.dumps({"command": command, "rows": rows}, indent=1) + "\n")
    atomic_write_text(HERE / "zoo_others.md", render(rows, command))


if __name__ == "__main__":
    main()
