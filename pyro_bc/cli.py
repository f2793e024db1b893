"""``pyro-bc``: train, compress, evaluate, export, recode, report, demo. Thin over the library."""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from models import BUILTIN_MODELS
from pyro_bc.allocator import keep_freed_memory
from pyro_bc.defaults import SLAB_SCALE, TAU0, VAL_SIZE
from pyro_bc.errors import BCError, ConfigError
from pyro_bc.infer.estimators import DEFAULT as DEFAULT_ESTIMATOR
from pyro_bc.infer.estimators import ESTIMATORS, EstimatorChoice
from pyro_bc.priors import PRIORS
from pyro_bc.runs.training import train
from pyro_bc.train.checkpoint import load_checkpoint
from pyro_bc.train.distributed import is_main_process
from pyro_bc.train.run_dir import CHECKPOINT, PYTHON_MODEL, TrainConfig
from pyro_bc.train.schedule import SCHEDULES

if TYPE_CHECKING:
    from pyro_bc.compression.thresholds import ThresholdRule


class Parser(argparse.ArgumentParser):
    """An argument parser whose mistakes are one line, ``pyro-bc COMMAND: error: MESSAGE`` (exit 2), like every
    other error of the command line; the usage block is for ``--help``."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def _int_at_least(least: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
        if value < least:
            raise argparse.ArgumentTypeError(f"{text!r} must be at least {least}")
        return value
    return parse


_positive_int = _int_at_least(1)
_nonnegative_int = _int_at_least(0)


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _positive_float(text: str) -> float:
    value = _finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def _percentage(text: str) -> float:
    value = _positive_float(text)
    if value > 100:
        raise argparse.ArgumentTypeError(f"{text!r} is over 100 (a percentage)")
    return value


def _nonnegative_float(text: str) -> float:
    value = _finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return value


def _model_name(text: str) -> str:
    if text in BUILTIN_MODELS or text.endswith(".py"):
        return text
    raise argparse.ArgumentTypeError(f"unknown model {text!r}: choose {', '.join(BUILTIN_MODELS)} or a .py file")


def _layer_clip_var(text: str) -> tuple[str, float | None]:
    """``LAYER=V`` (a positive variance) or ``LAYER=none``."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r} is not LAYER=VARIANCE (e.g. fc1=0.04, or fc1=none)")
    return name, None if value.strip().lower() == "none" else _positive_float(value)


def _prior_option(text: str) -> tuple[str, float]:
    """``NAME=VALUE``: an option of the prior and its number (the prior checks both)."""
    name, sep, value = text.partition("=")
    try:
        number = float(value)
    except ValueError:
        number = None
    if not sep or not name.strip() or number is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=NUMBER (e.g. tau0=1e-5)")
    return name.strip(), number


