"""Process-wide CPU settings for training, applied when the command line starts (docs/performance.md).

Importing this module applies them; ``tim4rec_pl.cli`` imports it before anything loads torch. Two settings, both
measured with ``benchmarks/speed.py`` and ``benchmarks/epoch.py`` (see benchmarks/README.md):

1. ``OMP_WAIT_POLICY=PASSIVE``: idle OpenMP threads sleep instead of spinning. With the default policy, torch's
   worker threads busy-wait for the next parallel region; when the cores are shared with other processes they
   burn the time slices the working thread needs. Measured on a 2-core machine (TiM4Rec training step): 2x faster
   with one other busy process, 4-5x at load average 5, about 10% slower on an otherwise idle machine (waking a
   sleeping thread costs more than finding it spinning); ``OMP_WAIT_POLICY=ACTIVE`` restores spinning for
   dedicated machines. GNU OpenMP reads the variable once, when torch loads it, so this module must be imported
   before torch.
2. glibc malloc keeps large buffers (the equivalent of ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736
   MALLOC_TOP_PAD_=1073741824``): by default every buffer above the mmap threshold (which adapts, but never
   beyond 32 MiB) is a fresh ``mmap`` that is unmapped when freed, so each step page-faults its large activations
   again and the cost grows with the batch (600,000 page faults and ~1 s of kernel time per step at batch 2048,
   L = 50). Applied in-process with ``mallopt`` (works after start-up, too) and exported for child processes. The
   process keeps its peak heap.

A variable the user has set already wins; ``TIM4REC_CPU_TUNING=0`` switches all of this off. Nothing happens on
platforms without GNU OpenMP / glibc beyond setting the (then harmless) environment variables.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
_INT_MAX = 2**31 - 1  # mallopt takes an int; the environment variables take any size
_MALLOC_SETTINGS = {  # environment variable -> (mallopt parameter, value)
    "MALLOC_MMAP_MAX_": (_M_MMAP_MAX, 0),  # never mmap: large buffers come from (and stay in) the heap
    "MALLOC_TRIM_THRESHOLD_": (_M_TRIM_THRESHOLD, 64 * 2**30),  # (practically) never give heap memory back
    "MALLOC_TOP_PAD_": (_M_TOP_PAD, 2**30),  # grow the heap 1 GiB at a time
}
OMP_SETTINGS = {"OMP_WAIT_POLICY": "PASSIVE"}

applied: dict[str, str] = {}  # what `configure` set in this process (for logs and benchmark records)


def configure(environ: os._Environ | dict[str, str] | None = None) -> dict[str, str]:
    """Apply the CPU settings unless switched off; returns the settings applied (name -> value).

    Args:
        environ: the environment to read and update (default: ``os.environ``).
    """
    env = os.environ if environ is None else environ
    if env.get("TIM4REC_CPU_TUNING", "1").strip().lower() in ("0", "false", "no", "off"):
        return {}
    done: dict[str, str] = {}
    if "torch" not in sys.modules:  # after torch has loaded, OpenMP has read its settings already
        for name, value in OMP_SETTINGS.items():
            if name not in env:
                env[name] = value
                done[name] = value
    libc = _glibc()
    for name, (param, value) in _MALLOC_SETTINGS.items():
        if name in env:  # the user's choice; glibc read it at start-up
            continue
        if libc is not None and libc.mallopt(param, min(value, _INT_MAX)) != 1:
            continue
        env[name] = str(value)  # child processes (spawned DDP ranks) read it at their start-up
        done[name] = str(value)
    applied.update(done)
    return done


def environment() -> dict[str, str]:
    """The settings as environment variables, for a process that does not import this module (e.g. another tool
    measured side by side under the same settings)."""
    return {**OMP_SETTINGS, **{name: str(value) for name, (_, value) in _MALLOC_SETTINGS.items()}}


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        return libc
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return None


def release_free_memory() -> None:
    """Return freed heap memory to the OS now (``malloc_trim(0)``); used by the benchmarks between measurements."""
    libc = _glibc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


configure()
