"""Data-parallel training with ``torch.distributed``, started by PyTorch's own launcher (``torchrun``).

Under ``torchrun --nproc-per-node K -m pyro_bc.cli train ...`` every process trains the same network
on its rows of each *global* minibatch (``K x --batch-size`` examples): the ELBO module is wrapped in
``DistributedDataParallel``, which averages the gradients. All processes share one random stream
(seeded from the run seed) and draw the local-reparameterisation noise for the whole global batch,
each keeping its own rows, so a K-process run computes the same steps as one process with the
global batch (checked by the tests). Outside a launcher, :func:`process_group` is a single process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist

from pyro_bc.errors import ConfigError

LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
    """Where this process stands: ``rank`` of ``world_size``, ``local_rank`` on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes checkpoints, metrics, progress bars and outputs."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()

    def rows(self, batch_len: int) -> tuple[int, int]:
        """This rank's rows ``[start, stop)`` of a global batch: contiguous, disjoint, as even as possible."""
        return (batch_len * self.rank // self.world_size, batch_len * (self.rank + 1) // self.world_size)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of ``value`` over the ranks (``value`` itself in a single process)."""
        if not self.active:
            return value
        value = value.clone()
        dist.all_reduce(value)
        return value / self.world_size


def from_environment(environ: dict[str, str] | None = None) -> ProcessGroup | None:
    """The process group the launcher describes, ``None`` outside a launcher; a clear error if incomplete."""
    env = os.environ if environ is None else environ
    present = [name for name in LAUNCHER_VARIABLES if name in env]
    if not present:
        return None
    missing = [name for name in LAUNCHER_VARIABLES if name not in env]
    if missing:
        raise ConfigError(f"distributed launch environment is incomplete: {', '.join(present)} set but "
                          f"{', '.join(missing)} missing (start with torchrun, or set all of "
                          f"{', '.join(LAUNCHER_VARIABLES)})")
    try:
        rank, world, local = (int(env[name]) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except ValueError:
        raise ConfigError("distributed launch environment: RANK, WORLD_SIZE and LOCAL_RANK must be whole numbers, "
                          f"got {env['RANK']!r}, {env['WORLD_SIZE']!r}, {env['LOCAL_RANK']!r}")
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ConfigError(f"distributed launch environment: RANK {rank} is not in [0, WORLD_SIZE {world})")
    return ProcessGroup(rank, world, local)


def backend_for(device_type: str) -> str:
    """``nccl`` for CUDA devices, ``gloo`` for the CPU."""
    return "nccl" if device_type == "cuda" else "gloo"


def is_main_process() -> bool:
    """True outside a launcher and on rank 0 under one (before or after the group is set up)."""
    return os.environ.get("RANK", "0") == "0"


@contextlib.contextmanager
def process_group(device_type: str = "cpu") -> Iterator[ProcessGroup]:
    """Join the launcher's process group for the duration of the block (a single process outside one)."""
    group = from_environment()
    if group is None:
        yield ProcessGroup()
        return
    if device_type == "cuda":
        if torch.cuda.device_count() <= group.local_rank:
            raise ConfigError(f"LOCAL_RANK {group.local_rank} needs a CUDA device, "
                              f"this machine has {torch.cuda.device_count()}")
        torch.cuda.set_device(group.local_rank)
    dist.init_process_group(backend_for(device_type))
    try:
        yield group
    finally:
        dist.destroy_process_group()