def _estimator(text: str) -> str:
    """An estimator choice (``flipout``, ``conv2d=flipout,linear=lrt``) in its canonical form."""
    try:
        return str(EstimatorChoice.parse(text))
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e))


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=_model_name, default=None,
                   help="lenet300 (the default), lenet5, vgg, resnet20 or a network file; with --resume, the run's")
    p.add_argument("--prior", choices=PRIORS, default=None, help="gnj (the default), ghs, lu or rhs; with --resume, "
                                                                 "the run's")
    p.add_argument("--width", type=_positive_float, default=None, metavar="W",
                   help="channel multiplier of vgg and resnet20 (default 1)")
    p.add_argument("--epochs", type=_nonnegative_int, default=10)
    p.add_argument("--batch-size", type=_positive_int, default=128)
    p.add_argument("--lr", type=_positive_float, default=1e-3)
    p.add_argument("--variance-lr-factor", type=_positive_float, default=1.0, metavar="F",
                   help="learning rate of the log-variances and group scales: lr times F (they set the pace of "
                        "pruning)")
    p.add_argument("--estimator", type=_estimator, default=DEFAULT_ESTIMATOR, metavar="NAME|KIND=NAME,...",
                   help=f"gradient estimator of every layer ({', '.join(ESTIMATORS)}; default {DEFAULT_ESTIMATOR}), or "
                        "per layer kind, e.g. conv2d=flipout,linear=lrt; with --resume, the run's")
    p.add_argument("--seed", type=_nonnegative_int, default=0)
    p.add_argument("--data", default=None, help="folder with MNIST IDX files, CIFAR-10 python batches, "
                                                "train.npz and test.npz, or images in train/<class>/ and test/<class>/ "
                                                "(default: the embedded MNIST)")
    p.add_argument("--subset", type=_positive_int, default=None, help="train on the first N training examples")
    p.add_argument("--val-size", type=_nonnegative_int, default=VAL_SIZE)
    p.add_argument("--warmup-epochs", "--kl-warmup-epochs", dest="warmup_epochs", type=_nonnegative_int, default=0,
                   metavar="N", help="KL weight rising linearly from 0 to 1 over the first N epochs (a KL warm-up)")
    p.add_argument("--augment", action="store_true",
                   help="random crops of the images padded by 4 zero pixels, and horizontal flips")
    p.add_argument("--lr-schedule", choices=SCHEDULES, default="constant",
                   help="cosine: to 0 over the epochs; step: x0.1 at 50%% and again at 75%% of the epochs")
    p.add_argument("--clip-grad-norm", type=_positive_float, default=None, metavar="G",
                   help="scale the gradients down to total norm G before each step (off by default)")
    p.add_argument("--clip-var", type=_layer_clip_var, action="append", default=[], metavar="LAYER=V",
                   help="clip LAYER's weight and bias variances at V after each step (none: no clip); repeatable")
    p.add_argument("--eval-every", type=_positive_int, default=1,
                   help="epochs between evaluations of the posterior-mean network (the last epoch always)")
    p.add_argument("--prior-option", type=_prior_option, action="append", default=[], metavar="NAME=VALUE",
                   help="an option of the prior (tau0 for ghs and rhs, slab_scale for rhs; gnj and lu take none); "
                        "repeatable; the prior refuses one it does not take")
    p.add_argument("--tau0", type=_positive_float, default=None,
                   help=f"horseshoe global scale (ghs, rhs; default {TAU0:g}): --prior-option tau0=T")
    p.add_argument("--slab-scale", type=_positive_float, default=None,
                   help=f"regularised horseshoe slab width (rhs; default {SLAB_SCALE:g}): --prior-option slab_scale=C")
    p.add_argument("--init-from", default=None, help="deterministic network state_dict to start the means from")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=_positive_int, default=1)


def _model_and_prior(args: argparse.Namespace) -> tuple[str, str]:
    """``--model`` and ``--prior`` as given (a model file by its absolute path, so that the run's other commands find
    it from any folder); else a resumed run's (from its checkpoint), else the defaults."""
    model = str(Path(args.model).resolve()) if args.model and args.model.endswith(".py") and Path(args.model).is_file() \
        else args.model
    if args.resume and (model is None or args.prior is None):
        saved = load_checkpoint(Path(args.out) / CHECKPOINT)["config"]
        if saved["model"] != PYTHON_MODEL:  # a run of pyro_bc.fit is refused by train, naming the way to resume it
            return model or saved["model"], args.prior or saved["prior"]
    return model or "lenet300", args.prior or "gnj"


def _prior_options(args: argparse.Namespace) -> dict[str, float]:
    """``--prior-option`` and its aliases ``--tau0``, ``--slab-scale``, as one mapping for the prior to check."""
    options = dict(args.prior_option)
    options.update({name: value for name, value in (("tau0", args.tau0), ("slab_scale", args.slab_scale))
                    if value is not None})
    return options


def _train_config(args: argparse.Namespace) -> TrainConfig:
    model, prior = _model_and_prior(args)
    return TrainConfig(model=model, prior=prior, width=args.width, epochs=args.epochs,
                       batch_size=args.batch_size,
                       lr=args.lr, variance_lr_factor=args.variance_lr_factor, seed=args.seed,
                       data=args.data and str(Path(args.data).resolve()),  # absolute: found from any folder
                       subset=args.subset, val_size=args.val_size,
                       warmup_epochs=args.warmup_epochs, eval_every=args.eval_every,
                       prior_options=_prior_options(args),
                       init_from=args.init_from,
                       device=args.device, threads=args.threads, augment=args.augment,
                       lr_schedule=args.lr_schedule, clip_grad_norm=args.clip_grad_norm, clip_var=dict(args.clip_var),
                       estimator=args.estimator)


