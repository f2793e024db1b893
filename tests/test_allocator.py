"""``pyro_bc.allocator``: glibc's thresholds fixed by the ``pyro-bc`` program only, checked through glibc's own
accounting (``mallinfo2``) in fresh processes."""

import json
import os
import platform
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from pyro_bc import allocator, cli

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator")

#: in a fresh process: maybe tune, then allocate, touch and free 64 MiB (above the 32 MiB ceiling of glibc's
#: adaptive mmap threshold, so that what the imports freed cannot decide it), and report what glibc holds
BLOCK = 64 * 2**20
PROBE = """
import ctypes, json, sys
BLOCK = int(sys.argv[2])
from pyro_bc.allocator import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
tuned = keep_freed_memory() if sys.argv[1] == "tune" else None
block = ctypes.create_string_buffer(BLOCK)  # malloc'd and zeroed: every page touched
during = libc.mallinfo2()
del block
after = libc.mallinfo2()
print(json.dumps({"tuned": tuned, "mapped_during": during.hblkhd, "free_in_heap_after": after.fordblks}))
"""


def _probe(mode: str, env: dict | None = None) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode, str(BLOCK)], capture_output=True, text=True, check=True,
                         env=env, cwd=Path(__file__).parents[1])
    return json.loads(out.stdout)


@glibc
def test_freed_buffers_stay_in_the_heap_once_tuned():
    """By default glibc maps a 64 MiB block on its own and unmaps it when freed; tuned, the block comes from the heap
    and stays there, free, for the next allocation."""
    plain, tuned = _probe("plain"), _probe("tune")
    assert plain["mapped_during"] >= BLOCK and plain["free_in_heap_after"] < BLOCK
    assert tuned["tuned"] is True
    assert tuned["mapped_during"] < BLOCK and tuned["free_in_heap_after"] >= BLOCK


@glibc
def test_the_users_own_malloc_tunables_are_left_alone():
    env = dict(os.environ, GLIBC_TUNABLES="glibc.malloc.mmap_threshold=131072")
    result = _probe("tune", env)
    assert result["tuned"] is False
    assert result["mapped_during"] >= BLOCK and result["free_in_heap_after"] < BLOCK  # the user's threshold


def test_nothing_is_changed_outside_glibc(monkeypatch):
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("", ""))
    assert allocator.keep_freed_memory() is False


def test_the_program_tunes_and_the_library_entry_does_not(monkeypatch):
    """``pyro-bc`` (the console script) runs :func:`cli.program`, which tunes the allocator before :func:`cli.main`;
    ``cli.main``, which tests and users call in their own process, does not."""
    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append("tune"))
    monkeypatch.setattr(cli, "main", lambda argv=None: calls.append("main") or 0)
    assert cli.program() == 0 and calls == ["tune", "main"]
    scripts = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"pyro-bc": "pyro_bc.cli:program"}


@pytest.mark.parametrize("variable", ["GLIBC_TUNABLES", "MALLOC_ARENA_MAX_"])
def test_malloc_settings_in_the_environment_are_honoured_in_process(monkeypatch, variable):
    """Checked before ``mallopt`` is reached: this process's allocator is not touched."""
    monkeypatch.setenv(variable, "glibc.malloc.arena_max=2" if variable == "GLIBC_TUNABLES" else "2")
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda *a: pytest.fail("mallopt reached"))
    assert allocator.keep_freed_memory() is False
