"""A run directory: its training configuration, its lock, and the names of the files in it.

``RUN_DIR/checkpoint.pt`` (every epoch, atomically), ``RUN_DIR/metrics.jsonl`` (one line per epoch),
``RUN_DIR/config.json``, ``RUN_DIR/finetune.pt`` for a fine-tuning run (:mod:`pyro_bc.compression.finetuning`) and, while
a training runs, ``RUN_DIR/.lock``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import os
from collections.abc import Iterator
from pathlib import Path

from pyro_bc.defaults import VAL_SIZE
from pyro_bc.errors import ConfigError
from pyro_bc.infer.estimators import DEFAULT as DEFAULT_ESTIMATOR
from pyro_bc.infer.estimators import EstimatorChoice
from pyro_bc.priors import PRIORS, known_options, make_prior
from pyro_bc.train.schedule import SCHEDULES

CHECKPOINT, METRICS, CONFIG, LOCK = "checkpoint.pt", "metrics.jsonl", "config.json", ".lock"
PYTHON_MODEL = "python"  # the model field of the config of a run trained by :func:`pyro_bc.fit`
FINETUNE_FILE = "finetune.pt"  # a fine-tuning run's pruning masks and record (pyro_bc.compression.finetuning)


@dataclasses.dataclass
class TrainConfig:
    model: str = "lenet300"
    prior: str = "gnj"
    width: float | None = None  # channel multiplier of vgg and resnet20 (None: the network's own, 1)
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    variance_lr_factor: float = 1.0  # the log-variances' and group scales' learning rate is lr times this
    seed: int = 0
    data: str | None = None
    subset: int | None = None
    val_size: int = VAL_SIZE
    warmup_epochs: int = 0
    prior_options: dict[str, float] = dataclasses.field(default_factory=dict)  # the prior's (validated by it)
    init_from: str | None = None
    device: str = "cpu"
    threads: int = 1
    eval_every: int = 1  # epochs between evaluations of the posterior-mean network (the last epoch always)
    augment: bool = False  # random 4-pixel-padded crops and horizontal flips of the training images
    lr_schedule: str = "constant"  # one of pyro_bc.train.schedule.SCHEDULES
    clip_grad_norm: float | None = None  # clip the gradients' total norm to this before each optimiser step
    clip_var: dict[str, float | None] = dataclasses.field(default_factory=dict)  # per layer name; None: no clip
    estimator: str = DEFAULT_ESTIMATOR  # the gradient estimator per layer kind (pyro_bc.infer.estimators.EstimatorChoice)

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first option out of range (layer names are checked by training)."""
        for name, value, low in (("epochs", self.epochs, 0), ("batch_size", self.batch_size, 1),
                                 ("eval_every", self.eval_every, 1)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise ConfigError(f"{name} must be a whole number >= {low}, got {value!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"the learning rate must be a positive number, got {self.lr}")
        if not (self.variance_lr_factor > 0 and math.isfinite(self.variance_lr_factor)):
            raise ConfigError(f"variance_lr_factor must be a positive number, got {self.variance_lr_factor}")
        if self.lr_schedule not in SCHEDULES:
            raise ConfigError(f"unknown learning-rate schedule {self.lr_schedule!r}: choose one of "
                              f"{', '.join(SCHEDULES)}")
        if self.clip_grad_norm is not None and not (self.clip_grad_norm > 0 and math.isfinite(self.clip_grad_norm)):
            raise ConfigError(f"clip_grad_norm must be a positive number, got {self.clip_grad_norm}")
        if self.prior in PRIORS:  # a network of pyro_bc.fit names its priors joined by "+", with no options
            make_prior(self.prior, **self.prior_options)
        elif self.prior_options:
            raise ConfigError(f"prior options {self.prior_options} for a network of several priors ({self.prior})")
        EstimatorChoice.parse(self.estimator)
        for name, value in self.clip_var.items():
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"clip_var of layer {name!r} must be a positive number or None, got {value}")

    @classmethod
    def from_dict(cls, saved: dict) -> TrainConfig:
        """The config a checkpoint or ``config.json`` stored (``dataclasses.asdict``). One written before prior
        options were a mapping holds ``tau0`` and ``slab_scale`` as fields: it gets those its prior takes."""
        saved = dict(saved)
        legacy = {name: saved.pop(name) for name in ("tau0", "slab_scale") if name in saved}
        if legacy and "prior_options" not in saved:
            saved["prior_options"] = known_options(saved.get("prior", ""), legacy)
        return cls(**saved)


class RunLock:
    """A lock file so that two trainings never write into the same run directory."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK

    def __enter__(self):
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pid = self.path.read_text().strip()
            if pid.isdigit() and _alive(int(pid)):
                raise ConfigError(f"{self.path.parent}: a training (pid {pid}) is already running in this directory")
            self.path.unlink(missing_ok=True)  # stale lock from a killed run
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return self

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def prepare_run_dir(out: str | Path) -> Path:
    run_dir = Path(out)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"output directory {run_dir} cannot be written: {e.strerror}")
    return run_dir


@contextlib.contextmanager
def removed_if_refused(run_dir: Path) -> Iterator[None]:
    """The folders of ``run_dir`` that do not exist yet are removed again (deepest first, while empty) if the block
    fails, so a training refused for its data, network or options leaves no empty run directory behind."""
    missing = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
    try:
        yield
    except BaseException:
        for folder in missing:
            try:
                folder.rmdir()
            except OSError:  # not empty (a training that wrote something), or not ours to remove
                break
        raise