def cmd_train(args: argparse.Namespace) -> int:
    """``pyro-bc train``: fit the model/guide pair and write the run directory."""
    config = _train_config(args)
    last = train(config, args.out, resume=args.resume)
    if is_main_process():  # under torchrun, rank 0 speaks for the run
        error = (f", val error {last['val_error']:.2f}%" if "val_error" in last else
                 " (no validation examples)" if last else " (initialised only)")
        print(f"trained {config.model}/{config.prior}: {last.get('epoch', 0)} epochs{error}, run directory {args.out}")
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    """``pyro-bc compress``: prune by the chosen threshold rule, write the ``.bcz`` and ``MODEL.json``."""
    from pyro_bc.compression.pipeline import format_table

    # no threshold option: the priors' defaults, or for a fine-tuning run the structure it was given
    from pyro_bc.runs.compressing import compress_run
    summary = compress_run(args.run_dir, args.out, rule=_threshold_rule(args), data=args.data,
                           fold=False if args.no_fold else None, bits_budget=args.bits_budget,
                           predictive_samples=args.predictive_samples, keep_variance=args.keep_variance)
    print(format_table(summary))
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.json')}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``pyro-bc evaluate``: print a ``.bcz`` file's test error, NLL, Brier score, ECE and timings (and, with
    ``--samples K``, the compressed Bayesian network's metrics) as one JSON object."""
    from pyro_bc.runs.compressing import evaluate_file

    print(json.dumps(evaluate_file(args.model, data=args.data, samples=args.samples,
                                   rotation=args.shift == "rotate", ood=args.ood)))
    return 0


def cmd_recode(args: argparse.Namespace) -> int:
    """``pyro-bc recode``: rewrite a ``.bcz`` file in the newest format with the same codes."""
    from pyro_bc.bcz.codec import read_bcz, recode
    from pyro_bc.bcz.v2 import VERSION
    from pyro_bc.bcz.v3 import VERSION as VERSION_WITH_VARIANCES

    size = recode(args.model, args.out, bias=args.bias)
    version = VERSION if read_bcz(args.out).variances is None else VERSION_WITH_VARIANCES
    print(f"wrote {args.out} (.bcz version {version}, {size} bytes)")
    return 0


def _add_recode_parser(sub) -> None:
    from pyro_bc.bcz.codec import BIAS_ROUNDING

    p = sub.add_parser("recode", help="rewrite a .bcz file in the newest format with the same codes")
    p.add_argument("model", help="a .bcz file of any supported version")
    p.add_argument("--out", required=True, help="the .bcz file to write (atomically; may be the input)")
    p.add_argument("--bias", choices=BIAS_ROUNDING, default="float32",
                   help="round the biases first (float32: keep them exactly, the default)")
    p.set_defaults(func=cmd_recode)


def cmd_export(args: argparse.Namespace) -> int:
    """``pyro-bc export``: write a ``.bcz`` file's network as ONNX or a ``torch.export`` program."""
    from pyro_bc.bcz.export import export_bcz

    size = export_bcz(args.model, args.out, args.format)
    print(f"wrote {args.out} ({args.format}, {size} bytes, dynamic batch dimension)")
    return 0


def _add_export_parser(sub) -> None:
    from pyro_bc.bcz.export import FORMATS

    p = sub.add_parser("export", help="write a .bcz file's network as ONNX or a torch.export program (.pt2)")
    p.add_argument("model", help="a .bcz file")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="the file to write")
    p.set_defaults(func=cmd_export)


def cmd_finetune(args: argparse.Namespace) -> int:
    """``pyro-bc finetune``: compress a run's network by the chosen rule, then train its kept weights further."""
    from pyro_bc.compression.thresholds import PriorDefault
    from pyro_bc.runs.training import finetune_run

    rule = _threshold_rule(args) or PriorDefault()
    last = finetune_run(args.run_dir, args.out, epochs=args.epochs, lr=args.lr, lr_schedule=args.lr_schedule,
                        warmup_epochs=args.kl_warmup_epochs, eval_every=args.eval_every, threads=args.threads,
                        device=args.device, rule=rule, fold=False if args.no_fold else None, resume=args.resume)
    error = f", val error {last['val_error']:.2f}%" if "val_error" in last else ""
    print(f"fine-tuned {args.run_dir}: {last.get('epoch', 0)} epochs{error}, run directory {args.out}")
    return 0


