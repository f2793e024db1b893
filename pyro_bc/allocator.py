"""glibc's allocator told to keep the memory a training step frees, for the next step.

A training step allocates and frees the same output-sized buffers every step. glibc maps a block above its mmap
threshold (128 KiB as a process starts, rising only as far as such blocks are freed) on its own and unmaps it when
freed, and gives free memory at the top of the heap back to the system above its trim threshold; the next step then
page-faults that memory in afresh. With no block mapped on its own and the heap hardly ever trimmed, the memory is
kept between steps, at the price of a resident size that stays at the process's peak. Measured here: LeNet-5's
Bayesian step 7-15% faster, ResNet-18's and VGG's 2%, LeNet-300-100's within the spread between processes, and
inference at batch 1000 1.5-2x faster (docs/CLI.md, "Compressed files").

Only a program may change its process's allocator: the ``pyro-bc`` command does (:func:`pyro_bc.cli.program`),
for training and for evaluation's large batches alike. ``fit`` and the rest of the library never do: they run in
the user's process, whose script may call this function itself. Malloc settings in the environment are left as
they are.
"""

from __future__ import annotations

import ctypes
import os
import platform

#: ``mallopt`` parameters (glibc's ``malloc.h``) and the values set: no block mapped on its own, no trimming below
#: 1 GiB of free memory at the top of the heap, the heap grown 64 MiB beyond each request
SETTINGS = {"M_MMAP_MAX": (-4, 0), "M_TRIM_THRESHOLD": (-1, 1 << 30), "M_TOP_PAD": (-2, 64 << 20)}


def keep_freed_memory() -> bool:
    """Set glibc's :data:`SETTINGS` so that freed buffers stay in the heap for reuse (see the module docstring).
    Returns whether it changed them: not outside glibc, nor where the environment sets malloc parameters already
    (``GLIBC_TUNABLES``'s ``glibc.malloc.*``, or the older ``MALLOC_*_`` variables)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "") or any(
            k.startswith("MALLOC_") and k.endswith("_") for k in os.environ):
        return False
    mallopt = ctypes.CDLL(None).mallopt  # the C library the process runs on
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(option, value) == 1 for option, value in SETTINGS.values())