def _add_threshold_options(p: argparse.ArgumentParser) -> None:
    """The threshold rules' options, one at most (none: the priors' defaults, or a fine-tuned run's structure)."""
    how = p.add_mutually_exclusive_group()
    how.add_argument("--thresholds", type=_finite_float, nargs="+", metavar="T", help="log alpha threshold per layer")
    how.add_argument("--auto", choices=("gap",), help="threshold at the gap of each layer's log alpha histogram")
    how.add_argument("--max-error-increase", type=_nonnegative_float, metavar="P",
                     help="most compressing thresholds within P points of validation error")
    how.add_argument("--max-weights-kept", type=_percentage, metavar="P",
                     help="least pruned network keeping at most P%% of the weights (one threshold for all layers)")


def _threshold_rule(args: argparse.Namespace) -> ThresholdRule | None:
    """The rule the threshold options name, or None where none is given."""
    from pyro_bc.compression.thresholds import rule_from_options

    options = (args.thresholds, args.auto, args.max_error_increase, args.max_weights_kept)
    return None if options == (None,) * len(options) else rule_from_options(*options)


def _add_finetune_parser(sub) -> None:
    p = sub.add_parser("finetune", help="prune a run as compress would, then train the kept weights further (SVI, "
                                        "the pruned ones held at zero)")
    p.add_argument("run_dir", help="the run directory to start from (written by 'pyro-bc train')")
    p.add_argument("--out", required=True, help="the new run directory")
    p.add_argument("--epochs", type=_nonnegative_int, required=True)
    _add_threshold_options(p)
    p.add_argument("--no-fold", action="store_true", help="start without the fold of pruned inputs into the biases")
    p.add_argument("--lr", type=_positive_float, default=1e-4, help="learning rate (default 1e-4)")
    p.add_argument("--lr-schedule", choices=SCHEDULES, default="constant")
    p.add_argument("--kl-warmup-epochs", type=_nonnegative_int, default=0, metavar="N",
                   help="KL weight rising linearly from 0 to 1 over N epochs (as train's --warmup-epochs)")
    p.add_argument("--eval-every", type=_positive_int, default=1)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=_positive_int, default=1)
    p.add_argument("--resume", action="store_true", help="continue the fine-tuning run --out from its checkpoint")
    p.set_defaults(func=cmd_finetune)


def _add_compress_parser(sub) -> None:
    p = sub.add_parser("compress", help="prune, choose bit precision and write a .bcz file and MODEL.json")
    p.add_argument("run_dir", help="a run directory written by 'pyro-bc train'")
    p.add_argument("--out", required=True, help="the .bcz file to write (MODEL.json is written beside it)")
    _add_threshold_options(p)
    p.add_argument("--bits-budget", type=_nonnegative_float, metavar="P",
                   help="lower the variance rule's mantissa bits while the validation error stays within P points")
    p.add_argument("--data", default=None, help="data folder (default: the run's)")
    p.add_argument("--no-fold", action="store_true",
                   help="drop pruned weights without moving their average contribution into the biases "
                        "(the default folds it for gnj, ghs and rhs, not for lu)")
    p.add_argument("--keep-variance", action="store_true",
                   help="also store the kept weights' posterior variances (a version-3 file, loaded with "
                        "pyro_bc.load(path, bayesian=True)); MODEL.json gives cr_file with and without them")
    p.add_argument("--predictive-samples", type=_nonnegative_int, default=None, metavar="K",
                   help="record test error, NLL, Brier score and ECE in MODEL.json: full posterior (K draws), posterior "
                        "mean, compressed network (K = 0: the deterministic networks only)")
    p.set_defaults(func=cmd_compress)
    p = sub.add_parser("evaluate", help="test error, NLL, Brier score, ECE and speed of a .bcz file")
    p.add_argument("model", help="a .bcz file")
    p.add_argument("--data", default=None)
    p.add_argument("--samples", type=_nonnegative_int, default=0, metavar="K",
                   help="also the compressed Bayesian network's metrics over K draws (a file written with "
                        "--keep-variance)")
    p.add_argument("--shift", choices=("rotate",), default=None,
                   help="rotate: error and NLL on the test images rotated by 0, 15, ..., 180 degrees")
    p.add_argument("--ood", default=None, metavar="DIR",
                   help="a data folder whose test images are out of distribution: AUROC of the predictive entropy")
    p.set_defaults(func=cmd_evaluate)


DEMO_THRESHOLDS = [-2.8, -3.0, -5.0]  # the official LeNet-300-100 thresholds (docs/METHOD.md 6)


def cmd_demo(args: argparse.Namespace) -> int:
    """``pyro-bc demo``: train LeNet-300-100 (gnj), compress it at the official thresholds, write the report."""
    from pyro_bc.compression.pipeline import format_table
    from pyro_bc.compression.thresholds import GivenThresholds
    from pyro_bc.runs.compressing import compress_run
    from pyro_bc.runs.report import write_report

    run_dir = Path(args.out)
    config = TrainConfig(model="lenet300", prior="gnj", epochs=args.epochs, data=args.data, threads=args.threads)
    print(f"demo: LeNet-300-100, group normal-Jeffreys prior, {args.epochs} epochs on MNIST -> {run_dir}")
    train(config, run_dir, resume=(run_dir / CHECKPOINT).is_file())
    model_path = run_dir / "MODEL.bcz"
    summary = compress_run(run_dir, model_path, rule=GivenThresholds(DEMO_THRESHOLDS), data=args.data)
    print(format_table(summary))
    report = write_report(run_dir, model_path)
    print(f"wrote {run_dir / CHECKPOINT}, {run_dir / 'metrics.jsonl'}, {model_path}, "
          f"{model_path.with_suffix('.json')}, {report}, {run_dir / 'figures'}, {run_dir / 'posterior.nc'}")
    print(f"open {report} first; then e.g. pyro-bc evaluate {model_path}" + (f" --data {args.data}" if args.data else ""))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """``pyro-bc report``: write ``RUN_DIR/report.md`` and print its path."""
    from pyro_bc.runs.report import write_report

    print(write_report(args.run_dir, args.compressed, predictive_samples=args.predictive_samples))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every ``pyro-bc`` command."""
    parser = Parser(prog="pyro-bc", description="Bayesian compression of neural networks in Pyro")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="fit a model/guide pair by SVI")
    _add_train_args(p)
    p.add_argument("--out", required=True, help="run directory (checkpoint, metrics)")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoint.pt")
    p.set_defaults(func=cmd_train)
    _add_finetune_parser(sub)
    _add_compress_parser(sub)
    _add_recode_parser(sub)
    _add_export_parser(sub)
    p = sub.add_parser("demo", help="train LeNet-300-100 (gnj) on MNIST, compress it and write the report")
    p.add_argument("--epochs", type=_positive_int, default=30)
    p.add_argument("--out", default="runs/demo", help="run directory (resumed if it holds a checkpoint)")
    p.add_argument("--data", default=None)
    p.add_argument("--threads", type=_positive_int, default=1)
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("report", help="write RUN_DIR/report.md with figures, the compression table and posterior.nc")
    p.add_argument("run_dir", help="a run directory written by 'pyro-bc train'")
    p.add_argument("--compressed", default=None, help="a .bcz file; its .json gives the table (default RUN_DIR/MODEL.json)")
    p.add_argument("--predictive-samples", type=_nonnegative_int, default=None, metavar="K",
                   help="add predictions: metrics, reliability, entropy against noise, NLL under rotation (K draws) "
                        "and the DataTree's predictions group")
    p.set_defaults(func=cmd_report)
    parser.commands = sub.choices  # each command's parser, which names the command in its errors
    return parser


def _interrupted(args: argparse.Namespace) -> str:
    """What a Ctrl-C left: a training's last checkpoint, or (files being written atomically) nothing half-written."""
    if args.command in ("train", "demo"):
        checkpoint = Path(args.out) / CHECKPOINT
        if checkpoint.is_file():
            return f"interrupted; the last checkpoint {checkpoint} is intact (--resume continues from it)"
        return "interrupted before the first checkpoint; there is nothing to resume"
    return "interrupted; nothing was left half-written"


def main(argv: list[str] | None = None) -> int:
    """Run ``pyro-bc`` with ``argv``; returns the exit status (argument errors exit 2 from the parser)."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    prefix = f"pyro-bc {args.command}"

    def one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"{prefix}: warning: {' '.join(str(message).split())}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = one_line_warning
        try:
            return args.func(args)
        except BCError as e:
            print(f"{prefix}: error: {' '.join(str(e).splitlines())}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"{prefix}: {_interrupted(args)}", file=sys.stderr)
            return 130


def program() -> int:
    """The ``pyro-bc`` command: :func:`main` in a process of its own, whose allocator it tells to keep freed memory
    for the next training step or evaluation batch (:func:`pyro_bc.allocator.keep_freed_memory`; a library call
    never does)."""
    keep_freed_memory()
    return main()


if __name__ == "__main__":
    sys.exit(program())


